"""evaluation.utmos against the tarepan/SpeechMOS UTMOS22 strong fixtures (../shared/fixtures/eval)."""
import json
import math

import pytest
import torch

from conftest import FIXTURES, load_fixture, max_rel_err, shared, synth
from evaluation.utmos import SAMPLE_RATE, UTMOS22Strong, load_utmos, resample_float32

# Suggested tolerances of README_utmos_wer.md, section utmos22_strong (max abs diff unless marked relative).
TOL_WAVE16K = 1e-6  # bit-exact with the float32 kernel recipe
TOL_CONV_FEATURES_REL = 1e-5  # relative (max_rel_err)
TOL_ENCODER = 5e-5  # post_extract_proj, encoder_ln, layer outputs, ssl
TOL_BLSTM = 2e-4  # the recurrence amplifies rounding
TOL_FRAME_SCORES = 2e-5
TOL_SCORE = 1e-5


def _tolerance(name: str) -> float:
    if name in ("post_extract_proj", "encoder_ln", "ssl") or name.startswith("layer_out."):
        return TOL_ENCODER
    return {"blstm": TOL_BLSTM, "frame_scores": TOL_FRAME_SCORES}[name]


@pytest.fixture(scope="module")
def model():
    """The real-size network (100M parameters), built once; default initialisation."""
    torch.manual_seed(0)
    return UTMOS22Strong().eval()


@pytest.fixture(scope="module")
def synth_model(model):
    """The same network with the fixtures' synthetic weights."""
    model.load_state_dict(synth().synth_state_dict(model), strict=True)
    return model


@pytest.fixture(scope="module")
def fixture():
    return load_fixture("eval", "utmos22_strong")


@pytest.fixture(scope="module")
def outputs(synth_model, fixture):
    """Every case run once, with forward hooks catching the intermediates the fixture stores."""
    tensors, meta = fixture
    wav2vec2 = synth_model.wav2vec2
    hooked = {"conv_features": wav2vec2.feature_extractor, "post_extract_proj": wav2vec2.post_extract_proj,
              "encoder_ln": wav2vec2.encoder.layer_norm, "ssl": wav2vec2, "blstm": synth_model.blstm,
              "frame_scores": synth_model.projection}
    hooked.update({f"layer_out.{i}": layer for i, layer in enumerate(wav2vec2.encoder.layers)})
    caught = {}

    def catch(name):
        def hook(module, args, output):
            caught[name] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [module.register_forward_hook(catch(name)) for name, module in hooked.items()]
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the fixture's setting
    results = {}
    try:
        with torch.no_grad():
            for case in meta["cases"]:
                caught.clear()
                wave = tensors[f"input.{case['key']}.wave"]
                score = synth_model(wave, case["sr"])
                results[case["key"]] = {"score": score, "wave16k": resample_float32(wave, case["sr"]), **caught}
    finally:
        torch.set_num_threads(before)
        for handle in handles:
            handle.remove()
    return results


def _inter(tensors, key):
    return sorted(name.split(".", 2)[2] for name in tensors if name.startswith(f"inter.{key}."))


def test_state_dict_matches_released_manifest(model):
    manifest = json.loads(shared(FIXTURES / "eval" / "utmos22_strong_manifest.json").read_text())
    expected = {e["key"]: tuple(e["shape"]) for e in manifest["entries"]}
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert len(state) == manifest["n_entries"]
    assert sum(v.numel() for v in state.values()) == manifest["n_params_total"]
    assert not list(model.buffers())


def test_weight_norm_tap_norms(synth_model, fixture):
    tensors, _ = fixture
    norm = synth_model.wav2vec2.encoder.pos_conv[0].tap_norm().detach()
    assert torch.allclose(norm, tensors["aux.pos_conv_norm_v"], rtol=1e-6, atol=0)


def test_resample_kernels_and_waves(fixture, outputs):
    from evaluation.utmos import _sinc_kernel_float32

    tensors, meta = fixture
    for case in meta["cases"]:
        key = case["key"]
        wave16k = outputs[key]["wave16k"]
        assert wave16k.shape[-1] == case["T_16k"], key
        assert (wave16k - tensors[f"inter.{key}.wave16k"]).abs().max() <= TOL_WAVE16K, key
        if case["resample_identity"]:
            assert wave16k is tensors[f"input.{key}.wave"], key
        if f"aux.{key}.resample_kernel" in tensors:
            spec = case["resample"]
            kernel, width = _sinc_kernel_float32(spec["orig_reduced"], spec["new_reduced"], torch.float32)
            assert width == spec["width"], key
            assert torch.equal(kernel, tensors[f"aux.{key}.resample_kernel"]), key


