"""TalkerPipeline: every model of Talker-T2AV in one object, and the stages of a run of the four modes.

    from runtime.pipeline import TalkerPipeline
    from runtime.request import GenerationRequest
    pipe = TalkerPipeline.from_pretrained()          # weights via weights.locate (arguments / env vars / hub cache)
    # pipe = TalkerPipeline.demo()                   # tiny random models, offline
    result = pipe.generate(GenerationRequest(mode="t2av", text="Hello there.", output="out.mp4"))
    result = pipe.generate(mode="tts", text="Hello.")  # keyword arguments work too

A run has three stages: start (the request resolved, the mode's inputs read and encoded, its windows
planned: runtime.inputs, runtime.longform), the loop (longform.WindowLoop over generation.Loop) and finish
(the mode's outputs assembled, checked and written: runtime.outputs). generate() drives them in order,
stream() feeds the loop's patches to a decoder and a renderer as they come (runtime.streaming), and
generate_batch() runs the loops of several runs as the rows of one. Modes:
- t2av: text -> speech + motion; the reference clip (ref audio + ref motion) is the prompt.
- a2v:  the latents of `audio` are fed as the speech half of every token; only the motion head samples.
- v2a:  the motion of `video` (or `motion`) is fed as the motion half of every token; only the speech head
        samples; the output is the input video's frames with the new speech.
- tts:  speech only (task tag 0, motion_pad_emb), a wav.
"""
from __future__ import annotations

import gc
import math
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from common import packed_linear as packing  # (`packed_linear` is the mode's name here)
from common.constants import FPS
from media import audio as audio_io
from media import video_io
from media.atomic import atomic_outputs
from runtime import longform, loop_steps, precision, streaming
from runtime.generation import GenerationOutput, batch_key, run_rows
from runtime.inputs import (PREPARE, check_count, face_frames, hold_last, output_paths, resample_indices,
                            resolve_request, video_timeline)
from runtime.outputs import ASSEMBLE, GenerationResult, check_finite, trim_prefix, write_outputs
from runtime.prompt import demo_tokenizer, load_tokenizer, tokenizer_for
from runtime.request import GenerationRequest, RequestError
from runtime.run import Progress, Run, WindowProgress, progress_reporter, timed

RANDOM_WEIGHTS_BANNER = ("*** DEMO: tiny RANDOMLY INITIALISED models: the output is noise-like speech and a "
                         "garbled face, NOT Talker-T2AV quality. Use real weights for real results. ***")


def trained_demo_banner(checkpoint_dir) -> str:
    """--demo --checkpoint-dir: the SpeechLLM is trained, the codec, renderer and speaker encoder are not."""
    return (f"*** DEMO with the tiny SpeechLLM trained in {checkpoint_dir}; its codec, renderer and speaker encoder "
            "are tiny RANDOMLY INITIALISED models: the audio and face are not real. ***")

# progress: True (tqdm bars on stderr), False / None (silent), or a callable (stage, done, total)




# ------------------------------------------------------------------------------------------ input files



























# ------------------------------------------------------------------------------------------ requests







# ------------------------------------------------------------------------------------------ progress





# ------------------------------------------------------------------------------------------ demo tokenizer







# ------------------------------------------------------------------------------------------ per mode







































# ------------------------------------------------------------------------------------------ pipeline

# what low_memory drops when a stage is done: the next stage reloads what it needs (memory-mapped: seconds)
LOW_MEMORY_RELEASES = {
    "audio": ("speaker_encoder", "vae"),  # the LIA-X encoder runs next (reference or video motion)
    "inputs": ("speaker_encoder", "vae", "generator"),  # the loop runs next, alone
    "stream_inputs": ("speaker_encoder",),  # a stream decodes and renders while its loop runs
    "loop": ("llm",),  # the VAE decoder runs next
    "decode": ("vae",),  # the renderer runs next
}


