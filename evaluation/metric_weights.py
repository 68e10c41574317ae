"""Where the metric checkpoints are, and how to fetch them: the same rules as weights.py for the model.

Each checkpoint is looked up in this order (the first hit wins, nothing is fetched):
1. its command-line flag (`--syncnet PATH` ...; a given path that does not exist is an error),
2. its environment variable (`$SYNCNET_CKPT` ...),
3. the Hugging Face hub cache, for the checkpoints with a hub mirror (huggingface_hub.try_to_load_from_cache:
   local files only),
4. torch.hub's checkpoint folder (`$TORCH_HOME/hub/checkpoints/<file name>`): where the reference tools
   themselves (pytorch-fid, SpeechMOS' torch.hub entry) keep the files they fetched, and where `--download`
   puts the ones that come from a plain URL.
`download()` (evaluate.py --download) fetches what is missing, checking the byte count and sha256 where the
publisher's are known; nothing else here touches the network. The speaker encoder of SIM is the model's own
WavLM checkpoint (weights.py: --wavlm-ckpt / $WAVLM_CKPT / hub cache); the ASR is a transformers model folder.
"""
from __future__ import annotations

import hashlib
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from runtime import weights
from media.atomic import atomic_output


@dataclass(frozen=True)
class MetricCheckpoint:
    name: str  # key, also the flag: --<name with - for _>
    what: str  # what it is, in a few words
    filename: str
    env: str  # environment variable holding a path
    url: str  # where the publisher serves it
    hf_repo: Optional[str] = None  # a hub mirror (repo id); the file has the same name there
    size: Optional[int] = None  # bytes, where known
    sha256: Optional[str] = None  # full digest or a published prefix (checked as a prefix)
    publisher: str = ""
    licence: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


CHECKPOINTS = {c.name: c for c in (
    MetricCheckpoint(
        "syncnet", "SyncNet v2 (Sync-C / Sync-D)", "syncnet_v2.model", "SYNCNET_CKPT",
        "http://www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model", hf_repo="lithiumice/syncnet",
        publisher="VGG Oxford, joonson/syncnet_python download_model.sh",
        licence="served with joonson/syncnet_python (MIT, Copyright (c) 2016-present Joon Son Chung); no separate "
                "licence is stated for the weights"),
    MetricCheckpoint(
        "s3fd", "S3FD face detector (SyncNet's face crops)", "sfd_face.pth", "S3FD_CKPT",
        "https://www.robots.ox.ac.uk/~vgg/software/lipsync/data/sfd_face.pth", hf_repo="lithiumice/syncnet",
        publisher="VGG Oxford, joonson/syncnet_python download_model.sh",
        licence="served with joonson/syncnet_python (MIT); no separate licence is stated for the weights "
                "(S3FD, trained on WIDER FACE)"),
    MetricCheckpoint(
        "utmos", "UTMOS22 strong learner (UTMOS)", "utmos22_strong_step7459_v1.pt", "UTMOS_CKPT",
        "https://github.com/tarepan/SpeechMOS/releases/download/v1.0.0/utmos22_strong_step7459_v1.pt",
        publisher="tarepan/SpeechMOS release v1.0.0 (hubconf.py)",
        licence="MIT: derived from sarulab-speech/UTMOS22's strong learner checkpoint (MIT, Copyright 2022 "
                "Saruwatari & Koyama laboratory, The University of Tokyo); SpeechMOS is MIT"),
    MetricCheckpoint(
        "fid_inception", "FID Inception-v3 (pool3 features)", "pt_inception-2015-12-05-6726825d.pth",
        "FID_INCEPTION_CKPT",
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
        sha256="6726825d",  # the file name's hash prefix (torch.hub convention)
        publisher="mseitzer/pytorch-fid release fid_weights",
        licence="Apache-2.0 (pytorch-fid; ported from TensorFlow's inception-2015-12-05, Apache-2.0)"),
    MetricCheckpoint(
        "i3d", "I3D TorchScript (FVD features)", "i3d_torchscript.pt", "I3D_CKPT",
        "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1", hf_repo="flateon/FVD-I3D-torchscript",
        publisher="StyleGAN-V (universome/stylegan-v) metric code; also shipped in "
                  "JunyaoHu/common_metrics_on_video_quality (fvd/styleganv/)",
        licence="I3D weights: deepmind/kinetics-i3d (Apache-2.0), TorchScript port by the StyleGAN-V authors; "
                "the hub mirror's card says MIT"),
)}

# The ASR backends: transformers model folders (config.json + weights) on the hub.
ASR_REPOS = {"qwen3-asr": "Qwen/Qwen3-ASR-1.7B-hf", "whisper-large-v3": "openai/whisper-large-v3"}
ASR_ENV = "ASR_MODEL_DIR"
ASR_LICENCES = {"qwen3-asr": "Apache-2.0 (Qwen/Qwen3-ASR-1.7B model card)",
                "whisper-large-v3": "Apache-2.0 (openai/whisper-large-v3 model card; Whisper code MIT)"}

