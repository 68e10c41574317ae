"""Speaker encoder (WavLM + ECAPA-TDNN): parity with the s3prl/UniSpeech reference fixture,
full-size state-dict layout, and checkpoint loading.

Tolerance: float32, max|a-e|/max|e| <= 1e-5 for every compared tensor. The reference's own
1-vs-2-thread difference (threads_1_vs_2 in speaker_encoder.json) is <= 5.4e-7, far below it.
"""
import argparse
import json

import pytest
import torch
from conftest import FIXTURES, load_fixture, max_rel_err, shared, synth

import speaker_verification as sv

TOL = 1e-5
WAVLM = "feature_extract.model."


@pytest.fixture(scope="module")
def fixture():
    tensors, meta = load_fixture("av", "speaker_encoder")
    return tensors, meta


@pytest.fixture(scope="module")
def fixture_state_dict(fixture):
    """Full state dict (checkpoint names) of the fixture model: stored WavLM + feature_weight,
    synth for the ECAPA head."""
    tensors, _ = fixture
    stored = {k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}
    model = sv.tiny_speaker_encoder()
    head = {k: v for k, v in synth().synth_state_dict(model).items() if not k.startswith("feature_extract.")}
    head.pop("feature_weight")
    assert not set(stored) & set(head)
    return {**stored, **head}


def _tiny_on_meta():
    with torch.device("meta"):
        return sv.ECAPA_TDNN_SMALL(feat_dim=64, wavlm_args=sv.tiny_wavlm_args())


def _save(path, obj, **kwargs):
    torch.save(obj, path, **kwargs)
    return path


def test_fixture_config_is_the_tiny_config(fixture):
    _, meta = fixture
    args = sv.tiny_wavlm_args()
    assert sv.WavLMArgs.from_cfg(meta["wavlm_cfg"]) == args
    assert meta["D"] == args.encoder_embed_dim
    assert meta["feat_num"] == args.encoder_layers + 1


def test_parity_with_reference(fixture, fixture_state_dict):
    tensors, meta = fixture
    model = sv.tiny_speaker_encoder()
    model.load_state_dict(fixture_state_dict, strict=True)  # checkpoint (fairseq) names
    wav = tensors["input.wav_16k"]
    with torch.no_grad():
        hidden = torch.stack(model.feature_extract(wav))
        feat = model.get_feat(wav)
        emb = model(wav)
    assert hidden.shape == tensors["inter.hidden_states"].shape
    assert max_rel_err(hidden, tensors["inter.hidden_states"]) <= TOL
    assert max_rel_err(feat, tensors["inter.feat"]) <= TOL
    assert emb.shape == (1, 256)
    assert max_rel_err(emb, tensors["output.embedding"]) <= TOL
    # exported names are the checkpoint's, and the stored values round-trip
    exported = model.state_dict()
    assert set(exported) == set(fixture_state_dict)
    for k in ("feature_weight", WAVLM + "encoder.pos_conv.0.weight_g", WAVLM + "mask_emb"):
        assert torch.equal(exported[k], fixture_state_dict[k])


def test_transformers_hidden_states_differ_only_in_last_entry(fixture, fixture_state_dict):
    """Why the encoder loop is ours: transformers 5's output_hidden_states ends with the raw last
    layer output; s3prl (the reference) ends with the encoder's LayerNormed output."""
    tensors, _ = fixture
    model = sv.tiny_speaker_encoder()
    model.load_state_dict(fixture_state_dict)
    wav = tensors["input.wav_16k"]
    ref = tensors["inter.hidden_states"]
    with torch.no_grad():
        out = model.feature_extract.model(torch.nn.functional.layer_norm(wav, wav.shape[-1:]),
                                          output_hidden_states=True)
    assert max_rel_err(out.last_hidden_state, ref[-1]) <= TOL
    for i in range(len(ref) - 1):
        assert max_rel_err(out.hidden_states[i], ref[i]) <= TOL


