"""Parity of runtime.generation.generate / its building blocks with the released inference loop
(infer.ar_generate_motion_continuation) on the small synthetic model of ar_loop.json.

The free-running loop is chaotic with synthetic weights, so every step is also checked on its
own, teacher-forced from the recorded trace."""
import pytest
import torch
from conftest import load_fixture, max_rel_err
from transformers.cache_utils import DynamicCache

from common import packed_linear
from runtime.generation import generate, plan_lengths
from runtime.prompt import build_prompt
from speech_llm import SpeechLLM, tiny_model_args_and_config

CASES = ["case_a", "case_b", "case_c"]
PS = 4


@pytest.fixture(scope="module")
def fixture():
    return load_fixture("llm", "ar_loop")


def build_model(tensors, case_meta):
    args, config = tiny_model_args_and_config()
    args.delay = case_meta["delay"]
    model = SpeechLLM(args, config).eval()
    model.load_state_dict({k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")},
                          strict=True)
    change = case_meta["head_stop_modification"]
    if change:  # e.g. "head_stop.proj.bias multiplied by -1000.0 for this case only ..."
        factor = float(change.split("multiplied by ")[1].split()[0])
        with torch.no_grad():
            model.head_stop.proj.bias.mul_(factor)
    return model


def run_generate(model, tensors, case, c):
    torch.manual_seed(c["seed"])
    return generate(model, tensors[f"{case}.inputs.input_ids"][None], c["s0"], tensors["inputs.speech_latent"],
                          tensors["inputs.speaker_emb"], tensors["inputs.motion_norm"],
                          gt_prefix_seconds=c["gt_prefix_seconds"], cfm_steps=c["cfm_steps"],
                          cfm_temperature=c["cfm_temperature"], cfm_cfg=c["cfm_cfg"])


@pytest.mark.parametrize("packed", ["on", "off"])  # oneDNN packed linears (the CPU default) and plain F.linear
@pytest.mark.parametrize("backend", ["eager", "static"])  # static: the CUDA-graph loop's code, uncaptured
@pytest.mark.parametrize("case", CASES)
def test_ar_loop_free_running(fixture, case, backend, packed):
    tensors, meta = fixture
    c = meta["cases"][case]
    model = build_model(tensors, c)
    if packed == "on" and not packed_linear.available():
        pytest.skip("oneDNN is not in this torch build")
    model.loop_backend, model.packed_linear = backend, packed
    out = run_generate(model, tensors, case, c)
    speech, motion = tensors[f"{case}.outputs.speech_latents"], tensors[f"{case}.outputs.motion_latents_norm"]

    assert out.n_patches == c["patches_generated"]
    assert out.motion_norm.shape[0] == c["motion_patches_generated"] * PS
    assert out.stopped_by == ("stop_head" if c["stopped_by_stop_head"] else "length_cap")
    assert out.speech_latents.shape == speech.shape and out.motion_norm.shape == motion.shape
    err_s, err_m = max_rel_err(out.speech_latents[:PS], speech[:PS]), max_rel_err(out.motion_norm[:PS], motion[:PS])
    print(f"ar_loop {case} first free-running patch max_rel_err speech={err_s:.3e} motion={err_m:.3e}")
    assert err_s < 1e-4 and err_m < 1e-4
    # later patches drift chaotically; they must stay within 10x the reference's own spread
    spread = c["observed_free_run_divergence"]
    for k, allowed in enumerate(spread["speech_patch_max_abs_diff_per_step"]):
        assert (out.speech_latents[k * PS:(k + 1) * PS] - speech[k * PS:(k + 1) * PS]).abs().max() <= 10 * allowed + 1e-5
    for j, allowed in enumerate(spread["motion_patch_max_abs_diff_per_step"]):
        assert (out.motion_norm[j * PS:(j + 1) * PS] - motion[j * PS:(j + 1) * PS]).abs().max() <= 10 * allowed + 1e-5

    # prefixes: the reference latents fed before generation
    n_pref = min((c["prefix_patches"] + c["delay"]) * PS, c["speech_latent_frames"])
    assert torch.equal(out.prefix_speech_latents, tensors["inputs.speech_latent"][:n_pref])
    assert torch.equal(out.prefix_motion_norm, tensors["inputs.motion_norm"][:c["prefix_frames"]])


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_ar_loop_teacher_forced(fixture, case):
    tensors, meta = fixture
    c = meta["cases"][case]
    model = build_model(tensors, c)
    D, n = c["delay"], c["patches_generated"]
    speaker = tensors["inputs.speaker_emb"]
    tr = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"{case}.trace.")}
    speech, motion = tensors[f"{case}.outputs.speech_latents"], tensors[f"{case}.outputs.motion_latents_norm"]
    errs = {}

    plan = plan_lengths("t2av", ref_speech_frames=c["speech_latent_frames"],
                        ref_motion_frames=tensors["inputs.motion_norm"].shape[0],
                        gt_prefix_seconds=c["gt_prefix_seconds"], delay=D)
    assert plan.max_steps == c["length_cap_steps"] and plan.prefix_frames == c["prefix_frames"]
    prompt = build_prompt(model, tensors[f"{case}.inputs.input_ids"][None], c["s0"], tensors["inputs.speech_latent"],
                          speaker, plan, tensors["inputs.motion_norm"])
    prefill = prompt.prefill_embeds
    assert prefill.shape[1] == c["prefill_len"]
    errs["prefill"] = max_rel_err(prefill[0], tensors[f"{case}.outputs.prefill_inputs_embeds"])

    # backbone: cached prefill, then the recorded next-token embeddings one by one
    cache = DynamicCache(config=model.llm.config)
    mus = [model.backbone(tensors[f"{case}.outputs.prefill_inputs_embeds"][None], cache)[:, -1]]
    errs["h_first"] = max_rel_err(mus[0], tensors[f"{case}.outputs.h_first"])
    for k in range(n):  # the state after the last patch is the one of the final stop check
        mus.append(model.backbone(tr["next_token_embeds"][k].view(1, 1, -1), cache)[:, -1])
    mus = torch.cat(mus)
    errs["mu"] = max_rel_err(mus[:n], tr["mu"])

    # CFM heads from the recorded state, context and noise; next-token embeddings from recorded patches
    speech_hist, motion_hist = list(prompt.speech_history), list(prompt.motion_history)
    assert torch.equal(prompt.first_motion_norm, tr["first_motion"])
    conds, patches, mconds, mpatches, tokens = [], [], [], [], []
    for k in range(n):
        cond = model.cfm_context(speech_hist, 32)
        conds.append(cond[0])
        patches.append(model.sample_patch(model.speech_cfm, tr["mu"][k:k + 1], cond, speaker, noise=tr["speech_noise"][k:k + 1]))
        speech_hist.append(speech[k * PS:(k + 1) * PS])
        motion_frames = None
        if k >= D:
            j = k - D
            mcond = model.cfm_context(motion_hist, 40)
            mconds.append(mcond[0])
            mpatches.append(model.sample_patch(model.motion_cfm, tr["mu"][k:k + 1], mcond, tr["first_motion"],
                                               noise=tr["motion_noise"][j:j + 1]))
            motion_frames = motion[j * PS:(j + 1) * PS]
            motion_hist.append(motion_frames)
        tokens.append(model.patch_token(speech[k * PS:(k + 1) * PS], motion_frames)[0, 0])
    errs["speech_cond"] = max_rel_err(torch.stack(conds), tr["speech_cond"])
    errs["speech_patch"] = max_rel_err(torch.cat(patches), speech)
    errs["motion_cond"] = max_rel_err(torch.stack(mconds), tr["motion_cond"])
    errs["motion_patch"] = max_rel_err(torch.cat(mpatches), motion)
    errs["next_token"] = max_rel_err(torch.stack(tokens), tr["next_token_embeds"])

    # stop head on the recorded states
    n_checks = tr["stop_logits"].shape[0]
    logits = model.stop_logits(mus[7:7 + n_checks])
    errs["stop_logits"] = max_rel_err(logits, tr["stop_logits"])
    assert (logits >= 0).tolist() == (tr["stop_logits"] >= 0).tolist()

    print(f"ar_loop {case} teacher-forced max_rel_err: " + ", ".join(f"{k}={v:.2e}" for k, v in errs.items()))
    for name, err in errs.items():
        assert err < 1e-5, (name, err)


@pytest.mark.parametrize("case", CASES)
def test_stream_stops_where_the_reference_did(fixture, case):
    """The loop's stop rule, fed the reference's stop logits and patches: it must read the stop head at
    exactly the reference's steps and end where the reference ended."""
    tensors, meta = fixture
    c = meta["cases"][case]
    model = build_model(tensors, c)
    tr = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"{case}.trace.")}
    logits = list(tr["stop_logits"].tolist())
    speech = list(tensors[f"{case}.outputs.speech_latents"].split(PS))
    motion = list(tensors[f"{case}.outputs.motion_latents_norm"].split(PS))
    model.stop_logits = lambda h: torch.tensor([logits.pop(0)])
    model.sample_patches = lambda cfm, *a, **k: (speech if cfm is model.speech_cfm else motion).pop(0)[None]
    torch.manual_seed(c["seed"])
    out = run_generate(model, tensors, case, c)
    assert out.n_patches == c["patches_generated"]
    assert out.stopped_by == ("stop_head" if c["stopped_by_stop_head"] else "length_cap")
    assert logits == [] and speech == [] and motion == []  # every recorded value used, none missing
    assert out.stop_probs[:7] == [None] * 7 and all(p is not None for p in out.stop_probs[7:])
