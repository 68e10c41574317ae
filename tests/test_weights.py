"""Locating, downloading (huggingface_hub monkeypatched: no network) and loading release-format weights."""
import os

import pytest
import torch

from runtime import weights
from runtime.pipeline import TalkerPipeline


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- locate

def test_locate_from_env_and_repository_layout(release_dir, no_env, monkeypatch):
    monkeypatch.setenv("CHECKPOINT_DIR", str(release_dir / "talker-t2av"))
    monkeypatch.setenv("LIAX_CKPT", str(release_dir / "lia-x.pt"))
    paths = weights.locate()
    assert paths.checkpoint_dir == str(release_dir / "talker-t2av")
    assert paths.whisperx_vae == str(release_dir / "whisperx-vae" / "model.ckpt")  # found beside it
    assert paths.sources == {"checkpoint_dir": "env", "liax": "env", "whisperx_vae": "layout"}
    assert paths.missing() == ["wavlm"]
    # an explicit argument wins over the environment
    assert weights.locate(wavlm=release_dir / "wavlm_large_finetune.pth").missing() == []


def test_locate_rejects_given_paths_that_do_not_exist(tmp_path, no_env, monkeypatch):
    from runtime.request import RequestError
    with pytest.raises(RequestError, match="^checkpoint_dir: .*no model.safetensors"):
        weights.locate(checkpoint_dir=tmp_path)
    monkeypatch.setenv("WAVLM_CKPT", str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match=r"missing\.pth.*WAVLM_CKPT"):
        weights.locate()


def test_missing_weights_message_lists_the_ways_forward(no_env):
    paths = weights.locate()
    assert paths.missing() == list(weights.COMPONENTS)
    with pytest.raises(weights.MissingWeightsError) as info:
        paths.require()
    msg = str(info.value)  # a library caller's words: arguments, not flags
    for needle in ("checkpoint_dir=", "CHECKPOINT_DIR", "WHISPERVAE_CKPT", "LIAX_CKPT", "WAVLM_CKPT",
                   "download=True", "TalkerPipeline.demo()"):
        assert needle in msg
    assert "--" not in msg and "\n" not in msg
    cli = weights.missing_message(info.value.components, cli=True)  # what infer.py prints
    for needle in ("--checkpoint-dir", "CHECKPOINT_DIR", "--download", "--demo"):
        assert needle in cli
    assert weights.needed_for("tts") == ("checkpoint_dir", "whisperx_vae", "wavlm")  # no renderer for tts


def test_cached_wavlm_with_the_wrong_size_is_refused(tmp_path, no_env, monkeypatch):
    bad = tmp_path / "wavlm_large_finetune.pth"
    bad.write_bytes(b"x" * 10)
    monkeypatch.setattr(weights, "hub_cached", lambda repo_id, filename: str(bad) if "wavlm" in filename else None)
    with pytest.raises(ValueError, match="1,301,926,579"):
        weights.locate()


# ---------------------------------------------------------------------------------------------- download

class FakeHub:
    def __init__(self, root, wavlm_size=weights.WAVLM_SIZE, fail=None):
        self.root, self.calls, self.wavlm_size, self.fail = root, [], wavlm_size, fail

    def __call__(self, repo_id, filename, **kwargs):
        self.calls.append((repo_id, filename))
        if self.fail:
            raise self.fail
        path = self.root / repo_id.replace("/", "--") / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            if filename.endswith(".pth"):
                f.truncate(self.wavlm_size)  # sparse: the size is what is checked
            else:
                f.write(b"weights")
        return str(path)


