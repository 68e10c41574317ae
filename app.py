#!/usr/bin/env python
"""Talker-T2AV in the browser: a local Gradio page over TalkerPipeline, one tab a mode.

    python app.py --demo                       # tiny random models, offline: http://127.0.0.1:7860
    python app.py --checkpoint-dir DIR ...     # real weights: infer.py's weights and devices flags
    python app.py --host 0.0.0.0 --port 8080   # serve the local network (--share: a public gradio.live link)

The models load once at start-up. One generation runs at a time (the device is shared) behind a bounded
queue whose position the page shows. Requests are checked through the request schema (runtime/request.py) and
runtime.inputs.preflight and fail with the one-line message infer.py prints, the field named as the API names it
(`cfm_steps: must be in [1, 1000], got 0`). A text may hold at most --max-text-seconds of estimated speech.
A request nobody waits for any more (cancelled through the API, its client gone, its page closed, the server
stopping) stops at its next patch or rendered batch and leaves no file. Each browser session's files live in a
folder of its own, removed when the session ends; everything is removed at exit (SIGTERM and Ctrl-C stop the
running generation first; exit code 128 + the signal, as infer.py). The HTTP API has one endpoint a mode
(/t2av, /a2v, /v2a, /tts) whose parameters are GenerationRequest's field names (plus ref_image): see the
page's "Use via API" link.
"""
from __future__ import annotations

import argparse
import asyncio
import contextvars
import hashlib
import itertools
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import fields
from pathlib import Path
from typing import Optional

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: nothing phones home

import gradio as gr  # noqa: E402

import infer  # noqa: E402
from media import video_io  # noqa: E402
from common.constants import MAX_SECONDS, RELEASED_CAP_MARGIN_SECONDS  # noqa: E402
from runtime.longform import CJK_CHARS_PER_SECOND, LATIN_CHARS_PER_SECOND, WINDOW_SECONDS, estimate_speech_seconds  # noqa: E402
from runtime.inputs import DEFAULT_REF_AUDIO, DEFAULT_REF_VIDEO, DEFAULT_TEXT_FILE, SAMPLES, preflight
from runtime.pipeline import RANDOM_WEIGHTS_BANNER
from runtime.request import MODES, GenerationRequest, RequestError, field_kind  # noqa: E402

PROG = "app.py"
MAX_UPLOAD_MB = 200  # a 30 s clip (one model window, constants.MAX_SECONDS) of high-bitrate 1080p video fits
QUEUE_SIZE = 8
# The longest text the page takes, in estimated seconds of speech (longform.estimate_speech_seconds: 14
# characters a second, CJK 4.5): 10 model windows of 30 s, generated as ~25 long-form windows of 12 s. It
# bounds the work one request may hold the shared device for; infer.py takes any length.
MAX_TEXT_SECONDS = 300
POLL_S = 0.1  # how often a waiting request looks whether its client is still there
STOP_WAIT_S = 60  # how long stopping (a closed page, the server's exit) waits for a generation's next patch
MEDIA_HEIGHT = 240  # px of the face and result players
DEMO_NOTICE = "demo: random weights, not real speech or faces"

# mode: (tab title, what the tab does, its inputs row by row: request fields, and ref_image for a still face)
FACE = ("ref_video", "ref_image")
TABS = {
    "t2av": ("Text to talking face", "Speech and the talking face, generated together from the text, in the "
             "reference voice and face.", (("text",), ("ref_audio",), FACE)),
    "a2v": ("Audio to face", "The face speaks the driving audio (kept unchanged in the output); the text is its "
            "transcript, optional.", (("audio",), ("text",), ("ref_audio",), FACE)),
    "v2a": ("Video to speech", "New speech for a talking-head video (its frames are kept): the text is what is "
            "said in it, spoken in the reference voice.", (("video",), ("text",), ("ref_audio",), FACE)),
    "tts": ("Text to speech", "Speech only, in the reference voice (a wav).", (("text",), ("ref_audio",))),
}
# The page's own words for its inputs and options, where the schema's help speaks of the CLI (flags, files,
# other modes): {field: text, or {mode: text}} (runtime/request.py's help is used for the other options).
LABELS = {"text": {"a2v": "transcript (optional)"}, "ref_audio": "reference voice",
          "audio": "driving audio (kept unchanged in the result)", "video": "video to dub (its frames are kept)",
          "ref_video": {"v2a": "reference motion: a video of the speaker (it prompts the model; it is not shown)",
                        None: "reference face: a video (its first frame is the face)"},
          "ref_image": "... or a still image (used instead of the video when given)"}
