"""S3FD face detector, as the SyncNet pipeline runs it.

Reproduces joonson/syncnet_python at commit 6efbb1c305c23f47a62b09cf4215a8ac45e97d49 (2020-03-29):
detectors/s3fd/nets.py (S3FDNet), detectors/s3fd/box_utils.py (PriorBox, Detect, nms_) and
detectors/s3fd/__init__.py (S3FD.detect_faces), including its cv2.resize(INTER_LINEAR) downscale, which is
re-implemented here bit-exactly for uint8 images (no OpenCV).

    image (H, W, 3) uint8 RGB -> resize by `scale` (cv2 INTER_LINEAR, fixed point)
      -> float32 CHW minus (123, 117, 104) per R, G, B (no scaling to [0, 1])
      -> VGG16 (+ L2Norm on conv3_3/4_3/5_3) + fc6/fc7 + two extra stride-2 blocks = 6 sources
      -> 3x3 loc / conf heads per source (max-out background on level 0) -> (B, P, 4), (B, P, 2)
      -> softmax -> decode against the priors -> greedy NMS 0.3 -> (B, 2, 750, 5) detections
      -> rows with score > conf_th, scaled to pixels -> numpy NMS 0.1 -> (K, 5) x1, y1, x2, y2, score

State-dict names and shapes are those of the released sfd_face.pth (65 entries), so `load_s3fd(path)` loads it
with strict=True.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.safe_load import key_report, safe_torch_load

# preprocessing: the reference subtracts (104, 117, 123) "BGR" means from channels that end up RGB-ordered
MEAN_RGB = (123.0, 117.0, 104.0)

# VGG16 trunk of S3FDNet.vgg: conv widths, "M" max-pool 2x2, "C" the same with ceil_mode
VGG_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "C", 512, 512, 512, "M", 512, 512, 512, "M")
FC6_DILATION = 6
FC7_DIM = 1024
L2NORM_INIT = (10.0, 8.0, 5.0)  # constructor values only; the checkpoint holds the learnt scales
L2NORM_EPS = 1e-10
# indices into `vgg` after which conv3_3, conv4_3, conv5_3 (each after its ReLU) are taken
CONV3_3_END, CONV4_3_END, CONV5_3_END = 16, 23, 30
EXTRAS = ((FC7_DIM, 256, 1, 1), (256, 512, 3, 2), (512, 128, 1, 1), (128, 256, 3, 2))  # (in, out, k, stride)
SOURCE_DIMS = (256, 512, 512, FC7_DIM, 512, 256)
CONF0_DIM = 4  # level 0 predicts 3 background logits + 1 face logit

# priors and box decoding (PriorBox / Detect defaults)
STEPS = (4, 8, 16, 32, 64, 128)
MIN_SIZES = (16, 32, 64, 128, 256, 512)
VARIANCE = (0.1, 0.2)
CONF_THRESH = 0.05
NMS_THRESH = 0.3
NMS_TOP_K = 5000
TOP_K = 750
N_CLASSES = 2

# detect_faces
FACE_NMS_THRESH = 0.1

# cv2 INTER_LINEAR for uint8: weights in 11-bit fixed point, two passes (horizontal, then vertical)
INTER_RESIZE_COEF_BITS = 11
INTER_RESIZE_COEF_SCALE = 1 << INTER_RESIZE_COEF_BITS


# ---------------------------------------------------------------------------------------------
# cv2.resize(..., interpolation=INTER_LINEAR) for uint8 images


def _linear_taps(dst_len: int, src_len: int, scale: float, clamp_weights: bool):
    """Source index of the left/top tap and the two 11-bit weights of every output position, as
    cv::resize builds them: float32 position (d + 0.5) * scale - 0.5, weights rounded half to even."""
    pos = ((np.arange(dst_len) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(pos).astype(np.int64)
    frac = pos - first.astype(np.float32)
    if clamp_weights:  # horizontal taps outside the image become a single edge tap
        outside = (first < 0) | (first >= src_len - 1)
        frac[outside] = 0
        first = np.clip(first, 0, src_len - 1)
    w0 = np.rint((np.float32(1) - frac) * np.float32(INTER_RESIZE_COEF_SCALE)).astype(np.int64)
    w1 = np.rint(frac * np.float32(INTER_RESIZE_COEF_SCALE)).astype(np.int64)
    return first, w0, w1


def _area_2x(image_hwc: np.ndarray, dst_h: int, dst_w: int) -> np.ndarray:
    """cv2's INTER_AREA fast path, which INTER_LINEAR takes for an exact 2x downscale: whole 2x2 blocks give
    (sum + 2) >> 2, blocks cut by an odd edge give round-half-even(sum / count)."""
    src_h, src_w, channels = image_hwc.shape
    hh, ww = min(src_h, 2 * dst_h), min(src_w, 2 * dst_w)
    padded = np.zeros((2 * dst_h, 2 * dst_w, channels), np.int64)
    padded[:hh, :ww] = image_hwc[:hh, :ww]
    inside = np.zeros((2 * dst_h, 2 * dst_w), np.int64)
    inside[:hh, :ww] = 1
    sums = padded.reshape(dst_h, 2, dst_w, 2, channels).sum(axis=(1, 3))
    counts = inside.reshape(dst_h, 2, dst_w, 2).sum(axis=(1, 3))[:, :, None]
    partial = np.rint(sums.astype(np.float32) / counts.astype(np.float32)).astype(np.int64)
    return np.where(counts == 4, (sums + 2) >> 2, partial)


def resize_linear(image: np.ndarray, size=None, fx: float = 0.0, fy: float = 0.0) -> np.ndarray:
    """cv2.resize(image, size, fx=fx, fy=fy, interpolation=cv2.INTER_LINEAR) for a uint8 (H, W) or (H, W, C)
    image; `size` is (width, height) as in cv2, or None to take round(W * fx) x round(H * fy).

    Bit-exact with opencv-python-headless 5.1.0.95 on x86-64 (checked on random images against cv2 itself):
    taps at (d + 0.5) * scale - 0.5 in float32, weights rint(w * 2048), an exact integer horizontal pass, and
    a vertical pass in OpenCV's 16-bit SIMD form ((h >> 4) * w >> 16 per tap, then (sum + 2) >> 2) that is
    not always the exactly rounded (h0 * w0 + h1 * w1 + 2^21) >> 22."""
    if image.dtype != np.uint8:
        raise TypeError(f"resize_linear takes uint8 images, got {image.dtype}")
    squeeze = image.ndim == 2
    image_hwc = image[:, :, None] if squeeze else image
    src_h, src_w, channels = image_hwc.shape
    if size is None or tuple(size) == (0, 0):
        dst_w, dst_h = round(src_w * fx), round(src_h * fy)  # cv2's saturate_cast: half to even
        inv_scale_x, inv_scale_y = fx, fy
    else:
        dst_w, dst_h = int(size[0]), int(size[1])
        inv_scale_x, inv_scale_y = dst_w / src_w, dst_h / src_h
    if dst_w <= 0 or dst_h <= 0:
        raise ValueError(f"resize_linear: empty output size {dst_w}x{dst_h} for a {src_w}x{src_h} image")
    scale_x, scale_y = 1.0 / inv_scale_x, 1.0 / inv_scale_y

    if scale_x == 2.0 and scale_y == 2.0:
        out = _area_2x(image_hwc, dst_h, dst_w)
    else:
        x0, ax0, ax1 = _linear_taps(dst_w, src_w, scale_x, clamp_weights=True)
        y0, by0, by1 = _linear_taps(dst_h, src_h, scale_y, clamp_weights=False)
        x1 = np.minimum(x0 + 1, src_w - 1)
        # horizontal pass, only on the source rows the vertical pass reads
        rows = np.unique(np.clip(np.concatenate([y0, y0 + 1]), 0, src_h - 1))
        src = image_hwc[rows].astype(np.int64)
        horiz = src[:, x0] * ax0[None, :, None] + src[:, x1] * ax1[None, :, None]  # (rows, dst_w, C)
        row_of = np.zeros(src_h, np.int64)
        row_of[rows] = np.arange(len(rows))
        top = horiz[row_of[np.clip(y0, 0, src_h - 1)]]
        bottom = horiz[row_of[np.clip(y0 + 1, 0, src_h - 1)]]
        b0, b1 = by0[:, None, None], by1[:, None, None]
        out = (((top >> 4) * b0) >> 16) + (((bottom >> 4) * b1) >> 16) + 2 >> 2
    out = np.clip(out, 0, 255).astype(np.uint8)
    return out[:, :, 0] if squeeze else out


def preprocess(image_rgb_u8: np.ndarray, scale: float) -> torch.Tensor:
    """(1, 3, h, w) float32 network input: the image resized by `scale`, minus the per-channel means."""
    resized_hw3 = resize_linear(image_rgb_u8, fx=scale, fy=scale)
    x_3hw = torch.from_numpy(np.ascontiguousarray(resized_hw3.transpose(2, 0, 1))).float()
    return (x_3hw - torch.tensor(MEAN_RGB).view(3, 1, 1)).unsqueeze(0)


# ---------------------------------------------------------------------------------------------
# network


class L2Norm(nn.Module):
    """x / (||x||_2 over channels + 1e-10), times a learnt per-channel scale."""

    def __init__(self, channels: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), scale))

    def forward(self, x_bchw):
        norm_b1hw = x_bchw.pow(2).sum(dim=1, keepdim=True).sqrt() + L2NORM_EPS
        return self.weight.view(1, -1, 1, 1) * (x_bchw / norm_b1hw)


def _vgg_layers() -> list:
    layers, in_dim = [], 3
    for item in VGG_LAYOUT:
        if item in ("M", "C"):
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=item == "C"))
        else:
            layers += [nn.Conv2d(in_dim, item, 3, padding=1), nn.ReLU(inplace=True)]
            in_dim = item
    layers += [nn.Conv2d(in_dim, FC7_DIM, 3, padding=FC6_DILATION, dilation=FC6_DILATION), nn.ReLU(inplace=True),
               nn.Conv2d(FC7_DIM, FC7_DIM, 1), nn.ReLU(inplace=True)]
    return layers


class S3FD(nn.Module):
    """S3FDNet without its Detect step: forward(image_b3hw) -> (loc_bp4, conf_logits_bp2)."""

    def __init__(self):
        super().__init__()
        self.vgg = nn.ModuleList(_vgg_layers())
        self.L2Norm3_3 = L2Norm(256, L2NORM_INIT[0])
        self.L2Norm4_3 = L2Norm(512, L2NORM_INIT[1])
        self.L2Norm5_3 = L2Norm(512, L2NORM_INIT[2])
        self.extras = nn.ModuleList(
            nn.Conv2d(i, o, k, stride=s, padding=k // 2) for i, o, k, s in EXTRAS)
        self.loc = nn.ModuleList(nn.Conv2d(d, 4, 3, padding=1) for d in SOURCE_DIMS)
        self.conf = nn.ModuleList(
            nn.Conv2d(d, CONF0_DIM if level == 0 else N_CLASSES, 3, padding=1)
            for level, d in enumerate(SOURCE_DIMS))

    def sources(self, x_b3hw) -> list:
        """The six feature maps the heads read: conv3_3/4_3/5_3 (L2-normalised), fc7, conv6_2, conv7_2."""
        x = x_b3hw
        out = []
        for start, end, norm in ((0, CONV3_3_END, self.L2Norm3_3), (CONV3_3_END, CONV4_3_END, self.L2Norm4_3),
                                 (CONV4_3_END, CONV5_3_END, self.L2Norm5_3)):
            for layer in self.vgg[start:end]:
                x = layer(x)
            out.append(norm(x))
        for layer in self.vgg[CONV5_3_END:]:
            x = layer(x)
        out.append(x)
        for k, conv in enumerate(self.extras):
            x = F.relu(conv(x))
            if k % 2 == 1:
                out.append(x)
        return out

    def heads(self, sources) -> tuple:
        """(loc (B, P, 4), conf logits (B, P, 2)): the head outputs flattened level by level, cells row-major."""
        batch = sources[0].shape[0]
        locs, confs = [], []
        for level, x in enumerate(sources):
            conf_bchw = self.conf[level](x)
            if level == 0:  # max-out background: the largest of 3 background logits vs the face logit
                background = conf_bchw[:, :CONF0_DIM - 1].max(dim=1, keepdim=True).values
                conf_bchw = torch.cat([background, conf_bchw[:, CONF0_DIM - 1:]], dim=1)
            locs.append(self.loc[level](x).permute(0, 2, 3, 1).reshape(batch, -1))
            confs.append(conf_bchw.permute(0, 2, 3, 1).reshape(batch, -1))
        return torch.cat(locs, 1).view(batch, -1, 4), torch.cat(confs, 1).view(batch, -1, N_CLASSES)

    def forward(self, x_b3hw):
        return self.heads(self.sources(x_b3hw))


def load_s3fd(path, device="cpu") -> S3FD:
    """S3FD in eval mode with the weights of sfd_face.pth (a plain state dict read with
    torch.load(weights_only=True); .safetensors also accepted), loaded strictly. FileNotFoundError when
    missing; a one-line ValueError naming the file when it is not that state dict."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: file not found")
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except Exception as err:
            raise ValueError(f"{path}: not a loadable S3FD checkpoint ({type(err).__name__}: {err})") from None
    else:
        state = safe_torch_load(path, "S3FD checkpoint")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: not an S3FD state dict (expected a flat dict of tensors, "
                         f"got {type(state).__name__})")
    with torch.device("meta"):  # names and shapes only; the loaded tensors become the parameters
        model = S3FD()
    expected = {k: v.shape for k, v in model.state_dict().items()}
    report = key_report(expected, {k: v.shape for k, v in state.items()})
    if not report.ok():
        raise ValueError(f"{path}: {report.message('S3FD')}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return model.requires_grad_(False).eval().to(device)


# ---------------------------------------------------------------------------------------------
# priors, decoding, NMS


def feature_map_sizes(height: int, width: int) -> list:
    """(h, w) of the six sources for a (height, width) input."""
    h, w = height // 4, width // 4  # two floor max-pools: conv3_3
    sizes = [(h, w)]
    h, w = -(-h // 2), -(-w // 2)  # ceil-mode pool: conv4_3
    sizes.append((h, w))
    for _ in range(2):  # conv5_3, fc7 (the dilated fc6 keeps the size)
        h, w = h // 2, w // 2
        sizes.append((h, w))
    for _ in range(2):  # conv6_2, conv7_2: 3x3 stride 2 padding 1
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        sizes.append((h, w))
    return sizes


def priors(height: int, width: int) -> torch.Tensor:
    """(P, 4) float32 prior boxes (cx, cy, w, h) relative to the input, level by level, cells row-major;
    computed in float64 as PriorBox does (centres use the input size / step, not the map size)."""
    per_level = []
    for (fh, fw), step, size in zip(feature_map_sizes(height, width), STEPS, MIN_SIZES):
        i, j = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
        cx = (j.ravel() + 0.5) / (width / step)
        cy = (i.ravel() + 0.5) / (height / step)
        per_level.append(np.stack([cx, cy, np.full_like(cx, size / width), np.full_like(cy, size / height)], 1))
    return torch.from_numpy(np.concatenate(per_level)).float()


def decode(loc_p4: torch.Tensor, priors_p4: torch.Tensor) -> torch.Tensor:
    """(P, 4) corner boxes (x1, y1, x2, y2) in [0, 1] units from offsets against the priors."""
    centers = priors_p4[:, :2] + loc_p4[:, :2] * VARIANCE[0] * priors_p4[:, 2:]
    sizes = priors_p4[:, 2:] * torch.exp(loc_p4[:, 2:] * VARIANCE[1])
    top_left = centers - sizes / 2
    return torch.cat([top_left, top_left + sizes], 1)


def greedy_nms(boxes_n4: torch.Tensor, scores_n: torch.Tensor, threshold: float, top_k: int) -> torch.Tensor:
    """Indices kept by box_utils.nms: the `top_k` best by an (unstable) ascending torch.sort, taken from the
    end; a box is dropped when its IoU with a kept one is > threshold (IoU = inter / ((area - inter) + area_kept))."""
    x1, y1, x2, y2 = boxes_n4.unbind(1)
    area = (x2 - x1) * (y2 - y1)
    order = scores_n.sort(0).indices[-top_k:]
    keep = []
    while order.numel() > 0:
        best = order[-1]
        keep.append(best)
        order = order[:-1]
        if order.numel() == 0:
            break
        w = (torch.minimum(x2[order], x2[best]) - torch.maximum(x1[order], x1[best])).clamp(min=0.0)
        h = (torch.minimum(y2[order], y2[best]) - torch.maximum(y1[order], y1[best])).clamp(min=0.0)
        inter = w * h
        iou = inter / ((area[order] - inter) + area[best])
        order = order[iou.le(threshold)]
    return torch.stack(keep) if keep else torch.zeros(0, dtype=torch.long)


def detect(loc_bp4: torch.Tensor, conf_bp2: torch.Tensor, priors_p4: torch.Tensor) -> torch.Tensor:
    """box_utils.Detect: (B, 2, 750, 5) rows (score, x1, y1, x2, y2) of the boxes kept for the face class,
    best first, zero-filled; class 0 stays all zeros. `conf_bp2` are softmax probabilities."""
    batch = loc_bp4.shape[0]
    out = torch.zeros(batch, N_CLASSES, TOP_K, 5)
    for b in range(batch):
        boxes_p4 = decode(loc_bp4[b], priors_p4)
        for cls in range(1, N_CLASSES):
            candidate = conf_bp2[b, :, cls].gt(CONF_THRESH)
            scores, boxes = conf_bp2[b, candidate, cls], boxes_p4[candidate]
            keep = greedy_nms(boxes, scores, NMS_THRESH, NMS_TOP_K)[:TOP_K]
            out[b, cls, :len(keep)] = torch.cat([scores[keep, None], boxes[keep]], 1)
    return out


def nms(rows_k5: np.ndarray, threshold: float) -> np.ndarray:
    """box_utils.nms_ (numpy, float64 rows x1, y1, x2, y2, score): indices kept, in processing order. The order
    is argsort(score) reversed (numpy's default, unstable sort); boxes with IoU <= threshold survive."""
    x1, y1, x2, y2, score = (rows_k5[:, i] for i in range(5))
    area = (x2 - x1) * (y2 - y1)
    order = score.argsort()[::-1]
    keep = []
    while order.size > 0:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        w = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]))
        h = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]))
        inter = w * h
        iou = inter / (area[best] + area[rest] - inter)
        order = rest[iou <= threshold]
    return np.array(keep, dtype=np.intp)


