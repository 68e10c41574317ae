"""Face track and 224x224 crop of a talking-head video for SyncNet, as the reference's run_pipeline.py does it.

Reproduces joonson/syncnet_python at commit 6efbb1c305c23f47a62b09cf4215a8ac45e97d49 (2020-03-29), run_pipeline.py
with its defaults (facedet_scale 0.25, crop_scale 0.4, min_track 100, frame_rate 25, num_failed_det 25,
min_face_size 100):

    video -> frames at 25 fps -> S3FD on every frame (conf_th 0.9, scale 0.25)
      -> tracks: greedy chaining of detections with IoU > 0.5 and gaps <= 25 frames, kept when longer than
         min_track frames and larger than min_face_size px, boxes linearly interpolated over missed frames
      -> per frame: half-size s = max(w, h) / 2 and centre (x, y), each median-filtered (kernel 13, zero-padded)
      -> crop rows y - s .. y + 1.8 s, columns x - 1.4 s .. x + 1.4 s of the frame padded with grey 110,
         resized to 224x224 (cv2 INTER_LINEAR, bit-exact re-implementation)
      -> 25 fps video with the audio of the track's time span (16 kHz mono PCM)

Where this differs from the reference, on purpose:
- No scene detection (PySceneDetect is not a dependency): the whole clip is one scene, which is what
  PySceneDetect reports for a single-shot talking-head clip. A clip with cuts may give tracks that span a cut.
- Frames come from one ffmpeg decode to RGB at 25 fps (`-r 25`), not through the reference's intermediate
  MPEG-4 avi (-qscale:v 2) and JPEG files (-qscale:v 2) read back with cv2.imread: a few grey levels differ,
  detections and crops move by far less than a pixel.
- The audio is taken from the input file directly (16 kHz mono PCM), not from the 25 fps avi the reference
  writes first with `-async 1`; the track's span is cut with the same `-ss %.3f -to %.3f` command.
- The crop video is MPEG-4 part 2 at -q:v 2 (ffmpeg's native encoder; the reference writes XVID through
  cv2.VideoWriter at OpenCV's default quality) with PCM audio; .avi as the reference, .mkv/.mov/.mp4 work too.
- One video is written: the longest track (the first of equal ones), where the reference writes one file
  per track. `face_tracks` gives them all.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from scipy import signal
from scipy.interpolate import interp1d

from media.atomic import atomic_outputs
from evaluation import s3fd
from media.video_io import media_info

FRAME_RATE = 25
FACEDET_SCALE = 0.25
CONF_TH = 0.9
IOU_THRESHOLD = 0.5
NUM_FAILED_DET = 25
MIN_TRACK = 100
MIN_FACE_SIZE = 100
CROP_SCALE = 0.4
SMOOTH_KERNEL = 13
CROP_SIZE = 224
PAD_VALUE = 110
AUDIO_RATE = 16000
DETECT_BATCH = 8  # frames per S3FD forward
VIDEO_CODEC = ("-c:v", "mpeg4", "-q:v", "2", "-pix_fmt", "yuv420p")
CONTAINERS = (".avi", ".mkv", ".mov", ".mp4")


def _ffmpeg(args, what: str, video) -> None:
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args]
    res = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if res.returncode != 0:
        err = res.stderr.decode("utf-8", errors="replace").strip().splitlines()
        raise ValueError(f"{video}: ffmpeg failed to {what} ({err[-1] if err else res.returncode})")


def iter_frames(video_path, frame_rate: int = FRAME_RATE):
    """uint8 (H, W, 3) RGB frames of a video resampled to `frame_rate` (ffmpeg's output -r: frames are
    dropped or repeated), decoded as a stream of PPM images."""
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error",
           "-i", os.fspath(video_path), "-map", "0:V:0", "-an", "-sn", "-dn", "-r", str(frame_rate),
           "-pix_fmt", "rgb24", "-f", "image2pipe", "-c:v", "ppm", "pipe:1"]
    with tempfile.TemporaryFile() as errf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errf)
        try:
            while proc.stdout.read(3) == b"P6\n":
                width, height = (int(v) for v in proc.stdout.readline().split())
                proc.stdout.readline()  # maxval 255
                data = proc.stdout.read(width * height * 3)
                if len(data) < width * height * 3:
                    break
                yield np.frombuffer(data, np.uint8).reshape(height, width, 3)
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        errf.seek(0)
        err = errf.read().decode("utf-8", errors="replace").strip().splitlines()
    if rc != 0:
        raise ValueError(f"{video_path}: cannot decode video ({err[-1] if err else rc})")


def _batches(frames, size):
    batch = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def iou(box_a, box_b) -> float:
    """IoU of two (x1, y1, x2, y2) boxes, areas without +1 (run_pipeline's bb_intersection_over_union)."""
    inter = max(0, min(box_a[2], box_b[2]) - max(box_a[0], box_b[0])) * \
        max(0, min(box_a[3], box_b[3]) - max(box_a[1], box_b[1]))
    union = (box_a[2] - box_a[0]) * (box_a[3] - box_a[1]) + (box_b[2] - box_b[0]) * (box_b[3] - box_b[1]) - inter
    return inter / float(union) if union > 0 else 0.0


def face_tracks(boxes_per_frame, min_track: int = MIN_TRACK, num_failed_det: int = NUM_FAILED_DET,
                min_face_size: float = MIN_FACE_SIZE, iou_threshold: float = IOU_THRESHOLD) -> list:
    """run_pipeline.track_shot over one scene. `boxes_per_frame[t]` is the (K, 5) detections of frame t.
    Returns [{'frame': (n,) int frame numbers, 'bbox': (n, 4) float64 boxes}] with missed frames linearly
    interpolated, in the order the tracks were found.

    Each round starts a track at the first remaining detection and walks forward, taking a detection when it
    is at most `num_failed_det` frames after the track's last box and overlaps it with IoU > iou_threshold;
    the first detection further away ends the walk. As in the reference, which removes items from the list
    it is iterating over, the detection right after a taken one in the same frame is not looked at."""
    remaining = [[(t, [float(v) for v in box[:4]]) for box in np.asarray(boxes).reshape(-1, 5)]
                 for t, boxes in enumerate(boxes_per_frame)]
    tracks = []
    while True:
        track = []
        for faces in remaining:
            i = 0
            while i < len(faces):
                frame, box = faces[i]
                if track and frame - track[-1][0] > num_failed_det:
                    break
                if not track or iou(box, track[-1][1]) > iou_threshold:
                    track.append(faces.pop(i))
                i += 1  # after a pop this skips the next face (the reference's list-mutation quirk)
        if not track:
            return tracks
        if len(track) <= min_track:
            continue
        frames = np.array([t for t, _ in track])
        boxes = np.array([box for _, box in track])
        every_frame = np.arange(frames[0], frames[-1] + 1)
        boxes = np.stack([interp1d(frames, boxes[:, k])(every_frame) for k in range(4)], axis=1)
        if max(np.mean(boxes[:, 2] - boxes[:, 0]), np.mean(boxes[:, 3] - boxes[:, 1])) > min_face_size:
            tracks.append({"frame": every_frame, "bbox": boxes})


def smooth_track(track) -> tuple:
    """(half_size, center_x, center_y) per frame of a track, each median-filtered (kernel 13, zero-padded ends)."""
    boxes = track["bbox"]
    half_size = np.maximum(boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]) / 2
    center_y = (boxes[:, 1] + boxes[:, 3]) / 2
    center_x = (boxes[:, 0] + boxes[:, 2]) / 2
    return tuple(signal.medfilt(v, kernel_size=SMOOTH_KERNEL) for v in (half_size, center_x, center_y))


