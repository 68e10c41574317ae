"""Nothing lost: no output (the output group, the stream file) overwrites an input, the batch file, or another
batch line's output; --stream PATH is where the result ends up. All refused before any model loads."""
import shutil
from pathlib import Path

import pytest

import infer
from runtime.pipeline import TalkerPipeline

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"


@pytest.fixture
def no_models(monkeypatch):
    monkeypatch.setattr(TalkerPipeline, "demo", classmethod(lambda cls, *a, **k: pytest.fail("models loaded")))


@pytest.fixture
def inputs(tmp_path):
    shutil.copy(SAMPLES / "reference_voice.wav", tmp_path / "voice.wav")
    shutil.copy(SAMPLES / "reference_face.mp4", tmp_path / "face.mp4")
    return tmp_path


def _digest(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("argv, needle", [
    (["--ref-audio", "{d}/voice.wav", "--output", "{d}/voice.mp4"], "voice.wav would overwrite the input"),
    (["--ref-audio", "{d}/voice.wav", "--output", "{d}/sub/../voice.wav", "--mode", "tts"], "would overwrite"),
    (["--ref-video", "{d}/face.mp4", "--output", "{d}/face.mp4"], "face.mp4 would overwrite the input"),
    (["--ref-video", "{d}/face.mp4", "--stream", "{d}/face.mp4"], "face.mp4 would overwrite the input"),
    (["--mode", "a2v", "--audio", "{d}/voice.wav", "--output", "{d}/./voice.mp4"], "would overwrite the input"),
    (["--ref-audio", "{d}/voice.wav", "--output", "{d}/voice", "--save-latents"], "would overwrite the input"),
])
def test_an_output_never_overwrites_an_input(inputs, no_models, capsys, argv, needle):
    before = _digest(inputs)
    (inputs / "sub").mkdir()
    rc = infer.main(["--demo", *[a.format(d=inputs) for a in argv]])
    assert rc == 1 and needle in capsys.readouterr().err
    assert _digest(inputs) == before


def test_an_input_linked_under_another_name_is_spared(inputs, no_models, capsys):
    (inputs / "link.wav").symlink_to(inputs / "voice.wav")
    rc = infer.main(["--demo", "--ref-audio", str(inputs / "link.wav"), "--output", str(inputs / "voice.mp4")])
    assert rc == 1 and "would overwrite the input" in capsys.readouterr().err


def test_every_member_of_the_output_group_is_checked(inputs, no_models, capsys):
    (inputs / "o.wav").mkdir()  # the wav written beside o.mp4
    rc = infer.main(["--demo", "--output", str(inputs / "o.mp4")])
    assert rc == 1 and "o.wav (written with it) is a directory" in capsys.readouterr().err


def test_stream_path_is_the_output(tmp_path, no_models, capsys):
    rc = infer.main(["--demo", "--output", str(tmp_path / "a.mp4"), "--stream", str(tmp_path / "b.mp4")])
    assert rc == 1 and "name two files" in capsys.readouterr().err
    args = infer.build_parser().parse_args(["--stream", str(tmp_path / "s.mp4")])
    infer.check_stream_flags(args)
    assert (args.output, args.stream) == (str(tmp_path / "s.mp4"), "")
    assert infer.stream_path(args, infer.cli_request(args)) == str(tmp_path / "s.partial.mp4")


def test_stream_to_stdout_refuses_a_batch_file(tmp_path, no_models, capsys):
    batch = tmp_path / "b.jsonl"
    batch.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert infer.main(["--demo", "--batch-file", str(batch), "--stream", "-"]) == 1
    assert "cannot carry the lines" in capsys.readouterr().err
    assert infer.main(["--demo", "--batch-file", str(batch), "--stream", str(tmp_path / "x.mp4")]) == 1
    assert "give --stream without a path" in capsys.readouterr().err


@pytest.mark.parametrize("lines, bad_line, needle", [
    (['{"text": "a", "output": "{d}/x.mp4"}', '{"text": "b", "output": "{d}/x.mp4"}'], 2, "also written by"),
    (['{"text": "a", "output": "{d}/x.mp4"}', '{"text": "b", "output": "{d}/sub/../x.mp4"}'], 2, "also written by"),
    (['{"text": "a", "output": "{d}/x.mp4"}', '{"text": "b", "mode": "tts", "output": "{d}/x.wav"}'], 2,
     "also written by"),
    (['{"text": "a", "output": "{d}/b.mp4"}'], 1, "the batch file"),  # its wav is the batch file b.wav
    (['{"text": "a", "ref_audio": "{d}/voice.wav", "output": "{d}/voice.mp4"}'], 1, "would overwrite the input"),
])
def test_batch_lines_never_overwrite_each_other_or_inputs(inputs, monkeypatch, capsys, lines, bad_line, needle):
    batch = inputs / "b.wav"  # a batch file may have any name
    batch.write_text("\n".join(line.replace("{d}", str(inputs)) for line in lines) + "\n")
    (inputs / "sub").mkdir()
    args = infer.build_parser().parse_args(["--demo", "--batch-file", str(batch), "--output", str(inputs / "o.mp4")])
    todo = infer.jobs(args)
    assert [job.request is None for job in todo] == [i + 1 == bad_line for i in range(len(lines))]
    assert needle in todo[bad_line - 1].error


def test_collisions_are_found_across_ranks(inputs, monkeypatch):
    batch = inputs / "b.jsonl"
    batch.write_text(f'{{"text": "a", "output": "{inputs}/x.mp4"}}\n{{"text": "b", "output": "{inputs}/x.mp4"}}\n')
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    args = infer.build_parser().parse_args(["--demo", "--batch-file", str(batch)])
    (job,) = infer.jobs(args)  # rank 1 holds line 2, which collides with rank 0's line 1
    assert job.request is None and "also written by" in job.error


def test_a_stream_file_that_is_a_directory_is_refused_up_front(tmp_path, no_models, capsys):
    (tmp_path / "o.partial.mp4").mkdir()
    assert infer.main(["--demo", "--output", str(tmp_path / "o.mp4"), "--stream"]) == 1
    assert "o.partial.mp4 (the growing stream file) is a directory" in capsys.readouterr().err
