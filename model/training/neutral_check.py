"""Neutral renders of real photos, judged against the same person's real neutral photos.

On the muxspace test people (identity-disjoint from training) who have both a
neutral and an expressive photo, every photo goes through the service's own path
(`Analyzer`: MTCNN, alignment, encoders, renderer), as `ipdfer predict --neutral-dir`
runs it. For each expressive photo's neutral render it prints:

- identity: rank-1 of the render's dlib descriptor among all these people's real
  neutral photos, and how often it passes dlib's 0.6 threshold against a different
  person's neutral photo (one drawn per render, and against any of them);
- closer: the render correlates better with the person's real neutral photos than
  the expressive input does (aligned crops; a render equal to its input is not closer),
  and, as a control, how often it is closer to another person's neutral photo;
- sharpness: median Laplacian variance, render / the person's real neutral photos;
- judged neutral by a separately trained classifier (--judge);
- residue energy inside the eye/brow and mouth regions (from the aligned landmarks);
- render speed at batch 1 and 32.

Each figure has its control: the same measure on the input itself, on a blurred
input (a degenerate "render" that blur alone would make pass), and on the real
neutral photos.

Run it with `benchmarks/neutral_render.py` or `ipdfer evaluate --neutral-photos`.
"""
from __future__ import annotations

import csv
import io
import json
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
from PIL import Image

from model import faces as facelib
from model.images import load_image
from model.faces.identity import IDENTITY_THRESHOLD
from model.serving.analyzer import Analyzer, ImageRequest, residue_heatmap
from model.labels import EXPRESSIONS, NEUTRAL
from model.nets.mirror import encode_with_mirror
from model.nets.networks import IPDFER
from model.paths import MANIFEST_DIR

MANIFEST = MANIFEST_DIR / "muxspace.csv"
BLUR_SIGMA = 2.0   # the blurred-input control


def people_with_both(manifest: Path, split: str) -> dict[str, dict[str, list[str]]]:
    """person -> {"neutral": [paths], "expressive": [paths]} for people with both."""
    people: dict[str, dict[str, list[str]]] = defaultdict(lambda: {"neutral": [], "expressive": []})
    with open(manifest, newline="") as f:
        for row in csv.DictReader(f):
            if row["split"] != split or row["label"] not in EXPRESSIONS or not row["subject"]:
                continue
            kind = "neutral" if row["label"] == "neutral" else "expressive"
            people[row["subject"]][kind].append(row["path"])
    return {p: v for p, v in sorted(people.items()) if v["neutral"] and v["expressive"]}


def laplacian_variance(img: np.ndarray) -> float:
    return float(cv2.Laplacian(img.astype(np.float64), cv2.CV_64F).var())


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-9))


def canonical_chip(crop: np.ndarray) -> np.ndarray:
    """dlib chip of an aligned crop: its 5 points are the canonical template."""
    r = crop.shape[0]
    return facelib.identity_chip(crop, facelib.CANONICAL_LANDMARKS * r - 0.5)


def rate(x) -> float:
    return round(float(np.mean(x)), 4) if len(x) else float("nan")


def classifier_judge(model: IPDFER) -> Callable[[list[np.ndarray]], np.ndarray]:
    """grey face crops -> (N,7) probabilities of an IPD-FER classifier (mirror averaged)."""
    def probs(crops: list[np.ndarray]) -> np.ndarray:
        s = model.cfg.image_size
        small = [cv2.resize(c, (s, s), interpolation=cv2.INTER_AREA) for c in crops]
        with torch.inference_mode():
            return encode_with_mirror(model.encode, facelib.to_model_input(small), margin=1.0)["probs"].numpy()
    return probs


