"""Zero-shot retrieval accuracy of a CLIP on captioned scenes, from a similarity matrix.

For N scenes and their N captions, image->text top-1 asks whether the caption an image scores
highest is its own; text->image top-1 whether the image a caption scores highest is its own.
Shapes captions repeat ('a red circle' can caption two scenes), so a retrieved item counts as
right when its caption is the same text as the query's: such a caption describes both scenes
equally. Chance is then the mean share of equal captions (1/N when all differ). The attribute
accuracy asks less: does the top caption name the right colour-shape pairs (sizes, counts,
relations and background ignored; `shapes.parse_caption`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def caption_objects(caption: str) -> tuple:
    """The sorted (colour, shape) pairs a shapes caption names (each once)."""
    from jaxt2i.data.shapes import parse_caption

    return tuple(sorted({(o["colour"], o["shape"]) for o in parse_caption(caption)["objects"]}))


def retrieval_accuracy(similarity: np.ndarray, captions: Sequence[str]) -> dict[str, float]:
    """Top-1 retrieval accuracies.

    Args:
      similarity: [N images, N captions]; row i is image i, column j caption j, and caption i
        belongs to image i.
      captions: the N captions.

    Returns:
      image_to_text, text_to_image, attribute (image->text, colour-shape pairs right),
      chance (of the first two under a random ranking), attribute_chance.
    """
    sim = np.asarray(similarity, np.float64)
    n = len(captions)
    if sim.shape != (n, n):
        raise ValueError(f"similarity must be [N, N] for N={n} captions, got {sim.shape}")
    caps = np.asarray(list(captions), dtype=object)
    same = caps[:, None] == caps[None, :]  # [N, N] equal caption text
    keys = [caption_objects(c) for c in captions]
    same_attr = np.array([[a == b for b in keys] for a in keys])
    rows = np.arange(n)
    top_text = sim.argmax(axis=1)  # per image: the best caption
    top_image = sim.argmax(axis=0)  # per caption: the best image
    return {"image_to_text": float(same[rows, top_text].mean()),
            "text_to_image": float(same[top_image, rows].mean()),
            "attribute": float(same_attr[rows, top_text].mean()),
            "chance": float(same.mean()), "attribute_chance": float(same_attr.mean())}
