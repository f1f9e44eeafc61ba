"""MTCNN's three stages with a bound on the work per image.

facenet-pytorch's `detect_face` sends every candidate of the first stage through
the second and third networks, cropping them one at a time in Python: a photo
tiled with 840 small faces made ~8,000 second-stage and ~3,800 third-stage crops,
about a minute on 2 CPU cores. Here each image keeps only its best
`max_candidates` first-stage and `max_refine` second-stage candidates (by score,
after the same non-maximum suppression), so a crowded photo costs about what a
photo with that many faces costs. Below the bounds the result is facenet-pytorch's
exactly: same networks, thresholds, crops and suppression (a test compares them).

The networks run in ONNX Runtime on the CPU when their exported graphs are there
(model/serving/mtcnn_onnx.py), else in PyTorch channels-last (`channels_last`, `TorchNets`): this CPU
build's max pooling is 3-10x slower on NCHW tensors, which made pooling 40% of a
detection; a 224 px photo went from 44 to 30 ms on one thread. The pyramid and
the crops are resampled from summed-area tables (`AreaResampler`) instead of one
`interpolate` per crop: batches of eight 224 px photos went from 11.5 to 7.2 ms
an image, 1 thread (AVX-512); landmarks within 1e-4 px of the per-crop code's.
The steps between the networks run in NumPy rather than torch (same float32
arithmetic, bit-identical boxes on 2,560 detection calls): a lone 224 px photo
7.9 -> 6.5 ms, batches of eight 6.2 -> 5.6 ms an image, 1 thread (AMX Xeon).
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
from facenet_pytorch.models.utils.detect_face import nms_numpy
from torchvision.ops.boxes import batched_nms


class _ChannelsLastPool(torch.nn.MaxPool2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous(memory_format=torch.channels_last))


def channels_last(mtcnn) -> None:
    """Keep MTCNN's three networks channels-last from their first pooling on, whatever
    their input's layout (the layers after a channels-last pooling keep its layout).
    Same weights, same results."""
    for net in (mtcnn.pnet, mtcnn.rnet, mtcnn.onet):
        old = net.pool1
        if not isinstance(old, _ChannelsLastPool):
            net.pool1 = _ChannelsLastPool(old.kernel_size, old.stride, old.padding, old.dilation,
                                          old.return_indices, old.ceil_mode)


def _best_per_image(scores: np.ndarray, image_inds: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best scores of each image (all of them below k), in order."""
    keep = []
    for i in np.unique(image_inds):
        idx = np.flatnonzero(image_inds == i)
        keep.append(idx[np.argsort(-scores[idx], kind="stable")[:k]] if len(idx) > k else idx)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


class AreaResampler:
    """torch's "area" interpolation, which facenet-pytorch resamples with (adaptive
    average pooling: output pixel i of n averages input pixels [floor(i*L/n),
    ceil((i+1)*L/n))), of any rectangles of a uint8 batch, from one summed-area table
    per image: integer sums, so the same means to float rounding (1 ulp), at a cost
    that does not grow with the rectangle. One gather for all of a stage's crops
    replaces one `interpolate` per crop, which read every pixel of its region: crops
    and pyramid took ~35% of a detection."""

    def __init__(self, images: np.ndarray) -> None:  # (B, H, W, C) uint8
        b, h, w, c = images.shape
        table = np.empty((b, h + 1, w + 1, c), np.int32)
        for i, image in enumerate(images):
            table[i] = cv2.integral(image).reshape(h + 1, w + 1, c)  # 2-D for one channel
        # one row of C sums per table entry: a gather fetches a pixel's channels together
        self.table, self.pixels, self.shape = table, table.reshape(-1, c), (b, h, w)
        self.row, self.image = w + 1, (h + 1) * (w + 1)

    def __call__(self, inds: np.ndarray, y0: np.ndarray, y1: np.ndarray, x0: np.ndarray, x1: np.ndarray,
                 size: tuple[int, int]) -> np.ndarray:
        """(K, size_h, size_w, C) float32: rectangle k = image inds[k], rows y0:y1, columns x0:x1."""
        ylo, yhi = _windows(y0, y1 - y0, size[0])
        xlo, xhi = _windows(x0, x1 - x0, size[1])
        base = (inds * self.image)[:, None]
        top, bottom = (base + ylo * self.row)[:, :, None], (base + yhi * self.row)[:, :, None]
        left, right = xlo[:, None, :], xhi[:, None, :]
        t = self.pixels
        total = (t.take(bottom + right, axis=0) - t.take(top + right, axis=0)
                 - t.take(bottom + left, axis=0) + t.take(top + left, axis=0))
        count = ((yhi - ylo)[:, :, None] * (xhi - xlo)[:, None, :]).astype(np.float32)
        return total.astype(np.float32) / count[..., None]

    def whole(self, size: tuple[int, int]) -> np.ndarray:
        """Every image resampled to `size` (the detection pyramid). The windows are the
        same for every image, so the table's rows are taken whole, then its columns:
        the same integer sums as `__call__`, for a lone 224 px photo's six levels in
        0.30 instead of 0.48 ms."""
        n, h, w = self.shape
        (ylo, yhi), (xlo, xhi) = (_windows(np.zeros(1, np.int64), np.array([length]), s)
                                  for length, s in ((h, size[0]), (w, size[1])))
        rows = self.table.take(yhi[0], axis=1) - self.table.take(ylo[0], axis=1)
        total = rows.take(xhi[0], axis=2) - rows.take(xlo[0], axis=2)
        count = ((yhi - ylo)[0, :, None] * (xhi - xlo)[0, None, :]).astype(np.float32)
        return total.astype(np.float32) / count[..., None]


