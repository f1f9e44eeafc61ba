"""Dataclass configs, validated by pydantic (`from_dict`). Every run writes them
next to its outputs and into every checkpoint, so loading never guesses the
architecture. `ipdfer train CONFIG --print-config` prints one resolved."""
from __future__ import annotations

import copy
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, TypeAdapter, ValidationError

from model.labels import EXPRESSIONS


@dataclass
class ModelConfig:
    __pydantic_config__ = ConfigDict(extra="forbid")

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
    # served expression probabilities average the face and its mirror image (flip
    # TTA); a one-pass student distilled from that average (loss.distill) sets False
    flip_tta: bool = True


@dataclass
class LossWeights:
    __pydantic_config__ = ConfigDict(extra="forbid")

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
    distill: float = 0.0         # KL(the --init model's mirror-averaged probabilities || E_exp's one pass):
                                 # trains a one-pass student (model.flip_tta false) of a flip-TTA model
    label_smoothing: float = 0.1


@dataclass
class TrainConfig:
    __pydantic_config__ = ConfigDict(extra="forbid")

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    # (dataset, split) pairs read through model.data.datasets.load_split
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
    # Batches made on the training device (model/data/device_data.py: the cache as one
    # uint8 tensor, batched augmentation) instead of a DataLoader; None = on CUDA only
    data_on_device: bool | None = None
    amp: bool = True             # fp16 on CUDA, bf16 on CPUs with native bf16
    checkpoint_every: int = 500  # steps
    log_every: int = 50
    max_steps: int | None = None  # cut the run short (smoke tests)


class ConfigError(ValueError):
    """A config names an unknown key, gives a value of the wrong type, or its `base`
    chain is broken. The message starts with the dotted key (`loss.adversarial`)."""


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _key(prefix: str, loc: tuple) -> str:
    key = prefix.rstrip(".")
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def from_dict(cls, data: dict, prefix: str = ""):
    """Rebuild a (nested) config dataclass, validated by pydantic as strict JSON:
    missing keys keep their defaults (configs list only what differs); lists become
    tuples and ints floats, nothing else is coerced (no "3" for 3, no 1 for true);
    an unknown key or a value of the wrong type is a ConfigError naming the key, so
    a typo never trains the wrong model."""
    try:
        return TypeAdapter(cls).validate_json(json.dumps(data), strict=True)
    except ValidationError as e:
        err = e.errors()[0]
        what = (f"unknown {cls.__name__} key" if err["type"] == "unexpected_keyword_argument"
                else f"{err['msg'].lower()}, got {err.get('input')!r}")
        raise ConfigError(f"{_key(prefix, err['loc'])}: {what}") from None


def _merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, nested objects merged key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_config_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The JSON of a config file with its `"base"` chain applied: `"base":
    "other.json"` (relative to this file's folder) is read first and this file's
    keys override it; nested objects ("model", "loss") merge key by key."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"base: {path.name} includes itself ({' -> '.join(p.name for p in _seen)})")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config is a JSON object")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"base: expected a file name, got {base!r}")
    return _merge(resolve_config_file(path.parent / base, (*_seen, path)), data)


def _parse_override(text: str, hint: Any) -> Any:
    """A command-line value for a field of type `hint`: JSON (numbers, true/false,
    null, lists), else the plain string; for a list of strings also `a,b`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    if typing.get_origin(hint) is tuple:
        return [] if not text else text.split(",")
    return text


def _field_hint(cls, dotted: str) -> Any:
    hint: Any = cls
    for i, part in enumerate(dotted.split(".")):
        if not dataclasses.is_dataclass(hint):
            raise ConfigError(f"{dotted}: {'.'.join(dotted.split('.')[:i])} has no sub-keys")
        hints = typing.get_type_hints(hint)
        if part not in hints:
            raise ConfigError(f"{dotted}: unknown {hint.__name__} key")
        hint = hints[part]
    return hint


def apply_overrides(data: dict, overrides: list[str], cls=None) -> dict:
    """`["loss.adversarial=0.05", "model.image_size=112"]` applied to a config dict;
    each value is typed by its dataclass field (ConfigError names a bad key)."""
    cls = cls or TrainConfig
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"{item}: expected KEY=VALUE (e.g. loss.adversarial=0.05)")
        key = key.strip()
        value = _parse_override(text, _field_hint(cls, key))
        *parents, last = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return data


def load_train_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """TrainConfig from a JSON file (with its `base` chain) and `--set` overrides."""
    data = resolve_config_file(path) if path else {}
    return from_dict(TrainConfig, apply_overrides(data, list(overrides)))
