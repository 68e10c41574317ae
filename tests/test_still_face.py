"""A face from a still image (PNG/JPEG) in the pipeline and on the command line: the image is a reference clip
as long as the voice with the face held still (one frame's motion repeated), so the prompt keeps the released
layout and the output's audio and video stay aligned."""
import subprocess

import pytest
import torch

import infer
from media import video_io
from common.constants import SAMPLES_PER_FRAME
from runtime.inputs import DEFAULT_REF_AUDIO, DEFAULT_REF_VIDEO, load_reference_audio

FRAME_S = 1 / 25

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def still_faces(tmp_path_factory):
    """The sample face's first frame as a PNG and as a JPEG (written by ffmpeg)."""
    folder = tmp_path_factory.mktemp("still")
    faces = {}
    for ext in ("png", "jpg"):
        faces[ext] = folder / f"face.{ext}"
        subprocess.run([video_io.ffmpeg_exe(), "-v", "error", "-i", str(DEFAULT_REF_VIDEO), "-frames:v", "1",
                        str(faces[ext])], check=True)
    return faces


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_still_image_is_the_face_held_still_for_the_voice(demo_pipe, still_faces, tmp_path, ext):
    face = str(still_faces[ext])
    r = demo_pipe.generate(mode="t2av", text="Hello there.", ref_video=face, progress=False)
    assert r.prefix_frames == 12  # gt_prefix_seconds 0.5 -> 12 frames, as with a video
    assert torch.equal(r.motion_raw[:12], r.motion_raw[:1].expand(12, -1))
    assert r.audio_24k.numel() == r.motion_raw.shape[0] * SAMPLES_PER_FRAME

    # the same run as the image's motion given as a reference clip of the voice's length
    voice_frames = demo_pipe.encode_audio(load_reference_audio(DEFAULT_REF_AUDIO)[0])[0].shape[0]
    frame_motion = demo_pipe.extract_motion(video_io.read_frames(face)[0], progress=False)
    torch.save(frame_motion.expand(voice_frames, -1).clone(), tmp_path / "held.pt")
    held = demo_pipe.generate(mode="t2av", text="Hello there.", ref_video=face, ref_motion=str(tmp_path / "held.pt"),
                              progress=False)
    assert r.plan == held.plan
    assert torch.equal(r.motion_raw, held.motion_raw) and torch.equal(r.audio_24k, held.audio_24k)


def test_command_line_takes_a_still_image_as_the_face(still_faces, tmp_path, capsys):
    rc = infer.main(["--demo", "--quiet", "--ref-video", str(still_faces["png"]), "--max-seconds", "1",
                     "--output", str(tmp_path / "o.mp4")])
    assert rc == 0, capsys.readouterr().err
    info = video_io.probe(tmp_path / "o.mp4")
    assert (info["video_codec"], info["audio_codec"], info["width"]) == ("h264", "aac", 128)
    assert info["n_frames"] == 12 + 7 * 4  # the prefix, then 1 s -> 7 patches of 4 frames (the cap)
    assert abs(info["audio_duration"] - info["video_duration"]) <= FRAME_S
