"""evaluation.syncnet against the joonson/syncnet_python fixtures (README_syncnet.md: syncnet_model,
syncnet_eval), plus fixture-free checks of the offset scan and the window alignment."""
import hashlib
import io
import lzma
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_fixture, max_rel_err, synth
from evaluation import syncnet

# Suggested tolerances of README_syncnet.md ("Tolerances for a float32 re-implementation")
LIP_ATOL = 2e-4  # syncnet_model lip / lipfeat; syncnet_eval im_feat
AUD_ATOL = 5e-5  # syncnet_model aud; syncnet_eval cc_feat
INTER_RTOL = 1e-5  # "alternatively, rtol 1e-5 of max|x|" (used for the hooked trunk intermediates)
MFCC_ATOL = 1e-9  # float64 MFCC ("matched exactly in a numpy re-implementation")
SCAN_ATOL = 5e-4  # dists, mdist, minval, median, conf, fdist, fconf, fconfm


def _synth_model() -> syncnet.SyncNet:
    model = syncnet.SyncNet()
    model.load_state_dict(synth().synth_state_dict(model), strict=True)
    return model.eval()


def _frames_of(frames_tensors, name, shape_hint) -> np.ndarray:
    raw = lzma.decompress(frames_tensors[f"input.{name}.frames_bgr_xz"].numpy().tobytes())
    return np.frombuffer(raw, np.uint8).reshape(-1, *shape_hint)


# ---------------------------------------------------------------------------------------------
# syncnet_model


def test_state_dict_matches_manifest():
    model = syncnet.SyncNet()
    found = {k: list(v.shape) for k, v in model.state_dict().items()}
    for name in ("syncnet_model", "syncnet_eval"):
        _, meta = load_fixture("eval", name)
        expected = {e["key"]: e["shape"] for e in meta["state_dict_manifest"]}
        assert found == expected
    _, meta = load_fixture("eval", "syncnet_model")
    assert sum(p.numel() for p in model.parameters()) == meta["n_parameters"]


def test_forward_matches_reference(one_thread):
    tensors, _ = load_fixture("eval", "syncnet_model")
    model = _synth_model()
    captured = {}

    def hook(key):
        return lambda module, args, out: captured.__setitem__(key, out.clone())

    handles = []
    for key in tensors:
        if key.startswith(("inter.lip.", "inter.aud.")):
            trunk = model.netcnnlip if key.startswith("inter.lip.") else model.netcnnaud
            index = int(key.split(".")[2].split("_")[0])
            handles.append(trunk[index].register_forward_hook(hook(key)))
    video = tensors["input.video_u8"].float()
    with torch.no_grad():
        lip = model.forward_lip(video)
        aud = model.forward_aud(tensors["input.mfcc"])
        lipfeat = model.forward_lipfeat(video)
    for h in handles:
        h.remove()

    assert (lip - tensors["output.lip"]).abs().max() <= LIP_ATOL
    assert (lipfeat - tensors["output.lipfeat"]).abs().max() <= LIP_ATOL
    assert (aud - tensors["output.aud"]).abs().max() <= AUD_ATOL
    assert captured, "the fixture lists no intermediates"
    for key, value in captured.items():
        expected = tensors[key]
        if key.endswith("_b0"):  # batch item 0 only
            value = value[:1]
        assert value.shape == expected.shape, key
        assert max_rel_err(value, expected) <= INTER_RTOL, key


# ---------------------------------------------------------------------------------------------
# syncnet_eval


@pytest.fixture(scope="module")
def eval_fixture():
    tensors, meta = load_fixture("eval", "syncnet_eval")
    frames = load_fixture("eval", "syncnet_eval_frames")[0]
    assert meta["clips"]
    return tensors, frames, meta