METRICS = ("wer", "utmos", "sync", "fid", "fvd", "sim")


def needed(metrics: Iterable[str], face_crop: str = "s3fd") -> list:
    """Checkpoint names the metrics load ('asr' and 'wavlm' are resolved by their own rules)."""
    metrics = set(metrics)
    out = []
    if "wer" in metrics:
        out.append("asr")
    if "utmos" in metrics:
        out.append("utmos")
    if "sync" in metrics:
        out += ["syncnet"] + (["s3fd"] if face_crop == "s3fd" else [])
    if "fid" in metrics:
        out.append("fid_inception")
    if "fvd" in metrics:
        out.append("i3d")
    if "sim" in metrics:
        out.append("wavlm")
    return out


@dataclass
class Resolved:
    paths: dict = field(default_factory=dict)  # name -> path
    sources: dict = field(default_factory=dict)  # name -> "flag" | "env" | "hub cache" | "torch hub" | "download"

    def missing(self, names: Iterable[str]) -> list:
        return [n for n in names if self.paths.get(n) is None]


class MissingCheckpointError(FileNotFoundError):
    def __init__(self, names, asr: str = "qwen3-asr"):
        self.names = list(names)
        super().__init__(missing_message(self.names, asr))


def torch_hub_checkpoints() -> Path:
    """torch.hub's checkpoint folder ($TORCH_HOME/hub/checkpoints, default ~/.cache/torch/hub/checkpoints)."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch")
    return Path(torch_home) / "hub" / "checkpoints"




def _given(path, name: str, origin: str, folder: bool = False) -> str:
    p = Path(os.path.expanduser(str(path)))
    ok = p.is_dir() if folder else p.is_file()
    if not ok:
        kind = "folder" if folder else "file"
        raise FileNotFoundError(f"{p}: {describe(name)} {kind} not found ({origin})")
    return str(p)


def describe(name: str) -> str:
    if name == "asr":
        return "ASR model"
    if name == "wavlm":
        return "WavLM speaker checkpoint"
    return CHECKPOINTS[name].what.split(" (")[0]


def locate(names: Iterable[str], given: Optional[dict] = None, env=None, use_cache: bool = True,
           asr: str = "qwen3-asr", wavlm_repo: Optional[str] = None,
           wavlm_filename: Optional[str] = None) -> Resolved:
    """Resolve each named checkpoint (flag > environment > hub cache > torch.hub folder); None where not found.
    `given`: {name: path from its flag}. Paths given explicitly (flag or environment) must exist."""
    env = os.environ if env is None else env
    given = given or {}
    out = Resolved()
    for name in names:
        path, source = None, None
        if name == "wavlm":
            extra = {k: v for k, v in (("wavlm_repo", wavlm_repo), ("wavlm_filename", wavlm_filename)) if v}
            found = weights.locate(wavlm=given.get("wavlm"), env={k: v for k, v in env.items()
                                                                   if k == weights.ENV_VARS["wavlm"]},
                                   use_cache=use_cache, **extra)
            path = found.wavlm
            source = {"argument": "flag", "env": "env", "cache": "hub cache"}.get(found.sources.get("wavlm"))
        elif name == "asr":
            if given.get("asr"):
                path, source = _given(given["asr"], name, "--asr-model", folder=True), "flag"
            elif env.get(ASR_ENV):
                path, source = _given(env[ASR_ENV], name, f"${ASR_ENV}", folder=True), "env"
            elif use_cache:
                found = weights.hub_cached(ASR_REPOS[asr], "config.json")
                if found:
                    path, source = os.path.dirname(found), "hub cache"
        else:
            ckpt = CHECKPOINTS[name]
            if given.get(name):
                path, source = _given(given[name], name, ckpt.flag), "flag"
            elif env.get(ckpt.env):
                path, source = _given(env[ckpt.env], name, f"${ckpt.env}"), "env"
            elif use_cache:
                found = weights.hub_cached(ckpt.hf_repo, ckpt.filename) if ckpt.hf_repo else None
                if found:
                    path, source = found, "hub cache"
                elif (torch_hub_checkpoints() / ckpt.filename).is_file():
                    path, source = str(torch_hub_checkpoints() / ckpt.filename), "torch hub"
                if path is not None:
                    check_file(path, ckpt)  # a cached file must be the published one (where that is known)
        if path is not None:
            out.paths[name], out.sources[name] = path, source
    return out


def missing_message(names: Iterable[str], asr: str = "qwen3-asr") -> str:
    """One line: what is missing, the flag and variable of each, and the ways forward."""
    items = []
    for name in names:
        if name == "asr":
            items.append(f"ASR {asr} ({ASR_REPOS[asr]}) [--asr-model DIR or ${ASR_ENV}]")
        elif name == "wavlm":
            items.append(f"WavLM speaker encoder for SIM ({weights.WAVLM_FILE}) [--wavlm-ckpt or "
                         f"${weights.ENV_VARS['wavlm']}]")
        else:
            c = CHECKPOINTS[name]
            items.append(f"{c.what.split(' (')[0]} ({c.filename}) [{c.flag} or ${c.env}]")
    return ("metric checkpoints not found: " + "; ".join(items) + ". Ways forward: pass the paths, add --download "
            "to fetch them (sources and licences: --licences), leave the metric out with --metrics, or run "
            "`python evaluate.py --demo` for a random-weight demo.")


def check_file(path: str, ckpt: MetricCheckpoint) -> None:
    """Byte count and sha256 (or its published prefix) where known; ValueError naming the file otherwise."""
    if ckpt.size is not None and os.path.getsize(path) != ckpt.size:
        raise ValueError(f"{path}: {ckpt.filename} has {os.path.getsize(path):,} bytes, expected {ckpt.size:,} "
                         "(incomplete or different file; delete it and download again)")
    if ckpt.sha256:
        digest = sha256_of(path)
        if not digest.startswith(ckpt.sha256):
            raise ValueError(f"{path}: sha256 {digest[:16]}... does not match the published {ckpt.sha256} "
                             "(incomplete or different file; delete it and download again)")


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch_url(url: str, target: Path, progress: bool = True) -> None:
    """Download `url` to `target` all-or-nothing (temp file beside it, renamed when complete)."""
    from tqdm.auto import tqdm

    with atomic_output(target) as tmp:
        with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as out:  # noqa: S310 - fixed URLs
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name, disable=not progress) as bar:
                for block in iter(lambda: resp.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))


def download(names: Iterable[str], resolved: Resolved, asr: str = "qwen3-asr", progress: bool = True) -> Resolved:
    """Fetch the missing checkpoints of `names`: from the hub mirror where there is one (into the hub cache),
    else from the publisher's URL (into torch.hub's checkpoint folder); the other source if the first fails."""
    import huggingface_hub as hub

    for name in resolved.missing(names):
        if name == "wavlm":
            got = weights.download(["wavlm"])
            resolved.paths[name], resolved.sources[name] = got.wavlm, "download"
            continue
        if name == "asr":
            try:
                path = hub.snapshot_download(repo_id=ASR_REPOS[asr])
            except Exception as e:  # noqa: BLE001 - hub errors become one line
                raise OSError(f"download of {ASR_REPOS[asr]} failed: {type(e).__name__}: {_first_line(e)}") from None
            resolved.paths[name], resolved.sources[name] = path, "download"
            continue
        ckpt = CHECKPOINTS[name]
        errors = []
        for source in (("hub", "url") if ckpt.hf_repo else ("url",)):
            try:
                if source == "hub":
                    path = hub.hf_hub_download(repo_id=ckpt.hf_repo, filename=ckpt.filename)
                else:
                    path = str(torch_hub_checkpoints() / ckpt.filename)
                    _fetch_url(ckpt.url, Path(path), progress)
                check_file(path, ckpt)
            except Exception as e:  # noqa: BLE001 - try the next source, report all of them if none works
                errors.append(f"{ckpt.hf_repo if source == 'hub' else ckpt.url}: {type(e).__name__}: {_first_line(e)}")
                continue
            resolved.paths[name], resolved.sources[name] = path, "download"
            break
        else:
            raise OSError(f"download of {ckpt.filename} failed: " + " | ".join(errors))
    return resolved


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def licence_table(asr: Optional[str] = None) -> str:
    """Markdown table: every metric checkpoint, where it comes from, size/sha256 where known, its licence."""
    rows = ["| checkpoint | used for | flag / env | source | size, sha256 | licence |",
            "| --- | --- | --- | --- | --- | --- |"]
    for c in CHECKPOINTS.values():
        source = c.url + (f" (hub mirror: {c.hf_repo})" if c.hf_repo else "")
        facts = ", ".join(x for x in (f"{c.size:,} B" if c.size else "",
                                      f"sha256 {c.sha256}..." if c.sha256 else "") if x) or "not published"
        rows.append(f"| {c.filename} | {c.what} | {c.flag} / ${c.env} | {source} | {facts} | {c.licence} |")
    for name in ([asr] if asr else ASR_REPOS):
        rows.append(f"| {ASR_REPOS[name]} | ASR for WER/CER (--asr {name}) | --asr-model / ${ASR_ENV} | "
                    f"https://huggingface.co/{ASR_REPOS[name]} | not published | {ASR_LICENCES[name]} |")
    wavlm_licence = next((entry[-1] for entry in weights.LICENCES if entry[0] == weights.WAVLM_FILE),
                         "see infer.py --licences")
    rows.append(f"| {weights.WAVLM_FILE} | WavLM-Large + ECAPA-TDNN speaker encoder (SIM) | --wavlm-ckpt / "
                f"${weights.ENV_VARS['wavlm']} | {weights.WAVLM_REPO} (mirror of microsoft/UniSpeech) | "
                f"{weights.WAVLM_SIZE:,} B | {wavlm_licence} |")
    return "\n".join(rows)
