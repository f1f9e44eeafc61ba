"""`ipdfer train [CONFIG.json]`: IPD-FER training on CPU or CUDA, multi-GPU via
`torchrun --nproc_per_node N -m service.cli train ...`.

Each step has two phases (StyleGAN-style): G (encoders, heads, decoder, residue
head) then D (discriminator). Checkpoints every `checkpoint_every` steps hold
everything needed to resume mid-epoch; re-running the same command resumes.

Long module: the training loop stays in one file (nanoGPT's way), so a step reads
top to bottom: setup, the G phase, the D phase, EMA, logging, checkpoints."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import csv
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler
from tqdm import tqdm

from model.config import ConfigError, TrainConfig, load_train_config, to_dict
from model.paths import cache_root
from model.serving.plan import cpu_has_native_bf16
from model.nets.losses import GeneratorObjective, IdentityLoss, hinge_d_loss
from model.nets.networks import IPDFER, Discriminator

DEFAULT_RUNS = cache_root() / "runs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", type=Path,
                   help="TrainConfig JSON (defaults if omitted); it may name a \"base\" config it overrides")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override any config field, typed by the field: loss.adversarial=0.05, "
                        "model.image_size=112, train_sets=fer2013:train,ckplus:train (repeatable)")
    p.add_argument("--run-dir", type=Path, help=f"outputs and checkpoints (default {DEFAULT_RUNS}/<name>)")
    p.add_argument("--name", default="ipdfer", help="run name under the runs folder")
    p.add_argument("--data-cache", type=Path, help="prepared data cache (ipdfer prepare)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--ablation", action="store_true", help="expression encoder alone (no G/D/residue)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--batches", choices=("device", "dataloader"),
                   help="make batches on the training device or in DataLoader workers "
                        "(default: the config's data_on_device; unset = device on CUDA)")
    p.add_argument("--smoke", action="store_true",
                   help="a few steps on a handful of real images from the data folder (--data-root; seconds; CI)")
    p.add_argument("--data-root", "--shared-dir", type=Path, dest="data_root",
                   help="datasets folder for --smoke (default: env IPDFER_DATA)")
    p.add_argument("--init", type=Path, metavar="WEIGHTS_DIR",
                   help="start a new run from exported weights (e.g. weights/) instead of random "
                        "initialisation; ignored when the run already has a checkpoint to resume")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (its base chain, --set and the options applied) as JSON, and stop")


def build_config(args: argparse.Namespace) -> TrainConfig:
    cfg = load_train_config(args.config, getattr(args, "overrides", []))
    for name in ("epochs", "batch_size", "max_steps"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.image_size:
        cfg.model.image_size = args.image_size
    if args.ablation:
        cfg.ablation = True
    if args.batches:
        cfg.data_on_device = args.batches == "device"
    if args.smoke:
        cfg.epochs, cfg.batch_size, cfg.num_workers = 1, 8, 0
        cfg.max_steps = cfg.max_steps or 3
        cfg.identity_every, cfg.gan_start_step, cfg.checkpoint_every, cfg.log_every = 2, 1, 2, 1
    return cfg


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """fp16 on CUDA, bf16 on a CPU that computes it natively, else None (fp32)."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def frozen_parts(model: IPDFER, cfg: TrainConfig) -> list[torch.nn.Module]:
    """What stays as loaded (--init): with `freeze_encoders` everything that makes a
    prediction; when distilling (loss.distill) the pose encoder and head."""
    if cfg.freeze_encoders:
        return [model.exp_encoder, model.exp_head, model.pose_encoder, model.pose_head]
    if cfg.loss.distill > 0:
        return [model.pose_encoder, model.pose_head]
    return []


def eval_parts(model: IPDFER, cfg: TrainConfig) -> list[torch.nn.Module]:
    """What runs in eval mode in the G phase: the frozen parts (BatchNorm statistics
    stay as loaded, dropout off) and a distilled student, which keeps its teacher's
    BatchNorm statistics so that it starts as the teacher's own one pass."""
    return frozen_parts(model, cfg) + ([model.exp_encoder, model.exp_head] if cfg.loss.distill > 0 else [])


