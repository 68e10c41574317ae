"""training/: a config is checked whole before anything is built or created (issue 26 items 16 and 20), a
transcript that is not UTF-8 is a skipped sample (item 12), a finished run says so and the printed infer
command is the one that works (issue 27 item 5). No test here builds a model."""
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from training import dataset as ds
from training import modeling, synthetic, train

TINY_CONFIG = REPO_ROOT / "training" / "config_tiny.json"


@pytest.fixture
def no_build(monkeypatch):
    """The model must not be built (a config check comes first)."""
    def built(*args, **kwargs):
        raise AssertionError("the model was built")
    monkeypatch.setattr(train, "build_model", built)


def write_config(tmp_path, name="run.json", **changes) -> Path:
    cfg = json.loads(TINY_CONFIG.read_text())
    cfg.update(output_dir=str(tmp_path / "out"), data_path=str(tmp_path / "data.jsonl"), report_to="none")
    cfg.update(changes)
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return path


def run_main(argv, capsys):
    rc = train.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_config_error(rc, err, config, key, problem):
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"train.py: error: {config}: {key}"), lines[0]
    assert problem in lines[0], lines[0]


# ------------------------------------------------------------------------------------------ types and ranges

BAD_VALUES = [  # (changes, the key named, a part of the problem)
    # the cases
    ({"max_steps": "30"}, "max_steps", 'expected an integer, got the string "30" (write 30, without quotes)'),
    ({"learning_rate": "fast"}, "learning_rate", 'expected a number, got the string "fast"'),
    ({"dit_n_layer": "2"}, "dit_n_layer", "expected an integer"),
    ({"lr_scheduler_kwargs": "min_lr_rate=0.01"}, "lr_scheduler_kwargs", "expected an object"),
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size", "must be at least 1, got 0"),
    ({"patch_size": 0}, "patch_size", "must be at least 1"),
    ({"max_failed_fraction": -1}, "max_failed_fraction", "must be in [0, 1], got -1"),
    # other keys, other wrong types, other ranges
    ({"max_failed_fraction": 1.5}, "max_failed_fraction", "must be in [0, 1]"),
    ({"gradient_accumulation_steps": 2.5}, "gradient_accumulation_steps", "expected an integer, got 2.5"),
    ({"patch_encoder_n_head": True}, "patch_encoder_n_head", "expected an integer, got true"),
    ({"speech_embedding_dim": [32]}, "speech_embedding_dim", "expected an integer, got a list"),
    ({"bf16": "false"}, "bf16", "expected true or false"),
    ({"weight_decay": None}, "weight_decay", "expected a number, got null"),
    ({"learning_rate": float("inf")}, "learning_rate", "expected a number, got inf"),
    ({"run_name": 5}, "run_name", "expected a string or null, got 5"),
    ({"data_path": {"a": 1}}, "data_path", "got an object"),
    ({"output_dir": 7}, "output_dir", "expected a string"),
    ({"output_dir": " "}, "output_dir", "must name a folder"),
    ({"lora_target_modules": "q_proj"}, "lora_target_modules", "expected a list of strings"),
    ({"lora_target_modules": []}, "lora_target_modules", "at least one module"),
    ({"lora_dropout": 1}, "lora_dropout", "must be in [0, 1)"),
    ({"delay": -1}, "delay", "must be at least 0"),
    ({"seed": -1}, "seed", "must be in [0, 4294967295]"),
    ({"num_train_epochs": 0}, "num_train_epochs", "must be greater than 0"),
    ({"max_steps": 0}, "max_steps", "or -1 to train num_train_epochs epochs"),
    ({"save_steps": -10}, "save_steps", "must be greater than 0"),
    ({"save_total_limit": 0}, "save_total_limit", "must be at least 1"),
    ({"dataloader_num_workers": -2}, "dataloader_num_workers", "must be at least 0"),
    ({"warmup_ratio": 1.5}, "warmup_ratio", "must be in [0, 1)"),  # an alias: named as written
    ({"gradient_checkpointing": "no"}, "gradient_checkpointing", "expected true or false or null"),
    # choices
    ({"lr_scheduler_type": "cosine_fast"}, "lr_scheduler_type", '"cosine_with_min_lr"'),
    ({"optim": "adam9"}, "optim", 'got the string "adam9"'),
    ({"model_preset": "huge"}, "model_preset", "expected one of released, tiny"),
    ({"report_to": ["none", "wandbx"]}, "report_to", 'unknown logger "wandbx"'),
    ({"max_step": 3}, "max_step", "unknown key (did you mean max_steps?)"),
    ({"learning_rat": 0.1}, "learning_rat", "did you mean learning_rate?"),
    ({"deepspeed": "no_such_ds.json"}, "deepspeed", "file not found"),
    # the schedule: built and stepped before the model
    ({"lr_scheduler_kwargs": {"min_lr_rate": "x"}}, "lr_scheduler_kwargs", "does not fit"),
    ({"lr_scheduler_kwargs": {"no_such_arg": 1}}, "lr_scheduler_kwargs", "no_such_arg"),
    ({"lr_scheduler_kwargs": {"min_lr_rate": 0.1, "min_lr": 1e-5}}, "lr_scheduler_kwargs", "Only one of min_lr"),
    ({"lr_scheduler_type": "polynomial", "lr_scheduler_kwargs": {"lr_end": 1.0}}, "lr_scheduler_kwargs",
     "does not fit lr_scheduler_type polynomial"),
    ({"lr_scheduler_kwargs": {}}, "lr_scheduler_kwargs", "does not fit lr_scheduler_type cosine_with_min_lr"),
]


