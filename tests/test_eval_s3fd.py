"""S3FD (evaluation/s3fd.py) against ../shared/fixtures/eval/s3fd_forward (README_syncnet.md, section
s3fd_forward), and the SyncNet face track / crop (evaluation/face_crop.py) on small synthetic inputs."""
import subprocess

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from conftest import load_fixture, synth

from evaluation import face_crop, s3fd

# README_syncnet.md, "Tolerances for a float32 re-implementation", s3fd_forward:
# net_input and priors exact; conf_logits, conf and loc atol 1e-5; Detect and nms_ on the stored inputs exact;
# detections from one's own forward as a set with atol 1e-5 on boxes and scores, order free where scores
# differ by < 1e-6.
HEAD_ATOL = 1e-5
DETECTION_ATOL = 1e-5
TIE_GAP = 1e-6
# The stored deeper sources and the JSON's source statistics have no tolerance of their own in the README;
# they feed the heads, whose 1e-5 is used (their 1-vs-2-thread difference is <= 3.6e-7).
SOURCE_ATOL = 1e-5
SOURCE_NAMES = ("conv3_3_l2n", "conv4_3_l2n", "conv5_3_l2n", "fc7", "conv6_2", "conv7_2")


@pytest.fixture(scope="module")
def fixture():
    return load_fixture("eval", "s3fd_forward")


@pytest.fixture(scope="module")
def net():
    with torch.device("meta"):
        model = s3fd.S3FD()
    model.load_state_dict(synth().synth_state_dict(model), strict=True, assign=True)
    return model.eval()


def _scale(meta):
    return meta.get("config", {}).get("scale", meta.get("scale"))


def _conf_cases(meta):
    """(name, conf_th) of every detect_faces call the fixture recorded (output.bboxes_<name>)."""
    cases = [(k[len("conf_th_"):], v) for k, v in meta["config"].items() if k.startswith("conf_th_")]
    assert cases, "the fixture JSON lists no conf_th_* case"
    return cases


@pytest.fixture(scope="module")
def own_forward(fixture, net):
    tensors, meta = fixture
    x = s3fd.preprocess(tensors["input.image_rgb_u8"].numpy(), _scale(meta))
    with torch.no_grad():
        sources = net.sources(x)
        loc, conf_logits = net.heads(sources)
    return x, sources, loc, conf_logits


