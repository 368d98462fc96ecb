"""Tests of the procedural shapes world: determinism, splits, captions, rendering."""

import json

import numpy as np
import pytest

from jaxt2i.data import shapes


def test_vocabulary_is_large_enough():
    assert len(shapes.SHAPES) >= 4 and len(shapes.COLOURS) >= 6 and len(shapes.SIZES) == 2
    assert set(shapes.RELATIONS) == {"left of", "right of", "above", "below"}
    assert len(shapes.BACKGROUNDS) >= 2
    palette = np.array(list(shapes.COLOURS.values()) + list(shapes.BACKGROUNDS.values()), float)
    dist = np.sqrt(((palette[:, None] - palette[None]) ** 2).sum(-1))
    assert dist[~np.eye(len(palette), dtype=bool)].min() > 75  # robustly distinguishable


def test_source_is_deterministic_and_random_access():
    a = shapes.ShapesSource(32, 50, "train", seed=3)
    b = shapes.ShapesSource(32, 50, "train", seed=3)
    for i in (7, 0, 49):
        x, y = a[i], b[i]
        assert x["caption"] == y["caption"] and x["scene"] == y["scene"]
        np.testing.assert_array_equal(x["image"], y["image"])
        assert x["image"].shape == (32, 32, 3) and x["image"].dtype == np.uint8
    assert a[1]["caption"] != a[2]["caption"] or a[1]["scene"] != a[2]["scene"]
    assert shapes.ShapesSource(32, 50, "train", seed=4)[7]["scene"] != a[7]["scene"]
    with pytest.raises(IndexError):
        a[50]


def test_splits_hold_out_combinations():
    train = shapes.ShapesSource(16, 300, "train")
    held = shapes.ShapesSource(16, 100, "held_out")
    train_scenes = [train.scene_and_caption(i)[0] for i in range(len(train))]
    assert not any(shapes.is_held_out(s) for s in train_scenes)
    assert all(shapes.is_held_out(held.scene_and_caption(i)[0]) for i in range(len(held)))
    for s in train_scenes:
        assert not any((o["colour"], o["shape"]) in shapes.HELD_OUT_COLOUR_SHAPES
                       for o in s["objects"])
    kinds = {s["kind"] for s in train_scenes}
    assert kinds == {"single", "relation", "count", "and"}
    counts = {len(s["objects"]) for s in train_scenes}
    assert counts == {1, 2, 3}


def test_scene_kind_mix():
    """data.shapes_kinds: kinds left out never appear, weights set the odds, default unchanged."""
    default = shapes.ShapesSource(16, 40, "train", seed=5)
    for same in (None, "", {"single": 25, "relation": 35, "count": 20, "and": 20}):
        other = shapes.ShapesSource(16, 40, "train", seed=5, kinds=same)
        assert [other.caption_at(i) for i in range(40)] == [default.caption_at(i)
                                                            for i in range(40)]
    only = shapes.ShapesSource(16, 200, "held_out", seed=1, kinds="relation=1")
    assert {only.scene_and_caption(i)[0]["kind"] for i in range(200)} == {"relation"}
    # 'single' and 'count' scenes both hold one (colour, shape) pair, so the held-out filter
    # rejects them equally often and their odds stay those asked for: 3 to 1.
    mix = shapes.ShapesSource(16, 1200, "train", seed=2, kinds="single=1, count=3")
    kinds = [mix.scene_and_caption(i)[0]["kind"] for i in range(1200)]
    assert set(kinds) == {"single", "count"}
    assert abs(kinds.count("count") / len(kinds) - 0.75) < 0.04  # ~3 standard deviations
    assert "kinds=single=0.25,relation=0,count=0.75,and=0" in repr(mix)
    for bad, msg in [("single=1,pair=2", "unknown kind 'pair'"), ("single=-1", ">= 0"),
                     ("single=0", "positive sum"), ("single", "numbers >= 0")]:
        with pytest.raises(ValueError, match=msg):
            shapes.ShapesSource(16, 4, "train", kinds=bad)


def test_captions_parse_back_to_the_scene():
    src = shapes.ShapesSource(16, 300, "train", seed=1)
    for i in range(len(src)):
        scene, cap = src.scene_and_caption(i)
        parsed = shapes.parse_caption(cap)
        objs = scene["objects"]
        assert sum(o["count"] for o in parsed["objects"]) == len(objs), cap
        if scene["relation"]:
            rel = scene["relation"]
            assert parsed["relation"] == rel["relation"]
            a, b = objs[rel["subject"]], objs[rel["object"]]
            assert (parsed["objects"][0]["shape"], parsed["objects"][0]["colour"]) == (
                a["shape"], a["colour"])
            assert (parsed["objects"][1]["shape"], parsed["objects"][1]["colour"]) == (
                b["shape"], b["colour"])
            # Unambiguous: the stated direction clearly holds, the converse does not.
            assert shapes.relation_holds(a, b, rel["relation"])
            assert not shapes.relation_holds(b, a, rel["relation"], strict=False)
        else:
            assert parsed["relation"] is None
            want = sorted((o["colour"], o["shape"]) for o in objs)
            got = sorted((g["colour"], g["shape"]) for g in parsed["objects"]
                         for _ in range(g["count"]))
            assert want == got, cap
        for g in parsed["objects"]:
            if g["size"]:
                assert any(o["size"] == g["size"] and o["shape"] == g["shape"] for o in objs)
        assert parsed["background"] in (None, scene["background"])


def test_parse_prompt_forms():
    p = shapes.parse_caption("Two green triangles on a white background.")
    assert p == {"objects": [{"count": 2, "size": None, "colour": "green", "shape": "triangle"}],
                 "relation": None, "background": "white"}
    p = shapes.parse_caption("a small red circle to the left of an orange cross")
    assert p["relation"] == "left of" and p["objects"][0]["size"] == "small"
    assert p["objects"][1]["colour"] == "orange" and p["objects"][1]["shape"] == "cross"
    p = shapes.parse_caption("a red star, a blue square and a yellow circle")
    assert [o["shape"] for o in p["objects"]] == ["star", "square", "circle"]
    with pytest.raises(ValueError, match="cannot parse"):
        shapes.parse_caption("a teal dodecahedron")


def test_render_is_antialiased_at_any_resolution():
    scene = {"kind": "single", "background": "white", "relation": None,
             "objects": [{"shape": "star", "colour": "blue", "size": "large",
                          "x": 0.5, "y": 0.5, "r": 0.16}]}
    blue = np.array(shapes.COLOURS["blue"])
    for res in (16, 64, 1024):
        img = shapes.render(json.dumps(scene), res).astype(int)
        assert img.shape == (res, res, 3)
        assert (img == 255).all(-1).any() and (img == blue).all(-1).any()
        mixed = ~(img == 255).all(-1) & ~(img == blue).all(-1)
        assert mixed.sum() > 0  # edge pixels are blends, not jagged steps
    # Coverage of a render is resolution-independent: the blue area fraction agrees.
    def blue_fraction(res):
        img = shapes.render(scene, res).astype(float)
        return ((255 - img[..., 0]) / (255 - blue[0])).mean()
    assert abs(blue_fraction(32) - blue_fraction(256)) < 0.003
    area = shapes.UNIT_AREA["star"] * 0.16 ** 2
    assert abs(blue_fraction(256) - area) < 0.002
