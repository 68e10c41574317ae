"""The evaluation's outputs: results.csv (one row per clip), summary.json, report.md (the paper's tables with
its published Talker-T2AV rows beside ours and the difference) and PNG plots of the per-clip distributions.

Everything is written all-or-nothing: each plot through a temporary file renamed when complete, then the three
text files as one group (atomic.atomic_outputs), so a crash leaves the previous report or none, never a mix.
matplotlib (requirements-metrics.txt) is optional: without it the report says the plots were skipped.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from media.atomic import atomic_output, atomic_outputs

# Talker-T2AV's published rows (arXiv 2604.23586, Tables 1-2, as quoted in issue 24). zh: DH-FaceVid-1K,
# en: HDTF + Hallo3, 200 clips each; WER is CER for zh, as a fraction. Table 3 (V2A) values are not quoted.
PAPER = {
    ("t2av", "zh"): {"wer": 0.148, "utmos": 2.136, "fid": 17.63, "fvd": 103.31, "sync_c": 5.470, "sync_d": 8.793},
    ("t2av", "en"): {"wer": 0.055, "utmos": 3.458, "fid": 24.32, "fvd": 246.39, "sync_c": 6.330, "sync_d": 8.505},
    ("a2v", "zh"): {"fid": 17.32, "fvd": 107.09, "sync_c": 3.97, "sync_d": 10.09},
    ("a2v", "en"): {"fid": 24.46, "fvd": 243.51, "sync_c": 5.85, "sync_d": 9.03},
}
PAPER_SOURCE = "Talker-T2AV paper (arXiv 2604.23586), Tables 1-2"
SETS = {"zh": "zh (DH-FaceVid-1K in the paper)", "en": "en (HDTF + Hallo3 in the paper)"}

# (mode, title, columns) in the paper's layout; SIM is not in the paper's tables (seed-tts-eval's standard).
TABLES = (
    ("t2av", "Table 1: text to audio + video (T2AV)", ("wer", "utmos", "fid", "fvd", "sync_c", "sync_d", "sim")),
    ("a2v", "Table 2: audio to video (A2V)", ("fid", "fvd", "sync_c", "sync_d")),
    ("v2a", "Table 3: video to audio (V2A)", ("wer", "utmos", "sim")),
)
HEADERS = {"wer": "WER/CER ↓", "utmos": "UTMOS ↑", "fid": "FID ↓", "fvd": "FVD ↓", "sync_c": "Sync-C ↑",
           "sync_d": "Sync-D ↓", "sim": "SIM ↑"}
SYNC_VSHIFT = 15  # SyncNet's offset scan: -15 .. +15 frames
DECIMALS = {"wer": 3, "utmos": 3, "fid": 2, "fvd": 2, "sync_c": 3, "sync_d": 3, "sim": 3}

# results.csv: per-clip values (FID / FVD are set-level: the columns say what the clip contributed).
CLIP_COLUMNS = ("id", "lang", "mode", "audio_file", "video_file", "wer", "asr_text", "utmos", "sim",
                "sync_offset", "sync_conf", "sync_min_dist", "fid_frames", "fvd_frames", "skipped")


@dataclass
class ClipResult:
    id: str
    lang: str
    mode: str
    audio_file: str = ""
    video_file: str = ""
    values: dict = field(default_factory=dict)  # CLIP_COLUMNS name -> number or text
    skipped: list = field(default_factory=list)  # "metric: reason"

    def skip(self, metric: str, reason: str) -> None:
        self.skipped.append(f"{metric}: {' '.join(str(reason).split())}")

    def row(self) -> dict:
        out = {"id": self.id, "lang": self.lang, "mode": self.mode, "audio_file": self.audio_file,
               "video_file": self.video_file, "skipped": "; ".join(self.skipped)}
        for key in CLIP_COLUMNS:
            if key in self.values:
                value = self.values[key]
                out[key] = f"{value:.6g}" if isinstance(value, float) else value
        return out


@dataclass
class GroupResult:
    """One table row of ours: a (mode, lang) set."""
    mode: str
    lang: str
    n_clips: int = 0
    values: dict = field(default_factory=dict)  # sync_c/sync_d/wer/... -> number
    counts: dict = field(default_factory=dict)  # metric -> clips (or videos/frames) the number is over
    notes: dict = field(default_factory=dict)  # metric -> why it is missing


def fmt(value, metric: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{DECIMALS[metric]}f}"


def diff(ours, paper, metric: str) -> str:
    if ours is None or paper is None or (isinstance(ours, float) and math.isnan(ours)):
        return "—"
    return f"{ours - paper:+.{DECIMALS[metric]}f}"


def tables_markdown(groups: dict) -> str:
    """The paper's tables: per language the paper's row, ours, and ours − paper."""
    out = []
    for mode, title, columns in TABLES:
        langs = [lang for lang in ("zh", "en") if (mode, lang) in groups]
        columns = [c for c in columns if any(not groups[(mode, lang)].notes.get(c, "").startswith("not requested")
                                             for lang in langs)]
        if not langs or not columns:
            continue
        out += [f"### {title}", "", "| set | system | rows | " + " | ".join(HEADERS[c] for c in columns) + " |",
                "| --- | --- | ---: | " + " | ".join("---:" for _ in columns) + " |"]
        for lang in langs:
            g, paper = groups[(mode, lang)], PAPER.get((mode, lang), {})
            out.append(f"| {lang} | Talker-T2AV (paper) | 200 | "
                       + " | ".join(fmt(paper.get(c), c) if c in paper else "n/a" for c in columns) + " |")
            out.append(f"| {lang} | this run | {g.n_clips} | " + " | ".join(_cell(g, c) for c in columns) + " |")
            out.append(f"| {lang} | difference (run − paper) | | "
                       + " | ".join(diff(g.values.get(c), paper.get(c), c) for c in columns) + " |")
        notes = [(lang, c, groups[(mode, lang)].notes[c]) for lang in langs for c in columns
                 if c in groups[(mode, lang)].notes]
        out.append("")
        for lang, c, note in notes:
            out.append(f"- {lang} {HEADERS[c].split()[0]}: {note}")
        if notes:
            out.append("")
    return "\n".join(out)


def _cell(g: GroupResult, metric: str) -> str:
    text = fmt(g.values.get(metric), metric)
    n = g.counts.get(metric)
    return text if n is None or text == "—" else f"{text} ({n})"


def skip_summary(clips: list, errors: list) -> dict:
    """How many rows were left out, how many clips lost a metric, and why: by_reason {reason: {"clips": n,
    "metrics": [...]}} (a clip's id inside a reason is written <id>, so equal problems group together)."""
    by_reason = {}
    for c in clips:
        for entry in c.skipped:
            metric, _, reason = entry.partition(": ")
            item = by_reason.setdefault(reason.replace(c.id, "<id>"), {"clips": set(), "metrics": []})
            item["clips"].add(c.id)
            if metric not in item["metrics"]:
                item["metrics"].append(metric)
    by_reason = {r: {"clips": len(v["clips"]), "metrics": v["metrics"]}
                 for r, v in sorted(by_reason.items(), key=lambda kv: -len(kv[1]["clips"]))}
    scored = ("wer", "utmos", "sim", "sync_conf", "fid_frames", "fvd_frames")
    unscored = sum(1 for c in clips if c.skipped and not any(k in c.values for k in scored))
    return {"rows_left_out": len(errors), "clips": len(clips), "clips_with_skips": sum(1 for c in clips if c.skipped),
            "clips_unscored": unscored, "by_reason": by_reason}


def markdown_report(meta: dict, groups: dict, clips: list, errors: list, plots: dict) -> str:
    skips = skip_summary(clips, errors)
    lines = ["# Evaluation report", ""]
    if meta.get("demo"):
        lines += ["> **DEMO RUN: RANDOM WEIGHTS. These numbers mean nothing.** The generator and every metric "
                  "network are randomly initialised (fixed seeds); the ASR is a stand-in. The report only shows "
                  "that the whole evaluation path runs.", ""]
    lines += ["| | |", "| --- | --- |"]
    for key, label in (("manifest", "manifest"), ("outputs", "outputs"), ("created", "created"),
                       ("asr", "ASR"), ("face_crop", "Sync face crops"), ("fvd", "FVD"), ("fid", "FID"),
                       ("device", "device")):
        if meta.get(key):
            lines.append(f"| {label} | {meta[key]} |")
    lines += ["", "## Results in the paper's layout", "",
              f"Paper rows: {PAPER_SOURCE} (Table 3's values are not quoted here). `rows`: manifest rows of the "
              "set; in parentheses: the clips (FID: frames, FVD: videos) each figure is over. WER/CER is "
              "seed-tts-eval's figure (CER for zh, WER for en): the unweighted mean of the per-utterance error "
              "rates, as a fraction.", ""]
    lines.append(tables_markdown(groups) or "(no clip was scored)")
    lines += ["## Skipped", "",
              f"{skips['rows_left_out']} manifest row(s) left out; {skips['clips_with_skips']} of {skips['clips']} "
              f"clip(s) had a metric skipped ({skips['clips_unscored']} with no metric at all).", ""]
    if errors:
        lines += ["Rows left out:", ""] + [f"- {_md(e)}" for e in errors] + [""]
    if skips["by_reason"]:
        lines += ["| clips | metrics skipped | reason |", "| ---: | --- | --- |"]
        lines += [f"| {v['clips']} | {', '.join(v['metrics'])} | {_md(reason)} |"
                  for reason, v in skips["by_reason"].items()] + [""]
    lines += ["## Per-clip distributions", ""]
    if plots.get("error"):
        lines += [f"Plots skipped: {plots['error']}", ""]
    for name, title in (("sync_offset", "Sync offset (frames)"), ("sync_conf", "Sync-C per clip"),
                        ("wer", "WER/CER per clip"), ("utmos", "UTMOS per clip")):
        if plots.get(name):
            lines += [f"### {title}", "", f"![{title}]({plots[name]})", ""]
    lines += ["Per-clip values: [results.csv](results.csv); every figure: [summary.json](summary.json).", ""]
    if meta.get("notes"):
        lines += ["## How the numbers were made", ""] + [f"- {n}" for n in meta["notes"]] + [""]
    if meta.get("weights"):
        lines += ["## Metric checkpoints", "", "| checkpoint | file | found by |", "| --- | --- | --- |"]
        lines += [f"| {k} | {v['path']} | {v['source']} |" for k, v in meta["weights"].items()] + [""]
    return "\n".join(lines)


def _md(text: str) -> str:
    """Text for a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def summary_dict(meta: dict, groups: dict, clips: list, errors: list) -> dict:
    return {
        "meta": meta,
        "groups": {f"{g.mode}/{g.lang}": {"mode": g.mode, "lang": g.lang, "n_clips": g.n_clips,
                                          "values": g.values, "counts": g.counts, "notes": g.notes,
                                          "paper": PAPER.get((g.mode, g.lang), {}),
                                          "difference": {k: v - PAPER[(g.mode, g.lang)][k] for k, v in g.values.items()
                                                         if k in PAPER.get((g.mode, g.lang), {}) and v is not None}}
                   for g in groups.values()},
        "paper_source": PAPER_SOURCE,
        "skipped": skip_summary(clips, errors),
        "rows_left_out": errors,
    }


def _values(clips: list, key: str) -> list:
    return [float(c.values[key]) for c in clips if isinstance(c.values.get(key), (int, float))]


def make_plots(clips: list, folder: Path) -> dict:
    """PNG histograms of the per-clip values: {name: path relative to the report folder} (+ 'error')."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return {"error": "matplotlib is not installed (pip install -r requirements-metrics.txt)"}
    made = {}
    specs = (("sync_offset", "sync_offset", "AV offset (frames; 0 = in sync)", True),
             ("sync_conf", "sync_conf", "Sync-C (confidence)", False),
             ("wer", "wer", "WER / CER per clip", False), ("utmos", "utmos", "UTMOS per clip", False))
    for name, key, xlabel, integer in specs:
        values = _values(clips, key)
        if not values:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        if integer:  # the offset scan's whole range (vshift 15), one bar per frame
            lo, hi = min(-SYNC_VSHIFT, int(min(values))), max(SYNC_VSHIFT, int(max(values)))
            ax.hist(values, bins=[b - 0.5 for b in range(lo, hi + 2)], color="#4c72b0", edgecolor="white")
            ax.set_xlim(lo - 0.5, hi + 0.5)
        else:
            ax.hist(values, bins=min(30, max(5, len(values) // 3)), color="#4c72b0", edgecolor="white")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("clips")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{xlabel.split(' (')[0]}: n={len(values)}, mean {sum(values) / len(values):.3g}")
        fig.tight_layout()
        target = folder / "plots" / f"{name}.png"
        with atomic_output(target) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        made[name] = f"plots/{name}.png"
    return made


def write_report(folder, meta: dict, groups: dict, clips: list, errors: list) -> dict:
    """Write plots, results.csv, summary.json and report.md into `folder`; returns {name: path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plots = make_plots(clips, folder)
    paths = {"results": folder / "results.csv", "summary": folder / "summary.json", "report": folder / "report.md"}
    summary = summary_dict(meta, groups, clips, errors)
    summary["plots"] = plots
    with atomic_outputs(paths["results"], paths["summary"], paths["report"]) as (tmp_csv, tmp_json, tmp_md):
        with open(tmp_csv, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CLIP_COLUMNS)
            writer.writeheader()
            for c in clips:
                writer.writerow(c.row())
        tmp_json.write_text(json.dumps(summary, indent=2, ensure_ascii=False, default=_json_default) + "\n",
                            encoding="utf-8")
        tmp_md.write_text(markdown_report(meta, groups, clips, errors, plots), encoding="utf-8")
    return {k: str(v) for k, v in paths.items()} | {f"plot_{k}": str(folder / v) for k, v in plots.items()
                                                     if k != "error"}


def _json_default(value):
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, (Path, os.PathLike)):
        return os.fspath(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def console_table(groups: dict) -> str:
    """A short plain-text view of our rows beside the paper's (printed at the end of a run)."""
    lines = []
    for mode, title, columns in TABLES:
        for lang in ("zh", "en"):
            if (mode, lang) not in groups:
                continue
            g, paper = groups[(mode, lang)], PAPER.get((mode, lang), {})
            cells = [f"{HEADERS[c].split()[0]} {fmt(g.values.get(c), c)}"
                     + (f" (paper {fmt(paper[c], c)})" if c in paper else "") for c in columns
                     if not g.notes.get(c, "").startswith("not requested")]
            lines.append(f"{mode}/{lang} [{g.n_clips} rows]: " + ", ".join(cells))
    return "\n".join(lines)


def nan_to_none(value: Optional[float]) -> Optional[float]:
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value
