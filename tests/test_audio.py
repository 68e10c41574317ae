"""Audio front-end: parity with torchaudio Resample / whisper log-mel fixtures, real and bad files."""
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from media import audio
from conftest import REFERENCE_SAMPLES, load_fixture, max_rel_err, shared

# Float32 parity: 1e-5 of the output's max magnitude (fixture README default; the reference's own
# 1- vs 2-thread spread is 0 for both fixtures). Measured here: resample <= 1.8e-7, log-mel <= 1.8e-6.
RESAMPLE_TOL = 1e-5
LOG_MEL_TOL = 1e-5

REFERENCE_WAV = REFERENCE_SAMPLES / "reference_audio.wav"


@pytest.fixture(scope="module")
def resample_fixture():
    return load_fixture("av", "resample")


@pytest.fixture(scope="module")
def log_mel_fixture():
    return load_fixture("av", "log_mel")


# ---- resampling ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["44100_16000", "44100_24000", "48000_16000", "22050_24000",
                                  "16000_24000", "8000_16000"])
def test_resample_matches_torchaudio(resample_fixture, case):
    tensors, meta = resample_fixture
    info = next(c for c in meta["cases"] if c["key"] == case)
    x, expected = tensors[f"input.{case}"], tensors[f"output.{case}"]
    y = audio.resample(x, info["orig_freq"], info["new_freq"])
    assert y.dtype == torch.float32 and list(y.shape) == info["output_shape"]
    assert max_rel_err(y, expected) <= RESAMPLE_TOL

    kernel, width = audio._sinc_resample_kernel(info["orig_freq"] // info["gcd"], info["new_freq"] // info["gcd"])
    assert list(kernel.shape) == info["kernel_shape"] and width == info["width"]


def test_resample_batch_and_identity(resample_fixture):
    tensors, _ = resample_fixture
    x = tensors["input.22050_24000"]
    batch = torch.cat([x, -0.5 * x])[:, None]  # (2, 1, T): leading dims are kept
    y = audio.resample(batch, 22050, 24000)
    assert y.shape == (2, 1, 36000)
    assert torch.equal(y[0], audio.resample(x, 22050, 24000))
    assert audio.resample(x, 16000, 16000) is x
    with pytest.raises(ValueError):
        audio.resample(x, 0, 16000)


# ---- log-mel ------------------------------------------------------------------------------------

def test_mel_filters_match_whisper_assets(log_mel_fixture):
    tensors, _ = log_mel_fixture
    expected = tensors["aux.mel_filters_128"]
    assert audio.mel_filters(128).shape == (128, 201)
    assert (audio.mel_filters(128) - expected).abs().max() <= 1e-7  # measured 3.7e-9


@pytest.mark.parametrize("clip", ["clip0", "clip1"])
def test_log_mel_matches_whisper(log_mel_fixture, clip):
    tensors, _ = log_mel_fixture
    mel = audio.log_mel_spectrogram(tensors[f"input.{clip}"], n_mels=128)
    assert mel.shape == (128, 3000) and mel.dtype == torch.float32
    assert max_rel_err(mel, tensors[f"output.{clip}"]) <= LOG_MEL_TOL


def test_log_mel_trims_to_30_seconds(log_mel_fixture):
    tensors, _ = log_mel_fixture
    clip = tensors["input.clip1"]
    long = torch.cat([clip.repeat(5), torch.ones(1000)])  # 35 s + a tail that must be cut off
    assert long.shape[0] > audio.WHISPER_SAMPLES
    assert torch.equal(audio.log_mel_spectrogram(long), audio.log_mel_spectrogram(long[: audio.WHISPER_SAMPLES]))
    with pytest.raises(ValueError):
        audio.log_mel_spectrogram(clip[None])


# ---- reference audio ----------------------------------------------------------------------------

def _check_reference(ref, n16, n24, sr):
    assert ref.audio_16k.shape == (n16,) and ref.audio_24k.shape == (n24,)
    assert ref.audio_16k_pad.shape == (audio.WHISPER_SAMPLES,)
    assert torch.equal(ref.audio_16k_pad[:n16], ref.audio_16k[: audio.WHISPER_SAMPLES])
    assert ref.mel.shape == (1, 1, 128, 3000) and torch.isfinite(ref.mel).all()
    assert ref.duration_s == pytest.approx(min(n16, audio.WHISPER_SAMPLES) / 16000)
    assert ref.speech_len == max(1, min(int(ref.duration_s * 25), 750))
    assert ref.source_sample_rate == sr
    for t in (ref.audio_16k, ref.audio_24k, ref.audio_16k_pad, ref.mel):
        assert t.dtype == torch.float32


def test_prepare_reference_sample():
    ref = audio.prepare_reference_audio(shared(REFERENCE_WAV))
    # 24 kHz file, 120001 samples: 16 kHz copy has ceil(120001 * 2 / 3) = 80001 samples.
    _check_reference(ref, 80001, 120001, 24000)
    assert ref.speech_len == 125 and ref.duration_s == pytest.approx(5.0000625)
    raw_int16, _ = sf.read(str(shared(REFERENCE_WAV)), dtype="int16")
    assert torch.equal(ref.audio_24k, torch.from_numpy(raw_int16.astype(np.float32) / 32768.0))
    assert torch.equal(ref.audio_16k, audio.resample(ref.audio_24k, 24000, 16000))
    assert torch.equal(ref.mel[0, 0], audio.log_mel_spectrogram(ref.audio_16k))
    assert 0.9 < float(ref.mel.max()) < 2.0  # Whisper log-mel range after (x + 4) / 4


def _tone(sr, seconds, channels=1, seed=0):
    t = np.arange(round(sr * seconds)) / sr
    rng = np.random.default_rng(seed)
    cols = [0.4 * np.sin(2 * np.pi * (180 + 40 * c) * t) + 0.02 * rng.standard_normal(t.size) for c in range(channels)]
    return np.stack(cols, axis=1).astype(np.float32)


@pytest.mark.parametrize("ext,fmt,subtype,sr,channels,seconds", [
    ("flac", "FLAC", "PCM_16", 44100, 2, 1.3),
    ("ogg", "OGG", "VORBIS", 8000, 1, 2.0),
    ("wav", "WAV", "PCM_16", 48000, 2, 0.5),
    ("mp3", "MP3", "MPEG_LAYER_III", 22050, 1, 1.0),
    ("wav", "WAV", "FLOAT", 16000, 1, 31.0),  # longer than 30 s: trimmed
])
def test_prepare_written_files(tmp_path, ext, fmt, subtype, sr, channels, seconds):
    data = _tone(sr, seconds, channels)
    path = tmp_path / f"voice.{ext}"
    try:
        sf.write(str(path), data, sr, format=fmt, subtype=subtype)
    except (sf.LibsndfileError, ValueError, TypeError) as err:  # libsndfile built without this codec
        pytest.skip(f"soundfile cannot write {fmt}/{subtype}: {err}")
    wav, rate = audio.load_audio(path)
    assert rate == sr and wav.dim() == 1 and wav.dtype == torch.float32
    if fmt in ("FLAC", "WAV"):  # lossless: mono = channel mean of the stored samples
        stored = sf.read(str(path), dtype="float32", always_2d=True)[0]
        assert wav.shape[0] == data.shape[0]
        assert torch.allclose(wav, torch.from_numpy(stored).mean(dim=1), atol=1e-7)
        assert (wav - torch.from_numpy(data).mean(dim=1)).abs().max() < 2e-4

    ref = audio.prepare_reference_audio(path)
    n = wav.shape[0]
    n16 = min(-(-n * 16000 // sr), audio.WHISPER_SAMPLES)
    n24 = min(-(-n * 24000 // sr), 24000 * 30)
    _check_reference(ref, n16, n24, sr)
    if seconds > 30:  # only the first 31 s are read; the kept 30 s equal a full read's
        assert ref.speech_len == 750 and ref.duration_s == 30.0
        assert torch.equal(ref.audio_24k, audio.resample(wav, sr, 24000)[: 24000 * 30])


def test_max_seconds_argument():
    ref = audio.prepare_reference_audio(shared(REFERENCE_WAV), max_seconds=2)
    assert ref.audio_16k.shape == (32000,) and ref.audio_24k.shape == (48000,)
    assert ref.speech_len == 50 and ref.audio_16k_pad.shape == (audio.WHISPER_SAMPLES,)
    with pytest.raises(ValueError):
        audio.prepare_reference_audio(REFERENCE_WAV, max_seconds=31)


# ---- bad inputs ---------------------------------------------------------------------------------

def _expect_value_error(path, fragment):
    with pytest.raises(ValueError) as info:
        audio.prepare_reference_audio(path)
    message = str(info.value)
    assert message.startswith(f"{path}:") and fragment in message and "\n" not in message


def test_bad_audio_files(tmp_path):
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n" * 20)
    _expect_value_error(text, "not a readable audio file")

    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    _expect_value_error(empty, "not a readable audio file")

    no_frames = tmp_path / "no_frames.wav"
    sf.write(str(no_frames), np.zeros((0, 1), np.float32), 16000, subtype="PCM_16")
    _expect_value_error(no_frames, "no samples")

    silent = tmp_path / "silent.flac"
    sf.write(str(silent), np.zeros((16000, 2), np.float32), 16000, subtype="PCM_16")
    _expect_value_error(silent, "silent")

    nan = tmp_path / "nan.wav"
    data = _tone(16000, 0.5)
    data[100] = np.nan
    sf.write(str(nan), data, 16000, subtype="FLOAT")
    _expect_value_error(nan, "NaN")

    _expect_value_error(tmp_path, "directory")
    with pytest.raises(FileNotFoundError):
        audio.prepare_reference_audio(tmp_path / "missing.wav")


def test_save_wav_atomic(tmp_path):
    wav = torch.from_numpy(_tone(24000, 0.4)[:, 0])
    out = tmp_path / "sub" / "speech.wav"
    audio.save_wav(out, wav[None, None])  # (1, 1, T) as decode returns it
    back, sr = sf.read(str(out), dtype="float32")
    assert sr == 24000 and sf.info(str(out)).subtype == "FLOAT"
    assert torch.equal(torch.from_numpy(back), wav)
    assert sorted(os.listdir(out.parent)) == ["speech.wav"]  # no temp file left behind
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not the 0600 of the temp file

    audio.save_wav(out, wav, sr=16000, subtype="PCM_16")  # overwrite in place
    assert sf.info(str(out)).samplerate == 16000 and sf.info(str(out)).subtype == "PCM_16"
    assert sorted(os.listdir(out.parent)) == ["speech.wav"]
