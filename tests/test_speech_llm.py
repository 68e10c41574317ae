"""SpeechLLM: released-size key manifest, strict loading/saving, generation modes, prompt spans."""
import json

import pytest
import torch
from conftest import FIXTURES, load_fixture, max_rel_err, shared, synth
from safetensors.torch import load_file, save_file

from runtime.generation import Sampling, generate, plan_lengths
from runtime.prompt import build_chat_and_spans, build_prompt
from speech_llm import SpeechLLM, qwen3_0_6b_config, released_model_args, tiny_model_args_and_config

PS = 4


# ---------------------------------------------------------------- full size on the meta device
def test_released_size_matches_manifest():
    path = shared(FIXTURES / "llm" / "speech_llm_manifest.json")
    manifest = json.loads(path.read_text())
    with torch.device("meta"):
        model = SpeechLLM(released_model_args(), qwen3_0_6b_config())
    state = model.state_dict(keep_vars=True)
    params = dict(model.named_parameters(remove_duplicate=False))
    assert list(state) == list(manifest["keys"])  # same names, same order
    for key, info in manifest["keys"].items():
        assert list(state[key].shape) == info["shape"], key
        assert (info["kind"] == "param") == (key in params), key
    assert model.llm.lm_head.weight is model.llm.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == manifest["n_params_unique"]
    assert sorted(n for n, _ in model.named_buffers() if n not in state) == manifest["non_persistent_buffers"]


def test_tiny_model_matches_fixture_model():
    _, meta = load_fixture("llm", "ar_loop")
    args, config = tiny_model_args_and_config()
    for name, value in meta["model"]["qwen3_config"].items():
        if name == "attn_implementation":
            continue
        got = config.rope_parameters["rope_theta"] if name == "rope_theta" else getattr(config, name)
        assert got == value, name
    for name, value in meta["model"]["model_args"].items():
        assert getattr(args, name) == value, name
    dit = meta["model"]["dit_decoder_config"]
    assert (args.dit_n_layer, args.dit_n_head) == (dit["n_layer"], dit["n_head"])


# ---------------------------------------------------------------- loading / saving
def tiny_model(delay=0):
    args, config = tiny_model_args_and_config()
    args.delay = delay
    model = SpeechLLM(args, config)
    model.load_state_dict(synth().synth_state_dict(model), strict=False)
    return model.eval()


def test_save_load_round_trip(tmp_path):
    model = tiny_model()
    model.spk = torch.nn.Linear(3, 3)  # attached encoders are never saved
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert "llm.lm_head.weight" not in saved and not any(k.startswith("spk.") for k in saved)
    assert len(saved) == len(model.state_dict()) - 1 - 2  # tied head, spk weight + bias
    loaded = SpeechLLM.from_pretrained(tmp_path)
    assert loaded.spk is None and loaded.pretrained_speech_encoder is None
    ref = {k: v for k, v in model.state_dict().items() if not k.startswith("spk.")}
    got = loaded.state_dict()
    assert list(got) == list(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert loaded.llm.lm_head.weight is loaded.llm.model.embed_tokens.weight
    assert loaded.config.hidden_size == 64 and loaded.model_args.dit_n_layer == 2
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(loaded.backbone(loaded.llm.get_input_embeddings()(ids)),
                           model.backbone(model.llm.get_input_embeddings()(ids)))


def test_loading_is_strict(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))

    extra = dict(weights, **{"head_stop.extra.weight": torch.zeros(2)})
    save_file(extra, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"holds 139 of the 139 SpeechLLM keys: 1 unexpected \(e\.g\. head_stop\.extra\.weight\)"):
        SpeechLLM.from_pretrained(tmp_path)

    missing = {k: v for k, v in weights.items() if k != "task_embedding.weight"}
    save_file(missing, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"1 missing \(e\.g\. task_embedding\.weight\)"):
        SpeechLLM.from_pretrained(tmp_path)

    wrong = dict(weights, **{"motion_pad_emb": torch.zeros(1, 1, 65)})
    save_file(wrong, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"1 of the wrong shape \(e\.g\. motion_pad_emb \(1, 1, 65\) != \(1, 1, 64\)\)"):
        SpeechLLM.from_pretrained(tmp_path)

    # encoder keys and the tied head in the file are tolerated
    tolerated = dict(weights, **{"spk.w": torch.zeros(1), "pretrained_speech_encoder.x": torch.zeros(1),
                                 "llm.lm_head.weight": weights["llm.model.embed_tokens.weight"].clone()})
    save_file(tolerated, str(tmp_path / "model.safetensors"))
    SpeechLLM.from_pretrained(tmp_path)

    # another model's file: one short line saying what it looks like
    import lia_x
    save_file({k: v.contiguous() for k, v in lia_x.tiny_generator().state_dict().items()},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as info:
        SpeechLLM.from_pretrained(tmp_path)
    message = str(info.value)
    assert "holds 0 of the 139 SpeechLLM keys" in message and "looks like a LIA-X generator checkpoint" in message
    assert len(message) < 500 and "\n" not in message

    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors"):
        SpeechLLM.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        SpeechLLM.from_pretrained(tmp_path / "nowhere")


def test_release_folder_without_args_file_uses_released_arguments(tmp_path):
    from speech_llm import _read_configs
    args, config = _read_configs(str(tmp_path))
    assert args == released_model_args() and config.num_hidden_layers == 28
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "architectures": ["SpeechLLM"],
                                                      "hidden_size": 64, "num_hidden_layers": 3}))
    args, config = _read_configs(str(tmp_path))
    assert config.hidden_size == 64 and config.num_hidden_layers == 3


