"""The PyTorch port of dlib's face-recognition ResNet against dlib's own outputs
(testvectors/dlib_resnet/descriptors.json, computed by dlib 20.0.1)."""

import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.faces.identity import (
    IDENTITY_THRESHOLD,
    DlibResNet,
    descriptor_distance,
    dlib_model_path,
    load_identity_encoder,
)

TOL = 1e-4


@pytest.fixture(scope="module")
def golden(shared_dir: Path) -> dict:
    return json.loads((shared_dir / "testvectors/dlib_resnet/descriptors.json").read_text())


@pytest.fixture(scope="module")
def encoder() -> DlibResNet:
    return load_identity_encoder()


@pytest.fixture(scope="module")
def chips(golden: dict, shared_dir: Path) -> torch.Tensor:
    """(N, 3, 150, 150) float RGB; convert("RGB") replicates a grayscale PNG."""
    folder = shared_dir / "testvectors/dlib_resnet"
    images = [np.array(Image.open(folder / f["chip"]).convert("RGB")) for f in golden["faces"]]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()


@pytest.fixture(scope="module")
def descriptors(encoder: DlibResNet, chips: torch.Tensor, golden: dict) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        out = encoder(chips)
    return {f["name"]: d for f, d in zip(golden["faces"], out)}


def test_descriptors_match_dlib(golden: dict, descriptors: dict[str, torch.Tensor]) -> None:
    for face in golden["faces"]:
        diff = (descriptors[face["name"]] - torch.tensor(face["descriptor"])).abs().max().item()
        assert diff < TOL, f"{face['name']}: max abs diff {diff:.2e}"


def test_pairwise_distances_match_dlib(golden: dict, descriptors: dict[str, torch.Tensor]) -> None:
    pairs = golden["pairwise_euclidean"]
    assert len(pairs) == len(list(combinations(golden["faces"], 2)))
    for key, expected in pairs.items():
        a, b = key.split("|")
        assert abs(descriptor_distance(descriptors[a], descriptors[b]).item() - expected) < TOL, key


def test_same_person_below_threshold_different_above(golden: dict, descriptors: dict[str, torch.Tensor]) -> None:
    for fa, fb in combinations(golden["faces"], 2):
        dist = descriptor_distance(descriptors[fa["name"]], descriptors[fb["name"]]).item()
        if fa["identity"] == fb["identity"]:
            assert dist < IDENTITY_THRESHOLD, (fa["name"], fb["name"], dist)
        else:
            assert dist > IDENTITY_THRESHOLD, (fa["name"], fb["name"], dist)


def test_encoder_is_frozen_but_passes_gradients(encoder: DlibResNet, chips: torch.Tensor) -> None:
    assert not encoder.training
    assert all(not p.requires_grad for p in encoder.parameters())
    # A frozen E_id must still backpropagate to its input (identity loss on renders).
    x = chips[:1].clone().requires_grad_(True)
    encoder(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.parameters())


def test_rejects_wrong_input_shape(encoder: DlibResNet) -> None:
    with pytest.raises(ValueError, match="150"):
        encoder(torch.zeros(1, 3, 112, 112))


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _trailing_byte(data: bytes) -> bytes:
    return data + b"\x00"


def _renamed_layer(data: bytes) -> bytes:
    return data.replace(b"con_4", b"con_9", 1)


def _missing_last_byte(data: bytes) -> bytes:
    return data[:-1]


@pytest.mark.parametrize("corrupt", [_truncated, _missing_last_byte, _trailing_byte, _renamed_layer])
def test_malformed_file_raises_value_error(corrupt, tmp_path: Path) -> None:
    bad = tmp_path / "bad.dat"
    bad.write_bytes(corrupt(dlib_model_path().read_bytes()))
    with pytest.raises(ValueError):
        load_identity_encoder(path=bad)