def _windows(start: np.ndarray, length: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Adaptive pooling's windows [lo, hi) per rectangle (rows) and output pixel (columns)."""
    i = np.arange(size)
    length = length[:, None]
    return start[:, None] + (i * length) // size, start[:, None] - ((-(i + 1) * length) // size)


def _normalised(pixels: np.ndarray) -> np.ndarray:
    """(K, h, w, 3) float32 pixel means -> MTCNN's input values, in place."""
    pixels -= 127.5
    pixels *= 0.0078125
    return pixels


class TorchNets:
    """`nets(name, pixels)`: MTCNN's network `name` in PyTorch on (K, h, w, 3) normalised
    pixels, given to it channels-last in memory (R-Net and O-Net run 20-30% faster on
    it, AVX-512); its outputs as NumPy arrays. model/serving/mtcnn_onnx.py's `OnnxNets`
    is the same in ONNX Runtime."""

    runtime = "torch"

    def __init__(self, mtcnn) -> None:
        self.mtcnn = mtcnn

    def __call__(self, net: str, pixels: np.ndarray) -> tuple[np.ndarray, ...]:
        out = getattr(self.mtcnn, net)(torch.from_numpy(pixels).permute(0, 3, 1, 2).to(self.mtcnn.device))
        return tuple(o.cpu().numpy() for o in out)


# The steps between the networks are facenet-pytorch's (detect_face.py: generateBoundingBox,
# rerec, bbreg, pad, its NMS calls) in NumPy, with the same float32 arithmetic in the same
# order, so the same boxes; its torch versions cost ~30 small tensor operations an image
# and pyramid level, about as much as the networks for a lone photo.

def _pnet_boxes(reg: np.ndarray, probs: np.ndarray, scale: float, threshold: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """P-Net's cells over `threshold` as boxes (x1, y1, x2, y2, score, 4 offsets) in the
    image's pixels, and their image indices (generateBoundingBox: stride 2, 12 px cells)."""
    image_inds, ys, xs = np.nonzero(probs >= threshold)
    cells = np.stack((xs, ys), 1).astype(np.float32)
    scale = np.float32(scale)
    return np.concatenate((np.floor((2 * cells + 1) / scale), np.floor((2 * cells + 12) / scale),
                           probs[image_inds, ys, xs][:, None], reg[image_inds, :, ys, xs]), 1), image_inds


def _squared(boxes: np.ndarray) -> np.ndarray:
    """Boxes grown to squares about their centres (rerec), in place."""
    h, w = boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]
    side = np.maximum(w, h)
    boxes[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    boxes[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    boxes[:, 2:4] = boxes[:, :2] + side[:, None]
    return boxes


def _regressed(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """Boxes moved by a network's offsets (bbreg), in place."""
    w, h = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
    boxes[:, :4] = np.stack((boxes[:, 0] + reg[:, 0] * w, boxes[:, 1] + reg[:, 1] * h,
                             boxes[:, 2] + reg[:, 2] * w, boxes[:, 3] + reg[:, 3] * h), 1)
    return boxes


def _clamped(boxes: np.ndarray, w: int, h: int) -> tuple[np.ndarray, ...]:
    """(y, ey, x, ex): the boxes' 1-based pixel bounds cut to the image (pad)."""
    b = np.trunc(boxes[:, :4]).astype(np.int32)
    return np.maximum(b[:, 1], 1), np.minimum(b[:, 3], h), np.maximum(b[:, 0], 1), np.minimum(b[:, 2], w)


def _nms(boxes: np.ndarray, groups: np.ndarray, threshold: float) -> np.ndarray:
    """torchvision's batched NMS (facenet-pytorch's) within each group: kept indices."""
    return batched_nms(torch.from_numpy(boxes[:, :4]), torch.from_numpy(boxes[:, 4]),
                       torch.from_numpy(groups), threshold).numpy()


def _with_pixels(boxes: np.ndarray, image_inds: np.ndarray, w: int, h: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The boxes that overlap their image. facenet-pytorch crops only those and then
    fails, its networks' outputs no longer lining up with its boxes."""
    y, ey, x, ex = _clamped(boxes, w, h)
    keep = (ey > y - 1) & (ex > x - 1)
    return boxes[keep], image_inds[keep]


def _crops(sampler: AreaResampler, boxes: np.ndarray, image_inds: np.ndarray, w: int, h: int,
           size: int) -> np.ndarray:
    """The network input for each box (all overlapping the image: `_with_pixels`), cut
    as facenet-pytorch cuts it: the box clamped to the image, resampled to size²."""
    y, ey, x, ex = _clamped(boxes, w, h)
    return _normalised(sampler(image_inds, y - 1, ey, x - 1, ex, (size, size)))


def detect_faces(images: np.ndarray, mtcnn, max_candidates: int = 400, max_refine: int = 100,
                 nets=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(boxes (n, 5) = x1, y1, x2, y2, score; landmarks (n, 5, 2)) per image of the
    same-size uint8 batch `images` (B, H, W, 3), with `mtcnn`'s settings and networks,
    run by `nets` (default: `TorchNets(mtcnn)`)."""
    threshold = mtcnn.thresholds
    nets = nets or TorchNets(mtcnn)
    n, h, w = images.shape[:3]
    sampler = AreaResampler(np.ascontiguousarray(images))

    # 1. P-Net over the scale pyramid; NMS per scale, then per image
    m = 12.0 / mtcnn.min_face_size
    scales, minl = [], min(h, w) * m
    while minl >= 12:
        scales.append(m * mtcnn.factor ** len(scales))
        minl *= mtcnn.factor
    boxes, image_inds, levels = [], [], []
    for level, scale in enumerate(scales):
        reg, probs = nets("pnet", _normalised(sampler.whole((int(h * scale + 1), int(w * scale + 1)))))
        b, ii = _pnet_boxes(reg, probs[:, 1], scale, threshold[0])
        boxes.append(b)
        image_inds.append(ii)
        levels.append(np.full_like(ii, level))
    boxes, image_inds = np.concatenate(boxes), np.concatenate(image_inds)
    # facenet-pytorch's NMS per level and image, in one call: (image, level) pairs as
    # groups (the same picks; only exactly tied scores may come out in another order)
    pick = _nms(boxes, image_inds * len(scales) + np.concatenate(levels), 0.5)
    boxes, image_inds = boxes[pick], image_inds[pick]
    pick = _nms(boxes, image_inds, 0.7)
    boxes, image_inds = boxes[pick], image_inds[pick]
    keep = _best_per_image(boxes[:, 4], image_inds, max_candidates)
    boxes, image_inds = boxes[keep], image_inds[keep]
    regw, regh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    boxes = _squared(np.stack((boxes[:, 0] + boxes[:, 5] * regw, boxes[:, 1] + boxes[:, 6] * regh,
                               boxes[:, 2] + boxes[:, 7] * regw, boxes[:, 3] + boxes[:, 8] * regh,
                               boxes[:, 4]), 1))

    # 2. R-Net refines the candidates
    boxes, image_inds = _with_pixels(boxes, image_inds, w, h)
    if len(boxes):
        reg, probs = nets("rnet", _crops(sampler, boxes, image_inds, w, h, 24))
        score = probs[:, 1]
        ok = score > threshold[1]
        boxes, image_inds, reg = np.concatenate((boxes[ok, :4], score[ok, None]), 1), image_inds[ok], reg[ok]
        pick = _nms(boxes, image_inds, 0.7)
        pick = pick[_best_per_image(boxes[pick, 4], image_inds[pick], max_refine)]
        boxes = _squared(_regressed(boxes[pick], reg[pick]))
        image_inds = image_inds[pick]

    # 3. O-Net: final boxes, scores and the five landmarks
    points = np.zeros((0, 5, 2), np.float32)
    boxes, image_inds = _with_pixels(boxes, image_inds, w, h)
    if len(boxes):
        reg, pts, probs = nets("onet", _crops(sampler, boxes, image_inds, w, h, 48))
        score = probs[:, 1]
        ok = score > threshold[2]
        boxes, image_inds, reg, pts = (np.concatenate((boxes[ok, :4], score[ok, None]), 1), image_inds[ok],
                                       reg[ok], pts[ok])
        bw, bh = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
        points = np.stack((bw[:, None] * pts[:, :5] + boxes[:, :1] - 1,
                           bh[:, None] * pts[:, 5:] + boxes[:, 1:2] - 1), 2)
        boxes = _regressed(boxes, reg)
        if len(boxes):  # facenet-pytorch's "Min" suppression within each image (batched_nms_numpy:
            # images set apart by an offset past the largest coordinate)
            offsets = image_inds.astype(np.float32) * (boxes[:, :4].max() + 1)
            pick = nms_numpy(boxes[:, :4] + offsets[:, None], boxes[:, 4], 0.7, "Min")
            boxes, image_inds, points = boxes[pick], image_inds[pick], points[pick]

    return [(boxes[image_inds == i], points[image_inds == i]) for i in range(n)]