# ---------------------------------------------------------------- generation modes
@pytest.fixture(scope="module")
def ar():
    return load_fixture("llm", "ar_loop")


def ar_model(tensors, delay=0, stop_bias_factor=None):
    args, config = tiny_model_args_and_config()
    args.delay = delay
    model = SpeechLLM(args, config).eval()
    model.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("weights.")}, strict=True)
    if stop_bias_factor is not None:
        with torch.no_grad():
            model.head_stop.proj.bias.mul_(stop_bias_factor)
    return model


def replay_noise(model, speech_noise=None, motion_noise=None):
    """Make the CFM heads use recorded noise draws in order (instead of the RNG)."""
    queues = {id(model.speech_cfm): list(speech_noise) if speech_noise is not None else None,
              id(model.motion_cfm): list(motion_noise) if motion_noise is not None else None}
    original = model.sample_patches

    def sample_patches(cfm, h, cond, gc, steps, temperature, cfg, noise=None):
        queue = queues[id(cfm)]
        assert queue is not None, "this head must not be sampled"
        # the loop hands over its draw already scaled by the row's temperature (the default one here)
        return original(cfm, h, cond, gc, steps, temperature, cfg, noise=queue.pop(0)[None] * Sampling().cfm_temperature)
    model.sample_patches = sample_patches


def generate_case(model, tensors, case, c, **kw):
    return generate(model, tensors[f"{case}.inputs.input_ids"][None], c["s0"], tensors["inputs.speech_latent"],
                          tensors["inputs.speaker_emb"], tensors["inputs.motion_norm"],
                          gt_prefix_seconds=c["gt_prefix_seconds"], **kw)


def test_a2v_given_speech_reproduces_reference_motion(ar):
    """Speech half teacher-forced with the reference run's speech: only the motion head samples,
    and with the reference's motion noise it reproduces the reference's motion."""
    tensors, meta = ar
    case, c = "case_c", meta["cases"]["case_c"]  # delay 2
    model = ar_model(tensors, delay=2)
    replay_noise(model, motion_noise=tensors[f"{case}.trace.motion_noise"])
    steps = []
    out = generate_case(model, tensors, case, c, given_speech_latents=tensors[f"{case}.outputs.speech_latents"],
                        progress=steps.append)
    assert out.stopped_by == "given_length" and out.n_patches == 10 and steps == list(range(1, 11))
    assert torch.equal(out.speech_latents, tensors[f"{case}.outputs.speech_latents"])
    motion = tensors[f"{case}.outputs.motion_latents_norm"]
    assert out.motion_norm.shape == motion.shape
    assert max_rel_err(out.motion_norm[:PS], motion[:PS]) < 1e-4
    assert (out.motion_norm - motion).abs().max() < 5e-3  # measured 3e-5 (feedback through motion only)


def test_v2a_given_motion_reproduces_reference_speech(ar):
    tensors, meta = ar
    case, c = "case_a", meta["cases"]["case_a"]
    model = ar_model(tensors)
    replay_noise(model, speech_noise=tensors[f"{case}.trace.speech_noise"])
    out = generate_case(model, tensors, case, c, given_motion_norm=tensors[f"{case}.outputs.motion_latents_norm"])
    assert out.stopped_by == "given_length" and out.n_patches == 10
    assert torch.equal(out.motion_norm, tensors[f"{case}.outputs.motion_latents_norm"])
    speech = tensors[f"{case}.outputs.speech_latents"]
    assert max_rel_err(out.speech_latents[:PS], speech[:PS]) < 1e-4
    assert (out.speech_latents - speech).abs().max() < 5e-3  # measured 9e-4 (chaotic speech feedback)


def test_replayed_noise_free_run_matches_seeded_run(ar):
    tensors, meta = ar
    case, c = "case_a", meta["cases"]["case_a"]
    model = ar_model(tensors)
    torch.manual_seed(c["seed"])
    seeded = generate_case(model, tensors, case, c)
    replay_noise(model, tensors[f"{case}.trace.speech_noise"], tensors[f"{case}.trace.motion_noise"])
    replayed = generate_case(model, tensors, case, c)
    assert torch.equal(seeded.speech_latents, replayed.speech_latents)
    assert torch.equal(seeded.motion_norm, replayed.motion_norm)


