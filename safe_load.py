"""One way to read a torch checkpoint safely: torch.load(weights_only=True), memory-mapped when the
file allows it (zip format), with an explicit allow-list of extra globals, and every failure turned
into one ValueError line that names the file (and the global it refused, if that was the problem)."""
import os
import re

import torch


def _failure_detail(err: Exception) -> str:
    text = str(err).strip()
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return f"it references {refused.group(1)}, which is not on the allow-list"
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


def safe_torch_load(path, what: str = "torch checkpoint", safe_globals=()):
    """The unpickled object of `path`. FileNotFoundError when it is missing; ValueError
    "<path>: not a loadable <what> (...)" when it is not a weights-only checkpoint."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    with torch.serialization.safe_globals(list(safe_globals)):
        try:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:  # the legacy (non-zip) format cannot be memory-mapped
                if "mmap" not in str(err) and "zip" not in str(err).lower():
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # garbage input surfaces as many exception types
            raise ValueError(f"{path}: not a loadable {what} "
                             f"(torch.load weights_only=True failed: {_failure_detail(err)})") from None
