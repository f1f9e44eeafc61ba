"""The editing renderer: G moves the input's own pixels by smooth fields, so
renders are sharp, keep the person, and can be larger than the model's input."""
import dataclasses

import numpy as np
import skimage.data
import torch

from model import faces as facelib
from model.config import LossWeights, ModelConfig
from model.serving.face_state import FaceState
from model.nets.losses import GeneratorObjective
from model.nets.networks import IPDFER, NeutralEditor
from tests.test_losses import batch_of

EDITOR = ModelConfig(renderer="editor")


def astronaut_crops():
    image = skimage.data.astronaut()
    det = facelib.FaceDetector().detect([image])[0][0]
    return facelib.align_face(image, det.landmarks, 64), facelib.align_face(image, det.landmarks, 128)


def test_a_new_editor_is_the_identity_edit():
    # the head starts at zero: a fresh renderer returns its input, at any size
    torch.manual_seed(0)
    model = IPDFER(EDITOR).eval()
    small, large = (facelib.to_model_input(c[None]) for c in astronaut_crops())
    ident, pose = torch.randn(1, 128), torch.randn(1, EDITOR.pose_dim)
    with torch.no_grad():
        assert (model.render(ident, pose, face=small) - small).abs().max() < 1e-5
        out = model.render(ident, pose, face=small, target=large)
    assert out.shape == (1, 1, 128, 128) and (out - large).abs().max() < 1e-5


def test_one_field_moves_small_and_large_crops_by_the_same_share_of_the_face():
    # a uniform displacement of 2/64 of the width (grid units span 2) moves pixels
    # 1 px at 64 and 2 px at 128: the fields are resolution-free
    small, large = (facelib.to_model_input(c[None]) for c in astronaut_crops())
    fields = torch.zeros(1, 3, 16, 16)
    fields[:, 0] = 2 / 64  # sample from the right: content moves left
    for face, px in ((small, 1), (large, 2)):
        moved = NeutralEditor.apply(face, fields)
        assert torch.allclose(moved[..., 8:-8, 8:-8 - px], face[..., 8:-8, 8 + px:-8], atol=1e-4)
    shade = torch.zeros(1, 3, 16, 16)
    shade[:, 2] = 0.2
    assert torch.allclose(NeutralEditor.apply(small * 0.5, shade), small * 0.5 + 0.2, atol=1e-5)


def test_editor_terms_train_the_editor_and_keep_the_edit_small():
    torch.manual_seed(0)
    model = IPDFER(EDITOR)
    torch.nn.init.normal_(model.decoder.head.weight, std=0.05)  # a non-trivial edit
    total, terms = GeneratorObjective(LossWeights())(model, batch_of(), discriminator=None, use_identity=False)
    assert terms["edit_size"] > 0 and terms["edit_smooth"] > 0
    assert all(np.isfinite(v) for v in terms.values())
    total.backward()
    assert model.decoder.head.weight.grad.abs().sum() > 0
    # with only the size term, a step of gradient descent shrinks the edit
    weights = LossWeights(**{k: 0.0 for k in LossWeights.__dataclass_fields__})
    weights.edit_size = 1.0
    model.eval()  # fixed BatchNorm statistics: only the step changes the edit
    opt = torch.optim.Adam(model.decoder.parameters(), lr=3e-4)
    sizes = []
    for _ in range(10):
        loss, t = GeneratorObjective(weights)(model, batch_of(), discriminator=None, use_identity=False)
        opt.zero_grad(), loss.backward(), opt.step()
        sizes.append(t["edit_size"])
    assert sizes[-1] < sizes[0]


def test_face_state_keeps_the_large_crop_and_reads_old_states():
    small, large = astronaut_crops()
    chip = np.zeros((150, 150), np.uint8)
    back = FaceState.from_bytes(FaceState(small, chip, large).to_bytes())
    assert np.array_equal(back.large, large) and np.array_equal(back.aligned, small)
    assert FaceState.from_bytes(FaceState(small, chip).to_bytes()).large is None


def test_unknown_renderer_is_refused():
    try:
        IPDFER(dataclasses.replace(EDITOR, renderer="painter"))
    except ValueError as exc:
        assert "painter" in str(exc)
    else:
        raise AssertionError("an unknown renderer was accepted")


def test_a_face_is_edited_the_same_alone_in_a_batch_and_in_training_mode():
    # batch statistics must not shape an edit: with BatchNorm the edits learnt in
    # training were twice the size of those served
    torch.manual_seed(0)
    model = IPDFER(EDITOR)
    torch.nn.init.normal_(model.decoder.head.weight, std=0.05)
    x = torch.rand(6, 1, 64, 64) * 2 - 1
    ident, pose = torch.randn(6, 128), torch.randn(6, EDITOR.pose_dim)
    with torch.no_grad():
        model.train()
        batch = model.render(ident, pose, face=x)
        model.eval()
        alone = model.render(ident[:1], pose[:1], face=x[:1])
    assert (batch - x).abs().max() > 1e-3            # a real edit ...
    # ... the same either way (batched convolutions differ by ~1e-5 between CPUs; batch
    # statistics would move an edit by ~0.1)
    assert torch.allclose(batch[:1], alone, atol=1e-4)


