"""Video I/O through the ffmpeg binary shipped with imageio-ffmpeg (no OpenCV, no ffprobe).

- read_frames / read_first_frame: decode to uint8 RGB as the reference's cv2.VideoCapture +
  cvtColor(BGR2RGB) does (see _RGB_FILTER).
- write_video: H.264 (libx264) yuv420p, +faststart, optional AAC audio; atomic (temp + rename).
- mux_audio: put an audio track on an existing video (V2A re-uses the input video's frames).
- probe: codecs, size, fps, exact frame count and stream durations.

Audio/video length policy: the video length is the authority. The audio is padded with silence
or trimmed to exactly round(video_duration * sample_rate) samples, so the two durations agree to
one audio sample (the AAC encoder delay is hidden by the mp4 edit list that ffmpeg writes).
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from media.atomic import atomic_output
from common.constants import FPS

# One wording per problem (the pipeline uses them too)
NO_VIDEO_STREAM = "no video stream (audio-only or not a video)"
NO_FRAMES = "video has no decodable frames"

# Sample rates AAC-LC signals directly; anything else is resampled to 48 kHz.
AAC_SAMPLE_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000)

# The reference reads frames with cv2.VideoCapture (opencv-python-headless 5.0, bundled FFmpeg),
# whose swscale conversion (SWS_BICUBIC) follows the stream's colour tags: BT.601 when untagged,
# BT.709 when tagged so, full range for yuvj*. ffmpeg's own automatic conversion does the same, so
# frames come out bit-identical (measured: max abs diff 0 on reference_video.mp4 and on bt709-
# tagged, full-range, rotated, yuv444p, mpeg4 and vp9 test clips, all frames). swscale's SIMD
# and plain-C paths differ by up to 2 levels (-cpuflags 0), so other CPUs may differ that much.
_RGB_FILTER = "scale=flags=bicubic,format=rgb24"


def ffmpeg_exe() -> str:
    return imageio_ffmpeg.get_ffmpeg_exe()


# ---------------------------------------------------------------------------------------------
# stream information from `ffmpeg -i` (stderr)


def _check_file(path) -> str:
    """Absolute path of an existing regular file, else ValueError naming it."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: file not found")
    if not p.is_file():
        raise ValueError(f"{path}: not a regular file")
    if p.stat().st_size == 0:
        raise ValueError(f"{path}: file is empty")
    return str(p.resolve())


def _split_fields(text: str) -> list[str]:
    """Split an ffmpeg stream description on ', ' outside parentheses/brackets."""
    fields, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "," and depth == 0:
            fields.append(text[start:i].strip())
            start = i + 1
    fields.append(text[start:].strip())
    return fields


def _parse_rate(fields: list[str], unit: str) -> float | None:
    for f in fields:
        m = re.fullmatch(rf"([\d.]+)(k?) {unit}(?: \(.*\))?", f)
        if m:
            value = float(m.group(1)) * (1000 if m.group(2) else 1)
            # ffmpeg prints two decimals; recover NTSC-style n*1000/1001 rates exactly
            n = round(value * 1.001)
            if abs(value - n * 1000 / 1001) < 0.006 and abs(value - round(value)) > 0.006:
                return n * 1000 / 1001
            return value
    return None


_STREAM_RE = re.compile(r"^\s*Stream #0:(\d+)\S*?: (Video|Audio|Subtitle|Data|Attachment): (.*)$")


