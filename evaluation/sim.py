"""Speaker similarity (SIM) as seed-tts-eval computes it: cosine of WavLM-Large ECAPA-TDNN embeddings.

Reproduces BytedanceSpeech/seed-tts-eval (commit 752f4297f090c46bb1a55a1f7439e5944ddefe8d), cal_sim.sh ->
thirdparty/UniSpeech/downstreams/speaker_verification/verification_pair_list_v2.py -> verification.py
(`verification`) -> average.py, from the facts of shared/fixtures/eval/README_utmos_wer.md (`sim_protocol`).

    wav1 = the generated clip, wav2 = the PROMPT audio (the speaker reference, not the ground truth)
    each: native rate, float32, channel 0 -> Resample(sr, 16000) -> whole clip -> encoder (batch of one)
      -> emb (1, 256) (no L2 normalisation) ;  SIM = F.cosine_similarity(emb1, emb2, eps=1e-8) in [-1, 1]
    corpus: ASV = round(mean(SIM), 3), ASV-var = round(population variance, 3)

The encoder is the repository's `speaker_verification` package (ECAPA_TDNN_SMALL(feat_dim=1024,
feat_type='wavlm_large') with wavlm_large_finetune.pth), the same network the generator conditions on.
Resampling is audio.resample, which gives the numbers of torchaudio.transforms.Resample (the transform's
dtype=None kernel, mostly float64 then cast to float32), the call verification.py makes.

Clips are embedded one at a time, as the reference does: WavLM's group-normalised conv front-end, the
instance norm and the attentive pooling all see the whole (unpadded) clip, so padding a batch would
change the embeddings.
"""
from __future__ import annotations

import os

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

from media.audio import resample

SAMPLE_RATE = 16000
COSINE_EPS = 1e-8  # F.cosine_similarity's default
DIGITS = 3  # average.py rounds ASV and ASV-var to 3 decimals


def load_encoder(checkpoint, wavlm_checkpoint=None, device="cpu"):
    """The WavLM-Large ECAPA-TDNN speaker encoder from wavlm_large_finetune.pth, in eval mode.

    Strict, weights-only loading (speaker_verification.init_model): FileNotFoundError for a missing file,
    ValueError naming the file for a checkpoint that does not fit.
    """
    import speaker_verification

    if checkpoint is None or not os.path.isfile(os.fspath(checkpoint)):
        raise FileNotFoundError(f"{checkpoint}: speaker encoder checkpoint (wavlm_large_finetune.pth) not found")
    encoder = speaker_verification.init_model("wavlm_large", checkpoint, wavlm_checkpoint=wavlm_checkpoint)
    return encoder.to(device).eval()


def load_wav(path) -> tuple[np.ndarray, int]:
    """librosa.load(path, sr=None, mono=False) without librosa: (float32 array, native rate).

    Mono files give (T,), multi-channel files (channels, T), the layout verification.py indexes.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: audio file not found")
    samples, sample_rate = sf.read(path, dtype="float32", always_2d=False)
    if samples.size == 0:
        raise ValueError(f"{path}: audio file holds no samples")
    return np.ascontiguousarray(samples.T), int(sample_rate)


def _channel0_1t(wav) -> torch.Tensor:
    """(T,) or (channels, T) -> (1, T) float32, channel 0.

    verification.py takes channel 0 of the prompt (wav2[0, :]) but reduces a multi-channel generated clip
    with wav1[:, 0], which on librosa's (channels, T) array is the first SAMPLE of each channel (a reference
    bug that only multi-channel generated files hit). Channel 0 is used for both here.
    """
    wav = torch.as_tensor(wav)
    if wav.dim() == 2:
        wav = wav[0]
    if wav.dim() != 1 or wav.shape[0] == 0:
        raise ValueError(f"expected a (T,) or (channels, T) waveform, got shape {tuple(wav.shape)}")
    return wav.float()[None]


@torch.no_grad()
def embed(encoder, wav, sample_rate: int) -> torch.Tensor:
    """Speaker embedding (1, emb_dim) of one clip at its native rate (channel 0, resampled to 16 kHz)."""
    encoder.eval()
    wav_1t = resample(_channel0_1t(wav), int(sample_rate), SAMPLE_RATE)
    device = next(encoder.parameters()).device
    return encoder(wav_1t.to(device)).float().cpu()


def cosine(emb1: torch.Tensor, emb2: torch.Tensor) -> torch.Tensor:
    """F.cosine_similarity over the last axis (eps 1e-8): (..., D), (..., D) -> (...), raw in [-1, 1]."""
    return F.cosine_similarity(emb1, emb2, dim=-1, eps=COSINE_EPS)


def speaker_similarity(encoder, wav_generated, sr1: int, wav_prompt, sr2: int) -> float:
    """SIM of one pair: cosine of the embeddings of the generated clip and the prompt audio."""
    return float(cosine(embed(encoder, wav_generated, sr1), embed(encoder, wav_prompt, sr2)).item())


def aggregate(sims, ndigits: int | None = DIGITS) -> tuple[float, float]:
    """average.py: (mean, population variance) of the per-pair SIMs, each rounded to `ndigits`
    (None: unrounded). Pairs that failed are simply absent from `sims`."""
    values = np.asarray(list(sims), dtype=np.float64)
    if values.size == 0:
        raise ValueError("no speaker-similarity scores to aggregate (every pair was skipped?)")
    mean, var = np.mean(values), np.var(values)
    if ndigits is None:
        return float(mean), float(var)
    return float(round(mean, ndigits)), float(round(var, ndigits))  # numpy's rounding, as average.py