def load_teacher(cfg: TrainConfig, init: Path | None, device: torch.device) -> IPDFER | None:
    """The --init model whose mirror-averaged probabilities a one-pass student learns
    (loss.distill > 0), frozen, in its serving form; None when not distilling."""
    if cfg.loss.distill <= 0:
        return None
    if init is None:
        raise ValueError("loss.distill learns from the --init weights: give --init WEIGHTS (also when resuming)")
    if cfg.model.flip_tta:
        raise ValueError("a distilled student answers in one pass: set model.flip_tta to false")
    from model.nets.serving import inference_form
    from model.weights import load_weights
    teacher = load_weights(init).model
    if not teacher.cfg.flip_tta:
        raise ValueError(f"{init} already answers in one pass (flip_tta false): nothing to distill")
    return inference_form(teacher).to(device).requires_grad_(False)


def seed_everything(seed: int) -> None:
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)


class EMA:
    """Exponential moving average of a model's parameters and buffers. The decay
    warms up as min(decay, (1 + n) / (10 + n)) over the n updates so far: with a
    fixed 0.999, a 1,000-step run would still be ~37% random initialisation."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, p in zip(self.model.state_dict().values(), model.state_dict().values()):
            if e.is_floating_point():
                e.lerp_(p, 1 - decay)
            else:
                e.copy_(p)


# ModelConfig fields that only shape G: --init may change them (G then starts fresh)
RENDERER_KEYS = ("renderer", "dec_widths", "editor_widths", "edit_grid", "render_size")


def warm_start(model: IPDFER, weights_dir: Path, cfg: TrainConfig) -> dict:
    """Load exported weights into `model` (same architecture required); returns
    what the checkpoint and manifest record about the parent weights."""
    from model.weights import load_weights
    loaded = load_weights(weights_dir)
    theirs, ours = to_dict(loaded.config), to_dict(cfg.model)
    for config in (theirs, ours):  # how predictions are served, not the architecture
        config.pop("flip_tta")
    same_renderer = theirs["renderer"] == ours["renderer"]
    if not same_renderer:  # a new renderer on trained encoders: G starts fresh, the rest is loaded
        for key in RENDERER_KEYS:
            theirs.pop(key), ours.pop(key)
    if theirs != ours:
        raise ValueError(f"{weights_dir} holds a different architecture than this config's model section")
    state = loaded.model.state_dict()
    if not same_renderer:
        state = {k: v for k, v in state.items() if not k.startswith("decoder.")}
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("decoder.")})
    model.load_state_dict(state)
    return {k: loaded.manifest.get(k) for k in ("name", "version", "sha256")}


class GeneratorStep(torch.nn.Module):
    """The G phase's loss as one module's forward. Under torchrun this module is what
    DDP wraps: DDP all-reduces gradients only for work done inside its own forward,
    so the objective must run there (calling the unwrapped model trains one copy per rank)."""

    def __init__(self, model: IPDFER, objective: GeneratorObjective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: dict[str, torch.Tensor], **kwargs) -> tuple[torch.Tensor, dict[str, float]]:
        return self.objective(self.model, batch, **kwargs)


def assert_ranks_in_sync(*modules: torch.nn.Module) -> None:
    """Every rank must hold the same parameters (buffers may differ: BatchNorm statistics
    are broadcast from rank 0 at the start of each forward). Raises on divergence."""
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten() for m in modules for p in m.parameters()]).cpu()
        mine = torch.stack([flat.sum(), flat.abs().sum(), (flat * (torch.arange(len(flat)) % 997)).sum()])
        every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
    spread = max(float((e - every[0]).abs().max()) for e in every)
    if spread > 1e-6 * max(1.0, float(every[0].abs().max())):
        raise RuntimeError(f"ranks diverged: parameter checksums {[e.tolist() for e in every]}")


def save_checkpoint(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a cut-off never leaves a half-written checkpoint


def run(args: argparse.Namespace) -> int:
    try:  # before any data is read: a typo in a config must not cost a run
        cfg = build_config(args)
    except ConfigError as e:
        print(f"ipdfer train: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    # 1. devices and processes -------------------------------------------------
    world = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world > 1
    rank = int(os.environ.get("RANK", "0"))
    if distributed:
        local = int(os.environ["LOCAL_RANK"])
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    main_process = rank == 0
    cuda = device.type == "cuda"
    seed_everything(cfg.seed + rank)
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    run_dir = args.run_dir or DEFAULT_RUNS / (args.name + ("-smoke" if args.smoke else ""))
    run_dir.mkdir(parents=True, exist_ok=True)
    if main_process:
        (run_dir / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    # 2. data ------------------------------------------------------------------
    from model.data import datasets as datalib
    if args.smoke:
        train_set = datalib.smoke_dataset(cfg.model.image_size, args.data_root)
        data_info = {"smoke": True}
    else:
        parts = [datalib.FaceDataset(datalib.load_split(*s.split(":"), size=cfg.model.image_size,
                                                        cache_dir=args.data_cache), augment=True)
                 for s in cfg.train_sets]
        train_set = ConcatDataset(parts)
        data_info = {"train_sets": list(cfg.train_sets), "sizes": [len(p) for p in parts]}
    on_device = cfg.data_on_device if cfg.data_on_device is not None else cuda
    sampler = None
    if on_device:
        from model.data.device_data import DeviceBatches
        faces = [train_set.faces] if args.smoke else [p.faces for p in parts]
        loader = DeviceBatches(faces, cfg.batch_size, device, seed=cfg.seed, rank=rank, world_size=world)
    else:
        sampler = DistributedSampler(train_set, shuffle=True, seed=cfg.seed) if distributed else None
        loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                            num_workers=cfg.num_workers, drop_last=len(train_set) > cfg.batch_size,
                            pin_memory=cuda, persistent_workers=cfg.num_workers > 0)
    data_info["batches"] = "device" if on_device else "dataloader"
    pairs = None
    if cfg.pair_sets and not args.smoke:
        pairs = datalib.NeutralPairs([datalib.load_split(*s.split(":"), size=cfg.model.image_size,
                                                         cache_dir=args.data_cache) for s in cfg.pair_sets],
                                     seed=cfg.seed + rank)
        data_info["pairs"] = {"sets": list(cfg.pair_sets), "expressive": len(pairs)}
    epoch_order = loader if on_device else sampler   # what set_epoch reshuffles (None: the DataLoader's shuffle)
    steps_per_epoch = len(loader)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    # 3. model, EMA, discriminator, optimisers ------------------------------------
    model = IPDFER(cfg.model).to(device)
    disc = Discriminator(cfg.model).to(device)
    # channels-last helps cuDNN and oneDNN alike (benchmarks/train_step_speed.py: 1.36x on this CPU)
    model, disc = model.to(memory_format=torch.channels_last), disc.to(memory_format=torch.channels_last)
    ckpt_path = run_dir / "last.pt"
    resuming = ckpt_path.exists()
    if args.init and not resuming:
        data_info["init"] = warm_start(model, args.init, cfg)
        if main_process:
            print(f"initialised from {args.init} ({data_info['init']['version']})")
    elif not resuming and cfg.pretrained and hasattr(model.exp_encoder, "load_imagenet"):
        model.exp_encoder.load_imagenet()
        data_info["init"] = {"name": "imagenet", "version": cfg.model.exp_backbone, "sha256": None}
        if main_process:
            print(f"E_exp starts from ImageNet {cfg.model.exp_backbone} weights")
    ema = EMA(model, cfg.ema_decay)
    identity_loss = None
    if not cfg.ablation and cfg.loss.neutral_identity > 0:
        from model.faces.identity import load_identity_encoder
        identity_loss = IdentityLoss(load_identity_encoder(device=str(device)), cfg.model.image_size).to(device)
    objective = GeneratorObjective(cfg.loss, identity_loss, cfg.identity_subset,
                                   teacher=load_teacher(cfg, args.init, device))
    if cfg.freeze_encoders and not args.init and not resuming:
        raise ValueError("freeze_encoders keeps the encoders as loaded: give --init WEIGHTS")
    for m in frozen_parts(model, cfg):
        m.requires_grad_(False)
    opt_g = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                              weight_decay=cfg.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.d_lr, betas=(0.0, 0.99))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt_g, max_lr=cfg.lr, total_steps=max(total_steps, 2),
                                                pct_start=0.15)
    # Mixed precision: fp16 + loss scaling on CUDA; bfloat16 (no scaling needed) on
    # CPUs with native bf16 (AVX512-BF16/AMX), where it is ~1.4x faster again.
    amp_dtype = autocast_dtype(device) if cfg.amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype or torch.float32,  # noqa: E731
                                      enabled=amp_dtype is not None)
    if main_process:
        print(f"device {device}, mixed precision {amp_dtype or 'off'}")
    g_step = GeneratorStep(model, objective)
    if distributed:  # an E_exp-alone run leaves G and the residue head unused
        g_step = DDP(g_step, device_ids=[device.index] if cuda else None, find_unused_parameters=cfg.ablation)
        d_model = DDP(disc, device_ids=[device.index] if cuda else None)
    else:
        d_model = disc

    # 4. resume ----------------------------------------------------------------------
    step = 0
    if resuming:
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"]), ema.model.load_state_dict(ckpt["ema"])
        disc.load_state_dict(ckpt["disc"]), opt_g.load_state_dict(ckpt["opt_g"])
        opt_d.load_state_dict(ckpt["opt_d"])
        # Keep this invocation's schedule length: resuming with more epochs/steps extends the run.
        phases, n_total = sched._schedule_phases, sched.total_steps
        sched.load_state_dict(ckpt["sched"])
        sched._schedule_phases, sched.total_steps = phases, n_total
        scaler.load_state_dict(ckpt["scaler"])
        step = ema.updates = ckpt["step"]
        data_info = {**data_info, **{k: v for k, v in (ckpt.get("data") or {}).items() if k == "init"}}
        torch.set_rng_state(ckpt["rng_cpu"])
        if pairs is not None:  # a resumed run draws pairs it has not drawn before
            pairs.rng = np.random.default_rng([cfg.seed, rank, step])
        if main_process:
            print(f"resumed from {ckpt_path} at step {step}")

    def checkpoint(epoch: int) -> None:
        if distributed:
            assert_ranks_in_sync(model, disc)
        if main_process:
            save_checkpoint(ckpt_path, model=model.state_dict(), ema=ema.model.state_dict(),
                            disc=disc.state_dict(), opt_g=opt_g.state_dict(), opt_d=opt_d.state_dict(),
                            sched=sched.state_dict(), scaler=scaler.state_dict(), step=step, epoch=epoch,
                            rng_cpu=torch.get_rng_state(), train_config=to_dict(cfg), data=data_info)

    # 5. the loop -------------------------------------------------------------------------
    log_path = run_dir / "log.csv"
    log_file = open(log_path, "a", newline="") if main_process else None
    writer = None
    window: dict[str, list[float]] = {}
    bar = tqdm(total=total_steps, initial=step, disable=not main_process, desc="train", dynamic_ncols=True)
    start_epoch = step // max(steps_per_epoch, 1)
    skip = step % max(steps_per_epoch, 1)   # batches of the interrupted epoch already seen
    t0 = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        if step >= total_steps:
            break
        if epoch_order is not None:
            epoch_order.set_epoch(epoch)
        torch.manual_seed(cfg.seed + epoch)  # same shuffle on resume
        for i, batch in enumerate(loader):
            if i < skip:
                continue
            if step >= total_steps:
                break
            if pairs is not None:
                batch = {**batch, **pairs.sample(cfg.pair_batch)}
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
            use_gan = not cfg.ablation and step >= cfg.gan_start_step and cfg.loss.adversarial > 0
            # 5a. G phase: encoders, heads, decoder (D frozen)
            disc.requires_grad_(False)
            for m in eval_parts(model, cfg):
                m.eval()
            with autocast():  # D is called unwrapped here: no gradient for its parameters in this phase
                loss_g, terms = g_step(batch, discriminator=disc if use_gan else None,
                                       use_identity=step % cfg.identity_every == 0, ablation=cfg.ablation)
            opt_g.zero_grad(set_to_none=True)
            scaler.scale(loss_g).backward()
            scaler.unscale_(opt_g)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            scaler.step(opt_g)
            # 5b. D phase: real faces vs renders and reconstructions
            if use_gan:
                disc.requires_grad_(True)
                recon, render = objective.last_renders
                real = batch["image"]
                with autocast():  # one forward: DDP reduces once per forward/backward pair
                    scores = d_model(torch.cat([real, render, recon]))
                    loss_d = hinge_d_loss(scores[:len(real)], scores[len(real):])
                opt_d.zero_grad(set_to_none=True)
                scaler.scale(loss_d).backward()
                scaler.step(opt_d)
                terms["disc"] = float(loss_d.detach())
            scaler.update()
            sched.step()
            ema.update(model)
            step += 1
            # 5c. log window means (terms computed only on some steps average over those steps)
            terms["loss"] = float(loss_g.detach())
            for k, v in terms.items():
                window.setdefault(k, []).append(v)
            if main_process:
                bar.update(1)
                if step % cfg.log_every == 0 or step == total_steps:
                    means = {k: sum(v) / len(v) for k, v in window.items()}
                    window.clear()
                    row = {"step": step, "epoch": epoch, "lr": sched.get_last_lr()[0],
                           "sec": round(time.time() - t0, 1), **means}
                    bar.set_postfix(loss=f"{means['loss']:.3f}", exp=f"{means['expression']:.3f}")
                    if writer is None:
                        terms_all = [f.name for f in dataclasses.fields(cfg.loss) if f.name != "label_smoothing"]
                        writer = csv.DictWriter(log_file, fieldnames=list(row)[:4] + ["loss"] + terms_all + ["disc"],
                                                extrasaction="ignore")
                        if log_file.tell() == 0:
                            writer.writeheader()
                    writer.writerow(row), log_file.flush()
            if step % cfg.checkpoint_every == 0:
                checkpoint(epoch)
        skip = 0
        checkpoint(epoch + 1)
        if main_process and not args.smoke and cfg.val_sets:
            acc = validate(ema.model, cfg, device, args.data_cache)
            print(json.dumps({"epoch": epoch + 1, "step": step, **acc}))
            with open(run_dir / "val.jsonl", "a") as f:
                f.write(json.dumps({"epoch": epoch + 1, "step": step, **acc}) + "\n")
    checkpoint(math.ceil(step / max(steps_per_epoch, 1)))
    bar.close()
    if log_file:
        log_file.close()
    if distributed:
        dist.destroy_process_group()
    if main_process:
        print(f"done: {step} steps in {time.time() - t0:.1f}s, checkpoint {ckpt_path}")
    return 0


@torch.no_grad()
def validate(model: IPDFER, cfg: TrainConfig, device: torch.device, cache_dir: Path | None) -> dict:
    """Accuracy of the (EMA) expression classifier on each validation set, with
    flip TTA: the same encoding path as `ipdfer evaluate`."""
    from model.data import datasets as datalib
    from model.training.evaluate import encode_all, labeled_subset
    model.eval()
    out = {}
    for name in cfg.val_sets:
        faces = datalib.load_split(*name.split(":"), size=cfg.model.image_size, cache_dir=cache_dir)
        keep = labeled_subset(faces.labels, None)
        probs = encode_all(model, faces.images[keep], device=device)["probs"] if len(keep) else np.zeros((0, 1))
        out[f"{name}:acc"] = round(float((probs.argmax(1) == faces.labels[keep]).mean()) if len(keep) else 0.0, 4)
    return out