def media_info(path) -> dict:
    """Header facts of the first video (not cover art) and first audio stream of a file."""
    abspath = _check_file(path)
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", abspath]
    res = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    err = res.stderr.decode("utf-8", errors="replace")
    if "Input #0" not in err:
        lines = [re.sub(r"^\[[^]]*\] ", "", ln.strip()) for ln in err.splitlines() if ln.strip()]
        lines = [ln for ln in lines if abspath not in ln]  # "Error opening input file <path>."
        reason = lines[-1] if lines else "unknown error"
        reason = reason.removeprefix("Error opening input files: ")
        raise ValueError(f"{path}: not a readable audio/video file ({reason})")
    info = {"video": None, "audio": None, "duration": None}
    m = re.search(r"Duration: (\d+):(\d+):([\d.]+)", err)
    if m:
        info["duration"] = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    for line in err.splitlines():
        m = _STREAM_RE.match(line)
        if not m:
            continue
        kind, desc = m.group(2), m.group(3)
        fields = _split_fields(desc)
        codec = fields[0].split()[0] if fields and fields[0] else None
        if kind == "Video" and info["video"] is None and "(attached pic)" not in desc:
            size = next((re.match(r"(\d+)x(\d+)", f) for f in fields[1:]
                         if re.match(r"\d+x\d+", f)), None)
            pix_fmt = None
            if len(fields) > 1 and not re.match(r"\d+x\d+", fields[1]):
                pm = re.match(r"[a-z0-9_]+", fields[1])
                pix_fmt = pm.group(0) if pm and pm.group(0) != "none" else None
            fps, tbr = _parse_rate(fields, "fps"), _parse_rate(fields, "tbr")
            # cv2's CAP_PROP_FPS is av_guess_frame_rate: r_frame_rate (tbr) unless it is absurd
            rate = tbr if tbr and not (fps and fps < 70 and tbr > 210) else fps
            info["video"] = dict(
                codec=codec, pix_fmt=pix_fmt,
                width=int(size.group(1)) if size else None,
                height=int(size.group(2)) if size else None,
                fps=rate)
        elif kind == "Audio" and info["audio"] is None:
            sr = next((int(re.match(r"(\d+) Hz", f).group(1)) for f in fields
                       if re.match(r"\d+ Hz", f)), None)
            info["audio"] = dict(codec=codec, sample_rate=sr)
    return info


# ---------------------------------------------------------------------------------------------
# reading


def _read_exactly(stream, buf: memoryview) -> int:
    got = 0
    while got < len(buf):
        n = stream.readinto(buf[got:])
        if not n:
            break
        got += n
    return got


MIN_FACE_PIXELS = 32  # a smaller picture holds no face to render (LIA-X works at 256 or 512)


def check_video_stream(path) -> None:
    """ValueError unless the file's header shows a video stream of at least MIN_FACE_PIXELS on each side
    (nothing decoded)."""
    video = media_info(path)["video"]
    if video is None:
        raise ValueError(f"{path}: {NO_VIDEO_STREAM}")
    w, h = video.get("width"), video.get("height")
    if w and h and min(w, h) < MIN_FACE_PIXELS:
        raise ValueError(f"{path}: the picture is {w}x{h}: too small to hold a face (at least "
                         f"{MIN_FACE_PIXELS}x{MIN_FACE_PIXELS} pixels)")


