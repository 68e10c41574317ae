"""Streaming generation: audio and frames while the loop runs, then generate()'s result.

    for item in pipe.stream(mode="t2av", text="...", every=2):
        if isinstance(item, Chunk):      # new samples (24 kHz) and new frames, with their start times
            play(item.audio_24k, item.audio_start_s, item.frames, item.frame_start)
        else:
            result = item                # the GenerationResult generate() returns (files written as generate)

Audio: the speech latents (the replayed prefix first, then every patch) go through a
whisperx_vae.StreamingDecoder: a frame's samples come out once `lookahead` frames follow it (16 = the
decoder's receptive field: the streamed samples equal the one-shot decode within float32 rounding; fewer is
earlier and approximate). Frames: each motion patch is rendered as it arrives (lia_x FrameRenderer).
Long-form windows follow one another in one stream. `mp4`: a path (or "-" for stdout) where a fragmented
mp4 grows as the chunks arrive (video_io.FragmentedMp4Writer); with `output` set the final files are
those generate() writes (the mp4 encoded from the same frames) and the fragmented file is removed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch

from common.constants import CODEC_SAMPLE_RATE, FPS, SAMPLES_PER_FRAME
from common.motion_stats import denormalize_motion
from media import video_io
from media.atomic import atomic_outputs
from runtime.longform import WindowLoop
from runtime.outputs import write_outputs
from runtime.run import WindowProgress, timed
from whisperx_vae import DECODER_CONTEXT_FRAMES, StreamingDecoder


@dataclass
class Chunk:
    window: int  # 0-based long-form window (0 for a single run)
    n_patches: int  # patches generated so far
    audio_24k: torch.Tensor  # (m,) new output samples
    audio_start: int  # index of their first sample in the output audio
    frames: Optional[np.ndarray]  # (n, H, W, 3) uint8 new output frames (None: tts, v2a of a video)
    frame_start: int  # index of their first frame in the output video

    @property
    def audio_start_s(self) -> float:
        return self.audio_start / CODEC_SAMPLE_RATE

    @property
    def frame_times_s(self) -> np.ndarray:
        n = 0 if self.frames is None else len(self.frames)
        return (self.frame_start + np.arange(n)) / FPS


class _Outputs:
    """Where the new audio and frames go: the chunk being built, the fragmented mp4, the final video."""

    def __init__(self, pipe, run, lookahead, render, final_video, fragments):
        req, inputs = run.request, run.inputs
        self.req, self.inputs = req, inputs
        self.decoder = None if req.mode == "a2v" else StreamingDecoder(pipe.vae, lookahead)
        self.skip_samples = 0  # trim_prefix: samples of the replayed prefix not in the output
        self.renderer = None
        if render and req.mode != "tts" and inputs.source_video is None:
            from lia_x.render import FrameRenderer

            self.renderer = FrameRenderer(pipe.generator, inputs.face, pipe.render_dtype, pipe.render_batch_size)
        self.final_video, self.fragments = final_video, fragments
        self.n_samples = self.n_frames = 0
        self.all_frames = []
        self.new_audio, self.new_frames = [], []

    def speech(self, latents_td) -> None:
        if self.decoder is not None:
            self.audio(self.decoder.push(latents_td))

    def driving_audio(self, n_frames: int) -> None:
        """a2v: the input audio up to frame n_frames."""
        end = min(n_frames * SAMPLES_PER_FRAME, self.inputs.driving_audio_24k.numel())
        self.audio(self.inputs.driving_audio_24k[self.samples_so_far():end])

    def samples_so_far(self) -> int:
        return self.n_samples + sum(a.numel() for a in self.new_audio)

    def frames_so_far(self) -> int:
        return self.n_frames + sum(len(f) for f in self.new_frames)

    def audio(self, samples) -> None:
        if self.skip_samples and self.n_samples == 0:
            drop = min(self.skip_samples, samples.numel())
            self.skip_samples -= drop
            samples = samples[drop:]
        if samples.numel():
            self.new_audio.append(samples)

    def motion(self, motion_raw_td) -> None:
        if self.renderer is not None and motion_raw_td.shape[0]:
            frames = self.renderer.render(motion_raw_td)
            self.new_frames.append(frames)

    def chunk(self, window: int, n_patches: int) -> Optional[Chunk]:
        audio = torch.cat(self.new_audio) if self.new_audio else torch.zeros(0)
        frames = np.concatenate(self.new_frames) if self.new_frames else None
        self.new_audio, self.new_frames = [], []
        if not audio.numel() and frames is None:
            return None
        c = Chunk(window, n_patches, audio, self.n_samples, frames, self.n_frames)
        self.n_samples += audio.numel()
        if frames is not None:
            self.n_frames += len(frames)
            if self.final_video is not None:
                self.final_video.add(frames)
        if self.fragments is not None:
            self.fragments.add(frames, audio.numpy())
        return c


def stream(pipe, request=None, *, every: int = 1, progress=False, lookahead: int = DECODER_CONTEXT_FRAMES,
           render: bool = True, mp4: Union[str, os.PathLike, None] = None, **kwargs) -> Iterator:
    """Chunks every `every` patches, then the GenerationResult (see the module docstring)."""
    if every < 1:
        raise ValueError(f"every must be >= 1 patch, got {every}")
    run = pipe.start(request, progress, release="stream_inputs", **kwargs)
    req, inputs, paths = run.request, run.inputs, run.paths
    with atomic_outputs(*(paths.group() if paths else (None,))) as temps:
        temps = temps if paths else (None, None, None)
        final_video = fragments = None
        try:  # the writers are made inside: an interrupt while they start still cleans up
            if temps[0] is not None and inputs.source_video is None and render:
                final_video = video_io.IncrementalVideo(temps[0], FPS)
            if mp4 is not None:
                size = (inputs.face.shape[1], inputs.face.shape[0]) if inputs.face is not None else (0, 0)
                if render and inputs.face is not None:
                    size = (pipe.generator.size, pipe.generator.size)
                fragments = video_io.FragmentedMp4Writer(
                    mp4, size, FPS, CODEC_SAMPLE_RATE,
                    video=render and req.mode != "tts" and inputs.source_video is None)
            outs = _Outputs(pipe, run, lookahead, render, final_video, fragments)
            loop = WindowLoop(pipe, run)
            yield from _chunks(run, loop, outs, every, progress)
            result = pipe.finish(run, loop.output, False, write=False)
            yield from _tail(outs, result, len(run.windows) - 1, loop.output.n_patches)
            if fragments is not None:
                fragments.close()
                if fragments.reader_closed:
                    result.warnings.append("the reader of stdout closed it before the end: the stream stopped "
                                           "there; the output is written in full")
                fragments = None
            if paths is not None:
                with timed(run.timings, "render"):
                    video, final_video = final_video, None
                    write_outputs(pipe, result, inputs, temps, video)
                result.video_path, result.wav_path, result.latents_path = paths.group()
        except BaseException:
            if mp4 not in (None, "-"):  # nothing half-written is left behind
                if fragments is not None:
                    fragments.abort()
                    fragments = None
                Path(mp4).unlink(missing_ok=True)
            raise
        finally:
            if final_video is not None:
                final_video.abort()
            if fragments is not None:
                fragments.abort()
    if paths is not None and mp4 not in (None, "-") and Path(mp4).resolve() != Path(paths.mp4 or "").resolve():
        Path(mp4).unlink(missing_ok=True)  # the final file replaces the growing one
    yield result


def _chunks(run, loop, outs, every, progress):
    """The loop, feeding the decoder and the renderer; a chunk every `every` patches (the time between
    chunks counts as generation, the consumer's time does not)."""
    req, inputs = run.request, run.inputs
    n_prefix_motion = 0
    n_speech_limit = inputs.given_motion_raw.shape[0] if req.mode == "v2a" else None
    n_speech = n_patches = 0
    bars = WindowProgress(progress, run)
    t_gen = timed(run.timings, "generate")
    t_gen.__enter__()
    try:
        for w, patch in loop:
            bars(w, patch)
            if n_patches == 0:  # the replayed prefix (t2av/tts) opens the output
                prompt = loop.prompts[0]
                if req.mode in ("t2av", "tts"):
                    outs.speech(prompt.prefix_speech_latents.float().cpu())
                    n_speech = prompt.prefix_speech_latents.shape[0]
                    n_prefix_motion = prompt.prefix_motion_norm.shape[0]
                    if req.trim_prefix:
                        outs.skip_samples = n_prefix_motion * SAMPLES_PER_FRAME
                    if req.mode == "t2av" and not req.trim_prefix:
                        outs.motion(inputs.ref_motion_raw[:n_prefix_motion])
            n_patches += 1
            speech = patch.speech_latents.float().cpu()
            if req.mode == "a2v":
                n_speech = min(n_speech + speech.shape[0], inputs.given_speech.shape[0])
                outs.driving_audio(n_speech)
            else:
                if n_speech_limit is not None:
                    speech = speech[:max(0, n_speech_limit - n_speech)]
                n_speech += speech.shape[0]
                outs.speech(speech)
            if patch.motion_norm is not None and req.mode in ("t2av", "a2v"):
                outs.motion(_motion_rows(req, denormalize_motion(patch.motion_norm.float().cpu()), outs,
                                         n_speech, n_prefix_motion))
            if n_patches % every == 0:
                t_gen.__exit__(None, None, None)
                c = outs.chunk(w.index, n_patches)
                if c is not None:
                    yield c
                t_gen = timed(run.timings, "generate")
                t_gen.__enter__()
    finally:
        bars.close()
        t_gen.__exit__(None, None, None)
    if req.mode == "v2a" and outs.renderer is not None:
        outs.motion(inputs.given_motion_raw)


def _motion_rows(req, motion_raw, outs, n_speech, n_prefix):
    """Rows of a motion patch that the output keeps: never beyond the speech (the output's length)."""
    rendered = outs.frames_so_far()
    offset = n_prefix if req.trim_prefix else 0
    n_out_speech = n_speech - offset if req.mode != "a2v" else n_speech
    return motion_raw[:max(0, n_out_speech - rendered)]


def _tail(outs, result, window, n_patches):
    """The rest: the decoder's last look-ahead frames, and the frames held past the motion's end."""
    if outs.decoder is not None:
        outs.audio(outs.decoder.finish())
    elif result.mode == "a2v":
        outs.audio(result.audio_24k[outs.samples_so_far():])
    if outs.renderer is not None and result.motion_raw is not None:
        rendered = outs.frames_so_far()
        outs.motion(result.motion_raw[rendered:])
    c = outs.chunk(window, n_patches)
    if c is not None:
        yield c
