"""Shared test helpers: where the parity fixtures live and how to read them."""
import json
import os
import sys
from pathlib import Path

# numpy's BLAS threads spin against torch's on 2 cores (a 400x400 sqrtm: 22 s instead of 1.4 s); set before
# numpy is first imported
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
# ../shared: the golden parity fixtures and the authors' reference samples (not part of the repository).
SHARED = Path(os.environ.get("TALKER_SHARED_DIR", REPO_ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"
REFERENCE_SAMPLES = SHARED / "reference_samples"

# One reason for every skipped parity test, so that `pytest -ra` prints it once.
NO_SHARED_REASON = ("../shared not found (golden parity fixtures and reference samples): parity tests "
                    "skipped (CI runs them all)")

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def shared(path) -> Path:
    """A file of ../shared (fixtures, reference samples).

    A clone without ../shared skips the test with NO_SHARED_REASON. Where ../shared exists, a missing file
    fails the test, and with TALKER_CI=1 (set by .ci/run) a missing ../shared fails too: CI never passes
    by skipping. TALKER_SKIP_MISSING_SHARED=1 skips on any missing file (a partial copy)."""
    path = Path(path)
    if path.exists():
        return path
    if os.environ.get("TALKER_CI") == "1":
        pytest.fail(f"{path} not found, and TALKER_CI=1: every parity test must run in CI")
    if not SHARED.is_dir():
        pytest.skip(NO_SHARED_REASON)
    if os.environ.get("TALKER_SKIP_MISSING_SHARED") == "1":
        pytest.skip(f"{path} not found (TALKER_SKIP_MISSING_SHARED=1)")
    pytest.fail(f"{path} not found: ../shared exists but lacks this file")


def synth():
    """shared/fixtures/synth.py (synthetic weights as a pure function of name and shape), imported on
    first use so that a clone without ../shared still collects every test module."""
    shared(FIXTURES / "synth.py")
    if str(FIXTURES) not in sys.path:
        sys.path.insert(0, str(FIXTURES))
    import synth as module

    return module


def load_fixture(group: str, name: str):
    """(tensors, meta) of ../shared/fixtures/<group>/<name>.{safetensors,json}."""
    folder = FIXTURES / group
    tensors = load_file(str(shared(folder / f"{name}.safetensors")))
    meta_path = folder / f"{name}.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return tensors, meta


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a-e| / max |e| (the error scale the fixture tolerances are stated in)."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


@pytest.fixture
def one_thread():
    """The tiny models gain nothing from intra-op threads and lose a lot when another process holds a core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- release-format weights built from the tiny demo models (test_weights.py, test_infer.py)

@pytest.fixture
def no_env(monkeypatch):
    from runtime import weights

    for var in weights.ENV_VARS.values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(weights, "hub_cached", lambda repo_id, filename: None)  # an empty hub cache


@pytest.fixture(scope="module")
def demo_pipe():
    from runtime.pipeline import TalkerPipeline

    return TalkerPipeline.demo()


@pytest.fixture(scope="module")
def pipe(demo_pipe):
    """The tiny demo pipeline, built once per test module (the name the runtime tests use)."""
    return demo_pipe


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory, demo_pipe):
    """The demo models saved in the released layout: <root>/talker-t2av/, <root>/whisperx-vae/model.ckpt,
    lia-x.pt, wavlm_large_finetune.pth."""
    import whisperx_vae

    root = tmp_path_factory.mktemp("release")
    demo_pipe.llm.save_pretrained(root / "talker-t2av", tokenizer=demo_pipe.tokenizer)
    (root / "whisperx-vae").mkdir()
    whisperx_vae.save_checkpoint(demo_pipe.vae, root / "whisperx-vae" / "model.ckpt")
    torch.save(demo_pipe.generator.state_dict(), root / "lia-x.pt")
    torch.save({"model": demo_pipe.speaker_encoder.state_dict()}, root / "wavlm_large_finetune.pth")
    return root


@pytest.fixture
def tiny_loaders(monkeypatch):
    """Make the release loaders build the tiny architectures (strict loading code unchanged)."""
    import functools

    import lia_x
    import speaker_verification
    import whisperx_vae

    monkeypatch.setattr(whisperx_vae, "load_whisperx_vae", functools.partial(
        whisperx_vae.load_whisperx_vae, whisper_dims=whisperx_vae.tiny_whisper_dims()))
    monkeypatch.setattr(lia_x, "load_generator", functools.partial(lia_x.load_generator, **lia_x.TINY_CONFIG))

    def init_tiny(name, checkpoint=None, wavlm_checkpoint=None):
        model = speaker_verification.tiny_speaker_encoder(seed=123)
        return speaker_verification.load_speaker_encoder(model, checkpoint, wavlm_checkpoint).eval()

    monkeypatch.setattr(speaker_verification, "init_model", init_tiny)
