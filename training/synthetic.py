#!/usr/bin/env python
"""A small synthetic training set in every layout the data loader reads, for the tiny preset and the tests.

    python training/synthetic.py outputs/tiny_data          # then: python training/train.py training/config_tiny.json

Writes short clips (tones with vibrato plus noise, at several sample rates, one stereo), smooth random
LIA-X motion around the release's mean (.pt and .npy), a few transcripts, and the manifests:
train.csv (T2SV rows, the reference's columns), tts.txt (TTS wav list with sidecar .json transcripts),
motion_list.txt + video/ (the reference's TXT layout) and train.jsonl (T2SV and TTS rows mixed).
Nothing here is speech: it exercises the data path and lets a tiny model overfit.
"""
import argparse
import csv
import json
import os
import sys

import numpy as np
import torch

if not __package__:  # launched by path (python training/x.py, torchrun): the repository root is importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from media.audio import save_wav  # noqa: E402
from common.motion_stats import MOTION_MEAN, MOTION_STD  # noqa: E402

TEXTS = ("Hello there.", "A short test.", "One two three.", "Good morning!", "How are you?", "Bye for now.")
RATES = (16000, 24000, 22050, 44100)


def tone(seconds: float, sample_rate: int, seed: int, stereo: bool = False) -> np.ndarray:
    """A vibrato tone with a few harmonics, an amplitude envelope and a little noise (float32, peak ~0.5)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    f0 = 110 + (40 * seed) % 90 + 8 * np.sin(2 * np.pi * (3 + seed % 3) * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    wav = sum(np.sin(k * phase) / k for k in (1, 2, 3))
    wav *= 0.5 * (0.6 + 0.4 * np.sin(2 * np.pi * 1.5 * t + seed)) / 1.8
    wav += 0.02 * rng.standard_normal(t.shape)
    wav = wav.astype(np.float32)
    return np.stack([wav, 0.8 * wav], axis=1) if stereo else wav


def smooth_motion(n_frames: int, seed: int) -> torch.Tensor:
    """(n_frames, 40) raw motion: the release mean + std * a smooth random walk (normalised values ~N(0, 1))."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.randn(n_frames + 8, 40, generator=g)
    kernel = torch.hann_window(9, periodic=False)
    smooth = torch.nn.functional.conv1d(steps.T[:, None], (kernel / kernel.sum())[None, None]).squeeze(1).T
    smooth = smooth[:n_frames] / smooth.std().clamp_min(1e-6)
    return torch.tensor(MOTION_MEAN) + torch.tensor(MOTION_STD) * smooth


def write_dataset(folder, n_t2sv: int = 4, n_tts: int = 2, seconds=(1.2, 1.6), seed: int = 0) -> dict:
    """Write the clips and manifests into `folder`; returns {"csv", "jsonl", "tts", "txt", "video_dir",
    "t2sv": [(wav, motion, text)], "tts_rows": [(wav, text)]} (absolute paths)."""
    folder = os.path.abspath(os.fspath(folder))
    os.makedirs(os.path.join(folder, "video"), exist_ok=True)
    t2sv, tts = [], []
    for i in range(n_t2sv):
        sec = seconds[i % len(seconds)]
        sr = RATES[i % len(RATES)]
        wav_path = os.path.join(folder, "video", f"clip{i}.wav")
        if i % 3 == 0:  # a stereo float file
            import soundfile as sf
            sf.write(wav_path, tone(sec, sr, seed + i, stereo=True), sr, subtype="FLOAT")
        else:
            save_wav(wav_path, tone(sec, sr, seed + i), sr=sr, subtype="PCM_16")
        motion = smooth_motion(int(round(sec * 25)), seed + 100 + i)
        if i % 2:
            motion_path = os.path.join(folder, f"clip{i}.npy")
            np.save(motion_path, motion.numpy().astype(np.float32))
        else:
            motion_path = os.path.join(folder, f"clip{i}.pt")
            torch.save(motion.half(), motion_path)  # the reference's files are float16
        t2sv.append((wav_path, motion_path, TEXTS[i % len(TEXTS)]))
    for i in range(n_tts):
        sr = RATES[(i + 1) % len(RATES)]
        wav_path = os.path.join(folder, f"tts{i}.wav")
        save_wav(wav_path, tone(seconds[i % len(seconds)], sr, seed + 50 + i), sr=sr, subtype="PCM_16")
        text = TEXTS[(i + 3) % len(TEXTS)]
        with open(os.path.splitext(wav_path)[0] + ".json", "w") as f:
            json.dump({"text": text}, f)
        tts.append((wav_path, text))
    paths = {"csv": os.path.join(folder, "train.csv"), "jsonl": os.path.join(folder, "train.jsonl"),
             "tts": os.path.join(folder, "tts.txt"), "txt": os.path.join(folder, "motion_list.txt"),
             "video_dir": os.path.join(folder, "video"), "t2sv": t2sv, "tts_rows": tts}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["motion_pt_path", "wav_path", "text", "duration"])
        for wav, motion, text in t2sv:
            w.writerow([motion, wav, text, f"{_seconds(wav):.2f}"])
    with open(paths["tts"], "w") as f:
        f.writelines(f"{wav}\n" for wav, _ in tts)
    with open(paths["txt"], "w") as f:
        f.writelines(f"{motion}\n" for _, motion, _ in t2sv)
    write_jsonl(paths["jsonl"], [{"wav": w, "motion": m, "text": t} for w, m, t in t2sv]
                + [{"wav": w, "text": t} for w, t in tts])
    return paths


def write_jsonl(path, rows) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _seconds(wav_path: str) -> float:
    import soundfile as sf
    info = sf.info(wav_path)
    return info.frames / info.samplerate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--t2sv", type=int, default=4, help="clips with motion (default 4)")
    ap.add_argument("--tts", type=int, default=2, help="speech-only clips (default 2)")
    ap.add_argument("--seconds", type=float, nargs="+", default=[1.2, 1.6], help="clip lengths, cycled")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    paths = write_dataset(args.folder, args.t2sv, args.tts, tuple(args.seconds), args.seed)
    print(f"wrote {args.t2sv} T2SV + {args.tts} TTS clips; manifests: {paths['jsonl']}, {paths['csv']}, "
          f"{paths['tts']}, {paths['txt']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