def detections_to_boxes(detections_2k5: torch.Tensor, width: int, height: int, conf_th: float) -> np.ndarray:
    """(K, 5) float64 rows (x1, y1, x2, y2, score) in pixels of a (width, height) image: per class, the leading
    rows with score > conf_th (the reference stops at the first one that is not; it has no bound check and
    would fail if all 750 rows passed, here they are all taken). The pixel boxes are float32 products."""
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    rows = []
    for det_k5 in detections_2k5:
        n = int((det_k5[:, 0] > conf_th).int().cumprod(0).sum())
        boxes = det_k5[:n, 1:] * scale
        rows.append(torch.cat([boxes, det_k5[:n, :1]], 1).double().numpy())
    return np.concatenate(rows).reshape(-1, 5)


@torch.no_grad()
def detect_faces_batch(net: S3FD, images_rgb_u8, conf_th: float = 0.9, scales=(0.25,)) -> list:
    """detect_faces for several images of one size, the network batched over them: a list of (K, 5) arrays."""
    images = [np.asarray(img) for img in images_rgb_u8]
    if not images:
        return []
    height, width = images[0].shape[:2]
    if any(img.shape != images[0].shape or img.dtype != np.uint8 or img.ndim != 3 for img in images):
        raise ValueError("detect_faces: images must be uint8 (H, W, 3) arrays of one size")
    param = next(net.parameters())
    rows = [[] for _ in images]
    for scale in scales:
        x_b3hw = torch.cat([preprocess(img, scale) for img in images])
        loc, conf_logits = net(x_b3hw.to(param.device, param.dtype))
        prior_boxes = priors(*x_b3hw.shape[2:])
        if prior_boxes.shape[0] != loc.shape[1]:
            raise ValueError(f"detect_faces: {height}x{width} scaled by {scale} is too small for S3FD")
        detections = detect(loc.float().cpu(), conf_logits.float().cpu().softmax(-1), prior_boxes)
        for n, det in enumerate(detections):
            rows[n].append(detections_to_boxes(det, width, height, conf_th))
    out = []
    for per_scale in rows:
        boxes_k5 = np.concatenate(per_scale)
        out.append(boxes_k5[nms(boxes_k5, FACE_NMS_THRESH)])
    return out


def detect_faces(net: S3FD, image_rgb_u8: np.ndarray, conf_th: float = 0.9, scales=(0.25,)) -> np.ndarray:
    """S3FD.detect_faces: (K, 5) float64 rows (x1, y1, x2, y2, score) in pixels of the uint8 RGB image, after
    the 0.1 NMS over all scales. run_pipeline uses conf_th=0.9, scales=[0.25]."""
    return detect_faces_batch(net, [image_rgb_u8], conf_th, scales)[0]
