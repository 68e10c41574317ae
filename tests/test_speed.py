"""What the speed work must not change: bf16 on CPU stays within stated bounds of float32 (teacher-forced on
the reference fixtures), reference encodings are computed once per content, and a run loads only what it needs.
Timings are bench.py's, not asserted here."""
import pytest
import torch
from conftest import load_fixture, max_rel_err
from transformers.cache_utils import DynamicCache

from runtime.generation import plan_lengths
from runtime.prompt import build_prompt
from speech_llm import SpeechLLM, tiny_model_args_and_config

PS = 4
# Stated bounds of bf16 (backbone + heads under CPU autocast over bf16 weights) against the float32 reference,
# max |err| / max |ref| of one teacher-forced step; measured values are in the README ("Speed and memory").
BF16_BOUNDS = {"h_first": 0.05, "mu": 0.05, "speech_patch": 0.15, "motion_patch": 0.15, "next_token": 0.05}
BF16_CFM_BOUND = 0.1


def _ar_model(tensors, c, dtype):
    args, config = tiny_model_args_and_config()
    args.delay = c["delay"]
    model = SpeechLLM(args, config).eval()
    model.load_state_dict({k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")},
                          strict=True)
    return model.to(dtype)


@torch.no_grad()
def teacher_forced_errors(dtype, case="case_a"):
    """Per-step errors of the loop's parts in `dtype` against the reference's float32 trace (ar_loop fixture)."""
    tensors, meta = load_fixture("llm", "ar_loop")
    c = meta["cases"][case]
    model = _ar_model(tensors, c, dtype)
    D, n = c["delay"], c["patches_generated"]
    tr = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"{case}.trace.")}
    speech, motion = tensors[f"{case}.outputs.speech_latents"], tensors[f"{case}.outputs.motion_latents_norm"]
    plan = plan_lengths("t2av", ref_speech_frames=c["speech_latent_frames"],
                        ref_motion_frames=tensors["inputs.motion_norm"].shape[0],
                        gt_prefix_seconds=c["gt_prefix_seconds"], delay=D)
    prompt = build_prompt(model, tensors[f"{case}.inputs.input_ids"][None], c["s0"], tensors["inputs.speech_latent"],
                          tensors["inputs.speaker_emb"], plan, tensors["inputs.motion_norm"])
    cache = DynamicCache(config=model.llm.config)
    h_first = model.backbone(tensors[f"{case}.outputs.prefill_inputs_embeds"][None], cache)[:, -1]
    mus = [model.backbone(tr["next_token_embeds"][k].view(1, 1, -1), cache)[:, -1] for k in range(n - 1)]
    speech_hist, motion_hist = list(prompt.speech_history), list(prompt.motion_history)
    patches, mpatches, tokens = [], [], []
    for k in range(n):
        cond = model.cfm_context(speech_hist, 32)
        patches.append(model.sample_patch(model.speech_cfm, tr["mu"][k:k + 1], cond, tensors["inputs.speaker_emb"],
                                          noise=tr["speech_noise"][k:k + 1]))
        speech_hist.append(speech[k * PS:(k + 1) * PS])
        motion_frames = None
        if k >= D:
            j = k - D
            mcond = model.cfm_context(motion_hist, 40)
            mpatches.append(model.sample_patch(model.motion_cfm, tr["mu"][k:k + 1], mcond, tr["first_motion"],
                                               noise=tr["motion_noise"][j:j + 1]))
            motion_frames = motion[j * PS:(j + 1) * PS]
            motion_hist.append(motion_frames)
        tokens.append(model.patch_token(speech[k * PS:(k + 1) * PS], motion_frames)[0, 0])
    return {"h_first": max_rel_err(h_first.float(), tensors[f"{case}.outputs.h_first"]),
            "mu": max_rel_err(torch.cat(mus).float(), tr["mu"][1:n]),
            "speech_patch": max_rel_err(torch.cat(patches), speech),
            "motion_patch": max_rel_err(torch.cat(mpatches), motion),
            "next_token": max_rel_err(torch.stack(tokens).float(), tr["next_token_embeds"])}


def test_bf16_loop_parts_stay_within_bounds_of_float32(one_thread):
    """bf16 on CPU runs the released loop's parts (patch outputs are float32) within the stated bounds; float32
    through the same code is the parity path (1e-5)."""
    errs32, errs16 = teacher_forced_errors(torch.float32), teacher_forced_errors(torch.bfloat16)
    print("bf16 teacher-forced max_rel_err: " + ", ".join(f"{k}={v:.2e}" for k, v in errs16.items()))
    assert max(errs32.values()) < 1e-5
    for name, bound in BF16_BOUNDS.items():
        assert errs16[name] < bound, (name, errs16[name])
    assert errs16["speech_patch"] > 1e-4  # it really ran in bf16


