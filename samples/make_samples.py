"""Regenerate the bundled samples (see samples/README.md for provenance and licences).

    python samples/make_samples.py --portrait /path/to/skimage/data/astronaut.png

Needs: espeak-ng on PATH, and the repository's own dependencies (numpy, torch, soundfile,
imageio-ffmpeg). Writes reference_voice.wav and reference_face.mp4 next to this script.
"""
import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from media import video_io  # noqa: E402

VOICE_TEXT = "Hello, this is a short sample of my voice, made for the talking head demo."
ESPEAK_VOICE, ESPEAK_WPM = "en-us+f3", 160
SAMPLE_RATE = 24000

SIZE, FPS, SECONDS = 512, 25, 4
# square crop of the 512x512 portrait around the face (pixels): centre and side length
CENTRE_X, CENTRE_Y, SIDE = 225.0, 150.0, 300.0


def make_voice(out_path: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "espeak.wav"
        subprocess.run(["espeak-ng", "-v", ESPEAK_VOICE, "-s", str(ESPEAK_WPM), "-w", str(raw),
                        VOICE_TEXT], check=True)
        # espeak writes 22050 Hz; resample with soxr to 24 kHz float, then normalise here
        pcm = subprocess.run(
            [video_io.ffmpeg_exe(), "-v", "error", "-i", str(raw),
             "-af", f"aresample={SAMPLE_RATE}:resampler=soxr", "-ac", "1",
             "-f", "f32le", "pipe:1"], check=True, capture_output=True).stdout
    wav = np.frombuffer(pcm, np.float32)
    wav = wav / np.abs(wav).max() * 10 ** (-1 / 20)  # peak at -1 dBFS
    sf.write(out_path, wav, SAMPLE_RATE, subtype="PCM_16")


def face_frames(portrait_u8: np.ndarray):
    """Gentle zoom, pan and tilt over the face crop, sampled bicubically at 512x512."""
    h, w, _ = portrait_u8.shape
    image = torch.from_numpy(portrait_u8).permute(2, 0, 1)[None].float()
    n = FPS * SECONDS
    lin = (torch.arange(SIZE, dtype=torch.float64) + 0.5) / SIZE - 0.5  # (-0.5, 0.5) pixel centres
    gy, gx = torch.meshgrid(lin, lin, indexing="ij")
    for t in range(n):
        phase = 2 * math.pi * t / n
        ease = 0.5 - 0.5 * math.cos(phase)  # 0 -> 1 -> 0 over the clip: loops seamlessly
        side = SIDE - 16 * ease
        cx = CENTRE_X + 5 * math.sin(phase)
        cy = CENTRE_Y + 5 * ease
        angle = math.radians(1.0) * math.sin(phase)
        x = cx + side * (gx * math.cos(angle) - gy * math.sin(angle))
        y = cy + side * (gx * math.sin(angle) + gy * math.cos(angle))
        # grid_sample's normalised coordinates (align_corners=False)
        grid = torch.stack([x / w * 2 - 1, y / h * 2 - 1], dim=-1)[None].float()
        frame = F.grid_sample(image, grid, mode="bicubic", padding_mode="reflection",
                              align_corners=False)
        yield frame[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--portrait", required=True,
                    help="scikit-image's skimage/data/astronaut.png (512x512 RGB)")
    ap.add_argument("--out", default=str(HERE))
    args = ap.parse_args()
    out = Path(args.out)
    make_voice(out / "reference_voice.wav")
    portrait = video_io.read_first_frame(args.portrait)  # ffmpeg decodes the PNG too
    if portrait.shape != (512, 512, 3):
        raise SystemExit(f"{args.portrait}: expected a 512x512 RGB image, got {portrait.shape}")
    video_io.write_video(out / "reference_face.mp4", face_frames(portrait), fps=FPS)
    for name in ("reference_voice.wav", "reference_face.mp4"):
        print(name, (out / name).stat().st_size, "bytes")


if __name__ == "__main__":
    main()