@pytest.fixture(scope="module")
def eval_results(eval_fixture, tmp_path_factory):
    """evaluate_file on each clip's stored avi, with the synth weights saved and read back by load_syncnet
    (with the SyncNetInstance `__S__.` prefix, as the reference's wrapper names them)."""
    tensors, _, meta = eval_fixture
    folder = tmp_path_factory.mktemp("syncnet")
    model = _synth_model()
    torch.save({f"__S__.{k}": v for k, v in model.state_dict().items()}, folder / "syncnet_v2.model")
    model = syncnet.load_syncnet(folder / "syncnet_v2.model")
    results = {}
    for clip in meta["clips"]:
        name = clip["name"]
        video = folder / f"{name}.avi"
        video.write_bytes(tensors[f"input.{name}.videofile_avi"].numpy().tobytes())
        results[name] = syncnet.evaluate_file(model, video, batch_size=clip["batch_size"],
                                              vshift=clip.get("vshift", meta["vshift"]), tmp_dir=folder)
    assert [p.name for p in folder.iterdir() if p.is_dir()] == []  # temp folders removed
    return results


def test_mfcc_matches_reference(eval_fixture):
    tensors, _, meta = eval_fixture
    for clip in meta["clips"]:
        name = clip["name"]
        expected = tensors[f"inter.{name}.mfcc"].numpy()
        got = syncnet.mfcc(tensors[f"input.{name}.audio_i16"].numpy(), syncnet.SAMPLE_RATE)
        assert got.dtype == np.float64 and got.shape == expected.shape == (13, clip["n_mfcc_frames"])
        assert np.abs(got - expected).max() <= MFCC_ATOL


def test_frames_and_audio_as_the_reference_reads_them(eval_fixture, tmp_path):
    """ffmpeg extraction + Pillow decoding give exactly the frames cv2.imread gave the reference."""
    tensors, frames_file, meta = eval_fixture
    for clip in meta["clips"]:
        name = clip["name"]
        expected = _frames_of(frames_file, name, (syncnet.FRAME_SIZE, syncnet.FRAME_SIZE, 3))
        assert hashlib.sha256(expected.tobytes()).hexdigest() == clip["sha256"]["frames_bgr_u8 (T,224,224,3) C-order"]
        # Pillow's libjpeg-turbo on the reference's own JPEG files
        jpeg, offsets = tensors[f"input.{name}.frames_jpeg"].numpy(), tensors[f"input.{name}.frames_jpeg_offsets"]
        for i in range(len(offsets) - 1):
            data = jpeg[int(offsets[i]):int(offsets[i + 1])].tobytes()
            decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[:, :, ::-1]
            assert np.array_equal(decoded, expected[i]), f"{name} frame {i}"
        # the whole extraction from the avi
        video = tmp_path / f"{name}.avi"
        video.write_bytes(tensors[f"input.{name}.videofile_avi"].numpy().tobytes())
        frames, audio, sample_rate = syncnet.load_video_for_sync(video, tmp_dir=tmp_path)
        assert frames.shape == expected.shape == (clip["n_frames"], 224, 224, 3)
        assert np.array_equal(frames, expected)
        assert sample_rate == syncnet.SAMPLE_RATE
        assert np.array_equal(audio, tensors[f"input.{name}.audio_i16"].numpy())


def test_evaluate_file_matches_reference(eval_fixture, eval_results):
    tensors, _, meta = eval_fixture
    for clip in meta["clips"]:
        name = clip["name"]
        r = eval_results[name]
        out = {k.removeprefix(f"output.{name}."): v for k, v in tensors.items() if k.startswith(f"output.{name}.")}
        assert r.dists.shape == (clip["n_windows"], 2 * meta["vshift"] + 1)
        assert (r.offset, r.minidx) == (int(out["offset"]), int(out["minidx"]))
        assert (r.offset, r.conf) == pytest.approx((clip["result"]["offset"], clip["result"]["conf_SyncC"]),
                                                   abs=SCAN_ATOL)
        assert np.abs(r.im_feat - tensors[f"inter.{name}.im_feat"].numpy()).max() <= LIP_ATOL
        assert np.abs(r.cc_feat - tensors[f"inter.{name}.cc_feat"].numpy()).max() <= AUD_ATOL
        for field, expected in (("dists", out["dists"]), ("mdist", out["mdist"]), ("fconfm", out["fconfm"]),
                                ("fdist", tensors[f"inter.{name}.fdist"]), ("fconf", tensors[f"inter.{name}.fconf"])):
            got = getattr(r, field)
            assert got.shape == tuple(expected.shape), field
            assert np.abs(got - expected.numpy()).max() <= SCAN_ATOL, field
        for field, key in (("min_dist", "minval"), ("median", "median"), ("conf", "conf")):
            assert abs(getattr(r, field) - float(out[key])) <= SCAN_ATOL, field


