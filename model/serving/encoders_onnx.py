"""The served encoders (E_exp + E_pose with their heads, one pass: `IPDFER.encode(x)`
without the mirror image) as one ONNX graph, run by ONNX Runtime on the CPU. The
mirror pass, where the weights are served with it, is a second run of the same
graph on the faces that need it (mirror.py).

Why: on a 2-core CPU most of the encoders' time at small batches is PyTorch's
per-operator overhead, which ONNX Runtime mostly avoids. benchmarks/encoder_speed.py
on an AVX2 CPU (AMD EPYC), the encoders as served (then face and mirror in every
pass), faces/s PyTorch -> ONNX Runtime: one thread 91 -> 243 at batch 1 and
189 -> 246 at batch 32; two threads 107 -> 288 and 247 -> 462.

The graph is exported once, offline, next to the weights it came from
(`ipdfer export-onnx`, which needs the `export` extra: onnx, onnxscript), and the
manifest records its sha256, the sha256 of that `.pt` and its form; a graph of
other weights, or of the older joint form (face and mirror in one graph), is
never loaded. Serving needs only `onnxruntime`."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from model.fileio import atomic_write_text
from model.serving.onnx import REEXPORT, cpu_session, export_verified, graph_record
from model.weights import MANIFEST, LoadedWeights, load_weights

ONNX_FILE = "encoders.onnx"
INPUT = "face"
OUTPUTS = ("logits", "probs", "pose", "exp", "pose_feat")
# What the graph computes. Graphs before it (no "form") ran face + mirror jointly.
FORM = "one-pass"


class ServedEncoders(torch.nn.Module):
    """`model.encode(x)`, one pass without the mirror image, for any batch size
    (`model` is `inference_form`'s copy: no BatchNorm left)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.encode(x)
        return tuple(out[k] for k in OUTPUTS)


def onnx_entry(weights: LoadedWeights) -> dict | None:
    """The manifest's record of the graph, when it was exported from these weights,
    in today's form, and its file is there."""
    entry = weights.manifest.get("onnx")
    if (entry and entry.get("source_sha256") == weights.manifest["sha256"] and entry.get("form") == FORM
            and weights.directory is not None and (weights.directory / entry["file"]).is_file()):
        return entry
    return None


class OnnxEncoders:
    """Runs the exported graph: a (N, 1, S, S) float tensor in, `encode`'s dict out
    (torch tensors on the CPU)."""

    def __init__(self, path: Path, sha256: str, threads: int, fix: str = REEXPORT) -> None:
        self.session = cpu_session(path, sha256, threads, fix)

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.session.run(list(OUTPUTS), {INPUT: x.detach().cpu().float().numpy()})
        return {k: torch.from_numpy(v) for k, v in zip(OUTPUTS, outputs)}


def load_onnx_encoders(weights: LoadedWeights, threads: int) -> OnnxEncoders:
    entry = onnx_entry(weights)
    if entry is None:
        raise FileNotFoundError(f"no {ONNX_FILE} exported from these weights "
                                f"(sha256 {weights.manifest['sha256'][:12]}…) in the {FORM} form: "
                                f"run ipdfer export-onnx")
    return OnnxEncoders(weights.directory / entry["file"], entry["sha256"], threads)


def export_onnx(weights_dir: Path, opset: int = 18, check_batches: tuple[int, ...] = (1, 5, 32)) -> dict:
    """Write `encoders.onnx` beside the weights and record it in their manifest;
    returns that record. The graph is checked against PyTorch before it is kept."""
    from model.nets.serving import inference_form
    loaded = load_weights(weights_dir)
    served = ServedEncoders(inference_form(loaded.model)).eval()
    s = loaded.config.image_size
    generator = torch.Generator().manual_seed(0)
    checks = [torch.rand(n, 1, s, s, generator=generator) * 2 - 1 for n in check_batches]
    path, worst = export_verified(served, torch.zeros(2, 1, s, s), checks, weights_dir / ONNX_FILE, opset=opset,
                                  input_name=INPUT, output_names=OUTPUTS, tolerance=1e-3,
                                  dynamic_shapes={0: torch.export.Dim("batch", min=1, max=4096)})
    entry = graph_record(path, source_sha256=loaded.manifest["sha256"], form=FORM, opset=opset,
                         torch=torch.__version__, outputs=list(OUTPUTS), max_abs_diff=worst)
    manifest = {**loaded.manifest, "onnx": entry}
    atomic_write_text(weights_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return entry

