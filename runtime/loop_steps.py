"""How the loop's per-patch work runs: the backbone step (patch tokens -> next hidden states) and the CFM
sampling of one patch per row, for one request or a batch of them (rows).

    eager        a growing KV cache (DynamicCache); every op launched from Python. CPU default. Rows that
                 end leave the batch (their cache rows are dropped).
    static       a KV cache preallocated for the whole plan (StaticCache) and fixed-shape input buffers,
                 so every step has the same shapes and tensor addresses; run eagerly. On CPU it is the
                 test double of cuda_graphs: the same code, minus the capture. Rows that end stay in the
                 batch (fixed shapes), their results unread.
    cuda_graphs  static, with each step captured once as a CUDA graph and replayed: one launch per step
                 instead of a few thousand (28 backbone layers, 2 heads x 10 Euler steps x LocDiT). CUDA
                 default.

Several rows: their prefills are left-padded to one length, and every backbone call gets the attention mask
of the padding and each row's own positions. The three backends give the same numbers up to float rounding:
the static cache attends over its unused slots masked out (a longer softmax, summed in another order), a
replay runs the kernels the capture recorded, and the initial noise is drawn outside by the loop, so the
random stream is the same.
"""
from __future__ import annotations

import warnings
from typing import Callable, List, Optional

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


def loop_steps(model, max_tokens: int, backend: Optional[str] = None, batch: int = 1):
    """The step runner for one run of the loop: max_tokens = prefill tokens + patch steps; batch = rows."""
    backend = resolve_backend(backend or getattr(model, "loop_backend", "auto"), model.device)
    model.prepare_loop_kernels()
    if backend == "eager":
        return EagerSteps(model)
    return StaticSteps(model, max_tokens, batch, capture=backend == "cuda_graphs")


def left_padded(prefills: List[torch.Tensor]):
    """(embeds (B, L, D), attention mask (B, L) long) of (1, L_i, D) prefills, padded on the left; mask None
    for one row."""
    if len(prefills) == 1:
        return prefills[0], None
    length = max(p.shape[1] for p in prefills)
    embeds = prefills[0].new_zeros((len(prefills), length, prefills[0].shape[-1]))
    mask = torch.zeros((len(prefills), length), dtype=torch.long, device=prefills[0].device)
    for b, p in enumerate(prefills):
        embeds[b, length - p.shape[1]:] = p[0]
        mask[b, length - p.shape[1]:] = 1
    return embeds, mask


def positions_of(mask: torch.Tensor, n_new: int) -> torch.Tensor:
    """(B, n_new) position ids of the last n_new slots of a left-padded mask (each row counts its own tokens)."""
    return (mask.cumsum(-1) - 1).clamp_min(0)[:, mask.shape[1] - n_new:]


class EagerSteps:
    def __init__(self, model, cache=None):
        self.model = model
        self.cache = cache if cache is not None else DynamicCache(config=model.llm.config)
        self.mask: Optional[torch.Tensor] = None  # (B, tokens so far) with several rows

    def prefill(self, prefills: List[torch.Tensor]) -> torch.Tensor:
        """(B, D) last hidden state of each row's prefill."""
        embeds, self.mask = left_padded(prefills)
        return self._backbone(embeds)

    def advance(self, speech_bpc, motion_bpc, motion_pad: bool) -> torch.Tensor:
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        return self._backbone(self.model.patch_token(speech_bpc, motion_bpc, motion_pad=motion_pad))

    def keep(self, rows: List[int]) -> None:
        """Only these rows (indices into the current ones) go on."""
        index = torch.tensor(rows, dtype=torch.long, device=self.model.device)
        self.cache.batch_select_indices(index)
        self.mask = None if self.mask is None else self.mask[index]

    def sample(self, cfm, h, cond, global_cond, noise, sampling) -> torch.Tensor:
        """(B, P, C) one patch per row; `noise` (B, C, P) already scaled by each row's temperature."""
        return self.model.sample_patches(cfm, h, cond, global_cond, sampling.cfm_steps, 1.0, sampling.cfm_cfg, noise)

    def _backbone(self, embeds_bld) -> torch.Tensor:
        if self.mask is None:
            return self.model.backbone(embeds_bld, self.cache)[:, -1]
        positions = positions_of(self.mask, embeds_bld.shape[1])
        return self.model.backbone(embeds_bld, self.cache, self.mask, positions)[:, -1]


