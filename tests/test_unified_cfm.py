"""Parity of the CFM sampler with the reference fixture (seeded noise and replayed noise)."""
import pytest
import torch
from conftest import load_fixture, max_rel_err

from llama4nar import DecoderConfig
from local_dit import VoxCPMLocDiT
from unified_cfm import CfmConfig, UnifiedCFM


def _build(tensors, meta):
    ctor = meta["estimator_constructor"]
    est = VoxCPMLocDiT(DecoderConfig(**ctor["config"]["DecoderConfig"]), in_channels=ctor["in_channels"],
                       global_cond_channels=ctor["global_cond_channels"])
    cfm = UnifiedCFM(in_channels=ctor["in_channels"], cfm_params=CfmConfig(), estimator=est).eval()
    cfm.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("weights.")}, strict=True)
    return cfm


# Fields of the reference's CfmConfig that nothing in the released model reads (see unified_cfm.py).
UNUSED_REFERENCE_FIELDS = {"sigma_min", "solver", "inference_cfg_rate", "reg_loss_type", "ratio_r_neq_t_range"}


def test_cfm_config_matches_fixture():
    """Every field kept has the reference's value; the ones dropped are exactly the unused ones."""
    _, meta = load_fixture("llm", "cfm_sample")
    cfg = CfmConfig()
    assert set(meta["cfm_config"]) - set(vars(cfg)) == UNUSED_REFERENCE_FIELDS
    for name, got in vars(cfg).items():
        value = meta["cfm_config"][name]
        assert (list(got) if isinstance(got, tuple) else got) == value, name


@pytest.mark.parametrize("case", ["case0", "case1", "case2"])
def test_cfm_sample_parity(case):
    tensors, meta = load_fixture("llm", "cfm_sample")
    cfm = _build(tensors, meta)
    c = meta["cases"][case]
    mu, cond, gc = tensors["inputs.mu"], tensors["inputs.cond"], tensors["inputs.global_cond"]
    torch.manual_seed(c["seed"])
    x = cfm(mu, n_timesteps=c["n_timesteps"], patch_size=c["patch_size"], cond=cond, global_cond=gc,
            temperature=c["temperature"], cfg_value=c["cfg_value"], sway_sampling_coef=c["sway_sampling_coef"],
            use_cfg_zero_star=c["use_cfg_zero_star"])
    expected = tensors[f"{case}.outputs.x"]
    err = max_rel_err(x, expected)
    print(f"cfm_sample {case} max_rel_err={err:.3e}")
    assert err < 1e-5

    # the same result from the stored noise draw and t_span (no RNG involved)
    with torch.no_grad():
        x2 = cfm.solve_euler(tensors[f"{case}.aux.noise"] * c["temperature"], tensors[f"{case}.aux.t_span"], mu,
                             cond, gc, c["cfg_value"], c["use_cfg_zero_star"])
    assert max_rel_err(x2, expected) < 1e-5
