"""Checks a training config before anything is built or created: the root is a JSON object, every key is a
field of ModelArguments / DataArguments / TalkerArguments / TrainingArguments (or a legacy alias), every value
has its field's type (no string for a number, no number for a string, no bool for an integer, finite numbers)
and lies in its field's range, and the choices (presets, schedulers, optimizers, loggers) are known ones.

A problem is one ConfigError line: `<config file>: <key>: <what is wrong>` (an override from the command line
is named as such). train.py and precompute.py call `check_config` on the raw dict, before aliases are applied.
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import json
import math
import os
import types
import typing
from typing import Any, Callable, Dict, Optional, Tuple

from training.modeling import PRESETS, ConfigError

ALIASES = {"warmup_ratio": "warmup_steps", "gradient_checkpointing": "activation_checkpointing",
           "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs"}
# dict-valued fields that transformers also takes as a JSON string; those that are not files besides
JSON_OBJECT_FIELDS = ("lr_scheduler_kwargs", "activation_checkpointing_kwargs", "gradient_checkpointing_kwargs")
JSON_OR_FILE_FIELDS = ("deepspeed", "fsdp_config", "accelerator_config")
MAX_SEED = 2 ** 32 - 1  # numpy's seed range (transformers.set_seed seeds numpy)


def _at_least(low):
    return (lambda v: v >= low), f"must be at least {low}"


def _above(low):
    return (lambda v: v > low), f"must be greater than {low}"


def _between(low, high, high_open=False):
    if high_open:
        return (lambda v: low <= v < high), f"must be in [{low}, {high})"
    return (lambda v: low <= v <= high), f"must be in [{low}, {high}]"


RANGES: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    # ModelArguments: sizes of the architecture and the data layout
    **{k: _at_least(1) for k in (
        "encoder_projector_ds_rate", "speech_embedding_dim", "motion_embedding_dim", "model_max_length",
        "frames_per_second", "patch_size", "context_patches", "patch_encoder_n_layer", "patch_encoder_n_head",
        "cfm_k_repeat", "dit_n_layer", "dit_n_head", "speaker_embedding_dim")},
    "delay": _at_least(0),
    "motion_cfm_weight": _at_least(0),
    # DataArguments
    "max_failed_fraction": _between(0, 1),
    # TalkerArguments
    "lora_r": _at_least(0),
    "lora_alpha": _above(0),
    "lora_dropout": _between(0, 1, high_open=True),
    "lora_target_modules": ((lambda v: len(v) > 0), "must name at least one module"),
    # TrainingArguments
    **{k: _at_least(1) for k in (
        "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "ddp_timeout",
        "save_total_limit", "dataloader_prefetch_factor", "torch_empty_cache_steps", "eval_accumulation_steps")},
    **{k: _at_least(0) for k in (
        "learning_rate", "weight_decay", "adam_epsilon", "max_grad_norm", "warmup_steps",
        "dataloader_num_workers", "neftune_noise_alpha")},
    **{k: _above(0) for k in ("num_train_epochs", "logging_steps", "save_steps", "eval_steps")},
    "max_steps": ((lambda v: v == -1 or v >= 1), "must be a positive number of steps, or -1 to train "
                                                 "num_train_epochs epochs"),
    "adam_beta1": _between(0, 1, high_open=True),
    "adam_beta2": _between(0, 1, high_open=True),
    "label_smoothing_factor": _between(0, 1),
    "warmup_ratio": _between(0, 1, high_open=True),
    "seed": _between(0, MAX_SEED),
    "data_seed": _between(0, MAX_SEED),
    "output_dir": ((lambda v: bool(v.strip())), "must name a folder"),
}


def _enum_values(cls) -> list:
    return [e.value for e in cls]


def _choices() -> Dict[str, list]:
    from transformers.training_args import OptimizerNames

    return {"model_preset": list(PRESETS), "optim": _enum_values(OptimizerNames)}


def _report_to_names() -> list:
    try:
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
        names = list(INTEGRATION_TO_CALLBACK)
    except ImportError:  # pragma: no cover - another transformers layout: leave it to transformers
        return []
    return names + ["all", "none"]


@functools.lru_cache(maxsize=1)
def config_fields() -> Dict[str, Any]:
    """{key: its type} of every key a training config may hold (the four dataclasses and the aliases)."""
    import transformers  # noqa: F401 - TrainingArguments' annotations refer to it

    from speech_llm import ModelArguments
    from training.dataset import DataArguments
    from training.modeling import TalkerArguments, TrainingArguments

    known: Dict[str, Any] = {}
    for cls in (ModelArguments, DataArguments, TalkerArguments, TrainingArguments):
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # noqa: BLE001 - an unresolvable annotation: that field is not type-checked
            hints = {}
        for f in dataclasses.fields(cls):
            if f.init:
                known[f.name] = hints.get(f.name, Any)
    known["warmup_ratio"] = float
    for old, new in ALIASES.items():
        known.setdefault(old, known.get(new, Any))
    return known


# ------------------------------------------------------------------------------------------ types

def _describe_type(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        parts = []
        for a in args:
            d = _describe_type(a)
            if d not in parts:
                parts.append(d)
        return " or ".join(parts)
    if origin is typing.Literal:
        return " or ".join(json.dumps(a) for a in args)
    if origin in (list, typing.List):
        inner = _describe_type(args[0]) if args else "values"
        return f"a list of {inner if inner.startswith('one of') else _plural(inner)}"
    if origin in (dict, typing.Dict) or tp is dict:
        return "an object"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(json.dumps(v) for v in _enum_values(tp))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _plural(desc: str) -> str:
    return {"an integer": "integers", "a number": "numbers", "a string": "strings",
            "true or false": "booleans"}.get(desc, desc)


def _fits(value, tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return any(value is a or (type(value) is type(a) and value == a) for a in args)
    if origin in (list, typing.List):
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value) if args else isinstance(value, list)
    if origin in (dict, typing.Dict) or tp is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return isinstance(value, tp) or value in _enum_values(tp)
    if isinstance(tp, type):
        return isinstance(value, tp) or isinstance(value, dict)
    return True


def _narrow(tp):
    """`Enum | str` -> the Enum (transformers converts the string and refuses others later, after the model
    would have been built); `str | list[Enum]` keeps the str (debug: space-separated names)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums and str in args:
            rest = [a for a in args if a is not str]
            return typing.Union[tuple(rest)] if len(rest) > 1 else rest[0]
    return tp