class StaticSteps(EagerSteps):
    """Fixed-shape steps over a preallocated KV cache; `capture`: as CUDA graphs (one per kind of step).
    The prefill runs eagerly (it also allocates the cache tensors). Every backbone step runs all `batch`
    rows: a row that ended keeps its slot (its last inputs, its results unread)."""

    def __init__(self, model, max_tokens: int, batch: int, capture: bool):
        super().__init__(model, StaticCache(config=model.llm.config, max_cache_len=int(max_tokens)))
        self.max_tokens = int(max_tokens)
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.calls: dict = {}
        self.live = list(range(batch))  # slots of the rows that go on
        self.inputs: Optional[list] = None  # the last full-batch token inputs (ended rows keep theirs)

    def prefill(self, prefills: List[torch.Tensor]) -> torch.Tensor:
        embeds, mask = left_padded(prefills)
        if mask is not None:  # the mask over the whole cache: the slots not written yet are masked out
            self.mask = mask.new_zeros((mask.shape[0], self.max_tokens))
            self.mask[:, :mask.shape[1]] = mask
            self.length = mask.shape[1]
            positions = positions_of(mask, embeds.shape[1])
            return self.model.backbone(embeds, self.cache, self.mask, positions)[:, -1]
        return self.model.backbone(embeds, self.cache)[:, -1]

    def keep(self, rows: List[int]) -> None:
        self.live = [self.live[k] for k in rows]

    def advance(self, speech_bpc, motion_bpc, motion_pad: bool) -> torch.Tensor:
        m = self.model
        inputs = [speech_bpc] if motion_bpc is None else [speech_bpc, motion_bpc]
        if self.mask is None:  # one row
            def step(speech, motion=None):
                return m.backbone(m.patch_token(speech, motion, motion_pad=motion_pad), self.cache)[:, -1]

            key = ("advance", motion_bpc is not None, motion_pad)
            return self._call(key, step, inputs, checkpoint=self._cache_position_undo)
        inputs = self._full_batch(inputs)
        self.mask[:, self.length] = 1
        self.length += 1
        positions = self.mask[:, :self.length].sum(-1, keepdim=True) - 1

        def step(mask, positions, speech, motion=None):
            token = m.patch_token(speech, motion, motion_pad=motion_pad)
            return m.backbone(token, self.cache, mask, positions)[:, -1]

        key = ("advance", motion_bpc is not None, motion_pad, "rows")
        h = self._call(key, step, [self.mask, positions] + inputs, checkpoint=self._cache_position_undo)
        return h[self.live]

    def _full_batch(self, inputs: list) -> list:
        """The live rows' inputs in their slots; the ended rows' slots keep their last inputs."""
        if self.inputs is None or [x.shape[1:] for x in self.inputs] != [x.shape[1:] for x in inputs]:
            self.inputs = [x.new_zeros((self.mask.shape[0],) + tuple(x.shape[1:])) for x in inputs]
        index = torch.tensor(self.live, dtype=torch.long, device=inputs[0].device)
        for full, x in zip(self.inputs, inputs):
            full[index] = x
        return self.inputs

    def sample(self, cfm, h, cond, global_cond, noise, sampling) -> torch.Tensor:
        m, s = self.model, sampling

        def draw(h, cond, global_cond, noise):
            return m.sample_patches(cfm, h, cond, global_cond, s.cfm_steps, 1.0, s.cfm_cfg, noise)

        key = ("sample", id(cfm), h.shape[0], s.cfm_steps, s.cfm_cfg)
        return self._call(key, draw, (h.float(), cond, global_cond.float(), noise))

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
