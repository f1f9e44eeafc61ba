"""IPD-FER objectives as nn.Modules. `GeneratorObjective` computes every term
that trains the encoders, heads and decoder; the discriminator has its own
hinge loss. Terms and weights: model.config.LossWeights and docs/training.md (Losses)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from model import faces as facelib
from model.config import LossWeights
from model.labels import NEUTRAL
from model.nets.mirror import encode_with_mirror
from model.nets.networks import IPDFER


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def hinge_g_loss(fake: torch.Tensor) -> torch.Tensor:
    return -fake.mean()


class IdentityLoss(nn.Module):
    """||E_id(chip(render)) - E_id(chip(real))||^2 with the frozen dlib port.

    The aligned S×S crop and dlib's 150×150 chip are both fixed similarity
    frames of the same 5 points, so a fixed affine grid turns one into the
    other differentiably (the chip's wider margin is filled by the border)."""

    def __init__(self, identity_encoder: nn.Module, image_size: int, chip_size: int = 150,
                 padding: float = 0.25):
        super().__init__()
        self.encoder = identity_encoder
        # aligned-crop px -> chip px, exactly as facelib.dlib_chip cuts chips
        crop_to_chip = np.vstack([facelib.dlib_chip_transform(
            facelib.center_landmarks((image_size, image_size)), chip_size, padding), [0, 0, 1]])
        m = np.linalg.inv(crop_to_chip)  # chip px -> crop px
        # grid_sample works in [-1, 1] (align_corners=False): px = ((n + 1) * size - 1) / 2
        to_px = lambda size: np.array([[size / 2, 0, size / 2 - 0.5], [0, size / 2, size / 2 - 0.5], [0, 0, 1]])  # noqa: E731
        theta = np.linalg.inv(to_px(image_size)) @ m @ to_px(chip_size)
        self.register_buffer("theta", torch.tensor(theta[:2], dtype=torch.float32))
        self.chip_size = chip_size

    def chips(self, x: torch.Tensor) -> torch.Tensor:
        """(N,1,S,S) in [-1,1] -> (N,3,150,150) in 0..255, dlib's input."""
        grid = F.affine_grid(self.theta.expand(x.shape[0], 2, 3), [x.shape[0], 1, self.chip_size, self.chip_size],
                             align_corners=False)
        chip = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return ((chip + 1) * 127.5).expand(-1, 3, -1, -1)

    def forward(self, render: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.encoder(self.chips(real))
        return (self.encoder(self.chips(render)) - target).pow(2).sum(1).mean()


class GeneratorObjective(nn.Module):
    """All terms that train IPDFER (encoders, heads, decoder, residue head).

    batch: image (N,1,S,S) in [-1,1], label (N,) with -1 = unlabeled, pose (N,3)
    degrees, identity (N,128) = E_id of the real face (precomputed)."""

    def __init__(self, weights: LossWeights, identity_loss: IdentityLoss | None = None,
                 identity_subset: int = 8, teacher: IPDFER | None = None):
        super().__init__()
        self.w = weights
        self.identity_loss = identity_loss
        self.identity_subset = identity_subset
        self.teacher = teacher   # frozen flip-TTA model that a one-pass student learns from (w.distill)

    def forward(self, model: IPDFER, batch: dict[str, torch.Tensor], *, discriminator: nn.Module | None,
                use_identity: bool, ablation: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
        w, x, y = self.w, batch["image"], batch["label"]
        labeled, neutral = y >= 0, y == NEUTRAL
        zero = x.new_zeros(())
        terms: dict[str, torch.Tensor] = {}

        # 1. expression and pose from the real face
        enc = model.encode(x)
        terms["expression"] = (F.cross_entropy(enc["logits"][labeled], y[labeled],
                                               label_smoothing=w.label_smoothing)
                               if labeled.any() else zero)
        # pose pseudo-labels of centre-crop fallbacks are not estimates: masked out
        valid = batch.get("pose_valid", torch.ones_like(x[:, 0, 0, 0]))
        pose_err = F.smooth_l1_loss(enc["pose"] / model.POSE_SCALE, batch["pose"] / model.POSE_SCALE,
                                    reduction="none").mean(1)
        terms["pose"] = (pose_err * valid).sum() / valid.sum().clamp(min=1)
        if self.teacher is not None:
            # the teacher's answer averages the face and its mirror; the student gives it in one pass
            with torch.no_grad():
                target = encode_with_mirror(self.teacher.encode, x, margin=1.0)["probs"]
            terms["distill"] = F.kl_div(enc["logits"].float().log_softmax(1), target, reduction="batchmean")
        if ablation:
            return self._total(terms)

        # 2. render: reconstruction G(id,pose,exp), neutral G(id,pose), residue = difference
        if model.edits_input:
            recon, render, residue, fields = _edit(model, batch["identity"], enc, x)
            # the neutral edit is as small and as smooth as it can be: it removes the
            # expression and leaves the rest of the face (and the person) as it is
            d, shade = fields[:, :2] / model.decoder.MAX_SHIFT, fields[:, 2:] / model.decoder.MAX_SHADE
            terms["edit_size"] = d.pow(2).sum(1).mean() + shade.abs().mean()
            terms["edit_smooth"] = sum((f.diff(dim=dim).pow(2).mean()) for f in (d, shade) for dim in (2, 3))
        else:
            recon, render, residue = model.residue(batch["identity"], enc["pose_feat"], enc["exp"])
        terms["reconstruction"] = F.l1_loss(recon, x)
        terms["neutral_self"] = F.l1_loss(render[neutral], x[neutral]) if neutral.any() else zero

        # 3. the residue carries the expression and nothing else
        expressive = labeled & ~neutral
        res_logits = model.residue_head(residue)
        terms["residue_class"] = F.cross_entropy(res_logits[expressive], y[expressive]) if expressive.any() else zero
        terms["residue_zero"] = residue[neutral].abs().mean() if neutral.any() else zero

        # 4. the render must read as neutral to the expression classifier. Its
        #    parameters are detached: this term trains G, not the classifier.
        params = {k: v.detach() for k, v in model.named_parameters()}
        #    Half the renders are mirrored: the edit must read as neutral either way,
        #    not exploit one view of the classifier.
        mirror = torch.rand(render.shape[0], device=render.device) < 0.5
        judged = torch.where(mirror.view(-1, 1, 1, 1), render.flip(3), render)
        logits = _classify_frozen(model, params, dict(model.named_buffers()), judged)
        terms["neutral_class"] = F.cross_entropy(logits, torch.full_like(y, NEUTRAL))

        # 5. same person: identity of the render (every few steps, on a subset: dlib is costly)
        if use_identity and self.identity_loss is not None:
            k = min(self.identity_subset, x.shape[0])
            terms["neutral_identity"] = self.identity_loss(render[:k], x[:k])

        # 6. paired target: an expressive photo's neutral render looks like the same
        #    person's real neutral photo where expressions show (eyes, brows, mouth)
        if "pair_image" in batch and model.edits_input and w.neutral_pair > 0:
            px = batch["pair_image"]
            pair_enc = model.encode(px)
            pair_render = model.render(batch["pair_identity"], pair_enc["pose_feat"], None, face=px)
            terms["neutral_pair"] = 1 - masked_correlation(pair_render, batch["pair_target"]).mean()

        # 7. adversarial (D's parameters are frozen by the caller in this phase)
        if discriminator is not None:
            terms["adversarial"] = hinge_g_loss(discriminator(torch.cat([render, recon])))
        out = self._total(terms)
        self.last_renders = (recon.detach(), render.detach())
        return out

    def _total(self, terms: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        total = sum(getattr(self.w, k) * v for k, v in terms.items())
        return total, {k: float(v.detach()) for k, v in terms.items()}


def masked_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) Pearson correlation of a and b (N,1,S,S) inside the expression regions."""
    mask = torch.from_numpy(facelib.expression_regions(a.shape[-1])).to(a.device)
    a, b = a.float()[:, 0][:, mask], b.float()[:, 0][:, mask]
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-6)


def _edit(model: IPDFER, identity: torch.Tensor, enc: dict[str, torch.Tensor], x: torch.Tensor):
    """The editor's reconstruction, neutral render, residue and the neutral edit's fields."""
    fields = model.decoder.fields(x, identity, enc["pose_feat"])
    render = model.decoder.apply(x, fields)
    recon = model.render(identity, enc["pose_feat"], enc["exp"], face=x)
    return recon, render, recon - render, fields


def _classify_frozen(model: IPDFER, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
    """exp_head(exp_encoder(x)) with detached parameters and BN in eval mode
    (a batch of renders must not shift the running statistics)."""
    # each module's own mode comes back: a frozen (eval) encoder must stay in eval for
    # what runs after this call, or its BatchNorm statistics drift
    modes = [(m, m.training) for part in (model.exp_encoder, model.exp_head) for m in part.modules()]
    model.exp_encoder.eval(), model.exp_head.eval()
    try:
        feats = functional_call(model.exp_encoder, _sub(params, buffers, "exp_encoder."), (x,))
        return functional_call(model.exp_head, _sub(params, buffers, "exp_head."), (feats,))
    finally:
        for m, mode in modes:
            m.training = mode


def _sub(params: dict, buffers: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for d in (params, buffers) for k, v in d.items() if k.startswith(prefix)}