def read_frames(path, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """All (or the first max_frames) frames of a video: (uint8 (T, H, W, 3) RGB, fps).

    Every decoded frame is returned once (no frame-rate conversion), display rotation applied,
    as cv2.VideoCapture delivers them. fps is cv2's CAP_PROP_FPS (25.0 when the file has none).
    """
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"{path}: max_frames must be >= 1, got {max_frames}")
    info = media_info(path)
    video = info["video"]
    if video is None:
        raise ValueError(f"{path}: {NO_VIDEO_STREAM}")
    fps = video["fps"] or float(FPS)
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error",
           "-i", str(Path(path).resolve()), "-map", "0:V:0", "-an", "-sn", "-dn",
           "-fps_mode", "passthrough", "-vf", _RGB_FILTER]
    if max_frames is not None:
        cmd += ["-frames:v", str(max_frames)]
    # PPM frames carry their own size, so rotated or odd streams need no header guessing
    cmd += ["-f", "image2pipe", "-c:v", "ppm", "pipe:1"]

    # capacity from the header (np.empty pages cost nothing until written), at most ~2 GB up
    # front so a bogus duration cannot ask for terabytes; grows by doubling past that
    estimate = int((info["duration"] or 0) * fps) + 8
    capacity = min(estimate, max_frames) if max_frames else estimate
    frames, n = None, 0
    with tempfile.TemporaryFile() as errf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errf)
        try:
            while True:
                magic = proc.stdout.read(3)
                if not magic:
                    break
                if magic != b"P6\n":
                    raise ValueError(f"{path}: unexpected decoder output")
                w, h = (int(v) for v in proc.stdout.readline().split())
                proc.stdout.readline()  # maxval, 255
                if frames is None:
                    capacity = max(1, min(capacity, 2**31 // (h * w * 3)))
                    frames = np.empty((capacity, h, w, 3), np.uint8)
                elif frames.shape[1:3] != (h, w):
                    raise ValueError(f"{path}: frame size changes mid-stream "
                                     f"({frames.shape[2]}x{frames.shape[1]} -> {w}x{h})")
                if n == len(frames):
                    frames = np.concatenate([frames, np.empty_like(frames)])
                if _read_exactly(proc.stdout, memoryview(frames[n]).cast("B")) != h * w * 3:
                    break
                n += 1
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            proc.stdout.close()
        errf.seek(0)
        err = errf.read().decode("utf-8", errors="replace").strip()
    if n == 0:
        raise ValueError(f"{path}: {NO_FRAMES}")
    if rc != 0:
        last = err.splitlines()[-1] if err else f"ffmpeg exit code {rc}"
        raise ValueError(f"{path}: cannot decode video ({last})")
    return frames[:n], float(fps)


def read_first_frame(path) -> np.ndarray:
    """First frame of a video as uint8 (H, W, 3) RGB (what the reference uses as the face)."""
    frames, _ = read_frames(path, max_frames=1)
    return frames[0]


# ---------------------------------------------------------------------------------------------
# writing


@contextlib.contextmanager
def _output(path, atomic: bool):
    """The path to write `path` through: a temp renamed at the end (atomic) or `path` itself, removed on
    failure (the caller's own temporary name, e.g. one of atomic.atomic_outputs)."""
    if atomic:
        with atomic_output(path) as tmp:
            yield tmp
        return
    path = Path(path)
    try:
        yield path
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _as_batches(frames_iter):
    """Yield C-contiguous uint8 (b, H, W, 3) arrays from arrays/tensors of 1 or many frames."""
    for item in frames_iter:
        if hasattr(item, "detach"):  # torch tensor
            item = item.detach().cpu().numpy()
        arr = np.asarray(item)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"frames must be (H, W, 3) or (b, H, W, 3) RGB, got {arr.shape}")
        if arr.dtype != np.uint8:
            raise ValueError(f"frames must be uint8, got {arr.dtype}")
        if len(arr):
            yield np.ascontiguousarray(arr)


def _fps_arg(fps) -> str:
    rate = Fraction(fps).limit_denominator(1001) if not isinstance(fps, Fraction) else fps
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return f"{rate.numerator}/{rate.denominator}"


def _h264_args() -> list[str]:
    # BT.601 limited range is what swscale's RGB->YUV uses; tagging it keeps players consistent
    return ["-c:v", "libx264", "-preset", "medium", "-crf", "18", "-pix_fmt", "yuv420p",
            "-colorspace", "smpte170m", "-color_range", "tv"]


def _encode_h264(out_tmp: Path, frames_iter, fps, path_for_errors, faststart: bool) -> int:
    """Pipe RGB frames into libx264; returns the number of frames written."""
    batches = _as_batches(frames_iter)
    first = next(batches, None)
    if first is None:
        raise ValueError(f"{path_for_errors}: no frames to write")
    _, h, w, _ = first.shape
    if h % 2 or w % 2:
        raise ValueError(f"{path_for_errors}: H.264 yuv420p needs even frame size, got {w}x{h}")
    cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-framerate", _fps_arg(fps),
           "-i", "pipe:0", "-map", "0:v:0", *_h264_args()]
    if faststart:
        cmd += ["-movflags", "+faststart"]
    cmd += ["-f", "mp4", str(out_tmp)]
    n = 0
    with tempfile.TemporaryFile() as errf:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errf)
        try:
            batch = first
            while batch is not None:
                if batch.shape[1:3] != (h, w):
                    raise ValueError(f"{path_for_errors}: frame size changed from {w}x{h} to "
                                     f"{batch.shape[2]}x{batch.shape[1]}")
                try:
                    proc.stdin.write(memoryview(batch).cast("B"))
                except BrokenPipeError:
                    break  # ffmpeg died; its message is read below
                n += len(batch)
                batch = next(batches, None)
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        errf.seek(0)
        err = errf.read().decode("utf-8", errors="replace").strip()
    if rc != 0:
        raise RuntimeError(f"{path_for_errors}: ffmpeg failed to encode video ({err or rc})")
    return n


def _audio_info(audio_path) -> dict:
    audio = media_info(audio_path)["audio"]
    if audio is None:
        raise ValueError(f"{audio_path}: no audio stream")
    return audio


