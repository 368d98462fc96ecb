"""Tests of the shapes detector and prompt scorer."""

import numpy as np
import pytest

from jaxt2i.data import shapes
from jaxt2i.eval import shapes_eval


def _object_accuracy(resolution, n, split, seed):
    """Fraction of scenes whose every object is read back exactly (and scored 'whole')."""
    src = shapes.ShapesSource(resolution, n, split, seed)
    good, scores = 0, []
    for i in range(n):
        scene, cap = src.scene_and_caption(i)
        img = shapes.render(scene, resolution)
        found = shapes_eval.detect_scene(img)
        ok = found["background"] == scene["background"] and len(found["objects"]) == len(
            scene["objects"])
        for o in scene["objects"] if ok else []:
            m = min(found["objects"], key=lambda d: (d["x"] - o["x"]) ** 2 + (d["y"] - o["y"]) ** 2)
            ok &= (m["shape"], m["colour"], m["size"]) == (o["shape"], o["colour"], o["size"])
            ok &= abs(m["x"] - o["x"]) < 0.02 and abs(m["y"] - o["y"]) < 0.02
        s = shapes_eval.score(img, cap)
        scores.append(s)
        good += bool(ok and s["whole"])
    return good / n, shapes_eval.aggregate(scores)


@pytest.mark.parametrize("resolution,n,split", [(64, 400, "train"), (64, 100, "held_out"),
                                                (128, 60, "test"), (256, 20, "train")])
def test_detector_is_accurate_on_renders(resolution, n, split):
    acc, agg = _object_accuracy(resolution, n, split, seed=11)
    assert acc >= 0.99, agg
    for k in ("colour", "shape", "count", "whole"):
        assert agg[k] >= 0.99, (k, agg)


def test_detector_reads_1024():
    acc, _ = _object_accuracy(1024, 2, "train", seed=5)
    assert acc == 1.0


def test_detector_tolerates_noise_and_colour_shift():
    src = shapes.ShapesSource(64, 40, "train", 2)
    rng = np.random.default_rng(0)
    scores = []
    for i in range(len(src)):
        scene, cap = src.scene_and_caption(i)
        img = shapes.render(scene, 64) + rng.normal(0, 10, (64, 64, 3)) + rng.uniform(-20, 20, 3)
        scores.append(shapes_eval.score(np.clip(img, 0, 255).astype(np.uint8), cap))
    assert shapes_eval.aggregate(scores)["whole"] >= 0.95


def test_score_catches_wrong_attributes():
    scene = {"kind": "relation", "background": "white",
             "relation": {"subject": 0, "relation": "above", "object": 1},
             "objects": [{"shape": "circle", "colour": "red", "size": "large", "x": 0.5,
                          "y": 0.25, "r": 0.16},
                         {"shape": "square", "colour": "blue", "size": "small", "x": 0.5,
                          "y": 0.75, "r": 0.1}]}
    img = shapes.render(scene, 64)
    good = shapes_eval.score(img, "a large red circle above a small blue square")
    assert good == {"colour": True, "shape": True, "size": True, "count": True,
                    "relation": True, "background": None, "whole": True}
    assert shapes_eval.score(img, "a red circle below a blue square")["relation"] is False
    assert shapes_eval.score(img, "a green circle above a blue square")["colour"] is False
    assert shapes_eval.score(img, "a red star above a blue square")["shape"] is False
    assert shapes_eval.score(img, "a small red circle above a blue square")["size"] is False
    s = shapes_eval.score(img, "three red circles on a black background")
    assert not s["count"] and not s["background"] and not s["whole"]
    blank = np.full((64, 64, 3), 255, np.uint8)
    assert shapes_eval.detect(blank) == []
    assert shapes_eval.score(blank, "a red circle")["whole"] is False
    agg = shapes_eval.evaluate([img, blank], ["a red circle above a blue square", "a red circle"])
    assert agg["n"] == 2 and agg["whole"] == 0.5 and agg["relation"] == 1.0 and agg["n_relation"] == 1
