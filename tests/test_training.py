"""training/: data layouts, feature cache, gradients, warm start, fine-tuning, LoRA, robust runs (tiny preset)."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, max_rel_err

from training import dataset as ds
from training import modeling, precompute, synthetic, train
from training.dataset import Collator, DataArguments, FeatureCache, TalkerDataset, build_rows

TINY_CONFIG = REPO_ROOT / "training" / "config_tiny.json"
BATCH_KEYS = ("input_ids", "attention_mask", "speech_span", "mel_len", "motion_len", "task_tag", "motion", "audio",
              "audio16k", "feat", "speech_latents", "speaker_emb")


def tiny_config(out_dir, **overrides) -> dict:
    cfg = json.loads(TINY_CONFIG.read_text())
    cfg.update(output_dir=str(out_dir), report_to="none", disable_tqdm=True, logging_steps=1, save_steps=1000)
    cfg.update(overrides)
    return cfg


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in BATCH_KEYS}


def tiny_model_and_tokenizer(encoders: bool = True):
    from runtime.prompt import demo_tokenizer
    from speech_llm import SpeechLLM, tiny_model_args_and_config

    args, config = tiny_model_args_and_config()
    torch.manual_seed(0)
    model = SpeechLLM(args, config)
    if encoders:
        modeling.attach_encoders(model, modeling.TalkerArguments(model_preset="tiny"), log=lambda *a: None)
    return model.freeze_for_training(), demo_tokenizer(args.model_max_length), args


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """4 clips of 1.2 s (3 T2SV, 1 TTS: the overfit set, equal lengths) + 1 T2SV clip of 1.6 s + 1 TTS clip."""
    root = tmp_path_factory.mktemp("data")
    paths = synthetic.write_dataset(root, n_t2sv=4, n_tts=2, seconds=(1.2, 1.2, 1.2, 1.6))
    t2sv, tts = paths["t2sv"], paths["tts_rows"]
    rows = [{"wav": w, "motion": m, "text": t} for w, m, t in t2sv[:3]] + [{"wav": tts[0][0], "text": tts[0][1]}]
    paths["overfit"] = str(root / "overfit.jsonl")
    synthetic.write_jsonl(paths["overfit"], rows)
    return paths


# ------------------------------------------------------------------------------------------ data

def test_layouts_env_vars_and_the_reference_sample_rules(data, monkeypatch, tmp_path):
    _, tok, args = tiny_model_and_tokenizer(encoders=False)
    log = []
    csv_rows = build_rows(DataArguments(data_path=data["csv"]), data["tts"], log.append)
    assert [r.task for r in csv_rows] == ["t2sv"] * 4 + ["tts"] * 4  # 2 TTS rows up-sampled 2x to match
    assert any("up-sampled 2x" in m for m in log)
    jsonl_rows = build_rows(DataArguments(data_path=data["jsonl"]), log=log.append)
    assert [(r.task, r.wav, r.motion) for r in jsonl_rows] == [(r.task, r.wav, r.motion) for r in csv_rows[:4]] + [
        ("tts", w, None) for w, _ in data["tts_rows"]]
    # the reference's environment variables: TRAIN_CSV, TRAIN_TXT + VIDEO_DIR, DATA_ROOT for relative paths
    rel_csv = tmp_path / "rel.csv"
    rel_csv.write_text("motion_pt_path,wav_path,text,duration\n"
                       f"{os.path.relpath(data['t2sv'][0][1], REPO_ROOT.anchor)},"
                       f"{os.path.relpath(data['t2sv'][0][0], REPO_ROOT.anchor)},hi,1.2\n")
    monkeypatch.setenv("TRAIN_CSV", str(rel_csv))
    monkeypatch.setenv("DATA_ROOT", REPO_ROOT.anchor)
    (row,) = build_rows(DataArguments(), log=log.append)
    assert (row.wav, row.motion, row.text) == (data["t2sv"][0][0], data["t2sv"][0][1], "hi")
    monkeypatch.delenv("TRAIN_CSV")
    monkeypatch.delenv("DATA_ROOT")
    monkeypatch.setenv("TRAIN_TXT", data["txt"])
    monkeypatch.setenv("VIDEO_DIR", data["video_dir"])
    txt_rows = build_rows(DataArguments(), log=log.append)
    assert [(r.wav, r.motion) for r in txt_rows] == [(r.wav, r.motion) for r in csv_rows[:4]]

    delay = 2  # placeholders = max(ceil(mel_len / 4), motion_len // 4 + delay), as the reference's data set
    args.delay = delay
    dset = TalkerDataset(jsonl_rows, tok, args)
    assert TalkerDataset(txt_rows, tok, args)[0]["input_ids"].numel() < dset[0]["input_ids"].numel()  # text ''
    items = [dset[i] for i in range(len(dset))]
    for item, row in zip(items, jsonl_rows):
        n_run = int(item["speech_span"][1] - item["speech_span"][0])
        assert n_run == max(-(-item["mel_len"] // 4), item["motion_len"] // 4 + delay)
        assert item["task_tag"] == (row.task == "t2sv") and item["skipped"] == []
        if row.task == "t2sv":
            assert item["motion_len"] % 4 == 0 and item["motion"].shape == (item["motion_len"], 40)
            assert item["mel_len"] * 640 <= item["audio16k"].numel() < (item["mel_len"] + 1) * 640
    assert [i["mel_len"] for i in items] == [30, 30, 30, 40, 30, 30]
    batch = Collator(tok.pad_token_id)(items[3:])  # a T2SV clip of 1.6 s and two TTS clips
    assert batch["motion"].shape == (3, 40, 40) and batch["audio"].shape == (3, 1, 40 * 960)
    assert batch["feat"].shape == (3, 1, 128, 3000) and batch["audio16k"].shape == (3, 1, 40 * 640)
    assert batch["input_ids"][1, -1] == tok.pad_token_id and not batch["attention_mask"][1, -1]


def test_long_clips_get_an_aligned_random_30s_window(tmp_path):
    from media.audio import load_audio, resample
    from common.motion_stats import normalize_motion

    wav = tmp_path / "long.wav"
    from media.audio import save_wav
    save_wav(wav, torch.tensor(synthetic.tone(33.0, 16000, 3)), sr=16000, subtype="PCM_16")
    motion = synthetic.smooth_motion(800, 1)
    torch.save(motion, tmp_path / "long.pt")
    synthetic.write_jsonl(tmp_path / "m.jsonl", [{"wav": str(wav), "motion": str(tmp_path / "long.pt"), "text": "x"}])
    _, tok, args = tiny_model_and_tokenizer(encoders=False)
    dset = TalkerDataset(build_rows(DataArguments(data_path=str(tmp_path / "m.jsonl")), log=lambda m: None), tok,
                         args, seed=5)
    starts = []
    for epoch in (0, 1):
        dset.set_epoch(epoch)
        item = dset[0]
        start = dset.window_start(0, 800)
        starts.append(start)
        assert 0 <= start <= 50 and item["mel_len"] == 750 and item["motion_len"] == 748
        assert torch.equal(item["motion"], normalize_motion(motion)[start:start + 748])
        full = load_audio(wav)[0]
        assert torch.equal(item["audio16k"], full[start * 640:(start + 750) * 640])
        assert torch.equal(item["audio"], resample(full, 16000, 24000)[start * 960:(start + 750) * 960])
        assert dset.window_start(0, 800) == start  # a function of (seed, epoch, index): resumable
    assert starts[0] != starts[1]


def test_bad_samples_are_skipped_and_reported(data, tmp_path):
    bad_wav = tmp_path / "corrupt.wav"
    bad_wav.write_bytes(b"RIFF\x00\x00\x00\x00WAVEgarbage" * 10)
    w, m, t = data["t2sv"][0]
    rows = [{"wav": w, "motion": m, "text": t}, {"wav": str(bad_wav), "motion": m, "text": "x"},
            {"wav": w, "motion": str(tmp_path / "missing.pt"), "text": "y"}, {"wav": data["tts_rows"][0][0]}]
    synthetic.write_jsonl(tmp_path / "bad.jsonl", rows)
    _, tok, args = tiny_model_and_tokenizer(encoders=False)
    rows = build_rows(DataArguments(data_path=str(tmp_path / "bad.jsonl")), log=lambda m: None)
    dset = TalkerDataset(rows, tok, args)
    item = dset[1]  # replaced by the next loadable sample (3), the two bad ones reported with their reasons
    assert item["sample_path"] == rows[3].label
    (corrupt, why1), (missing, why2) = item["skipped"]
    assert corrupt == rows[1].label and "corrupt.wav: not a readable audio file" in why1
    assert missing == rows[2].label and "missing.pt: motion file not found" in why2
    logged = []
    monitor = ds.FailureMonitor(rows, max_fraction=0.5, log=logged.append, log_path=str(tmp_path / "skipped.jsonl"))
    monitor.record(item["skipped"])
    monitor.record(dset[2]["skipped"])  # the missing motion again: reported once
    assert len(logged) == 2 and len((tmp_path / "skipped.jsonl").read_text().splitlines()) == 2
    with pytest.raises(ds.DataError, match=r"2 of 4 samples failed to load, more than max_failed_fraction 0.25"):
        ds.FailureMonitor(rows, max_fraction=0.25, log=logged.append).record(item["skipped"])

    # a run over the budget stops with that message (before its first optimizer step)
    cfg = tiny_config(tmp_path / "run", data_path=str(tmp_path / "bad.jsonl"), max_steps=2,
                      per_device_train_batch_size=4, max_failed_fraction=0.25)
    with pytest.raises(ds.DataError, match="failed to load, more than max_failed_fraction 0.25"):
        train.run(cfg, log=lambda m: None)
    assert not os.path.exists(tmp_path / "run" / "final")


# ------------------------------------------------------------------------------------------ model

@pytest.mark.parametrize("lora", [False, True])
def test_every_trainable_parameter_gets_a_gradient_on_every_kind_of_batch(data, lora, one_thread):
    model, tok, args = tiny_model_and_tokenizer()
    if lora:  # with activation checkpointing of the backbone, as a memory-bound fine-tune would run
        modeling.apply_lora(model, modeling.TalkerArguments(lora_r=2), log=lambda m: None)
        model.activation_checkpointing_enable()
        assert all(layer.gradient_checkpointing for layer in model.llm.model.layers)
    rows = build_rows(DataArguments(data_path=data["jsonl"]), log=lambda m: None)
    dset = TalkerDataset(rows, tok, args)
    collate = Collator(tok.pad_token_id)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("pretrained_speech_encoder.", "spk.")) for n in trainable)
    assert "llm.model.embed_tokens.weight" not in trainable  # tied to the frozen lm_head, as the reference
    assert any(".lora_A." in n for n in trainable) == lora
    model.train()
    assert not model.spk.training and not model.pretrained_speech_encoder.training  # frozen encoders stay in eval
    for name, idx in (("all-TTS", [4, 5]), ("all-T2SV", [0, 3]), ("mixed", [1, 4])):
        model.zero_grad(set_to_none=True)
        out = model(**model_inputs(collate([dset[i] for i in idx])))
        out.loss.backward()
        missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and p.grad is None)
        assert not missing, f"{name} batch: no gradient for {missing[:5]}"
        assert torch.isfinite(out.loss)


def write_tts_checkpoint(folder, seed: int = 1):
    """A TTS-stage checkpoint in the reference's key names (two shards) made from a random tiny model, plus a
    key the model does not have and one of another shape. Returns (the source state dict, the TTS keys)."""
    from safetensors.torch import save_file

    from speech_llm import SpeechLLM, tiny_model_args_and_config

    torch.manual_seed(seed)
    source = SpeechLLM(*tiny_model_args_and_config()).state_dict()
    tts = {}
    for key, value in source.items():  # this model's keys -> the TTS stage's (the reference's load_tts_checkpoint)
        if key.startswith(("motion_cfm.", "motion_patch_encoder.", "llm.lm_head.")):
            continue
        new = "motion_cfm." + key[len("speech_cfm."):] if key.startswith("speech_cfm.") else key
        new = new.replace(".global_cond_proj.", ".spk_proj.")
        if new.startswith("speech_patch_encoder."):
            new = "patch_encoder." + new[len("speech_patch_encoder."):].replace("input_proj.", "in_proj.", 1)
        tts[new] = value.clone()
    tts["projector_speech.linear2.weight"] = torch.zeros(64, 64)  # not in this model
    tts["head_stop.proj.weight"] = torch.zeros(32, 64)  # another shape
    keys = sorted(tts)
    folder = Path(folder)
    folder.mkdir(parents=True)
    save_file({k: tts[k] for k in keys[:len(keys) // 2]}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({k: tts[k] for k in keys[len(keys) // 2:]}, str(folder / "model-00002-of-00002.safetensors"))
    return source, tts


def test_warm_start_from_a_tts_stage_checkpoint_remaps_and_reports(tmp_path):
    from speech_llm import SpeechLLM, tiny_model_args_and_config

    folder = tmp_path / "checkpoint-45000"
    source, tts = write_tts_checkpoint(folder)
    assert "motion_cfm.estimator.spk_proj.weight" in tts and "patch_encoder.in_proj.weight" in tts
    torch.manual_seed(2)
    model = SpeechLLM(*tiny_model_args_and_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    log = []
    report = modeling.warm_start_from_tts(model, str(folder), log.append)
    after = model.state_dict()
    assert report.not_in_model == ["projector_speech.linear2.weight"]
    assert report.shape_mismatch == ["head_stop.proj.weight: checkpoint (32, 64) vs model (64, 64)"]
    assert torch.equal(after["speech_cfm.estimator.global_cond_proj.weight"],
                       source["speech_cfm.estimator.global_cond_proj.weight"])
    assert torch.equal(after["speech_patch_encoder.input_proj.weight"], source["speech_patch_encoder.input_proj.weight"])
    assert torch.equal(after["llm.model.layers.1.mlp.up_proj.weight"], source["llm.model.layers.1.mlp.up_proj.weight"])
    for untouched in ("motion_cfm.estimator.global_cond_proj.weight", "motion_patch_encoder.cls_token",
                      "head_stop.proj.weight"):
        assert torch.equal(after[untouched], before[untouched]), untouched
    assert len(report.loaded) == len(tts) - 2
    assert report.per_component()["speech_cfm"] == sum(k.startswith("speech_cfm.") for k in source)
    assert "skipped 1 keys not in the model: projector_speech.linear2.weight" in "\n".join(log)
    assert "skipped 1 keys of another shape" in "\n".join(log)


def test_lora_merge_equals_peft_merge(one_thread):
    import copy

    from peft.tuners.lora import LoraLayer

    from speech_llm import SpeechLLM, tiny_model_args_and_config

    torch.manual_seed(0)
    model = SpeechLLM(*tiny_model_args_and_config())
    talker = modeling.TalkerArguments(lora_r=4, lora_alpha=8)
    modeling.apply_lora(model, talker, log=lambda m: None)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.data.normal_()  # B starts at zero; make the adapters do something
    merged = modeling.merge_lora_state_dict(model.state_dict(), modeling.lora_scale(talker))
    reference = copy.deepcopy(model)
    for name, module in list(reference.llm.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, child = name.rsplit(".", 1)
            setattr(reference.llm.get_submodule(parent), child, module.get_base_layer())
    expected = reference.state_dict()
    assert sorted(merged) == sorted(expected) and not any("lora" in k or "base_layer" in k for k in merged)
    assert max(max_rel_err(merged[k], expected[k]) for k in merged) < 1e-6
    x = torch.randn(1, 6, 64)
    with torch.no_grad():
        assert max_rel_err(reference.backbone(x), model.backbone(x)) < 1e-5


# ------------------------------------------------------------------------------------------ feature cache

def test_feature_cache_sharded_resumable_and_equal_to_online(data, tmp_path, monkeypatch, one_thread):
    cache = tmp_path / "cache"
    cfg = tiny_config(tmp_path / "unused", data_path=data["jsonl"], feature_cache=str(cache))
    for rank in (0, 1):  # two torchrun ranks (no process group: RANK / WORLD_SIZE only)
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert precompute.run(cfg, shard_size=2, log=lambda m: None)["encoded"] == 3
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    r0, r1 = (set(ds.read_index(str(cache / f"index-r000{r}.jsonl"))) for r in (0, 1))
    assert len(r0) == len(r1) == 3 and not r0 & r1
    assert precompute.run(cfg, log=lambda m: None)["encoded"] == 0  # resumable: everything is indexed
    with open(cache / "index-r0001.jsonl", "a") as f:
        f.write('{"key": "torn')  # a kill during an append leaves a torn last line: ignored
    assert len(FeatureCache(str(cache))) == 6

    model, tok, args = tiny_model_and_tokenizer()
    model.train()
    rows = build_rows(DataArguments(data_path=data["jsonl"]), log=lambda m: None)
    online, cached = TalkerDataset(rows, tok, args), TalkerDataset(rows, tok, args, FeatureCache(str(cache)))
    collate = Collator(tok.pad_token_id)
    same_length = [0, 1, 2, 4]  # 1.2 s each: no crop of the speaker audio, no padding before the codec

    def loss(dataset, idx):
        torch.manual_seed(7)
        return model(**model_inputs(collate([dataset[i] for i in idx])))

    a, b = loss(online, same_length), loss(cached, same_length)
    errs = {k: max_rel_err(getattr(b, k).detach(), getattr(a, k).detach())
            for k in ("loss", "loss_speech_cfm", "loss_motion_cfm", "stop_loss")}
    print("cached vs online loss, relative error:", {k: f"{v:.1e}" for k, v in errs.items()})
    assert max(errs.values()) < 1e-5
    assert "audio" not in collate([cached[0]]) and "speech_latents" not in collate([online[0]])

    # clips of different lengths: online, the speaker audio is cut to the batch's shortest clip (reference)
    from speech_llm import encode_speaker
    item = online[3]  # 1.6 s = 40 frames
    own = cached[3]["speaker_emb"]
    assert max_rel_err(own, encode_speaker(model.spk, item["audio16k"][None], 40)[0]) < 1e-5
    cropped = model.get_speaker_embeddings(collate([online[0], item])["audio16k"], [30, 40])[1]
    assert max_rel_err(cropped, encode_speaker(model.spk, item["audio16k"][None], 30)[0]) < 1e-5
    assert max_rel_err(cropped, own) > 1e-3


def test_overfit_30_steps_then_release_folder_demo_and_infer(data, tmp_path, one_thread, capsys):
    """The tiny preset overfits 4 samples (3 T2SV + 1 TTS) in 30 steps with cached features, warm-started
    from a TTS-stage checkpoint; `final` loads strictly and drives the demo and `infer.py --demo`."""
    cache = tmp_path / "cache"
    precompute.run(tiny_config(tmp_path / "x", data_path=data["overfit"], feature_cache=str(cache)),
                   log=lambda m: None)
    write_tts_checkpoint(tmp_path / "tts_stage")
    log = []
    result = train.run(tiny_config(tmp_path / "run", data_path=data["overfit"], feature_cache=str(cache), max_steps=30,
                                   report_to="tensorboard", save_steps=15, tts_checkpoint_path=str(tmp_path / "tts_stage")),
                       log=log.append)
    assert any(m.startswith("[warm start] loaded ") for m in log), log
    history = [h for h in result["log_history"] if "loss" in h]
    assert len(history) == 30 and {"loss_speech_cfm", "loss_motion_cfm", "loss_stop"} <= set(history[0])
    first = sum(h["loss"] for h in history[:5]) / 5
    last = sum(h["loss"] for h in history[-5:]) / 5
    parts = {k: (history[0][k], history[-1][k]) for k in ("loss_speech_cfm", "loss_motion_cfm", "loss_stop")}
    print(f"overfit: loss {first:.2f} (steps 1-5) -> {last:.2f} (steps 26-30); first -> last step: {parts}")
    assert last < 0.8 * first
    assert parts["loss_stop"][1] < 0.5 * parts["loss_stop"][0]
    assert list((tmp_path / "run" / "runs").rglob("events.out.tfevents.*"))  # report_to tensorboard
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-15", "checkpoint-30"]

    from runtime.pipeline import RANDOM_WEIGHTS_BANNER, TalkerPipeline
    from speech_llm import SpeechLLM
    final = Path(result["final"])
    assert final == tmp_path / "run" / "final"
    trained = SpeechLLM.from_pretrained(final)  # strict
    assert {"model.safetensors", "config.json", "speech_llm_args.json", "tokenizer.json"} <= {
        p.name for p in final.iterdir()}
    pipe = TalkerPipeline.demo(checkpoint_dir=final)
    assert torch.equal(pipe.llm.head_stop.proj.weight, trained.head_stop.proj.weight)
    assert pipe.generate(mode="tts", text="Hello.", seed=0, progress=False, max_seconds=1).audio_24k.numel() > 0

    import shlex

    import infer
    out = tmp_path / "demo.mp4"
    (hint,) = [m.split("try: ", 1)[1].rstrip(")") for m in log if m.startswith(f"[train] wrote {final} ")]
    assert hint == f"python infer.py --demo --checkpoint-dir {final}"  # the command train.py prints works
    capsys.readouterr()
    assert infer.main(shlex.split(hint)[2:] + ["--output", str(out), "--max-seconds", "1", "--quiet"]) == 0
    assert out.stat().st_size > 0 and out.with_suffix(".wav").exists()
    banner = capsys.readouterr().out.splitlines()[0]  # the trained SpeechLLM is not called random
    assert f"tiny SpeechLLM trained in {final}" in banner and banner != RANDOM_WEIGHTS_BANNER


def test_fine_tune_release_folder_full_and_lora(release_dir, tiny_loaders, no_env, data, tmp_path, monkeypatch,
                                                one_thread):
    """init_from a release folder (strict), encoders found the release way (beside it + wavlm_ckpt), one run
    with a corrupt wav within the failure budget; LoRA merged back on save, logged to wandb offline."""
    from runtime.pipeline import TalkerPipeline
    from speech_llm import SpeechLLM

    bad = tmp_path / "corrupt.wav"
    bad.write_bytes(b"not audio at all" * 64)
    w, m, t = data["t2sv"][3]
    rows = [json.loads(line) for line in Path(data["jsonl"]).read_text().splitlines()]
    synthetic.write_jsonl(tmp_path / "ft.jsonl", rows + [{"wav": str(bad), "motion": m, "text": t}])
    base = dict(model_preset="released", init_from=str(release_dir / "talker-t2av"),
                wavlm_ckpt=str(release_dir / "wavlm_large_finetune.pth"), data_path=str(tmp_path / "ft.jsonl"),
                llm_model_name_or_path=None, max_failed_fraction=0.2, per_device_train_batch_size=4)
    initial = SpeechLLM.from_pretrained(release_dir / "talker-t2av")
    for var in ("WANDB_DIR", "WANDB_MODE"):  # what run() sets for wandb is undone after the test
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    for lora in (False, True):
        out = tmp_path / ("lora" if lora else "full")
        extra = dict(lora_r=4, lora_alpha=8, learning_rate=0.01, report_to="wandb") if lora else {}
        log = []
        result = train.run(tiny_config(out, **base, max_steps=2, **extra), log=log.append)
        text = "\n".join(log)
        assert f"fine-tuning {release_dir / 'talker-t2av'}" in text and "whisperx_vae" in text
        assert "corrupt.wav" in text and (out / "skipped_samples.jsonl").exists()
        pipe = TalkerPipeline.from_pretrained(
            result["final"], whisperx_vae_ckpt=release_dir / "whisperx-vae" / "model.ckpt",
            liax_ckpt=release_dir / "lia-x.pt", wavlm_ckpt=release_dir / "wavlm_large_finetune.pth", device="cpu")
        assert pipe.generate(mode="t2av", seed=0, progress=False, max_seconds=0.5).n_patches > 0
        q = "llm.model.layers.0.self_attn.q_proj.weight"
        tuned = SpeechLLM.from_pretrained(result["final"]).state_dict()
        assert not torch.equal(tuned[q], initial.state_dict()[q])  # the backbone moved (LoRA: merged in)
        if lora:
            ckpt = out / "checkpoint-2"
            assert json.loads((ckpt / "lora.json").read_text())["merged"] is False
            assert list((out / "wandb").glob("offline-run-*"))  # report_to wandb, offline
            norm = "llm.model.layers.0.input_layernorm.weight"  # not a LoRA target: unchanged
            assert torch.equal(tuned[norm], initial.state_dict()[norm])
            assert not torch.equal(tuned["head_stop.proj.weight"], initial.state_dict()["head_stop.proj.weight"])


# ------------------------------------------------------------------------------------------ robust runs

def test_non_finite_loss_stops_naming_the_step_and_samples(data, tmp_path, monkeypatch, one_thread):
    from speech_llm import SpeechLLM

    calls = []
    original = SpeechLLM._stop_loss

    def poisoned(self, hidden, speech_span):
        loss, labels, weight = original(self, hidden, speech_span)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), labels, weight

    monkeypatch.setattr(SpeechLLM, "_stop_loss", poisoned)
    cfg = tiny_config(tmp_path / "run", data_path=data["overfit"], max_steps=5)
    with pytest.raises(train.NonFiniteLossError) as err:
        train.run(cfg, log=lambda m: None)
    message = str(err.value)
    assert "at training step 3 " in message and "stop nan" in message
    assert re.search(r"the batch's samples: .*\.wav.*; .*\.wav", message)


def _checkpoints(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("checkpoint-"))


def _weights(folder):
    from safetensors.torch import load_file
    return load_file(str(Path(folder) / "model.safetensors"))


def test_kill_and_resume_equals_an_uninterrupted_run(data, tmp_path, monkeypatch, one_thread):
    """SIGKILL right after a checkpoint, then resume: the same weights as an uninterrupted run, bitwise
    (CPU, fixed seed: model, optimizer, scheduler, RNG and data position are restored). A failure during a
    save leaves no checkpoint-N that resume would pick."""
    common = dict(data_path=data["overfit"], max_steps=6, save_steps=2, save_total_limit=2)
    reference = train.run(tiny_config(tmp_path / "straight", **common), log=lambda m: None)

    # 1. a process killed with SIGKILL once checkpoint-2 exists, then resumed
    killed = tmp_path / "killed"
    cfg_path = tmp_path / "killed.json"
    cfg_path.write_text(json.dumps(tiny_config(killed, **common)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO_ROOT / "training" / "train.py"), str(cfg_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (killed / "checkpoint-2").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    output = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL, output
    assert not (killed / "final").exists() and _checkpoints(killed)
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "[train] resuming from" in resumed.stdout

    # 2. a save that fails half-way (after the weights, before the optimizer): no checkpoint-4 appears
    crashed = tmp_path / "crashed"

    def failing_save(self, output_dir):
        if self.state.global_step == 4:
            raise KeyboardInterrupt("killed during the save")
        return original_save(self, output_dir)

    original_save = train.TalkerTrainer._save_optimizer_and_scheduler
    monkeypatch.setattr(train.TalkerTrainer, "_save_optimizer_and_scheduler", failing_save)
    with pytest.raises(KeyboardInterrupt):
        train.run(tiny_config(crashed, **common), log=lambda m: None)
    assert _checkpoints(crashed) == ["checkpoint-2"] and (crashed / train.STAGING / "checkpoint-4").is_dir()
    assert train.latest_checkpoint(str(crashed)) == str(crashed / "checkpoint-2")
    monkeypatch.setattr(train.TalkerTrainer, "_save_optimizer_and_scheduler", original_save)
    log = []
    again = train.run(tiny_config(crashed, **common), log=log.append)
    assert again["resumed_from"] == str(crashed / "checkpoint-2") and not (crashed / train.STAGING).exists()

    want = _weights(reference["final"])
    for folder in (killed / "final", Path(again["final"])):
        got = _weights(folder)
        assert sorted(got) == sorted(want)
        different = [k for k in want if not torch.equal(got[k], want[k])]
        assert not different, f"{folder}: {len(different)} tensors differ, e.g. {different[:3]}"
    assert _checkpoints(killed) == ["checkpoint-4", "checkpoint-6"]  # save_total_limit 2


def test_torchrun_two_ranks_end_with_identical_weights(data, tmp_path):
    cfg_path = tmp_path / "ddp.json"
    cfg_path.write_text(json.dumps(tiny_config(tmp_path / "run", data_path=data["jsonl"], max_steps=3,
                                               per_device_train_batch_size=1, weights_digest=True)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # `python -m torch.distributed.run` is torchrun: no console script needed on PATH (a plain venv's python)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO_ROOT / "training" / "train.py"), str(cfg_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    digests = dict(re.findall(r"\[train\] rank (\d) weights digest ([0-9a-f]+)", output))
    assert sorted(digests) == ["0", "1"] and digests["0"] == digests["1"], output[-2000:]
    assert "2 process(es)" in output and (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_configs_parse_and_keep_the_reference_values():
    ref = train.parse_config(train.load_config(str(REPO_ROOT / "training" / "config.json"), ["bf16=false"]))
    model_args, data_args, talker, args = ref
    assert (args.learning_rate, args.weight_decay, args.adam_beta2, args.warmup_steps) == (1e-4, 0.01, 0.95, 0.1)
    assert str(args.lr_scheduler_type.value) == "cosine_with_min_lr" and args.lr_scheduler_kwargs == {"min_lr_rate": 0.01}
    assert (args.per_device_train_batch_size, args.save_steps, args.save_total_limit) == (8, 5000, 100)
    assert args.optim.value == "adamw_torch_fused" and args.ddp_find_unused_parameters is False
    assert args.activation_checkpointing and args.report_to == ["wandb"]
    assert (model_args.llm_model_name_or_path, model_args.delay, model_args.motion_cfm_weight,
            model_args.speech_embedding_dim, model_args.model_max_length) == ("Qwen/Qwen3-0.6B", 0, 10, 32, 1000)
    assert model_args.tts_checkpoint_path == "./ckpts/tts_pretrained/checkpoint-45000"
    tiny = train.parse_config(train.load_config(str(TINY_CONFIG)))
    assert tiny[2].model_preset == "tiny" and tiny[3].bf16 is False
    with pytest.raises(modeling.ConfigError, match="no_such_field"):
        train.parse_config(train.load_config(str(TINY_CONFIG), ["no_such_field=1"]))
    assert train.main([]) == 2 and train.main(["--help"]) == 0
