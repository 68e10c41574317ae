"""SyncNet lip-sync scores: Sync-C (confidence) and Sync-D (minimum distance).

Reproduces joonson/syncnet_python at 6efbb1c305c23f47a62b09cf4215a8ac45e97d49: SyncNetModel.py (class S with
num_layers_in_fc_layers=1024) and SyncNetInstance.evaluate, the numbers talking-head papers report:

    video file -> ffmpeg JPEG frames (read as BGR uint8) + ffmpeg 16 kHz mono s16 audio
    audio int16 (unscaled) -> python_speech_features.mfcc defaults -> (13, n), 100 frames/s
    window i = frames i..i+4 (3, 5, 224, 224) and MFCC columns 4i..4i+19 (1, 13, 20), i < min_length - 5
    forward_lip / forward_aud in batches -> (N, 1024) each (not normalised)
    dists[i, k] = |lip[i] - aud[i + k - vshift] + 1e-6|, audio zero-padded by vshift rows each side
    mdist = mean over windows (padded entries included); Sync-D = min(mdist), Sync-C = median(mdist) - Sync-D,
    offset = vshift - argmin(mdist)  (= minus the audio lag in frames)

State-dict names and shapes are those of the released syncnet_v2.model, so `load_syncnet(path)` loads it
strictly.

ffmpeg versions: the reference calls the system ffmpeg, whose MJPEG encoder needs full-range YUV, so a
limited-range yuv420p video is range-converted by swscale before JPEG encoding. The fixture's ffmpeg (Debian
5.1) does that with swscale's older fixed-point formulas; the imageio-ffmpeg binary (9.0) rounds differently,
and after JPEG quantisation its frames differ from the reference's by up to 28 grey levels (mean 0.8; on the
fixture clip Sync-D moves by 0.21 and Sync-C by 0.003). `evaluate_file(..., legacy_range=True)`, the default,
does the 5.1 conversion itself with a lutyuv filter, which reproduces the reference's frames bit for bit
(other input formats run the reference's command unchanged).
"""
from __future__ import annotations

import glob
import math
import os
import re
import subprocess
import tempfile
import warnings
from dataclasses import dataclass

import imageio_ffmpeg
import numpy as np
import scipy.fft
import scipy.io.wavfile
import scipy.signal
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from common.safe_load import key_report, safe_torch_load

# The reference's face detector lives beside SyncNet in its repository (detectors/s3fd): named here too.
from evaluation.s3fd import S3FD, detect_faces, load_s3fd  # noqa: E402, F401

FPS = 25
SAMPLE_RATE = 16000
FRAME_SIZE = 224
WINDOW_FRAMES = 5  # video frames per window
MFCC_PER_FRAME = 4  # 100 MFCC frames/s over 25 video frames/s
MFCC_WINDOW = 20  # MFCC columns per window (0.2 s)
EMBED_DIM = 1024
TRUNK_DIM = 512
PAIRWISE_EPS = 1e-6  # torch.nn.functional.pairwise_distance's default
MEDFILT_KERNEL = 9

# python_speech_features.mfcc defaults (v0.6)
WIN_SAMPLES = 400  # 25 ms
HOP_SAMPLES = 160  # 10 ms
NFFT = 512
N_FILTERS = 26
N_CEPS = 13
PREEMPHASIS = 0.97
CEP_LIFTER = 22

# swscale's limited -> full range conversion before ffmpeg <= 5.x, on 15-bit intermediates (value << 7):
# luma (min(v, 30189) * 19077 - 39057361) >> 14, chroma (min(v, 30775) * 4663 - 9289992) >> 12, then
# (v + 64) >> 7 back to 8 bits. Written as lutyuv expressions (floor = arithmetic shift; exact in doubles).
_LUMA_TO_FULL = "clip(floor((floor((min(128*val\\,30189)*19077-39057361)/16384)+64)/128)\\,0\\,255)"
_CHROMA_TO_FULL = "clip(floor((floor((min(128*val\\,30775)*4663-9289992)/4096)+64)/128)\\,0\\,255)"
_LEGACY_RANGE_FILTER = f"lutyuv=y={_LUMA_TO_FULL}:u={_CHROMA_TO_FULL}:v={_CHROMA_TO_FULL},setparams=range=pc"


# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------

def _bn_relu(bn: nn.Module) -> list:
    return [bn, nn.ReLU(inplace=True)]


def _fc_head() -> nn.Sequential:
    return nn.Sequential(nn.Linear(TRUNK_DIM, TRUNK_DIM), nn.BatchNorm1d(TRUNK_DIM), nn.ReLU(inplace=True),
                         nn.Linear(TRUNK_DIM, EMBED_DIM))