def _match_rows(actual, expected, box_atol, score_atol, score_col):
    """Rows of `expected` matched one-to-one by rows of `actual` within tolerance, order free; where the
    expected scores differ by more than TIE_GAP the order must also agree."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    box_cols = [c for c in range(actual.shape[1]) if c != score_col]
    free = list(range(len(actual)))
    position = []
    for row in expected:
        hit = [j for j in free if abs(actual[j, score_col] - row[score_col]) <= score_atol
               and np.abs(actual[j, box_cols] - row[box_cols]).max() <= box_atol]
        assert hit, f"expected row {row} not found"
        free.remove(hit[0])
        position.append(hit[0])
    scores = expected[:, score_col]
    for i in range(len(expected) - 1):
        if abs(scores[i] - scores[i + 1]) > TIE_GAP:
            assert position[i] < position[i + 1]
    return float(np.abs(actual[position] - expected).max()) if len(expected) else 0.0


# ---------------------------------------------------------------------------------------------
# fixture parity


def test_state_dict_matches_release_manifest(fixture):
    _, meta = fixture
    expected = {e["key"]: tuple(e["shape"]) for e in meta["state_dict_manifest"]}
    with torch.device("meta"):
        model = s3fd.S3FD()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert len(expected) == 65
    assert sum(p.numel() for p in model.parameters()) == meta["n_parameters"]


def test_net_input_and_priors_exact(fixture, own_forward):
    tensors, meta = fixture
    x = own_forward[0]
    assert torch.equal(x, tensors["inter.net_input"])
    height, width = x.shape[2:]
    assert [list(hw) for hw in s3fd.feature_map_sizes(height, width)] == meta["feature_maps_hw"]
    prior_boxes = s3fd.priors(height, width)
    assert prior_boxes.shape[0] == meta["n_priors"]
    assert torch.equal(prior_boxes, tensors["inter.priors"])


def test_forward_heads_and_sources(fixture, own_forward):
    tensors, meta = fixture
    _, sources, loc, conf_logits = own_forward
    errors = {"loc": loc, "conf_logits": conf_logits, "conf": conf_logits.softmax(-1)}
    for name, value in errors.items():
        expected = tensors[f"inter.{name}"]
        assert value.shape == expected.shape
        errors[name] = float((value - expected).abs().max())
        assert errors[name] <= HEAD_ATOL, (name, errors[name])
    for key in (k for k in tensors if k.startswith("inter.source.")):
        level = int(key.split(".")[-1].split("_")[0])
        assert float((sources[level] - tensors[key]).abs().max()) <= SOURCE_ATOL, key
    for level, name in enumerate(SOURCE_NAMES):
        stats, value = meta["source_stats"][name], sources[level].double()
        assert list(value.shape) == stats["shape"]
        for stat, got in (("mean", value.mean()), ("std", value.std()), ("min", value.min()), ("max", value.max())):
            assert abs(float(got) - stats[stat]) <= SOURCE_ATOL, (name, stat)


def test_detect_on_stored_inputs_is_exact(fixture):
    tensors, meta = fixture
    detections = s3fd.detect(tensors["inter.loc"], tensors["inter.conf"], tensors["inter.priors"])
    expected = tensors["output.detections"]
    # bit-exact on the CPU kind that made the fixture (AMD EPYC); torch's vectorised kernels round the box
    # decode differently by at most one float32 ulp on others (6.0e-8 in 6 of 7,500 values on an Intel Xeon)
    assert torch.equal(detections != 0, expected != 0)
    assert float((detections - expected).abs().max()) <= 1.2e-7
    assert int((detections[0, 1, :, 0] > 0).sum()) == meta["detect_result"]["n_kept_after_nms"]


def test_detect_on_own_forward(fixture, own_forward):
    tensors, _ = fixture
    x, _, loc, conf_logits = own_forward
    detections = s3fd.detect(loc, conf_logits.softmax(-1), s3fd.priors(*x.shape[2:]))
    expected = tensors["output.detections"]
    assert torch.equal(detections[:, 0], expected[:, 0])  # class 0 stays zero
    err = _match_rows(detections[0, 1].double().numpy(), expected[0, 1].double().numpy(),
                      DETECTION_ATOL, DETECTION_ATOL, score_col=0)
    assert err <= DETECTION_ATOL


def test_face_rows_and_nms_on_stored_inputs_are_exact(fixture):
    tensors, meta = fixture
    height, width = tensors["input.image_rgb_u8"].shape[:2]
    conf_th = meta["config"]["conf_th_low"]
    rows = s3fd.detections_to_boxes(tensors["output.detections"][0], width, height, conf_th)
    assert rows.dtype == np.float64
    assert np.array_equal(rows, tensors["inter.nms_input_low"].numpy())
    keep = s3fd.nms(tensors["inter.nms_input_low"].numpy(), s3fd.FACE_NMS_THRESH)
    assert keep.dtype == np.int64
    assert np.array_equal(keep, tensors["inter.nms_keep_low"].numpy())


def test_detect_faces_end_to_end(fixture, net):
    tensors, meta = fixture
    image = tensors["input.image_rgb_u8"].numpy()
    height, width = image.shape[:2]
    for name, conf_th in _conf_cases(meta):
        boxes = s3fd.detect_faces(net, image, conf_th=conf_th, scales=[_scale(meta)])
        expected = tensors[f"output.bboxes_conf_th_{name}"].numpy()
        assert boxes.dtype == np.float64
        assert boxes.shape == expected.shape, name
        # boxes are in pixels: the normalised-box tolerance times the image size
        _match_rows(boxes, expected, DETECTION_ATOL * max(height, width), DETECTION_ATOL, score_col=4)
        assert len(boxes) == meta["bboxes_counts"][name]


def test_load_s3fd(tmp_path, net):
    path = tmp_path / "sfd_face.pth"
    torch.save(net.state_dict(), path)
    loaded = s3fd.load_s3fd(path)
    assert not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))

    with pytest.raises(FileNotFoundError, match="missing.pth"):
        s3fd.load_s3fd(tmp_path / "missing.pth")
    bad = {k: v for k, v in net.state_dict().items() if not k.startswith("conf.5")}
    bad["loc.0.weight"] = torch.zeros(4, 256, 1, 1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as err:
        s3fd.load_s3fd(tmp_path / "bad.pth")
    message = str(err.value)
    assert "bad.pth" in message and "missing" in message and "wrong shape" in message and "\n" not in message
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        s3fd.load_s3fd(tmp_path / "junk.pth")


# ---------------------------------------------------------------------------------------------
# fixture-free properties


def test_resize_linear_properties():
    rng = np.random.default_rng(0)
    for (h, w, c), size in [((37, 53, 3), (224, 224)), ((300, 211, 3), (17, 90)), ((5, 9, 1), (4, 4))]:
        value = int(rng.integers(0, 256))
        out = s3fd.resize_linear(np.full((h, w, c), value, np.uint8), size)
        assert out.shape == (size[1], size[0], c) and (out == value).all()

    image = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    assert np.array_equal(s3fd.resize_linear(image, (48, 64)), image)  # same size: a copy
    # a 4x downscale samples the midpoint of pixels 4d+1 and 4d+2: the rounded mean of a 2x2 block
    quarter = s3fd.resize_linear(image, fx=0.25, fy=0.25)
    block = image.astype(int)[1::4][:, 1::4] + image.astype(int)[1::4][:, 2::4] \
        + image.astype(int)[2::4][:, 1::4] + image.astype(int)[2::4][:, 2::4]
    assert np.array_equal(quarter, (block + 2) >> 2)
    # a 2x downscale: the rounded mean of each 2x2 block (cv2 takes its INTER_AREA path)
    half = s3fd.resize_linear(image, fx=0.5, fy=0.5)
    sums = image.astype(int).reshape(32, 2, 24, 2, 3).sum(axis=(1, 3))
    assert np.array_equal(half, (sums + 2) >> 2)
    # upscaling a two-level step stays within the two levels and keeps the far ends
    step = np.zeros((4, 4), np.uint8)
    step[:, 2:] = 200
    up = s3fd.resize_linear(step, (16, 16))
    assert up.min() == 0 and up.max() == 200 and (up[:, 0] == 0).all() and (up[:, -1] == 200).all()
    assert (np.diff(up.astype(int), axis=1) >= 0).all()


def test_nms_on_hand_made_boxes():
    rows = np.array([[0, 0, 10, 10, 0.9],     # best
                     [1, 1, 11, 11, 0.8],     # IoU 0.68 with the best: dropped
                     [20, 20, 30, 30, 0.7],   # separate: kept
                     [9, 9, 19, 19, 0.95],    # IoU 1/199 with row 0, kept first
                     [0, 0, 10, 10.5, 0.1]])  # IoU 0.95 with row 0: dropped
    assert s3fd.nms(rows, 0.1).tolist() == [3, 0, 2]
    assert s3fd.nms(rows, 0.7).tolist() == [3, 0, 1, 2]
    assert s3fd.nms(np.zeros((0, 5)), 0.1).tolist() == []

    boxes = torch.tensor(rows[:, :4] / 40, dtype=torch.float32)
    scores = torch.tensor(rows[:, 4], dtype=torch.float32)
    assert s3fd.greedy_nms(boxes, scores, 0.3, 5000).tolist() == [3, 0, 2]
    assert s3fd.greedy_nms(boxes, scores, 0.3, 2).tolist() == [3, 0]  # only the top_k best are considered


def test_priors_and_decode():
    height, width = 96, 160
    prior_boxes = s3fd.priors(height, width)
    sizes = s3fd.feature_map_sizes(height, width)
    assert sizes[0] == (24, 40) and sizes[-1] == (1, 2)
    assert prior_boxes.shape == (sum(h * w for h, w in sizes), 4)
    assert torch.allclose(prior_boxes[0], torch.tensor([2 / width, 2 / height, 16 / width, 16 / height]))
    # zero offsets decode to the priors themselves
    boxes = s3fd.decode(torch.zeros_like(prior_boxes), prior_boxes)
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2
    assert torch.allclose(centers, prior_boxes[:, :2], atol=1e-6)
    assert torch.allclose(boxes[:, 2:] - boxes[:, :2], prior_boxes[:, 2:], atol=1e-6)


def test_batched_detection(net):
    images = np.random.default_rng(0).integers(0, 256, (2, 256, 384, 3), dtype=np.uint8)
    boxes = s3fd.detect_faces_batch(net, images, conf_th=0.5, scales=[0.25])  # one 2x3x64x96 forward
    assert len(boxes) == 2
    for rows in boxes:
        assert rows.dtype == np.float64 and rows.shape[1] == 5 and len(rows) > 1
        assert (rows[:, 4] > 0.5).all() and (rows[:, 2] > rows[:, 0]).all() and (rows[:, 3] > rows[:, 1]).all()
        assert (np.diff(rows[:, 4]) <= 0).all()  # kept in descending score
        x1, y1, x2, y2 = rows[:, :4].T
        inter = np.clip(np.minimum(x2[:, None], x2) - np.maximum(x1[:, None], x1), 0, None) \
            * np.clip(np.minimum(y2[:, None], y2) - np.maximum(y1[:, None], y1), 0, None)
        area = (x2 - x1) * (y2 - y1)
        iou = inter / (area[:, None] + area - inter)
        np.fill_diagonal(iou, 0)
        assert iou.max() <= s3fd.FACE_NMS_THRESH  # no two kept boxes overlap more than the final NMS allows


def _box(x, y, size):
    return [x, y, x + size, y + size, 0.99]


def test_face_tracks():
    # one face moving right for 30 frames, missing in frames 10-14, and a far-away face in frames 0-5
    frames = [[] for _ in range(30)]
    for t in range(30):
        if not 10 <= t < 15:
            frames[t].append(_box(20 + t, 30, 120))
    for t in range(6):
        frames[t].append(_box(400, 400, 150))
    tracks = face_crop.face_tracks([np.array(f) for f in frames], min_track=10, min_face_size=100)
    assert len(tracks) == 1  # the short one is dropped (6 detections <= min_track)
    track = tracks[0]
    assert track["frame"].tolist() == list(range(30))
    assert np.allclose(track["bbox"][12], [32, 30, 152, 150])  # interpolated over the gap
    # smaller than min_face_size, or with a gap longer than num_failed_det: no (single) track
    assert face_crop.face_tracks([np.array(f) for f in frames], min_track=10, min_face_size=200) == []
    split = face_crop.face_tracks([np.array(f) for f in frames], min_track=5, num_failed_det=3)
    assert [t["frame"][[0, -1]].tolist() for t in split] == [[0, 9], [0, 5], [15, 29]]
    assert face_crop.face_tracks([np.zeros((0, 5))] * 20, min_track=5) == []


def test_crop_face_padding_and_size():
    frame = np.full((100, 120, 3), 30, np.uint8)
    centered = face_crop.crop_face(frame, half_size=20, center_x=60, center_y=40)
    assert centered.shape == (224, 224, 3) and (centered == 30).all()  # the crop window lies inside the frame
    corner = face_crop.crop_face(frame, half_size=40, center_x=5, center_y=5)
    assert corner.shape == (224, 224, 3)
    assert (corner[:20, :20] == face_crop.PAD_VALUE).all() and (corner[-20:, -20:] == 30).all()


def _write_clip(path, n_frames, size=(96, 128), fps=25, audio=True):
    height, width = size
    y, x = np.mgrid[:height, :width]
    frames = np.stack([np.stack([(x * 2 + t * 3) % 256, (y * 2) % 256, np.full_like(x, 90)], -1)
                       for t in range(n_frames)]).astype(np.uint8)
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "pipe:0"]
    if audio:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=16000:duration={n_frames / fps}"]
    cmd += ["-c:v", "mpeg4", "-q:v", "2", "-pix_fmt", "yuv420p"] + (["-c:a", "pcm_s16le"] if audio else [])
    subprocess.run(cmd + [str(path)], input=frames.tobytes(), check=True)
    return frames


def _stream_info(path):
    res = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)],
                         capture_output=True, text=True)
    return res.stderr


def test_crop_face_track_on_synthetic_clip(tmp_path):
    video = tmp_path / "clip.avi"
    _write_clip(video, n_frames=20)
    box = np.array([[20.0, 10.0, 80.0, 70.0, 0.99]])
    calls = []

    def fake_detect(net, frames, conf_th, scales):
        calls.append((len(frames), conf_th, list(scales)))
        return [box for _ in frames]

    out = face_crop.crop_face_track(None, video, tmp_path / "crop.avi", min_track=8, min_face_size=30,
                                    detect=fake_detect, batch_size=8)
    assert out == tmp_path / "crop.avi" and out.exists()
    assert calls[0] == (8, face_crop.CONF_TH, [face_crop.FACEDET_SCALE]) and sum(c[0] for c in calls) == 20
    frames = list(face_crop.iter_frames(out))
    assert len(frames) == 20 and frames[0].shape == (224, 224, 3)
    # a constant box stays constant through the median filter: every frame is cropped by the same window
    expected = face_crop.crop_face(next(face_crop.iter_frames(video)), 30.0, 50.0, 40.0)
    assert np.abs(frames[0].astype(int) - expected).mean() < 4  # MPEG-4 q2 round trip
    info = _stream_info(out)
    assert "224x224" in info and "25 fps" in info and "16000 Hz" in info and "mono" in info
    assert "Duration: 00:00:00.80" in info  # 20 frames at 25 fps, and the audio of that span
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary left

    def no_face(net, frames, conf_th, scales):
        return [np.zeros((0, 5)) for _ in frames]

    with pytest.raises(ValueError, match="clip.avi: no face track found"):
        face_crop.crop_face_track(None, video, tmp_path / "none.avi", min_track=8, detect=no_face)
    assert not (tmp_path / "none.avi").exists()
    # too short for min_track: no track either
    with pytest.raises(ValueError, match="no face track found"):
        face_crop.crop_face_track(None, video, tmp_path / "none.avi", min_track=25, min_face_size=30,
                                  detect=fake_detect)

    silent = tmp_path / "silent.avi"
    _write_clip(silent, n_frames=5, audio=False)
    with pytest.raises(ValueError, match="silent.avi: no audio stream"):
        face_crop.crop_face_track(None, silent, tmp_path / "x.avi", detect=fake_detect)
    with pytest.raises(FileNotFoundError):
        face_crop.crop_face_track(None, tmp_path / "nowhere.avi", tmp_path / "x.avi", detect=fake_detect)


def test_the_detector_is_also_named_beside_syncnet():
    """As in the reference repository (detectors/s3fd beside SyncNetInstance): evaluation.syncnet names it."""
    from evaluation import s3fd, syncnet

    assert syncnet.S3FD is s3fd.S3FD and syncnet.detect_faces is s3fd.detect_faces