@pytest.mark.parametrize("changes,key,problem", BAD_VALUES, ids=[f"{k}-{i}" for i, (_, k, _) in enumerate(BAD_VALUES)])
def test_a_bad_value_is_one_line_exit_2_before_anything_is_built_or_created(changes, key, problem, tmp_path,
                                                                            capsys, no_build):
    out_dir = tmp_path / "a" / "b" / "out"
    config = write_config(tmp_path, **dict({"output_dir": str(out_dir)}, **changes))
    rc, _, err = run_main([config], capsys)
    assert_one_line_config_error(rc, err, config, key, problem)
    assert not (tmp_path / "a").exists()


def test_command_line_overrides_and_whole_config_shapes(tmp_path, capsys, no_build):
    config = write_config(tmp_path)
    rc, _, err = run_main([config, "max_steps=abc"], capsys)
    assert_one_line_config_error(rc, err, config, "max_steps (command-line override)", 'got the string "abc"')
    rc, _, err = run_main([config, "--output-dir=x"], capsys)
    assert_one_line_config_error(rc, err, config, "--output-dir (command-line override)", "without dashes")
    rc, _, err = run_main([config, "output_dir"], capsys)
    assert_one_line_config_error(rc, err, config, "command-line override 'output_dir'", "key=value")
    # an override fixes a bad value of the file; and it is how a second run gets its own folder
    bad = write_config(tmp_path, "bad.json", max_steps="30")
    raw = train.load_config(str(bad), ["max_steps=30", "output_dir=./outputs/tiny_run_ddp"])
    assert raw["max_steps"] == 30 and raw["output_dir"] == "./outputs/tiny_run_ddp"
    for name, text, problem in (("list.json", "[1, 2]", "found a list"), ("num.json", "3", "found 3"),
                                ("str.json", '"a"', 'found the string "a"'),
                                ("broken.json", '{"max_steps": ', "not a readable JSON config"),
                                ("latin1.json", b'{"run_name": "caf\xe9"}', "not a readable JSON config")):
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        rc, _, err = run_main([path], capsys)
        assert_one_line_config_error(rc, err, path, "", problem)
    rc, _, err = run_main([tmp_path / "missing.json"], capsys)
    assert_one_line_config_error(rc, err, tmp_path / "missing.json", "", "not a readable JSON config")


def test_precompute_checks_the_same_config(tmp_path, capsys):
    from training import precompute

    config = write_config(tmp_path, feature_cache=str(tmp_path / "cache"))
    for argv, key, problem in (([config, "patch_size=0"], "patch_size (command-line override)", "at least 1"),
                               ([config, "dit_n_head=x"], "dit_n_head (command-line override)", "an integer")):
        rc = precompute.main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"precompute.py: error: {config}: {key}: ") and problem in err, err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cache").exists()


