"""`ipdfer train-expression`: a run cut in two equals the uncut run (parameters,
EMA, optimiser), a resumed run refuses another recipe, and the augmentation is
a function of the step alone. Faces are made by the test (no data sets needed)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from model.training.expression import Augment, Batches, Faces, Recipe, augment_batch, predict, train


def synthetic_faces(n: int = 24, seed: int = 0) -> Faces:
    """Grey 64 px 'faces': an ellipse with eyes and a mouth whose shape is the label."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, 64, 64), np.uint8)
    labels = np.arange(n) % 7
    for i, c in enumerate(labels):
        img = np.full((64, 64), rng.integers(20, 60), np.uint8)
        cv2.ellipse(img, (32, 32), (22, 28), 0, 0, 360, int(rng.integers(150, 220)), -1)
        cv2.circle(img, (24, 26), 3, 40, -1), cv2.circle(img, (40, 26), 3, 40, -1)
        cv2.ellipse(img, (32, 46), (4 + int(c), 1 + int(c) // 2), 0, 0, 360, 30, -1)
        images[i] = img
    return Faces(labels=labels.astype(np.int64), aligned=images, raw=images[:, :, ::-1].copy(), names=["synthetic"])


def tiny_recipe(**changes) -> Recipe:
    return dataclasses.replace(Recipe(input_size=32, epochs=2, batch_size=8, log_every=1,
                                      checkpoint_minutes=1e9), **changes)


def test_run_cut_in_two_equals_uncut_run(tmp_path):
    faces, recipe = synthetic_faces(), tiny_recipe()
    val = {"synthetic": (faces.aligned, faces.labels)}
    whole = train(recipe, Batches(faces, recipe), tmp_path / "whole", val, quiet=True)
    train(recipe, Batches(faces, recipe), tmp_path / "cut", val, stop_after=4, quiet=True)
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["step"] == 4
    resumed = train(recipe, Batches(faces, recipe), tmp_path / "cut", val, quiet=True)
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for part in ("net", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    assert a["sched"]["last_epoch"] == b["sched"]["last_epoch"]
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k])
    # the same validation rows (epochs 1 and 2) in both runs
    assert (tmp_path / "whole" / "val.jsonl").read_text() == (tmp_path / "cut" / "val.jsonl").read_text()


def test_training_moves_the_network(tmp_path):
    faces, recipe = synthetic_faces(), tiny_recipe(epochs=1)
    train(recipe, Batches(faces, recipe), tmp_path / "run", {}, quiet=True)
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    start = train(tiny_recipe(epochs=1), Batches(faces, recipe), tmp_path / "other", {}, stop_after=0, quiet=True)
    moved = [k for k, v in start.state_dict().items()
             if v.is_floating_point() and not torch.equal(v, ckpt["net"][k])]
    assert "exp_head.1.weight" in moved


def test_resume_refuses_another_recipe(tmp_path):
    faces, recipe = synthetic_faces(), tiny_recipe()
    train(recipe, Batches(faces, recipe), tmp_path / "run", {}, stop_after=2, quiet=True)
    other = tiny_recipe(lr=5e-4)
    with pytest.raises(ValueError, match="another recipe"):
        train(other, Batches(faces, other), tmp_path / "run", {}, quiet=True)


def test_augmentation_is_a_function_of_the_step():
    faces, recipe = synthetic_faces(), tiny_recipe()
    batches = Batches(faces, recipe)
    x1, y1, _ = batches(5)
    x2, y2, _ = Batches(faces, recipe)(5)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _, _ = batches(4)
    assert not torch.equal(x1, x3)
    assert x1.shape == (8, 1, 64, 64) and x1.min() >= -1 and x1.max() <= 1


def test_augmentation_changes_faces_but_keeps_them_faces():
    x = torch.from_numpy(synthetic_faces(8).aligned).unsqueeze(1).float() / 127.5 - 1
    out = augment_batch(x, Augment(), torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    diff = (out - x).abs().mean(dim=(1, 2, 3))
    assert (diff > 0.01).all(), "some faces were not augmented"
    # no augmentation at all: the identity (up to resampling)
    none = Augment(flip=0, rotate=0, scale=0, shift=0, low_res=0, jpeg=0, contrast=0, erase=0)
    same = augment_batch(x, none, torch.Generator().manual_seed(0))
    assert (same - x).abs().max() < 1e-4


def test_cutmix_pastes_a_box_of_other_faces_and_reports_its_share():
    from model.training.expression import cutmix
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 1, 16, 16).contiguous()
    y = torch.arange(4)
    for seed in range(20):
        mixed, ya, yb, share = cutmix(x, y, torch.Generator().manual_seed(seed))
        for i in range(4):
            own = (mixed[i] == x[i]).float().mean().item()
            if yb[i] != ya[i]:
                assert abs(own - share) < 1e-6     # the share is the face's own area
            assert set(mixed[i].unique().tolist()) <= {float(ya[i]), float(yb[i])}


def test_cutmix_run_is_exactly_resumable_too(tmp_path):
    faces, recipe = synthetic_faces(), tiny_recipe(cutmix=0.5)
    train(recipe, Batches(faces, recipe), tmp_path / "whole", {}, quiet=True)
    train(recipe, Batches(faces, recipe), tmp_path / "cut", {}, stop_after=3, quiet=True)
    train(recipe, Batches(faces, recipe), tmp_path / "cut", {}, quiet=True)
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)["net"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["net"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_balanced_sampling_draws_rare_groups_more_and_is_a_function_of_the_epoch():
    from model.training.expression import sampling_weights
    labels = np.array([0] * 90 + [1] * 10)
    faces = Faces(labels=labels, aligned=np.zeros((100, 64, 64), np.uint8), raw=None, names=["a"])
    assert sampling_weights(faces, 0.0) is None                   # a plain permutation
    w = sampling_weights(faces, 1.0)
    assert np.isclose(w[labels == 0].sum(), 0.5) and np.isclose(w[labels == 1].sum(), 0.5)
    w = sampling_weights(faces, 0.5)                              # square root: 0.75 / 0.25
    assert np.isclose(w[labels == 1].sum(), np.sqrt(10) / (np.sqrt(10) + np.sqrt(90)))
    # groups are (data set, class): the same class in a second data set is its own group
    two = dataclasses.replace(faces, source=np.array([0] * 80 + [1] * 20))
    w = sampling_weights(two, 1.0)
    assert np.isclose(w[two.source == 1].sum(), 2 / 3)            # (1,0) and (1,1) of three groups
    recipe = tiny_recipe(batch_size=10, balance=1.0)
    a, b = Batches(faces, recipe), Batches(faces, recipe)
    ya = torch.cat([a(k)[1] for k in range(10)])
    assert torch.equal(ya, torch.cat([b(k)[1] for k in range(10)]))   # exact resume: same draws
    assert 0.3 < float((ya == 1).float().mean()) < 0.7                # 10% of faces, ~half the draws
    plain = Batches(faces, tiny_recipe(batch_size=10))
    assert sorted(torch.cat([plain(k)[1] for k in range(10)]).tolist()) == sorted(labels.tolist())


def test_augment_option_changes_named_fields_only():
    import argparse

    from model.training.expression import parse_augment
    aug = parse_augment("rotate=10,low_res=0.1,erase_area=0.02:0.1")
    assert (aug.rotate, aug.low_res, aug.erase_area) == (10.0, 0.1, (0.02, 0.1))
    assert aug.jpeg == Augment().jpeg
    with pytest.raises(argparse.ArgumentTypeError, match="unknown augmentation"):
        parse_augment("rotation=10")


def test_distillation_pulls_the_student_towards_the_teachers(tmp_path):
    """A teacher that says class 3 for every face: a student trained on it alone
    (distill 1) gives class 3 more probability than one trained on the labels."""
    faces = synthetic_faces()
    faces.soft = np.zeros((2, len(faces), 7), np.float32)
    faces.soft[:, :, 3] = 1.0
    students = {}
    for distill in (0.0, 1.0):
        recipe = tiny_recipe(epochs=3, lr=1e-2, distill=distill, distill_temperature=1.0)
        net = train(recipe, Batches(faces, recipe), tmp_path / f"d{distill}", {}, quiet=True)
        students[distill] = predict(net, faces.aligned)[:, 3].mean()
    assert students[1.0] > students[0.0] + 0.2, students
    # the soft targets follow each face's view
    recipe = tiny_recipe()
    faces.soft[1, :, 3], faces.soft[1, :, 5] = 0.0, 1.0
    _, _, soft = Batches(faces, recipe)(0)
    assert soft is not None and soft.shape == (recipe.batch_size, 7) and set(soft.argmax(1).tolist()) <= {3, 5}


def test_distillation_needs_the_teachers_probabilities(tmp_path):
    faces, recipe = synthetic_faces(), tiny_recipe(distill=0.5)
    with pytest.raises(ValueError, match="teachers' probabilities"):
        train(recipe, Batches(faces, recipe), tmp_path / "run", {}, quiet=True)


def test_teacher_probabilities_are_the_served_ones_averaged_and_cached(tmp_path, monkeypatch):
    from model.training.evaluate import encode_all
    from model.training.expression import teacher_probs
    from model.weights import load_weights
    monkeypatch.setenv("IPDFER_CACHE", str(tmp_path))
    faces, weights = synthetic_faces(n=8), str(Path(__file__).resolve().parents[1] / "weights")
    soft = teacher_probs(faces, (weights, weights))
    model = load_weights(Path(weights)).model.eval()
    with torch.inference_mode():
        for v, images in enumerate(faces.views()):
            np.testing.assert_allclose(soft[v], encode_all(model, images, tta=True)["probs"], atol=1e-5)
    cached = list((tmp_path / "expression").glob("teachers_*.npy"))
    assert len(cached) == 1
    np.save(cached[0], np.zeros_like(soft))          # a second call reads the cache
    assert not teacher_probs(faces, (weights, weights)).any()
