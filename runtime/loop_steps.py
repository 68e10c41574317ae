"""How the loop's per-patch work runs: the backbone step (patch token -> next hidden state) and the CFM
sampling of one patch.

    eager        a growing KV cache (DynamicCache); every op launched from Python. CPU default.
    static       a KV cache preallocated for the whole plan (StaticCache) and fixed-shape input buffers,
                 so every step has the same shapes and tensor addresses; run eagerly. On CPU it is the
                 test double of cuda_graphs: the same code, minus the capture.
    cuda_graphs  static, with each step captured once as a CUDA graph and replayed: one launch per step
                 instead of a few thousand (28 backbone layers, 2 heads x 10 Euler steps x LocDiT). CUDA
                 default.

The three give the same numbers up to float rounding: the static cache attends over its unused slots
masked out (a longer softmax, summed in another order), a replay runs the kernels the capture recorded,
and the initial noise is drawn outside the graph by the very call the eager sampler makes, so the
random stream is the same.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from transformers.cache_utils import DynamicCache, StaticCache

BACKENDS = ("auto", "eager", "static", "cuda_graphs")


def resolve_backend(name: str, device: torch.device) -> str:
    """'auto' -> cuda_graphs on CUDA, eager elsewhere; cuda_graphs off CUDA is an error."""
    if name not in BACKENDS:
        raise ValueError(f"loop backend {name!r}: expected one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "cuda_graphs" if device.type == "cuda" else "eager"
    if name == "cuda_graphs" and device.type != "cuda":
        raise ValueError(f"loop backend cuda_graphs needs a CUDA device (the model is on {device})")
    return name


def loop_steps(model, max_tokens: int, backend: Optional[str] = None):
    """The step runner for one run of the loop: max_tokens = prefill tokens + patch steps."""
    backend = resolve_backend(backend or getattr(model, "loop_backend", "auto"), model.device)
    model.prepare_loop_kernels()
    if backend == "eager":
        return EagerSteps(model)
    return StaticSteps(model, max_tokens, capture=backend == "cuda_graphs")


class EagerSteps:
    def __init__(self, model, cache=None):
        self.model = model
        self.cache = cache if cache is not None else DynamicCache(config=model.llm.config)

    def prefill(self, embeds_bld) -> torch.Tensor:
        return self.model.backbone(embeds_bld, self.cache)[:, -1]

    def advance(self, speech_pc, motion_pc, motion_pad: bool) -> torch.Tensor:
        token = self.model.patch_token(speech_pc, motion_pc, motion_pad=motion_pad)
        return self.model.backbone(token, self.cache)[:, -1]

    def sample(self, cfm, h, cond, global_cond, sampling) -> torch.Tensor:
        return self.model.sample_patch(cfm, h, cond, global_cond, sampling.cfm_steps, sampling.cfm_temperature,
                                       sampling.cfm_cfg)


class StaticSteps(EagerSteps):
    """Fixed-shape steps over a preallocated KV cache; `capture`: as CUDA graphs (one per kind of step).
    The prefill runs eagerly (it also allocates the cache tensors)."""

    def __init__(self, model, max_tokens: int, capture: bool):
        super().__init__(model, StaticCache(config=model.llm.config, max_cache_len=int(max_tokens)))
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.calls: dict = {}

    def advance(self, speech_pc, motion_pc, motion_pad: bool) -> torch.Tensor:
        m = self.model

        def step(speech, motion=None):
            return m.backbone(m.patch_token(speech, motion, motion_pad=motion_pad), self.cache)[:, -1]

        inputs = (speech_pc,) if motion_pc is None else (speech_pc, motion_pc)
        key = ("advance", motion_pc is not None, motion_pad)
        return self._call(key, step, inputs, checkpoint=self._cache_position_undo)

    def sample(self, cfm, h, cond, global_cond, sampling) -> torch.Tensor:
        m, s = self.model, sampling
        noise = torch.randn((h.shape[0], cfm.in_channels, m.patch_size), device=h.device, dtype=torch.float32)

        def draw(h, cond, global_cond, noise):
            return m.sample_patches(cfm, h, cond, global_cond, s.cfm_steps, s.cfm_temperature, s.cfm_cfg, noise)

        key = ("sample", id(cfm), s.cfm_steps, s.cfm_temperature, s.cfm_cfg)
        return self._call(key, draw, (h.float(), cond, global_cond.float(), noise))[0]

    def _cache_position_undo(self) -> Callable[[], None]:
        """Puts every layer's write position back: a capture's warm-up run must not advance the cache."""
        lengths = [(layer, layer.cumulative_length.clone()) for layer in self.cache.layers]
        return lambda: [layer.cumulative_length.copy_(n) for layer, n in lengths]

    def _call(self, key, fn, inputs, checkpoint=None) -> torch.Tensor:
        call = self.calls.get(key)
        if call is None:
            call = self.calls[key] = StaticCall(fn, self.pool, checkpoint)
        return call(inputs)


class StaticCall:
    """fn over input buffers that keep their addresses. With a graph pool, the first call warms up once,
    captures a CUDA graph and replays it; later calls copy their inputs in and replay. `checkpoint()`
    returns a function that undoes the warm-up's side effects (called at capture only). If the capture
    fails, a warning says why and the call runs eagerly on the same buffers from then on."""

    def __init__(self, fn, pool=None, checkpoint=None):
        self.fn, self.pool, self.checkpoint = fn, pool, checkpoint
        self.buffers, self.graph, self.output = None, None, None

    def __call__(self, inputs) -> torch.Tensor:
        if self.buffers is None:
            self.buffers = [x.detach().clone() for x in inputs]
            if self.pool is not None:
                self._capture()
        else:
            for buffer, x in zip(self.buffers, inputs):
                buffer.copy_(x)
        if self.graph is None:
            return self.fn(*self.buffers).clone()
        self.graph.replay()
        return self.output.clone()

    def _capture(self) -> None:
        undo = self.checkpoint() if self.checkpoint is not None else None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream (cuBLAS handles, autocast casts)
            self.fn(*self.buffers)
            if undo is not None:
                undo()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                self.output = self.fn(*self.buffers)
        except RuntimeError as e:  # e.g. an op that syncs with the host: fall back, never fail the request
            warnings.warn(f"CUDA graph capture failed ({str(e).splitlines()[0]}); this step runs eagerly")
            self.output = None
            return
        self.graph = graph
