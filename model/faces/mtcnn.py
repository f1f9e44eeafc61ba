"""MTCNN's three stages with a bound on the work per image.

facenet-pytorch's `detect_face` sends every candidate of the first stage through
the second and third networks, cropping them one at a time in Python: a photo
tiled with 840 small faces made ~8,000 second-stage and ~3,800 third-stage crops,
about a minute on 2 CPU cores. Here each image keeps only its best
`max_candidates` first-stage and `max_refine` second-stage candidates (by score,
after the same non-maximum suppression), so a crowded photo costs about what a
photo with that many faces costs. Below the bounds the result is facenet-pytorch's
exactly: same networks, thresholds, crops and suppression (a test compares them).

The networks run channels-last after their first layer (`channels_last`): this
CPU build's max pooling is 3-10x slower on NCHW tensors, which made pooling 40%
of a detection; a 224 px photo went from 44 to 30 ms on one thread.
"""
from __future__ import annotations

import numpy as np
import torch
from facenet_pytorch.models.utils.detect_face import (
    batched_nms, batched_nms_numpy, bbreg, generateBoundingBox, imresample, pad, rerec,
)


class _ChannelsLastPool(torch.nn.MaxPool2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous(memory_format=torch.channels_last))


def channels_last(mtcnn) -> None:
    """Switch MTCNN's three networks to channels-last at their first pooling
    (P-Net's first PReLU has 10 channels and is faster NCHW; the layers after a
    channels-last pooling keep its layout). Same weights, same results."""
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


def _crops(imgs: torch.Tensor, boxes: torch.Tensor, image_inds: torch.Tensor, w: int, h: int,
           size: int) -> torch.Tensor:
    y, ey, x, ex = pad(boxes, w, h)
    out = [imresample(imgs[image_inds[k], :, (y[k] - 1):ey[k], (x[k] - 1):ex[k]].unsqueeze(0), (size, size))
           for k in range(len(y)) if ey[k] > (y[k] - 1) and ex[k] > (x[k] - 1)]
    return (torch.cat(out, dim=0) - 127.5) * 0.0078125


def detect_faces(images: np.ndarray, mtcnn, max_candidates: int = 400, max_refine: int = 100
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(boxes (n, 5) = x1, y1, x2, y2, score; landmarks (n, 5, 2)) per image of the
    same-size uint8 batch `images` (B, H, W, 3), with `mtcnn`'s networks and settings."""
    pnet, rnet, onet, threshold = mtcnn.pnet, mtcnn.rnet, mtcnn.onet, mtcnn.thresholds
    # contiguous NCHW: crops of a channels-last view pool ~30x slower on the CPU
    imgs = torch.as_tensor(images, device=mtcnn.device).permute(0, 3, 1, 2).float().contiguous()
    n, h, w = len(imgs), imgs.shape[2], imgs.shape[3]

    # 1. P-Net over the scale pyramid; NMS per scale, then per image
    m = 12.0 / mtcnn.min_face_size
    scales, minl = [], min(h, w) * m
    while minl >= 12:
        scales.append(m * mtcnn.factor ** len(scales))
        minl *= mtcnn.factor
    boxes, image_inds = [], []
    for scale in scales:
        data = (imresample(imgs, (int(h * scale + 1), int(w * scale + 1))) - 127.5) * 0.0078125
        reg, probs = pnet(data)
        b, ii = generateBoundingBox(reg, probs[:, 1], scale, threshold[0])
        pick = batched_nms(b[:, :4], b[:, 4], ii, 0.5)
        boxes.append(b[pick])
        image_inds.append(ii[pick])
    boxes, image_inds = torch.cat(boxes), torch.cat(image_inds)
    pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
    boxes, image_inds = boxes[pick], image_inds[pick]
    keep = _best_per_image(boxes[:, 4], image_inds, max_candidates)
    boxes, image_inds = boxes[keep], image_inds[keep]
    regw, regh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    boxes = rerec(torch.stack([boxes[:, 0] + boxes[:, 5] * regw, boxes[:, 1] + boxes[:, 6] * regh,
                               boxes[:, 2] + boxes[:, 7] * regw, boxes[:, 3] + boxes[:, 8] * regh,
                               boxes[:, 4]], dim=1))

    # 2. R-Net refines the candidates
    if len(boxes):
        reg, probs = rnet(_crops(imgs, boxes, image_inds, w, h, 24))
        score = probs[:, 1]
        ok = score > threshold[1]
        boxes, image_inds, reg = torch.cat((boxes[ok, :4], score[ok, None]), 1), image_inds[ok], reg[ok]
        pick = batched_nms(boxes[:, :4], boxes[:, 4], image_inds, 0.7)
        pick = pick[_best_per_image(boxes[pick, 4], image_inds[pick], max_refine)]
        boxes = rerec(bbreg(boxes[pick], reg[pick]))
        image_inds = image_inds[pick]

    # 3. O-Net: final boxes, scores and the five landmarks
    points = torch.zeros(0, 5, 2)
    if len(boxes):
        reg, pts, probs = onet(_crops(imgs, boxes, image_inds, w, h, 48))
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
