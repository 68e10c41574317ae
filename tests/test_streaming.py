"""Streaming: the chunked WhisperX-VAE decode, TalkerPipeline.stream, the fragmented mp4 and infer.py --stream."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from media import video_io
import whisperx_vae
from lia_x import render as liax_render
from runtime.streaming import Chunk
from whisperx_vae import DECODER_CONTEXT_FRAMES, StreamingDecoder, decode_span

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
LONG_TEXT = " ".join(f"Sentence {i} is here, in a text that goes on for a while." for i in range(8))


@pytest.fixture(scope="module")
def vae_and_latents():
    torch.manual_seed(0)
    vae = whisperx_vae.WhisperXVAE(whisperx_vae.tiny_cfg(), whisperx_vae.tiny_whisper_dims()).eval()
    return vae, torch.randn(90, 32)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------------------------------- decoder

def test_receptive_field_is_16_latent_frames(vae_and_latents):
    """Perturbing latent frame i changes output samples within frames i-16 .. i+16 and reaches at least
    i-15 and i+15 (whether the outermost frame shows a change depends on the weights and on the CPU's
    rounding: i-16..i+15, i-15..i+16 and i-16..i+16 are all seen)."""
    vae, z = vae_and_latents
    full = vae.decode(z[None]).reshape(-1)
    i = 40
    bumped = z.clone()
    bumped[i] += 1.0
    changed = (vae.decode(bumped[None]).reshape(-1) != full).nonzero().reshape(-1) // 960
    lo, hi = int(changed.min()), int(changed.max())
    assert i - DECODER_CONTEXT_FRAMES <= lo and hi <= i + DECODER_CONTEXT_FRAMES
    assert lo <= i - DECODER_CONTEXT_FRAMES + 1 and hi >= i + DECODER_CONTEXT_FRAMES - 1


def test_span_and_streaming_decode_equal_the_one_shot_decode(vae_and_latents):
    vae, z = vae_and_latents
    full = vae.decode(z[None]).reshape(-1)
    spans = torch.cat([decode_span(vae, z, a, min(a + 8, 90)) for a in range(0, 90, 8)])
    assert _rel(spans, full) < 1e-5
    dec = StreamingDecoder(vae)
    pieces = [dec.push(z[a:a + 4]) for a in range(0, 90, 4)]
    assert sum(p.numel() for p in pieces[:4]) == 0  # the first 16 frames wait for their look-ahead
    streamed = torch.cat(pieces + [dec.finish()])
    assert _rel(streamed, full) < 1e-5


def test_shorter_look_ahead_is_approximate(vae_and_latents):
    vae, z = vae_and_latents
    full = vae.decode(z[None]).reshape(-1)
    dec = StreamingDecoder(vae, lookahead=4)
    streamed = torch.cat([dec.push(z[a:a + 4]) for a in range(0, 90, 4)] + [dec.finish()])
    assert streamed.numel() == full.numel()
    assert _rel(streamed, full) > 1e-3  # measured on this model: ~3e-2 at 4 frames, 1e-4 at 12, 3e-7 at 16


# ---------------------------------------------------------------------------------------------- pipe.stream

def _drain(gen):
    chunks = []
    for item in gen:
        if isinstance(item, Chunk):
            chunks.append(item)
        else:
            return chunks, item
    raise AssertionError("stream ended without a result")


@pytest.mark.parametrize("kw", [dict(mode="t2av", text="Hello there, this is a test.", seed=3),
                                dict(mode="t2av", text=LONG_TEXT, seed=1),
                                dict(mode="t2av", seed=4, trim_prefix=True, gt_prefix_seconds=0.3),
                                dict(mode="a2v", seed=6)], ids=["t2av", "long_form", "trim", "a2v"])
def test_stream_equals_generate(pipe, kw):
    want = pipe.generate(progress=False, **kw)
    chunks, result = _drain(pipe.stream(every=2, **kw))
    assert torch.equal(result.audio_24k, want.audio_24k) and torch.equal(result.motion_raw, want.motion_raw)
    audio = torch.cat([c.audio_24k for c in chunks])
    assert audio.numel() == want.audio_24k.numel()
    assert _rel(audio, want.audio_24k) < 1e-5
    frames = np.concatenate([c.frames for c in chunks if c.frames is not None])
    ref_frames = np.concatenate(list(liax_render.render_frames(pipe.generator, _face(pipe), want.motion_raw.numpy())))
    assert frames.shape == ref_frames.shape
    assert np.abs(frames.astype(int) - ref_frames.astype(int)).max() <= 1
    # timestamps: contiguous audio and frames
    assert [c.audio_start for c in chunks] == list(np.cumsum([0] + [c.audio_24k.numel() for c in chunks[:-1]]))
    starts = [c.frame_start for c in chunks if c.frames is not None]
    assert starts == list(np.cumsum([0] + [len(c.frames) for c in chunks if c.frames is not None][:-1]))
    if want.windows:
        assert [c.window for c in chunks][-1] == len(want.windows) - 1
        assert sorted({c.window for c in chunks}) == list(range(len(want.windows)))


def _face(pipe):
    from runtime.inputs import DEFAULT_REF_VIDEO

    return video_io.read_first_frame(DEFAULT_REF_VIDEO)


def test_stream_of_tts_is_audio_only(pipe):
    want = pipe.generate(mode="tts", text="Only speech here.", seed=8, progress=False)
    chunks, result = _drain(pipe.stream(mode="tts", text="Only speech here.", seed=8, every=3))
    assert all(c.frames is None for c in chunks)
    assert _rel(torch.cat([c.audio_24k for c in chunks]), want.audio_24k) < 1e-5


def test_fragmented_mp4_is_readable_at_every_fragment_and_final_file_is_generates(pipe, tmp_path):
    kw = dict(mode="t2av", text=LONG_TEXT, seed=2)
    want = pipe.generate(progress=False, output=str(tmp_path / "plain.mp4"), **kw)
    fragments = tmp_path / "out.partial.mp4"
    seen_during = []
    gen = pipe.stream(every=1, output=str(tmp_path / "out.mp4"), mp4=str(fragments), **kw)
    for item in gen:
        if isinstance(item, Chunk) and fragments.exists():
            seen_during.append(fragments.stat().st_size)
        result = item
    assert not fragments.exists()  # replaced by the final file
    assert max(seen_during) > 0  # it grew while generating
    assert (tmp_path / "out.mp4").read_bytes() == (tmp_path / "plain.mp4").read_bytes()
    assert np.array_equal(sf.read(tmp_path / "out.wav")[0], sf.read(tmp_path / "plain.wav")[0])
    assert result.n_frames == want.n_frames

    # the fragmented file itself (kept this time): every cut at a fragment boundary decodes
    kept = tmp_path / "kept.mp4"
    _drain(pipe.stream(every=1, mp4=str(kept), **kw))
    assert video_io.mp4_top_level_boxes(kept)[:3] == ["ftyp", "moov", "moof"]
    ends = video_io.mp4_fragment_ends(kept)[1:]  # after each moof + mdat
    assert len(ends) >= 3
    data = kept.read_bytes()
    counts = []
    for end in ends:
        cut = tmp_path / f"cut_{end}.mp4"
        cut.write_bytes(data[:end])
        counts.append(len(video_io.read_frames(cut)[0]))
    assert counts == sorted(counts) and counts[0] > 0 and counts[-1] == want.n_frames


def test_cli_stream_to_stdout_writes_only_the_mp4(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "infer.py"), "--demo", "--quiet", "--text", "Hello there.",
                          "--output", str(tmp_path / "o.mp4"), "--stream", "-"], cwd=tmp_path, capture_output=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout[4:8] == b"ftyp"
    (tmp_path / "s.mp4").write_bytes(res.stdout)
    boxes = video_io.mp4_top_level_boxes(tmp_path / "s.mp4")
    assert boxes[:3] == ["ftyp", "moov", "moof"] and "mdat" in boxes
    assert b"[talker]" in res.stderr  # the messages went to stderr
    assert (tmp_path / "o.mp4").is_file()


def test_cli_stream_finalises_the_same_file(tmp_path):
    base = [sys.executable, str(REPO / "infer.py"), "--demo", "--quiet", "--text", "Hello there.", "--seed", "4"]
    for name, extra in (("a", []), ("b", ["--stream"])):
        res = subprocess.run(base + ["--output", str(tmp_path / f"{name}.mp4")] + extra, cwd=tmp_path,
                             capture_output=True, timeout=300)
        assert res.returncode == 0, res.stderr.decode()
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()
    assert not (tmp_path / "b.partial.mp4").exists()
