"""Audio front-end: file reading, resampling, Whisper log-mel, reference-audio preparation.

Reproduces the numbers of the reference front-end (torchaudio.load + torchaudio.transforms.Resample +
whisper.pad_or_trim / whisper.log_mel_spectrogram) with soundfile, torch and transformers only.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

from media.atomic import atomic_output
from common.constants import CODEC_SAMPLE_RATE, FPS, MAX_SECONDS, WHISPER_SAMPLE_RATE

WHISPER_SAMPLES = WHISPER_SAMPLE_RATE * MAX_SECONDS  # 480000: whisper.pad_or_trim length

# Peak below this (about -100 dBFS, under one 16-bit step) counts as silence.
_SILENCE_PEAK = 1e-5


# ---------------------------------------------------------------------------------------------
# Reading and writing files
# ---------------------------------------------------------------------------------------------

def audio_seconds(path) -> float:
    """Duration of an audio file from its header (nothing decoded); the errors of load_audio."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        info = sf.info(path)
    except Exception as err:  # noqa: BLE001 - libsndfile reports every format problem as its own error type
        detail = getattr(err, "error_string", None) or str(err).strip() or type(err).__name__
        raise ValueError(f"{path}: not a readable audio file ({detail.rstrip('.')})") from None
    return info.frames / info.samplerate


