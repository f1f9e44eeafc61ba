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
(model/faces/mtcnn_onnx.py), else in PyTorch channels-last (`channels_last`, `TorchNets`): this CPU
build's max pooling is 3-10x slower on NCHW tensors, which made pooling 40% of a
detection; a 224 px photo went from 44 to 30 ms on one thread. The pyramid and
the crops are resampled from summed-area tables (`AreaResampler`) instead of one
`interpolate` per crop: batches of eight 224 px photos went from 11.5 to 7.2 ms
an image, 1 thread (AVX-512); landmarks within 1e-4 px of the per-crop code's.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
from facenet_pytorch.models.utils.detect_face import (
    batched_nms, batched_nms_numpy, bbreg, generateBoundingBox, pad, rerec,
)


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


def _best_per_image(scores: torch.Tensor, image_inds: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k best scores of each image (all of them below k)."""
    keep = []
    for i in image_inds.unique():
        idx = (image_inds == i).nonzero().flatten()
        keep.append(idx[scores[idx].argsort(descending=True)[:k]] if len(idx) > k else idx)
    return torch.cat(keep).sort().values if keep else image_inds.new_zeros(0)


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
        self.flat, self.shape = table.reshape(-1), (b, h, w)
        self.channels, self.row, self.image = c, (w + 1) * c, (h + 1) * (w + 1) * c

    def __call__(self, inds: np.ndarray, y0: np.ndarray, y1: np.ndarray, x0: np.ndarray, x1: np.ndarray,
                 size: tuple[int, int]) -> np.ndarray:
        """(K, size_h, size_w, C) float32: rectangle k = image inds[k], rows y0:y1, columns x0:x1."""
        ylo, yhi = _windows(y0, y1 - y0, size[0])
        xlo, xhi = _windows(x0, x1 - x0, size[1])
        base = (inds * self.image)[:, None]
        top, bottom = (base + ylo * self.row)[:, :, None, None], (base + yhi * self.row)[:, :, None, None]
        channel = np.arange(self.channels)
        left, right = (xlo * self.channels)[:, None, :, None] + channel, (xhi * self.channels)[:, None, :, None] + channel
        t = self.flat
        total = t.take(bottom + right) - t.take(top + right) - t.take(bottom + left) + t.take(top + left)
        count = ((yhi - ylo)[:, :, None] * (xhi - xlo)[:, None, :]).astype(np.float32)
        return total.astype(np.float32) / count[..., None]

    def whole(self, size: tuple[int, int]) -> np.ndarray:
        """Every image resampled to `size` (the detection pyramid)."""
        n, h, w = self.shape
        zero = np.zeros(n, np.int64)
        return self(np.arange(n), zero, np.full(n, h), zero, np.full(n, w), size)


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
    it, AVX-512). model/faces/mtcnn_onnx.py's `OnnxNets` is the same in ONNX Runtime."""

    runtime = "torch"

    def __init__(self, mtcnn) -> None:
        self.mtcnn = mtcnn

    def __call__(self, net: str, pixels: np.ndarray) -> tuple[torch.Tensor, ...]:
        return getattr(self.mtcnn, net)(torch.from_numpy(pixels).permute(0, 3, 1, 2).to(self.mtcnn.device))


def _with_pixels(boxes: torch.Tensor, image_inds: torch.Tensor, w: int, h: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The boxes that overlap their image. facenet-pytorch crops only those and then
    fails, its networks' outputs no longer lining up with its boxes."""
    y, ey, x, ex = pad(boxes, w, h)
    keep = torch.from_numpy((ey > y - 1) & (ex > x - 1)).to(boxes.device)
    return boxes[keep], image_inds[keep]


def _crops(sampler: AreaResampler, boxes: torch.Tensor, image_inds: torch.Tensor, w: int, h: int,
           size: int) -> np.ndarray:
    """The network input for each box (all overlapping the image: `_with_pixels`), cut
    as facenet-pytorch cuts it: the box clamped to the image, resampled to size²."""
    y, ey, x, ex = pad(boxes, w, h)
    return _normalised(sampler(image_inds.cpu().numpy(), y - 1, ey, x - 1, ex, (size, size)))


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
        b, ii = generateBoundingBox(reg, probs[:, 1], scale, threshold[0])
        boxes.append(b)
        image_inds.append(ii)
        levels.append(torch.full_like(ii, level))
    boxes, image_inds = torch.cat(boxes), torch.cat(image_inds)
    # facenet-pytorch's NMS per level and image, in one call: (image, level) pairs as
    # categories (the same picks; only exactly tied scores may come out in another order)
    pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds * len(scales) + torch.cat(levels), 0.5)
    boxes, image_inds = boxes[pick], image_inds[pick]
    pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
    boxes, image_inds = boxes[pick], image_inds[pick]
    keep = _best_per_image(boxes[:, 4], image_inds, max_candidates)
    boxes, image_inds = boxes[keep], image_inds[keep]
    regw, regh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    boxes = rerec(torch.stack([boxes[:, 0] + boxes[:, 5] * regw, boxes[:, 1] + boxes[:, 6] * regh,
                               boxes[:, 2] + boxes[:, 7] * regw, boxes[:, 3] + boxes[:, 8] * regh,
                               boxes[:, 4]], dim=1))

    # 2. R-Net refines the candidates
    boxes, image_inds = _with_pixels(boxes, image_inds, w, h)
    if len(boxes):
        reg, probs = nets("rnet", _crops(sampler, boxes, image_inds, w, h, 24))
        score = probs[:, 1]
        ok = score > threshold[1]
        boxes, image_inds, reg = torch.cat((boxes[ok, :4], score[ok, None]), 1), image_inds[ok], reg[ok]
        pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
        pick = pick[_best_per_image(boxes[pick, 4], image_inds[pick], max_refine)]
        boxes = rerec(bbreg(boxes[pick], reg[pick]))
        image_inds = image_inds[pick]

    # 3. O-Net: final boxes, scores and the five landmarks
    points = torch.zeros(0, 5, 2)
    boxes, image_inds = _with_pixels(boxes, image_inds, w, h)
    if len(boxes):
        reg, pts, probs = nets("onet", _crops(sampler, boxes, image_inds, w, h, 48))
        score = probs[:, 1]
        ok = score > threshold[2]
        boxes, image_inds, reg, pts = (torch.cat((boxes[ok, :4], score[ok, None]), 1), image_inds[ok],
                                       reg[ok], pts[ok])
        bw, bh = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
        points = torch.stack((bw[:, None] * pts[:, :5] + boxes[:, :1] - 1,
                              bh[:, None] * pts[:, 5:] + boxes[:, 1:2] - 1), dim=2)
        boxes = bbreg(boxes, reg)
        pick = batched_nms_numpy(boxes[:, :4], boxes[:, 4], image_inds, 0.7, "Min")
        boxes, image_inds, points = boxes[pick], image_inds[pick], points[pick]

    boxes, points, image_inds = boxes.cpu().numpy(), points.cpu().numpy(), image_inds.cpu().numpy()
    return [(boxes[image_inds == i], points[image_inds == i]) for i in range(n)]