def test_the_shipped_configs_pass_the_check():
    for name in ("config.json", "config_tiny.json"):
        raw = train.load_config(str(REPO_ROOT / "training" / name), ["bf16=false"])
        train.parse_config(raw, name)
    from training.config_check import config_fields
    assert {"max_steps", "patch_size", "max_failed_fraction", "lora_r", "warmup_ratio"} <= set(config_fields())


# ------------------------------------------------------------------------------------------ output_dir

def test_output_dir_that_cannot_be_written_is_refused_up_front(tmp_path, capsys, no_build):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    cases = [(a_file, "is a file, not a folder"), (a_file / "sub" / "run", f"{a_file} is a file, not a folder")]
    for out, problem in cases:
        config = write_config(tmp_path, output_dir=str(out))
        rc, _, err = run_main([config], capsys)
        assert_one_line_config_error(rc, err, config, "output_dir", problem)
    assert a_file.read_text() == "x"


def main_as_nobody(argv):
    """train.main in a forked child running as the user nobody (root writes into read-only folders);
    returns (exit status, stderr)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery, just the check and its exit status
        rc = 99
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            sys.stderr = os.fdopen(write, "w")
            rc = train.main([str(a) for a in argv])
            sys.stderr.flush()
        finally:
            os._exit(rc)
    os.close(write)
    with os.fdopen(read) as f:
        err = f.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), err


@pytest.mark.parametrize("inside", [False, True])
def test_read_only_output_dir_is_refused_up_front(inside, no_build, capsys):
    """A read-only folder (a temporary directory's permissions), as output_dir or as its parent."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="talker-ro-"))  # 0755 path from /tmp: another user can reach it
    try:
        base.chmod(0o755)
        ro = base / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out = ro if inside else ro / "run"
        config = write_config(base, output_dir=str(out))
        config.chmod(0o644)
        if os.geteuid() == 0:
            rc, err = main_as_nobody([config])
        else:
            rc, _, err = run_main([config], capsys)
        problem = f"{out} is not writable" if inside else f"cannot create {out}: {ro} is not writable"
        assert_one_line_config_error(rc, err, config, "output_dir", problem)
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)
        shutil.rmtree(base)


def test_unwritable_system_folder_is_refused_even_for_root(tmp_path, capsys, no_build):
    if sys.platform != "linux" or not os.path.isdir("/sys/kernel"):
        pytest.skip("no sysfs")
    config = write_config(tmp_path, output_dir="/sys/kernel/talker_run")
    rc, _, err = run_main([config], capsys)
    assert_one_line_config_error(rc, err, config, "output_dir", "/sys/kernel is not writable")


