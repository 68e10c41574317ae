#!/usr/bin/env python
"""Talker-T2AV in the browser: a local Gradio page over TalkerPipeline, one tab a mode.

    python app.py --demo                       # tiny random models, offline: http://127.0.0.1:7860
    python app.py --checkpoint-dir DIR ...     # real weights: infer.py's weights and devices flags
    python app.py --host 0.0.0.0 --port 8080   # serve the local network (--share: a public gradio.live link)

The models load once at start-up. One generation runs at a time (the device is shared) behind a bounded
queue whose position the page shows. Requests are checked with pipeline.preflight and fail with the one-line
message infer.py prints. Each browser session's files live in a folder of its own, removed when the session
ends; everything is removed at exit. The HTTP API has one endpoint a mode (/t2av, /a2v, /v2a, /tts) whose
parameters are GenerationRequest's field names (plus ref_image): see the page's "Use via API" link.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import fields
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: nothing phones home

import gradio as gr  # noqa: E402

import infer  # noqa: E402
import video_io  # noqa: E402
from pipeline import (DEFAULT_REF_AUDIO, DEFAULT_REF_VIDEO, DEFAULT_TEXT_FILE, RANDOM_WEIGHTS_BANNER,  # noqa: E402
                      SAMPLES, preflight)
from request import MODES, GenerationRequest, field_kind  # noqa: E402

PROG = "app.py"
MAX_UPLOAD_MB = 200  # a 30 s clip (the CLI's limit, constants.MAX_SECONDS) of high-bitrate 1080p video fits
QUEUE_SIZE = 8
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
LABELS = {"text": "text", "ref_audio": "reference voice", "audio": "driving audio (at most 30 s)",
          "video": "video to dub (at most 30 s)", "ref_video": "reference face: a video",
          "ref_image": "... or a still image (used instead of the video when given)"}
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
    return ap


# ------------------------------------------------------------------------------------------ requests

def page_request(mode: str, values: dict, output: str) -> GenerationRequest:
    """The request of a tab's values (request fields; a still image given as ref_image is the face)."""
    values = dict(values)
    image = values.pop("ref_image", None)
    if image:
        values["ref_video"] = image
    return preflight(GenerationRequest.from_mapping({**values, "mode": mode, "output": output}))


def report(result, is_demo: bool) -> str:
    """The summary line, each warning, and the demo notice: one line each."""
    lines = [result.summary(), *(f"warning: {w}" for w in result.warnings)]
    return "\n".join(lines + ([f"warning: {DEMO_NOTICE}"] if is_demo else []))


def page_progress(progress: gr.Progress):
    """The pipeline's progress callback (stage, done, total) drawn as the page's progress bar."""
    def update(stage: str, done: int, total: int) -> None:
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

    def __init__(self, pipe, cache: Path):
        """cache: gradio's file cache (GRADIO_TEMP_DIR): outputs written there are served without a copy."""
        self.pipe = pipe
        self.sessions = SessionFiles(Path(cache) / "sessions", cache)
        self._numbers = itertools.count()
        self.still_face = video_io.read_first_frame(DEFAULT_REF_VIDEO)  # the sample face as a still image

    def generate(self, mode: str, values: dict, progress, session: str):
        """One request of a tab -> (mp4 or wav, [downloads], report). A bad request raises gr.Error with the
        line infer.py prints, and the app goes on."""
        uploads = [values[name] for name in MEDIA if values.get(name)]
        stem = self.sessions.folder(session, uploads) / f"{mode}-{next(self._numbers):04d}"
        try:
            req = page_request(mode, values, f"{stem}.wav" if mode == "tts" else f"{stem}.mp4")
            result = self.pipe.generate(req, progress=page_progress(progress))
        except (ValueError, OSError) as e:
            message = infer.message_of(e)
            for path in uploads:  # name an upload as its sender knows it, not by its place on the server
                message = message.replace(path, Path(path).name)
            print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
            raise gr.Error(message, print_exception=False) from None
        media = result.wav_path if mode == "tts" else result.video_path
        downloads = [p for p in (result.wav_path, result.latents_path) if p]
        return media, downloads, report(result, self.pipe.is_demo)

    def end_session(self, request: gr.Request):
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
                        inputs.update((name, input_component(name, mode)) for name in row)
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

        def run(request: gr.Request, progress=gr.Progress(), *, ref_image=None, max_seconds=None, **values):
            # the inputs that may be left empty default to None here, so that they are optional in the API too
            values.update(ref_image=ref_image, max_seconds=max_seconds)
            return self.generate(mode, values, progress, request.session_hash)

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


def input_component(name: str, mode: str):
    if name == "text":
        return gr.Textbox(default_text(mode), label=LABELS[name], info=FIELDS["text"].metadata["help"], lines=3,
                          elem_id=f"{name}-{mode}")
    if name in ("ref_audio", "audio"):
        return gr.Audio(str(DEFAULT_REF_AUDIO), label=LABELS[name], sources=["upload", "microphone"],
                        type="filepath", elem_id=f"{name}-{mode}")
    if name in ("ref_video", "video"):
        return gr.Video(str(DEFAULT_REF_VIDEO), label=LABELS[name], sources=["upload"], height=MEDIA_HEIGHT,
                        elem_id=f"{name}-{mode}")
    return gr.Image(label=LABELS[name], type="filepath", format="png", sources=["upload", "clipboard"],
                    height=MEDIA_HEIGHT, elem_id=f"{name}-{mode}")


def option_fields(mode: str) -> list:
    """The request fields a tab offers as options (the numbers and switches), in the schema's order."""
    hidden = set(PAGE_SETS) | (set(LENGTH_OPTIONS) if mode in ("a2v", "v2a") else set())
    return [f for f in FIELDS.values() if f.name not in hidden and field_kind(f) in ("bool", "int", "float")
            and not (field_kind(f) == "bool" and f.default is None)]  # auto switches (long_form) stay auto


def option_component(f, mode: str):
    """A field's widget: its default, range and help from the schema (request.GenerationRequest)."""
    meta, kind, label, elem_id = f.metadata, field_kind(f), f.name.replace("_", " "), f"{f.name}-{mode}"
    if kind == "bool":
        return gr.Checkbox(f.default, label=label, info=meta["help"], elem_id=elem_id)
    return gr.Number(f.default, label=label, info=meta["help"], minimum=meta["low"], maximum=meta["high"],
                     precision=0 if kind == "int" else None, step=1 if kind == "int" else 0.1, elem_id=elem_id)


# ------------------------------------------------------------------------------------------ serving

def serve(args) -> int:
    if args.queue_size < 1:
        raise infer.UserError(f"--queue-size must be >= 1, got {args.queue_size}")
    pipe = infer.load_pipeline(args, MODES)
    pipe.generator  # noqa: B018 - LIA-X loads on first use: load it now, not in the first request
    cache = Path(tempfile.mkdtemp(prefix="talker-app-"))
    os.environ["GRADIO_TEMP_DIR"] = str(cache)  # this server's uploads and outputs, removed at exit
    try:
        page = TalkerApp(pipe, cache).build()
        page.queue(max_size=args.queue_size, default_concurrency_limit=1)
        page.launch(server_name=args.host, server_port=args.port, share=args.share, theme=THEME,
                    max_file_size=int(args.max_upload_mb * 2 ** 20), allowed_paths=[str(SAMPLES)], show_error=True,
                    ssr_mode=False)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.download:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched unless asked for
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as on Ctrl-C: the files are removed
    try:
        return serve(args)
    except (infer.UserError, ValueError, OSError) as e:
        print(f"{PROG}: error: {infer.message_of(e)}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