# ---------------------------------------------------------------------------------------------
# fixture-free


def _naive_calc_pdist(im, cc, vshift):
    """The reference's loop: one pairwise_distance call per window against the zero-padded audio rows."""
    width = 2 * vshift + 1
    padded = torch.nn.functional.pad(cc, (0, 0, vshift, vshift))
    rows = [torch.nn.functional.pairwise_distance(im[[i]].repeat(width, 1), padded[i:i + width])
            for i in range(len(im))]
    return torch.stack(rows)


def test_offset_scan_equals_naive_loop():
    g = torch.Generator().manual_seed(0)
    im, cc = torch.randn(23, 16, generator=g) * 5, torch.randn(23, 16, generator=g)
    for vshift in (0, 3, 15):
        expected = _naive_calc_pdist(im, cc, vshift)
        torch.testing.assert_close(syncnet.offset_distances(im, cc, vshift), expected)
        torch.testing.assert_close(syncnet.offset_distances(im, cc, vshift, chunk=4), expected)


@pytest.mark.parametrize("lag", [-3, 0, 2])
def test_scan_finds_shifted_features(lag):
    """Audio features equal to the video features delayed by `lag` windows read as offset -lag."""
    g = torch.Generator().manual_seed(1)
    im = torch.randn(40, 32, generator=g)
    cc = torch.randn(40, 32, generator=g)
    j = torch.arange(40)
    valid = (j - lag >= 0) & (j - lag < 40)
    cc[valid] = im[(j - lag)[valid]]
    result = syncnet._scan(im, cc, vshift=15)
    assert result.offset == -lag
    assert result.conf > 0 and result.min_dist == pytest.approx(float(result.mdist.min()))


class _BlinkModel(torch.nn.Module):
    """Toy embeddings: lip = per-frame brightness bit of the 5 frames, audio = per-frame loudness bit of the
    first MFCC column of each video frame (log energy row; a quiet frame after a loud one reads ~15, the
    pre-emphasis carries one loud sample over). Aligned windows give identical vectors."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward_lip(self, video_b35hw):
        return (video_b35hw.mean(dim=(1, 3, 4)) > 127).float()

    def forward_aud(self, mfcc_b11320):
        return (mfcc_b11320[:, 0, 0, ::syncnet.MFCC_PER_FRAME] > 18).float()


def _blink_clip(n_frames, lag, seed=0):
    """Frames that are white/black by a random bit pattern and audio loud/quiet by the same pattern delayed
    by `lag` frames (positive: the audio lags)."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2, n_frames + abs(lag))
    first = max(lag, 0)  # audio(t) = video(t - lag)
    video_bits, audio_bits = bits[first:first + n_frames], bits[first - lag:first - lag + n_frames]
    frames = np.repeat(video_bits * 255, 224 * 224 * 3).astype(np.uint8).reshape(n_frames, 224, 224, 3)
    spf = syncnet.SAMPLE_RATE // syncnet.FPS
    amplitude = np.repeat(np.where(audio_bits == 1, 3000.0, 3.0), spf)
    audio = (amplitude * rng.standard_normal(n_frames * spf)).clip(-32768, 32767).astype(np.int16)
    return frames, audio


@pytest.mark.parametrize("lag", [-2, 0, 3])
def test_evaluate_arrays_window_alignment(lag):
    """Window i pairs frames i..i+4 with MFCC columns 4i..4i+19: a toy model finds the planted lag."""
    frames, audio = _blink_clip(60, lag)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # equal lengths: no WARNING
        result = syncnet.evaluate_arrays(_BlinkModel(), frames, audio, batch_size=7, vshift=6)
    assert result.dists.shape == (55, 13)
    assert result.offset == -lag
    assert result.fdist[abs(lag):len(result.fdist) - abs(lag)].max() < 1e-4  # the aligned pairs match exactly