def test_batch_rows_are_independent(fixture, fixture_state_dict):
    tensors, _ = fixture
    model = sv.tiny_speaker_encoder()
    model.load_state_dict(fixture_state_dict)
    wav = tensors["input.wav_16k"]
    batch = torch.cat([wav, 0.3 * wav.flip(-1)], dim=0)
    with torch.no_grad():
        emb = model(batch)
        single = model(batch[1:])
    assert max_rel_err(emb[:1], tensors["output.embedding"]) <= TOL
    assert max_rel_err(emb[1:], single) <= TOL


def test_full_size_layout_matches_manifest():
    manifest = json.loads(shared(FIXTURES / "av" / "speaker_encoder_manifest.json").read_text())
    with torch.device("meta"):
        model = sv.ECAPA_TDNN_SMALL(feat_dim=1024, feat_type="wavlm_large")
    state = model.state_dict()
    entries = {e["key"]: e for e in manifest["entries"]}
    assert len(entries) == manifest["n_entries"] == 710
    assert set(state) == set(entries)
    param_names = {
        WAVLM + sv.hf_to_fairseq_wavlm_key(n[len(WAVLM):]) if n.startswith(WAVLM) else n
        for n, _ in model.named_parameters()
    }
    for key, e in entries.items():
        assert list(state[key].shape) == e["shape"], key
        assert str(state[key].dtype) == "torch." + e["dtype"], key
        assert (key in param_names) == (e["kind"] == "param"), key
    assert sum(p.numel() for p in model.parameters()) == manifest["n_params_total"]
    assert model.feature_weight.shape == (manifest["feat_num"],)


def test_key_conversion_round_trips():
    manifest = json.loads(shared(FIXTURES / "av" / "speaker_encoder_manifest.json").read_text())
    for e in manifest["entries"]:
        if e["key"].startswith(WAVLM):
            fairseq = e["key"][len(WAVLM):]
            hf = sv.fairseq_to_hf_wavlm_key(fairseq)
            assert hf != fairseq or fairseq.startswith(("encoder.layer_norm", "encoder.layers.")), fairseq
            assert sv.hf_to_fairseq_wavlm_key(hf) == fairseq


def test_load_full_checkpoint_on_meta(tmp_path, fixture, fixture_state_dict):
    tensors, _ = fixture
    path = _save(tmp_path / "finetune.pth", {"model": fixture_state_dict, "epoch": 3})
    model = sv.load_speaker_encoder(_tiny_on_meta(), path).eval()
    assert not any(t.is_meta for t in model.state_dict().values())
    with torch.no_grad():
        emb = model(tensors["input.wav_16k"])
    assert max_rel_err(emb, tensors["output.embedding"]) <= TOL


def test_load_wavlm_from_separate_checkpoint(tmp_path, fixture, fixture_state_dict):
    tensors, meta = fixture
    head = {k: v for k, v in fixture_state_dict.items() if not k.startswith(WAVLM)}
    wavlm = {k[len(WAVLM):]: v for k, v in fixture_state_dict.items() if k.startswith(WAVLM)}
    finetune = _save(tmp_path / "finetune.pth", {"model": head})
    # legacy (non-zip) format: cannot be memory-mapped, loaded the ordinary way
    wavlm_ckpt = _save(tmp_path / "WavLM.pt", {"cfg": meta["wavlm_cfg_effective"], "model": wavlm},
                       _use_new_zipfile_serialization=False)
    model = sv.load_speaker_encoder(_tiny_on_meta(), finetune, wavlm_checkpoint=wavlm_ckpt).eval()
    with torch.no_grad():
        emb = model(tensors["input.wav_16k"])
    assert max_rel_err(emb, tensors["output.embedding"]) <= TOL

    wrong_cfg = _save(tmp_path / "WavLM_base.pt", {"cfg": {**meta["wavlm_cfg"], "encoder_layers": 12}, "model": wavlm})
    with pytest.raises(ValueError, match="WavLM_base.pt: WavLM cfg does not match.*encoder_layers"):
        sv.load_speaker_encoder(_tiny_on_meta(), finetune, wavlm_checkpoint=wrong_cfg)