def load_audio(path, max_seconds: float | None = None) -> tuple[torch.Tensor, int]:
    """Read wav/flac/ogg/mp3 (anything libsndfile reads) -> (mono float32 1-D tensor, sample rate).

    Integer PCM is scaled to [-1, 1) as torchaudio.load does; channels are mixed by their mean.
    `max_seconds` reads only the start of long files. Raises FileNotFoundError for a missing file
    and ValueError naming the file for unreadable, empty, all-silent or non-finite audio.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: file not found")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not an audio file")
    try:
        frames = -1
        if max_seconds is not None:
            frames = math.ceil(max_seconds * sf.info(path).samplerate)
        samples_tc, sample_rate = sf.read(path, frames=frames, dtype="float32", always_2d=True)
    except Exception as err:  # libsndfile reports every format problem as its own error type
        detail = getattr(err, "error_string", None) or str(err).strip() or type(err).__name__
        raise ValueError(f"{path}: not a readable audio file ({detail.rstrip('.')})") from None
    if samples_tc.shape[0] == 0 or samples_tc.shape[1] == 0:
        raise ValueError(f"{path}: audio file holds no samples")
    wav_ct = torch.from_numpy(np.ascontiguousarray(samples_tc.T))
    wav = wav_ct.mean(dim=0) if wav_ct.shape[0] > 1 else wav_ct[0]
    if not torch.isfinite(wav).all():
        raise ValueError(f"{path}: audio contains NaN or infinite samples")
    if float(wav.abs().max()) < _SILENCE_PEAK:
        raise ValueError(f"{path}: audio is silent (peak amplitude {float(wav.abs().max()):.2g})")
    return wav.contiguous(), int(sample_rate)


def save_wav(path, wav, sr: int = CODEC_SAMPLE_RATE, subtype: str = "FLOAT", atomic: bool = True) -> None:
    """Write a mono waveform (atomic=False: `path` is already a temporary name, see atomic.py).

    subtype "FLOAT" (32-bit float WAV) is what torchaudio.save writes for a float32 tensor.
    """
    wav_1d = torch.as_tensor(wav).detach().float().cpu().reshape(-1).numpy()
    if atomic:
        with atomic_output(path) as tmp:
            sf.write(tmp, wav_1d, int(sr), subtype=subtype, format="WAV")
    else:
        sf.write(os.fspath(path), wav_1d, int(sr), subtype=subtype, format="WAV")


# ---------------------------------------------------------------------------------------------
# Resampling (torchaudio.transforms.Resample(orig, new) with its defaults)
# ---------------------------------------------------------------------------------------------

_LOWPASS_FILTER_WIDTH, _ROLLOFF = 6, 0.99  # torchaudio's sinc_interp_hann defaults


@functools.lru_cache(maxsize=16)
def _sinc_resample_kernel(orig: int, new: int, lowpass_filter_width: int = _LOWPASS_FILTER_WIDTH,
                          rolloff: float = _ROLLOFF):
    """Polyphase Hann-windowed sinc kernel (new, 1, 2*width + orig) for gcd-reduced rates.

    Row j is the filter producing output sample j of every block of `new` outputs; the kernel is
    applied with stride `orig`. Built in float64 and cast to float32, except for one detail kept
    for bit-level parity with the transform (dtype=None): the per-row phase j/new is an integer
    tensor divided in the default dtype (float32) before it meets the float64 tap positions.
    """
    base_freq = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base_freq)
    taps = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    phase = torch.arange(0, -new, -1)[:, None, None] / new  # int64 / int -> float32
    t = (phase + taps) * base_freq
    t = t.clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), t.sin() / t)
    kernel = sinc * (window * (base_freq / orig))
    return kernel.to(torch.float32), width


def sinc_kernel_in_dtype(orig: int, new: int, dtype: torch.dtype, device=None):
    """torchaudio's sinc_interp_hann kernel (new, 1, 2*width + orig) built in the waveform's dtype.

    Every step runs in `dtype` (Python-double scalars applied to the tensor), which is what
    functional.resample does; the float64-then-cast kernel of transforms.Resample differs by ~1e-6.
    """
    base = min(orig, new) * _ROLLOFF
    width = math.ceil(_LOWPASS_FILTER_WIDTH * orig / base)
    taps = torch.arange(-width, width + orig, dtype=dtype, device=device)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=dtype, device=device)[:, None, None] / new + taps
    t = (t * base).clamp(-_LOWPASS_FILTER_WIDTH, _LOWPASS_FILTER_WIDTH)
    window = torch.cos(t * math.pi / _LOWPASS_FILTER_WIDTH / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), t.sin() / t)
    return kernel * (window * (base / orig)), width


def resample(wav: torch.Tensor, orig_sr: int, new_sr: int, functional: bool = False) -> torch.Tensor:
    """Band-limited resampling of the last axis, same numbers as torchaudio's Resample(orig, new), or with
    functional=True as torchaudio.functional.resample (its kernel built in the waveform's dtype: ~1e-6 apart).

    Rates are reduced by their gcd to orig'/new'; the signal is padded by `width` on the left and
    `width + orig'` on the right, convolved with the (new', 1, K) kernel at stride orig' (each
    output channel is one polyphase branch), the branches interleaved, and the result cut to
    ceil(new' * T / orig') samples. Equal rates return the input unchanged.
    """
    orig_sr, new_sr = int(orig_sr), int(new_sr)
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {new_sr}")
    if orig_sr == new_sr:
        return wav
    gcd = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // gcd, new_sr // gcd
    if functional:
        kernel, width = sinc_kernel_in_dtype(orig, new, wav.dtype, wav.device)
    else:
        kernel, width = _sinc_resample_kernel(orig, new)
        kernel = kernel.to(device=wav.device, dtype=wav.dtype)

    lead_shape, length = wav.shape[:-1], wav.shape[-1]
    wav_n1t = wav.reshape(-1, 1, length)
    padded = F.pad(wav_n1t, (width, width + orig))
    branches_nct = F.conv1d(padded, kernel, stride=orig)  # (N, new, blocks)
    out = branches_nct.transpose(1, 2).reshape(wav_n1t.shape[0], -1)
    target_length = math.ceil(new * length / orig)
    return out[:, :target_length].reshape(*lead_shape, -1)


# ---------------------------------------------------------------------------------------------
# Whisper log-mel spectrogram
# ---------------------------------------------------------------------------------------------

def pad_or_trim(audio: torch.Tensor, length: int = WHISPER_SAMPLES) -> torch.Tensor:
    """Right-pad with zeros or cut the last axis to `length` samples (whisper.pad_or_trim)."""
    if audio.shape[-1] > length:
        return audio[..., :length]
    return F.pad(audio, (0, length - audio.shape[-1]))


@functools.lru_cache(maxsize=4)
def _whisper_feature_extractor(n_mels: int):
    from transformers import WhisperFeatureExtractor

    # Its filters are librosa's slaney mel filters, i.e. whisper's mel_filters.npz.
    return WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=WHISPER_SAMPLE_RATE,
                                   n_fft=400, hop_length=160, chunk_length=MAX_SECONDS)


def mel_filters(n_mels: int = 128) -> torch.Tensor:
    """(n_mels, 201) slaney-normalised mel filter bank of Whisper (float32)."""
    return torch.from_numpy(_whisper_feature_extractor(n_mels).mel_filters.T.astype(np.float32))


def log_mel_spectrogram(audio_16k: torch.Tensor, n_mels: int = 128) -> torch.Tensor:
    """Whisper's log-mel of a 1-D 16 kHz signal padded/trimmed to 30 s -> (n_mels, 3000) float32.

    STFT n_fft 400 / hop 160 / periodic Hann, power spectrum without the last frame, slaney mel
    filters, log10 clamped at 1e-10, floored at (global max - 8), then (x + 4) / 4. Computed by
    transformers' WhisperFeatureExtractor (torch path), which matches whisper.log_mel_spectrogram
    to ~2e-6 (see tests/test_audio.py).
    """
    audio_16k = torch.as_tensor(audio_16k)
    if audio_16k.dim() != 1:
        raise ValueError(f"log_mel_spectrogram expects a 1-D signal, got shape {tuple(audio_16k.shape)}")
    audio_np = pad_or_trim(audio_16k.detach().float().cpu()).numpy()
    features = _whisper_feature_extractor(n_mels)(
        audio_np, sampling_rate=WHISPER_SAMPLE_RATE, return_tensors="pt", device="cpu",
        return_attention_mask=False,
    )["input_features"]
    return features[0].to(device=audio_16k.device, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Reference audio for the model (infer.load_audio_and_get_mel)
# ---------------------------------------------------------------------------------------------

@dataclass
class ReferenceAudio:
    audio_16k: torch.Tensor      # (T16,) mono 16 kHz, at most max_seconds
    audio_24k: torch.Tensor      # (T24,) mono 24 kHz, at most max_seconds (WhisperX-VAE input)
    audio_16k_pad: torch.Tensor  # (480000,) audio_16k zero-padded to 30 s (speaker encoder input)
    mel: torch.Tensor            # (1, 1, 128, 3000) Whisper log-mel of audio_16k (WhisperX-VAE input)
    speech_len: int              # length in 25 Hz latent frames, in [1, 25 * max_seconds]
    duration_s: float            # len(audio_16k) / 16000
    source_sample_rate: int = 0  # sample rate of the file


def prepare_reference_audio(path, max_seconds: float = MAX_SECONDS) -> ReferenceAudio:
    """Load a reference voice clip the way the reference's load_audio_and_get_mel does."""
    if not 0 < max_seconds <= MAX_SECONDS:
        raise ValueError(f"max_seconds must be in (0, {MAX_SECONDS}], got {max_seconds}")
    # One extra second keeps the resampler's look-ahead past the cut identical to a full read.
    wav, sample_rate = load_audio(path, max_seconds=max_seconds + 1)
    return reference_audio(wav, sample_rate, max_seconds)


def reference_audio(wav: torch.Tensor, sample_rate: int, max_seconds: float = MAX_SECONDS) -> ReferenceAudio:
    """A loaded mono clip as the model's inputs: resampled to 16 and 24 kHz (skipped when already at that
    rate), both cut to max_seconds, speech_len = max(1, min(int(duration * 25), 25 * max_seconds))."""
    audio_16k = resample(wav, sample_rate, WHISPER_SAMPLE_RATE)
    audio_24k = resample(wav, sample_rate, CODEC_SAMPLE_RATE)
    audio_16k = audio_16k[: int(WHISPER_SAMPLE_RATE * max_seconds)]
    audio_24k = audio_24k[: int(CODEC_SAMPLE_RATE * max_seconds)]

    duration_s = audio_16k.shape[0] / WHISPER_SAMPLE_RATE
    speech_len = max(1, min(int(duration_s * FPS), int(FPS * max_seconds)))
    mel = log_mel_spectrogram(audio_16k)[None, None]
    return ReferenceAudio(
        audio_16k=audio_16k,
        audio_24k=audio_24k,
        audio_16k_pad=pad_or_trim(audio_16k),
        mel=mel,
        speech_len=speech_len,
        duration_s=duration_s,
        source_sample_rate=sample_rate,
    )
