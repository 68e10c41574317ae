"""The loop's step runners (loop_steps.py): the static loop -- preallocated KV cache, fixed-shape buffers,
what CUDA graphs capture -- runs here on CPU uncaptured and must equal the eager loop."""
import pytest
import torch

from runtime import loop_steps
from runtime.pipeline import TalkerPipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(pipe, backend, **kw):
    pipe.llm.loop_backend = backend
    try:
        return pipe.generate(progress=False, seed=3, **kw)
    finally:
        pipe.llm.loop_backend = "auto"


@pytest.mark.parametrize("mode,kw", [("t2av", dict(max_seconds=1.6)), ("tts", dict(max_seconds=1.6)),
                                     ("a2v", {}), ("v2a", {})])
def test_static_loop_equals_eager(pipe, mode, kw):
    eager, static = _run(pipe, "eager", mode=mode, **kw), _run(pipe, "static", mode=mode, **kw)
    # the static cache softmaxes over its masked-out free slots too: same values, another summation order
    _assert_same_generation(static, eager, mode, rtol=1e-5)


def _assert_same_generation(got, want, mode, rtol):
    """Same length and stop decision; latents equal within rtol (atol scaled by the largest value)."""
    assert got.n_patches == want.n_patches and got.stopped_by == want.stopped_by
    for name in ("speech_latents", "generated_motion_norm"):
        a, b = getattr(want, name), getattr(got, name)
        if a is None:
            assert b is None
            continue
        assert a.shape == b.shape and a.numel() > 0
        torch.testing.assert_close(b, a, rtol=rtol, atol=rtol * float(a.abs().max()), msg=f"{mode} {name}")


def test_every_step_reuses_the_same_buffers(pipe, monkeypatch):
    """Fixed shapes and addresses are what a CUDA graph needs: one call object per kind of step, one
    cache allocation for the whole plan."""
    from runtime import generation
    runners = []

    def keep(model, max_tokens, backend=None, batch=1):
        runners.append(loop_steps.StaticSteps(model, max_tokens, batch, capture=False))
        return runners[-1]

    monkeypatch.setattr(generation, "loop_steps", keep)
    out = pipe.generate(mode="t2av", progress=False, seed=3, max_seconds=1.6)
    (steps,) = runners
    assert out.n_patches >= 5
    assert sorted(k[0] for k in steps.calls) == ["advance", "sample", "sample"]  # speech head, motion head
    assert steps.cache.layers[0].keys.shape[2] == steps.cache.layers[0].max_cache_len  # one allocation: prefill + plan
    prefill_len = steps.cache.layers[0].max_cache_len - out.plan.max_steps
    fed_back = out.n_patches - (out.stopped_by == "length_cap")  # the state after the cap's patch is unused
    assert all(int(layer.cumulative_length) == prefill_len + fed_back for layer in steps.cache.layers)


def test_capture_warmup_does_not_advance_the_cache(pipe):
    """A capture runs its step once before recording; undoing its cache writes must leave the next run
    writing the same slot, with the same result."""
    m = pipe.llm
    steps = loop_steps.StaticSteps(m, max_tokens=16, batch=1, capture=False)
    h0 = steps.prefill([torch.randn(1, 5, m.config.hidden_size)])
    speech, motion = torch.randn(1, m.patch_size, 32), torch.randn(1, m.patch_size, 40)
    undo = steps._cache_position_undo()
    first = steps.advance(speech, motion, motion_pad=False)
    assert int(steps.cache.layers[0].cumulative_length) == 6
    undo()
    assert all(int(layer.cumulative_length) == 5 for layer in steps.cache.layers)
    again = steps.advance(speech, motion, motion_pad=False)
    assert torch.equal(first, again) and not torch.equal(first, h0)


def test_backend_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loop_steps.resolve_backend("auto", cpu) == "eager"
    assert loop_steps.resolve_backend("auto", cuda) == "cuda_graphs"
    assert loop_steps.resolve_backend("static", cpu) == "static"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        loop_steps.resolve_backend("cuda_graphs", cpu)
    with pytest.raises(ValueError, match="expected one of"):
        loop_steps.resolve_backend("graphs", cpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run it where one is lent)")
@pytest.mark.parametrize("mode,kw", [("t2av", dict(max_seconds=1.6)), ("tts", dict(max_seconds=1.6))])
def test_cuda_graph_loop_equals_eager_on_cuda(mode, kw):
    """On a GPU: the captured loop (the CUDA default) gives the eager loop's patches, stop decision and length,
    and really replays graphs (no capture fell back with a warning)."""
    import warnings
    cuda_pipe = TalkerPipeline.demo(device="cuda")
    eager = _run(cuda_pipe, "eager", mode=mode, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphs = _run(cuda_pipe, "cuda_graphs", mode=mode, **kw)
    # a failed capture warns and runs uncaptured: that is a failure here
    assert not [w for w in caught if "CUDA graph capture failed" in str(w.message)]
    # bf16 backbone under autocast on CUDA: the graph replays the kernels eager ran, up to their choice
    _assert_same_generation(graphs, eager, mode, rtol=1e-3)