def neutral_photo_check(analyzer: Analyzer, judge: IPDFER, root: Path, manifest: Path = MANIFEST,
                        split: str = "test", out: Path | None = None, seed: int = 0,
                        more_judges: dict[str, Callable[[list[np.ndarray]], np.ndarray]] | None = None) -> dict:
    """Every figure above, printed and returned; `root` is the muxspace folder.
    `more_judges` (name -> crops -> probabilities) judge the renders too, each
    with the same controls (`judged_neutral_by` in the report)."""
    torch.manual_seed(seed)
    people = people_with_both(manifest, split)
    n_expr = sum(len(v["expressive"]) for v in people.values())
    print(f"{len(people)} people with neutral and expressive photos; {n_expr} expressive photos")

    print(f"weights {analyzer.info['version']} ({analyzer.weights.config.renderer})")

    # 1. every photo through the service's path --------------------------------------
    t0 = time.time()
    faces: dict[str, object] = {}          # path -> FacePrediction (largest/best face)
    renders: dict[str, np.ndarray] = {}    # expressive path -> neutral render (uint8)
    for person, v in people.items():
        paths = v["neutral"] + v["expressive"]
        images = [load_image(root / p) for p in paths]
        want = [p in v["expressive"] for p in paths]
        analysis = analyzer.analyze([ImageRequest(image, max_faces=1, neutral=w) for image, w in zip(images, want)])
        for p, w, res in zip(paths, want, analysis.images):
            if not res.faces:
                continue
            faces[p] = res.faces[0]
            if w:
                renders[p] = np.array(Image.open(io.BytesIO(res.faces[0].neutral_png)).convert("L"))
    print(f"analysed {len(faces)} of {sum(len(v['neutral']) + len(v['expressive']) for v in people.values())} "
          f"photos in {time.time() - t0:.0f}s ({len(renders)} renders)")
    size = next(iter(renders.values())).shape[0]
    large = lambda p: analyzer._large(faces[p].state)  # noqa: E731 - the input crop at render size

    # 2. descriptors ---------------------------------------------------------------------
    def describe(chips: list[np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return np.concatenate([analyzer.identity(facelib.identity_input(chips[s:s + 64])).numpy()
                                   for s in range(0, len(chips), 64)])

    refs = [(person, p) for person, v in people.items() for p in v["neutral"] if p in faces]
    ref_desc = describe([faces[p].state.chip for _, p in refs])
    ref_person = np.array([person for person, _ in refs])
    expr = [(person, p) for person, v in people.items() for p in v["expressive"] if p in renders]
    expr_person = np.array([person for person, _ in expr])
    blurred = {p: cv2.GaussianBlur(large(p), (0, 0), BLUR_SIGMA) for _, p in expr}
    kinds = {"render": lambda p: renders[p], "input": large, "blurred input": lambda p: blurred[p]}
    desc = {k: describe([canonical_chip(f(p)) for _, p in expr]) for k, f in kinds.items()}
    desc["input photo"] = describe([faces[p].state.chip for _, p in expr])

    rng = random.Random(seed)
    others = [int(np.flatnonzero(ref_person != person)[rng.randrange(int((ref_person != person).sum()))])
              for person in expr_person]
    report: dict = {"people": len(people), "expressive_photos": len(expr), "reference_photos": len(refs),
                    "render_size": size, "weights": analyzer.info["version"], "identity": {}}
    print(f"\nidentity (dlib port, threshold {IDENTITY_THRESHOLD}; {len(refs)} real neutral photos of "
          f"{len(people)} people)")
    print(f"{'':16s} {'rank-1':>8s} {'impostor':>9s} {'any impostor':>13s} {'own dist':>9s}")
    for k, d in desc.items():
        dist = np.linalg.norm(d[:, None, :] - ref_desc[None], axis=2)      # (renders, refs)
        rank1 = ref_person[dist.argmin(1)] == expr_person
        impostor = dist[np.arange(len(expr)), others] < IDENTITY_THRESHOLD
        any_imp = np.array([(dist[i, ref_person != expr_person[i]] < IDENTITY_THRESHOLD).any()
                            for i in range(len(expr))])
        own = np.array([dist[i, ref_person == expr_person[i]].min() for i in range(len(expr))])
        report["identity"][k] = {"rank1": rate(rank1), "impostor_pass": rate(impostor),
                                 "any_impostor_pass": rate(any_imp), "median_own_distance": round(float(np.median(own)), 4)}
        print(f"{k:16s} {rank1.mean():8.1%} {impostor.mean():9.1%} {any_imp.mean():13.1%} {np.median(own):9.3f}")

    # 3. closer to the real neutral face, sharpness ------------------------------------------------
    ref_crops = defaultdict(list)
    for person, p in refs:
        ref_crops[person].append(large(p))
    closer, changed = defaultdict(list), []
    sharp = defaultdict(list)
    ref_sharp = {person: np.median([laplacian_variance(c) for c in cs]) for person, cs in ref_crops.items()}
    # control: closer to a *different* person's neutral photo too? An edit towards an
    # average face would be; an edit that removes the expression much less so
    closer_other = defaultdict(list)
    for (person, p), other in zip(expr, others):
        inp = large(p)
        c_in = np.mean([correlation(inp, r) for r in ref_crops[person]])
        other_crop = large(refs[other][1])
        c_in_other = correlation(inp, other_crop)
        differs = float(np.abs(renders[p].astype(int) - inp.astype(int)).mean()) >= 0.5
        changed.append(differs)
        for k, img in (("render", renders[p]), ("blurred input", blurred[p])):
            c = np.mean([correlation(img, r) for r in ref_crops[person]])
            closer[k].append(c > c_in and (differs or k != "render"))
            closer_other[k].append(correlation(img, other_crop) > c_in_other and (differs or k != "render"))
        for k, img in (("render", renders[p]), ("input", inp), ("blurred input", blurred[p])):
            sharp[k].append(laplacian_variance(img) / max(ref_sharp[person], 1e-9))
    report["closer_than_input"] = {k: rate(v) for k, v in closer.items()}
    report["closer_to_another_person_than_input"] = {k: rate(v) for k, v in closer_other.items()}
    report["render_differs_from_input"] = rate(changed)
    report["sharpness_ratio_median"] = {k: round(float(np.median(v)), 4) for k, v in sharp.items()}
    print(f"\ncloser to the real neutral photos than the input: render {rate(closer['render']):.1%} "
          f"(renders that differ from their input: {rate(changed):.1%}); control, blurred input "
          f"(sigma {BLUR_SIGMA}): {rate(closer['blurred input']):.1%}")
    print(f"control, closer to another person's neutral photo than the input: render "
          f"{rate(closer_other['render']):.1%}, blurred input {rate(closer_other['blurred input']):.1%}")
    print("sharpness, median Laplacian variance / the person's real neutral photos: "
          + ", ".join(f"{k} {np.median(v):.3f}" for k, v in sharp.items()))

    # 4. judged neutral by a separately trained classifier (and any other judge) -----------------------
    crops = {"render": [renders[p] for _, p in expr], "input": [large(p) for _, p in expr],
             "blurred input": [blurred[p] for _, p in expr], "real neutral photos": [large(p) for _, p in refs]}
    report["judged_neutral_by"] = {}
    for name, judge_probs in {"judge": classifier_judge(judge), **(more_judges or {})}.items():
        judged = {k: judge_probs(v).argmax(1) == NEUTRAL for k, v in crops.items()}
        report["judged_neutral_by"][name] = {k: rate(v) for k, v in judged.items()}
        print(f"\njudged neutral by {name}: " + ", ".join(f"{k} {v.mean():.1%}" for k, v in judged.items()))
    report["judged_neutral"] = report["judged_neutral_by"]["judge"]

    # 5. where the residue is ---------------------------------------------------------------------
    states = [faces[p].state for _, p in expr]
    mask = facelib.expression_regions(size)
    inside = []
    residues = []
    for s in range(0, len(states), 32):
        _, diff = analyzer._render(states[s:s + 32], residue=True)
        residues += list(diff)
        energy = diff.astype(np.float64) ** 2
        inside += list(energy[:, mask].sum(1) / np.maximum(energy.sum((1, 2)), 1e-12))
    report["residue_energy_in_regions"] = {"median_share": round(float(np.median(inside)), 4),
                                           "area_share": round(float(mask.mean()), 4)}
    print(f"\nresidue energy inside the eye/brow + mouth regions: median {np.median(inside):.1%} "
          f"of the energy on {mask.mean():.1%} of the area")

    # 6. speed ----------------------------------------------------------------------------------
    speed = {}
    for batch in (1, 32):
        chunk = (states * 32)[:batch]
        analyzer._render(chunk)
        best = min(_timed(lambda: analyzer._render(chunk)) for _ in range(3))
        speed[batch] = round(batch / best, 1)
    report["render_faces_per_s"] = speed
    print(f"\nneutral render speed ({torch.get_num_threads()} threads; encoders, E_id and the renderer): "
          + ", ".join(f"batch {b}: {v} faces/s" for b, v in speed.items()))

    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "neutral_photos.json").write_text(json.dumps(report, indent=2) + "\n")
        _grid(expr[:: max(1, len(expr) // 8)][:8], large, renders, residues[:: max(1, len(expr) // 8)][:8],
              ref_crops, out / "neutral_muxspace_test.png")
        print(f"wrote {out / 'neutral_photos.json'} and {out / 'neutral_muxspace_test.png'}")
    return report


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _grid(rows, large, renders, residues, ref_crops, path: Path) -> None:
    """input | neutral render | residue | a real neutral photo of the person."""
    tiles = []
    for (person, p), res in zip(rows, residues):
        inp = large(p)
        rgb = lambda g: cv2.cvtColor(g, cv2.COLOR_GRAY2RGB)  # noqa: E731
        tiles.append(np.hstack([rgb(inp), rgb(renders[p]), residue_heatmap(inp, res), rgb(ref_crops[person][0])]))
    Image.fromarray(np.vstack(tiles)).save(path)

