"""A run's outputs: the mode's loop output assembled into the result (audio, motion, latents), checked, and
written all-or-nothing (mp4 + wav, and the latents file when asked)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from common.constants import CODEC_SAMPLE_RATE, FPS, SAMPLES_PER_FRAME
from common.motion_stats import denormalize_motion
from media import audio as audio_io
from media import video_io
from runtime.generation import LengthPlan
from runtime.inputs import hold_last
from runtime.run import progress_reporter

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
    sample_rate: int = CODEC_SAMPLE_RATE
    fps: int = FPS
    prefix_frames: int = 0  # leading output frames that replay the reference clip (t2av/tts)
    plan: Optional[LengthPlan] = None
    video_frames: Optional[int] = None  # frames of the output video when they are not the motion's (v2a of a
    video_fps: float = FPS              # video keeps that video's own frames and frame rate)
    video_path: Optional[str] = None
    wav_path: Optional[str] = None
    latents_path: Optional[str] = None
    timings: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    windows: list = field(default_factory=list)  # long-form: longform.WindowReport per window
    precision: str = ""  # what the loop and renderer computed in, and why (precision.summary_note)

    @property
    def audio_seconds(self) -> float:
        return self.audio_24k.numel() / self.sample_rate

    @property
    def n_frames(self) -> int:
        """Frames of the output video."""
        if self.video_frames is not None:
            return self.video_frames
        return 0 if self.motion_raw is None else int(self.motion_raw.shape[0])

    def summary(self) -> str:
        t = self.timings
        parts = [f"{k} {t[k]:.1f}s" for k in ("load", "inputs", "generate", "decode", "render") if k in t]
        rate = "" if abs(self.video_fps - self.fps) < 1e-6 else f" at {self.video_fps:.3g} fps"
        video = f", {self.n_frames} frames{rate} ({self.n_frames / self.video_fps:.2f} s video)" if self.n_frames else ""
        return (f"[talker] {self.mode}: {self.audio_seconds:.2f} s audio{video}; {self.n_patches} patches "
                f"({self.stopped_by}); " + " · ".join(parts) + f" · total {sum(t.values()):.1f}s"
                + (f"; {self.precision}" if self.precision else ""))


@dataclass
class Assembled:
    speech_latents: torch.Tensor  # (F, 32) the latents of the output audio
    audio_24k: torch.Tensor  # (F * 960,) the output waveform
    motion_raw: Optional[torch.Tensor]  # (F, 40) the output motion (None for tts)
    prefix_frames: int  # leading frames replaying the reference clip


def assemble_t2av(pipe, inputs, out) -> Assembled:
    """As the reference: the output starts with the prefix replayed from the reference clip. The speech
    decides the length (the motion prefix can differ from the speech prefix for a reference voice shorter
    than the prefix, and the motion lags by `delay` patches)."""
    speech = torch.cat([out.prefix_speech_latents.float().cpu(), out.speech_latents.float().cpu()])
    n_prefix = out.prefix_motion_norm.shape[0]
    motion = torch.cat([inputs.ref_motion_raw[:n_prefix], denormalize_motion(out.motion_norm.float().cpu())])
    return Assembled(speech, pipe.decode(speech), hold_last(motion, speech.shape[0]), n_prefix)


def assemble_tts(pipe, inputs, out) -> Assembled:
    prefix = out.prefix_speech_latents.float().cpu()
    speech = torch.cat([prefix, out.speech_latents.float().cpu()])
    return Assembled(speech, pipe.decode(speech), None, prefix.shape[0])


def assemble_a2v(pipe, inputs, out) -> Assembled:
    """The input audio, and the motion sampled along it."""
    motion = hold_last(denormalize_motion(out.motion_norm.float().cpu()), inputs.given_speech.shape[0])
    return Assembled(inputs.given_speech.cpu(), inputs.driving_audio_24k, motion, 0)


def assemble_v2a(pipe, inputs, out) -> Assembled:
    """The input motion, and the speech sampled along it."""
    speech = out.speech_latents.float().cpu()[:inputs.given_motion_raw.shape[0]]
    return Assembled(speech, pipe.decode(speech), inputs.given_motion_raw, 0)


ASSEMBLE = {"t2av": assemble_t2av, "a2v": assemble_a2v, "v2a": assemble_v2a, "tts": assemble_tts}


def trim_prefix(a: Assembled) -> Assembled:
    n = a.prefix_frames
    return Assembled(a.speech_latents[n:], a.audio_24k[n * SAMPLES_PER_FRAME:],
                     None if a.motion_raw is None else a.motion_raw[n:], 0)


def check_finite(a: Assembled) -> None:
    """Never write a waveform or motion with NaN/inf, whatever produced it."""
    for name, tensor in (("audio", a.audio_24k), ("motion", a.motion_raw), ("speech latents", a.speech_latents)):
        if tensor is not None and not torch.isfinite(tensor).all():
            raise ValueError(f"generation produced non-finite {name} (NaN or inf); nothing was written "
                             "(check the sampling settings and the weights)")


def save_latents(result: GenerationResult, path) -> None:
    """speech_latents, motion_raw (reusable as a `motion` input) and generated_motion_norm, with metadata."""
    from safetensors.torch import save_file

    tensors = {"speech_latents": result.speech_latents.contiguous()}
    if result.motion_raw is not None:
        tensors["motion_raw"] = result.motion_raw.float().contiguous()
    if result.generated_motion_norm is not None:
        tensors["generated_motion_norm"] = result.generated_motion_norm.contiguous()
    meta = {"mode": result.mode, "text": json.dumps(result.text), "seed": str(result.seed), "fps": str(FPS),
            "n_patches": str(result.n_patches), "stopped_by": result.stopped_by,
            "prefix_frames": str(result.prefix_frames), "sample_rate": str(CODEC_SAMPLE_RATE)}
    save_file(tensors, os.fspath(path), metadata=meta)


def write_outputs(pipe, result: GenerationResult, inputs, temps, video=None, progress=False) -> None:
    """The output files into `temps` (tmp mp4 or None, tmp wav, tmp latents or None; atomic_outputs' names):
    the wav; the latents; the mp4 from the source video (v2a of a video: muxed), from `video` (the frames a
    stream already encoded: video_io.IncrementalVideo) or rendered now on the reference face."""
    tmp_mp4, tmp_wav, tmp_latents = temps
    audio_io.save_wav(tmp_wav, result.audio_24k, CODEC_SAMPLE_RATE, atomic=False)
    if tmp_latents is not None:
        save_latents(result, tmp_latents)
    if tmp_mp4 is None:
        return
    if inputs.source_video is not None:
        video_io.mux_audio(inputs.source_video, tmp_wav, tmp_mp4, atomic=False)
    elif video is not None:
        video.close(tmp_wav)
    else:
        from lia_x import render as liax_render

        with progress_reporter(progress, "render", result.n_frames, "frame") as update:
            frames = liax_render.render_frames(pipe.generator, inputs.face, result.motion_raw.numpy(),
                                               batch_size=pipe.render_batch_size, dtype=pipe.render_dtype,
                                               progress=update)
            video_io.write_video(tmp_mp4, frames, fps=FPS, audio_path=tmp_wav, atomic=False)
