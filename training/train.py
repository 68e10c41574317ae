#!/usr/bin/env python
"""Talker-T2AV training entry point (transformers Trainer: DDP, FSDP and DeepSpeed come from the library).

    torchrun --standalone --nnodes=1 --nproc_per_node=8 training/train.py training/config.json
    python training/train.py training/config_tiny.json                      # one process, CPU or one GPU
    python training/train.py training/config.json output_dir=runs/a max_steps=1000   # key=value overrides

One JSON holds ModelArguments (speech_llm.py), DataArguments (training/dataset.py), TalkerArguments
(training/modeling.py) and transformers TrainingArguments fields. A run resumes from the newest complete
`output_dir/checkpoint-*` when there is one, otherwise starts from `init_from` (a release folder), or from the
backbone + `tts_checkpoint_path` warm start, or from random init (tiny preset). Every run ends with
`output_dir/final`, a release-format folder that infer.py --checkpoint-dir and SpeechLLM.from_pretrained load
strictly; a run whose output_dir already holds a finished run (and its final) says so and trains nothing:
give a new run its own folder with the `output_dir=DIR` override.

The whole config (every key known, each value of its field's type and range, output_dir writable, the named
files present) is checked before anything is built or created. Exit status: 0 done, 2 the config cannot run
(one line: the config file, the key, the problem; nothing created), 1 the data or the run failed.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from typing import Optional

if not __package__:  # launched by path (python training/train.py, torchrun): the repository root is importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("WANDB_PROJECT", "talker-t2av")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

from speech_llm import ENCODER_PREFIXES, TIED_KEYS, WEIGHTS_NAME, ModelArguments  # noqa: E402
from training.config_check import ALIASES, check_config  # noqa: E402
from training.dataset import (Collator, DataArguments, DataError, FailureMonitor, FeatureCache,  # noqa: E402
                              TalkerDataset, build_rows)
from training.modeling import (ConfigError, TalkerArguments, TrainingArguments, apply_lora,  # noqa: E402
                               attach_encoders, build_model, check_release_folder, lora_scale,
                               merge_lora_state_dict, n_params, trainable_digest, warm_start_from_tts, write_json)

PROG = "train.py"
STAGING = ".staging"  # checkpoints are written here and renamed into output_dir when complete
CONFIG_COPY = "talker_train_config.json"
LEGACY_ALIASES = ALIASES  # warmup_ratio: transformers 5 takes a ratio in warmup_steps; the others are deprecated


class NonFiniteLossError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------ config

def config_source(config) -> str:
    """How messages name the config: its path, or "config" for a dict."""
    return "config" if isinstance(config, dict) else os.fspath(config)


def load_config(config, overrides=()) -> dict:
    """The config as a dict: a JSON file or a dict, then `key=value` overrides (values parsed as JSON when
    they parse, else strings), checked (config_check: keys, types, ranges) before the aliases are applied."""
    source = config_source(config)
    if isinstance(config, dict):
        raw = dict(config)
    else:
        try:
            with open(config, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{source}: not a readable JSON config ({e})") from None
    if not isinstance(raw, dict):
        check_config(raw, source)  # a list or a scalar: refused before the overrides touch it
    override_keys = set()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: command-line override {item!r}: overrides are key=value "
                              "(e.g. output_dir=./outputs/other_run)")
        key, value = item.split("=", 1)
        try:
            raw[key] = json.loads(value)
        except ValueError:
            raw[key] = value
        override_keys.add(key)
    check_config(raw, source, override_keys)
    for old, new in LEGACY_ALIASES.items():
        if old in raw:
            value = raw.pop(old)
            raw.setdefault(new, value)
    return raw


def has_accelerator() -> bool:
    accel = getattr(torch, "accelerator", None)
    return bool(accel.is_available()) if accel is not None else torch.cuda.is_available()


def parse_config(raw: dict, source: str = "config"):
    """(ModelArguments, DataArguments, TalkerArguments, TrainingArguments) of a loaded config; the checks
    that need the parsed fields (transformers' own, the learning-rate schedule) raise ConfigError."""
    if not has_accelerator() and "use_cpu" not in raw:
        raw = dict(raw, use_cpu=True)  # transformers sets up CPU/gloo ranks (torchrun) only with use_cpu
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TalkerArguments, TrainingArguments))
    try:
        parsed = parser.parse_dict(raw, allow_extra_keys=False)
    except (ValueError, TypeError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{source}: {message}") from None
    check_schedule(parsed[3], source)
    return parsed


def check_schedule(args, source: str = "config") -> None:
    """Build the learning-rate schedule on a dummy optimizer and step it through a short run: a wrong
    lr_scheduler_kwargs (an unknown name, a wrong value) fails here, not after the model is built."""
    import warnings

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=args.learning_rate)
    total = 20
    warmup = args.warmup_steps
    warmup = int(warmup * total) if warmup < 1 else min(int(warmup), total)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scheduler = transformers.get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                                                   num_training_steps=total,
                                                   scheduler_specific_kwargs=dict(args.lr_scheduler_kwargs or {}))
            lrs = []
            for _ in range(total):
                optimizer.step()
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(1.0)
                else:
                    scheduler.step()
                lrs.append(optimizer.param_groups[0]["lr"])
    except (TypeError, ValueError, KeyError, ZeroDivisionError) as e:
        raise ConfigError(f"{source}: lr_scheduler_kwargs: {_json(args.lr_scheduler_kwargs)} does not fit "
                          f"lr_scheduler_type {args.lr_scheduler_type.value} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    bad = [lr for lr in lrs if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0]
    if bad:
        raise ConfigError(f"{source}: lr_scheduler_kwargs: {_json(args.lr_scheduler_kwargs)} gives a learning rate "
                          f"of {bad[0]} with lr_scheduler_type {args.lr_scheduler_type.value}")


def _json(value) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def check_output_dir(output_dir: str, source: str = "config") -> None:
    """output_dir is a folder this process can write, or one it can create (nothing is created here)."""
    path = os.path.abspath(output_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{source}: output_dir: {output_dir} is a file, not a folder")
    probe_in = path
    while not os.path.exists(probe_in):
        parent = os.path.dirname(probe_in)
        if parent == probe_in:
            break
        probe_in = parent
    if not os.path.isdir(probe_in):
        raise ConfigError(f"{source}: output_dir: cannot create {output_dir}: {probe_in} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=probe_in)
    except OSError as e:
        what = f"{output_dir} is not writable" if probe_in == path else \
            f"cannot create {output_dir}: {probe_in} is not writable"
        raise ConfigError(f"{source}: output_dir: {what} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


def check_paths(model_args, data_args, talker, training_args, resume: Optional[str], source: str) -> None:
    """The files and folders the config names exist (before the model is built)."""
    need = []
    if talker.init_from:
        need.append(("init_from", talker.init_from, os.path.isdir, "folder"))
    elif model_args.tts_checkpoint_path and not resume:
        need.append(("tts_checkpoint_path", model_args.tts_checkpoint_path, os.path.exists, "checkpoint"))
    if training_args.resume_from_checkpoint:
        need.append(("resume_from_checkpoint", training_args.resume_from_checkpoint, os.path.isdir, "folder"))
    if data_args.feature_cache:
        need.append(("feature_cache", data_args.feature_cache, os.path.isdir, "folder"))
    elif talker.model_preset != "tiny":
        for key in ("whisperx_vae_ckpt", "wavlm_ckpt", "wavlm_backbone_ckpt"):
            if getattr(talker, key):
                need.append((key, getattr(talker, key), os.path.isfile, "file"))
    for key, path, exists, what in need:
        if not exists(os.path.expanduser(path)):
            raise ConfigError(f"{source}: {key}: {path}: {what} not found")


def finished_run(checkpoint: Optional[str], args) -> Optional[int]:
    """The step of `checkpoint` when it already reached the end this config asks for (max_steps, or
    num_train_epochs when max_steps is -1), else None."""
    if not checkpoint:
        return None
    try:
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
            state = json.load(f)
        step = int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if args.max_steps > 0:
        return step if step >= args.max_steps else None
    epoch = state.get("epoch")
    if isinstance(epoch, (int, float)) and epoch >= args.num_train_epochs - 1e-6:
        return step
    return None


def final_is_current(output_dir: str, checkpoint: str) -> bool:
    """output_dir/final exists and was written after `checkpoint`."""
    weights = os.path.join(output_dir, "final", WEIGHTS_NAME)
    try:
        return os.path.getmtime(weights) >= os.path.getmtime(os.path.join(checkpoint, "trainer_state.json"))
    except OSError:
        return False


def infer_command(final: str, talker) -> str:
    """The infer.py command that runs a run's final folder: --demo for the tiny preset (its encoders are the
    demo's), else the release way with the encoder checkpoints this run was given."""
    if talker.model_preset == "tiny":
        return f"python infer.py --demo --checkpoint-dir {shlex.quote(final)}"
    parts = ["python infer.py", f"--checkpoint-dir {shlex.quote(final)}"]
    for key in ("whisperx_vae_ckpt", "wavlm_ckpt", "wavlm_backbone_ckpt"):
        if getattr(talker, key, None):
            parts.append(f"--{key.replace('_', '-')} {shlex.quote(getattr(talker, key))}")
    return " ".join(parts)


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The newest complete checkpoint-N of output_dir (complete = renamed from the staging folder, with its
    trainer_state.json and weights)."""
    if not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        if name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit():
            path = os.path.join(output_dir, name)
            if os.path.isfile(os.path.join(path, "trainer_state.json")) and (
                    os.path.isfile(os.path.join(path, WEIGHTS_NAME)) or any(
                        n.startswith(("pytorch_model_fsdp", "global_step")) for n in os.listdir(path))):
                found.append((int(name[len("checkpoint-"):]), path))
    return max(found)[1] if found else None


# ------------------------------------------------------------------------------------------ trainer

class EpochCallback(TrainerCallback):
    """Gives the data set the epoch (its 30 s windows depend on it) when the loader does not."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch or 0))


class TalkerTrainer(Trainer):
    """Trainer with: per-component losses in the logs, a stop with the step and the batch's samples on a
    non-finite loss, the failure budget of the data, checkpoints in release format (without the frozen
    encoders) written atomically, and strict loading on resume."""

    def __init__(self, *args, monitor: Optional[FailureMonitor] = None, lora: Optional[dict] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.monitor = monitor
        self.lora = lora
        self._staging = False
        self._components = None

    # ---- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        paths = inputs.pop("sample_paths", None) or []
        skipped = inputs.pop("skipped", None)
        if self.monitor is not None:
            self.monitor.record(skipped)
        outputs = model(**inputs)
        loss = outputs["loss"]
        if not bool(torch.isfinite(loss.detach()).all()):
            parts = ", ".join(f"{name} {float(outputs[key].detach()):.4g}" for name, key in
                              (("speech CFM", "loss_speech_cfm"), ("motion CFM", "loss_motion_cfm"),
                               ("stop", "stop_loss")))
            raise NonFiniteLossError(
                f"non-finite loss ({float(loss.detach())}) at training step {self.state.global_step + 1} "
                f"(rank {self.args.process_index}; {parts}); the batch's samples: {'; '.join(paths)}")
        self._accumulate(outputs, inputs)
        return (loss, outputs) if return_outputs else loss

    def _accumulate(self, outputs, inputs):
        has_motion = (inputs["task_tag"] > 0).any().float()
        one = torch.ones((), device=has_motion.device)
        row = torch.stack([outputs["loss_speech_cfm"].detach().float().to(one.device), one,
                           outputs["loss_motion_cfm"].detach().float().to(one.device) * has_motion, has_motion,
                           outputs["stop_loss"].detach().float().to(one.device), one])
        self._components = row if self._components is None else self._components + row

    def log(self, logs, start_time=None):
        if "loss" in logs and self._components is not None:
            sums = self._components
            if self.args.world_size > 1:
                sums = self.accelerator.reduce(sums.clone(), reduction="sum")
            s, n, m, nm, st, ns = sums.tolist()
            if n:
                logs["loss_speech_cfm"] = round(s / n, 6)
            if nm:
                logs["loss_motion_cfm"] = round(m / nm, 6)
            if ns:
                logs["loss_stop"] = round(st / ns, 6)
            self._components = None
        super().log(logs, start_time)

    # ---- checkpoints
    def _get_output_dir(self, trial):
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING) if self._staging else run_dir

    def _save_checkpoint(self, model, trial):
        """Write checkpoint-N into <output_dir>/.staging, then rename it into output_dir once every rank
        has written its part: a kill during the save leaves no checkpoint-N behind."""
        run_dir = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            src, dst = os.path.join(run_dir, STAGING, name), os.path.join(run_dir, name)
            if os.path.isdir(dst):
                _remove_dir(dst)
            os.replace(src, dst)
            try:
                os.rmdir(os.path.join(run_dir, STAGING))
            except OSError:  # another rank's files still there (no shared file system): left to them
                pass
            _fsync_dir(run_dir)
            rotate(run_dir, self.args.save_total_limit)
        self.accelerator.wait_for_everyone()

    def _save(self, output_dir=None, state_dict=None):
        """Model part of a checkpoint: release format (model.safetensors without the frozen encoders and the
        tied LM head, config.json, speech_llm_args.json, tokenizer); LoRA runs keep the adapters unmerged
        here (lora.json says so) and merge them into `final`."""
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        model.save_pretrained(output_dir, tokenizer=self.processing_class, state_dict=state_dict)
        if self.lora:
            write_json(os.path.join(output_dir, "lora.json"), self.lora)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file

        from common.safe_load import key_report

        model = model if model is not None else self.model
        path = os.path.join(resume_from_checkpoint, WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise DataError(f"{resume_from_checkpoint}: no {WEIGHTS_NAME} (not a checkpoint of this trainer)")
        state = load_file(path)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(ENCODER_PREFIXES)}
        report = key_report(expected, {k: tuple(v.shape) for k, v in state.items()}, ignore=TIED_KEYS)
        if not report.ok():
            raise ConfigError(f"{path}: does not fit this run's model: {report.message('model')}")
        model.load_state_dict(state, strict=False)


def _remove_dir(path: str) -> None:
    """Rename, then delete: a kill during the deletion leaves no half-deleted checkpoint-N."""
    doomed = os.path.join(os.path.dirname(path), f".deleting-{os.path.basename(path)}-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rotate(run_dir: str, limit: Optional[int]) -> None:
    """Keep the newest `limit` checkpoints."""
    if not limit or limit <= 0:
        return
    steps = sorted(int(n[len("checkpoint-"):]) for n in os.listdir(run_dir)
                   if n.startswith("checkpoint-") and n[len("checkpoint-"):].isdigit())
    for step in steps[:-limit]:
        _remove_dir(os.path.join(run_dir, f"checkpoint-{step}"))


def clean_leftovers(output_dir: str) -> None:
    """Staging / deletion / final-temp folders of an interrupted run."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name == STAGING or name.startswith((".deleting-", ".final-")):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


# ------------------------------------------------------------------------------------------ the run

def write_final(trainer: TalkerTrainer, tokenizer, lora: Optional[dict], log=print, command=None) -> str:
    """<output_dir>/final in release format (LoRA merged), checked for a strict load, written atomically."""
    output_dir = trainer.args.output_dir
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # a collective under FSDP / DeepSpeed
    final = os.path.join(output_dir, "final")
    if trainer.args.should_save:
        state = {k: v for k, v in state.items() if not k.startswith(ENCODER_PREFIXES)}
        if lora:
            state = merge_lora_state_dict(state, lora["scale"])
        model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
        tmp = os.path.join(output_dir, f".final-{os.getpid()}")
        model.save_pretrained(tmp, tokenizer=tokenizer, state_dict=state)
        problem = check_release_folder(tmp)
        if problem:
            raise RuntimeError(f"{tmp}: the final folder would not load strictly: {problem}")
        if os.path.isdir(final):
            _remove_dir(final)
        os.replace(tmp, final)
        hint = command(final) if command else f"python infer.py --checkpoint-dir {shlex.quote(final)}"
        log(f"[train] wrote {final} (release format{', LoRA merged' if lora else ''}; try: {hint})")
    trainer.accelerator.wait_for_everyone()
    return final


def run(config, overrides=(), log=print) -> dict:
    """Train as the config says; returns {"final", "global_step", "resumed_from", "train_seconds", ...}
    ({"already_finished": True, ...} when output_dir holds a finished run with its final folder).

    Order: the whole config is checked (keys, types, ranges, the schedule, output_dir writable, the named
    files present), then the data manifests are read, then the model is built; output_dir is created only
    after that, and removed again when this run created it and fails before writing anything into it."""
    source = config_source(config)
    raw = load_config(config, overrides)
    model_args, data_args, talker, training_args = parse_config(raw, source)
    output_dir = training_args.output_dir
    check_output_dir(output_dir, source)
    resume = training_args.resume_from_checkpoint or latest_checkpoint(output_dir)
    check_paths(model_args, data_args, talker, training_args, resume, source)
    training_args.remove_unused_columns = False  # the batches carry the samples' paths for the error messages
    if not has_accelerator():
        training_args.dataloader_pin_memory = False
    is_main = training_args.should_save
    say = log if training_args.process_index == 0 else (lambda *a, **k: None)

    done_at = finished_run(resume, training_args)
    if done_at is not None and final_is_current(output_dir, resume):
        final = os.path.join(output_dir, "final")
        until = (f"max_steps {training_args.max_steps}" if training_args.max_steps > 0
                 else f"num_train_epochs {training_args.num_train_epochs:g}")
        more = "max_steps" if training_args.max_steps > 0 else "num_train_epochs"
        say(f"[train] {output_dir} already finished at step {done_at} ({until}; {final} is its result): nothing "
            f"to train; pass another output_dir (output_dir=DIR on the command line) or raise {more} to "
            f"train further")
        return {"final": final, "global_step": done_at, "resumed_from": resume, "already_finished": True,
                "train_seconds": 0.0, "train_loss": None, "log_history": []}

    created = first_missing_dir(output_dir) if is_main else None
    try:
        return _train(raw, model_args, data_args, talker, training_args, resume, done_at, log, say)
    except BaseException as e:
        if created:
            discard_unused_output(output_dir, created)
        if isinstance(e, ConfigError) and not str(e).startswith(f"{source}: "):
            raise ConfigError(f"{source}: {e}") from None
        raise


def _train(raw, model_args, data_args, talker, training_args, resume, done_at, log, say) -> dict:
    output_dir = training_args.output_dir
    rank, world = training_args.process_index, training_args.world_size
    is_main = training_args.should_save
    transformers.set_seed(training_args.seed)
    if resume:
        say(f"[train] resuming from {resume}" + (f" (already at step {done_at}: writing its final folder only)"
                                                  if done_at is not None else ""))

    rows = build_rows(data_args, model_args.tts_data_path, say)  # a bad manifest fails before the model
    cache = FeatureCache(data_args.feature_cache) if data_args.feature_cache else None
    model, tokenizer, model_args = build_model(model_args, talker, say)
    if model_args.tts_checkpoint_path and not talker.init_from:
        if resume:
            say("[warm start] skipped: the run resumes from a checkpoint")
        else:
            warm_start_from_tts(model, model_args.tts_checkpoint_path, say)
    if cache is None:
        attach_encoders(model, talker, say)
    else:
        check_cache_fits(cache, model_args)
        say(f"[data] feature cache {data_args.feature_cache}: {len(cache)} clips")
    model.freeze_for_training()
    lora = None
    if talker.lora_r > 0:
        apply_lora(model, talker, say)
        lora = {"r": talker.lora_r, "alpha": talker.lora_alpha, "scale": lora_scale(talker),
                "target_modules": list(talker.lora_target_modules), "merged": False}

    dataset = TalkerDataset(rows, tokenizer, model_args, cache, seed=training_args.data_seed or training_args.seed)
    log_path = os.path.join(output_dir, f"skipped_samples{'' if world == 1 else f'.rank{rank}'}.jsonl")
    monitor = FailureMonitor(rows, data_args.max_failed_fraction, world, log_path,
                             log=lambda m: log(m if world == 1 else f"[rank {rank}] {m}"))
    if is_main:  # everything is checked and built: now the output folder
        clean_leftovers(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        write_json(os.path.join(output_dir, CONFIG_COPY), raw)
    if "wandb" in (training_args.report_to or []):
        os.environ.setdefault("WANDB_MODE", "offline")  # nothing is sent unless WANDB_MODE=online
        os.environ.setdefault("WANDB_DIR", os.path.abspath(output_dir))
        os.makedirs(os.environ["WANDB_DIR"], exist_ok=True)
    say(f"[train] {n_params(model, trainable=True)} trainable parameters; {world} process(es); "
        f"{'cached' if cache else 'online'} features; output {output_dir}")

    trainer = TalkerTrainer(model=model, args=training_args, train_dataset=dataset,
                            data_collator=Collator(tokenizer.pad_token_id, model_args.patch_size),
                            processing_class=tokenizer, callbacks=[EpochCallback(dataset)], monitor=monitor,
                            lora=lora)
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - t0
    trainer.save_state()
    final = write_final(trainer, tokenizer, lora, say, command=lambda path: infer_command(path, talker))
    out = {"final": final, "global_step": trainer.state.global_step, "resumed_from": resume,
           "train_seconds": seconds, "train_loss": result.training_loss, "log_history": trainer.state.log_history}
    if talker.weights_digest:
        digest = trainable_digest(trainer.accelerator.unwrap_model(trainer.model))
        log(f"[train] rank {rank} weights digest {digest}")
        out["digest"] = digest
    return out


def first_missing_dir(path: str) -> Optional[str]:
    """The outermost folder of `path` that does not exist yet (what makedirs will create), or None."""
    path = os.path.abspath(path)
    missing = None
    while not os.path.exists(path):
        missing = path
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def discard_unused_output(output_dir: str, created: str) -> None:
    """After a failed run: remove output_dir (and the parents this run created) when it holds nothing but
    the config copy, i.e. nothing a user would want to look at."""
    path = os.path.abspath(output_dir)
    try:
        if not os.path.isdir(path) or set(os.listdir(path)) - {CONFIG_COPY}:
            return
        shutil.rmtree(path)
        created = os.path.abspath(created)
        while path != created and os.path.dirname(path) != path:
            path = os.path.dirname(path)
            os.rmdir(path)  # only when empty
    except OSError:
        pass


def check_cache_fits(cache: FeatureCache, model_args: ModelArguments) -> None:
    dim = cache.meta.get("speech_dim")
    if dim is not None and int(dim) != int(model_args.speech_embedding_dim):
        raise ConfigError(f"feature_cache: {cache.folder} holds {dim}-d latents, the model takes "
                          f"{model_args.speech_embedding_dim}")
    spk = cache.meta.get("speaker_dim")
    if spk is not None and int(spk) != int(model_args.speaker_embedding_dim):
        raise ConfigError(f"feature_cache: {cache.folder} holds {spk}-d speaker embeddings, the model takes "
                          f"{model_args.speaker_embedding_dim}")


def set_threads(raw: dict) -> None:
    """CPU threads when OMP_NUM_THREADS is not set: 1 for the tiny preset (too small for intra-op threads,
    which only add synchronisation), else the cores shared among this node's ranks."""
    if has_accelerator() or "OMP_NUM_THREADS" in os.environ:
        return
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    torch.set_num_threads(1 if raw.get("model_preset") == "tiny" else max(1, (os.cpu_count() or 1) // local))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        set_threads(load_config(argv[0], argv[1:]))
        run(argv[0], argv[1:])
    except ConfigError as e:  # the config cannot run: nothing was built or created
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except (DataError, NonFiniteLossError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
