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
strictly.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("WANDB_PROJECT", "talker-t2av")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

from speech_llm import ENCODER_PREFIXES, TIED_KEYS, WEIGHTS_NAME, ModelArguments  # noqa: E402
from training.dataset import (Collator, DataArguments, DataError, FailureMonitor, FeatureCache,  # noqa: E402
                              TalkerDataset, build_rows)
from training.modeling import (ConfigError, TalkerArguments, apply_lora, attach_encoders, build_model,  # noqa: E402
                               check_release_folder, lora_scale, merge_lora_state_dict, n_params,
                               trainable_digest, warm_start_from_tts, write_json)

PROG = "train.py"
STAGING = ".staging"  # checkpoints are written here and renamed into output_dir when complete
CONFIG_COPY = "talker_train_config.json"
LEGACY_ALIASES = {"warmup_ratio": "warmup_steps",  # transformers 5 takes a ratio in warmup_steps
                  "gradient_checkpointing": "activation_checkpointing",
                  "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs"}  # deprecated names


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """transformers.TrainingArguments with the reference's two changed defaults."""
    optim: str = field(default="adamw_torch_fused")
    ddp_find_unused_parameters: bool = field(default=False)


class NonFiniteLossError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------ config

def load_config(config, overrides=()) -> dict:
    """The config as a dict: a JSON file or a dict, then `key=value` overrides (values parsed as JSON when
    they parse, else strings)."""
    if isinstance(config, dict):
        raw = dict(config)
    else:
        try:
            with open(config) as f:
                raw = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{config}: not a readable JSON config ({e})") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: overrides are key=value")
        key, value = item.split("=", 1)
        try:
            raw[key] = json.loads(value)
        except ValueError:
            raw[key] = value
    for old, new in LEGACY_ALIASES.items():
        if old in raw:
            value = raw.pop(old)
            raw.setdefault(new, value)
    return raw


def has_accelerator() -> bool:
    accel = getattr(torch, "accelerator", None)
    return bool(accel.is_available()) if accel is not None else torch.cuda.is_available()


def parse_config(raw: dict):
    if not has_accelerator() and "use_cpu" not in raw:
        raw = dict(raw, use_cpu=True)  # transformers sets up CPU/gloo ranks (torchrun) only with use_cpu
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TalkerArguments, TrainingArguments))
    try:
        return parser.parse_dict(raw, allow_extra_keys=False)
    except ValueError as e:
        raise ConfigError(str(e)) from None


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

        from safe_load import key_report

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

def write_final(trainer: TalkerTrainer, tokenizer, lora: Optional[dict], log=print) -> str:
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
        log(f"[train] wrote {final} (release format{', LoRA merged' if lora else ''}; "
            f"python infer.py --checkpoint-dir {final})")
    trainer.accelerator.wait_for_everyone()
    return final


def run(config, overrides=(), log=print) -> dict:
    """Train as the config says; returns {"final", "global_step", "resumed_from", "train_seconds", ...}."""
    raw = load_config(config, overrides)
    model_args, data_args, talker, training_args = parse_config(raw)
    training_args.remove_unused_columns = False  # the batches carry the samples' paths for the error messages
    if not has_accelerator():
        training_args.dataloader_pin_memory = False
    if "wandb" in (training_args.report_to or []):
        os.environ.setdefault("WANDB_MODE", "offline")  # nothing is sent unless WANDB_MODE=online
        os.environ.setdefault("WANDB_DIR", os.path.abspath(training_args.output_dir))
        os.makedirs(os.environ["WANDB_DIR"], exist_ok=True)
    rank, world = training_args.process_index, training_args.world_size
    is_main = training_args.should_save
    say = log if training_args.process_index == 0 else (lambda *a, **k: None)
    transformers.set_seed(training_args.seed)

    resume = training_args.resume_from_checkpoint or latest_checkpoint(training_args.output_dir)
    if is_main:
        clean_leftovers(training_args.output_dir)
        os.makedirs(training_args.output_dir, exist_ok=True)
    if resume:
        say(f"[train] resuming from {resume}")

    model, tokenizer, model_args = build_model(model_args, talker, say)
    if model_args.tts_checkpoint_path and not talker.init_from:
        if resume:
            say("[warm start] skipped: the run resumes from a checkpoint")
        else:
            warm_start_from_tts(model, model_args.tts_checkpoint_path, say)
    cache = FeatureCache(data_args.feature_cache) if data_args.feature_cache else None
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

    rows = build_rows(data_args, model_args.tts_data_path, say)
    dataset = TalkerDataset(rows, tokenizer, model_args, cache, seed=training_args.data_seed or training_args.seed)
    log_path = os.path.join(training_args.output_dir, f"skipped_samples{'' if world == 1 else f'.rank{rank}'}.jsonl")
    monitor = FailureMonitor(rows, data_args.max_failed_fraction, world, log_path,
                             log=lambda m: log(m if world == 1 else f"[rank {rank}] {m}"))
    if is_main:
        write_json(os.path.join(training_args.output_dir, CONFIG_COPY), raw)
    say(f"[train] {n_params(model, trainable=True)} trainable parameters; {world} process(es); "
        f"{'cached' if cache else 'online'} features; output {training_args.output_dir}")

    trainer = TalkerTrainer(model=model, args=training_args, train_dataset=dataset,
                            data_collator=Collator(tokenizer.pad_token_id, model_args.patch_size),
                            processing_class=tokenizer, callbacks=[EpochCallback(dataset)], monitor=monitor,
                            lora=lora)
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - t0
    trainer.save_state()
    final = write_final(trainer, tokenizer, lora, say)
    out = {"final": final, "global_step": trainer.state.global_step, "resumed_from": resume,
           "train_seconds": seconds, "train_loss": result.training_loss, "log_history": trainer.state.log_history}
    if talker.weights_digest:
        digest = trainable_digest(trainer.accelerator.unwrap_model(trainer.model))
        log(f"[train] rank {rank} weights digest {digest}")
        out["digest"] = digest
    return out


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
    except (ConfigError, DataError, NonFiniteLossError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
