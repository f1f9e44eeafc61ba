"""The IPD-FER objective: geometry of the differentiable identity chip, and
which networks each term is allowed to train."""
import numpy as np
import pytest
import skimage.data
import torch

from model import faces as facelib
from model.config import LossWeights, ModelConfig
from model.labels import NEUTRAL
from model.nets.losses import GeneratorObjective, IdentityLoss
from model.nets.networks import IPDFER
from tests.data_samples import make_astronaut_layout


@pytest.fixture(scope="module")
def astronaut_aligned():
    image = skimage.data.astronaut()
    det = facelib.FaceDetector().detect([image])[0][0]
    return facelib.align_face(image, det.landmarks, 64)


def test_identity_chip_matches_the_pipeline_chip(astronaut_aligned):
    # The training-time chip (affine grid on the aligned crop) must be the chip the
    # pipeline cuts from the same crop, or the identity loss compares other faces.
    reference = facelib.dlib_chip(astronaut_aligned, facelib.center_landmarks((64, 64)))[..., 0].astype(float)
    chips = IdentityLoss(torch.nn.Identity(), 64).chips(facelib.to_model_input(astronaut_aligned[None]))
    inside = reference > 0  # dlib pads black; the grid replicates the border there
    assert np.abs(chips[0, 0].numpy() - reference)[inside].mean() < 4.0


def batch_of(n: int = 6, size: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(n, 1, size, size, generator=g) * 2 - 1,
            "label": torch.tensor([NEUTRAL, 1, 2, NEUTRAL, 3, -1])[:n],
            "pose": torch.randn(n, 3, generator=g) * 10,
            "identity": torch.randn(n, 128, generator=g) * 0.1,
            "pose_valid": torch.tensor([1.0, 1, 0, 1, 1, 1])[:n]}


def test_every_term_is_finite_and_trains_its_networks():
    torch.manual_seed(0)
    model = IPDFER(ModelConfig())
    total, terms = GeneratorObjective(LossWeights())(model, batch_of(), discriminator=None, use_identity=False)
    assert set(terms) >= {"expression", "pose", "reconstruction", "neutral_self", "residue_class",
                          "residue_zero", "neutral_class"}
    assert all(np.isfinite(v) for v in terms.values())
    total.backward()
    for part in ("exp_encoder", "pose_encoder", "decoder", "residue_head", "exp_head"):
        grads = [p.grad for p in getattr(model, part).parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), part


def test_neutral_class_term_trains_the_decoder_not_the_classifier():
    torch.manual_seed(0)
    model = IPDFER(ModelConfig())
    weights = LossWeights(**{k: 0.0 for k in LossWeights.__dataclass_fields__})
    weights.neutral_class = 1.0
    total, _ = GeneratorObjective(weights)(model, batch_of(), discriminator=None, use_identity=False)
    total.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.exp_head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())


def test_ablation_uses_only_expression_and_pose():
    model = IPDFER(ModelConfig())
    _, terms = GeneratorObjective(LossWeights())(model, batch_of(), discriminator=None,
                                                 use_identity=False, ablation=True)
    assert set(terms) == {"expression", "pose"}


def test_distillation_moves_the_one_pass_towards_the_teachers_mirror_average(tmp_path):
    """loss.distill: the student's one-pass probabilities learn the flip-TTA
    average of the teacher (the shipped model) on real faces (crops of the
    astronaut, half of them with the smile hidden); the teacher stays."""
    import copy

    from model.data.datasets import smoke_dataset
    from model.weights import DEFAULT_WEIGHTS_DIR, load_weights
    teacher = load_weights(DEFAULT_WEIGHTS_DIR).model.eval().requires_grad_(False)
    student = copy.deepcopy(teacher).eval()   # eval: BatchNorm keeps the teacher's statistics
    student.requires_grad_(False)
    trained = [*student.exp_encoder.parameters(), *student.exp_head.parameters()]
    for p in trained:
        p.requires_grad_(True)
    faces = smoke_dataset(64, make_astronaut_layout(tmp_path), n=32)
    assert len(faces) >= 12
    batch = {k: torch.stack([faces[i][k] for i in range(len(faces))]) for k in ("image", "label", "pose")}
    objective = GeneratorObjective(LossWeights(expression=0, pose=0, distill=1), teacher=teacher)
    opt = torch.optim.Adam(trained, lr=1e-5)   # 2e-5 overshot on 0.6.0's FaceRes E_exp
    before_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}
    losses = []
    for _ in range(12):
        loss, terms = objective(student, batch, discriminator=None, use_identity=False, ablation=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(terms["distill"])
    with torch.no_grad():
        one_pass = student.encode(batch["image"])["probs"]
        x = batch["image"]   # the teacher's mirror average, written out
        target = (teacher.encode(x)["probs"] + teacher.encode(x.flip(3))["probs"]) / 2
        teacher_one_pass = teacher.encode(batch["image"])["probs"]
    assert losses[0] > 1e-3          # the one pass is not the average to begin with
    assert losses[-1] < 0.5 * losses[0], losses
    assert (one_pass - target).abs().mean() < 0.7 * (teacher_one_pass - target).abs().mean()
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before_teacher[k]), k
