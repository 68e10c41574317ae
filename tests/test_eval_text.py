"""evaluation.text against seed-tts-eval's WER/CER scoring (shared/fixtures/eval/wer_scoring.json)."""
import json
import random

import numpy as np
import pytest
from conftest import FIXTURES, shared

from evaluation import text

# README_utmos_wer.md (wer_scoring): the scoring is exact arithmetic on integer counts; the JSON stores the
# float64 rates the reference printed, so equal to the last bits (1e-12 leaves room for nothing but repr).
RATE_TOL = 1e-12


@pytest.fixture(scope="module")
def wer_fixture():
    return json.loads(shared(FIXTURES / "eval" / "wer_scoring.json").read_text(encoding="utf-8"))


def _languages(fixture):
    return [lang for lang in text.LANGUAGES if lang in fixture]


def test_punctuation_set_equals_reference(wer_fixture):
    assert text.PUNCTUATION == wer_fixture["punctuation_all"]
    codepoints = [f"U+{ord(c):04X}" for c in text.PUNCTUATION]
    assert codepoints == wer_fixture["punctuation_all_codepoints"]
    assert len(set(text.PUNCTUATION)) == len(wer_fixture["punctuation_all_codepoints"])


def test_normalisation_and_rate_per_pair(wer_fixture):
    checked = 0
    for lang in _languages(wer_fixture):
        for utt in wer_fixture[lang]["utterances"]:
            where = f"{lang} pair {utt['index']}"
            hypothesis = utt["hypothesis_asr"]
            if lang == "zh":
                hypothesis = text.to_simplified(hypothesis)
                assert hypothesis == utt["hypothesis_after_zhconv"], where
            assert text.normalize(utt["reference"], lang) == utt["reference_normalized"], where
            assert text.normalize(hypothesis, lang) == utt["hypothesis_normalized"], where
            assert text.words(utt["reference_normalized"]) == utt["reference_words"], where
            assert text.words(utt["hypothesis_normalized"]) == utt["hypothesis_words"], where
            counts = utt["jiwer"]
            assert text.edit_distance(utt["reference_words"], utt["hypothesis_words"]) == (
                counts["substitutions"] + counts["deletions"] + counts["insertions"]), where
            rate = text.utterance_wer(utt["reference"], utt["hypothesis_asr"], lang)
            assert abs(rate - utt["wer"]) <= RATE_TOL, f"{where}: {rate} vs {utt['wer']}"
            checked += 1
    assert checked > 0


def test_corpus_figure_per_language(wer_fixture):
    for lang in _languages(wer_fixture):
        block = wer_fixture[lang]
        pairs = [(u["reference"], u["hypothesis_asr"]) for u in block["utterances"]]
        corpus = block["corpus"]
        mean = text.corpus_wer(pairs, lang)
        assert abs(mean - corpus["WER_mean_unrounded"]) <= RATE_TOL, lang
        assert text.printed_percent(mean) == corpus["WER_percent"], lang
        assert f"WER: {text.printed_percent(mean)}%" == corpus["printed"], lang
        rates = [text.utterance_wer(r, h, lang) for r, h in pairs]
        assert sum(r > 0.5 for r in rates) == corpus["n_higher_than_50"], lang


def test_empty_references_raise(wer_fixture):
    cases = [(lang, case) for lang in _languages(wer_fixture) for case in wer_fixture[lang].get("raising", [])]
    if not cases:
        pytest.skip("this fixture set lists no raising references")
    for lang, case in cases:
        assert case["raised"] == "ValueError"
        with pytest.raises(ValueError, match="reference"):
            text.utterance_wer(case["reference"], case["hypothesis_asr"], lang)
        with pytest.raises(ValueError):
            text.corpus_wer([("fine words", "fine words"), (case["reference"], case["hypothesis_asr"])], lang)


# ---- fixture-free properties


def test_identical_strings_score_zero():
    assert text.utterance_wer("The cat sat, on the mat.", "the cat sat on the mat", "en") == 0.0
    assert text.utterance_wer("我們的學校", "我们的学校", "zh") == 0.4  # the reference is never converted
    assert text.utterance_wer("我们的学校", "我們的學校", "zh") == 0.0  # the hypothesis is


def test_insertions_exceed_one():
    assert text.utterance_wer("yes", "yes no maybe perhaps", "en") == 3.0
    assert text.utterance_wer("a", "b c", "en") > 1.0


def test_edit_distance_matches_plain_dp():
    def reference_dp(a, b):
        previous = list(range(len(b) + 1))
        for i, x in enumerate(a, 1):
            current = [i]
            for j, y in enumerate(b, 1):
                current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
            previous = current
        return previous[-1]

    rng = random.Random(24)
    for _ in range(200):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        assert text.edit_distance(a, b) == reference_dp(a, b), (a, b)


def test_normalisation_rules():
    assert text.normalize("well-known U.S.A. and/or", "en") == "wellknown usa andor"
    assert text.normalize("a   b", "en") == "a  b"  # one replace pass: three spaces become two
    assert text.normalize("AB 1", "zh") == "A B   1"  # no lower-casing; a space is a token before jiwer
    assert text.words("  a \t b\u00a0c  ") == ["a", "b\u00a0c"]  # jiwer keeps a lone non-space whitespace
    with pytest.raises(ValueError):
        text.normalize("x", "fr")
    with pytest.raises(ValueError):
        text.corpus_wer([], "en")


def test_corpus_is_unweighted_mean():
    pairs = [("one", "two"), ("a b c d", "a b c d")]
    assert text.corpus_wer(pairs, "en") == pytest.approx(0.5)
    assert text.corpus_wer(pairs, "en") != pytest.approx(1 / 5)  # pooled errors/words would be 0.2
    assert np.isclose(text.printed_percent(0.7269047619047619), 72.69)