def crop_face(frame_hw3: np.ndarray, half_size: float, center_x: float, center_y: float,
              crop_scale: float = CROP_SCALE) -> np.ndarray:
    """The (224, 224, 3) crop of crop_video: rows y - s .. y + s(1 + 2c), columns x - s(1 + c) .. x + s(1 + c)
    of the frame padded by int(s(1 + 2c)) grey (110) pixels, int() bounds, resized with cv2 INTER_LINEAR."""
    height, width = frame_hw3.shape[:2]
    pad = int(half_size * (1 + 2 * crop_scale))
    my, mx = center_y + pad, center_x + pad  # centre in padded coordinates
    r0, r1 = int(my - half_size), int(my + half_size * (1 + 2 * crop_scale))
    c0, c1 = int(mx - half_size * (1 + crop_scale)), int(mx + half_size * (1 + crop_scale))
    # numpy slicing of the padded frame: ends past it are cut (starts are >= 0 for boxes inside the frame)
    r0, c0 = max(r0, 0), max(c0, 0)
    r1, c1 = min(r1, height + 2 * pad), min(c1, width + 2 * pad)
    if r1 <= r0 or c1 <= c0:
        raise ValueError(f"empty face crop (half size {half_size:.1f} at {center_x:.1f}, {center_y:.1f})")
    face = np.full((r1 - r0, c1 - c0, 3), PAD_VALUE, np.uint8)
    fr0, fr1 = max(r0 - pad, 0), min(r1 - pad, height)
    fc0, fc1 = max(c0 - pad, 0), min(c1 - pad, width)
    if fr1 > fr0 and fc1 > fc0:
        face[fr0 + pad - r0:fr1 + pad - r0, fc0 + pad - c0:fc1 + pad - c0] = frame_hw3[fr0:fr1, fc0:fc1]
    return s3fd.resize_linear(face, (CROP_SIZE, CROP_SIZE))


