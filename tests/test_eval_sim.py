"""evaluation.sim against seed-tts-eval's SIM chain (shared/fixtures/eval/sim_protocol.json)."""
import json
import math

import numpy as np
import pytest
import torch
from conftest import FIXTURES, shared

from media import audio
from evaluation import sim

# README_utmos_wer.md (sim_protocol): the stored SIM is the float32 F.cosine_similarity value (bit-exact with
# the norm decomposition); 1e-7 is below one float32 step at these magnitudes' neighbours (~6e-8 at 0.8).
SIM_TOL = 1e-7
# The aggregate is arithmetic on the stored float64 values: equal to the last bits.
MEAN_TOL = 1e-12


@pytest.fixture(scope="module")
def sim_fixture():
    return json.loads(shared(FIXTURES / "eval" / "sim_protocol.json").read_text())


def _embedding(values):
    return torch.tensor(values, dtype=torch.float32)[None]  # (1, 256) as the encoder returns it


def test_cosine_of_stored_pairs(sim_fixture):
    assert sim_fixture["pairs"]
    for pair in sim_fixture["pairs"]:
        emb_gen, emb_ref = _embedding(pair["emb_gen"]), _embedding(pair["emb_ref"])
        value = sim.cosine(emb_gen, emb_ref)
        assert value.shape == (1,) and value.dtype == torch.float32
        assert abs(value.item() - pair["sim"]) <= SIM_TOL, pair["name"]
        assert abs(value.item() - pair["sim_float64_exact"]) <= 2 * SIM_TOL, pair["name"]
        assert abs(float(emb_gen.norm()) - pair["norm_gen"]) <= 1e-6 * pair["norm_gen"], pair["name"]
        # the score line verification_pair_list_v2.py writes ends with the same number
        assert pair["score_line"].rstrip("\n").split("\t")[-1] == repr(pair["sim"])


def test_aggregate_as_average_py(sim_fixture):
    aggregate = sim_fixture["aggregate"]
    sims = [sim.cosine(_embedding(p["emb_gen"]), _embedding(p["emb_ref"])).item() for p in sim_fixture["pairs"]]
    asv, asv_var = sim.aggregate(sims)
    assert [f"ASV: {asv}", f"ASV-var: {asv_var}"] == aggregate["printed"]
    assert (asv, asv_var) == (aggregate["ASV"], aggregate["ASV_var"])
    mean, var = sim.aggregate(sims, ndigits=None)
    assert abs(mean - aggregate["mean_unrounded"]) <= MEAN_TOL
    assert abs(var - aggregate["var_unrounded"]) <= MEAN_TOL


# ---- fixture-free: the chain around the encoder, with the tiny random speaker encoder


@pytest.fixture(scope="module")
def encoder():
    import speaker_verification

    return speaker_verification.tiny_speaker_encoder(seed=5)


def _voice(seed, seconds, sample_rate):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 110 + 60 * torch.rand((), generator=g)
    wave = sum(torch.sin(2 * math.pi * k * f0 * t) / k for k in range(1, 6))
    return (0.3 * wave + 0.02 * torch.randn(t.shape, generator=g)).float()


def test_same_clip_scores_one_and_channel0(encoder, one_thread):
    wav = _voice(1, 0.8, 16000)
    assert sim.speaker_similarity(encoder, wav, 16000, wav, 16000) == pytest.approx(1.0, abs=1e-6)
    stereo = torch.stack([wav, _voice(2, 0.8, 16000)])  # (channels, T): channel 0 is used for both sides
    other = _voice(3, 0.8, 16000)
    assert sim.speaker_similarity(encoder, stereo, 16000, other, 16000) == pytest.approx(
        sim.speaker_similarity(encoder, wav, 16000, other, 16000), abs=1e-6)
    assert sim.speaker_similarity(encoder, other, 16000, stereo.numpy(), 16000) == pytest.approx(
        sim.speaker_similarity(encoder, other, 16000, wav, 16000), abs=1e-6)


def test_resampled_pair_equals_explicit_chain(encoder, one_thread):
    generated, prompt = _voice(4, 0.7, 24000), _voice(5, 0.9, 22050)
    value = sim.speaker_similarity(encoder, generated, 24000, prompt, 22050)
    with torch.no_grad():
        emb1 = encoder(audio.resample(generated[None], 24000, 16000))
        emb2 = encoder(audio.resample(prompt[None], 22050, 16000))
    expected = torch.nn.functional.cosine_similarity(emb1, emb2).item()
    assert value == pytest.approx(expected, abs=1e-6)
    assert -1.0 <= value <= 1.0 and value < 0.999999  # different voices do not score as the same clip


def test_load_wav_layout(tmp_path):
    import soundfile as sf

    stereo_tc = np.stack([np.linspace(-0.5, 0.5, 800), np.zeros(800)], axis=1).astype(np.float32)
    sf.write(tmp_path / "s.wav", stereo_tc, 8000, subtype="FLOAT")
    wav, rate = sim.load_wav(tmp_path / "s.wav")
    assert rate == 8000 and wav.shape == (2, 800) and wav.dtype == np.float32
    np.testing.assert_array_equal(wav[0], stereo_tc[:, 0])
    with pytest.raises(FileNotFoundError):
        sim.load_wav(tmp_path / "missing.wav")
    with pytest.raises(FileNotFoundError):
        sim.load_encoder(tmp_path / "missing.pth")


def test_cosine_and_aggregate_properties():
    a = torch.randn(3, 256, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(sim.cosine(a, -2.5 * a), -torch.ones(3), atol=1e-6)
    assert torch.allclose(sim.cosine(a, 7 * a), torch.ones(3), atol=1e-6)
    assert sim.cosine(torch.zeros(1, 4), torch.ones(1, 4)).item() == 0.0  # eps guards the zero vector
    assert sim.aggregate([0.1, 0.3]) == (0.2, 0.01)
    with pytest.raises(ValueError):
        sim.aggregate([])
