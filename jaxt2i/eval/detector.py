"""Reads a shapes-world image back into objects and scores it against its prompt.

The detector estimates the background from the image border, separates foreground pixels
by their distance from it, and splits them into connected blobs. Each blob's colour is the
palette colour whose blend with the background explains its pixels best (anti-aliased
edges are such blends), and its shape is the shape whose anti-aliased template, sized and
placed by the blob's area and centroid, overlaps it most. Generated images with imperfect
colours or edges still read: colours snap to the nearest palette entry and tiny blobs are
ignored.

`score(image, prompt)` checks colour, shape, size, count, relation and background of a
prompt such as 'a red circle above a blue square'; `aggregate` averages many scores.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from jaxt2i.data import shapes

_PALETTE_NAMES = tuple(shapes.COLOURS)
_PALETTE = np.array([shapes.COLOURS[c] for c in _PALETTE_NAMES], np.float32)  # [C, 3]
_BG_NAMES = tuple(shapes.BACKGROUNDS)
_BG = np.array([shapes.BACKGROUNDS[b] for b in _BG_NAMES], np.float32)  # [G, 3]
ATTRIBUTES = ("colour", "shape", "size", "count", "relation", "background", "whole")


def _components(mask: np.ndarray) -> np.ndarray:
    """8-connected components of a bool mask [H, W] -> int32 labels (0 = background).

    Works on horizontal runs, so the Python loops scale with the number of runs (about
    objects x rows), not pixels.
    """
    h, w = mask.shape
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    rows, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)  # exclusive; row-major order pairs them with starts
    parent = list(range(len(starts)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_ptr = np.searchsorted(rows, np.arange(h + 1))
    for y in range(1, h):
        i, i_end, j, j_end = row_ptr[y - 1], row_ptr[y], row_ptr[y], row_ptr[y + 1]
        while i < i_end and j < j_end:  # runs touch (8-connected) if they overlap +-1 px
            if starts[i] <= ends[j] and starts[j] <= ends[i]:
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
            if ends[i] < ends[j]:
                i += 1
            else:
                j += 1
    labels = np.zeros((h, w), np.int32)
    roots: dict[int, int] = {}
    for k in range(len(starts)):
        lab = roots.setdefault(find(k), len(roots) + 1)
        labels[rows[k], starts[k]:ends[k]] = lab
    return labels


def _background(img: np.ndarray) -> np.ndarray:
    """Median colour of the one-pixel border [3]."""
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    return np.median(border, axis=0)


def detect_scene(image: np.ndarray, *, min_area: float = 0.003, max_side: int = 256) -> dict:
    """Reads an image into a structured scene.

    Args:
      image: uint8 [H, W, 3] (a render or a generated sample).
      min_area: blobs smaller than this fraction of the image are ignored (noise, specks).
      max_side: larger images are box-downsampled to this side first (speed; shapes stay
        tens of pixels wide).

    Returns:
      {'background': name, 'objects': [...]} with objects as from `detect`.
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"image shape {img.shape} must be [H, W, 3]; convert to RGB first")
    h0, w0 = img.shape[:2]
    if max(h0, w0) > max_side:
        f = max(h0, w0) / max_side
        size = (max(1, round(w0 / f)), max(1, round(h0 / f)))
        img = np.asarray(Image.fromarray(img.astype(np.uint8)).resize(size, Image.BOX))
    h, w = img.shape[:2]
    sx, sy = w0 / w, h0 / h
    bg = _background(img.astype(np.float32))
    px = img.astype(np.float32) - bg  # [H, W, 3] offsets from the background
    bg_name = _BG_NAMES[int(np.argmin(((_BG - bg) ** 2).sum(1)))]
    delta = _PALETTE - bg  # [C, 3] background -> colour
    d2 = (delta ** 2).sum(1)  # [C]
    fg = np.sqrt((px ** 2).sum(-1)) > 0.45 * math.sqrt(d2.min())
    labels = _components(fg)
    side = math.sqrt(h * w)
    objects = []
    for k in range(1, labels.max() + 1):
        ys, xs = np.nonzero(labels == k)
        if len(ys) < min_area * h * w:
            continue
        # Colour: the palette line bg -> c that best explains the blob's pixels.
        p = px[ys, xs]  # [N, 3]
        alpha = np.clip(p @ delta.T / d2, 0, 1)  # [N, C]
        resid = ((p[:, None, :] - alpha[..., None] * delta) ** 2).sum((0, 2))  # [C]
        c = int(np.argmin(resid))
        y0, y1 = max(0, ys.min() - 2), min(h, ys.max() + 3)
        x0, x1 = max(0, xs.min() - 2), min(w, xs.max() + 3)
        a = np.clip(px[y0:y1, x0:x1] @ delta[c] / d2[c], 0, 1)  # [h', w'] coverage
        own = labels[y0:y1, x0:x1]
        a[(own != 0) & (own != k)] = 0
        area = float(a.sum())
        gx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5
        gy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5
        cx, cy = float((a * gx).sum() / area), float((a * gy).sum() / area)
        # Shape: the template of equal area and centroid that overlaps the blob most.
        best = None
        for s in shapes.SHAPES:
            r = math.sqrt(area / shapes.UNIT_AREA[s])
            bx, by = np.array([cx, cy]) - r * shapes.UNIT_CENTROID[s]
            t = shapes.shape_coverage(s, bx, by, r, gx, gy)
            iou = float(np.minimum(a, t).sum() / np.maximum(a, t).sum())
            if best is None or iou > best[0]:
                best = (iou, s, r, bx, by)
        iou, s, r, bx, by = best
        hx, hy = shapes.UNIT_HALF_EXTENT[s] * r
        objects.append({
            "shape": s, "colour": _PALETTE_NAMES[c],
            "size": "small" if r / side < shapes.SIZE_THRESHOLD else "large",
            "x": bx / w, "y": by / h, "r": r / side,
            "centroid": (cx * sx, cy * sy),
            "bbox": ((bx - hx) * sx, (by - hy) * sy, (bx + hx) * sx, (by + hy) * sy),
            "area": area * sx * sy, "fit": iou,
        })
    return {"background": bg_name, "objects": objects}