def test_scores_and_intermediates(fixture, outputs):
    tensors, meta = fixture
    for case in meta["cases"]:
        key, got = case["key"], outputs[case["key"]]
        expected_score = tensors[f"output.{key}.score"]
        assert (got["score"] - expected_score).abs().max() <= TOL_SCORE, (key, got["score"], expected_score)
        assert got["score"].tolist() == pytest.approx(case["score"], abs=TOL_SCORE)
        names = [n for n in _inter(tensors, key) if n != "wave16k"]
        assert {"ssl", "blstm", "frame_scores"} <= set(names)
        for name in names:
            expected = tensors[f"inter.{key}.{name}"]
            assert got[name].shape == expected.shape, (key, name)
            if name == "conv_features":
                err, tol = max_rel_err(got[name], expected), TOL_CONV_FEATURES_REL
            else:
                err, tol = float((got[name] - expected).abs().max()), _tolerance(name)
            assert err <= tol, f"{key} {name}: {err:.3g} > {tol}"
        assert got["ssl"].shape[1] == case["frames"], key


def test_detail_case_has_every_intermediate(fixture):
    tensors, meta = fixture
    names = set(_inter(tensors, meta["detail_case"]))
    assert {"conv_features", "post_extract_proj", "encoder_ln", "ssl", "blstm", "frame_scores"} <= names
    assert any(name.startswith("layer_out.") for name in names)


# ---- loading

def test_load_utmos_round_trip(tmp_path, synth_model):
    path = tmp_path / "utmos22_strong_step7459_v1.pt"
    torch.save(synth_model.state_dict(), path)
    loaded = load_utmos(path)
    assert not loaded.training
    assert not loaded.domain_emb.requires_grad
    state = synth_model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    wave = 0.1 * torch.randn(1, 4000, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(loaded(wave, SAMPLE_RATE), synth_model(wave, SAMPLE_RATE), atol=1e-6)


def test_load_utmos_errors(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        load_utmos(tmp_path / "nothere.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        load_utmos(garbage)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": {"a": torch.zeros(1)}, "step": 3}, wrapped)
    with pytest.raises(ValueError, match="bare state_dict"):
        load_utmos(wrapped)
    wrong_keys = tmp_path / "wrong_keys.pt"
    torch.save({"encoder.weight": torch.zeros(1)}, wrong_keys)
    with pytest.raises(ValueError, match="wrong keys"):
        load_utmos(wrong_keys)
    wrong_shapes = tmp_path / "wrong_shapes.pt"
    torch.save({k: torch.zeros(1) for k in model.state_dict()}, wrong_shapes)
    with pytest.raises(ValueError, match="wrong shapes.*wav2vec2"):
        load_utmos(wrong_shapes)


# ---- fixture-free properties

@pytest.mark.parametrize("sr", [22050, 24000, 44100, 48000])
def test_resample_keeps_a_sine(sr):
    seconds, freq = 0.5, 1000.0
    t_in = torch.arange(int(sr * seconds), dtype=torch.float64) / sr
    out = resample_float32(torch.sin(2 * math.pi * freq * t_in).float()[None], sr)
    assert out.shape == (1, math.ceil(SAMPLE_RATE * t_in.numel() / sr))
    t_out = torch.arange(out.shape[-1], dtype=torch.float64) / SAMPLE_RATE
    expected = torch.sin(2 * math.pi * freq * t_out)
    interior = slice(200, -200)  # away from the zero padding at the edges
    assert (out[0, interior].double() - expected[interior]).abs().max() < 2e-3


def test_resample_identity_batch_and_float64_variant():
    from media import audio

    wave = torch.randn(3, 2, 7001, generator=torch.Generator().manual_seed(1))
    assert resample_float32(wave, SAMPLE_RATE) is wave
    out = resample_float32(wave, 44100)
    assert out.shape == (3, 2, math.ceil(7001 * 160 / 441))
    assert torch.allclose(out[1, 0], resample_float32(wave[1, 0], 44100), atol=1e-6, rtol=0)  # conv1d may pick another kernel per batch size
    # transforms.Resample's float64-built kernel (audio.resample) differs, but only by rounding
    diff = (out - audio.resample(wave, 44100, SAMPLE_RATE)).abs().max()
    assert 0 < diff < 5e-5


def test_batch_rows_are_independent(model):
    generator = torch.Generator().manual_seed(5)
    waves = 0.1 * torch.randn(2, 6000, generator=generator)
    with torch.no_grad():
        both = model(waves, 24000)
        alone = torch.stack([model(waves[i:i + 1], 24000)[0] for i in range(2)])
    assert both.shape == (2,)
    assert torch.allclose(both, alone, atol=1e-5)
    assert (both[0] - both[1]).abs() > 1e-6


def test_frame_count_follows_the_conv_stack(model):
    frames = []
    with torch.no_grad():
        for length in (400, 719, 720, 1041):
            frames.append(model.features(torch.zeros(1, length)).shape[1])
    assert frames == [1, 1, 2, 3]  # window 400, hop 320


def test_rejects_unbatched_input(model):
    with pytest.raises(ValueError, match="B, T"):
        model(torch.zeros(16000), SAMPLE_RATE)