def _mux(video_src: Path, audio_path, out_tmp: Path, video_duration: float, copy_video: bool,
         audio_rate: int | None, path_for_errors) -> None:
    """video_src's first video stream + audio padded/trimmed to video_duration -> out_tmp."""
    rate = audio_rate if audio_rate in AAC_SAMPLE_RATES else 48000
    n_samples = max(1, round(video_duration * rate))
    audio_filter = f"aresample={rate},apad=whole_len={n_samples},atrim=end_sample={n_samples}"
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
           "-i", str(Path(video_src).resolve()), "-i", str(Path(audio_path).resolve()),
           "-map", "0:V:0", "-map", "1:a:0"]
    cmd += ["-c:v", "copy"] if copy_video else ["-fps_mode", "passthrough", *_h264_args()]
    cmd += ["-af", audio_filter, "-c:a", "aac", "-b:a", "128k",
            "-movflags", "+faststart", "-f", "mp4", str(out_tmp)]
    res = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    if res.returncode != 0:
        err = res.stderr.decode("utf-8", errors="replace").strip()
        raise RuntimeError(f"{path_for_errors}: ffmpeg failed to mux audio ({err})")


def write_video(path, frames_iter, fps=FPS, audio_path=None, atomic: bool = True) -> int:
    """Write RGB uint8 frames (an iterable of (H, W, 3) frames or (b, H, W, 3) batches) to an mp4.

    H.264 yuv420p (BT.601 tagged), +faststart; with audio_path, AAC audio padded with silence or
    trimmed to the video length. Written atomically (atomic=False: `path` is already a temporary name):
    on any error or Ctrl-C no file is left at `path` (nor a temp file). Returns the number of frames written.
    """
    audio = _audio_info(audio_path) if audio_path is not None else None  # fail before rendering
    with _output(path, atomic) as tmp:
        if audio is None:
            return _encode_h264(tmp, frames_iter, fps, path, faststart=True)
        video_only = tmp.with_name(tmp.name + ".video")
        try:
            n = _encode_h264(video_only, frames_iter, fps, path, faststart=False)
            _mux(video_only, audio_path, tmp, n / float(Fraction(_fps_arg(fps))),
                 copy_video=True, audio_rate=audio["sample_rate"], path_for_errors=path)
        finally:
            video_only.unlink(missing_ok=True)
    return n


def mux_audio(video_path, wav_path, out_path, atomic: bool = True) -> None:
    """out_path = video_path's frames + wav_path's audio (AAC, padded/trimmed to the video).

    The video stream is copied when it already is H.264 yuv420p, otherwise re-encoded to it.
    Atomic like write_video; out_path may equal video_path (when atomic).
    """
    vinfo = probe(video_path)
    if vinfo["video_codec"] is None:
        raise ValueError(f"{video_path}: {NO_VIDEO_STREAM}")
    if not vinfo["n_frames"]:
        raise ValueError(f"{video_path}: {NO_FRAMES}")
    audio = _audio_info(wav_path)
    copy_video = vinfo["video_codec"] == "h264" and vinfo["pix_fmt"] == "yuv420p"
    with _output(out_path, atomic) as tmp:
        _mux(Path(video_path), wav_path, tmp, vinfo["video_duration"], copy_video,
             audio["sample_rate"], out_path)


# ---------------------------------------------------------------------------------------------
# incremental writers (streaming)

_END = object()


def _queue_iter(q):
    while (item := q.get()) is not _END:
        yield item


class IncrementalVideo:
    """write_video fed frame batches as they are rendered: add(frames) ... close() -> frames written.
    The file is byte for byte what write_video writes for the same frames and audio (same encoder and mux)."""

    def __init__(self, path, fps=FPS):
        import queue
        import threading

        self.path, self.fps = Path(path), fps
        self._video_only = self.path.with_name(self.path.name + ".video")
        self._queue, self._result = queue.Queue(maxsize=8), {}
        self._thread = threading.Thread(target=self._encode, daemon=True)
        self._thread.start()

    def _frames(self):
        for item in _queue_iter(self._queue):
            yield item
        self._result["end_seen"] = True

    def _encode(self):
        try:
            self._result["n"] = _encode_h264(self._video_only, self._frames(), self.fps, self.path,
                                             faststart=False)
        except BaseException as e:  # noqa: BLE001 - re-raised in close()
            self._result["error"] = e
            # keep draining so that add() never blocks, up to the one end marker (unless already taken: an
            # encoder that failed on the end marker itself, e.g. aborted before any frame, must not wait)
            while not self._result.get("end_seen") and self._queue.get() is not _END:
                pass

    def add(self, frames) -> None:
        if "error" not in self._result:
            self._queue.put(frames)

    def close(self, audio_path=None) -> int:
        """Finish the video; with audio_path mux it in as write_video does (AAC padded/trimmed)."""
        self._queue.put(_END)
        self._thread.join()
        try:
            if "error" in self._result:
                raise self._result["error"]
            n = self._result["n"]
            if audio_path is None:
                self._video_only.replace(self.path)
                return n
            audio = _audio_info(audio_path)
            _mux(self._video_only, audio_path, self.path, n / float(Fraction(_fps_arg(self.fps))),
                 copy_video=True, audio_rate=audio["sample_rate"], path_for_errors=self.path)
            return n
        finally:
            self._video_only.unlink(missing_ok=True)

    def abort(self) -> None:
        self._queue.put(_END)
        self._thread.join()
        self._video_only.unlink(missing_ok=True)