class SyncNet(nn.Module):
    """The SyncNet of syncnet_v2.model: a 2-D CNN over (1, 13, 20) MFCC windows and a 3-D CNN over
    (3, 5, 224, 224) BGR pixel windows (raw 0..255 levels), each with a 512 -> 512 -> 1024 head."""

    def __init__(self):
        super().__init__()
        conv2, conv3, pool2, pool3 = nn.Conv2d, nn.Conv3d, nn.MaxPool2d, nn.MaxPool3d
        self.netcnnaud = nn.Sequential(
            conv2(1, 64, 3, padding=1), *_bn_relu(nn.BatchNorm2d(64)), pool2(1, stride=1),  # 13x20
            conv2(64, 192, 3, padding=1), *_bn_relu(nn.BatchNorm2d(192)), pool2(3, stride=(1, 2)),  # 11x9
            conv2(192, 384, 3, padding=1), *_bn_relu(nn.BatchNorm2d(384)),
            conv2(384, 256, 3, padding=1), *_bn_relu(nn.BatchNorm2d(256)),
            conv2(256, 256, 3, padding=1), *_bn_relu(nn.BatchNorm2d(256)),
            pool2(3, stride=2),  # 5x4
            conv2(256, TRUNK_DIM, (5, 4)), *_bn_relu(nn.BatchNorm2d(TRUNK_DIM)),  # 1x1
        )
        self.netfcaud = _fc_head()
        self.netfclip = _fc_head()
        self.netcnnlip = nn.Sequential(
            conv3(3, 96, (5, 7, 7), stride=(1, 2, 2)), *_bn_relu(nn.BatchNorm3d(96)),  # 1x109x109
            pool3((1, 3, 3), stride=(1, 2, 2)),  # 54x54
            conv3(96, 256, (1, 5, 5), stride=(1, 2, 2), padding=(0, 1, 1)), *_bn_relu(nn.BatchNorm3d(256)),  # 26
            pool3((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),  # 13x13
            conv3(256, 256, (1, 3, 3), padding=(0, 1, 1)), *_bn_relu(nn.BatchNorm3d(256)),
            conv3(256, 256, (1, 3, 3), padding=(0, 1, 1)), *_bn_relu(nn.BatchNorm3d(256)),
            conv3(256, 256, (1, 3, 3), padding=(0, 1, 1)), *_bn_relu(nn.BatchNorm3d(256)),
            pool3((1, 3, 3), stride=(1, 2, 2)),  # 6x6
            conv3(256, TRUNK_DIM, (1, 6, 6)), *_bn_relu(nn.BatchNorm3d(TRUNK_DIM)),  # 1x1x1
        )

    def forward_aud(self, mfcc_b11320: torch.Tensor) -> torch.Tensor:
        """(B, 1, 13, 20) MFCC windows -> (B, 1024) audio embeddings."""
        trunk_b512 = self.netcnnaud(mfcc_b11320).flatten(1)
        return self.netfcaud(trunk_b512)

    def forward_lipfeat(self, video_b3t224224: torch.Tensor) -> torch.Tensor:
        """(B, 3, 5, 224, 224) BGR pixel windows -> (B, 512) lip-trunk features (no fc head)."""
        return self.netcnnlip(video_b3t224224).flatten(1)

    def forward_lip(self, video_b3t224224: torch.Tensor) -> torch.Tensor:
        """(B, 3, 5, 224, 224) BGR pixel windows -> (B, 1024) lip embeddings."""
        return self.netfclip(self.forward_lipfeat(video_b3t224224))


def load_syncnet(path, device="cpu") -> SyncNet:
    """SyncNet in eval mode with the weights of syncnet_v2.model: a state dict read with
    torch.load(weights_only=True) and loaded strictly. Keys may carry the `__S__.` prefix of the
    SyncNetInstance wrapper; BatchNorm `num_batches_tracked` counters the file may lack are filled with 0
    (they do not affect eval). Raises FileNotFoundError, or a one-line ValueError naming the file."""
    path = os.fspath(path)
    state = safe_torch_load(path, "SyncNet checkpoint")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: not a SyncNet state dict (expected a flat dict of tensors, "
                         f"got {type(state).__name__})")
    state = {k.removeprefix("__S__."): v for k, v in state.items()}
    model = SyncNet()
    expected = model.state_dict()
    for key, value in expected.items():
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, torch.zeros_like(value))
    report = key_report({k: v.shape for k, v in expected.items()}, {k: v.shape for k, v in state.items()})
    if not report.ok():
        raise ValueError(f"{path}: {report.message('SyncNet')}")
    model.load_state_dict(state, strict=True)
    return model.requires_grad_(False).eval().to(device)