PAGE_HELP = {
    "text": {"a2v": "what is said in the driving audio; empty: the face follows the audio alone",
             "v2a": "what is said in the video, spoken anew in the reference voice",
             None: "the words to speak, up to about {max_text_seconds} s of speech (a long text is "
                   f"generated in windows of about {WINDOW_SECONDS:g} s, one after another)"},
    "save_latents": {"tts": "also offer the speech latents (.safetensors) among the downloads",
                     None: "also offer the speech latents and the motion (.safetensors) among the downloads"},
    "max_seconds": {mode: f"cap on the generated length in seconds (at most {MAX_SECONDS}). Empty: as released, "
                          f"the reference {clip}'s length + {RELEASED_CAP_MARGIN_SECONDS:g} s; a long text, "
                          "generated in windows, gets a cap per window from its length"
                    for mode, clip in (("t2av", "clip"), ("tts", "voice"))},
    "trim_prefix": "leave out of the result its start, replayed from the reference clip (gt prefix seconds)",
    "gt_prefix_seconds": {
        "t2av": "seconds of the reference clip (voice and face) fed before generation; the result starts with "
                "them unless trim prefix is on (0: the voice and face identity only)",
        "tts": "seconds of the reference voice fed before generation; the result starts with them unless trim "
               "prefix is on (0: the voice identity only)",
        None: "seconds of the reference clip (voice and face) fed before generation (0: the voice and face "
              "identity only)"},
}
# request fields the page never shows: set by the page, read from .pt files (CLI only), or fixed (25 fps)
PAGE_SETS = ("mode", "output", "ref_motion", "motion", "fps")
LENGTH_OPTIONS = ("max_seconds", "trim_prefix")  # t2av/tts only: in a2v/v2a the input sets the length
MEDIA = ("ref_audio", "audio", "video", "ref_video", "ref_image")  # the inputs that are files
FIELDS = {f.name: f for f in fields(GenerationRequest)}
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],  # local fonts: no CDN
                          font_mono=["ui-monospace", "monospace"])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.strip().splitlines()[0],
                                 formatter_class=infer.HelpFormatter)
    infer.add_model_options(ap)
    g = ap.add_argument_group("serving")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    g.add_argument("--port", type=int, default=7860, help="port to listen on")
    g.add_argument("--share", action="store_true", help="also open a public gradio.live link (reaches the "
                                                        "internet: only when asked)")
    g.add_argument("--queue-size", type=int, default=QUEUE_SIZE,
                   help="requests that may wait for the device; more are refused")
    g.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB, help="largest upload accepted")
    g.add_argument("--max-text-seconds", type=float, default=MAX_TEXT_SECONDS,
                   help="longest text accepted, in estimated seconds of speech (about 14 characters a second, "
                        "CJK 4.5); long texts are generated in windows of about 12 s, one after another")
    return ap


# ------------------------------------------------------------------------------------------ requests

def page_request(mode: str, values: dict, output: str, max_text_seconds: float = MAX_TEXT_SECONDS
                 ) -> GenerationRequest:
    """The request of a tab's values (request fields; a still image given as ref_image is the face), checked
    as infer.py checks a request, and the text's length (check_text_length)."""
    values = dict(values)
    image = values.pop("ref_image", None)
    if image:
        values["ref_video"] = image
    req = GenerationRequest.from_mapping({**values, "mode": mode, "output": output})
    if req.text is not None:
        check_text_length(req.text, max_text_seconds)
    return preflight(req)


def check_text_length(text: str, max_seconds: float) -> None:
    """RequestError('text', ...) for a text longer than max_seconds of estimated speech (the estimate that
    long-form splits by, longform.estimate_speech_seconds). What a text may hold (words to speak, valid
    Unicode) is the schema's check (GenerationRequest), as in infer.py."""
    n = len(text.strip())
    # an estimate is at least n / LATIN_CHARS_PER_SECOND: a huge text is refused before it is read through
    seconds = n / LATIN_CHARS_PER_SECOND
    if seconds <= max_seconds:
        seconds = estimate_speech_seconds(text)
    if seconds > max_seconds:
        raise RequestError("text", f"too long for this server: {n} characters, about {seconds:.0f} s of speech; "
                                   f"it takes at most {max_seconds:g} s (about "
                                   f"{int(max_seconds * LATIN_CHARS_PER_SECOND)} characters of alphabetic text, "
                                   f"{int(max_seconds * CJK_CHARS_PER_SECOND)} of CJK); infer.py takes any length")