@torch.no_grad()
def test_tts_layout_and_stopping(ar):
    """TTS follows speech_llm.generate_speech: [task tag 0, text, speech prefix tokens + motion_pad_emb]."""
    tensors, meta = ar
    c = meta["cases"]["case_a"]
    ids, latents = tensors["case_a.inputs.input_ids"][None], tensors["inputs.speech_latent"]
    model = ar_model(tensors)
    with torch.no_grad():
        model.motion_pad_emb.normal_()
    plan = plan_lengths("tts", ref_speech_frames=latents.shape[0], gt_prefix_seconds=0.5)
    prompt = build_prompt(model, ids, c["s0"], latents, tensors["inputs.speaker_emb"], plan)
    prefill = prompt.prefill_embeds
    n_prefix = 3  # round(12.5) = 12 frames -> 3 patches
    assert (plan.prefix_frames, plan.prefix_patches) == (12, n_prefix)
    assert prefill.shape[1] == 1 + c["s0"] + n_prefix
    assert torch.equal(prefill[0, 0], model.task_embedding.weight[0])
    assert torch.equal(prefill[0, 1:1 + c["s0"]], model.llm.get_input_embeddings()(ids[0, :c["s0"]]))
    expected = model.speech_patch_encoder(model.projector_speech(latents[:12]).view(1, 3, PS, -1)) + model.motion_pad_emb
    assert max_rel_err(prefill[0, 1 + c["s0"]:], expected[0]) < 1e-6
    # a patch fed back during TTS is the token the same patch gets as a prompt prefix (or in training)
    token = model.patch_token(latents[:PS], motion_pad=True)
    assert max_rel_err(token[0], model.patch_tokens(model.projector_speech(latents[:PS]), 1)[0]) < 1e-6

    out = generate(model, ids, c["s0"], latents, tensors["inputs.speaker_emb"], None)  # None motion -> TTS
    assert out.motion_norm.shape == (0, 40) and out.prefix_motion_norm.shape == (0, 40)
    assert out.prefix_speech_latents.shape == (12, 32) and out.speech_latents.shape == (out.n_patches * PS, 32)

    always = ar_model(tensors, stop_bias_factor=1000.0)  # stop logits > 0 from the start
    out = generate(always, ids, c["s0"], latents, tensors["inputs.speaker_emb"], task="tts")
    assert out.stopped_by == "stop_head" and out.n_patches == 9  # 7 free patches + 3 checks in a row
    never = ar_model(tensors, stop_bias_factor=-1000.0)
    out = generate(never, ids, c["s0"], latents, tensors["inputs.speaker_emb"], task="tts")
    assert out.stopped_by == "length_cap" and out.n_patches == 7 - 3 + 15  # released: ceil(26/4) - prefix + 15
    short = plan_lengths("tts", ref_speech_frames=26, gt_prefix_seconds=0.5, margin_patches=2)
    out = generate(never, ids, c["s0"], latents, tensors["inputs.speaker_emb"], task="tts", plan=short)
    assert out.stopped_by == "length_cap" and out.n_patches == 7 - 3 + 2


def test_generate_rejects_bad_input(ar):
    tensors, meta = ar
    c = meta["cases"]["case_a"]
    model = ar_model(tensors)
    with pytest.raises(ValueError, match="ref_speech_latents"):
        generate_case(model, dict(tensors, **{"inputs.speech_latent": torch.zeros(5, 31)}), "case_a", c)
    with pytest.raises(ValueError, match="ref_motion_norm"):
        generate_case(model, dict(tensors, **{"inputs.motion_norm": torch.zeros(0, 40)}), "case_a", c)
    with pytest.raises(ValueError, match="at most one"):
        generate_case(model, tensors, "case_a", c, given_speech_latents=torch.zeros(8, 32),
                      given_motion_norm=torch.zeros(8, 40))
    with pytest.raises(ValueError, match="task"):
        generate_case(model, tensors, "case_a", c, task="a2v")


# ---------------------------------------------------------------- prompt layout
class FakeTokenizer:
    """Chat template: text ids + one id per placeholder + a 2-token tail, like the fixture's."""

    def apply_chat_template(self, chat, tokenize=True, add_generation_prompt=False, enable_thinking=False, **kw):
        n = chat[1]["content"].count("<SPEECH_FRAME>")
        ids = [7, 8, 9] + [500] * n + [10, 11]
        return ids[:kw.get("max_length", len(ids))]

    def convert_tokens_to_ids(self, token):
        return 500


def test_build_chat_and_spans():
    ids, mask, span = build_chat_and_spans(FakeTokenizer(), 1000, speech_len_frames=26, motion_len_frames=24)
    assert ids.shape == (1, 3 + 7 + 2) and mask.dtype == torch.bool and mask.all()
    assert span.tolist() == [3, 10]
    _, _, span = build_chat_and_spans(FakeTokenizer(), 1000, 26, 24, delay=5)  # infer.py's DELAY
    assert span.tolist() == [3, 3 + 11]
    with pytest.raises(ValueError):
        build_chat_and_spans(FakeTokenizer(), 3, 26, 24)