# ---------------------------------------------------------------------------------------------
# MFCC (python_speech_features 0.6 `mfcc(signal, 16000)`, float64 numpy, same operation order)
# ---------------------------------------------------------------------------------------------

def _mel_filterbank(sample_rate: int) -> np.ndarray:
    """(26, 257) triangular filters, 0 Hz .. sample_rate/2, edges on FFT bins floor(513 f / sr)."""
    high_mel = 2595 * np.log10(1 + (sample_rate / 2) / 700.0)
    mel_points = np.linspace(0.0, high_mel, N_FILTERS + 2)
    hz_points = 700 * (10 ** (mel_points / 2595.0) - 1)
    bins = np.floor((NFFT + 1) * hz_points / sample_rate)
    lower, centre, upper = bins[:-2, None], bins[1:-1, None], bins[2:, None]
    k = np.arange(NFFT // 2 + 1, dtype=np.float64)[None]
    with np.errstate(divide="ignore", invalid="ignore"):
        rising = np.where((k >= lower) & (k < centre), (k - lower) / (centre - lower), 0.0)
        falling = np.where((k >= centre) & (k < upper), (upper - k) / (upper - centre), 0.0)
    return rising + falling


def mfcc(audio, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """(13, n) float64 MFCCs of a mono signal, exactly python_speech_features.mfcc(audio, sample_rate) with all
    defaults, transposed. The reference passes int16 samples unscaled; a float signal is taken in the same
    units (not rescaled). Only 16 kHz: the 400/160-sample window and hop are the 25/10 ms at that rate."""
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"mfcc: SyncNet's MFCC is defined at {SAMPLE_RATE} Hz, got {sample_rate} Hz (resample first)")
    signal = np.asarray(audio)
    if signal.ndim != 1 or len(signal) == 0:
        raise ValueError(f"mfcc: expected a non-empty mono signal, got shape {signal.shape}")
    signal = signal.astype(np.float64)
    emphasised = np.append(signal[0], signal[1:] - PREEMPHASIS * signal[:-1])

    n_frames = 1 if len(signal) <= WIN_SAMPLES else 1 + math.ceil((len(signal) - WIN_SAMPLES) / HOP_SAMPLES)
    padded = np.zeros((n_frames - 1) * HOP_SAMPLES + WIN_SAMPLES)
    padded[:len(emphasised)] = emphasised
    frames = np.lib.stride_tricks.sliding_window_view(padded, WIN_SAMPLES)[::HOP_SAMPLES]  # rectangular

    power = 1.0 / NFFT * np.square(np.absolute(np.fft.rfft(frames, NFFT)))  # (n, 257)
    energy = np.sum(power, 1)
    energy = np.where(energy == 0, np.finfo(float).eps, energy)
    fbank = np.dot(power, _mel_filterbank(sample_rate).T)
    fbank = np.where(fbank == 0, np.finfo(float).eps, fbank)

    ceps = scipy.fft.dct(np.log(fbank), type=2, axis=1, norm="ortho")[:, :N_CEPS]
    lift = 1 + (CEP_LIFTER / 2.0) * np.sin(np.pi * np.arange(N_CEPS) / CEP_LIFTER)
    ceps = lift * ceps
    ceps[:, 0] = np.log(energy)
    return np.ascontiguousarray(ceps.T)


# ---------------------------------------------------------------------------------------------
# Offset scan
# ---------------------------------------------------------------------------------------------

@dataclass
class SyncResult:
    """What SyncNetInstance.evaluate computes (it returns offset, conf, dists; the rest it prints)."""
    offset: int  # vshift - minidx: minus the audio lag in frames
    conf: float  # Sync-C = median(mdist) - min(mdist)
    min_dist: float  # Sync-D = min(mdist)
    median: float  # median(mdist)
    minidx: int
    dists: np.ndarray  # (N, 2*vshift+1) float32, row i = window i
    mdist: np.ndarray  # (2*vshift+1,) float32
    fdist: np.ndarray  # (N,) dists[:, minidx]
    fconf: np.ndarray  # (N,) median - fdist
    fconfm: np.ndarray  # (N,) medfilt(fconf, 9): the printed "Framewise conf"
    im_feat: np.ndarray  # (N, 1024) lip embeddings
    cc_feat: np.ndarray  # (N, 1024) audio embeddings


def offset_distances(im_feat_nd: torch.Tensor, cc_feat_nd: torch.Tensor, vshift: int = 15,
                     chunk: int = 512) -> torch.Tensor:
    """(N, 2*vshift+1) dists[i, k] = |im[i] - cc[i + k - vshift] + 1e-6| (pairwise_distance semantics), with
    out-of-range audio rows taken as zero vectors, as the reference's calc_pdist pads them."""
    n_offsets = 2 * vshift + 1
    cc_padded = F.pad(cc_feat_nd, (0, 0, vshift, vshift))
    rows = []
    for start in range(0, len(im_feat_nd), chunk):  # bounds memory to chunk x 31 x D
        im = im_feat_nd[start:start + chunk]
        cc_windows_nkd = cc_padded[start:start + len(im) + n_offsets - 1].unfold(0, n_offsets, 1).transpose(1, 2)
        rows.append(F.pairwise_distance(im[:, None, :], cc_windows_nkd, eps=PAIRWISE_EPS))
    return torch.cat(rows) if rows else im_feat_nd.new_zeros((0, n_offsets))


def _scan(im_feat: torch.Tensor, cc_feat: torch.Tensor, vshift: int) -> SyncResult:
    dists = offset_distances(im_feat, cc_feat, vshift)
    mdist = dists.t().contiguous().mean(1)  # the reference averages a (31, N) stack over dim 1
    minval, minidx = torch.min(mdist, 0)
    median = torch.median(mdist)
    fdist = dists[:, minidx].numpy()
    fconf = median.numpy() - fdist
    return SyncResult(
        offset=vshift - int(minidx), conf=float(median - minval), min_dist=float(minval), median=float(median),
        minidx=int(minidx), dists=dists.numpy(), mdist=mdist.numpy(), fdist=fdist, fconf=fconf,
        fconfm=scipy.signal.medfilt(fconf, kernel_size=MEDFILT_KERNEL),
        im_feat=im_feat.numpy(), cc_feat=cc_feat.numpy())


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------

def evaluate_arrays(model: SyncNet, frames_bgr_u8_thw3, audio_i16, batch_size: int = 20, vshift: int = 15,
                    sample_rate: int = SAMPLE_RATE) -> SyncResult:
    """SyncNetInstance.evaluate from decoded data: (T, 224, 224, 3) BGR uint8 frames at 25 fps and mono
    int16 audio at 16 kHz (used unscaled). Windows are batched as the reference batches them (the batch
    composition changes float32 results at the 1e-5 level)."""
    frames_thw3 = torch.as_tensor(np.ascontiguousarray(frames_bgr_u8_thw3))
    if frames_thw3.ndim != 4 or tuple(frames_thw3.shape[1:]) != (FRAME_SIZE, FRAME_SIZE, 3):
        raise ValueError(f"SyncNet needs (T, {FRAME_SIZE}, {FRAME_SIZE}, 3) BGR frames (face crops), "
                         f"got {tuple(frames_thw3.shape)}")
    audio = np.asarray(audio_i16)
    n_frames = len(frames_thw3)
    if len(audio) / sample_rate != n_frames / FPS:
        warnings.warn(f"WARNING: Audio ({len(audio) / sample_rate:.4f}s) and video ({n_frames / FPS:.4f}s) "
                      f"lengths are different.", stacklevel=2)
    min_length = min(n_frames, math.floor(len(audio) / (sample_rate // FPS)))
    n_windows = min_length - WINDOW_FRAMES
    if n_windows < 1:
        raise ValueError(f"clip too short for SyncNet: {n_frames} frames and {len(audio)} audio samples "
                         f"give {max(n_windows, 0)} windows (needs at least {WINDOW_FRAMES + 1} frames of both)")
    mfcc_13n = torch.from_numpy(mfcc(audio, sample_rate)).float()

    device = next(model.parameters()).device
    frame_offsets = torch.arange(WINDOW_FRAMES)
    mfcc_offsets = torch.arange(MFCC_WINDOW)
    im_feats, cc_feats = [], []
    for start in range(0, n_windows, batch_size):
        window = torch.arange(start, min(n_windows, start + batch_size))
        video_b5hw3 = frames_thw3[window[:, None] + frame_offsets]
        video_b35hw = video_b5hw3.permute(0, 4, 1, 2, 3).float().contiguous()
        mfcc_13b20 = mfcc_13n[:, MFCC_PER_FRAME * window[:, None] + mfcc_offsets]
        mfcc_b11320 = mfcc_13b20.permute(1, 0, 2)[:, None].contiguous()
        with torch.no_grad():
            im_feats.append(model.forward_lip(video_b35hw.to(device)).float().cpu())
            cc_feats.append(model.forward_aud(mfcc_b11320.to(device)).float().cpu())
    return _scan(torch.cat(im_feats), torch.cat(cc_feats), vshift)


def _run_ffmpeg(args: list, video_path: str, what: str) -> None:
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", *args]
    res = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if res.returncode != 0:
        err = res.stderr.decode("utf-8", errors="replace").strip().splitlines()
        raise ValueError(f"{video_path}: ffmpeg could not extract the {what} ({err[-1] if err else res.returncode})")


def _probe(video_path: str) -> dict:
    """From `ffmpeg -i`: the first video stream's pix_fmt and colour tags (e.g. 'yuv420p', ['tv', 'bt709'])
    and whether there is an audio stream."""
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", video_path]
    err = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE).stderr.decode("utf-8", errors="replace")
    info = {"video": None, "tags": [], "audio": bool(re.search(r"Stream #\S+: Audio: ", err))}
    for line in err.splitlines():
        m = re.search(r"Stream #\S+: Video: .*?, ([a-z0-9_]+)(?:\(([^)]*)\))?, \d+x\d+", line)
        if m:
            info.update(video=m.group(1), tags=(m.group(2) or "").split(", "))
            break
    return info


def _extract_frames(video_path: str, work_dir: str, legacy_range: bool, info: dict) -> np.ndarray:
    """The reference's `ffmpeg -y -i <video> -threads 1 -f image2 <dir>/%06d.jpg`, the JPEGs read back as
    cv2.imread does (libjpeg-turbo via Pillow: same decoder and defaults) -> (T, H, W, 3) BGR uint8."""
    legacy = legacy_range and info["video"] == "yuv420p" and "pc" not in info["tags"]  # limited range
    _run_ffmpeg(["-y", "-i", video_path, "-threads", "1", *(["-vf", _LEGACY_RANGE_FILTER] if legacy else []),
                 "-f", "image2", os.path.join(work_dir, "%06d.jpg")], video_path, "video frames")
    paths = sorted(glob.glob(os.path.join(work_dir, "*.jpg")))
    if not paths:
        raise ValueError(f"{video_path}: no video frames")
    frames = []
    for path in paths:
        with Image.open(path) as image:
            frames.append(np.asarray(image.convert("RGB"))[:, :, ::-1])
    return np.stack(frames)


def _extract_audio(video_path: str, work_dir: str) -> tuple:
    """The reference's `ffmpeg -y -i <video> -async 1 -ac 1 -vn -acodec pcm_s16le -ar 16000 audio.wav`,
    read with scipy's wavfile -> (sample_rate, int16 samples)."""
    wav_path = os.path.join(work_dir, "audio.wav")
    _run_ffmpeg(["-y", "-i", video_path, "-async", "1", "-ac", "1", "-vn", "-acodec", "pcm_s16le",
                 "-ar", str(SAMPLE_RATE), wav_path], video_path, "audio")
    return scipy.io.wavfile.read(wav_path)


def load_video_for_sync(video_path, tmp_dir=None, legacy_range: bool = True) -> tuple:
    """(frames (T, H, W, 3) BGR uint8, audio int16, sample_rate) as SyncNetInstance.evaluate reads a file."""
    video_path = os.fspath(video_path)
    if not os.path.isfile(video_path):
        raise FileNotFoundError(f"{video_path}: file not found")
    info = _probe(video_path)
    if info["video"] is None or not info["audio"]:
        raise ValueError(f"{video_path}: no {'video' if info['video'] is None else 'audio'} stream "
                         f"(SyncNet needs a video with sound)")
    with tempfile.TemporaryDirectory(prefix="syncnet_", dir=tmp_dir) as work_dir:
        frames = _extract_frames(video_path, work_dir, legacy_range, info)
        sample_rate, audio = _extract_audio(video_path, work_dir)
    return frames, audio, sample_rate


def evaluate_file(model: SyncNet, video_path, batch_size: int = 20, vshift: int = 15, tmp_dir=None,
                  legacy_range: bool = True) -> SyncResult:
    """SyncNetInstance.evaluate on a 25 fps 224x224 face-crop video with audio: Sync-C = `.conf`,
    Sync-D = `.min_dist`, AV offset = `.offset`. Temporary files go to a fresh folder under `tmp_dir`
    (the system's by default) that is always removed. legacy_range=False runs the reference's frame
    command verbatim with this ffmpeg (see the module docstring)."""
    frames, audio, sample_rate = load_video_for_sync(video_path, tmp_dir, legacy_range)
    return evaluate_arrays(model, frames, audio, batch_size=batch_size, vshift=vshift, sample_rate=sample_rate)
