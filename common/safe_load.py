"""Reading checkpoints safely, and saying in one line what is wrong with one that does not fit.

- safe_torch_load: torch.load(weights_only=True), memory-mapped when the file allows it (zip format),
  with an explicit allow-list of extra globals; every failure is one ValueError line naming the file.
- mmap_safetensors: the tensors of a .safetensors file as views of one read-only (copy-on-write) memory
  map: nothing is read until a tensor is used, and pages of weights a stage never touches stay on disk.
- key_report: the one strict-load report of every loader (SpeechLLM, WhisperX-VAE, LIA-X, speaker
  encoder): how many of the expected keys the file holds, what is missing / unexpected / of the wrong
  shape (first few of each), and what the file looks like instead when it is another model's.
"""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field

import torch


def _failure_detail(err: Exception) -> str:
    text = str(err).strip()
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return f"it references {refused.group(1)}, which is not on the allow-list"
    # torch's own advice (retry with weights_only=False) is never the way forward here
    first = text.splitlines()[0][:200] if text else ""
    if "weights_only" in first or not first:
        return "not a torch checkpoint (no weights-only pickle or zip archive inside)"
    return f"{type(err).__name__}: {first}"


def safe_torch_load(path, what: str = "torch checkpoint", safe_globals=()):
    """The unpickled object of `path`. FileNotFoundError when it is missing; ValueError
    "<path>: not a loadable <what> (...)" when it is not a weights-only checkpoint."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    with torch.serialization.safe_globals(list(safe_globals)):
        try:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:  # the legacy (non-zip) format cannot be memory-mapped
                if "mmap" not in str(err) and "zip" not in str(err).lower():
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # garbage input surfaces as many exception types
            raise ValueError(f"{path}: not a loadable {what} ({_failure_detail(err)})") from None


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def safetensors_header(path) -> tuple:
    """(header dict without __metadata__, byte offset of the data) of a .safetensors file; ValueError naming
    the file when it is not one."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, 100 << 20):
            raise ValueError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a safetensors file (header is not JSON: {err})") from None
    header.pop("__metadata__", None)
    for name, info in header.items():
        start, end = info.get("data_offsets", (-1, -1))
        if info.get("dtype") not in _SAFETENSORS_DTYPES or not 0 <= start <= end <= size - 8 - n:
            raise ValueError(f"{path}: not a readable safetensors file (entry {name!r} is malformed)")
    return header, 8 + n


def mmap_safetensors(path) -> dict:
    """{name: tensor} of a .safetensors file without reading it: every tensor is a view of one private
    memory map (writes copy, the file is never changed). Pages become resident when a tensor is used and
    are given back when the last view is dropped. A tensor whose offset is not a multiple of its element
    size (possible in files written by other tools) is copied."""
    header, data_start = safetensors_header(path)
    storage = torch.UntypedStorage.from_file(os.fspath(path), False, os.path.getsize(path))
    tensors = {}
    for name, info in header.items():
        dtype, shape = _SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"])
        start, end = info["data_offsets"]
        offset, itemsize = data_start + start, dtype.itemsize
        if offset % itemsize == 0:
            t = torch.empty(0, dtype=dtype).set_(storage, offset // itemsize, shape)
        else:
            raw = torch.empty(0, dtype=torch.uint8).set_(storage, offset, (end - start,))
            t = raw.clone().view(dtype).reshape(shape)
        if t.numel() * itemsize != end - start:
            raise ValueError(f"{path}: not a readable safetensors file ({name!r}: shape {list(shape)} does not "
                             f"match its {end - start} bytes)")
        tensors[name] = t
    return tensors


# Key prefixes that identify the checkpoints a user may pass by mistake (checked in this order).
_KNOWN_LAYOUTS = (
    (("speech_cfm.", "motion_cfm.", "speech_patch_encoder."), "a Talker-T2AV SpeechLLM checkpoint"),
    (("patch_encoder.", "motion_cfm."), "a TTS-stage SpeechLLM checkpoint (reference key names)"),
    (("CodecEnc.", "CodecDec."), "a WhisperX-VAE checkpoint"),
    (("enc.", "dec."), "a LIA-X generator checkpoint"),
    (("feature_extract.", "pooling."), "a WavLM ECAPA-TDNN speaker checkpoint"),
    (("encoder.layers.", "feature_extractor."), "a WavLM (fairseq) checkpoint"),
    (("model.layers.", "model.embed_tokens."), "a plain Qwen3 / causal-LM checkpoint"),
    (("encoder.blocks.", "decoder.blocks."), "an OpenAI Whisper checkpoint"),
)


def looks_like(keys) -> str:
    """A guess at what a state dict is, from its key prefixes ('' when unknown)."""
    keys = list(keys)
    for prefixes, name in _KNOWN_LAYOUTS:
        if all(any(k.startswith(p) for k in keys) for p in prefixes):
            return name
    return ""


def _first(items, n=3) -> str:
    items = sorted(items)
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


@dataclass
class KeyReport:
    n_expected: int
    n_matching: int  # expected keys present with the right shape
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)  # "key (file shape) != (model shape)"
    looks_like: str = ""

    def ok(self, allow_unexpected: bool = False) -> bool:
        return not (self.missing or self.mismatched or (self.unexpected and not allow_unexpected))

    def message(self, what: str, allow_unexpected: bool = False) -> str:
        """One line: 'holds 0 of the 538 SpeechLLM keys (...); looks like a LIA-X generator checkpoint'."""
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing (e.g. {_first(self.missing)})")
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} of the wrong shape (e.g. {_first(self.mismatched, 2)})")
        if self.unexpected and not allow_unexpected:
            parts.append(f"{len(self.unexpected)} unexpected (e.g. {_first(self.unexpected)})")
        text = f"holds {self.n_matching} of the {self.n_expected} {what} keys"
        if parts:
            text += ": " + "; ".join(parts)
        if self.looks_like and self.looks_like.find(what) < 0:
            text += f"; looks like {self.looks_like}"
        return text


def key_report(expected_shapes: dict, found_shapes: dict, ignore=()) -> KeyReport:
    """Compare {key: shape} of a model with {key: shape} of a file; keys in `ignore` are not counted."""
    expected = {k: tuple(v) for k, v in expected_shapes.items() if k not in ignore}
    found = {k: tuple(v) for k, v in found_shapes.items() if k not in ignore}
    mismatched = [f"{k} {found[k]} != {expected[k]}" for k in expected if k in found and found[k] != expected[k]]
    return KeyReport(
        n_expected=len(expected),
        n_matching=sum(1 for k in expected if found.get(k) == expected[k]),
        missing=[k for k in expected if k not in found],
        unexpected=[k for k in found if k not in expected],
        mismatched=mismatched,
        looks_like=looks_like(found),
    )
