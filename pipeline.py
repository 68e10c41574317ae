"""TalkerPipeline: every model of Talker-T2AV in one object, and the four generation modes.

    from pipeline import TalkerPipeline
    pipe = TalkerPipeline.from_pretrained()          # weights via weights.locate (flags / env vars / hub cache)
    # pipe = TalkerPipeline.demo()                   # tiny random models, offline
    result = pipe.generate(mode="t2av", text="Hello there.", output="out.mp4")
    result.audio_24k, result.motion_raw, result.video_path, result.wav_path

Modes (all run the released inference loop of SpeechLLM.generate):
- t2av: text -> speech + motion; the reference clip (ref audio + ref motion) is the prompt.
- a2v:  the latents of `audio` are fed as the speech half of every token; only the motion head samples.
- v2a:  the motion of `video` (or `motion`) is fed as the motion half of every token; only the speech head
        samples; the output is the input video's frames with the new speech.
- tts:  speech only (task tag 0, motion_pad_emb), a wav.
"""
from __future__ import annotations

import math
import os
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import audio as audio_io
import video_io
from motion_stats import MOTION_DIM, denormalize_motion, normalize_motion

REPO_ROOT = Path(__file__).resolve().parent
SAMPLES = REPO_ROOT / "samples"
DEFAULT_TEXT_FILE = SAMPLES / "default_text.txt"
DEFAULT_REF_AUDIO = SAMPLES / "reference_voice.wav"
DEFAULT_REF_VIDEO = SAMPLES / "reference_face.mp4"

MODES = ("t2av", "a2v", "v2a", "tts")
FPS = 25  # latent and video frame rate of the model
SAMPLE_RATE = 24000
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 960
MAX_SECONDS = 30
MAX_FRAMES = FPS * MAX_SECONDS  # 750: the reference's FIXED_MOTION_LEN
MIN_SECONDS = 0.1  # shorter clips give fewer than a few latent frames

RANDOM_WEIGHTS_BANNER = ("*** DEMO: tiny RANDOMLY INITIALISED models: the output is noise-like speech and a "
                         "garbled face, NOT Talker-T2AV quality. Use real weights for real results. ***")


@dataclass
class GenerationResult:
    mode: str
    text: str
    seed: int
    audio_24k: torch.Tensor  # (T,) float32 waveform written to the wav (a2v: the input audio)
    speech_latents: torch.Tensor  # (F, 32) latents the waveform decodes from (prefix + generated; a2v: input)
    motion_raw: Optional[torch.Tensor]  # (T_video, 40) raw LIA-X motion of the output video (None for tts)
    generated_motion_norm: Optional[torch.Tensor]  # (frames, 40) what the motion head sampled (normalised)
    n_patches: int
    stopped_by: str
    sample_rate: int = SAMPLE_RATE
    fps: int = FPS
    prefix_frames: int = 0  # leading output frames that replay the reference clip (t2av/tts)
    video_path: Optional[str] = None
    wav_path: Optional[str] = None
    latents_path: Optional[str] = None
    timings: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)

    @property
    def audio_seconds(self) -> float:
        return self.audio_24k.numel() / self.sample_rate

    @property
    def n_frames(self) -> int:
        return 0 if self.motion_raw is None else int(self.motion_raw.shape[0])

    def summary(self) -> str:
        t = self.timings
        parts = [f"{k} {t[k]:.1f}s" for k in ("load", "inputs", "generate", "decode", "render") if k in t]
        video = f", {self.n_frames} frames ({self.n_frames / self.fps:.2f} s video)" if self.n_frames else ""
        return (f"[talker] {self.mode}: {self.audio_seconds:.2f} s audio{video}; {self.n_patches} patches "
                f"({self.stopped_by}); " + " · ".join(parts) + f" · total {sum(t.values()):.1f}s")


# ------------------------------------------------------------------------------------------ input checks

def _bad(where, problem) -> ValueError:
    return ValueError(f"{where}: {problem}")