def _pair_faces() -> "FaceSet":
    from model.data.datasets import FaceSet
    from model.labels import EXPRESSIONS, NEUTRAL
    happy = EXPRESSIONS.index("happy")
    rng = np.random.default_rng(0)
    # ann: neutral 0, happy 1, happy 2; bob: happy 3 only (no neutral: never a pair); cy: neutral 4
    subjects = ["ann", "ann", "ann", "bob", "cy"]
    labels = np.array([NEUTRAL, happy, happy, happy, NEUTRAL])
    images = rng.integers(0, 256, (5, 64, 64), dtype=np.uint8)
    return FaceSet("t", "train", images, labels, np.zeros((5, 3), np.float32),
                   np.arange(5 * 128, dtype=np.float32).reshape(5, 128), subjects, [""] * 5, np.zeros(5, bool))


def test_neutral_pairs_match_an_expressive_face_with_the_same_persons_neutral_face():
    from model.data.datasets import NeutralPairs
    faces = _pair_faces()
    pairs = NeutralPairs([faces], seed=1)
    assert sorted(i for _, i in pairs.expressive) == [1, 2]   # bob has no neutral photo
    b = pairs.sample(32)
    assert b["pair_image"].shape == b["pair_target"].shape == (32, 1, 64, 64)
    to_img = lambda t: ((t[0].numpy() + 1) * 127.5).round().astype(np.uint8)  # noqa: E731
    ann_neutral = faces.images[0]
    flipped = 0
    for img, target, ident in zip(b["pair_image"], b["pair_target"], b["pair_identity"]):
        i = int(ident[0]) // 128          # identity rows are numbered
        assert i in (1, 2)
        plain = np.array_equal(to_img(img), faces.images[i])
        assert plain or np.array_equal(to_img(img), faces.images[i][:, ::-1])
        # the target is ann's neutral face, mirrored exactly when the input is
        assert np.array_equal(to_img(target), ann_neutral if plain else ann_neutral[:, ::-1])
        flipped += not plain
    assert 0 < flipped < 32


def test_masked_correlation_reads_only_the_expression_regions():
    from model.nets.losses import masked_correlation
    torch.manual_seed(0)
    a = torch.rand(2, 1, 64, 64)
    mask = torch.from_numpy(facelib.expression_regions(64))
    b = a.clone()
    b[:, :, ~mask] = torch.rand(int((~mask).sum()))   # outside the regions: anything
    assert torch.allclose(masked_correlation(a, b), torch.ones(2), atol=1e-5)
    c = a.clone()
    c[:, :, mask] = -a[:, :, mask]
    assert torch.allclose(masked_correlation(a, c), -torch.ones(2), atol=1e-5)


def test_the_paired_term_trains_the_editor_towards_the_neutral_photo():
    torch.manual_seed(0)
    model = IPDFER(EDITOR)
    torch.nn.init.normal_(model.decoder.head.weight, std=0.05)
    batch = batch_of()
    n = 3
    batch.update(pair_image=batch["image"][:n], pair_target=batch["image"][n:2 * n],
                 pair_identity=batch["identity"][:n])
    objective = GeneratorObjective(dataclasses.replace(LossWeights(), neutral_pair=1.0))
    _, terms = objective(model, batch, discriminator=None, use_identity=False)
    assert 0 < terms["neutral_pair"] < 2
    # only the paired term: descending it raises the correlation with the target
    only = GeneratorObjective(LossWeights(**{f.name: 0.0 for f in dataclasses.fields(LossWeights)}
                                         | {"neutral_pair": 1.0}))
    opt = torch.optim.SGD(model.decoder.parameters(), lr=0.5)
    first = None
    for _ in range(5):
        total, terms = only(model, batch, discriminator=None, use_identity=False)
        first = first if first is not None else terms["neutral_pair"]
        opt.zero_grad(), total.backward(), opt.step()
    assert terms["neutral_pair"] < first
    # without a weight, the term is not computed
    _, terms = GeneratorObjective(LossWeights())(model, batch, discriminator=None, use_identity=False)
    assert "neutral_pair" not in terms


def test_frozen_encoders_keep_their_batchnorm_statistics_through_the_paired_term():
    # freeze_encoders puts E_exp in eval mode; the neutral-class term must not hand it back
    # in training mode, or the paired term's encode (after it) shifts the running statistics
    torch.manual_seed(0)
    model = IPDFER(EDITOR).train()
    model.exp_encoder.eval(), model.exp_head.eval(), model.pose_encoder.eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    batch = batch_of()
    batch.update(pair_image=batch["image"][:3], pair_target=batch["image"][3:], pair_identity=batch["identity"][:3])
    objective = GeneratorObjective(dataclasses.replace(LossWeights(), neutral_pair=1.0))
    objective(model, batch, discriminator=None, use_identity=False)
    assert not model.exp_encoder.training and not any(m.training for m in model.exp_encoder.modules())
    after = model.state_dict()
    changed = [k for k, v in before.items() if k.startswith(("exp_encoder.", "pose_encoder.")) and not torch.equal(v, after[k])]
    assert changed == []
