"""WhisperX-VAE: parity with the reference fixture, checkpoint loading, full-size names on meta."""
import json
import math

import pytest
import torch

from media import audio
import whisperx_vae as wv
from conftest import FIXTURES, load_fixture, max_rel_err, shared

CKPT = FIXTURES / "av" / "whisperx_vae_tiny.ckpt"

# Tolerances (max |a - e| / max |e|):
# - encoder side: float32 1e-5 (README default; reference 1- vs 2-thread spread <= 5.2e-6).
#   Measured <= 1.2e-6.
ENCODE_TOL = 1e-5
# - the codec encoder's output (acoustic, std 121: activations grow per DAC block as in the decoder) sits
#   at the float32 floor on some CPUs: on an AVX2-only EPYC it is 1.3e-5 from the fixture, while a float64
#   run of the same weights is 7.8e-6 from ours and 8.6e-6 from the fixture (ours is the closer one).
ACOUSTIC_TOL = 2e-5
# - decoder: with synth weights activations grow ~3-4x per DAC block, so float32 rounding is
#   amplified. Reference 1- vs 2-thread spread: pre_tanh 7.8e-4, recon_probe 6.5e-6. Against a
#   float64 run of the same weights the fixture itself is off by 1.1e-4 (pre_tanh) and 1.4e-5
#   (probe), ours by 9.6e-5 and 1.6e-5, i.e. both sit at the float32 noise floor. Measured vs the
#   fixture: pre_tanh 1.1e-4, probe 1.6e-5.
PRE_TANH_TOL = 1e-3
PROBE_TOL = 5e-5


@pytest.fixture(scope="module")
def fixture():
    return load_fixture("av", "whisperx_vae")


@pytest.fixture(scope="module")
def model():
    return wv.load_whisperx_vae(shared(CKPT), whisper_dims=wv.tiny_whisper_dims())


@pytest.fixture(scope="module")
def ckpt_state_dict():
    # weights_only=True with the module's allow-list (the test never unpickles arbitrary objects).
    with torch.serialization.safe_globals(wv.CHECKPOINT_SAFE_GLOBALS):
        return torch.load(shared(CKPT), map_location="cpu", weights_only=True)["state_dict"]


class NotAllowed:
    """A class a checkpoint may pickle that is not on the loader's allow-list."""


# ---- parity ------------------------------------------------------------------------------------

def test_encode_matches_reference(model, fixture):
    t, meta = fixture
    wav, mel = t["input.wav_24k"], t["input.mel"]
    with torch.no_grad():
        acoustic = model.CodecEnc(wav)
        semantic_used, semantic_25 = model.encode_semantic(mel, acoustic.shape[-1])
        posterior = model.vae.in_proj(acoustic + semantic_25.transpose(1, 2))
    latent = model.encode(wav, mel, return_layout="btc")
    for name, ours in [("inter.acoustic", acoustic), ("inter.semantic_used", semantic_used),
                       ("inter.semantic_25", semantic_25), ("inter.vae_in_proj", posterior),
                       ("output.latent", latent)]:
        assert list(ours.shape) == meta["shapes"][name], name
        assert max_rel_err(ours, t[name]) <= (ACOUSTIC_TOL if name == "inter.acoustic" else ENCODE_TOL), name
    assert torch.equal(latent, posterior[:, :32].transpose(1, 2))
    assert torch.equal(model.encode(wav, mel, "bct"), latent.transpose(1, 2))
    assert torch.equal(model.encode(wav[:, 0], mel), latent)  # (B, T) input accepted


def test_front_end_reproduces_fixture_inputs(fixture):
    t, _ = fixture
    audio_16k = audio.resample(t["input.wav_24k"][:, 0], 24000, 16000)
    assert torch.equal(audio_16k, t["input.audio_16k"])
    mel = audio.log_mel_spectrogram(audio_16k[0])[None, None]
    assert max_rel_err(mel, t["input.mel"]) <= 1e-5