def report(result, is_demo: bool) -> str:
    """The summary line, each warning, and the demo notice: one line each."""
    lines = [result.summary(), *(f"warning: {w}" for w in result.warnings)]
    return "\n".join(lines + ([f"warning: {DEMO_NOTICE}"] if is_demo else []))


class Stopped(Exception):
    """Raised from the pipeline's progress callback once nobody waits for a request: the generation stops at
    its next patch (or rendered batch, or batch of motion frames) and, its outputs being written all or
    nothing (atomic.atomic_outputs), leaves no file."""


class Run:
    """One request on the device: whose it is, whether it is still wanted, how far it got, how it ended."""

    def __init__(self, mode: str, session: str, event=None):
        self.mode, self.session, self.event = mode, session, event  # event: gradio's record (see queue_event)
        self.reason: Optional[str] = None  # why it was stopped; None while it is wanted
        self.at = "before its first patch"
        self.result = self.error = None
        self.done = threading.Event()

    def stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def check(self) -> None:
        if self.reason is not None:
            raise Stopped(self.reason)


def queue_event():
    """The gradio queue's record of the request being run (gradio internals, pinned in requirements-app.txt):
    its `alive` turns False when the client's connection closes. None if it cannot be found (a gone client is
    then noticed when its session ends)."""
    try:
        from gradio.context import LocalContext

        blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
        return blocks._queue.event_ids_to_events.get(event_id)
    except (ImportError, AttributeError):
        return None


def page_progress(progress: gr.Progress, run: Optional[Run] = None):
    """The pipeline's progress callback (stage, done, total) drawn as the page's progress bar; it raises
    Stopped once the run is no longer wanted."""
    def update(stage: str, done: int, total: int) -> None:
        if run is not None:
            run.at = f"{stage} {done}/{total}"
            run.check()
        progress((done, total), desc=stage, unit="patches" if stage.endswith("patches") else "frames")
    return update


class SessionFiles:
    """Each session's outputs in a folder of its own, and the uploads its requests used; both removed when
    the session ends (an upload only once no other live session uses it; never a file in `keep`)."""

    def __init__(self, root: Path, upload_root: Path):
        self.root, self.upload_root = Path(root), Path(upload_root).resolve()
        self.keep: set = set()  # the cached copies of the bundled samples (defaults and examples)
        self._uploads: dict = {}
        self._lock = threading.Lock()

    def folder(self, session: str, uploads=()) -> Path:
        with self._lock:
            self._uploads.setdefault(session, set()).update(str(Path(p).resolve()) for p in uploads)
        path = self.root / _safe_name(session)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def end(self, session: str) -> None:
        with self._lock:
            uploads = self._uploads.pop(session, set())
            in_use = set().union(self.keep, *self._uploads.values())
        shutil.rmtree(self.root / _safe_name(session), ignore_errors=True)
        for path in uploads - in_use:
            if Path(path).is_relative_to(self.upload_root):
                Path(path).unlink(missing_ok=True)


def _safe_name(session: str) -> str:
    """A folder name for a session id (it comes from the client: never a path)."""
    return hashlib.sha256(str(session).encode()).hexdigest()[:24]


# ------------------------------------------------------------------------------------------ the page

