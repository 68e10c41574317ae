"""Long-form generation (longform.py) on the tiny demo models: windows, seams, prefixes, lengths, limits."""
import numpy as np
import pytest
import soundfile as sf
import torch

from runtime import longform
from common.constants import MAX_SECONDS, SAMPLES_PER_FRAME
from runtime.generation import plan_lengths
from common.motion_stats import normalize_motion
from runtime.inputs import DEFAULT_REF_AUDIO, preflight, resolve_request

pytestmark = pytest.mark.usefixtures("one_thread")

TEN_SENTENCES = " ".join(f"This is sentence number {i}, one of ten in a paragraph that is long." for i in range(10))


# ---------------------------------------------------------------------------------------------- windows

def test_windows_keep_whole_sentences_and_words():
    windows = longform.split_windows(TEN_SENTENCES)
    assert len(windows) > 1
    assert " ".join(windows) == TEN_SENTENCES  # nothing lost, nothing repeated, no word cut
    for w in windows:
        assert w.endswith(".")  # the seams are sentence ends
        assert longform.estimate_speech_seconds(w) <= longform.WINDOW_SECONDS


def test_long_sentence_is_cut_at_clauses_then_words():
    clause = "and then the story went on for a while without a single full stop in sight"
    sentence = ", ".join([clause] * 6) + "."
    windows = longform.split_windows(sentence)
    assert len(windows) > 1 and " ".join(windows) == sentence
    assert all(w.endswith((",", ".")) for w in windows)  # cut after commas
    one_clause = " ".join(["word"] * 300)  # no punctuation at all: cut between words
    windows = longform.split_windows(one_clause)
    assert len(windows) > 1 and " ".join(windows) == one_clause
    assert all(set(w.split()) == {"word"} for w in windows)


@pytest.mark.parametrize("text", ["x" * 3000, "ab" * 700, "สวัสดีครับ" * 52, "ก่อนหน้านี้" * 60])
def test_a_word_longer_than_a_window_is_cut_at_characters(text):
    """One 3000-letter word, or Thai (no spaces): cut at characters, never before a combining mark."""
    import unicodedata

    windows = longform.split_windows(text)
    assert len(windows) > 1 and "".join(windows) == text
    assert all(longform.estimate_speech_seconds(w) <= longform.WINDOW_SECONDS for w in windows)
    assert all(unicodedata.category(w[0]) not in ("Mn", "Mc") for w in windows)


def test_cjk_punctuation_splits_without_spaces():
    text = "今天天气很好，我们一起去公园散步吧。" * 6 + "你觉得怎么样？"
    windows = longform.split_windows(text)
    assert len(windows) > 1 and "".join(windows) == text
    assert all(w.endswith(("。", "？")) for w in windows)
    assert longform.estimate_speech_seconds("你好") == pytest.approx(2 / longform.CJK_CHARS_PER_SECOND)


def test_text_length_rule():
    for seconds in (0.5, 5.0, 12.0, 40.0):
        plan = plan_lengths("t2av", ref_speech_frames=120, ref_motion_frames=120, text_seconds=seconds)
        assert plan.rule == "text"
        assert plan.max_seconds == pytest.approx(min(MAX_SECONDS, 1.5 * seconds + 1), abs=0.16)
        assert plan.max_seconds <= MAX_SECONDS
    # an explicit max_seconds still wins over the text rule
    plan = plan_lengths("tts", ref_speech_frames=120, text_seconds=10.0, max_seconds=2.0)
    assert plan.rule == "max_seconds"


# ---------------------------------------------------------------------------------------------- runs

def test_ten_sentences_windows_seams_and_prefixes(pipe):
    req = resolve_request(mode="t2av", text=TEN_SENTENCES, seed=5)
    run = pipe.start(req, False)
    windows = run.windows
    assert run.long_form and [w.text for w in windows] == longform.split_windows(TEN_SENTENCES)
    lf = longform.WindowLoop(pipe, run)
    order = [w.index for w, _ in lf]  # (window, patch) as sampled: window after window
    assert order == sorted(order) and set(order) == set(range(len(windows)))
    out = lf.output
    lf.reports = run.reports
    speech = torch.cat([lf.prompts[0].prefix_speech_latents.cpu(), out.speech_latents])
    motion = torch.cat([lf.prompts[0].prefix_motion_norm.cpu(), out.motion_norm])
    n_prefix = lf.prompts[0].prefix_speech_latents.shape[0]
    start = 0
    for k, (report, prompt) in enumerate(zip(lf.reports, lf.prompts)):
        assert report.start_frame == start  # windows follow one another: nothing lost or duplicated
        start += report.n_frames
        assert report.max_seconds <= MAX_SECONDS
        if k == 0:
            continue
        end = n_prefix + report.start_frame  # the output so far
        n = longform.tail_frames(req, "t2av")
        assert torch.equal(prompt.prefix_speech_latents.cpu(), speech[end - n:end])
        assert torch.equal(prompt.prefix_motion_norm.cpu(), motion[end - n:end])
        assert torch.equal(prompt.speaker_emb, lf.prompts[0].speaker_emb)  # identity from the reference
        assert torch.equal(prompt.first_motion_norm, lf.prompts[0].first_motion_norm)
    assert start == out.speech_latents.shape[0] == out.motion_norm.shape[0]

    result = pipe.generate(req, progress=False)
    assert len(result.windows) == len(windows)
    assert torch.equal(result.speech_latents, speech)
    assert result.speech_latents.shape[0] == n_prefix + sum(r.n_frames for r in result.windows)
    assert result.audio_24k.numel() == result.speech_latents.shape[0] * SAMPLES_PER_FRAME
    assert result.motion_raw.shape[0] == result.speech_latents.shape[0]
    # one decode of the whole sequence: no seam in the waveform
    assert torch.equal(result.audio_24k, pipe.decode(result.speech_latents))