def test_decode_matches_reference(model, fixture):
    t, _ = fixture
    latent = t["output.latent"]
    with torch.no_grad():
        decoder_in = model.vae.out_proj(latent.transpose(1, 2))
        pre_tanh = model.CodecDec(decoder_in, apply_tanh=False)
    recon = model.decode(latent, latent_layout="btc")
    assert max_rel_err(decoder_in, t["inter.decoder_in"]) <= ENCODE_TOL
    assert max_rel_err(pre_tanh, t["inter.pre_tanh"]) <= PRE_TANH_TOL
    assert recon.shape == (1, 1, 28800) and torch.equal(recon, torch.tanh(pre_tanh))
    assert torch.equal(model.decode(latent.transpose(1, 2), "bct"), recon)
    # recon = tanh(pre_tanh) in the reference too; 99.9% of it is saturated and the rest sits at
    # zero crossings of a signal of magnitude ~1e3, where pre_tanh's float32 noise (~0.2 absolute)
    # shows up, so recon itself is checked sample-wise only for agreement in bulk.
    assert ((recon - t["output.recon"]).abs() <= 1e-3).float().mean() >= 0.998  # measured 0.9989

    probe = model.decode(t["input.latent_probe"], "btc")
    assert max_rel_err(probe, t["output.recon_probe"]) <= PROBE_TOL


def test_bad_layouts(model, fixture):
    t, _ = fixture
    with pytest.raises(ValueError):
        model.encode(t["input.wav_24k"], t["input.mel"], return_layout="tbc")
    with pytest.raises(ValueError):
        model.decode(t["output.latent"], latent_layout="tbc")


# ---- checkpoint loading ------------------------------------------------------------------------

def test_checkpoint_matches_fixture_weights_and_round_trips(model, fixture, ckpt_state_dict):
    t, _ = fixture
    exported = model.checkpoint_state_dict()
    decoder = {k for k in ckpt_state_dict if k.startswith("semantic_model.decoder.")}
    assert decoder and set(ckpt_state_dict) - set(exported) == decoder  # skipped = exactly the decoder
    assert set(exported) <= set(ckpt_state_dict)
    for key, value in exported.items():
        assert torch.equal(value, ckpt_state_dict[key]), key
        if f"weights.{key}" in t:
            assert torch.equal(value, t[f"weights.{key}"]), key
    # The only non-parameter entry is Whisper's sinusoidal table, recomputed identically here.
    pos = ckpt_state_dict["semantic_model.encoder.positional_embedding"]
    assert torch.equal(wv.whisper_sinusoids(*pos.shape), pos)
    assert all(not p.requires_grad for p in model.parameters())


def test_fresh_model_from_fixture_weights(fixture):
    """The fixture's `weights.*` (OpenAI names) load into a freshly built model (sinusoids computed)."""
    t, _ = fixture
    fresh = wv.WhisperXVAE(wv.tiny_cfg(), wv.tiny_whisper_dims())
    weights = {k[len("weights."):]: v for k, v in t.items() if k.startswith("weights.")}
    weights["semantic_model.encoder.positional_embedding"] = fresh.checkpoint_state_dict()[
        "semantic_model.encoder.positional_embedding"]
    ignored = fresh.load_checkpoint_state_dict(weights)
    assert ignored and all(k.startswith("semantic_model.decoder.") for k in ignored)
    assert max_rel_err(fresh.encode(t["input.wav_24k"], t["input.mel"]), t["output.latent"]) <= ENCODE_TOL


def test_save_and_reload(model, fixture, tmp_path):
    t, _ = fixture
    path = tmp_path / "vae.ckpt"
    wv.save_checkpoint(model, path)
    again = wv.load_whisperx_vae(path, whisper_dims=wv.tiny_whisper_dims())
    assert torch.equal(again.decode(t["input.latent_probe"]), model.decode(t["input.latent_probe"]))

    legacy = tmp_path / "legacy.ckpt"  # pre-zip torch.save format: read without mmap
    torch.save({"state_dict": model.checkpoint_state_dict(), "hyper_parameters": {"cfg": model.cfg}},
               legacy, _use_new_zipfile_serialization=False)
    again = wv.load_whisperx_vae(legacy, whisper_dims=wv.tiny_whisper_dims())
    assert torch.equal(again.decode(t["input.latent_probe"]), model.decode(t["input.latent_probe"]))


def test_bad_checkpoints(tmp_path):
    def expect(path, fragment, **kwargs):
        with pytest.raises(ValueError) as info:
            wv.load_whisperx_vae(path, **kwargs)
        assert str(info.value).startswith(f"{path}:") and fragment in str(info.value)

    text = tmp_path / "model.ckpt"
    text.write_text("not a checkpoint")
    expect(text, "not a loadable WhisperX-VAE checkpoint")

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"cfg": NotAllowed()}}, evil)
    expect(evil, "allow-list")

    no_state = tmp_path / "weights_only.ckpt"
    torch.save({"model": {"x": torch.zeros(1)}}, no_state)
    expect(no_state, "no 'state_dict'")

    no_cfg = tmp_path / "no_cfg.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, no_cfg)
    expect(no_cfg, "hyper_parameters.cfg")

    with pytest.raises(FileNotFoundError):
        wv.load_whisperx_vae(tmp_path / "missing.ckpt")