def load_motion_file(path) -> torch.Tensor:
    """A reference-format motion file (torch.save of a (T, 40) tensor of raw LIA-X motion) -> (T, 40) float32."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such motion file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a motion file"
        raise _bad(path, f"not a motion file (torch.load weights_only=True failed: {type(e).__name__})") from None
    if not isinstance(obj, torch.Tensor):
        raise _bad(path, f"expected a (frames, {MOTION_DIM}) tensor, found a {type(obj).__name__}")
    if obj.dim() != 2 or obj.shape[1] != MOTION_DIM or obj.shape[0] == 0:
        raise _bad(path, f"expected a (frames, {MOTION_DIM}) motion tensor, got shape {tuple(obj.shape)}")
    if not obj.is_floating_point():
        raise _bad(path, f"motion must be floating point, got {obj.dtype}")
    motion = obj.detach().float()
    if not torch.isfinite(motion).all():
        raise _bad(path, "motion contains NaN or infinite values")
    return motion


def _load_audio_checked(path, what: str):
    """prepare_reference_audio, refusing clips over 30 s (the model's length limit)."""
    wav, sr = audio_io.load_audio(path)
    seconds = wav.numel() / sr
    if seconds < MIN_SECONDS:
        raise _bad(path, f"{what} is {seconds * 1000:.0f} ms long; at least {MIN_SECONDS * 1000:.0f} ms is needed")
    if seconds > MAX_SECONDS + 1e-3:
        raise _bad(path, f"{what} is {seconds:.1f} s long; at most {MAX_SECONDS} s is supported (trim it, "
                         f"e.g. ffmpeg -i IN -t {MAX_SECONDS} OUT.wav)")
    return audio_io.prepare_reference_audio(path)


def _resample_indices(n_frames: int, fps_in: float) -> np.ndarray:
    """Indices of the source frames nearest to a 25 fps timeline covering the same duration."""
    if abs(fps_in - FPS) < 1e-3:
        return np.arange(n_frames)
    n_out = max(1, int(round(n_frames * FPS / fps_in)))
    return np.minimum((np.arange(n_out) * fps_in / FPS + 1e-6).astype(np.int64), n_frames - 1)


def _output_paths(output, mode: str):
    """(mp4 or None, wav, base) for an --output path; tts writes only the wav."""
    out = Path(os.path.expanduser(os.fspath(output)))
    ext = out.suffix.lower()
    if ext not in ("", ".mp4", ".wav"):
        raise _bad(output, "--output must end in .mp4 (or .wav for --mode tts)")
    if out.exists() and out.is_dir():
        raise _bad(output, "--output is a directory")
    base = out.with_suffix("") if ext else out
    mp4 = None if mode == "tts" else str(base) + ".mp4"
    return mp4, str(base) + ".wav", str(base)


def _tmp_beside(path: str, suffix: str) -> str:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return str(p.parent / f".{p.name}.{secrets.token_hex(4)}.tmp{suffix}")


def _progress_bar(total, desc, unit, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True)


@contextmanager
def _timed(timings: dict, key: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


# ------------------------------------------------------------------------------------------ demo tokenizer

_DEMO_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def demo_tokenizer(model_max_length: int = 1000):
    """Offline byte-level tokenizer (263 ids) with Qwen3's chat markup and the patch placeholder tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<think>", "</think>", "<SPEECH_FRAME>", "<MOTION_FRAME>"],
        chat_template=_DEMO_CHAT_TEMPLATE, model_max_length=model_max_length, padding_side="right")


def _tokenizer_for(checkpoint_dir, llm_name, model_max_length):
    """The checkpoint folder's tokenizer, else --llm-name's (local path or hub cache only)."""
    from speech_llm import load_tokenizer

    folder = Path(checkpoint_dir)
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        return load_tokenizer(folder, model_max_length=model_max_length)
    if llm_name:
        from transformers import AutoTokenizer

        from speech_llm import MOTION_TOKEN, SPEECH_TOKEN
        try:  # local folder or hub cache only: nothing is downloaded at run time
            tokenizer = AutoTokenizer.from_pretrained(llm_name, model_max_length=model_max_length,
                                                      padding_side="right", local_files_only=True)
        except Exception:  # noqa: BLE001 - reported below with the ways forward
            tokenizer = None
        if tokenizer is not None:
            if SPEECH_TOKEN not in tokenizer.get_vocab():
                tokenizer.add_special_tokens({"additional_special_tokens": [SPEECH_TOKEN, MOTION_TOKEN]})
            return tokenizer
    raise FileNotFoundError(f"{folder}: no tokenizer files (tokenizer.json) in the checkpoint folder and "
                            f"--llm-name {llm_name!r} is not available offline")


# ------------------------------------------------------------------------------------------ pipeline

class TalkerPipeline:
    def __init__(self, speech_llm, tokenizer, whisperx_vae, speaker_encoder, generator=None, *,
                 liax_ckpt=None, device="cpu", render_dtype=torch.float32, render_batch_size=None,
                 is_demo=False):
        self.llm = speech_llm
        self.tokenizer = tokenizer
        self.vae = whisperx_vae
        self.speaker_encoder = speaker_encoder
        self._generator = generator
        self.liax_ckpt = liax_ckpt
        self.device = torch.device(device)
        self.render_dtype = render_dtype
        self.render_batch_size = render_batch_size
        self.is_demo = is_demo
        self.load_seconds = 0.0

    # -------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, checkpoint_dir=None, whisperx_vae_ckpt=None, liax_ckpt=None, wavlm_ckpt=None, *,
                        wavlm_backbone_ckpt=None, llm_name: Optional[str] = "Qwen/Qwen3-0.6B", device=None,
                        dtype=None, render_dtype=torch.float32, render_batch_size=None, needs=None,
                        download=False, wavlm_repo=None, wavlm_filename=None) -> "TalkerPipeline":
        """Load the released weights. Paths default to weights.locate() (env vars CHECKPOINT_DIR,
        WHISPERVAE_CKPT, LIAX_CKPT, WAVLM_CKPT, then the hub cache); download=True fetches what is missing.

        dtype: backbone dtype (None: bfloat16 on CUDA as the reference, float32 on CPU). LIA-X (3.6 GB) is
        loaded on first use, so a TTS-only session never reads it. `needs`: components to require now."""
        import speaker_verification
        import weights
        import whisperx_vae
        from speech_llm import SpeechLLM

        t0 = time.perf_counter()
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype in (torch.bfloat16, torch.float16) and device.type != "cuda":
            raise ValueError(f"--dtype {str(dtype).replace('torch.', '')}: reduced-precision backbone needs CUDA "
                             "(on CPU the model runs in float32)")
        extra = {}
        if wavlm_repo:
            extra["wavlm_repo"] = wavlm_repo
        if wavlm_filename:
            extra["wavlm_filename"] = wavlm_filename
        paths = weights.locate(checkpoint_dir, whisperx_vae_ckpt, liax_ckpt, wavlm_ckpt, **extra)
        needs = tuple(needs or weights.COMPONENTS)
        if download and paths.missing(needs):
            paths = weights.download(needs, paths, **extra)
        paths.require(needs)

        llm = SpeechLLM.from_pretrained(paths.checkpoint_dir, device=device, llm_dtype=dtype)
        tokenizer = _tokenizer_for(paths.checkpoint_dir, llm_name, llm.model_args.model_max_length)
        vae = whisperx_vae.load_whisperx_vae(paths.whisperx_vae, device=device)
        spk = speaker_verification.init_model("wavlm_large", paths.wavlm, wavlm_checkpoint=wavlm_backbone_ckpt)
        pipe = cls(llm, tokenizer, vae, spk.to(device).eval(), None, liax_ckpt=paths.liax, device=device,
                   render_dtype=render_dtype, render_batch_size=render_batch_size)
        pipe.load_seconds = time.perf_counter() - t0
        return pipe

    @classmethod
    def demo(cls, device="cpu", seed: int = 0, render_dtype=torch.float32, render_batch_size=None,
             verbose: bool = True) -> "TalkerPipeline":
        """Tiny randomly initialised models (fixed seeds), built in memory: the full product path, offline."""
        import lia_x
        import speaker_verification
        import whisperx_vae
        from speech_llm import SpeechLLM, tiny_model_args_and_config

        t0 = time.perf_counter()
        if verbose:
            print(RANDOM_WEIGHTS_BANNER, flush=True)
        args, config = tiny_model_args_and_config()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            llm = SpeechLLM(args, config).eval()
            torch.manual_seed(seed + 1)
            vae = whisperx_vae.WhisperXVAE(whisperx_vae.tiny_cfg(), whisperx_vae.tiny_whisper_dims()).eval()
        spk = speaker_verification.tiny_speaker_encoder(seed + 2)
        gen = lia_x.tiny_generator(seed + 3)
        if render_dtype != torch.float32:
            lia_x.cast_conv_weights(gen, render_dtype)
        device = torch.device(device)
        pipe = cls(llm.to(device), demo_tokenizer(args.model_max_length), vae.to(device), spk.to(device),
                   gen.to(device), device=device, render_dtype=render_dtype, render_batch_size=render_batch_size,
                   is_demo=True)
        pipe.load_seconds = time.perf_counter() - t0
        return pipe

    @property
    def generator(self):
        """LIA-X generator, loaded from `liax_ckpt` on first use."""
        if self._generator is None:
            if self.liax_ckpt is None:
                import weights

                raise weights.MissingWeightsError(weights.missing_message(["liax"]))
            import lia_x

            t0 = time.perf_counter()
            self._generator = lia_x.load_generator(self.liax_ckpt, device=self.device, dtype=self.render_dtype)
            self.load_seconds += time.perf_counter() - t0
        return self._generator

    @property
    def patch_size(self) -> int:
        return self.llm.patch_size

    # -------------------------------------------------------------- encoders
    @torch.no_grad()
    def encode_audio(self, ref: "audio_io.ReferenceAudio"):
        """(latents (speech_len, 32), speaker embedding (1, 256)) as the reference's get_speech_embeddings /
        get_speaker_embeddings compute them (both cut to speech_len frames)."""
        n = ref.speech_len
        wav_24k = ref.audio_24k[: n * SAMPLES_PER_FRAME][None, None].to(self.device)
        latents = self.vae.encode(wav_24k, ref.mel.to(self.device), return_layout="btc")[0].float()
        wav_16k = ref.audio_16k_pad[: int(n * 16000 / FPS)][None].to(self.device)
        speaker = self.speaker_encoder(wav_16k).float()
        return latents, speaker

    @torch.no_grad()
    def extract_motion(self, frames_u8, progress=True, desc="motion") -> torch.Tensor:
        """(T, H, W, 3) uint8 RGB -> (T, 40) raw LIA-X motion (the LIA-X encoder on every frame)."""
        from lia_x import render as liax_render

        bar = _progress_bar(len(frames_u8), desc, "frame", progress)
        try:
            return liax_render.extract_motion(self.generator, frames_u8, progress=lambda n: bar.update(n - bar.n))
        finally:
            bar.close()

    def reference_motion(self, ref_motion=None, ref_video=None, n_needed: int = 1, progress=True) -> torch.Tensor:
        """(T, 40) raw motion of the reference clip, T <= 750.

        From `ref_motion` (a .pt file) when given, else extracted from `ref_video` with the LIA-X encoder.
        The inference loop reads only the first max(1, prefix) rows (the first is the motion head's global
        condition, the rest the prompt prefix); the clip length only sets the length cap. So only those rows
        are extracted and the rest repeat the last one (a full-scale encoder pass costs seconds per frame on CPU).
        """
        if ref_motion is not None:
            return load_motion_file(ref_motion)[:MAX_FRAMES]
        info = video_io.probe(ref_video)
        if not info.get("n_frames"):
            raise _bad(ref_video, "video has no frames")
        n_total = len(_resample_indices(int(info["n_frames"]), float(info.get("fps") or FPS)))
        n_total = min(n_total, MAX_FRAMES)
        n_read = max(1, min(n_needed, n_total))
        fps_src = float(info.get("fps") or FPS)
        frames, fps_in = video_io.read_frames(ref_video, max_frames=int(math.ceil(n_read * max(fps_src, FPS) / FPS)) + 1)
        frames = frames[_resample_indices(len(frames), fps_in)][:n_read]
        motion = self.extract_motion(frames, progress=progress, desc="reference motion")
        if motion.shape[0] < n_total:
            motion = torch.cat([motion, motion[-1:].expand(n_total - motion.shape[0], -1)])
        return motion

    # -------------------------------------------------------------- prompt
    def prompt(self, text: str, speech_frames: int, motion_frames: int, where="--text"):
        from speech_llm import build_chat_and_spans

        max_len = int(self.llm.model_args.model_max_length)
        kw = dict(patch_size=self.patch_size, text=text, delay=self.llm.delay)
        ids, _, span = build_chat_and_spans(self.tokenizer, 10 ** 9, speech_frames, motion_frames, **kw)
        if ids.shape[1] > max_len:
            n_text = ids.shape[1] - int(span[1] - span[0])
            raise _bad(where, f"text too long for the length cap: the prompt needs {ids.shape[1]} tokens "
                              f"({n_text} for the text and chat markup + {int(span[1] - span[0])} patch "
                              f"placeholders), the model takes at most {max_len}")
        return ids, int(span[0])

    # -------------------------------------------------------------- generation
    def generate(self, mode: str = "t2av", text: Optional[str] = None, ref_audio=None, ref_video=None,
                 ref_motion=None, audio=None, video=None, motion=None, *, seed: Optional[int] = 0,
                 cfm_steps: int = 10, cfm_temperature: float = 0.3, cfm_cfg: float = 2.0,
                 gt_prefix_seconds: float = 0.5, fps: int = FPS, output=None, save_latents: bool = False,
                 trim_prefix: bool = False, max_seconds: Optional[float] = None,
                 progress: bool = True) -> GenerationResult:
        """Run one request. Inputs default to the bundled samples (text: samples/default_text.txt, except
        a2v whose text defaults to "" = no transcript). With `output`, writes the mp4 (not for tts) and the
        wav beside it, all-or-nothing; `save_latents` adds <output>.latents.safetensors.

        max_seconds (t2av/tts): cap on the generated length. Default: the released cap, the reference
        clip's length (minus the prefix) + 15 patches (0.6 s)."""
        if mode not in MODES:
            raise _bad("--mode", f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
        if int(fps) != FPS:
            raise _bad("--fps", f"the model works at {FPS} frames per second; {fps} is not supported")
        if int(cfm_steps) < 1:
            raise _bad("--cfm-steps", f"must be >= 1, got {cfm_steps}")
        if cfm_temperature < 0 or cfm_cfg < 0 or not 0 <= gt_prefix_seconds <= MAX_SECONDS:
            raise _bad("sampling", "--cfm-temperature and --cfm-cfg must be >= 0 and --gt-prefix-seconds "
                                   f"in [0, {MAX_SECONDS}]")
        if max_seconds is not None and not 0 < max_seconds <= MAX_SECONDS:
            raise _bad("--max-seconds", f"must be in (0, {MAX_SECONDS}], got {max_seconds}")
        if text is None:
            text = "" if mode == "a2v" else DEFAULT_TEXT_FILE.read_text(encoding="utf-8").strip()
        text = str(text).strip()
        if not text and mode != "a2v":
            raise _bad("--text", f"empty text: {mode} needs the words to speak")
        ref_audio = ref_audio or DEFAULT_REF_AUDIO
        ref_video = ref_video or DEFAULT_REF_VIDEO
        if mode == "a2v":
            audio = audio or DEFAULT_REF_AUDIO
        if mode == "v2a" and motion is None:
            video = video or DEFAULT_REF_VIDEO
        paths = _output_paths(output, mode) if output is not None else None

        timings = {"load": self.load_seconds} if self.load_seconds else {}
        self.load_seconds = 0.0  # counted once, in the first result
        PS = self.patch_size
        prefix_motion_frames = (min(int(gt_prefix_seconds * FPS), MAX_FRAMES) // PS) * PS

        # ---- inputs: reference clip, driving audio / motion
        with _timed(timings, "inputs"):
            ref = _load_audio_checked(ref_audio, "reference audio")
            ref_latents, speaker = self.encode_audio(ref)
            ref_motion_raw = face = None
            if mode != "tts":
                ref_motion_raw = self.reference_motion(ref_motion, ref_video, max(1, prefix_motion_frames), progress)
            needs_face = mode in ("t2av", "a2v") or (mode == "v2a" and video is None)
            if needs_face:
                face = video_io.read_first_frame(ref_video)
            given_speech = given_motion = None
            driving_audio = None
            if mode == "a2v":
                driving_audio = _load_audio_checked(audio, "audio")
                given_speech, _ = self.encode_audio(driving_audio)
                speech_frames = motion_frames = given_speech.shape[0]
            elif mode == "v2a":
                if motion is not None:
                    driving_raw = load_motion_file(motion)
                    source = motion
                else:
                    frames, fps_in = video_io.read_frames(video)
                    idx = _resample_indices(len(frames), fps_in)
                    source = video
                    if len(idx) > MAX_FRAMES:
                        raise _bad(video, f"video is {len(frames) / fps_in:.1f} s long; at most {MAX_SECONDS} s "
                                          "is supported")
                    driving_raw = self.extract_motion(frames[idx], progress=progress, desc="video motion")
                    del frames
                if driving_raw.shape[0] > MAX_FRAMES:
                    raise _bad(source, f"motion has {driving_raw.shape[0]} frames; at most {MAX_FRAMES} "
                                       f"({MAX_SECONDS} s at {FPS} fps) are supported")
                given_motion = normalize_motion(driving_raw)
                speech_frames = motion_frames = driving_raw.shape[0]
            else:
                speech_frames = ref.speech_len
                motion_frames = 0 if mode == "tts" else ref_motion_raw.shape[0]
            input_ids, speech_start = self.prompt(text, speech_frames, motion_frames)

        # ---- the inference loop
        ref_motion_norm = None if ref_motion_raw is None else normalize_motion(ref_motion_raw)
        total = self._expected_patches(mode, ref_latents.shape[0], ref_motion_norm, given_speech, given_motion,
                                       gt_prefix_seconds)
        extra_patches = 15  # the released loop's margin over the reference clip's length
        if max_seconds is not None and given_speech is None and given_motion is None:
            cap = math.ceil(max_seconds * FPS / PS)
            extra_patches, total = extra_patches + cap - total, cap
        bar = _progress_bar(total, f"{mode} patches", "patch", progress)
        with _timed(timings, "generate"):
            if seed is not None:
                torch.manual_seed(int(seed))
            try:
                out = self.llm.generate(
                    input_ids, speech_start, ref_latents, speaker, ref_motion_norm,
                    gt_prefix_seconds=gt_prefix_seconds, fps=FPS, cfm_steps=int(cfm_steps),
                    cfm_temperature=float(cfm_temperature), cfm_cfg=float(cfm_cfg),
                    given_speech_latents=given_speech, given_motion_norm=given_motion, extra_patches=extra_patches,
                    task="tts" if mode == "tts" else "t2av", progress=lambda n: bar.update(n - bar.n))
            finally:
                bar.close()

        # ---- assemble the outputs of each mode
        gen_speech = out.speech_latents.float().cpu()
        gen_motion_norm = out.motion_norm.float().cpu() if mode != "tts" else None
        prefix_frames = 0
        motion_raw = None
        with _timed(timings, "decode"):
            if mode == "a2v":  # the input audio, and the motion sampled along it
                speech_latents = given_speech.cpu()
                wav = driving_audio.audio_24k.float().cpu()
                motion_raw = denormalize_motion(gen_motion_norm[:speech_frames])
            elif mode == "v2a":  # the input motion, and the speech sampled along it
                speech_latents = gen_speech[:speech_frames]
                wav = self._decode(speech_latents)
                motion_raw = driving_raw
            else:  # as the reference: the output starts with the prefix replayed from the reference clip
                prefix_speech = out.prefix_speech_latents.float().cpu()
                speech_latents = torch.cat([prefix_speech, gen_speech])
                wav = self._decode(speech_latents)
                if mode == "t2av":
                    prefix_frames = out.prefix_motion_norm.shape[0]
                    motion_raw = torch.cat([ref_motion_raw[:prefix_frames], denormalize_motion(gen_motion_norm)])
                else:
                    prefix_frames = prefix_speech.shape[0]
                if trim_prefix and prefix_frames:
                    wav = wav[prefix_frames * SAMPLES_PER_FRAME:]
                    speech_latents = speech_latents[prefix_frames:]
                    if motion_raw is not None:
                        motion_raw = motion_raw[prefix_frames:]
                    prefix_frames = 0

        result = GenerationResult(
            mode=mode, text=text, seed=seed, audio_24k=wav, speech_latents=speech_latents, motion_raw=motion_raw,
            generated_motion_norm=gen_motion_norm, n_patches=out.n_patches, stopped_by=out.stopped_by,
            prefix_frames=prefix_frames, timings=timings)
        if out.stopped_by == "length_cap":
            result.warnings.append(
                f"generation hit the length cap ({out.n_patches} patches = {out.n_patches * PS / FPS:.1f} s) before "
                "the model chose to stop: the text may be cut short; use a longer reference clip or --max-seconds")
        if paths is not None:
            with _timed(timings, "render"):
                self._write(result, paths, face, video if mode == "v2a" else None, save_latents, progress)
        return result

    # -------------------------------------------------------------- helpers
    def _expected_patches(self, mode, n_ref_latents, ref_motion_norm, given_speech, given_motion, prefix_s):
        """Steps the loop will run at most (for the progress bar)."""
        PS, D = self.patch_size, self.llm.delay
        if given_speech is not None:
            return math.ceil(given_speech.shape[0] / PS)
        if given_motion is not None:
            return math.ceil(given_motion.shape[0] / PS) + D
        if mode == "tts":
            prefix = math.ceil(max(0, min(int(round(prefix_s * FPS)), n_ref_latents)) / PS)
            return max(0, math.ceil(max(1, n_ref_latents) / PS) - prefix + 15)
        motion_len = max(PS, (ref_motion_norm.shape[0] // PS) * PS)
        total = max(math.ceil(n_ref_latents / PS), motion_len // PS + D)
        prefix_patches = (max(0, min(int(prefix_s * FPS), motion_len)) // PS)
        return max(0, total - min(prefix_patches + D, total) + 15)

    @torch.no_grad()
    def _decode(self, speech_latents_td: torch.Tensor) -> torch.Tensor:
        if speech_latents_td.shape[0] == 0:
            return torch.zeros(0)
        wav = self.vae.decode(speech_latents_td[None].to(self.device), latent_layout="btc")
        return wav.reshape(-1).float().cpu()

    def _write(self, result: GenerationResult, paths, face, source_video, save_latents, progress):
        """mp4 + wav (+ latents), all-or-nothing: temp files beside the targets, renamed at the end."""
        from lia_x import render as liax_render

        mp4, wav_path, base = paths
        tmp_wav = _tmp_beside(wav_path, ".wav")
        tmp_lat = _tmp_beside(base + ".latents.safetensors", ".safetensors") if save_latents else None
        try:
            audio_io.save_wav(tmp_wav, result.audio_24k, SAMPLE_RATE)
            if tmp_lat:
                self._save_latents(result, tmp_lat)
            if mp4 is not None and source_video is not None:
                video_io.mux_audio(source_video, tmp_wav, mp4)
            elif mp4 is not None:
                bar = _progress_bar(result.n_frames, "render", "frame", progress)
                try:
                    frames = liax_render.render_frames(self.generator, face, result.motion_raw.numpy(),
                                                       batch_size=self.render_batch_size, dtype=self.render_dtype,
                                                       progress=lambda n: bar.update(n - bar.n))
                    video_io.write_video(mp4, frames, fps=FPS, audio_path=tmp_wav)
                finally:
                    bar.close()
            os.replace(tmp_wav, wav_path)
            if tmp_lat:
                os.replace(tmp_lat, base + ".latents.safetensors")
                result.latents_path = base + ".latents.safetensors"
        finally:
            for tmp in (tmp_wav, tmp_lat):
                if tmp and os.path.exists(tmp):
                    os.remove(tmp)
        result.video_path, result.wav_path = mp4, wav_path

    @staticmethod
    def _save_latents(result: GenerationResult, path: str):
        import json

        from safetensors.torch import save_file

        tensors = {"speech_latents": result.speech_latents.contiguous()}
        if result.motion_raw is not None:
            tensors["motion_raw"] = result.motion_raw.float().contiguous()
        if result.generated_motion_norm is not None:
            tensors["generated_motion_norm"] = result.generated_motion_norm.contiguous()
        meta = {"mode": result.mode, "text": result.text, "seed": str(result.seed), "fps": str(FPS),
                "n_patches": str(result.n_patches), "stopped_by": result.stopped_by,
                "prefix_frames": str(result.prefix_frames), "sample_rate": str(SAMPLE_RATE)}
        save_file(tensors, path, metadata={k: json.dumps(v) if k == "text" else v for k, v in meta.items()})