class TalkerApp:
    """The page and its API over one TalkerPipeline (loaded before, used by one request at a time)."""

    def __init__(self, pipe, cache: Path, max_text_seconds: float = MAX_TEXT_SECONDS):
        """cache: gradio's file cache (GRADIO_TEMP_DIR): outputs written there are served without a copy."""
        self.pipe = pipe
        self.sessions = SessionFiles(Path(cache) / "sessions", cache)
        self.max_text_seconds = max_text_seconds
        self._numbers = itertools.count()
        self.still_face = video_io.read_first_frame(DEFAULT_REF_VIDEO)  # the sample face as a still image
        self._device = threading.Lock()  # one generation at a time, whatever the queue believes
        self._runs: set = set()
        self._runs_lock = threading.Lock()
        self._closing: Optional[str] = None  # set when the server stops: later requests stop at once

    def generate(self, mode: str, values: dict, progress, session: str, run: Optional[Run] = None):
        """One request of a tab -> (mp4 or wav, [downloads], report). A bad request raises gr.Error with the
        line infer.py prints (the field named as in the API), and the app goes on; a stopped run raises
        Stopped."""
        uploads = [values[name] for name in MEDIA if values.get(name)]
        stem = self.sessions.folder(session, uploads) / f"{mode}-{next(self._numbers):04d}"
        try:
            req = page_request(mode, values, f"{stem}.wav" if mode == "tts" else f"{stem}.mp4",
                               self.max_text_seconds)
            result = self.pipe.generate(req, progress=page_progress(progress, run))
        except (ValueError, OSError) as e:
            message = infer.message_of(e, in_batch_line=True)
            for path in uploads:  # name an upload as its sender knows it, not by its place on the server
                message = message.replace(path, Path(path).name)
            print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
            raise gr.Error(message, print_exception=False) from None
        media = result.wav_path if mode == "tts" else result.video_path
        downloads = [p for p in (result.wav_path, result.latents_path) if p]
        return media, downloads, report(result, self.pipe.is_demo)

    async def serve_request(self, mode: str, values: dict, progress, session: str):
        """generate() in a thread of its own, watched from here: a cancel (this task cancelled by gradio's
        /cancel) or a gone client stops it at its next patch. A cancelled request keeps its slot of the
        device until its generation has stopped, so that the next one never runs beside it."""
        run = Run(mode, session, queue_event())
        if self._closing:
            run.stop(self._closing)
        with self._runs_lock:
            self._runs.add(run)
        context = contextvars.copy_context()  # the progress bar finds its request through gradio's context
        threading.Thread(target=context.run, args=(self._work, run, values, progress), name=f"{PROG} {mode}",
                         daemon=False).start()
        try:
            while not run.done.is_set():
                if run.event is not None and not run.event.alive:
                    run.stop("its client went away")
                await asyncio.sleep(POLL_S)
        except asyncio.CancelledError:
            run.stop("cancelled by its client")
            while not run.done.is_set():
                await asyncio.sleep(POLL_S)
            raise
        if run.error is not None:
            raise run.error
        if run.reason is not None:
            raise gr.Error(f"stopped: {run.reason}", print_exception=False)
        return run.result

    def _work(self, run: Run, values: dict, progress) -> None:
        try:
            with self._device:
                run.check()
                run.result = self.generate(run.mode, values, progress, run.session, run)
        except Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 - gr.Error (a bad request) or a fault: raised by the request
            run.error = e
        finally:
            if run.reason is not None:
                self._discard(run)
            with self._runs_lock:
                self._runs.discard(run)
            run.done.set()

    @staticmethod
    def _discard(run: Run) -> None:
        """A stopped run's files: none were written unless it ended before it could stop; those go."""
        if run.result is not None:
            media, downloads, _ = run.result
            for path in {media, *downloads}:
                Path(path).unlink(missing_ok=True)
            run.result = None
        print(f"{PROG}: stopped a {run.mode} request ({run.reason}) at {run.at}; it left no file",
              file=sys.stderr, flush=True)

    def stop(self, reason: str, session: Optional[str] = None, timeout: float = STOP_WAIT_S) -> bool:
        """Stop the running generations (of one session, or all), and wait until they have; False if one
        did not stop within `timeout` seconds."""
        with self._runs_lock:
            runs = [r for r in self._runs if session is None or r.session == session]
        for r in runs:
            r.stop(reason)
        deadline = time.monotonic() + timeout
        return all([r.done.wait(max(0.0, deadline - time.monotonic())) for r in runs])

    def close(self, reason: str = "the server is stopping") -> bool:
        """Stop every generation, and refuse the ones that would start after."""
        self._closing = reason
        return self.stop(reason)

    def end_session(self, request: gr.Request):
        self.stop("its client went away", session=request.session_hash)
        self.sessions.end(request.session_hash)

    def build(self) -> gr.Blocks:
        with gr.Blocks(title="Talker-T2AV", analytics_enabled=False, delete_cache=(1800, 3600)) as page:
            gr.Markdown("# Talker-T2AV\nJoint talking audio-video generation ([arXiv 2604.23586]"
                        "(https://arxiv.org/abs/2604.23586)). One tab a mode; options keep the released "
                        "defaults.")
            if self.pipe.is_demo:
                gr.Markdown(f"**{RANDOM_WEIGHTS_BANNER.strip('* ')}**", elem_id="demo-banner")
            for mode in MODES:
                with gr.Tab(TABS[mode][0], id=mode, elem_id=f"tab-{mode}"):
                    self._tab(mode)
            page.unload(self.end_session)
        self.sessions.keep = set().union(*(getattr(b, "keep_in_cache", set()) for b in page.blocks.values()))
        return page

    def _tab(self, mode: str) -> None:
        _, what, rows = TABS[mode]
        names = [name for row in rows for name in row]
        gr.Markdown(what)
        with gr.Row():
            with gr.Column():
                inputs = {}
                for row in rows:
                    with gr.Row():
                        inputs.update((name, input_component(name, mode, self.max_text_seconds)) for name in row)
                with gr.Accordion("options", open=False, elem_id=f"options-{mode}"):
                    inputs.update((f.name, option_component(f, mode)) for f in option_fields(mode))
                button = gr.Button("Generate", variant="primary", elem_id=f"generate-{mode}")
            with gr.Column():
                if mode == "tts":
                    media = gr.Audio(label="result", type="filepath", interactive=False, elem_id=f"result-{mode}")
                else:
                    media = gr.Video(label="result", interactive=False, elem_id=f"result-{mode}")
                downloads = gr.File(label="downloads", file_count="multiple", interactive=False,
                                    elem_id=f"downloads-{mode}")
                summary = gr.Textbox(label="report", lines=3, interactive=False, elem_id=f"report-{mode}")
        gr.Examples(self._sample_rows(mode, names), [inputs[n] for n in names], label="bundled samples")

        async def run(request: gr.Request, progress=gr.Progress(), *, ref_image=None, max_seconds=None, **values):
            # the inputs that may be left empty default to None here, so that they are optional in the API too
            values.update(ref_image=ref_image, max_seconds=max_seconds)
            return await self.serve_request(mode, values, progress, request.session_hash)

        run.__doc__ = what

        button.click(run, inputs_kwargs=inputs, outputs=[media, downloads, summary], api_name=mode,
                     concurrency_limit=1, concurrency_id="device")

    def _sample_rows(self, mode: str, names) -> list:
        """The bundled samples as examples: the CLI's defaults, then (tabs with a face) the face as a still
        image, (tts) the example batch file's texts."""
        defaults = dict(text=default_text(mode), ref_audio=str(DEFAULT_REF_AUDIO), audio=str(DEFAULT_REF_AUDIO),
                        video=str(DEFAULT_REF_VIDEO), ref_video=str(DEFAULT_REF_VIDEO), ref_image=None)
        rows = [defaults]
        if "ref_image" in names:
            rows.append({**defaults, "ref_video": None, "ref_image": self.still_face})
        if mode == "tts":
            batch = infer.read_batch_file(SAMPLES / "prompts.jsonl")
            rows += [{**defaults, "text": entry["text"]} for _, entry in batch]
        return [[row[n] for n in names] for row in rows]