def test_a_run_that_fails_leaves_no_empty_output_folder(tmp_path, capsys, monkeypatch):
    # the data cannot be read: exit 1 (not a config problem), and no folder
    out = tmp_path / "new" / "out"
    config = write_config(tmp_path, output_dir=str(out), data_path=str(tmp_path / "missing.jsonl"))
    monkeypatch.setattr(train, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    rc, _, err = run_main([config], capsys)
    assert rc == 1 and "missing.jsonl: JSONL manifest not found" in err and not (tmp_path / "new").exists()
    # a failure once the folder exists (here: the trainer) removes the folder and its new parents, unless a
    # user's folder was there before
    synthetic.write_jsonl(tmp_path / "data.jsonl", [{"wav": str(tmp_path / "x.wav"), "text": "hi"}])
    monkeypatch.undo()
    monkeypatch.setattr(train, "attach_encoders", lambda *a, **k: None)

    class Refused(RuntimeError):
        pass

    def trainer(*args, **kwargs):
        assert (out / train.CONFIG_COPY).is_file()
        raise Refused("no trainer")

    monkeypatch.setattr(train, "TalkerTrainer", trainer)
    with pytest.raises(Refused):
        train.run(str(write_config(tmp_path, output_dir=str(out))), log=lambda m: None)
    assert not (tmp_path / "new").exists()
    out.mkdir(parents=True)
    with pytest.raises(Refused):
        train.run(str(write_config(tmp_path, output_dir=str(out))), log=lambda m: None)
    assert out.is_dir()


# ------------------------------------------------------------------------------------------ finished runs

def fake_run(out: Path, step: int, epoch: float = 1.0, final: bool = True) -> Path:
    """An output folder as a finished run leaves it: checkpoint-<step> and final/ written after it."""
    ckpt = out / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": epoch, "max_steps": step}))
    (ckpt / "model.safetensors").write_bytes(b"")
    if final:
        (out / "final").mkdir()
        (out / "final" / "model.safetensors").write_bytes(b"")
        t = os.path.getmtime(ckpt / "trainer_state.json")
        os.utime(out / "final" / "model.safetensors", (t + 1, t + 1))
    return ckpt


def test_a_finished_run_says_so_in_one_line_and_trains_nothing(tmp_path, capsys, no_build):
    out = tmp_path / "out"
    fake_run(out, 30)
    config = write_config(tmp_path, output_dir=str(out), max_steps=30)
    rc, stdout, err = run_main([config], capsys)
    assert rc == 0 and err == ""
    (line,) = stdout.strip().splitlines()
    assert f"{out} already finished at step 30 (max_steps 30" in line
    assert "pass another output_dir" in line and "raise max_steps" in line
    result = train.run(str(config), log=lambda m: None)
    assert result["already_finished"] and result["global_step"] == 30 and result["final"] == str(out / "final")
    # by epochs: finished when the checkpoint's epoch reached num_train_epochs
    epochs = tmp_path / "epochs"
    fake_run(epochs, 12, epoch=2.0)
    log = []
    assert train.run(str(write_config(tmp_path, output_dir=str(epochs), max_steps=-1, num_train_epochs=2)),
                     log=log.append)["already_finished"]
    assert "already finished at step 12 (num_train_epochs 2;" in log[0] and "raise num_train_epochs" in log[0]


@pytest.mark.parametrize("case", ["more steps", "more epochs", "no final", "final older"])
def test_a_run_with_work_left_goes_on(case, tmp_path, monkeypatch):
    out = tmp_path / "out"
    ckpt = fake_run(out, 30, epoch=1.0, final=case != "no final")
    if case == "final older":
        t = os.path.getmtime(ckpt / "trainer_state.json")
        os.utime(out / "final" / "model.safetensors", (t - 10, t - 10))
    changes = {"more steps": dict(max_steps=60), "more epochs": dict(max_steps=-1, num_train_epochs=2)}.get(
        case, dict(max_steps=30))
    calls = []
    monkeypatch.setattr(train, "_train", lambda *args: calls.append(args) or {"trained": True})
    assert train.run(str(write_config(tmp_path, output_dir=str(out), **changes)), log=lambda m: None) == {
        "trained": True}
    resume, done_at = calls[0][5], calls[0][6]
    assert resume == str(ckpt) and done_at == (None if case.startswith("more") else 30)


def test_the_printed_infer_command_fits_the_preset():
    tiny = modeling.TalkerArguments(model_preset="tiny")
    assert train.infer_command("outputs/tiny run/final", tiny) == \
        "python infer.py --demo --checkpoint-dir 'outputs/tiny run/final'"
    released = modeling.TalkerArguments(wavlm_ckpt="/w/wavlm.pth", whisperx_vae_ckpt="/w/vae.ckpt")
    cmd = train.infer_command("out/final", released)
    assert "--demo" not in cmd and "--checkpoint-dir out/final" in cmd
    assert "--wavlm-ckpt /w/wavlm.pth" in cmd and "--whisperx-vae-ckpt /w/vae.ckpt" in cmd
    import infer
    for command in (cmd, train.infer_command("outputs/tiny run/final", tiny)):  # the flags are infer.py's
        parsed = infer.build_parser().parse_args(shlex.split(command)[2:])
        assert parsed.checkpoint_dir.endswith("final")
    assert parsed.demo and infer.build_parser().parse_args(shlex.split(cmd)[2:]).wavlm_ckpt == "/w/wavlm.pth"


# ------------------------------------------------------------------------------------------ transcripts

@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    return root, synthetic.write_dataset(root, n_t2sv=1, n_tts=1, seconds=(1.2,))


def test_text_that_is_not_utf8_is_a_skipped_sample(clips, tmp_path):
    """Undecodable bytes or a lone surrogate in a transcript (JSONL, CSV, a sidecar .json): that sample is
    skipped with its reason (counted against max_failed_fraction), the others load; a path with undecodable
    bytes still names its file."""
    from runtime.prompt import demo_tokenizer
    from speech_llm import tiny_model_args_and_config

    root, paths = clips
    wav, motion, _ = paths["t2sv"][0]
    tts_wav = paths["tts_rows"][0][0]
    odd_dir = os.fsdecode(bytes(tmp_path) + b"/caf\xe9")
    os.mkdir(odd_dir)
    odd_wav = os.path.join(odd_dir, "x.wav")
    os.symlink(wav, odd_wav)
    lone_wav, sidecar_wav = tmp_path / "lone.wav", tmp_path / "side.wav"
    os.symlink(wav, lone_wav)
    os.symlink(tts_wav, sidecar_wav)
    (tmp_path / "side.json").write_bytes(b'{"text": "bad \\udc41 escape"}')
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b"\n".join([
        json.dumps({"wav": wav, "motion": motion}).encode()[:-1] + b', "text": "ok \xff\xfe bytes"}',
        json.dumps({"wav": str(lone_wav), "motion": motion, "text": "lone \ud800 surrogate"}).encode(),
        json.dumps({"wav": str(sidecar_wav)}).encode(),
        json.dumps({"wav": "X", "motion": motion, "text": "a good one"}).encode().replace(
            b'"X"', b'"' + os.fsencode(odd_wav) + b'"'),
        json.dumps({"wav": tts_wav, "text": "also good"}).encode()]) + b"\n")
    rows = ds.build_rows(ds.DataArguments(data_path=str(manifest)), log=lambda m: None)
    assert len(rows) == 5 and rows[3].wav == odd_wav and rows[3].key  # the odd path hashes
    args, _ = tiny_model_args_and_config()
    dset = ds.TalkerDataset(rows, demo_tokenizer(args.model_max_length), args)
    item = dset[0]
    assert item["sample_path"] == tts_wav
    reasons = [reason for _, reason in item["skipped"]]
    assert reasons[:3] == [
        f"{manifest}:1: the text is not valid UTF-8 (byte 0xff at character 3)",
        f"{manifest}:2: the text holds a lone surrogate U+D800 at character 5 (not a character)",
        f"{manifest}:3: the text holds a lone surrogate U+DC41 at character 4 (not a character)"]
    # a wav path with undecodable bytes reaches its row (it hashes, it prints); the audio loader then
    # refuses it, which is one more skipped sample, not a crash
    assert item["skipped"][3][0] == rows[3].label and "not a readable audio file" in reasons[3]
    printed = []
    monitor = ds.FailureMonitor(rows, 0.8, log=lambda m: printed.append(m.encode("utf-8")),
                                log_path=str(tmp_path / "skipped.jsonl"))
    monitor.record(item["skipped"])
    assert len(printed) == 4 and b"caf\\udce9" in printed[3]
    assert len((tmp_path / "skipped.jsonl").read_text(encoding="utf-8").splitlines()) == 4
    with pytest.raises(ds.DataError, match="4 of 5 samples failed to load") as err:
        ds.FailureMonitor(rows, 0.5, log=lambda m: m.encode("utf-8")).record(item["skipped"])
    str(err.value).encode("utf-8")

    csv_path = tmp_path / "m.csv"
    csv_path.write_bytes(b"motion_pt_path,wav_path,text\n" + f"{motion},{wav},".encode() + b"caf\xe9\n"
                         + f"{motion},{wav},fine\n".encode())
    csv_rows = ds.build_rows(ds.DataArguments(data_path=str(csv_path)), log=lambda m: None)
    item = ds.TalkerDataset(csv_rows, demo_tokenizer(args.model_max_length), args)[0]
    assert item["skipped"] == [(csv_rows[0].label, f"{csv_path}:2: the text is not valid UTF-8 (byte 0xe9 at "
                                                   "character 3)")]
