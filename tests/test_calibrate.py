"""E_exp's ImageNet start, post-hoc logit adjustment, strict configs."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.training import calibrate
from model.config import ModelConfig, TrainConfig, from_dict
from model.nets.networks import IPDFER, MobileNetEncoder, imagenet_mobilenet_path


def test_mobilenet_start_is_torchvisions_imagenet_network_on_grey_faces():
    """The grey face in [-1,1], resized and normalised inside the encoder, gives the
    features torchvision's own ImageNet MobileNetV2 gives the same picture as RGB."""
    from torchvision.models import mobilenet_v2
    enc = MobileNetEncoder(96).eval()
    enc.load_imagenet()
    ref = mobilenet_v2(weights=None).eval()
    ref.load_state_dict(torch.load(imagenet_mobilenet_path(), map_location="cpu", weights_only=True))
    grey = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    rgb = F.interpolate((grey + 1) / 2, size=(96, 96), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = ref.features((rgb - mean) / std).mean(dim=(2, 3))
        assert torch.allclose(enc(grey), expected, atol=1e-4)
        # and not what an untrained network gives
        assert not torch.allclose(MobileNetEncoder(96).eval()(grey), expected, atol=1e-2)


def test_mobilenet_backbone_needs_its_feature_size():
    with pytest.raises(ValueError, match="exp_dim"):
        IPDFER(ModelConfig(exp_backbone="mobilenet_v2", exp_dim=256))
    with pytest.raises(ValueError, match="exp_backbone"):
        IPDFER(ModelConfig(exp_backbone="vgg"))


def test_unknown_config_keys_are_refused():
    with pytest.raises(ValueError, match="epoch"):
        from_dict(TrainConfig, {"epoch": 3})
    with pytest.raises(ValueError, match="image_sise"):
        from_dict(TrainConfig, {"model": {"image_sise": 112}})
    assert from_dict(TrainConfig, {"model": {"image_size": 112}}).model.image_size == 112


def test_logit_adjustment_raises_recall_of_a_rare_class():
    """Known answer: class 1 is rare in training and its logits are shrunk by the
    prior, so plain argmax misses it; tau = 1 undoes exactly that."""
    rng = np.random.default_rng(0)
    prior = np.array([0.9, 0.1])
    labels = np.repeat([0, 1], [300, 300])
    clean = np.where(labels[:, None] == np.arange(2), 2.0, 0.0) + rng.normal(0, 1.0, (600, 2))
    logits = clean + np.log(prior)            # what a classifier trained on the prior learns
    rows = calibrate.sweep((logits, logits), labels, prior, taus=(0.0, 0.5, 1.0))
    by_tau = {r["tau"]: r for r in rows}
    assert by_tau[0.0]["min_class_accuracy"] < 0.6 < by_tau[1.0]["min_class_accuracy"]
    assert by_tau[1.0]["mean_class_accuracy"] > by_tau[0.0]["mean_class_accuracy"] + 0.1
    assert calibrate.choose_tau(rows, max_accuracy_drop=1.0)["tau"] == 1.0
    # an accuracy budget of 0 keeps only taus at least as accurate as tau = 0
    kept = calibrate.choose_tau(rows, max_accuracy_drop=0.0)
    assert kept["accuracy"] >= by_tau[0.0]["accuracy"]


def test_fit_sets_the_models_class_bias(shared_dir):
    """On real faces: the chosen tau lands in the model as -tau * log prior, and
    encode() adds it to the logits."""
    from model.data.datasets import smoke_dataset
    faces = smoke_dataset(64, shared_dir, n=28).faces
    torch.manual_seed(0)
    model = IPDFER(ModelConfig()).eval()
    train_labels = np.repeat(np.arange(7), [50, 40, 30, 20, 10, 5, 2])
    info = calibrate.fit(model, np.asarray(faces.images), faces.labels, train_labels, max_accuracy_drop=1.0)
    prior = calibrate.class_prior(train_labels)
    assert np.allclose(model.class_bias.numpy(), -info["tau"] * np.log(prior), atol=1e-6)
    x = torch.from_numpy(np.asarray(faces.images[:4])).float().unsqueeze(1) / 127.5 - 1
    with torch.no_grad():
        raw = model.exp_head(model.exp_encoder(x))
        assert torch.allclose(model.encode(x)["logits"], raw + model.class_bias, atol=1e-5)
    assert {r["tau"] for r in info["sweep"]} == set(calibrate.TAUS)


def test_expected_calibration_error_tells_calibrated_from_overconfident():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.3, 1.0, 20000)
    labels = np.zeros(20000, dtype=np.int64)
    correct = rng.uniform(size=20000) < conf            # right exactly as often as it claims
    labels[~correct] = 1
    probs = np.stack([conf, 1 - conf], 1)
    assert calibrate.expected_calibration_error(probs, labels) < 0.02
    sure = np.stack([np.full(20000, 0.99), np.full(20000, 0.01)], 1)   # claims 99%, right ~65%
    assert calibrate.expected_calibration_error(sure, labels) > 0.3


def test_temperature_undoes_overconfidence_and_keeps_every_label():
    """Labels drawn from a model's own probabilities; the same model with its
    classifier scaled x3 is overconfident: the fitted temperature is ~3, folded
    into the classifier, and the top labels stay (up to the rare face whose two passes disagree)."""
    torch.manual_seed(0)
    model = IPDFER(ModelConfig()).eval()
    images = (np.random.default_rng(1).uniform(0, 255, (600, 64, 64))).astype(np.uint8)
    with torch.no_grad():
        model.exp_head[-1].weight.mul_(40)   # spread the untrained logits: confident, varied answers
        logits = calibrate.raw_logits(model, images)
        probs = calibrate.served_probs(logits, np.zeros(7))
        labels = np.array([np.random.default_rng(i).choice(7, p=p / p.sum()) for i, p in enumerate(probs)])
        model.exp_head[-1].weight.mul_(3), model.exp_head[-1].bias.mul_(3)
    before = calibrate.served_probs(calibrate.raw_logits(model, images), np.zeros(7))
    fitted = calibrate.fit_temperature(model, images, labels)
    after = calibrate.served_probs(calibrate.raw_logits(model, images), model.class_bias.numpy())
    assert 2.4 <= fitted["temperature"] <= 3.6
    assert fitted["val_ece"]["after"] < fitted["val_ece"]["before"]
    assert (after.argmax(1) == before.argmax(1)).mean() > 0.98