class FragmentedMp4Writer:
    """A fragmented mp4 (H.264 + AAC, movflags frag_keyframe+empty_moov) written while it is fed: valid
    (playable up to its last complete fragment) at every fragment boundary. A keyframe, so a fragment, every
    `gop` frames. `path` "-" writes to stdout. Feed add(frames=(n, H, W, 3) uint8, audio=(m,) float32 24 kHz);
    close() waits for the encoder."""

    def __init__(self, path, size, fps=FPS, sample_rate: int = 24000, gop: int = FPS, video: bool = True):
        import threading

        self.path = path
        self.reader_closed = False  # set by close() when stdout's reader left before the end
        w, h = size
        args = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y"]
        read_audio, write_audio = os.pipe()
        if video:
            args += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-framerate", _fps_arg(fps),
                     "-i", "pipe:0"]
        args += ["-f", "f32le", "-ar", str(sample_rate), "-ac", "1", "-i", f"pipe:{read_audio}"]
        if video:
            args += ["-map", "0:v:0", "-map", "1:a:0", *_h264_args(), "-tune", "zerolatency", "-g", str(gop),
                     "-keyint_min", str(gop), "-sc_threshold", "0"]
        else:
            args += ["-map", "0:a:0"]
        args += ["-c:a", "aac", "-b:a", "128k", "-ar", "48000", "-movflags", "frag_keyframe+empty_moov+default_base_moof",
                 "-f", "mp4", "pipe:1" if path == "-" else str(path)]
        self._err = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(args, stdin=subprocess.PIPE if video else subprocess.DEVNULL,
                                      stdout=None if path == "-" else subprocess.DEVNULL, stderr=self._err,
                                      pass_fds=(read_audio,))
        os.close(read_audio)
        self._audio = os.fdopen(write_audio, "wb")
        self._queues = {}
        self._threads = []
        for name, stream in (("video", self._proc.stdin if video else None), ("audio", self._audio)):
            if stream is None:
                continue
            import queue

            q = queue.Queue()
            t = threading.Thread(target=self._pump, args=(q, stream), daemon=True)
            t.start()
            self._queues[name], self._threads = q, self._threads + [t]

    @staticmethod
    def _pump(q, stream):
        broken = False
        for data in _queue_iter(q):
            if not broken:
                try:
                    stream.write(data)
                    stream.flush()
                except (BrokenPipeError, ValueError):
                    broken = True
        with contextlib.suppress(BrokenPipeError, ValueError):
            stream.close()

    def add(self, frames=None, audio=None) -> None:
        if frames is not None and len(frames) and "video" in self._queues:
            self._queues["video"].put(memoryview(np.ascontiguousarray(frames, dtype=np.uint8)).cast("B"))
        if audio is not None and len(audio):
            samples = np.ascontiguousarray(np.asarray(audio, dtype=np.float32))
            self._queues["audio"].put(memoryview(samples).cast("B"))

    def close(self) -> None:
        for q in self._queues.values():
            q.put(_END)
        for t in self._threads:
            t.join()
        rc = self._proc.wait()
        self._err.seek(0)
        err = self._err.read().decode("utf-8", errors="replace").strip()
        self._err.close()
        if rc != 0 and self.path == "-" and (rc == -signal.SIGPIPE or "Broken pipe" in err):
            self.reader_closed = True  # the reader of stdout left early (`| head`): not an error of ours
            return
        if rc != 0:
            raise OSError(f"{self.path}: ffmpeg failed to write the fragmented mp4 ({err or rc})")

    def abort(self) -> None:
        self._proc.kill()
        for q in self._queues.values():
            q.put(_END)
        for t in self._threads:
            t.join()
        self._proc.wait()
        self._err.close()


