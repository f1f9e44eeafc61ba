"""model/training/code_map.py: a new expression encoder keeps the shipped renderer.
The neutral render must not move at all (a zero code stays zero); the expression
input must carry what the old encoder's code carried, as far as the new one can."""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import torch

from model.nets.networks import IPDFER
from model.training import code_map
from model.weights import load_weights
from tests.data_samples import astronaut_face_crops


def faces(n: int) -> np.ndarray:
    return np.stack([cv2.resize(c, (64, 64), interpolation=cv2.INTER_AREA)
                     for c in astronaut_face_crops(n, size=64)])


def renderer_copy(old: IPDFER, cfg) -> IPDFER:
    """A model of `cfg` holding `old`'s weights except its code layers and, where
    the shapes differ, its expression encoder and head."""
    new = IPDFER(cfg)
    own = new.state_dict()
    code = code_map.code_weight_keys(old)
    new.load_state_dict({k: v for k, v in old.state_dict().items()
                         if k not in code and k in own and own[k].shape == v.shape}, strict=False)
    return new


def renders(model: IPDFER, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    inp = code_map.to_input(x)
    with torch.inference_mode():
        enc = model.encode(inp)
        identity = torch.randn(len(x), model.cfg.id_dim, generator=torch.Generator().manual_seed(0))
        return (model.render(identity, enc["pose_feat"], None, inp),
                model.render(identity, enc["pose_feat"], enc["exp"], inp))


def test_the_same_encoder_maps_onto_itself():
    old = load_weights().model.eval()
    new = renderer_copy(old, old.cfg)
    x = faces(48)
    report = code_map.carry_renderer(old, new, x, x)
    assert report["r2_code"] > 0.99 and min(report["r2_renderer_input"]) > 0.99
    (n_old, r_old), (n_new, r_new) = renders(old, x), renders(new, x)
    assert (n_old - n_new).abs().max() < 1e-5
    assert (r_old - r_new).abs().max() < 0.05


def test_another_encoder_leaves_the_neutral_render_unchanged_and_reports_its_fit():
    old = load_weights().model.eval()
    cfg = dataclasses.replace(old.cfg, exp_backbone="resnet", exp_dim=32, exp_input_size=0)
    new = renderer_copy(old, cfg)
    x = faces(64)
    report = code_map.carry_renderer(old, new, x[:48], x[48:])
    for layer in code_map.code_layers(new):
        assert layer.in_features == cfg.id_dim + cfg.pose_dim + 32
    (n_old, r_old), (n_new, r_new) = renders(old, x), renders(new, x)
    # the same sum less its zero terms: equal up to float rounding
    assert (n_old - n_new).abs().max() < 1e-5, "a zero expression code must still render the old neutral face"
    assert not torch.equal(r_new, n_new), "the expression input must reach the render"
    # an untrained 32-d encoder cannot carry a 1,280-d code: the report must say so
    assert report["r2_code"] < 0.9 and len(report["r2_renderer_input"]) == len(code_map.code_layers(old))
