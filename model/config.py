"""Dataclass configs. Every run writes them next to its outputs and into every
checkpoint, so loading never guesses the architecture."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.labels import EXPRESSIONS


@dataclass
class ModelConfig:
    image_size: int = 64                       # aligned grayscale face, S×S (112 on a GPU)
    num_classes: int = len(EXPRESSIONS)
    id_dim: int = 128                          # dlib descriptor (frozen E_id)
    exp_backbone: str = "resnet"               # E_exp: "resnet" (from scratch) | "mobilenet_v2" (ImageNet start)
    exp_input_size: int = 0                    # E_exp resizes its input to this (0 = image_size)
    exp_widths: tuple[int, ...] = (32, 64, 128, 256)   # E_exp stage channels (resnet)
    exp_blocks: int = 2                        # residual blocks per E_exp stage
    exp_dim: int = 256                         # expression feature size
    pose_widths: tuple[int, ...] = (16, 32, 64, 128)
    pose_blocks: int = 1
    pose_dim: int = 64                         # pose feature size fed to G
    renderer: str = "decoder"                  # G: "decoder" paints from the codes, "editor" edits the input
    dec_widths: tuple[int, ...] = (256, 128, 64, 32, 16)  # G channels from 4×4 upwards (decoder)
    editor_widths: tuple[int, ...] = (32, 64, 128)  # editor channels from S×S down to edit_grid²
    edit_grid: int = 16                        # editor fields' resolution (upsampled to the face)
    render_size: int = 128                     # side of served neutral renders (editor; decoder: image_size)
    disc_widths: tuple[int, ...] = (32, 64, 128, 256)
    residue_widths: tuple[int, ...] = (16, 32, 64, 128)
    dropout: float = 0.3


@dataclass
class LossWeights:
    expression: float = 1.0      # CE of E_exp + classifier on real faces
    pose: float = 1.0            # smooth-L1 to pose pseudo-labels (degrees / 45)
    reconstruction: float = 1.0  # L1 |G(id,pose,exp) - x|
    neutral_self: float = 1.0    # L1 |G(id,pose) - x| for neutral-labelled x
    neutral_class: float = 0.2   # the neutral render must classify as neutral
    neutral_identity: float = 0.5  # ||E_id(render) - E_id(x)||^2 (every few steps)
    adversarial: float = 0.02    # hinge GAN on renders and reconstructions
    residue_class: float = 0.5   # (recon - neutral render) classifies as the label
    residue_zero: float = 1.0    # ... and is ~0 for neutral inputs
    edit_size: float = 2.0       # editor: mean squared displacement + |shading| of the neutral edit (minimal edits)
    edit_smooth: float = 5.0     # editor: squared differences of neighbouring field values
    neutral_pair: float = 0.0    # editor: 1 - correlation of the neutral render of an expressive photo with the
                                 # same person's real neutral photo, inside the eye/brow + mouth regions (pair_sets)
    label_smoothing: float = 0.1


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    # (dataset, split) pairs read through model.data.load_split
    train_sets: tuple[str, ...] = ("fer2013:train", "ckplus:train", "muxspace:train")
    val_sets: tuple[str, ...] = ("fer2013:val",)
    # splits whose people have both neutral and expressive photos (muxspace:train): each step
    # also renders `pair_batch` expressive faces against the same person's neutral photo
    pair_sets: tuple[str, ...] = ()
    pair_batch: int = 16
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3             # one-cycle peak for encoders + G
    d_lr: float = 2e-4           # discriminator
    weight_decay: float = 5e-4
    ema_decay: float = 0.999     # the exported model is the EMA copy
    identity_every: int = 4      # run the (costly) frozen E_id on renders every k steps
    identity_subset: int = 8     # ... on this many renders
    gan_start_step: int = 500    # adversarial terms start once G is past its blur phase
    pretrained: bool = True      # a new run starts E_exp from ImageNet weights where the backbone has them
    ablation: bool = False       # True: E_exp + classifier alone (no G, D, residue)
    # True: E_exp, E_pose and their heads stay as loaded (--init) and only G, the
    # residue head and D train: a render-polishing stage that leaves predictions unchanged
    freeze_encoders: bool = False
    seed: int = 0
    num_workers: int = 2
    # Batches made on the training device (model/device_data.py: the cache as one
    # uint8 tensor, batched augmentation) instead of a DataLoader; None = on CUDA only
    data_on_device: bool | None = None
    amp: bool = True             # fp16 on CUDA, bf16 on CPUs with native bf16
    checkpoint_every: int = 500  # steps
    log_every: int = 50
    max_steps: int | None = None  # cut the run short (smoke tests)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, data: dict):
    """Rebuild a (nested) config dataclass, tolerating lists for tuples. Missing
    keys keep their defaults (configs list only what differs); an unknown key is
    an error, so a typo never trains the wrong model silently."""
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key(s): {', '.join(sorted(unknown))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        if dataclasses.is_dataclass(f.default_factory() if callable(f.default_factory) else None):
            value = from_dict(type(f.default_factory()), value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def load_train_config(path: str | Path) -> TrainConfig:
    return from_dict(TrainConfig, json.loads(Path(path).read_text()))