def crop_face_track(net, video_path, out_path, min_track: int = MIN_TRACK, num_failed_det: int = NUM_FAILED_DET,
                    min_face_size: float = MIN_FACE_SIZE, crop_scale: float = CROP_SCALE,
                    facedet_scale: float = FACEDET_SCALE, conf_th: float = CONF_TH, frame_rate: int = FRAME_RATE,
                    detect=s3fd.detect_faces_batch, batch_size: int = DETECT_BATCH) -> Path:
    """Write the 224x224, 25 fps face-crop video of the longest face track of `video_path` with the audio of
    the same span (16 kHz mono PCM) to `out_path` (all or nothing) and return its path.

    `net` is the S3FD network; `detect(net, frames, conf_th, scales)` -> one (K, 5) array per frame.
    FileNotFoundError when the video is missing; ValueError "<video>: ..." when it has no video or audio
    stream, cannot be decoded, or has no face track ("<video>: no face track found")."""
    video, out_path = os.fspath(video_path), Path(out_path)
    if out_path.suffix.lower() not in CONTAINERS:
        raise ValueError(f"{out_path}: the crop video must be one of {', '.join(CONTAINERS)}")
    info = media_info(video)  # FileNotFoundError / ValueError naming the file
    if info["video"] is None:
        raise ValueError(f"{video}: no video stream")
    if info["audio"] is None:
        raise ValueError(f"{video}: no audio stream")

    boxes_per_frame = []
    for batch in _batches(iter_frames(video, frame_rate), batch_size):
        boxes_per_frame += detect(net, batch, conf_th, [facedet_scale])
    # one scene spanning the clip (no PySceneDetect); the reference tracks a scene only if it is long enough
    tracks = face_tracks(boxes_per_frame, min_track, num_failed_det, min_face_size) \
        if len(boxes_per_frame) >= min_track else []
    if not tracks:
        raise ValueError(f"{video}: no face track found")
    track = max(tracks, key=lambda t: len(t["frame"]))  # max() keeps the first of equal lengths
    half_size, center_x, center_y = smooth_track(track)
    first, last = int(track["frame"][0]), int(track["frame"][-1])

    with tempfile.TemporaryDirectory() as tmp, atomic_outputs(out_path) as (tmp_out,):
        audio, audio_cut = os.path.join(tmp, "audio.wav"), os.path.join(tmp, "audio_cut.wav")
        _ffmpeg(["-i", video, "-ac", "1", "-vn", "-acodec", "pcm_s16le", "-ar", str(AUDIO_RATE), audio],
                "extract the audio", video)
        _ffmpeg(["-i", audio, "-ss", "%.3f" % (first / frame_rate), "-to", "%.3f" % ((last + 1) / frame_rate),
                 audio_cut], "cut the audio", video)
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{CROP_SIZE}x{CROP_SIZE}", "-r", str(frame_rate),
               "-i", "pipe:0", "-i", audio_cut, "-map", "0:v", "-map", "1:a", *VIDEO_CODEC,
               "-c:a", "pcm_s16le", os.fspath(tmp_out)]
        with tempfile.TemporaryFile() as errf:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errf)
            frames = iter_frames(video, frame_rate)
            try:
                for t, frame in enumerate(frames):
                    if t > last:
                        break
                    if t >= first:
                        k = t - first
                        crop = crop_face(frame, half_size[k], center_x[k], center_y[k], crop_scale)
                        proc.stdin.write(crop.tobytes())
                proc.stdin.close()
                rc = proc.wait()
            except BrokenPipeError:  # the encoder died; its message is read below
                rc = proc.wait()
            finally:
                frames.close()
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            errf.seek(0)
            err = errf.read().decode("utf-8", errors="replace").strip().splitlines()
        if rc != 0:
            raise ValueError(f"{video}: ffmpeg failed to write the face crop ({err[-1] if err else rc})")
    return out_path
