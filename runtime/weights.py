"""Where the four released weight sets are, and how to fetch them (huggingface_hub, into the hub cache).

Each file is looked up in this order: an explicit path (CLI flag / argument), its environment variable
(the reference's CHECKPOINT_DIR, WHISPERVAE_CKPT, LIAX_CKPT, WAVLM_CKPT), the layout of a local copy of
the HKUSTAudio/Talker-T2AV repository next to --checkpoint-dir, then the local hub cache (no network).
`download()` fetches what is missing; nothing else in the project touches the network.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from runtime.request import RequestError

TALKER_REPO = "HKUSTAudio/Talker-T2AV"
TALKER_SUBDIR = "talker-t2av"
TALKER_FILES = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                "chat_template.jinja")
VAE_FILE = "whisperx-vae/model.ckpt"
LIAX_REPO = "YaohuiW/LIA-X"
LIAX_FILE = "lia-x.pt"
# The official speaker checkpoint is a Google Drive file of microsoft/UniSpeech; this public hub mirror
# holds the same wavlm_large_finetune.pth (WavLM-Large weights included).
WAVLM_REPO = "bezzam/wavlm_large_finetune_seed_tts_eval"
WAVLM_FILE = "wavlm_large_finetune.pth"
WAVLM_SIZE = 1_301_926_579  # bytes of the default mirror's file

ENV_VARS = {"checkpoint_dir": "CHECKPOINT_DIR", "whisperx_vae": "WHISPERVAE_CKPT", "liax": "LIAX_CKPT",
            "wavlm": "WAVLM_CKPT"}
COMPONENTS = ("checkpoint_dir", "whisperx_vae", "liax", "wavlm")
DESCRIPTIONS = {
    "checkpoint_dir": f"Talker-T2AV model folder ({TALKER_REPO}: {TALKER_SUBDIR}/model.safetensors + tokenizer)",
    "whisperx_vae": f"WhisperX-VAE audio autoencoder ({TALKER_REPO}: {VAE_FILE})",
    "liax": f"LIA-X face renderer ({LIAX_REPO}: {LIAX_FILE})",
    "wavlm": f"WavLM-Large speaker encoder ({WAVLM_FILE}, e.g. {WAVLM_REPO})",
}

# What each file is licensed under, as its publisher states it (shown by `infer.py --licences`).
LICENCES = (
    ("talker-t2av/model.safetensors, tokenizer, config", TALKER_REPO,
     "see the model card on the hub; the authors' code repository (zhenye234/Talker-T2AV) is Apache-2.0; "
     "the backbone is initialised from Qwen/Qwen3-0.6B (Apache-2.0)"),
    ("whisperx-vae/model.ckpt", TALKER_REPO,
     "as the model card states; contains Whisper large-v3 encoder weights (OpenAI, MIT)"),
    ("lia-x.pt", LIAX_REPO, "CC BY-NC 4.0 (non-commercial use only)"),
    ("wavlm_large_finetune.pth", "microsoft/UniSpeech (mirror: " + WAVLM_REPO + ")",
     "distributed by the microsoft/UniSpeech repository, licensed CC BY-SA 3.0; the WavLM-Large "
     "pre-trained weights it fine-tunes are MIT"),
)


class MissingWeightsError(FileNotFoundError):
    """Weights needed for a run are not found locally; the message lists the ways forward (for a library
    caller; infer.py words them with its flags, from `components`)."""

    def __init__(self, components: Iterable[str]):
        self.components = list(components)
        super().__init__(missing_message(self.components))


@dataclass
class WeightPaths:
    checkpoint_dir: Optional[str] = None
    whisperx_vae: Optional[str] = None
    liax: Optional[str] = None
    wavlm: Optional[str] = None
    sources: dict = field(default_factory=dict)  # component -> "argument" | "env" | "layout" | "cache" | "download"

    def missing(self, needs: Iterable[str] = COMPONENTS) -> list:
        return [c for c in needs if getattr(self, c) is None]

    def require(self, needs: Iterable[str] = COMPONENTS) -> "WeightPaths":
        missing = self.missing(needs)
        if missing:
            raise MissingWeightsError(missing)
        return self


def needed_for(mode: str, has_motion_input: bool = False) -> tuple:
    """Components a generation mode loads (TTS never renders, so it needs no LIA-X)."""
    if mode == "tts":
        return ("checkpoint_dir", "whisperx_vae", "wavlm")
    return COMPONENTS


# how a caller names each component: TalkerPipeline.from_pretrained's argument, infer.py's flag
ARGUMENTS = {"checkpoint_dir": "checkpoint_dir", "whisperx_vae": "whisperx_vae_ckpt", "liax": "liax_ckpt",
             "wavlm": "wavlm_ckpt"}


def missing_message(missing: Iterable[str], cli: bool = False) -> str:
    """One line naming what is missing and the ways forward, in a library caller's words or (cli) infer.py's."""
    def name(c):
        return f"--{_flag(c)}" if cli else f"{ARGUMENTS[c]}="

    items = "; ".join(f"{DESCRIPTIONS[c]} [{name(c)} or ${ENV_VARS[c]}]" for c in missing)
    if cli:
        ways = ("pass the paths (flags or environment variables above), or add --download to fetch them from the "
                "Hugging Face hub into its cache (roughly 13 GB; LIA-X weights are CC BY-NC 4.0), or run "
                "`python infer.py --demo` for a random-weight demo.")
    else:
        ways = ("pass the paths (arguments or environment variables above), or download=True to fetch them from "
                "the Hugging Face hub into its cache (roughly 13 GB; LIA-X weights are CC BY-NC 4.0), or use "
                "TalkerPipeline.demo() for random-weight models.")
    return f"weights not found: {items}. Ways forward: {ways}"


def _flag(component: str) -> str:
    return ARGUMENTS[component].replace("_", "-")


def _existing(path, component: str, from_env: bool) -> str:
    """Validate a user-given path: it must exist (a folder for checkpoint_dir, a file otherwise). The error
    names the argument (RequestError) or the environment variable it came from."""
    p = Path(os.path.expanduser(str(path)))
    problem = None
    if component == "checkpoint_dir":
        if not p.is_dir():
            problem = "checkpoint folder not found"
        elif not (p / "model.safetensors").is_file():
            problem = "no model.safetensors in the checkpoint folder"
    elif not p.is_file():
        problem = f"{DESCRIPTIONS[component].split(' (')[0]} checkpoint not found"
    if problem and from_env:
        raise FileNotFoundError(f"{p}: {problem} (${ENV_VARS[component]})")
    if problem:
        raise RequestError(ARGUMENTS[component], f"{p}: {problem}")
    return str(p)


def hub_cached(repo_id: str, filename: str) -> Optional[str]:
    """Path of a file in the local hub cache, or None (never touches the network)."""
    try:
        import huggingface_hub as hub

        found = hub.try_to_load_from_cache(repo_id=repo_id, filename=filename)
    except Exception:  # noqa: BLE001 - a broken cache is the same as no cache here
        return None
    return found if isinstance(found, str) and os.path.isfile(found) else None


def check_size(path: str, expected: int, what: str) -> None:
    size = os.path.getsize(path)
    if size != expected:
        raise ValueError(f"{path}: {what} has {size:,} bytes, expected {expected:,} "
                         "(incomplete or different file; delete it and download again)")


def locate(checkpoint_dir=None, whisperx_vae=None, liax=None, wavlm=None, wavlm_repo: str = WAVLM_REPO,
           wavlm_filename: str = WAVLM_FILE, env=None, use_cache: bool = True) -> WeightPaths:
    """Resolve every component (None where not found). Explicitly given paths that do not exist are errors."""
    env = os.environ if env is None else env
    paths = WeightPaths()
    given = {"checkpoint_dir": checkpoint_dir, "whisperx_vae": whisperx_vae, "liax": liax, "wavlm": wavlm}
    for comp in COMPONENTS:
        if given[comp]:
            setattr(paths, comp, _existing(given[comp], comp, from_env=False))
            paths.sources[comp] = "argument"
        elif env.get(ENV_VARS[comp]):
            setattr(paths, comp, _existing(env[ENV_VARS[comp]], comp, from_env=True))
            paths.sources[comp] = "env"

    # a local copy of the hub repository: <root>/talker-t2av (checkpoint dir) + <root>/whisperx-vae/model.ckpt
    if paths.checkpoint_dir and not paths.whisperx_vae:
        ckpt = Path(paths.checkpoint_dir)
        for candidate in (ckpt.parent / VAE_FILE, ckpt / VAE_FILE, ckpt / "model.ckpt"):
            if candidate.is_file():
                paths.whisperx_vae, paths.sources["whisperx_vae"] = str(candidate), "layout"
                break

    if use_cache:
        if not paths.checkpoint_dir:
            found = hub_cached(TALKER_REPO, f"{TALKER_SUBDIR}/model.safetensors")
            if found:
                paths.checkpoint_dir, paths.sources["checkpoint_dir"] = os.path.dirname(found), "cache"
        if not paths.whisperx_vae:
            found = hub_cached(TALKER_REPO, VAE_FILE)
            if found:
                paths.whisperx_vae, paths.sources["whisperx_vae"] = found, "cache"
        if not paths.liax:
            found = hub_cached(LIAX_REPO, LIAX_FILE)
            if found:
                paths.liax, paths.sources["liax"] = found, "cache"
        if not paths.wavlm:
            found = hub_cached(wavlm_repo, wavlm_filename)
            if found:
                if (wavlm_repo, wavlm_filename) == (WAVLM_REPO, WAVLM_FILE):
                    check_size(found, WAVLM_SIZE, "the WavLM speaker checkpoint")
                paths.wavlm, paths.sources["wavlm"] = found, "cache"
    return paths


def download(needs: Iterable[str] = COMPONENTS, paths: Optional[WeightPaths] = None,
             wavlm_repo: str = WAVLM_REPO, wavlm_filename: str = WAVLM_FILE,
             wavlm_size: Optional[int] = None) -> WeightPaths:
    """Fetch the missing components of `needs` into the hub cache (progress bars from huggingface_hub).

    wavlm_size: expected byte count of the speaker checkpoint; defaults to WAVLM_SIZE for the default
    mirror and to no check for another source.
    """
    import huggingface_hub as hub

    paths = paths or WeightPaths()
    needs = [c for c in needs if getattr(paths, c) is None]
    if wavlm_size is None and (wavlm_repo, wavlm_filename) == (WAVLM_REPO, WAVLM_FILE):
        wavlm_size = WAVLM_SIZE
    try:
        if "checkpoint_dir" in needs:
            got = [hub.hf_hub_download(repo_id=TALKER_REPO, filename=f"{TALKER_SUBDIR}/{name}")
                   for name in TALKER_FILES]
            paths.checkpoint_dir, paths.sources["checkpoint_dir"] = os.path.dirname(got[0]), "download"
        if "whisperx_vae" in needs:
            paths.whisperx_vae = hub.hf_hub_download(repo_id=TALKER_REPO, filename=VAE_FILE)
            paths.sources["whisperx_vae"] = "download"
        if "liax" in needs:
            warnings.warn(f"{LIAX_REPO}/{LIAX_FILE} is licensed CC BY-NC 4.0 (non-commercial use only)",
                          stacklevel=2)
            paths.liax, paths.sources["liax"] = hub.hf_hub_download(repo_id=LIAX_REPO, filename=LIAX_FILE), "download"
        if "wavlm" in needs:
            paths.wavlm = hub.hf_hub_download(repo_id=wavlm_repo, filename=wavlm_filename)
            paths.sources["wavlm"] = "download"
    except (OSError, ValueError):
        raise
    except Exception as e:  # noqa: BLE001 - hub errors (HTTP, offline mode, ...) become one line
        raise OSError(f"download from the Hugging Face hub failed: {type(e).__name__}: "
                      f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    if "wavlm" in needs and wavlm_size:
        check_size(paths.wavlm, int(wavlm_size), "the WavLM speaker checkpoint")
    return paths


def licence_text() -> str:
    """The licence of each weight file as a Markdown table (the README's, without the sizes)."""
    rows = ["| file | where it comes from | licence |", "| --- | --- | --- |"]
    rows += [f"| {what} | {source} | {licence} |" for what, source, licence in LICENCES]
    return "\n".join(rows)
