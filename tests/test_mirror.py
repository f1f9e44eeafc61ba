"""The mirror pass runs only for the faces whose one-pass margin is below
IPDFER_MIRROR_MARGIN (model/nets/mirror.py): those get exactly the full mirror
average, the others exactly their one-pass probabilities, and the two ends of
the setting are "every face" and "none". Its accuracy on all of FER2013:
benchmarks/precision_accuracy.py --precisions fp32@1,fp32."""
import numpy as np
import pydantic
import pytest
import torch
from PIL import Image

from model import faces as facelib
from model.nets import mirror
from model.serving.analyzer import Analyzer, ImageRequest
from service.settings import Settings
from tests.data_samples import astronaut_face_crops


@pytest.fixture(scope="module")
def faces():
    """48 greyscale 48 x 48 crops of a real face (the astronaut), every other one
    with the smile hidden or undone (unsure faces), aligned as the service aligns
    aligned=true."""
    crops = [c for pair in zip(astronaut_face_crops(24), astronaut_face_crops(24, mouth_hidden=True)) for c in pair]
    images = [np.asarray(Image.fromarray(c).convert("RGB")) for c in crops]
    analyzer = Analyzer.load(device="cpu", precision="fp32", runtime="torch")
    aligned = [fs[0].aligned for fs in analyzer.pipeline.process(images, aligned=True, max_faces=[1] * 48)]
    return images, aligned


@pytest.fixture(scope="module", params=["torch", "onnxruntime"])
def analyzer(request):
    return Analyzer.load(device="cpu", precision="fp32", runtime=request.param)


def full_average(analyzer, aligned):
    """Written out here, not through mirror.py: the face's and its mirror image's
    probabilities, averaged."""
    x = facelib.to_model_input(np.stack(aligned))
    with torch.inference_mode():
        face, flipped = analyzer.model.encode(x), analyzer.model.encode(x.flip(3))
    return {**face, "probs": (face["probs"] + flipped["probs"]) / 2}


def test_margin_one_is_the_full_mirror_average_and_zero_is_one_pass(analyzer, faces):
    _, aligned = faces
    want = full_average(analyzer, aligned)
    every, none = analyzer._encode(aligned, 1.0), analyzer._encode(aligned, 0.0)
    torch.testing.assert_close(every["probs"], want["probs"], atol=1e-4, rtol=1e-4)
    assert bool(every["mirrored"].all()) and not bool(none["mirrored"].any())
    with torch.inference_mode():
        torch.testing.assert_close(none["probs"], analyzer.model.encode(facelib.to_model_input(np.stack(aligned)))
                                   ["probs"], atol=1e-4, rtol=1e-4)
    for key in ("logits", "pose", "exp", "pose_feat"):   # the face's own, mirrored or not
        torch.testing.assert_close(every[key], none[key], atol=1e-5, rtol=1e-5, msg=key)


def test_only_the_unsure_faces_get_the_mirror_average(analyzer, faces):
    _, aligned = faces
    margin = 0.3
    one_pass, every = analyzer._encode(aligned, 0.0), analyzer._encode(aligned, 1.0)
    gated = analyzer._encode(aligned, margin)
    top2 = one_pass["probs"].topk(2, dim=1).values
    expected = top2[:, 0] - top2[:, 1] < margin
    assert torch.equal(gated["mirrored"], expected)
    assert 0 < int(expected.sum()) < len(aligned)   # these real faces exercise both branches
    torch.testing.assert_close(gated["probs"][expected], every["probs"][expected], atol=1e-5, rtol=1e-5)
    assert torch.equal(gated["probs"][~expected], one_pass["probs"][~expected])
    # and the mirror pass did change the unsure faces' probabilities
    assert float((gated["probs"][expected] - one_pass["probs"][expected]).abs().max()) > 1e-3


def test_the_served_default_mirrors_some_faces_not_all(faces):
    images, _ = faces
    analyzer = Analyzer.load(device="cpu")
    assert analyzer.plan.mirror_margin == mirror.DEFAULT_MARGIN == Settings(redis_url=None).mirror_margin
    assert analyzer.info["mirror_margin"] == mirror.DEFAULT_MARGIN
    crops = lambda batch: [ImageRequest(image, aligned=True, max_faces=1) for image in batch]  # noqa: E731
    analysis = analyzer.analyze(crops(images))
    assert all(len(r.faces) == 1 for r in analysis.images)
    assert 0 < analysis.mirrored < 48, analysis.mirrored
    # the same faces one at a time: the gate is per face, not per batch
    singles = sum(analyzer.analyze(crops([image])).mirrored for image in images[:12])
    assert singles == analyzer.analyze(crops(images[:12])).mirrored


def test_without_the_mirror_pass_the_margin_is_moot(faces):
    images, _ = faces
    analyzer = Analyzer.load(device="cpu", flip_tta=False, mirror_margin=1.0)
    assert analyzer.plan.mirror_margin == 0.0
    assert analyzer.analyze([ImageRequest(image, aligned=True, max_faces=1) for image in images[:8]]).mirrored == 0


def test_a_margin_outside_zero_to_one_is_refused(monkeypatch):
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="outside"):
            mirror.check_margin(bad)
        with pytest.raises(ValueError, match="outside"):
            Analyzer.load(device="cpu", mirror_margin=bad)
    monkeypatch.setenv("IPDFER_MIRROR_MARGIN", "2")
    with pytest.raises(pydantic.ValidationError, match="mirror_margin"):
        Settings(redis_url=None)
    monkeypatch.setenv("IPDFER_MIRROR_MARGIN", "1")
    assert Settings(redis_url=None).mirror_margin == 1.0
