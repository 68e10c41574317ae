"""Every fault is one line: bad text, bad batch lines, bad environment and devices, library misuse. All
found before any model loads (the CLI) or before any work starts (the library)."""
import pytest

import infer
from runtime.pipeline import TalkerPipeline
from runtime.request import GenerationRequest, RequestError, has_visible_text


@pytest.fixture
def no_models(monkeypatch):
    monkeypatch.setattr(TalkerPipeline, "demo", classmethod(lambda cls, *a, **k: pytest.fail("models loaded")))


def _one_line_error(capsys, needle):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err and needle in lines[0], err
    return lines[0]


@pytest.mark.parametrize("text", ["\u200b", "\u200c\u200d", "\ufeff", " \u200b\t\u2060 ", "\u3000", "\x00",
                                  "\u3164\u115f", "\u2800", "\u0301\u0308"])
def test_text_of_invisible_characters_is_empty(tmp_path, no_models, capsys, text):
    assert not has_visible_text(text)
    assert infer.main(["--demo", "--text", text, "--output", str(tmp_path / "o.mp4")]) == 1
    _one_line_error(capsys, "empty text")


@pytest.mark.parametrize("text", ["a\udcff", "\ud800", "hi \udce9t\udce9"])
def test_text_that_is_not_utf8_is_named(tmp_path, no_models, capsys, text):
    assert infer.main(["--demo", "--text", text, "--output", str(tmp_path / "o.mp4")]) == 1
    _one_line_error(capsys, "--text: not valid UTF-8")


def test_visible_text_passes():
    assert has_visible_text("\u200bhello") and has_visible_text("你好") and has_visible_text("ไทย")
    assert has_visible_text("42") and has_visible_text("?") and has_visible_text("\u263a")


def test_bad_batch_lines_fail_alone(tmp_path, no_models):
    batch = tmp_path / "b.jsonl"
    lines = [b'{"text": "bad \xff\xfe bytes"}', b'{"text": "\\ud800 surrogate"}', b"[" * 100000 + b"]" * 100000,
             b'{"text": "\\u200b"}', b'{"text": "fine", "output": "' + str(tmp_path / "ok.mp4").encode() + b'"}']
    batch.write_bytes(b"\n".join(lines) + b"\n")
    args = infer.build_parser().parse_args(["--demo", "--batch-file", str(batch), "--output", str(tmp_path / "o.mp4")])
    todo = infer.jobs(args)
    assert [job.request is not None for job in todo] == [False, False, False, False, True]
    errors = [job.error for job in todo[:4]]
    for error, needle in zip(errors, ("not valid UTF-8", "not valid UTF-8", "nested too deeply", "empty text")):
        assert needle in error


@pytest.mark.parametrize("env, needle", [
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be >= 1"),
    ({"RANK": "abc"}, "RANK='abc' is not a whole number"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is not below WORLD_SIZE=2"),
    ({"LOCAL_WORLD_SIZE": "-1"}, "LOCAL_WORLD_SIZE=-1"),
])
def test_bad_torchrun_environment_is_named(tmp_path, no_models, capsys, monkeypatch, env, needle):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert infer.main(["--demo", "--output", str(tmp_path / "o.mp4")]) == 1
    _one_line_error(capsys, needle)


@pytest.mark.parametrize("device, needle", [("foo", "not a device"), ("meta", "not meta"),
                                             ("cuda:7", "--device cuda:7"), ("mps", "not mps")])
def test_bad_device_is_one_line(tmp_path, no_models, capsys, device, needle):
    assert infer.main(["--demo", "--device", device, "--output", str(tmp_path / "o.mp4")]) == 1
    _one_line_error(capsys, needle)


def test_library_takes_text_or_a_mapping_and_names_bad_arguments(demo_pipe):
    from runtime.inputs import resolve_request

    assert resolve_request("Hello.").text == "Hello."
    assert resolve_request({"text": "Hi.", "mode": "tts"}).mode == "tts"
    with pytest.raises(TypeError, match="request must be a GenerationRequest"):
        demo_pipe.generate(42)
    with pytest.raises(RequestError, match="unknown"):
        demo_pipe.generate({"txt": "typo"})
    for bad in (0, -1, 2.5, "2", True):
        with pytest.raises(ValueError, match="batch_size must be a whole number"):
            demo_pipe.generate_batch([GenerationRequest(text="a")], batch_size=bad)
        with pytest.raises(ValueError, match="every must be a whole number"):
            demo_pipe.stream(text="a", every=bad)


def test_long_reference_audio_is_read_only_as_far_as_it_is_used(tmp_path, monkeypatch):
    from media import audio
    from runtime import inputs
    from bad_inputs import tone

    tone(tmp_path / "long.wav", 95)
    reads = []
    real = audio.load_audio
    monkeypatch.setattr(audio, "load_audio", lambda path, max_seconds=None: reads.append(max_seconds) or
                        real(path, max_seconds))
    ref, warnings = inputs.load_reference_audio(tmp_path / "long.wav")
    assert reads == [31] and "95.0 s long" in warnings[0]


def test_cli_warnings_name_flags_not_request_fields():
    text = ("generation hit the length cap (7 patches = 1.1 s) before the model chose to stop: use a longer "
            "reference clip or max_seconds; face.mp4 is 640x480: squashed (face_crop=center crops instead)")
    said = infer.in_flag_words(text)
    assert "--max-seconds;" in said and "(--face-crop center crops" in said
    assert "max_seconds" not in said and "face_crop" not in said
    assert infer.in_flag_words("the --max-seconds flag") == "the --max-seconds flag"  # flags stay as they are


@pytest.mark.parametrize("size", [(1, 1), (31, 200), (200, 8)])
def test_a_picture_too_small_for_a_face_is_refused(tmp_path, no_models, capsys, size):
    from PIL import Image

    face = tmp_path / "face.png"
    Image.new("RGB", size, (200, 150, 120)).save(face)
    assert infer.main(["--demo", "--ref-video", str(face), "--output", str(tmp_path / "o.mp4")]) == 1
    _one_line_error(capsys, f"{size[0]}x{size[1]}: too small to hold a face")
