"""ASR for the WER / CER metric, through transformers only: Qwen3-ASR (the paper's) and Whisper-large-v3
(seed-tts-eval's English model).

    asr = load_asr("qwen3-asr", "/models/Qwen3-ASR-1.7B-hf", device="cuda")
    texts = asr.transcribe([wave_16k_float32, ...], "zh")   # one raw transcript per clip, batched

Whisper-large-v3 follows BytedanceSpeech/seed-tts-eval run_wer.py (commit 752f4297): WhisperProcessor
features at 16 kHz (padded / cut to 30 s), greedy `generate` with the language forced and task "transcribe"
(no timestamps), `batch_decode(skip_special_tokens=True)`. run_wer.py forces "english" and scores zh with
Paraformer instead (funasr, not supported here); with Whisper the manifest's language is forced. Batching
changes nothing for Whisper: every clip is padded to the same 30 s window. Before the processor, run_wer.py
resamples non-16 kHz files with scipy.signal.resample (FFT): `fft_resample_16k` does the same.

Qwen3-ASR uses transformers' `qwen3_asr` (Qwen3ASRForConditionalGeneration + Qwen3ASRProcessor, the "-hf"
checkpoints): `apply_transcription_request` forces the language by prefilling "language <Name><asr_text>",
greedy `generate`, and `decode(return_format="transcription_only")` (with the original library's repetition
fix). The qwen-asr package itself (pinned to an old transformers) is not used.

Nothing is downloaded: `path_or_repo` is a local folder, or a repo id already in the Hugging Face cache.
The raw transcripts go to evaluation.text, which applies seed-tts-eval's normalisation (and zhconv for zh).
"""
from __future__ import annotations

import os

import numpy as np
import torch

SAMPLE_RATE = 16000
BACKENDS = {"qwen3-asr": "qwen3_asr", "whisper-large-v3": "whisper"}  # CLI name -> config model_type
QWEN3_MAX_NEW_TOKENS = 256  # the qwen-asr examples' setting; clips here are at most a few tens of seconds


def fft_resample_16k(wave, sample_rate: int) -> np.ndarray:
    """run_wer.py's resampling before Whisper: scipy.signal.resample(wav, int(len(wav) * 16000 / sr)),
    float64 as soundfile read it, then float32 for the processor. 16 kHz input is returned as float32."""
    import scipy.signal

    wave = np.asarray(wave, dtype=np.float64)
    if int(sample_rate) != SAMPLE_RATE:
        wave = scipy.signal.resample(wave, int(len(wave) * SAMPLE_RATE / sample_rate))
    return wave.astype(np.float32)


def _waves_np(waves) -> list[np.ndarray]:
    out = []
    for i, wave in enumerate(waves):
        if isinstance(wave, torch.Tensor):
            wave = wave.detach().cpu().numpy()
        wave = np.asarray(wave, dtype=np.float32)
        if wave.ndim != 1 or wave.size == 0:
            raise ValueError(f"clip {i}: expected a non-empty 1-D 16 kHz waveform, got shape {wave.shape}")
        out.append(wave)
    return out


def _languages(lang, n: int) -> list[str]:
    langs = [lang] * n if isinstance(lang, str) else list(lang)
    if len(langs) != n:
        raise ValueError(f"got {len(langs)} languages for {n} clips")
    return langs


class _ASR:
    """Shared batching: `transcribe` splits the clips into batches of `batch_size` and keeps their order."""

    def __init__(self, model, processor, batch_size: int = 8, max_new_tokens: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.processor = processor
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def transcribe(self, waves, lang) -> list[str]:
        """Raw transcripts of 16 kHz mono float32 clips; `lang` ('en', 'zh', ...) one for all or one per clip."""
        waves = _waves_np(waves)
        langs = _languages(lang, len(waves))
        texts: list[str] = []
        for start in range(0, len(waves), self.batch_size):
            stop = start + self.batch_size
            texts += self._transcribe_batch(waves[start:stop], langs[start:stop])
        return texts

    def _transcribe_batch(self, waves: list[np.ndarray], langs: list[str]) -> list[str]:
        raise NotImplementedError


class WhisperASR(_ASR):
    def _transcribe_batch(self, waves, langs):
        # No attention mask, as run_wer.py: short-form generation sees the whole padded 30 s window.
        features = self.processor.feature_extractor(waves, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        input_features = features.input_features.to(self.device, self.dtype)
        extra = {} if self.max_new_tokens is None else {"max_new_tokens": self.max_new_tokens}
        language = langs[0] if len(set(langs)) == 1 else langs
        ids = self.model.generate(input_features, language=language, task="transcribe", do_sample=False, **extra)
        return list(self.processor.batch_decode(ids, skip_special_tokens=True))


class Qwen3ASR(_ASR):
    def build_inputs(self, waves, langs):
        """The processor's batch: chat prompt prefilled with "language <Name><asr_text>", left-padded."""
        inputs = self.processor.apply_transcription_request(audio=waves, language=langs)
        return inputs.to(self.device).to(self.dtype)

    def _transcribe_batch(self, waves, langs):
        inputs = self.build_inputs(waves, langs)
        max_new_tokens = self.max_new_tokens or QWEN3_MAX_NEW_TOKENS
        ids = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        generated = ids[:, inputs["input_ids"].shape[1]:]
        return list(self.processor.decode(generated, return_format="transcription_only"))


def load_asr(name: str, path_or_repo, device="cpu", dtype=torch.float32, batch_size: int = 8,
             max_new_tokens: int | None = None) -> _ASR:
    """The ASR backend `name` ('qwen3-asr' or 'whisper-large-v3') from a local folder or the hub cache.

    FileNotFoundError when the weights are not available offline; ValueError when the folder holds another
    model type. `max_new_tokens`: Whisper keeps its generation config's limit when None (448 for large-v3).
    """
    from transformers import AutoConfig

    if name not in BACKENDS:
        raise ValueError(f"unknown ASR backend {name!r}; expected one of {sorted(BACKENDS)}")
    source = os.fspath(path_or_repo)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{source}: {name} weights not found locally (a folder with config.json, or a "
                                f"repo in the Hugging Face cache; nothing is downloaded here): "
                                f"{str(err).splitlines()[0][:160]}") from None
    if config.model_type != BACKENDS[name]:
        raise ValueError(f"{source}: holds a {config.model_type!r} model, but {name} needs {BACKENDS[name]!r}")

    if name == "whisper-large-v3":
        from transformers import WhisperForConditionalGeneration as model_class
        from transformers import WhisperProcessor as processor_class
        wrapper = WhisperASR
    else:
        from transformers import Qwen3ASRForConditionalGeneration as model_class
        from transformers import Qwen3ASRProcessor as processor_class
        wrapper = Qwen3ASR
    processor = processor_class.from_pretrained(source, local_files_only=True)
    model = model_class.from_pretrained(source, local_files_only=True, dtype=dtype).to(device)
    return wrapper(model, processor, batch_size=batch_size, max_new_tokens=max_new_tokens)