def _show(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        text = json.dumps(value)
        return f"the string {text if len(text) <= 60 else text[:57] + '...'}"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return json.dumps(value)


def _hint(value, tp) -> str:
    """' (write 30, without quotes)' when a string holds a value of the right type."""
    if not isinstance(value, str):
        return ""
    try:
        parsed = json.loads(value)
    except ValueError:
        return ""
    if not isinstance(parsed, str) and _fits(parsed, tp):
        return f" (write {json.dumps(parsed)}, without quotes)"
    return ""


# ------------------------------------------------------------------------------------------ the check

def check_config(raw, source: str = "config", overrides: Optional[set] = None) -> None:
    """Raise ConfigError naming `source`, the key and the problem for the first bad key of `raw` (the config
    as read, before aliases); `overrides`: the keys that came from the command line."""
    overrides = overrides or set()
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a JSON object {{\"key\": value, ...}}, found "
                          f"{'a list' if isinstance(raw, list) else _show(raw)}")

    def fail(key, problem):
        where = f"{key} (command-line override)" if key in overrides else key
        raise ConfigError(f"{source}: {where}: {problem}")

    known = config_fields()
    choices = _choices()
    for key, value in raw.items():
        if key not in known:
            if isinstance(key, str) and key.startswith("-"):
                fail(key, f"unknown key; overrides are key=value without dashes ({key.lstrip('-')}=...)")
            close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.75)
            fail(key, "unknown key" + (f" (did you mean {close[0]}?)" if close else
                                       " (not a field of ModelArguments, DataArguments, TalkerArguments or "
                                       "transformers.TrainingArguments)"))
        tp = _narrow(known[key])
        if key in JSON_OBJECT_FIELDS and isinstance(value, str):
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                fail(key, f"expected an object such as {{\"name\": value}}, got {_show(value)}")
            value = parsed
        elif key in JSON_OR_FILE_FIELDS and isinstance(value, str):
            if value.lstrip().startswith("{"):
                try:
                    parsed = json.loads(value)
                except ValueError as e:
                    fail(key, f"not a JSON object ({e})")
                if not isinstance(parsed, dict):
                    fail(key, "not a JSON object")
            elif not os.path.isfile(os.path.expanduser(value)):
                fail(key, f"{value}: file not found (expected an object or a JSON file)")
            continue
        if not _fits(value, tp):
            fail(key, f"expected {_describe_type(tp)}, got {_show(value)}{_hint(value, tp)}")
        if key in choices and value not in choices[key]:
            shown = choices[key] if len(choices[key]) <= 12 else choices[key][:12] + ["..."]
            fail(key, f"expected one of {', '.join(shown)}, got {_show(value)}")
        if key == "report_to" and value is not None:
            names = _report_to_names()
            for name in ([value] if isinstance(value, str) else value):
                if names and name not in names:
                    fail(key, f"unknown logger {json.dumps(name)} (known: {', '.join(names)})")
        if key == "debug" and isinstance(value, str):
            from transformers.debug_utils import DebugOption
            allowed = _enum_values(DebugOption)
            for name in value.split():
                if name not in allowed:
                    fail(key, f"unknown option {json.dumps(name)} (known: {', '.join(allowed)})")
        if key in RANGES and value is not None:
            ok, rule = RANGES[key]
            if not ok(value):
                fail(key, f"{rule}, got {_show(value)}")
