"""The serving copy of the model (BatchNorm folded, channels-last encoders)
computes what the model computes."""
import torch

from model.nets.serving import fold_batchnorm, inference_form
from model.serving.analyzer import Analyzer
from model.weights import DEFAULT_WEIGHTS_DIR, load_weights


def test_the_serving_copy_predicts_what_the_trained_model_predicts():
    model = load_weights(DEFAULT_WEIGHTS_DIR).model.eval()
    served = inference_form(model)
    has_bn = lambda m: any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())  # noqa: E731
    assert not has_bn(served.exp_encoder) and not has_bn(served.pose_encoder)
    assert has_bn(model.exp_encoder)                # the original is left trainable
    torch.manual_seed(0)
    with torch.inference_mode():
        for n in (1, 8, 16):
            x = torch.rand(n, 1, 64, 64) * 2 - 1
            want, got = model.encode(x), served.encode(x)
            for key in ("probs", "logits", "exp", "pose_feat"):
                torch.testing.assert_close(got[key], want[key], atol=2e-5, rtol=1e-4, msg=key)
            torch.testing.assert_close(got["pose"], want["pose"], atol=2e-3, rtol=1e-4)


def test_the_analyzer_serves_the_folded_copy():
    analyzer = Analyzer.load(device="cpu", precision="fp32")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in analyzer.model.exp_encoder.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in analyzer.weights.model.exp_encoder.modules())


def test_every_batchnorm_of_both_shipped_encoders_is_folded():
    # the judge is the ResNet E_exp (ResBlock BN_PAIRS, a Linear + BatchNorm1d head)
    for weights in (DEFAULT_WEIGHTS_DIR, DEFAULT_WEIGHTS_DIR / "judge"):
        model = load_weights(weights).model.eval()
        served = inference_form(model)
        norms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)
        for enc in (served.exp_encoder, served.pose_encoder):
            assert not any(isinstance(m, norms) for m in enc.modules()), weights
        x = torch.rand(4, 1, model.cfg.image_size, model.cfg.image_size) * 2 - 1
        with torch.inference_mode():
            torch.testing.assert_close(served.encode(x)["probs"], model.encode(x)["probs"], atol=2e-5, rtol=1e-4)


def test_a_faceres_expression_encoder_is_folded_too():
    """The FaceRes backbone's ConvBN blocks fold like the others (random weights and
    statistics: folding is checked, not the pretrained graph)."""
    from model.nets.faceres import FaceResEncoder
    torch.manual_seed(0)
    enc = FaceResEncoder(64)
    for m in enc.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.2, 0.2)
    enc.eval()
    x = torch.rand(3, 1, 64, 64) * 2 - 1
    with torch.inference_mode():
        want = enc(x)
        got = fold_batchnorm(enc)(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules())
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
