"""Parity of SpeechLLM.forward (training loss) and build_stop_labels_ditar with the reference."""
import pytest
import torch
from conftest import load_fixture, max_rel_err

from speech_llm import SpeechLLM, build_stop_labels_ditar, tiny_model_args_and_config


@pytest.mark.parametrize("case", [f"case{i}" for i in range(7)])
def test_stop_labels_parity(case):
    tensors, meta = load_fixture("llm", "stop_labels")
    c = meta["cases"][case]
    labels, pos_weight = build_stop_labels_ditar(c["B"], c["T"], tensors[f"{case}.inputs.start"],
                                                 tensors[f"{case}.inputs.len"], "cpu", fps=c["fps"],
                                                 patch_size=c["patch_size"], ignore_seconds=c["ignore_seconds"])
    assert labels.dtype == torch.long and torch.equal(labels, tensors[f"{case}.outputs.labels"])
    assert pos_weight.dtype == torch.float32 and pos_weight.dim() == 0
    err = max_rel_err(pos_weight, tensors[f"{case}.outputs.pos_weight"])
    print(f"stop_labels {case} labels exact, pos_weight max_rel_err={err:.1e}")
    assert err < 1e-6


@pytest.mark.parametrize("case", ["case_d0", "case_d2"])
def test_train_forward_parity(case):
    tensors, meta = load_fixture("llm", "train_forward")
    weights, _ = load_fixture("llm", "ar_loop")
    c = meta["cases"][case]
    args, config = tiny_model_args_and_config()
    args.delay = c["delay"]
    model = SpeechLLM(args, config)
    model.load_state_dict({k[8:]: v for k, v in weights.items() if k.startswith("weights.")}, strict=True)
    model.train()
    inp = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"{case}.inputs.")}
    recorded = {}
    for head in ("speech_cfm", "motion_cfm"):  # record the exact compute_loss arguments
        cfm = getattr(model, head)

        def recording(*a, _head=head, _orig=cfm.compute_loss, **kw):
            recorded[_head] = kw
            return _orig(*a, **kw)
        cfm.compute_loss = recording
    torch.manual_seed(c["seed"])
    out = model(inp["input_ids"], inp["attention_mask"], mel_len=inp["mel_len"], motion_len=inp["motion_len"],
                speech_span=inp["speech_span"], motion=inp["motion"], task_tag=inp["task_tag"],
                speech_latents=tensors["inputs.speech_latent"], speaker_emb=tensors["inputs.speaker_emb"])
    exp = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"{case}.outputs.")}
    errs = {"inputs_embeds": max_rel_err(out.inputs_embeds.detach(), exp["inputs_embeds"])}
    valid = exp["llm_attention_mask"]
    assert torch.equal(out.llm_attention_mask.bool(), valid)
    errs["hidden"] = max_rel_err(out.hidden.detach()[valid], exp["hidden"][valid])
    assert torch.equal(out.stop_labels, exp["stop_labels"])
    errs["stop_pos_weight"] = max_rel_err(out.stop_pos_weight, exp["stop_pos_weight"])
    for name in ("loss_speech_cfm", "loss_motion_cfm", "stop_loss", "loss"):
        errs[name] = max_rel_err(getattr(out, name).detach(), exp[name])
    for head in ("speech_cfm", "motion_cfm"):
        for arg in ("x1", "mu", "cond", "global_cond"):
            got, want = recorded[head][arg].detach(), tensors[f"{case}.trace.{head}.{arg}"]
            assert got.shape == want.shape, (head, arg)
            errs[f"{head}.{arg}"] = max_rel_err(got, want)
    print(f"train_forward {case} max_rel_err: " + ", ".join(f"{k}={v:.2e}" for k, v in errs.items()))
    for name, err in errs.items():
        assert err < 1e-5, (name, err)
    out.loss.backward()  # the loss is differentiable end to end
    assert model.speech_patch_encoder.cls_token.grad is not None