def default_text(mode: str) -> str:
    """The CLI's default text: samples/default_text.txt; in a2v none (the motion follows the audio alone)."""
    return "" if mode == "a2v" else DEFAULT_TEXT_FILE.read_text(encoding="utf-8").strip()


def _for_tab(texts: dict, name: str, mode: str, default=None):
    """A tab's text for a field: texts[name] itself, or its entry for the mode (None: every other mode)."""
    text = texts.get(name, default)
    return text.get(mode, text.get(None, default)) if isinstance(text, dict) else text


def label_of(name: str, mode: str) -> str:
    return _for_tab(LABELS, name, mode, name.replace("_", " "))


def help_of(name: str, mode: str, max_text_seconds: float = MAX_TEXT_SECONDS) -> str:
    """What a field does in this tab: the page's own words (PAGE_HELP), else the schema's help."""
    text = _for_tab(PAGE_HELP, name, mode, FIELDS[name].metadata["help"])
    return text.replace("{max_text_seconds}", f"{max_text_seconds:g}")


def input_component(name: str, mode: str, max_text_seconds: float = MAX_TEXT_SECONDS):
    label, elem_id = label_of(name, mode), f"{name}-{mode}"
    if name == "text":
        return gr.Textbox(default_text(mode), label=label, info=help_of(name, mode, max_text_seconds), lines=3,
                          elem_id=elem_id)
    if name in ("ref_audio", "audio"):
        return gr.Audio(str(DEFAULT_REF_AUDIO), label=label, sources=["upload", "microphone"], type="filepath",
                        elem_id=elem_id)
    if name in ("ref_video", "video"):
        return gr.Video(str(DEFAULT_REF_VIDEO), label=label, sources=["upload"], height=MEDIA_HEIGHT,
                        elem_id=elem_id)
    return gr.Image(label=label, type="filepath", format="png", sources=["upload", "clipboard"],
                    height=MEDIA_HEIGHT, elem_id=elem_id)