def _model_slot(name: str, doc: str):
    """A pipeline model that may be dropped (TalkerPipeline.release) and is then loaded again on first use."""
    def get(self):
        model = getattr(self, "_" + name)
        if model is None:
            model = self._load(name)
            setattr(self, "_" + name, model)
        return model

    def set_(self, model):
        setattr(self, "_" + name, model)
    return property(get, set_, doc=doc)


def _demo_dtype(name, device: torch.device, part: str):
    """TalkerPipeline.demo's (dtype, why): auto is float32 for the tiny models (the loop on CUDA: the reference's
    bf16 autocast over float32 weights, as ever); a named dtype as precision.resolve_dtype."""
    if name is None or name == "auto":
        if part == "loop" and device.type == "cuda":
            return precision.resolve_dtype("auto", device, part)
        return torch.float32, "auto: the demo's tiny models stay float32"
    try:
        return precision.resolve_dtype(name, device, part)
    except ValueError as e:
        raise RequestError("dtype" if part == "loop" else "render_dtype", str(e)) from None


class TalkerPipeline:
    llm = _model_slot("llm", "SpeechLLM (backbone + heads)")
    vae = _model_slot("vae", "WhisperX-VAE (reference encoder, decoder)")
    speaker_encoder = _model_slot("speaker_encoder", "WavLM-Large + ECAPA-TDNN speaker encoder")
    generator = _model_slot("generator", "LIA-X generator (reference motion, rendering), loaded from "
                                         "`liax_ckpt` on first use")

    def __init__(self, speech_llm, tokenizer, whisperx_vae, speaker_encoder, generator=None, *,
                 liax_ckpt=None, device="cpu", render_dtype=torch.float32, render_batch_size=None,
                 is_demo=False, model_args=None, loaders=None, low_memory: bool = False,
                 loop_backend: str = "auto", packed_linear: str = "auto"):
        """`loaders` {name: () -> model} reload a model dropped by release() (from_pretrained sets them; a
        model given as None with a loader is loaded on first use). `low_memory`: generate() drops each model
        once the request no longer needs it (the CLI's single runs: peak memory = the largest stage).
        `loop_backend`: how the loop's steps run (loop_steps.BACKENDS; auto: CUDA graphs on CUDA).
        `packed_linear`: the loop's linears through oneDNN with packed weights (packed_linear.MODES; auto: on
        CPU)."""
        self._llm, self._vae, self._speaker_encoder = speech_llm, whisperx_vae, speaker_encoder
        self._generator = generator
        self.model_args = model_args if model_args is not None else speech_llm.model_args
        self.tokenizer = tokenizer
        self.liax_ckpt = liax_ckpt
        self.device = torch.device(device)
        self.render_dtype = render_dtype
        self.render_batch_size = render_batch_size
        self.is_demo = is_demo
        self.low_memory = low_memory
        self._loaders = dict(loaders or {})
        self.load_seconds = 0.0
        self._encodings = EncodingCache()  # content digest -> encoder outputs, reused across requests
        self.loop_backend = loop_backend
        self.packed_linear = packed_linear
        self.precision = {}  # "loop"/"render" -> (dtype, why) as from_pretrained/demo chose: the summary line's

    def precision_note(self, mode: str = "t2av") -> str:
        """What the loop (and, for modes that render, the renderer) compute in and why; '' when unknown."""
        if "loop" not in self.precision:
            return ""
        return precision.summary_note(self.precision["loop"],
                                      self.precision.get("render") if mode in ("t2av", "a2v") else None)

    @property
    def loop_backend(self) -> str:
        return self._loop_backend

    @loop_backend.setter
    def loop_backend(self, name: str) -> None:
        loop_steps.resolve_backend(name, self.device)  # refuses cuda_graphs off CUDA now, not mid-request
        self._loop_backend = name
        if self._llm is not None:
            self._llm.loop_backend = name

    @property
    def packed_linear(self) -> str:
        return self._packed_linear

    @packed_linear.setter
    def packed_linear(self, mode: str) -> None:
        packing.resolve(mode, self.device)  # refuses 'on' where oneDNN cannot run, before any loop
        self._packed_linear = mode
        if self._llm is not None:
            self._llm.packed_linear = mode

    def _load(self, name: str):
        from runtime import weights

        loader = self._loaders.get(name)
        if name == "generator" and loader is None and self.liax_ckpt is not None:
            import lia_x

            def loader():
                return lia_x.load_generator(self.liax_ckpt, device=self.device, dtype=self.render_dtype)
        if loader is None:
            if name == "generator":
                raise weights.MissingWeightsError(["liax"])
            raise RuntimeError(f"the pipeline's {name} was released and cannot be loaded again")
        t0 = time.perf_counter()
        model = loader()
        self.load_seconds += time.perf_counter() - t0
        if name == "llm":
            model.loop_backend, model.packed_linear = self.loop_backend, self.packed_linear
        return model

    def release(self, *names: str) -> list:
        """Drop the named models that can be loaded again (their loader, or LIA-X's checkpoint path); a
        later use reloads them (memory-mapped files: seconds). Returns the names dropped."""
        reloadable = set(self._loaders) | ({"generator"} if self.liax_ckpt is not None else set())
        dropped = [n for n in names if n in reloadable and getattr(self, "_" + n) is not None]
        for name in dropped:
            setattr(self, "_" + name, None)
        if dropped:
            gc.collect()
        return dropped

    def _stage_done(self, stage: str) -> None:
        """low_memory: drop what the next stage of a single request does not use (LOW_MEMORY_RELEASES), so
        that one large model family is resident at a time."""
        if self.low_memory:
            self.release(*LOW_MEMORY_RELEASES[stage])

    # -------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, checkpoint_dir=None, whisperx_vae_ckpt=None, liax_ckpt=None, wavlm_ckpt=None, *,
                        wavlm_backbone_ckpt=None, llm_name: Optional[str] = "Qwen/Qwen3-0.6B", device=None,
                        dtype="auto", render_dtype="auto", render_batch_size=None, needs=None,
                        download=False, wavlm_repo=None, wavlm_filename=None,
                        low_memory: bool = False, loop_backend: str = "auto",
                        packed_linear: str = "auto") -> "TalkerPipeline":
        """Load the released weights. Paths default to weights.locate() (env vars CHECKPOINT_DIR,
        WHISPERVAE_CKPT, LIAX_CKPT, WAVLM_CKPT, then the hub cache); download=True fetches what is missing.

        dtype: the SpeechLLM's ('auto' or None, 'float32', 'bfloat16' or a torch.dtype); render_dtype: the LIA-X
        decoder convolutions'. auto (precision.resolve_dtype): bfloat16 on CUDA (the loop as the reference's
        autocast; the renderer on GPUs with native bf16) and on CPUs with native bf16 that a GEMM probe finds
        faster, float32 elsewhere; pipe.precision and the summary line say which and why. LIA-X (3.6 GB) is
        loaded on first use, so a TTS-only session never reads it. `needs`: components to require now.
        Weight files are memory-mapped: a model's pages are read when it runs. low_memory=True (the CLI's
        single runs): every file is checked now, the SpeechLLM is loaded when the loop starts, and each
        model is dropped once the request no longer needs it (see _stage_done), so the peak is the
        largest stage rather than the sum of all models; a later request reloads what it needs."""
        import speaker_verification
        from runtime import weights
        import whisperx_vae
        from speech_llm import SpeechLLM

        t0 = time.perf_counter()
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        chosen = {}
        for part, field_name, name in (("loop", "dtype", dtype), ("render", "render_dtype", render_dtype)):
            try:
                chosen[part] = precision.resolve_dtype(name, device, part)
            except ValueError as e:
                raise RequestError(field_name, str(e)) from None
        dtype, render_dtype = chosen["loop"][0], chosen["render"][0]
        if dtype == torch.float16 and device.type != "cuda":
            raise RequestError("dtype", "float16: half precision needs CUDA (on CPU use float32 or bfloat16)")
        packing.resolve(packed_linear, device)  # before gigabytes load, not after
        extra = {k: v for k, v in (("wavlm_repo", wavlm_repo), ("wavlm_filename", wavlm_filename)) if v}
        paths = weights.locate(checkpoint_dir, whisperx_vae_ckpt, liax_ckpt, wavlm_ckpt, **extra)
        needs = tuple(needs or weights.COMPONENTS)
        if download and paths.missing(needs):
            paths = weights.download(needs, paths, **extra)
        paths.require(needs)

        def load_llm():
            llm = SpeechLLM.from_pretrained(paths.checkpoint_dir, device=device, llm_dtype=dtype)
            if dtype == torch.bfloat16 and device.type == "cpu":
                llm.to(torch.bfloat16)  # backbone and heads compute in bf16 on CPU too (speech_llm.amp)
            return llm

        def load_vae():
            return whisperx_vae.load_whisperx_vae(paths.whisperx_vae, device=device)

        def load_speaker_encoder():
            return speaker_verification.init_model("wavlm_large", paths.wavlm,
                                                   wavlm_checkpoint=wavlm_backbone_ckpt).to(device).eval()

        if low_memory:  # checked now, loaded when the loop starts (after the encoders are gone)
            llm, (model_args, _) = None, SpeechLLM.check_pretrained(paths.checkpoint_dir)
        else:
            llm = load_llm()
            model_args = llm.model_args
        tokenizer = tokenizer_for(paths.checkpoint_dir, llm_name, model_args.model_max_length)
        pipe = cls(llm, tokenizer, load_vae(), load_speaker_encoder(), None, liax_ckpt=paths.liax, device=device,
                   render_dtype=render_dtype, render_batch_size=render_batch_size, model_args=model_args,
                   loaders=dict(llm=load_llm, vae=load_vae, speaker_encoder=load_speaker_encoder),
                   low_memory=low_memory, loop_backend=loop_backend, packed_linear=packed_linear)
        pipe.precision = chosen
        pipe.load_seconds = time.perf_counter() - t0
        return pipe

    @classmethod
    def demo(cls, device="cpu", seed: int = 0, render_dtype="auto", render_batch_size=None,
             checkpoint_dir=None, dtype="auto", loop_backend: str = "auto",
             packed_linear: str = "auto") -> "TalkerPipeline":
        """Tiny randomly initialised models (fixed seeds), built in memory: the full product path, offline.
        checkpoint_dir: a tiny SpeechLLM saved with save_pretrained (a tiny training run's `final`) to use
        in place of the random one (with its tokenizer when the folder has one). dtype, render_dtype: as
        from_pretrained's, but auto keeps the tiny models in float32 (their GEMMs are too small for bf16 to
        pay, and the demo's outputs stay those the tests pin); on CUDA the loop runs under the reference's
        bf16 autocast whatever the weights' dtype.

        On CPU, unless OMP_NUM_THREADS is set, torch runs one intra-op thread (as infer.py --demo does): the
        tiny models are too small for threads, whose synchronisation dominates (about 6x slower on a busy
        2-core machine, spin-waiting while another process holds a core)."""
        import lia_x
        import speaker_verification
        import whisperx_vae
        from speech_llm import SpeechLLM, tiny_model_args_and_config

        t0 = time.perf_counter()
        if torch.device(device).type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(1)
        args, config = tiny_model_args_and_config()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            llm = SpeechLLM(args, config).eval()
            torch.manual_seed(seed + 1)
            vae = whisperx_vae.WhisperXVAE(whisperx_vae.tiny_cfg(), whisperx_vae.tiny_whisper_dims()).eval()
        tokenizer = demo_tokenizer(args.model_max_length)
        if checkpoint_dir is not None:
            llm = SpeechLLM.from_pretrained(checkpoint_dir)
            if (Path(checkpoint_dir) / "tokenizer.json").is_file():
                tokenizer = load_tokenizer(checkpoint_dir, llm.model_args.model_max_length)
        chosen = {part: _demo_dtype(name, torch.device(device), part)
                  for part, name in (("loop", dtype), ("render", render_dtype))}
        dtype, render_dtype = chosen["loop"][0], chosen["render"][0]
        if dtype == torch.bfloat16 and chosen["loop"][1] == "requested":  # auto on CUDA: autocast, float32 weights
            llm.to(torch.bfloat16)
        spk = speaker_verification.tiny_speaker_encoder(seed + 2)
        gen = lia_x.tiny_generator(seed + 3)
        if render_dtype != torch.float32:
            lia_x.cast_conv_weights(gen, render_dtype)
        device = torch.device(device)
        pipe = cls(llm.to(device), tokenizer, vae.to(device), spk.to(device), gen.to(device), device=device,
                   render_dtype=render_dtype, render_batch_size=render_batch_size, is_demo=True,
                   loop_backend=loop_backend, packed_linear=packed_linear)
        pipe.precision = chosen
        pipe.load_seconds = time.perf_counter() - t0
        return pipe

    @property
    def patch_size(self) -> int:
        return self.model_args.patch_size

    @property
    def delay(self) -> int:
        return self.model_args.delay

    # -------------------------------------------------------------- encoders
    @torch.no_grad()
    def encode_audio(self, ref: audio_io.ReferenceAudio):
        """(latents (speech_len, 32), speaker embedding (1, 256)), both of the first speech_len frames,
        as the reference's get_speech_embeddings / get_speaker_embeddings compute them."""
        from speech_llm import encode_speaker, encode_speech_latents

        key = ("audio", _digest(ref.audio_24k, ref.audio_16k))
        cached = self._encodings.get(key)
        if cached is None:  # a batch with one voice runs the Whisper encoder and WavLM once
            n = ref.speech_len
            latents = encode_speech_latents(self.vae, ref.audio_24k[None, None].to(self.device),
                                            ref.mel.to(self.device), n)
            speaker = encode_speaker(self.speaker_encoder, ref.audio_16k_pad[None].to(self.device), n)
            cached = self._encodings.put(key, (latents[0].float(), speaker.float()))
        latents, speaker = cached
        return latents.clone(), speaker.clone()

    @torch.no_grad()
    def extract_motion(self, frames_u8, progress: Progress = True, stage="motion") -> torch.Tensor:
        """(T, H, W, 3) uint8 RGB -> (T, 40) raw LIA-X motion (the LIA-X encoder on every frame)."""
        from lia_x import render as liax_render

        key = ("motion", _digest(torch.from_numpy(np.ascontiguousarray(frames_u8))))
        motion = self._encodings.get(key)
        if motion is None:
            self._stage_done("audio")
            with progress_reporter(progress, stage, len(frames_u8), "frame") as update:
                motion = self._encodings.put(key, liax_render.extract_motion(self.generator, frames_u8,
                                                                             progress=update))
        return motion.clone()

    @staticmethod
    def video_motion_frames(video) -> int:
        """Frames of a video on the model's 25 fps timeline, at most 750."""
        return video_timeline(video)[0]

    def reference_motion(self, ref_video, n_needed: int = 1, progress: Progress = True,
                         face_crop: str = "none") -> torch.Tensor:
        """(T, 40) raw motion of a reference video, T <= 750, of which only the first n_needed rows are
        extracted (the rest repeat the last one): the loop reads only the prefix rows (the first is the
        motion head's global condition); the clip length only sets the length cap. A full-scale encoder
        pass costs seconds per frame on CPU."""
        n_total, fps_src = video_timeline(ref_video)
        n_read = max(1, min(n_needed, n_total))
        frames, fps_in = video_io.read_frames(ref_video, max_frames=int(math.ceil(n_read * max(fps_src, FPS) / FPS)) + 1)
        frames = face_frames(frames[resample_indices(len(frames), fps_in)][:n_read], face_crop)
        return hold_last(self.extract_motion(frames, progress, "reference motion"), n_total, cut=False)

    @torch.no_grad()
    def decode(self, speech_latents_td: torch.Tensor) -> torch.Tensor:
        """(F, 32) latents -> (F * 960,) float32 waveform at 24 kHz."""
        if speech_latents_td.shape[0] == 0:
            return torch.zeros(0)
        wav = self.vae.decode(speech_latents_td[None].to(self.device), latent_layout="btc")
        return wav.reshape(-1).float().cpu()

    # -------------------------------------------------------------- the stages of a run
    def start(self, request: Optional[GenerationRequest] = None, progress: Progress = True, *,
              release: Optional[str] = "inputs", **kwargs) -> Run:
        """A run of a request (a GenerationRequest and/or its fields as keyword arguments): the request
        resolved, where it writes, the mode's inputs read and encoded, its windows planned. Then the models
        the loop does not use are released (low_memory; `release`: LOW_MEMORY_RELEASES' stage)."""
        req = resolve_request(request, **kwargs)
        paths = output_paths(req.output, req.mode, req.save_latents) if req.output is not None else None
        timings = {"load": self.load_seconds} if self.load_seconds else {}
        self.load_seconds = 0.0  # counted once, in the first result
        with timed(timings, "inputs"):
            inputs = PREPARE[req.mode](self, req, progress)
            windows, long_form = longform.plan_run(self, req, inputs)
        if release:
            self._stage_done(release)
        return Run(req, paths, inputs, windows, long_form, timings)

    def finish(self, run: Run, out: GenerationOutput, progress: Progress = True,
               write: bool = True) -> GenerationResult:
        """The run's result from the loop's output: the mode's outputs assembled (decoded), checked, and
        written to run.paths all-or-nothing unless write=False."""
        req, inputs = run.request, run.inputs
        self._stage_done("loop")
        with timed(run.timings, "decode"):
            assembled = ASSEMBLE[req.mode](self, inputs, out)
            if req.trim_prefix and assembled.prefix_frames:
                assembled = trim_prefix(assembled)
            check_finite(assembled)
        self._stage_done("decode")
        result = GenerationResult(
            mode=req.mode, text=req.text, seed=req.seed, audio_24k=assembled.audio_24k,
            speech_latents=assembled.speech_latents, motion_raw=assembled.motion_raw,
            generated_motion_norm=None if req.mode == "tts" else out.motion_norm.float().cpu(),
            n_patches=out.n_patches, stopped_by=out.stopped_by, prefix_frames=assembled.prefix_frames,
            plan=run.plan, timings=run.timings, warnings=list(inputs.warnings),
            windows=list(run.reports) if run.long_form else [], precision=self.precision_note(req.mode))
        if inputs.source_video is not None:
            result.video_frames, result.video_fps = inputs.source_frames, inputs.source_fps
        if run.long_form:
            result.warnings += longform.cap_warnings(run.reports)
        elif out.stopped_by == "length_cap":
            result.warnings.append(
                f"generation hit the length cap ({out.n_patches} patches = {run.plan.max_seconds:.1f} s) before "
                "the model chose to stop: the text may be cut short; use a longer reference clip or max_seconds")
        if run.paths is not None and write:
            with timed(run.timings, "render"), atomic_outputs(*run.paths.group()) as temps:
                write_outputs(self, result, inputs, temps, progress=progress)
            result.video_path, result.wav_path, result.latents_path = run.paths.group()
        return result

    def loop(self, run: Run, progress: Progress = True) -> GenerationOutput:
        """The loop of a run to its end (every window), with a progress bar per window."""
        loop, bars = longform.WindowLoop(self, run), WindowProgress(progress, run)
        try:
            with timed(run.timings, "generate"):
                for window, patch in loop:
                    bars(window, patch)
        finally:
            bars.close()
        return loop.output

    # -------------------------------------------------------------- generation: the stages driven
    def generate(self, request: Optional[GenerationRequest] = None, *, progress: Progress = True,
                 **kwargs) -> GenerationResult:
        """Run one request (a GenerationRequest and/or its fields as keyword arguments). Inputs default to
        the bundled samples (text: samples/default_text.txt, except a2v whose default is no transcript).
        With `output`, writes the mp4 (not for tts) and the wav beside it, all-or-nothing; `save_latents`
        adds <output>.latents.safetensors."""
        run = self.start(request, progress, **kwargs)
        return self.finish(run, self.loop(run, progress), progress)

    def stream(self, request: Optional[GenerationRequest] = None, *, every: int = 1, progress: Progress = False,
               lookahead: int = 16, render: bool = True, mp4=None, **kwargs):
        """Generate while yielding streaming.Chunk's (new 24 kHz samples and new frames, with their times)
        every `every` patches; the last item is the GenerationResult generate() returns (written to
        `output` as generate does). See streaming.stream."""
        check_count("every", every)
        return streaming.stream(self, request, every=every, progress=progress, lookahead=lookahead,
                                render=render, mp4=mp4, **kwargs)

    def generate_batch(self, requests, batch_size: int = 4, progress: Progress = False,
                       errors: str = "raise") -> list:
        """generate() for each request, the loops of up to batch_size single-window requests with one
        batch_key run together as rows of one loop (the same samples as one by one, up to float rounding);
        long-form requests run alone. Results in request order. errors="return": a request that fails has
        its exception in its place and the others go on (else the first failure raises)."""
        check_count("batch_size", batch_size)
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        runs = [_attempt(errors, self.start, request, progress, release=None) for request in requests]
        outs = self._batched_loops({n: run for n, run in enumerate(runs) if isinstance(run, Run)}, batch_size)
        results = []
        for n, run in enumerate(runs):
            if isinstance(run, Run):  # batched, or alone (long-form)
                run = _attempt(errors, lambda: self.finish(run, outs.get(n) or self.loop(run, progress), progress))
            results.append(run)
        return results

    def _batched_loops(self, runs: dict, batch_size: int) -> dict:
        """{n: GenerationOutput} of the single-window runs {n: Run}, as rows of loops of up to batch_size rows
        with one batch_key (each row its own noise generator, seeded as its lone run)."""
        groups = {}
        for n, run in runs.items():
            if not run.long_form:
                row = longform.window_row(self, run, run.windows[0],
                                          generator=longform.noise_generator(self, run.request))
                groups.setdefault(batch_key(row), []).append((n, row))
        outs = {}
        for members in groups.values():
            for lo in range(0, len(members), batch_size):
                chunk = members[lo:lo + batch_size]
                t0 = time.perf_counter()
                outs.update(zip([n for n, _ in chunk], run_rows(self.llm, [row for _, row in chunk])))
                for n, _ in chunk:
                    runs[n].timings["generate"] = time.perf_counter() - t0  # the batch's loop, shared
        return outs


def _attempt(errors: str, fn, *args, **kwargs):
    """fn(*args, **kwargs); with errors="return" a ValueError / OSError (a request's own failure) is returned
    instead of raised."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, OSError) as e:
        if errors == "raise":
            raise
        return e


class EncodingCache:
    """The reference encodings of the last `size` distinct inputs (least recently used dropped first), so a
    long-lived pipeline (the web page, a batch file) encodes a repeated voice or face once without growing
    without bound. An entry is small (a 30 s voice: ~100 kB of latents; motion: 40 floats a frame)."""

    def __init__(self, size: int = 64):
        self.size = size
        self._entries: "OrderedDict[tuple, object]" = OrderedDict()

    def get(self, key):
        if key in self._entries:
            self._entries.move_to_end(key)
        return self._entries.get(key)

    def put(self, key, value):
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _digest(*tensors: torch.Tensor) -> str:
    """Content hash of tensors (shape, dtype and bytes): the key of a cached encoding."""
    import hashlib

    h = hashlib.sha1()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