def test_missing_wavlm_weights_ask_for_a_wavlm_checkpoint(tmp_path, fixture_state_dict):
    head = {k: v for k, v in fixture_state_dict.items() if not k.startswith(WAVLM)}
    finetune = _save(tmp_path / "finetune.pth", {"model": head})
    with pytest.raises(ValueError, match=r"finetune.pth: .*does not contain the WavLM weights.*wavlm_checkpoint="):
        sv.load_speaker_encoder(_tiny_on_meta(), finetune)
    # the full-size entry point fails the same way, before materialising anything
    with pytest.raises(ValueError, match=r"finetune.pth: .*WavLM-Large"):
        sv.init_model("wavlm_large", finetune)


def test_strict_about_model_keys_and_ignores_a_training_head(tmp_path, fixture_state_dict):
    # entries the encoder does not have (the released file likely carries its classifier head)
    # are skipped with a warning naming them, as the reference's strict=False load skips them
    head = {"projection.weight": torch.zeros(5994, 8)}
    extra = _save(tmp_path / "extra.pth", {"model": {**fixture_state_dict, **head}})
    with pytest.warns(UserWarning, match=r"extra.pth: ignoring 1 entries.*projection.weight"):
        model = sv.load_speaker_encoder(_tiny_on_meta(), extra)
    assert torch.equal(model.state_dict()["linear.bias"], fixture_state_dict["linear.bias"])
    assert "projection.weight" not in model.state_dict()
    short = {k: v for k, v in fixture_state_dict.items() if k != "linear.bias"}
    missing = _save(tmp_path / "missing.pth", {"model": short})
    with pytest.raises(ValueError, match=r"missing.pth: holds \d+ of the \d+ speaker encoder keys: 1 missing \(e.g. linear.bias\)"):
        sv.load_speaker_encoder(_tiny_on_meta(), missing)
    shape = dict(fixture_state_dict, feature_weight=torch.zeros(25))
    wrong = _save(tmp_path / "large_head.pth", {"model": shape})
    with pytest.raises(ValueError, match=r"large_head.pth: .*of the wrong shape \(e.g. feature_weight"):
        sv.load_speaker_encoder(_tiny_on_meta(), wrong)
    # old-format files without BatchNorm counters still load
    no_counters = {k: v for k, v in fixture_state_dict.items() if not k.endswith("num_batches_tracked")}
    model = sv.load_speaker_encoder(_tiny_on_meta(), _save(tmp_path / "old.pth", {"model": no_counters}))
    assert int(model.bn.num_batches_tracked) == 0


def test_wrong_kind_of_file(tmp_path, fixture_state_dict):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match=r"notes.txt: not a loadable torch checkpoint"):
        sv.load_speaker_encoder(_tiny_on_meta(), text)
    with pytest.raises(ValueError, match=r"tensor.pth: expected a dict checkpoint"):
        sv.load_speaker_encoder(_tiny_on_meta(), _save(tmp_path / "tensor.pth", torch.zeros(3)))
    with pytest.raises(ValueError, match=r"nomodel.pth: no 'model' state dict"):
        sv.load_speaker_encoder(_tiny_on_meta(), _save(tmp_path / "nomodel.pth", {"state_dict": fixture_state_dict}))
    # arbitrary pickled objects are refused by weights_only=True; the message names the file
    pickled = _save(tmp_path / "pickled.pth", {"model": fixture_state_dict, "args": argparse.Namespace(lr=1)})
    with pytest.raises(ValueError, match=r"pickled.pth: not a loadable torch checkpoint.*Namespace"):
        sv.load_speaker_encoder(_tiny_on_meta(), pickled)
    with pytest.raises(FileNotFoundError):
        sv.load_speaker_encoder(_tiny_on_meta(), tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="Unsupported model_name"):
        sv.init_model("wavlm_base_plus", tmp_path / "absent.pth")


def test_tiny_encoder_is_deterministic_and_finite():
    a, b = sv.tiny_speaker_encoder(seed=1), sv.tiny_speaker_encoder(seed=1)
    wav = torch.randn(2, 8000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ea, eb = a(wav), b(wav)
    assert ea.shape == (2, 256) and torch.isfinite(ea).all()
    assert torch.equal(ea, eb)
    assert not a.training
