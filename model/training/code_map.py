"""Keep a trained renderer when its expression encoder is replaced.

The renderer (G) reads the expression code through linear layers (the editor's
two FiLM layers; the painting decoder's fc and FiLMs) whose last `exp_dim`
input columns take the code. A new E_exp (another backbone, or the same one
trained again) speaks another code. Re-training G for every E_exp costs hours
on a CPU; instead a ridge map A (new code -> old code, no intercept) is fitted
on faces both encoders read, and folded into those columns: W_exp' = W_exp Aᵀ.

No intercept, so a zero code still means "no expression": the neutral render
G(x; id, pose) is exactly the old one, and only the reconstruction (the
residue heatmap) goes through the map. The map's R² on held-out faces, in the
space G reads (W_exp · code), says how much of the residue survives.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from model.nets.networks import IPDFER
from model.training.evaluate import to_input


def exp_codes(model: IPDFER, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """(N, exp_dim) expression codes of uint8 faces, in eval mode."""
    model.eval()
    with torch.inference_mode():
        return torch.cat([model.exp_encoder(to_input(images[s:s + batch])).float()
                          for s in range(0, len(images), batch)])


def fit_ridge(new: torch.Tensor, old: torch.Tensor, strength: float = 1e-3) -> torch.Tensor:
    """A (d_new, d_old) minimising |new A - old|² + λ|A|², λ = strength · mean eigenvalue."""
    gram = new.T.double() @ new.double()
    lam = strength * gram.trace() / gram.shape[0]
    eye = torch.eye(gram.shape[0], dtype=torch.float64)
    return torch.linalg.solve(gram + lam * eye, new.T.double() @ old.double()).float()


def named_code_layers(model: IPDFER) -> list[tuple[str, nn.Linear]]:
    """G's linear layers that read the concatenated (identity, pose, expression) code,
    with their names in the model's state_dict (e.g. "decoder.film1")."""
    width = model.cfg.id_dim + model.cfg.pose_dim + model.cfg.exp_dim
    return [(f"decoder.{name}", m) for name, m in model.decoder.named_modules()
            if isinstance(m, nn.Linear) and m.in_features == width]


def code_layers(model: IPDFER) -> list[nn.Linear]:
    return [m for _, m in named_code_layers(model)]


def code_weight_keys(model: IPDFER) -> set[str]:
    """The state_dict keys whose shape follows the expression code's size."""
    return {f"{name}.weight" for name, _ in named_code_layers(model)}


def r2(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Coefficient of determination over all output columns."""
    resid = ((target - pred) ** 2).sum()
    total = ((target - target.mean(0)) ** 2).sum()
    return float(1 - resid / total)


def carry_renderer(old: IPDFER, new: IPDFER, fit_faces: np.ndarray, check_faces: np.ndarray) -> dict:
    """Set `new`'s code layers from `old`'s through the fitted map; `new` must
    already hold old's renderer weights for the identity and pose columns (and
    anything for the expression columns). Returns what the manifest records."""
    keep = old.cfg.id_dim + old.cfg.pose_dim
    a = fit_ridge(exp_codes(new, fit_faces), exp_codes(old, fit_faces))
    old_check, new_check = exp_codes(old, check_faces), exp_codes(new, check_faces)
    scores = []
    with torch.no_grad():
        for src, dst in zip(code_layers(old), code_layers(new), strict=True):
            w_exp = src.weight[:, keep:]
            dst.weight.copy_(torch.cat([src.weight[:, :keep], w_exp @ a.T], dim=1))
            dst.bias.copy_(src.bias)
            scores.append(r2(new_check @ a @ w_exp.T, old_check @ w_exp.T))
    return {"method": "ridge map of the new expression code onto the renderer's (no intercept; "
                      "neutral renders unchanged)",
            "fit_faces": len(fit_faces), "check_faces": len(check_faces),
            "r2_code": round(r2(new_check @ a, old_check), 4),
            "r2_renderer_input": [round(s, 4) for s in scores]}
