"""WER / CER as seed-tts-eval scores it: text normalisation, per-utterance error rate, corpus figure.

Reproduces BytedanceSpeech/seed-tts-eval (commit 752f4297f090c46bb1a55a1f7439e5944ddefe8d): run_wer.py
(`punctuation_all`, `process_one`, the zhconv step of `run_asr`) with jiwer 3.0.4 `compute_measures`, and
average_wer.py. Written from the facts of shared/fixtures/eval/README_utmos_wer.md (`wer_scoring`); no jiwer,
zhon or rapidfuzz: the punctuation set is spelled out below and the word-level Levenshtein distance is our own.

    normalize(text, lang)        the string run_wer.py hands to compute_measures (steps 2-4 below)
    utterance_wer(ref, hyp, lang) (S + D + I) / (H + S + D) of one pair; for zh a character error rate
    corpus_wer(pairs, lang)      the unweighted mean of utterance rates (average_wer.py), not pooled counts
    printed_percent(rate)        the figure average_wer.py prints: round(rate * 100, 3)

Steps: (1) zh hypotheses only: zhconv 'zh-cn' (traditional -> mainland simplified; references are never
converted); (2) both: delete every character of PUNCTUATION except the ASCII apostrophe; (3) one pass of
replace("  ", " "); (4) zh: a space between every character (every character a token, no lower-casing);
en: str.lower(); (5) jiwer's default transform: whitespace runs -> one space, strip, split on spaces.
"""
from __future__ import annotations

import re
import string
from typing import Iterable

import numpy as np

LANGUAGES = ("zh", "en")

# zhon 2.1.1 zhon.hanzi.punctuation (82 characters; zhon 1.x lacks U+FF0E, which changes zh scores).
ZHON_HANZI_PUNCTUATION = (
    "＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､"
    "\u3000"  # ideographic space
    "、〃〈〉《》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿"
    "–—‘’‛“”„‟…‧﹏﹑﹔·．！？｡。"
)
# run_wer.py's punctuation_all: 114 characters, in the reference's order.
PUNCTUATION = ZHON_HANZI_PUNCTUATION + string.punctuation

# Deleting the characters one after another (as the reference does) equals deleting them all at once.
_DELETE_PUNCTUATION = str.maketrans("", "", PUNCTUATION.replace("'", ""))
_WHITESPACE_RUN = re.compile(r"\s\s+")  # jiwer RemoveMultipleSpaces


def _check_lang(lang: str) -> None:
    if lang not in LANGUAGES:
        raise ValueError(f"unsupported language {lang!r}: seed-tts-eval scores only {LANGUAGES}")


def to_simplified(text: str) -> str:
    """zhconv.convert(text, 'zh-cn'): phrase-level traditional -> mainland simplified (e.g. 軟體 -> 软件)."""
    import zhconv

    return zhconv.convert(text, "zh-cn")


def normalize(text: str, lang: str) -> str:
    """The string process_one passes to jiwer (steps 2-4); the zh hypothesis conversion is `to_simplified`."""
    _check_lang(lang)
    text = text.translate(_DELETE_PUNCTUATION).replace("  ", " ")
    return " ".join(text) if lang == "zh" else text.lower()


def words(normalized: str) -> list[str]:
    """jiwer's default word transform: collapse whitespace runs to one space, strip, split on ' '.

    A single non-space whitespace character (a tab, U+00A0) inside a word is kept, as jiwer keeps it.
    """
    return [w for w in _WHITESPACE_RUN.sub(" ", normalized).strip().split(" ") if w]


def edit_distance(reference: list, hypothesis: list) -> int:
    """Levenshtein distance between two token sequences (unit costs), one vectorised DP row per reference token.

    Within a row, insertions chain left to right: d[j] = min_k<=j (candidate[k] + j - k), a running minimum.
    """
    vocabulary: dict = {}
    ref_ids = np.array([vocabulary.setdefault(w, len(vocabulary)) for w in reference], dtype=np.int64)
    hyp_ids = np.array([vocabulary.setdefault(w, len(vocabulary)) for w in hypothesis], dtype=np.int64)
    columns = np.arange(len(hyp_ids) + 1, dtype=np.int64)
    row = columns.copy()  # distances from the empty reference prefix
    for i, ref_id in enumerate(ref_ids, start=1):
        candidate = np.empty_like(row)
        candidate[0] = i
        candidate[1:] = np.minimum(row[1:] + 1, row[:-1] + (hyp_ids != ref_id))  # deletion, substitution/hit
        row = columns + np.minimum.accumulate(candidate - columns)  # insertions
    return int(row[-1])


def _reference_words(normalized_reference: str) -> list[str]:
    # jiwer 3.0.4 refuses empty references, and run_wer.py lets the error stop the whole run.
    if normalized_reference == "":
        raise ValueError("the reference text is empty after normalisation (punctuation only?): "
                         "one or more references are empty strings")
    tokens = words(normalized_reference)
    if not tokens:
        raise ValueError("the reference text has no words after normalisation (punctuation and spaces only): "
                         "each reference should be a non-empty list of words")
    return tokens


def utterance_wer(reference: str, hypothesis: str, lang: str) -> float:
    """(S + D + I) / (H + S + D) = edit distance / reference words, after seed-tts-eval's normalisation.

    lang 'zh': the hypothesis is converted to simplified Chinese first and tokens are characters (a CER).
    Can exceed 1 (insertions). Raises ValueError when the reference normalises to nothing.
    """
    _check_lang(lang)
    if lang == "zh":
        hypothesis = to_simplified(hypothesis)
    ref_words = _reference_words(normalize(reference, lang))
    hyp_words = words(normalize(hypothesis, lang))
    return float(edit_distance(ref_words, hyp_words)) / float(len(ref_words))


def corpus_wer(pairs: Iterable[tuple[str, str]], lang: str) -> float:
    """average_wer.py's figure, unrounded: numpy.mean of the per-utterance rates of (reference, hypothesis)
    pairs (short utterances weigh as much as long ones). Raises ValueError for no pairs or an empty reference."""
    rates = [utterance_wer(reference, hypothesis, lang) for reference, hypothesis in pairs]
    if not rates:
        raise ValueError("corpus_wer needs at least one (reference, hypothesis) pair")
    return float(np.mean(rates))


def printed_percent(rate: float) -> float:
    """The number in average_wer.py's 'WER: {x}%' line: round(rate * 100, 3) on a numpy float64
    (numpy's rounding, which can differ from Python's round in the last decimal)."""
    return float(round(np.float64(rate) * 100, 3))
