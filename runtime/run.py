"""One request's run, as the pipeline's stages share it, and how a run reports its progress and timings.

    run = pipe.start(request)                  # resolved request, output paths, the mode's inputs, windows
    loop = longform.WindowLoop(pipe, run)       # the loop, window after window (a single run: one window)
    for window, patch in loop: ...
    result = pipe.finish(run, loop.output)      # assembled, checked, written

TalkerPipeline.generate, .stream and .generate_batch are these three stages driven differently.
"""
from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

from runtime.inputs import ModeInputs, OutputPaths
from runtime.request import GenerationRequest

# progress: True (tqdm bars on stderr), False / None (silent), or a callable (stage, done, total)
Progress = Union[bool, None, Callable[[str, int, int], None]]


@dataclass
class Run:
    """One request's job from TalkerPipeline.start to TalkerPipeline.finish."""
    request: GenerationRequest  # resolved: every input named
    paths: Optional[OutputPaths]  # where it writes (None: nothing is written)
    inputs: ModeInputs  # what the mode feeds the loop and its outputs
    windows: list  # longform.Window's, each with its plan and text ids; one for a single run
    long_form: bool  # False: one run under the request's own length rule (its windows are not reported)
    timings: dict = field(default_factory=dict)  # stage -> seconds
    reports: list = field(default_factory=list)  # longform.WindowReport per window run

    @property
    def plan(self):
        """The plan of window 1 (of the whole run when it is a single one)."""
        return self.windows[0].plan

    @property
    def task(self) -> str:
        return "tts" if self.request.mode == "tts" else "t2av"


@contextmanager
def progress_reporter(progress: Progress, stage: str, total: int, unit: str):
    """Yield update(done): a tqdm bar, the caller's callback(stage, done, total), or nothing."""
    if callable(progress):
        yield lambda done: progress(stage, int(done), int(total))
        return
    if not progress:
        yield lambda done: None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=stage, unit=unit, leave=False, dynamic_ncols=True)
    try:
        yield lambda done: bar.update(done - bar.n)
    finally:
        bar.close()


class WindowProgress:
    """The patches of a run's loop as progress: one bar per window ("<mode> patches" for a single run,
    "<mode> window k/n patches" for long-form ones). Call with (window, patch); close at the end."""

    def __init__(self, progress: Progress, run: Run):
        self.progress, self.run = progress, run
        self.bars, self.window, self.update = ExitStack(), None, None

    def __call__(self, window, patch) -> None:
        if window is not self.window:
            self.bars.close()
            self.window = window
            mode, n = self.run.request.mode, len(self.run.windows)
            stage = f"{mode} window {window.index + 1}/{n} patches" if self.run.long_form else f"{mode} patches"
            self.update = self.bars.enter_context(
                progress_reporter(self.progress, stage, window.plan.max_steps, "patch"))
        self.update(patch.index + 1)

    def close(self) -> None:
        self.bars.close()


@contextmanager
def timed(timings: dict, key: str):
    """Adds the seconds the block takes to timings[key]."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0

