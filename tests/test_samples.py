"""The bundled samples exist and keep the formats samples/README.md promises."""
import hashlib
import json
from pathlib import Path

import numpy as np
import soundfile as sf

from media import video_io

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def test_reference_voice_format():
    path = SAMPLES / "reference_voice.wav"
    info = sf.info(str(path))
    assert (info.format, info.subtype) == ("WAV", "PCM_16")
    assert info.samplerate == 24000 and info.channels == 1
    assert 4.0 <= info.duration <= 5.5
    wav, _ = sf.read(str(path), dtype="float32")
    assert 0.05 < np.sqrt(np.mean(wav ** 2)) and np.abs(wav).max() < 1.0  # speech, not clipped


def test_reference_face_format():
    path = SAMPLES / "reference_face.mp4"
    assert path.stat().st_size < 500_000
    info = video_io.probe(path)
    assert (info["video_codec"], info["pix_fmt"]) == ("h264", "yuv420p")
    assert (info["width"], info["height"], info["fps"]) == (512, 512, 25.0)
    assert 2.0 <= info["video_duration"] <= 5.0
    assert info["n_frames"] == round(info["video_duration"] * 25)
    assert info["audio_codec"] is None and info["faststart"] is True
    frames, fps = video_io.read_frames(path, max_frames=50)
    assert frames.shape == (50, 512, 512, 3) and fps == 25.0
    motion = np.abs(frames[0].astype(int) - frames[49].astype(int)).mean()
    assert motion > 2.0  # the clip moves, so motion extraction has something to see


def test_texts_and_batch_file():
    text = (SAMPLES / "default_text.txt").read_text(encoding="utf-8").strip()
    assert text and "\n" not in text
    assert text in (SAMPLES / "README.md").read_text(encoding="utf-8")
    lines = (SAMPLES / "prompts.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    for line in lines:
        request = json.loads(line)
        assert isinstance(request["text"], str) and request["text"].strip()
        assert request["output"].endswith(".mp4")


def test_readme_records_provenance_of_current_files():
    readme = (SAMPLES / "README.md").read_text(encoding="utf-8")
    for name in ("reference_voice.wav", "reference_face.mp4"):
        digest = hashlib.md5((SAMPLES / name).read_bytes()).hexdigest()
        assert digest in readme, f"samples/README.md does not list the md5 of {name}"
    assert "public domain" in readme and "espeak-ng" in readme