def option_fields(mode: str) -> list:
    """The request fields a tab offers as options (the numbers and switches), in the schema's order."""
    hidden = set(PAGE_SETS) | (set(LENGTH_OPTIONS) if mode in ("a2v", "v2a") else set())
    return [f for f in FIELDS.values() if f.name not in hidden and field_kind(f) in ("bool", "int", "float")
            and not (field_kind(f) == "bool" and f.default is None)]  # auto switches (long_form) stay auto


def _as_sent(payload):
    return payload


def option_component(f, mode: str):
    """A field's widget: its default and range from the schema (request.GenerationRequest), its help as the
    tab puts it (help_of)."""
    meta, kind, label, elem_id = f.metadata, field_kind(f), label_of(f.name, mode), f"{f.name}-{mode}"
    info = help_of(f.name, mode)
    if kind == "bool":
        return gr.Checkbox(f.default, label=label, info=info, elem_id=elem_id)
    number = gr.Number(f.default, label=label, info=info, minimum=meta["low"], maximum=meta["high"],
                       precision=0 if kind == "int" else None, step=1 if kind == "int" else 0.1, elem_id=elem_id)
    # The value reaches the request schema as sent: the schema, not gradio, checks its type and range, so that
    # an API caller gets infer.py's line (`cfm_steps: must be in [1, 1000], got 0`) instead of gradio's message
    # and a traceback, and 2.5 steps is refused, not rounded. (Set on the instance: a subclass of a gradio
    # component makes gradio write a .pyi stub beside this file.) The widget keeps its range and step.
    number.preprocess = _as_sent
    return number


# ------------------------------------------------------------------------------------------ serving

def serve(args) -> int:
    if args.queue_size < 1:
        raise infer.UserError(f"--queue-size must be >= 1, got {args.queue_size}")
    if not args.max_text_seconds > 0:
        raise infer.UserError(f"--max-text-seconds must be > 0, got {args.max_text_seconds:g}")
    pipe = infer.load_pipeline(args, MODES)
    pipe.generator  # noqa: B018 - LIA-X loads on first use: load it now, not in the first request
    cache = Path(tempfile.mkdtemp(prefix="talker-app-"))
    os.environ["GRADIO_TEMP_DIR"] = str(cache)  # this server's uploads and outputs, removed at exit
    talker = page = None
    try:
        talker = TalkerApp(pipe, cache, args.max_text_seconds)
        page = talker.build()
        page.queue(max_size=args.queue_size, default_concurrency_limit=1)
        page.launch(server_name=args.host, server_port=args.port, share=args.share, theme=THEME,
                    max_file_size=int(args.max_upload_mb * 2 ** 20), allowed_paths=[str(SAMPLES)], show_error=True,
                    ssr_mode=False, prevent_thread_lock=True)
        while page.is_running:  # until a signal (STOP_SIGNALS) raises infer.Terminated here
            time.sleep(0.5)
    finally:
        if talker is not None:  # the running generation stops at its next patch, before the files go
            talker.close()
        if page is not None:
            page.close(verbose=False)
        shutil.rmtree(cache, ignore_errors=True)
    return 0


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _stop_signal(signum, frame):
    for sig in STOP_SIGNALS:  # stopping waits for the running generation's next patch: let no signal cut it
        signal.signal(sig, signal.SIG_IGN)
    raise infer.Terminated(signum)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.download:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched unless asked for
    for sig in STOP_SIGNALS:  # stop as infer.py does: every cleanup runs, exit code 128 + the signal
        signal.signal(sig, _stop_signal)
    t0 = time.perf_counter()
    try:
        code = serve(args)
    except (infer.UserError, ValueError, OSError) as e:
        print(f"{PROG}: error: {infer.message_of(e)}", file=sys.stderr, flush=True)
        code = 1
    except infer.Terminated as e:
        print(f"{PROG}: {e} after {time.perf_counter() - t0:.0f} s: stopped; the server's files were removed",
              file=sys.stderr, flush=True)
        code = e.exit_code
    if any(t.name.startswith(f"{PROG} ") and t.is_alive() for t in threading.enumerate()):
        # a generation that did not reach its next patch in STOP_WAIT_S: leave without waiting for it (the
        # interpreter's exit under a running torch thread aborts)
        print(f"{PROG}: a generation did not stop within {STOP_WAIT_S} s; leaving it", file=sys.stderr, flush=True)
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