@torch.no_grad()
def test_bf16_cfm_sampler_within_bound(one_thread):
    from test_unified_cfm import _build
    tensors, meta = load_fixture("llm", "cfm_sample")
    cfm = _build(tensors, meta).to(torch.bfloat16)
    c = meta["cases"]["case0"]
    mu, cond, gc = tensors["inputs.mu"], tensors["inputs.cond"], tensors["inputs.global_cond"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = cfm.solve_euler(tensors["case0.aux.noise"] * c["temperature"], tensors["case0.aux.t_span"], mu,
                            cond, gc, c["cfg_value"], c["use_cfg_zero_star"])
    assert x.dtype == torch.float32  # the Euler state stays float32
    err = max_rel_err(x, tensors["case0.outputs.x"])
    print(f"bf16 cfm_sample case0 max_rel_err={err:.2e}")
    assert 1e-4 < err < BF16_CFM_BOUND


class _Counted:
    """Wraps a module's forward (or a method) and counts the calls."""

    def __init__(self, obj, name):
        self.calls, self.fn = 0, getattr(obj, name)
        setattr(obj, name, self)

    def __call__(self, *a, **k):
        self.calls += 1
        return self.fn(*a, **k)


def test_one_voice_is_encoded_once_per_run(one_thread):
    """Two requests with the same reference voice (and a2v's driving audio = that voice) run the WhisperX-VAE
    encoder (its 30 s Whisper pass) and the speaker encoder once; the results equal a fresh pipeline's."""
    from runtime.pipeline import TalkerPipeline
    pipe = TalkerPipeline.demo()
    vae, spk = _Counted(pipe.vae, "encode"), _Counted(pipe.speaker_encoder, "forward")
    from lia_x import render as liax_render
    enc = _Counted(liax_render, "extract_motion")
    try:
        kw = dict(progress=False, cfm_steps=2, max_seconds=0.32)
        first = pipe.generate(mode="t2av", text="One voice.", seed=1, **kw)
        second = pipe.generate(mode="t2av", text="The same voice again.", seed=2, **kw)
        pipe.generate(mode="tts", text="And a third time.", seed=3, **kw)
    finally:
        liax_render.extract_motion = enc.fn
    assert (vae.calls, spk.calls, enc.calls) == (1, 1, 1)
    fresh = TalkerPipeline.demo().generate(mode="t2av", text="The same voice again.", seed=2, **kw)
    assert torch.equal(second.audio_24k, fresh.audio_24k) and torch.equal(second.motion_raw, fresh.motion_raw)
    assert not torch.equal(first.speech_latents[-4:], second.speech_latents[-4:])


def test_encoding_cache_is_bounded_lru():
    """A long-lived pipeline (the web page) keeps the last `size` distinct encodings, not every one it saw."""
    from runtime.pipeline import EncodingCache
    cache = EncodingCache(size=3)
    for k in range(5):
        cache.put(("audio", k), k)
    assert len(cache) == 3 and cache.get(("audio", 0)) is None and cache.get(("audio", 1)) is None
    assert cache.get(("audio", 2)) == 2  # now the most recently used: survives the next insertion
    cache.put(("motion", 9), 9)
    assert cache.get(("audio", 3)) is None and [cache.get(("audio", k)) for k in (2, 4)] == [2, 4]
    cache.clear()
    assert len(cache) == 0


def test_tts_never_loads_the_renderer(one_thread, tmp_path):
    """A tts run (even one writing a wav) never touches LIA-X: the pipeline has none and no checkpoint."""
    from runtime.pipeline import TalkerPipeline
    pipe = TalkerPipeline.demo()
    pipe._generator, pipe.liax_ckpt = None, None  # any use would raise MissingWeightsError
    result = pipe.generate(mode="tts", text="No face needed.", seed=0, cfm_steps=2, max_seconds=0.32,
                           output=str(tmp_path / "a.wav"), progress=False)
    assert result.wav_path and (tmp_path / "a.wav").is_file() and pipe._generator is None


def _tiny_rows(model, specs):
    """Loop rows (each with its own seeded generator): (text length, ref speech frames, ref motion frames,
    seed, max_seconds, teacher forcing: None | "speech" | "motion") per request, random ids and references."""
    from runtime.generation import LoopRow, Sampling
    g = torch.Generator().manual_seed(5)
    rows = []
    for n_text, n_speech, n_motion, seed, max_seconds, forced in specs:
        task = "t2av" if n_motion else "tts"
        ids = torch.randint(0, 500, (1, n_text + 40), generator=g)
        speech = torch.randn(n_speech, 32, generator=g)
        motion = torch.randn(n_motion, 40, generator=g) if n_motion else None
        speaker = torch.randn(1, 256, generator=g)
        given_speech = torch.randn(22, 32, generator=g) if forced == "speech" else None
        given_motion = torch.randn(17, 40, generator=g) if forced == "motion" else None
        plan = plan_lengths(task, ref_speech_frames=n_speech, ref_motion_frames=n_motion, delay=model.delay,
                            max_seconds=max_seconds, given_speech_frames=None if given_speech is None else 22,
                            given_motion_frames=None if given_motion is None else 17)
        prompt = build_prompt(model, ids, n_text, speech, speaker, plan, motion)
        rows.append(LoopRow(prompt, plan, Sampling(cfm_steps=4, cfm_temperature=0.2 + 0.1 * seed, stop_min_patches=3),
                            given_speech, given_motion, torch.Generator().manual_seed(seed)))
    return rows


@pytest.mark.parametrize("packed", ["off", "on"])  # on: the batched heads on packed oneDNN linears, lone runs off
@pytest.mark.parametrize("backend", ["eager", "static"])  # static: the CUDA graphs' shapes (ended rows stay)
@pytest.mark.parametrize("task", ["t2av", "tts"])
def test_batched_requests_equal_lone_runs(one_thread, task, backend, packed):
    """Different prompt lengths, prefixes, seeds, temperatures and length caps in one loop (t2av: with a2v and
    v2a rows): every request gets the patches, stop decision and length of its lone run, and rows end as
    they stop, through either step runner."""
    from common import packed_linear
    from runtime.generation import PatchStream, collect, run_rows
    if packed == "on" and not packed_linear.available():
        pytest.skip("oneDNN is not in this torch build")
    torch.manual_seed(0)
    model = SpeechLLM(*tiny_model_args_and_config()).eval()
    m = 1 if task == "t2av" else 0
    specs = [(9, 30, 40 * m, 1, None, None), (23, 50, 28 * m, 2, 0.64, None), (4, 18, 60 * m, 3, None, None),
             (15, 40, 12 * m, 4, 1.0, None)]
    if task == "t2av":
        specs += [(11, 26, 32, 5, None, "speech"), (7, 33, 20, 6, None, "motion")]
    rows = _tiny_rows(model, specs)
    model.packed_linear, model.loop_backend = packed, backend
    batched = run_rows(model, rows)
    assert any(type(x) is packed_linear.PackedLinear for x in model.modules()) == (packed == "on")
    model.packed_linear, model.loop_backend = "off", "eager"
    for row, spec, got in zip(rows, specs, batched):
        torch.manual_seed(spec[3])
        want = collect(PatchStream(model, row.prompt, row.plan, row.sampling, row.given_speech_latents,
                                   row.given_motion_norm))
        assert (got.n_patches, got.stopped_by) == (want.n_patches, want.stopped_by)
        assert got.speech_latents.shape == want.speech_latents.shape
        assert got.motion_norm.shape == want.motion_norm.shape
        torch.testing.assert_close(got.speech_latents, want.speech_latents, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.motion_norm, want.motion_norm, rtol=1e-4, atol=1e-5)
        assert [p is None for p in got.stop_probs] == [p is None for p in want.stop_probs]
    assert len({o.n_patches for o in batched}) > 1  # rows left the batch at different steps
    assert {"length_cap", "stop_head"} <= {o.stopped_by for o in batched}


def test_generate_batch_equals_generate(one_thread, tmp_path):
    """A batch of requests (t2av and tts, an a2v and a v2a as teacher-forced rows, a long-form one that runs
    alone) gives each request the result of its own generate() call, and writes its files."""
    from runtime.pipeline import TalkerPipeline
    from runtime.request import GenerationRequest
    pipe = TalkerPipeline.demo()
    kw = dict(cfm_steps=2)
    reqs = [GenerationRequest(mode="t2av", text="First of the batch.", seed=1, max_seconds=0.64, **kw),
            GenerationRequest(mode="t2av", text="Second one, longer text here.", seed=2, max_seconds=0.32, **kw),
            GenerationRequest(mode="tts", text="A tts line.", seed=3, max_seconds=0.48,
                              output=str(tmp_path / "t.wav"), **kw),
            GenerationRequest(mode="t2av", text="Third.", seed=4, **kw),
            GenerationRequest(mode="a2v", seed=5, **kw),
            GenerationRequest(mode="v2a", text="Speech for the face.", seed=6, **kw),
            GenerationRequest(mode="tts", text="Two windows. Of text.", seed=7, long_form=True, **kw)]
    batched = pipe.generate_batch(reqs, batch_size=2)
    assert (tmp_path / "t.wav").is_file()
    for req, got in zip(reqs, batched):
        req.output = None
        want = pipe.generate(req, progress=False)
        assert (got.mode, got.n_patches, got.stopped_by, got.prefix_frames) == (
            want.mode, want.n_patches, want.stopped_by, want.prefix_frames)
        torch.testing.assert_close(got.audio_24k, want.audio_24k, rtol=1e-4, atol=1e-5)
        if want.motion_raw is not None:
            torch.testing.assert_close(got.motion_raw, want.motion_raw, rtol=1e-4, atol=1e-5)