def mp4_fragment_ends(path) -> list:
    """Byte offsets at which a fragmented mp4 can be cut and still play: after the moov, after each moof+mdat."""
    data = Path(path).read_bytes()
    ends, pos = [], 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        if size == 1:
            size = int.from_bytes(data[pos + 8:pos + 16], "big")
        if size < 8 or pos + size > len(data):
            break
        pos += size
        if kind in (b"moov", b"mdat"):
            ends.append(pos)
    return ends


# ---------------------------------------------------------------------------------------------
# probing


def mp4_top_level_boxes(path) -> list[str]:
    """Types of the top-level ISO-BMFF boxes in file order (e.g. ['ftyp', 'moov', 'mdat'])."""
    boxes = []
    size_total = os.path.getsize(path)
    with open(path, "rb") as f:
        pos = 0
        while pos + 8 <= size_total:
            f.seek(pos)
            header = f.read(16)
            size = int.from_bytes(header[:4], "big")
            kind = header[4:8].decode("latin-1")
            if size == 1:
                size = int.from_bytes(header[8:16], "big")
            elif size == 0:
                size = size_total - pos
            if size < 8 or not kind.isprintable():
                break
            boxes.append(kind)
            pos += size
    return boxes


def _stream_timing(path) -> dict:
    """Exact packet-level timing: video packets (stream copy) and decoded audio frames."""
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error",
           "-i", str(Path(path).resolve()), "-map", "0:V:0?", "-map", "0:a:0?",
           "-c:v", "copy", "-f", "framecrc", "pipe:1"]
    res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True)
    if res.returncode != 0:
        err = res.stderr.decode("utf-8", errors="replace").strip()
        raise ValueError(f"{path}: cannot read streams ({err})")
    timebase, media, spans = {}, {}, {}
    for line in res.stdout.decode("utf-8", errors="replace").splitlines():
        if line.startswith("#tb "):
            idx, tb = line[4:].split(":")
            timebase[int(idx)] = Fraction(tb.strip())
        elif line.startswith("#media_type "):
            idx, kind = line[12:].split(":")
            media[int(idx)] = kind.strip()
        elif line and not line.startswith("#"):
            idx, _dts, pts, dur = (int(v) for v in line.split(",")[:4])
            count, start, end = spans.get(idx, (0, pts, pts + dur))
            spans[idx] = (count + 1, min(start, pts), max(end, pts + dur))
    out = {}
    for idx, (count, start, end) in spans.items():
        out[media.get(idx)] = dict(count=count, duration=float((end - start) * timebase[idx]))
    return out


def probe(path) -> dict:
    """Facts of a media file from the ffmpeg binary alone.

    Keys: video_codec, pix_fmt, width, height, fps, n_frames (video packets), video_duration
    (first frame start to last frame end, s), audio_codec, audio_sample_rate, audio_duration
    (decoded samples, encoder delay excluded, s), duration (container, s), faststart (mp4/mov:
    moov before mdat; None for other containers). Fields of an absent stream are None.
    """
    info = media_info(path)
    if info["video"] is None and info["audio"] is None:
        raise ValueError(f"{path}: no audio or video stream")
    timing = _stream_timing(path)
    video, audio = info["video"] or {}, info["audio"] or {}
    vt, at = timing.get("video"), timing.get("audio")
    boxes = mp4_top_level_boxes(path)
    faststart = None
    if "moov" in boxes and "mdat" in boxes:
        faststart = boxes.index("moov") < boxes.index("mdat")
    return dict(
        video_codec=video.get("codec"), pix_fmt=video.get("pix_fmt"),
        width=video.get("width"), height=video.get("height"), fps=video.get("fps"),
        n_frames=vt["count"] if vt else (0 if info["video"] else None),
        video_duration=vt["duration"] if vt else (0.0 if info["video"] else None),
        audio_codec=audio.get("codec"), audio_sample_rate=audio.get("sample_rate"),
        audio_duration=at["duration"] if at else (0.0 if info["audio"] else None),
        duration=info["duration"], faststart=faststart,
    )
