"""video_io: decoding parity with the reference's OpenCV reader, H.264/AAC writing, probing."""
import subprocess

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors import safe_open

from media import video_io
from conftest import FIXTURES, REFERENCE_SAMPLES, shared

REF_VIDEO = REFERENCE_SAMPLES / "reference_video.mp4"
FPS = 25


def _frames(n, h=48, w=64, offset=0):
    """Smooth moving gradients (chroma subsampling keeps them near-lossless)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((n, h, w, 3), np.uint8)
    for t in range(n):
        k = t + offset
        out[t, ..., 0] = (128 + 100 * np.sin((xx + 2 * k) / 15)).astype(np.uint8)
        out[t, ..., 1] = (128 + 100 * np.cos((yy - k) / 12)).astype(np.uint8)
        out[t, ..., 2] = (60 + 2 * k + xx).clip(0, 255).astype(np.uint8)
    return out


def _tone(path, seconds, sr=24000):
    t = np.arange(int(round(seconds * sr))) / sr
    sf.write(path, (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sr, subtype="PCM_16")
    return path


def _top_level_boxes(path):
    data = path.read_bytes()
    boxes, pos = [], 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos:pos + 4], "big")
        if size == 1:
            size = int.from_bytes(data[pos + 8:pos + 16], "big")
        elif size == 0:
            size = len(data) - pos
        boxes.append(data[pos + 4:pos + 8].decode("latin-1"))
        pos += size
    return boxes


def _decode_audio(path):
    pcm = subprocess.run([video_io.ffmpeg_exe(), "-v", "error", "-i", str(path), "-map", "0:a:0",
                          "-ac", "1", "-f", "f32le", "pipe:1"], capture_output=True, check=True)
    return np.frombuffer(pcm.stdout, np.float32)


# --------------------------------------------------------------------------------- reading


def test_reference_video_matches_opencv_first_frame():
    frames, fps = video_io.read_frames(shared(REF_VIDEO))
    assert frames.shape == (125, 512, 512, 3) and frames.dtype == np.uint8
    assert fps == 25.0
    assert abs(float(frames[0].mean()) - 109.83) < 0.01  # README: cv2 first frame mean 109.83

    fixture = shared(FIXTURES / "av" / "lia_x.safetensors")
    with safe_open(str(fixture), "pt") as f:
        opencv_rgb = f.get_tensor("input.image_u8").numpy()
    first = video_io.read_first_frame(REF_VIDEO)
    assert np.array_equal(first, frames[0])
    # Bit-identical on x86-64 here (same swscale SIMD path as cv2's bundled FFmpeg); swscale's
    # plain-C path differs by up to 2 levels, which is the tolerance for other CPUs.
    diff = np.abs(first.astype(int) - opencv_rgb.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.7


def test_read_frames_max_frames_and_probe_of_reference():
    frames, fps = video_io.read_frames(shared(REF_VIDEO), max_frames=7)
    assert frames.shape == (7, 512, 512, 3) and fps == 25.0
    info = video_io.probe(REF_VIDEO)
    assert (info["video_codec"], info["pix_fmt"], info["width"], info["height"]) == \
        ("h264", "yuv420p", 512, 512)
    assert info["fps"] == 25.0 and info["n_frames"] == 125
    assert info["video_duration"] == pytest.approx(5.0, abs=1e-9)
    assert info["audio_codec"] is None and info["audio_duration"] is None
    assert info["faststart"] is False  # upstream file: mdat before moov


# --------------------------------------------------------------------------------- writing


def test_write_video_without_audio(tmp_path):
    frames = _frames(30)
    out = tmp_path / "v.mp4"
    # a mix of batches, a single frame and a torch tensor batch
    items = [frames[:10], frames[10], torch.from_numpy(frames[11:20]), frames[20:]]
    assert video_io.write_video(out, iter(items), fps=FPS) == 30
    info = video_io.probe(out)
    assert (info["video_codec"], info["pix_fmt"], info["width"], info["height"]) == \
        ("h264", "yuv420p", 64, 48)
    assert info["fps"] == 25.0 and info["n_frames"] == 30
    assert info["video_duration"] == pytest.approx(30 / FPS, abs=1e-9)
    assert info["audio_codec"] is None
    boxes = _top_level_boxes(out)
    assert boxes.index("moov") < boxes.index("mdat")  # +faststart
    assert info["faststart"] is True and video_io.mp4_top_level_boxes(out) == boxes

    back, fps = video_io.read_frames(out)
    assert back.shape == frames.shape and fps == 25.0
    # 4:2:0 chroma and 8-bit limited-range YUV: ~2 levels even at CRF 0 on this content
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 3.0


def test_write_then_read_keeps_flat_colours(tmp_path):
    # flat colours isolate the RGB<->YUV matrices: a BT.601/BT.709 mix-up costs >10 levels
    colours = np.random.default_rng(0).integers(0, 256, (6, 1, 1, 3)).astype(np.uint8)
    frames = np.broadcast_to(colours, (6, 32, 32, 3))
    video_io.write_video(tmp_path / "flat.mp4", frames, fps=FPS)
    back, _ = video_io.read_frames(tmp_path / "flat.mp4")
    assert np.abs(back.astype(int) - frames.astype(int)).max() <= 3


@pytest.mark.parametrize("audio_seconds", [0.7, 2.3])  # shorter (padded) / longer (trimmed)
def test_write_video_with_audio_durations_match(tmp_path, audio_seconds):
    wav = _tone(tmp_path / "a.wav", audio_seconds)
    out = tmp_path / "av.mp4"
    video_io.write_video(out, iter([_frames(37)]), fps=FPS, audio_path=wav)
    info = video_io.probe(out)
    assert info["video_codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert info["n_frames"] == 37 and info["video_duration"] == pytest.approx(37 / FPS)
    assert info["audio_codec"] == "aac" and info["audio_sample_rate"] == 24000
    assert abs(info["audio_duration"] - info["video_duration"]) <= 1 / FPS
    assert info["faststart"] is True
    audio = _decode_audio(out)
    assert len(audio) == pytest.approx(37 / FPS * 24000, abs=24000 / FPS)
    if audio_seconds < 37 / FPS:  # the padding is silence, the tone is kept
        assert np.abs(audio[int(0.9 * 24000):]).max() < 0.02
        assert np.abs(audio[2400:int(0.6 * 24000)]).max() > 0.3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "av.mp4"]


def test_write_video_resamples_rates_aac_lacks(tmp_path):
    wav = _tone(tmp_path / "odd.wav", 1.0, sr=23000)
    out = tmp_path / "av.mp4"
    video_io.write_video(out, [_frames(10)], fps=FPS, audio_path=wav)
    info = video_io.probe(out)
    assert info["audio_sample_rate"] == 48000
    assert abs(info["audio_duration"] - info["video_duration"]) <= 1 / FPS


# --------------------------------------------------------------------------------- atomicity


class Boom(Exception):
    pass


def _failing(exc, after=2):
    frames = _frames(after * 4)
    for i in range(after):
        yield frames[4 * i:4 * i + 4]
    raise exc


@pytest.mark.parametrize("exc", [Boom("render failed"), KeyboardInterrupt()])
@pytest.mark.parametrize("with_audio", [False, True])
def test_failed_write_leaves_nothing(tmp_path, exc, with_audio):
    wav = _tone(tmp_path / "a.wav", 0.5) if with_audio else None
    out_dir = tmp_path / "out"
    out = out_dir / "v.mp4"
    with pytest.raises(type(exc)):
        video_io.write_video(out, _failing(exc), fps=FPS, audio_path=wav)
    assert list(out_dir.iterdir()) == []  # no output, no temp file


def test_failed_write_keeps_previous_file(tmp_path):
    out = tmp_path / "v.mp4"
    out.write_bytes(b"previous")
    with pytest.raises(Boom):
        video_io.write_video(out, _failing(Boom()), fps=FPS)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]


# --------------------------------------------------------------------------------- mux_audio


def test_mux_audio_copies_h264_video(tmp_path):
    frames = _frames(40)
    silent = tmp_path / "silent.mp4"
    video_io.write_video(silent, frames, fps=FPS)
    wav = _tone(tmp_path / "a.wav", 1.0)
    out = tmp_path / "dub.mp4"
    video_io.mux_audio(silent, wav, out)
    info = video_io.probe(out)
    assert info["n_frames"] == 40 and info["video_codec"] == "h264"
    assert abs(info["audio_duration"] - info["video_duration"]) <= 1 / FPS
    assert info["audio_codec"] == "aac" and info["faststart"] is True
    # stream copy: the decoded frames are exactly those of the input video
    assert np.array_equal(video_io.read_frames(out)[0], video_io.read_frames(silent)[0])

    video_io.mux_audio(out, _tone(tmp_path / "b.wav", 3.0), out)  # in place, trimmed
    info = video_io.probe(out)
    assert info["n_frames"] == 40 and abs(info["audio_duration"] - 1.6) <= 1 / FPS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "b.wav", "dub.mp4",
                                                          "silent.mp4"]


def test_mux_audio_reencodes_other_codecs(tmp_path):
    src = tmp_path / "src.avi"
    subprocess.run([video_io.ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i",
                    "testsrc2=size=64x48:rate=25", "-frames:v", "20", "-c:v", "mpeg4",
                    str(src)], check=True)
    out = tmp_path / "out.mp4"
    video_io.mux_audio(src, _tone(tmp_path / "a.wav", 0.3), out)
    info = video_io.probe(out)
    assert (info["video_codec"], info["pix_fmt"], info["n_frames"]) == ("h264", "yuv420p", 20)
    assert abs(info["audio_duration"] - info["video_duration"]) <= 1 / FPS


# --------------------------------------------------------------------------------- bad input


@pytest.fixture
def bad_files(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n")
    empty = tmp_path / "empty.mp4"
    empty.touch()
    wav = _tone(tmp_path / "speech.wav", 0.2)
    return dict(missing=tmp_path / "missing.mp4", text=text, empty=empty, audio=wav,
                folder=tmp_path)


@pytest.mark.parametrize("kind,message", [
    ("missing", "file not found"), ("text", "not a readable audio/video file"),
    ("empty", "file is empty"), ("audio", "no video stream"), ("folder", "not a regular file")])
@pytest.mark.parametrize("reader", [video_io.read_frames, video_io.read_first_frame])
def test_bad_video_inputs(bad_files, kind, message, reader):
    path = bad_files[kind]
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        reader(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_video_without_decodable_frames(tmp_path):
    good = tmp_path / "good.mp4"
    video_io.write_video(good, _frames(4), fps=FPS)
    data = bytearray(good.read_bytes())
    at = data.index(b"mdat")  # zero the whole coded payload
    size = int.from_bytes(data[at - 4:at], "big")
    data[at + 4:at - 4 + size] = bytes(size - 8)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="no decodable frames"):
        video_io.read_frames(broken)


def test_probe_and_mux_bad_inputs(bad_files, tmp_path):
    with pytest.raises(FileNotFoundError, match="file not found"):
        video_io.probe(bad_files["missing"])
    with pytest.raises(ValueError, match="not a readable"):
        video_io.probe(bad_files["text"])
    info = video_io.probe(bad_files["audio"])  # audio-only files probe fine
    assert info["video_codec"] is None and info["audio_sample_rate"] == 24000
    assert info["audio_duration"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="no video stream"):
        video_io.mux_audio(bad_files["audio"], bad_files["audio"], tmp_path / "o.mp4")
    good = tmp_path / "good.mp4"
    video_io.write_video(good, _frames(4), fps=FPS)
    with pytest.raises(ValueError, match="not a readable"):
        video_io.mux_audio(good, bad_files["text"], tmp_path / "o.mp4")
    assert not (tmp_path / "o.mp4").exists()


def test_write_video_rejects_bad_frames_and_audio_before_rendering(tmp_path, bad_files):
    consumed = []

    def frames():
        consumed.append(True)
        yield _frames(2)

    with pytest.raises(ValueError, match="not a readable"):
        video_io.write_video(tmp_path / "x.mp4", frames(), audio_path=bad_files["text"])
    assert not consumed  # the audio is checked before any frame is rendered
    with pytest.raises(ValueError, match="no frames"):
        video_io.write_video(tmp_path / "x.mp4", iter([]))
    with pytest.raises(ValueError, match="even"):
        video_io.write_video(tmp_path / "x.mp4", [np.zeros((3, 33, 32, 3), np.uint8)])
    with pytest.raises(ValueError, match="uint8"):
        video_io.write_video(tmp_path / "x.mp4", [np.zeros((3, 32, 32, 3), np.float32)])
    with pytest.raises(ValueError, match="frame size changed"):
        video_io.write_video(tmp_path / "x.mp4", [_frames(2), _frames(2, h=32)])
    assert not (tmp_path / "x.mp4").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_read_frames_grows_past_a_wrong_duration(tmp_path, monkeypatch):
    path = tmp_path / "v.mp4"
    video_io.write_video(path, _frames(30), fps=FPS)
    expected, _ = video_io.read_frames(path)
    real = video_io.media_info

    def no_duration(p):
        info = real(p)
        info["duration"] = None  # header says nothing: initial capacity is 8 frames
        return info

    monkeypatch.setattr(video_io, "media_info", no_duration)
    back, _ = video_io.read_frames(path)
    assert back.shape == (30, 48, 64, 3) and np.array_equal(back, expected)