def test_tiny_checkpoint_read_with_large_v3_dims_is_refused():
    ckpt = shared(CKPT)
    with pytest.raises(ValueError) as info:
        wv.load_whisperx_vae(ckpt)  # the default whisper_dims are large-v3's
    assert str(info.value).startswith(f"{ckpt}:") and "pass whisper_dims" in str(info.value)


def test_random_tiny_model_shapes():
    torch.manual_seed(0)
    vae = wv.WhisperXVAE(wv.tiny_cfg(), wv.tiny_whisper_dims())
    wav = 0.1 * torch.randn(2, 1, 7 * 960)
    mel = audio.log_mel_spectrogram(audio.resample(wav[0, 0], 24000, 16000))[None, None].expand(2, -1, -1, -1)
    latent = vae.encode(wav, mel)
    assert latent.shape == (2, 7, 32) and torch.isfinite(latent).all()
    recon = vae.decode(latent)
    assert recon.shape == (2, 1, 7 * 960) and recon.abs().max() <= 1


# ---- full-size names and shapes (meta device) --------------------------------------------------

def test_full_size_state_dict_matches_manifest():
    manifest = json.loads(shared(FIXTURES / "av" / "whisperx_vae_manifest.json").read_text())
    model = wv.build_on_meta()  # manifest's assumed release cfg, Whisper large-v3 dims
    ours = {k: list(v.shape) for k, v in model.checkpoint_state_dict().items()}
    entries = {e["key"]: e for e in manifest["entries"]}
    assert len(entries) == manifest["n_entries"] == 1559

    decoder = {k for k, e in entries.items() if e["origin"] == "whisper_decoder_unused"}
    assert len(decoder) == 772
    assert set(entries) - set(ours) == decoder  # skipped by design: exactly the text decoder
    assert set(ours) <= set(entries)
    bad = [k for k in ours if ours[k] != entries[k]["shape"]]
    assert not bad, bad[:5]

    params = {}
    for key, shape in ours.items():
        params[entries[key]["origin"]] = params.get(entries[key]["origin"], 0) + math.prod(shape)
    expected = dict(manifest["n_params_by_origin"])
    expected.pop("whisper_decoder_unused")
    expected["whisper_encoder"] += 1500 * 1280  # the manifest counts parameters; ours holds the
    assert params == expected                   # positional table as a (frozen) parameter
    assert all(p.device.type == "meta" for p in model.parameters())


def test_key_conversion_round_trip():
    manifest = json.loads(shared(FIXTURES / "av" / "whisperx_vae_manifest.json").read_text())
    names = {e["key"]: None for e in manifest["entries"]}
    renamed, dropped = wv.openai_to_transformers_whisper_keys(names)
    assert all(k.startswith("semantic_model.decoder.") for k in dropped) and len(dropped) == 772
    assert "semantic_model.encoder.layers.31.self_attn.k_proj.weight" in renamed
    assert "semantic_model.encoder.embed_positions.weight" in renamed
    back = wv.transformers_to_openai_whisper_keys(renamed)
    assert set(back) == set(names) - set(dropped)


def test_random_bytes_checkpoint_says_what_it_is_not(tmp_path):
    """torch's own advice (retry with weights_only=False) must never reach the user."""
    junk = tmp_path / "model.ckpt"
    junk.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(ValueError) as info:
        wv.load_whisperx_vae(junk)
    message = str(info.value)
    assert message.startswith(f"{junk}: not a loadable WhisperX-VAE checkpoint")
    assert "weights_only=False" not in message and "\n" not in message


def test_other_models_checkpoint_is_named(tmp_path):
    """A checkpoint of the wrong model (right format): one line saying what it looks like."""
    import lia_x
    wrong = tmp_path / "wrong.ckpt"
    torch.save({"state_dict": lia_x.tiny_generator().state_dict(), "hyper_parameters": {"cfg": wv.tiny_cfg()}},
               wrong)
    with pytest.raises(ValueError) as info:
        wv.load_whisperx_vae(wrong, whisper_dims=wv.tiny_whisper_dims())
    message = str(info.value)
    assert "holds 0 of the" in message and "WhisperX-VAE keys" in message
    assert "looks like a LIA-X generator checkpoint" in message and len(message) < 600
