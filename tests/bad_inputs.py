"""Bad requests shared by the library tests (test_pipeline.py) and the CLI tests (test_infer.py).

Each case is (name, request fields, needle): the needle is a file name the message must contain, or
"field:NAME", meaning the library's message starts with "NAME:" and the CLI's names the flag "--NAME"."""
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from common.constants import MAX_FRAMES


def silent_wav(path, seconds=1.0):
    sf.write(path, np.zeros(int(16000 * seconds), np.float32), 16000)


def tone(path, seconds, sr=16000):
    t = np.arange(int(sr * seconds)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), sr)


def bad_cases(tmp: Path):
    (tmp / "notes.txt").write_text("this is not audio")
    silent_wav(tmp / "silent.wav")
    tone(tmp / "long.wav", 31)
    tone(tmp / "short.wav", 0.05)
    (tmp / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 64)
    torch.save(torch.zeros(10, 39), tmp / "shape.pt")
    nan = torch.zeros(10, 40)
    nan[3, 5] = float("nan")
    torch.save(nan, tmp / "nan.pt")
    torch.save({"motion": torch.zeros(4, 40)}, tmp / "dict.pt")
    torch.save(torch.zeros(MAX_FRAMES + 1, 40), tmp / "long_motion.pt")
    return [
        ("missing ref audio", dict(ref_audio=tmp / "nope.wav"), "nope.wav"),
        ("not audio", dict(ref_audio=tmp / "notes.txt"), "notes.txt"),
        ("silent", dict(ref_audio=tmp / "silent.wav"), "silent.wav"),
        ("a2v audio over 30 s", dict(mode="a2v", audio=tmp / "long.wav", long_form=False), "long.wav"),
        ("a2v audio silent", dict(mode="a2v", audio=tmp / "silent.wav"), "silent.wav"),
        ("too short", dict(mode="a2v", audio=tmp / "short.wav"), "short.wav"),
        ("empty text", dict(text="   "), "field:text"),
        ("text too long", dict(text="word " * 400, long_form=False), "field:text"),
        ("video without frames", dict(ref_video=tmp / "silent.wav"), "silent.wav"),
        ("broken video", dict(mode="v2a", video=tmp / "broken.mp4"), "broken.mp4"),
        ("missing video", dict(mode="v2a", video=tmp / "gone.mp4"), "gone.mp4"),
        ("motion wrong shape", dict(ref_motion=tmp / "shape.pt"), "shape.pt"),
        ("motion with NaN", dict(ref_motion=tmp / "nan.pt"), "nan.pt"),
        ("motion not a tensor", dict(mode="v2a", motion=tmp / "dict.pt"), "dict.pt"),
        ("motion not a torch file", dict(ref_motion=tmp / "notes.txt"), "notes.txt"),
        ("motion over 30 s", dict(mode="v2a", motion=tmp / "long_motion.pt", long_form=False), "long_motion.pt"),
        ("fps", dict(fps=30), "field:fps"),
        ("mode", dict(mode="t2v"), "field:mode"),
        ("output", dict(output=tmp / "out.avi"), "out.avi"),
        ("cfm steps", dict(cfm_steps=0), "field:cfm_steps"),
        ("nan temperature", dict(cfm_temperature=float("nan")), "field:cfm_temperature"),
        ("inf guidance", dict(cfm_cfg=float("inf")), "field:cfm_cfg"),
        ("huge seed", dict(seed=10 ** 20), "field:seed"),
        ("too many steps", dict(cfm_steps=100000), "field:cfm_steps"),
        ("control tokens in text", dict(text="Hello <SPEECH_FRAME> there"), "field:text"),
    ]


def library_needle(needle: str) -> str:
    return needle[len("field:"):] + ":" if needle.startswith("field:") else needle


def cli_needle(needle: str) -> str:
    return "--" + needle[len("field:"):].replace("_", "-") + ":" if needle.startswith("field:") else needle