def test_progress_names_windows_and_patches(pipe):
    seen = []
    pipe.generate(mode="tts", text=TEN_SENTENCES, seed=1, progress=lambda stage, done, total: seen.append(stage))
    n = len(longform.split_windows(TEN_SENTENCES))
    assert {f"tts window {k}/{n} patches" for k in range(1, n + 1)} <= set(seen)


def test_single_short_sentence_is_unchanged(pipe):
    base = pipe.generate(mode="t2av", text="Hello there, this is a test.", seed=3, progress=False)
    auto = pipe.generate(mode="t2av", text="Hello there, this is a test.", seed=3, progress=False, long_form=None)
    off = pipe.generate(mode="t2av", text="Hello there, this is a test.", seed=3, progress=False, long_form=False)
    for r in (auto, off):
        assert torch.equal(r.audio_24k, base.audio_24k) and torch.equal(r.motion_raw, base.motion_raw)
        assert r.plan.rule == "released" and r.windows == []
    on = pipe.generate(mode="t2av", text="Hello there, this is a test.", seed=3, progress=False, long_form=True)
    assert on.plan.rule == "text" and len(on.windows) == 1


def test_long_form_off_keeps_the_released_cap(pipe):
    r = pipe.generate(mode="tts", text=TEN_SENTENCES, seed=2, progress=False, long_form=False)
    assert r.windows == [] and r.plan.rule == "released"


def _long_wav(tmp_path, seconds):
    wav, sr = sf.read(DEFAULT_REF_AUDIO, dtype="float32")
    reps = int(np.ceil(seconds * sr / len(wav)))
    path = tmp_path / f"long_{seconds}.wav"
    sf.write(path, np.tile(wav, reps)[:int(seconds * sr)], sr)
    return str(path)


def test_reference_over_30_s_is_cut_with_a_warning(pipe, tmp_path):
    long_ref = _long_wav(tmp_path, 31)
    preflight(mode="tts", ref_audio=long_ref)  # no longer refused
    r = pipe.generate(mode="tts", text="Hi.", ref_audio=long_ref, seed=0, progress=False, max_seconds=0.5)
    assert any("first 30 s" in w for w in r.warnings)


def test_a2v_over_30_s_runs_in_windows_and_the_limit_holds_per_window(pipe, tmp_path):
    audio = _long_wav(tmp_path, 33)
    with pytest.raises(ValueError, match="at most 30 s"):
        preflight(mode="a2v", audio=audio, long_form=False)
    req = preflight(mode="a2v", audio=audio, seed=1)
    run = pipe.start(req, False)
    inputs, windows = run.inputs, run.windows
    n_given = inputs.given_speech.shape[0]
    assert n_given > 750 and len(windows) == 2
    assert windows[0].given_end - windows[0].given_start == longform.GIVEN_WINDOW_FRAMES
    for w in windows:  # each window: its prefix + its given frames within the model's 30 s
        p = longform.window_plan(pipe, req, inputs, w, longform.tail_frames(req, "t2av"))
        assert p.prefix_frames + (w.given_end - w.given_start) <= 750
    r = pipe.generate(req, progress=False)
    assert [(x.start_frame, x.n_frames) for x in r.windows] == [(0, 700), (700, n_given - 700 + (-n_given) % 4)]
    assert r.motion_raw.shape[0] == n_given and r.audio_24k.numel() == inputs.driving_audio_24k.numel()


def test_v2a_motion_over_30_s_runs_in_windows(pipe, tmp_path):
    motion = torch.randn(800, 40) * 0.1
    path = tmp_path / "long_motion.pt"
    torch.save(motion, path)
    with pytest.raises(ValueError, match="at most 750"):
        pipe.generate(mode="v2a", motion=str(path), text="Dub this long one.", long_form=False, progress=False)
    r = pipe.generate(mode="v2a", motion=str(path), text="Dub this long one.", seed=2, progress=False)
    assert len(r.windows) == 2 and r.speech_latents.shape[0] == 800 and r.audio_24k.numel() == 800 * 960
    assert torch.allclose(normalize_motion(r.motion_raw), normalize_motion(motion), atol=1e-5)
