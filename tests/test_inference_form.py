"""The serving copy of the model (BatchNorm folded, channels-last encoders, face
and mirror in one E_exp call at small batches) computes what the model computes."""
import torch

from model.inference import Analyzer, inference_form
from model.weights import DEFAULT_WEIGHTS_DIR, load_weights


def test_the_serving_copy_predicts_what_the_trained_model_predicts():
    model = load_weights(DEFAULT_WEIGHTS_DIR).model.eval()
    served = inference_form(model)
    has_bn = lambda m: any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())  # noqa: E731
    assert not has_bn(served.exp_encoder) and not has_bn(served.pose_encoder)
    assert has_bn(model.exp_encoder)                # the original is left trainable
    torch.manual_seed(0)
    with torch.inference_mode():
        for n in (1, served.JOINT_MIRROR_MAX, 16):  # joint mirror pass, and separate
            x = torch.rand(n, 1, 64, 64) * 2 - 1
            want, got = model.encode(x, flip_tta=True), served.encode(x, flip_tta=True)
            for key in ("probs", "logits", "exp", "pose_feat"):
                torch.testing.assert_close(got[key], want[key], atol=2e-5, rtol=1e-4, msg=key)
            torch.testing.assert_close(got["pose"], want["pose"], atol=2e-3, rtol=1e-4)


def test_the_joint_mirror_pass_equals_two_passes():
    model = inference_form(load_weights(DEFAULT_WEIGHTS_DIR).model)
    x = torch.rand(3, 1, 64, 64) * 2 - 1
    with torch.inference_mode():
        joint = model.encode(x, flip_tta=True)
        model.JOINT_MIRROR_MAX = 0
        separate = model.encode(x, flip_tta=True)
    torch.testing.assert_close(joint["probs"], separate["probs"], atol=1e-6, rtol=1e-5)
    assert not torch.equal(joint["probs"], model.encode(x)["probs"])   # the mirror pass counts


def test_the_analyzer_serves_the_folded_copy():
    analyzer = Analyzer.load(device="cpu", precision="fp32")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in analyzer.model.exp_encoder.modules())