def test_download_fetches_every_file_from_the_documented_sources(tmp_path, monkeypatch):
    import huggingface_hub

    hub = FakeHub(tmp_path)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    paths = weights.download()
    assert set(hub.calls) == {
        *[("HKUSTAudio/Talker-T2AV", f"talker-t2av/{f}") for f in
          ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")],
        ("HKUSTAudio/Talker-T2AV", "whisperx-vae/model.ckpt"), ("YaohuiW/LIA-X", "lia-x.pt"),
        ("bezzam/wavlm_large_finetune_seed_tts_eval", "wavlm_large_finetune.pth")}
    assert os.path.basename(paths.checkpoint_dir) == "talker-t2av"
    assert os.path.getsize(paths.wavlm) == weights.WAVLM_SIZE
    assert set(paths.sources.values()) == {"download"}


def test_download_only_what_is_missing_and_custom_wavlm_source(tmp_path, monkeypatch):
    import huggingface_hub

    hub = FakeHub(tmp_path, wavlm_size=1234)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    paths = weights.download(needs=("wavlm", "liax"), paths=weights.WeightPaths(liax="/already/here.pt"),
                             wavlm_repo="someone/mirror", wavlm_filename="spk.pth")
    assert hub.calls == [("someone/mirror", "spk.pth")]  # other source: no size check unless given
    assert paths.liax == "/already/here.pt"
    with pytest.raises(ValueError, match="1,234 bytes, expected 99"):
        weights.download(needs=("wavlm",), wavlm_repo="someone/mirror", wavlm_filename="spk.pth", wavlm_size=99)


def test_download_size_mismatch_and_hub_errors(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", FakeHub(tmp_path, wavlm_size=1000))
    with pytest.raises(ValueError, match="expected 1,301,926,579"):
        weights.download(needs=("wavlm",))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", FakeHub(tmp_path, fail=RuntimeError("offline\nmore")))
    with pytest.raises(OSError, match="download from the Hugging Face hub failed: RuntimeError: offline$"):
        weights.download(needs=("liax",))


# ---------------------------------------------------------------------------------------------- loading

def test_from_pretrained_matches_the_models_it_was_saved_from(release_dir, demo_pipe, tiny_loaders, no_env):
    pipe = TalkerPipeline.from_pretrained(  # float32: auto is bf16 on a CPU with native bf16 (precision.py)
        release_dir / "talker-t2av", liax_ckpt=release_dir / "lia-x.pt",
        wavlm_ckpt=release_dir / "wavlm_large_finetune.pth", device="cpu", dtype="float32", render_dtype="float32")
    assert pipe._generator is None  # LIA-X is read on first use only
    a = pipe.generate(mode="t2av", seed=4, progress=False)
    b = demo_pipe.generate(mode="t2av", seed=4, progress=False)
    saved, loaded = demo_pipe.llm.state_dict(), pipe.llm.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    # same weights, same seed: equal up to float32 rounding (kernels may pick other SIMD paths for the
    # loaded, mmapped tensors' alignment, so bitwise equality is not promised)
    assert a.audio_24k.shape == b.audio_24k.shape and a.n_patches == b.n_patches
    assert (a.audio_24k - b.audio_24k).abs().max() <= 1e-5 * b.audio_24k.abs().max()
    assert torch.allclose(a.motion_raw, b.motion_raw, atol=1e-6)


def _from_release(release_dir, **kwargs):
    return TalkerPipeline.from_pretrained(release_dir / "talker-t2av", liax_ckpt=release_dir / "lia-x.pt",
                                          wavlm_ckpt=release_dir / "wavlm_large_finetune.pth", device="cpu", **kwargs)


def test_low_memory_drops_each_model_when_its_stage_is_done_and_changes_nothing(release_dir, tiny_loaders, no_env,
                                                                                 tmp_path, monkeypatch):
    from lia_x import render as liax_render

    kept = _from_release(release_dir)
    lean = _from_release(release_dir, low_memory=True)
    assert lean._llm is None and lean._vae is not None  # the SpeechLLM is checked now, loaded for the loop
    loads, resident = [], {}
    real_load, real_loop, real_render = lean._load, lean.loop, liax_render.render_frames
    lean._load = lambda name: loads.append(name) or real_load(name)

    def snapshot(stage):
        resident[stage] = sorted(n for n in ("llm", "vae", "speaker_encoder", "generator")
                                 if getattr(lean, "_" + n) is not None)

    def loop(*args):
        snapshot("loop")
        return real_loop(*args)

    def render(*args, **kwargs):
        if lean._generator is args[0]:
            snapshot("render")
        return real_render(*args, **kwargs)
    lean.loop = loop
    monkeypatch.setattr(liax_render, "render_frames", render)
    a = kept.generate(mode="t2av", seed=3, progress=False, output=str(tmp_path / "kept.mp4"))
    b = lean.generate(mode="t2av", seed=3, progress=False, output=str(tmp_path / "lean.mp4"))
    # one model family resident at a time: nothing else when the loop starts (its SpeechLLM loads as it
    # does), the renderer alone when the frames are rendered
    assert resident == dict(loop=[], render=["generator"])
    # LIA-X for the reference motion, the SpeechLLM for the loop, the VAE again for the decode, LIA-X again
    assert loads == ["generator", "llm", "vae", "generator"]
    assert torch.equal(a.audio_24k, b.audio_24k) and torch.equal(a.motion_raw, b.motion_raw)
    assert kept.release("llm") == ["llm"] and kept._llm is None  # release works on any loaded pipeline
    c = kept.generate(mode="tts", seed=3, progress=False)  # ... and the next use loads it again
    assert torch.equal(c.audio_24k, lean.generate(mode="tts", seed=3, progress=False).audio_24k)


def test_demo_models_are_never_released():
    pipe = TalkerPipeline.demo()
    assert pipe.release("llm", "vae", "speaker_encoder", "generator") == [] and pipe.llm is not None


def test_float32_weights_stay_views_of_the_mapped_file(release_dir, tiny_loaders, no_env):
    from speech_llm import SpeechLLM

    llm = SpeechLLM.from_pretrained(release_dir / "talker-t2av")
    size = os.path.getsize(release_dir / "talker-t2av" / "model.safetensors")
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in llm.parameters()}
    assert set(storages.values()) == {size}  # one storage: the file's mapping, no copies
    assert len(storages) == 1


def test_from_pretrained_tts_needs_no_liax_and_download_fills_the_gaps(release_dir, tiny_loaders, no_env,
                                                                       monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(release_dir / "wavlm_large_finetune.pth")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    pipe = TalkerPipeline.from_pretrained(release_dir / "talker-t2av", needs=weights.needed_for("tts"),
                                          download=True, wavlm_repo="mirror/x", wavlm_filename="spk.pth")
    assert calls == [("mirror/x", "spk.pth")]
    assert pipe.generate(mode="tts", progress=False).audio_24k.numel() > 0
    with pytest.raises(weights.MissingWeightsError, match="LIA-X"):
        pipe.generate(mode="t2av", progress=False)  # would need the renderer's encoder


def test_checkpoint_of_the_wrong_kind(release_dir, tiny_loaders, no_env):
    with pytest.raises(ValueError, match="lia-x.pt"):
        TalkerPipeline.from_pretrained(release_dir / "talker-t2av", whisperx_vae_ckpt=release_dir / "lia-x.pt",
                                       liax_ckpt=release_dir / "lia-x.pt",
                                       wavlm_ckpt=release_dir / "wavlm_large_finetune.pth")


def test_licences_are_stated():
    text = weights.licence_text()
    assert "lia-x.pt" in text and "CC BY-NC 4.0" in text and "wavlm_large_finetune.pth" in text


def test_tokenizer_from_llm_name_when_the_checkpoint_has_none(release_dir, demo_pipe, tmp_path, tiny_loaders, no_env):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.safetensors", "config.json", "speech_llm_args.json"):
        shutil.copy(release_dir / "talker-t2av" / name, bare / name)
    kwargs = dict(whisperx_vae_ckpt=release_dir / "whisperx-vae" / "model.ckpt",
                  wavlm_ckpt=release_dir / "wavlm_large_finetune.pth", needs=weights.needed_for("tts"))
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        TalkerPipeline.from_pretrained(bare, llm_name=str(tmp_path / "nowhere"), **kwargs)
    pipe = TalkerPipeline.from_pretrained(bare, llm_name=str(release_dir / "talker-t2av"), **kwargs)
    assert pipe.tokenizer("abc")["input_ids"] == demo_pipe.tokenizer("abc")["input_ids"]


def test_mmap_safetensors_reads_what_safetensors_reads_and_refuses_broken_files(tmp_path):
    import json
    import struct

    from safetensors.torch import load_file, save_file

    from common.safe_load import mmap_safetensors

    tensors = {"w": torch.randn(3, 5), "h": torch.randn(4).bfloat16(), "i": torch.arange(6).reshape(2, 3)}
    save_file(tensors, str(tmp_path / "a.safetensors"))
    mapped, read = mmap_safetensors(tmp_path / "a.safetensors"), load_file(str(tmp_path / "a.safetensors"))
    assert all(torch.equal(mapped[k], read[k]) and mapped[k].dtype == read[k].dtype for k in read)

    # another writer may leave a float32 tensor at an offset that is not a multiple of 4: copied, same values
    w = torch.arange(6, dtype=torch.float32)
    header = {"h": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]},
              "w": {"dtype": "F32", "shape": [6], "data_offsets": [6, 30]}}
    blob = json.dumps(header).encode()
    data = torch.ones(3, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes() + w.numpy().tobytes()
    (tmp_path / "odd.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    odd = mmap_safetensors(tmp_path / "odd.safetensors")
    assert torch.equal(odd["w"], w) and torch.equal(odd["h"], torch.ones(3, dtype=torch.bfloat16))

    (tmp_path / "short.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + data[:20])  # truncated
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    for name, needle in (("short", "is malformed"), ("junk", "bad header length")):
        with pytest.raises(ValueError, match=f"{name}.safetensors: not a .*{needle}"):
            mmap_safetensors(tmp_path / f"{name}.safetensors")