def test_length_mismatch_warns_and_uses_the_shorter_stream():
    frames, audio = _blink_clip(40, 0)
    with pytest.warns(UserWarning, match="lengths are different"):
        result = syncnet.evaluate_arrays(_BlinkModel(), frames, audio[:30 * 640 + 100])
    assert result.dists.shape == (30 - syncnet.WINDOW_FRAMES, 31)
    with pytest.raises(ValueError, match="too short"):
        syncnet.evaluate_arrays(_BlinkModel(), frames[:5], audio[:5 * 640])
    with pytest.raises(ValueError, match="224"):
        syncnet.evaluate_arrays(_BlinkModel(), frames[:, :100], audio)
    with pytest.raises(ValueError, match="16000 Hz"):
        syncnet.mfcc(audio, 8000)


def test_load_syncnet(tmp_path):
    state = syncnet.SyncNet().state_dict()
    plain = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # pre-0.4.1 layout
    torch.save(plain, tmp_path / "plain.model")
    model = syncnet.load_syncnet(tmp_path / "plain.model")
    assert not model.training
    assert torch.equal(model.netcnnlip[0].weight, state["netcnnlip.0.weight"])

    torch.save({k: v for k, v in plain.items() if k != "netfclip.3.bias"}, tmp_path / "missing.model")
    with pytest.raises(ValueError, match=r"missing\.model: .*1 missing \(e\.g\. netfclip\.3\.bias\)"):
        syncnet.load_syncnet(tmp_path / "missing.model")
    torch.save({**plain, "netfcaud.0.weight": torch.zeros(3, 3)}, tmp_path / "shape.model")
    with pytest.raises(ValueError, match="wrong shape"):
        syncnet.load_syncnet(tmp_path / "shape.model")
    torch.save([1, 2], tmp_path / "list.model")
    with pytest.raises(ValueError, match="not a SyncNet state dict"):
        syncnet.load_syncnet(tmp_path / "list.model")
    with pytest.raises(FileNotFoundError):
        syncnet.load_syncnet(tmp_path / "absent.model")


def _write_clip(path, frames_bgr, audio_i16):
    """An mpeg4 + pcm avi as run_pipeline's crops are (25 fps, 16 kHz mono), made with the bundled ffmpeg."""
    import subprocess

    import imageio_ffmpeg
    import scipy.io.wavfile

    audio_args = []
    if audio_i16 is not None:
        wav = path.with_suffix(".wav")
        scipy.io.wavfile.write(wav, syncnet.SAMPLE_RATE, audio_i16)
        audio_args = ["-i", str(wav), "-c:a", "copy"]
    n, h, w, _ = frames_bgr.shape
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-f", "rawvideo",
                    "-pix_fmt", "bgr24", "-s", f"{w}x{h}", "-r", str(syncnet.FPS), "-i", "-", *audio_args,
                    "-c:v", "mpeg4", "-q:v", "2", str(path)],
                   input=frames_bgr.tobytes(), check=True)


def test_evaluate_file_end_to_end_toy(tmp_path):
    """Through ffmpeg (frames as JPEGs, audio as 16 kHz wav) the toy model still finds the planted lag."""
    frames, audio = _blink_clip(50, 2, seed=3)
    _write_clip(tmp_path / "toy.avi", frames, audio)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = syncnet.evaluate_file(_BlinkModel(), tmp_path / "toy.avi", batch_size=16, vshift=5,
                                       tmp_dir=tmp_path)
    assert result.offset == -2 and result.dists.shape == (45, 11)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.avi", "toy.wav"]  # temp folder removed


def test_evaluate_file_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError):
        syncnet.evaluate_file(_BlinkModel(), tmp_path / "absent.avi")
    (tmp_path / "junk.avi").write_bytes(b"not a video at all")
    with pytest.raises(ValueError, match="junk.avi: no video stream"):
        syncnet.evaluate_file(_BlinkModel(), tmp_path / "junk.avi", tmp_dir=tmp_path)
    frames, _ = _blink_clip(10, 0)
    _write_clip(tmp_path / "silent.avi", frames, None)
    with pytest.raises(ValueError, match="silent.avi: no audio stream"):
        syncnet.evaluate_file(_BlinkModel(), tmp_path / "silent.avi", tmp_dir=tmp_path)
