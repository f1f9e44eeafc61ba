"""Seconds per training step (G + D phase, batch 64) on this machine's CPU for
fp32 vs bfloat16 autocast and NCHW vs channels-last, interleaved in one run so
machine noise hits every variant alike. Synthetic inputs; the step is the real
GeneratorObjective + hinge D loss of model/training/train.py.

    .venv/bin/python benchmarks/train_step_speed.py [--steps 6] [--ablation]
"""
from __future__ import annotations

import argparse
import time

import torch

from model.config import TrainConfig
from model.nets.losses import GeneratorObjective, hinge_d_loss
from model.nets.networks import IPDFER, Discriminator


def make_step(cfg: TrainConfig, dtype: torch.dtype | None, channels_last: bool, ablation: bool):
    torch.manual_seed(0)
    model, disc = IPDFER(cfg.model), Discriminator(cfg.model)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model, disc = model.to(memory_format=fmt), disc.to(memory_format=fmt)
    objective = GeneratorObjective(cfg.loss, None)
    opt_g = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-4)
    n, s = cfg.batch_size, cfg.model.image_size
    batch = {"image": (torch.rand(n, 1, s, s) * 2 - 1).contiguous(memory_format=fmt),
             "label": torch.randint(0, 7, (n,)), "pose": torch.randn(n, 3) * 10,
             "identity": torch.randn(n, 128) * 0.1, "pose_valid": torch.ones(n)}

    def autocast():
        return torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    def step():
        disc.requires_grad_(False)
        with autocast():
            loss, _ = objective(model, batch, discriminator=None if ablation else disc,
                                use_identity=False, ablation=ablation)
        opt_g.zero_grad(), loss.backward(), opt_g.step()
        if not ablation:
            disc.requires_grad_(True)
            recon, render = objective.last_renders
            with autocast():
                loss_d = hinge_d_loss(disc(batch["image"]), disc(torch.cat([render, recon])))
            opt_d.zero_grad(), loss_d.backward(), opt_d.step()
    return step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--ablation", action="store_true")
    args = p.parse_args()
    cfg = TrainConfig()
    variants = {(name, cl): make_step(cfg, dt, cl, args.ablation)
                for name, dt in (("fp32", None), ("bf16", torch.bfloat16)) for cl in (False, True)}
    times = {k: [] for k in variants}
    for k, step in variants.items():
        step()  # warm-up (oneDNN primitive creation)
    for _ in range(args.steps):
        for k, step in variants.items():
            t = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t)
    base = sorted(times[("fp32", False)])[len(times[("fp32", False)]) // 2]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {cfg.batch_size}, "
          f"{cfg.model.image_size}px, {'ablation' if args.ablation else 'full model'}")
    for (name, cl), ts in times.items():
        med = sorted(ts)[len(ts) // 2]
        print(f"{name:5s} {'channels-last' if cl else 'NCHW':13s} median {med:.3f} s/step  "
              f"speed-up vs fp32 NCHW {base / med:.2f}x")


if __name__ == "__main__":
    main()