def detect(image: np.ndarray, **kwargs) -> list[dict]:
    """Detects the objects of a shapes image.

    Args:
      image: uint8 [H, W, 3].
      **kwargs: `detect_scene` options.

    Returns:
      A list of {'shape', 'colour', 'size', 'x', 'y', 'r' (box centre and radius as
      fractions of the image side), 'centroid' (px), 'bbox' (x0, y0, x1, y1 px), 'area'
      (px), 'fit' (template IoU in [0, 1])}.
    """
    return detect_scene(image, **kwargs)["objects"]


def layout(image: np.ndarray, grid: int = 3, **kwargs) -> tuple:
    """The layout of a shapes image as the detector reads it, for counting distinct samples.

    Returns:
      (background, ((colour, shape, size, column, row), ...) sorted): each object's cell on a
      `grid` x `grid` grid of the image (its centroid's), so two samples with the same objects
      in roughly the same places have the same layout and a moved, recoloured, resized or
      missing object makes another.
    """
    scene = detect_scene(image, **kwargs)
    h, w = np.shape(image)[:2]
    cell = lambda v, n: min(grid - 1, max(0, int(v / n * grid)))  # noqa: E731
    return scene["background"], tuple(sorted(
        (o["colour"], o["shape"], o["size"], cell(o["centroid"][0], w), cell(o["centroid"][1], h))
        for o in scene["objects"]))


def _match(specs: list[dict], found: list[dict]) -> list[list]:
    """Every assignment spec -> detected object (or None) agreeing on most attributes.

    More than one ties when the image mixes up attributes (a blue square and a purple triangle
    for 'a blue triangle ... a purple square' match either way); the first is used for the
    attribute checks, all of them for the relation.
    """
    found = sorted(found, key=lambda o: -o["area"])[:8]
    slots = list(range(len(found))) + [None] * len(specs)
    best, best_key = [], None
    for perm in itertools.permutations(slots, len(specs)):
        if len({i for i in perm if i is not None}) != sum(i is not None for i in perm):
            continue
        key = 0
        for sp, i in zip(specs, perm):
            if i is not None:
                o = found[i]
                key += 1 + (o["colour"] == sp["colour"]) + (o["shape"] == sp["shape"]) + (
                    sp["size"] is None or o["size"] == sp["size"])
        if best_key is None or key > best_key:
            best, best_key = [perm], key
        elif key == best_key and perm not in best:
            best.append(perm)
    return [[None if i is None else found[i] for i in perm] for perm in best]


def score(image: np.ndarray, prompt: str | dict, **kwargs) -> dict:
    """Checks an image against its prompt, attribute by attribute.

    Args:
      image: uint8 [H, W, 3].
      prompt: text ('a red circle above a blue square') or `shapes.parse_caption` output.
      **kwargs: `detect_scene` options.

    Returns:
      {'colour', 'shape', 'count', 'whole': bool; 'size', 'relation', 'background': bool,
      or None where the prompt does not state it; 'found': what was detected, largest first,
      as 'size colour shape' strings (to see why an image failed)}. Objects are matched to
      the prompt's one-to-one; colour/shape/size hold if every prompt object's match has it;
      count if exactly as many objects are found as the prompt names; relation compares box
      centres (the stated direction must dominate) and must hold under every equally good
      matching, so an image that swaps the two objects' attributes does not earn it; whole if
      all stated attributes hold.
    """
    parsed = shapes.parse_caption(prompt) if isinstance(prompt, str) else prompt
    found = detect_scene(image, **kwargs)
    specs = [o for o in parsed["objects"] for _ in range(o["count"])]
    assignments = _match(specs, found["objects"])
    matched = assignments[0]
    pairs = list(zip(specs, matched))
    out = {
        "colour": all(m is not None and m["colour"] == s["colour"] for s, m in pairs),
        "shape": all(m is not None and m["shape"] == s["shape"] for s, m in pairs),
        "size": None if all(s["size"] is None for s in specs) else all(
            m is not None and (s["size"] is None or m["size"] == s["size"]) for s, m in pairs),
        "count": len(found["objects"]) == len(specs),
        "relation": None, "background": None,
    }
    if parsed["relation"]:  # must hold however tied objects are read: no credit for a swap
        out["relation"] = all(a is not None and b is not None and shapes.relation_holds(
            a, b, parsed["relation"], strict=False) for a, b in (m[:2] for m in assignments))
    if parsed["background"]:
        out["background"] = found["background"] == parsed["background"]
    out["whole"] = all(v for v in out.values() if v is not None)
    out["found"] = [f"{o['size']} {o['colour']} {o['shape']}"
                    for o in sorted(found["objects"], key=lambda o: -o["area"])]
    return out


def aggregate(scores: Iterable[dict]) -> dict:
    """Averages `score` outputs.

    Args:
      scores: dicts from `score`.

    Returns:
      {attribute: fraction true over the scores that state it (None if none do)} plus
      'n' (number of scores) and 'n_<attribute>' (how many stated it).
    """
    scores = list(scores)
    out: dict = {"n": len(scores)}
    for k in ATTRIBUTES:
        vals = [s[k] for s in scores if s.get(k) is not None]
        out[k] = float(np.mean(vals)) if vals else None
        out[f"n_{k}"] = len(vals)
    return out


def evaluate(images: Sequence[np.ndarray], prompts: Sequence[str], **kwargs) -> dict:
    """Scores a batch of images against their prompts and averages.

    Args:
      images: uint8 [N, H, W, 3] array or list of [H, W, 3].
      prompts: N prompts.
      **kwargs: `detect_scene` options.

    Returns:
      `aggregate` of the N scores.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one "
                         f"prompt per image")
    return aggregate(score(im, p, **kwargs) for im, p in zip(images, prompts))
