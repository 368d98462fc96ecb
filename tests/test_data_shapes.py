"""Tests of the procedural shapes world: determinism, splits, captions, rendering."""

import json
import re

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


# --- Chinese captions (issue #28) ---------------------------------------------------------

# sha256 of '\n'.join(ShapesSource(16, 500, split, seed=3).caption_at(i) for i in range(500)),
# taken before Chinese captions were added: the English captions must never change.
_ENGLISH_CAPTIONS_SHA256 = {
    "train": "c460ff351b7df2ea646a824940c117bda08b52d2c5e22ec489d9d13ea5ef9171",
    "test": "92506caec7587c18f513182433f80ff55816227a82b54608be5893a8759f7a42",
    "held_out": "3b29d3a606c529897a9369df2f186426c9867601b02293bdc7578f9da5a055d9",
}


@pytest.mark.parametrize("split", shapes.SPLITS)
def test_english_captions_are_unchanged(split):
    import hashlib

    for src in (shapes.ShapesSource(16, 500, split, seed=3),
                shapes.ShapesSource(16, 500, split, seed=3, language="en")):
        text = "\n".join(src.caption_at(i) for i in range(500))
        assert hashlib.sha256(text.encode()).hexdigest() == _ENGLISH_CAPTIONS_SHA256[split]


def _zh_and_en(split, n, seed=0):
    """n (scene, English caption, Chinese caption), both captions from one rng state."""
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, shapes.SPLITS.index(split), i])
        scene = shapes.sample_scene(rng, split)
        state = rng.bit_generator.state
        en = shapes.caption(scene, rng)
        rng.bit_generator.state = state
        out.append((scene, en, shapes.caption(scene, rng, "zh")))
    return out


@pytest.mark.parametrize("split", shapes.SPLITS)
def test_chinese_captions_state_what_the_english_ones_do(split):
    """From one rng state the two captions name the same objects, sizes, relation and
    background: they parse to the same structure; and every Chinese template appears."""
    seen = set()
    for scene, en, zh in _zh_and_en(split, 400):
        assert shapes.parse_caption(zh) == shapes.parse_caption(en), (en, zh)
        assert zh.isascii() is False and not any(c.isascii() and c.isalpha() for c in zh), zh
        seen |= {form for form in ("在", "有", "图中", "背景是", "背景上的", "背景上有", "背景上，",
                                   "、", "和", "两", "三", "颗", "的大", "的小", "大的", "小的",
                                   "上面", "上方", "下面", "下方", "左边", "左侧", "右边",
                                   "右侧") if form in zh}
        seen |= {"，白色背景"} if zh.endswith(("，白色背景", "，黑色背景", "，灰色背景")) else set()
    assert seen == {"在", "有", "图中", "背景是", "背景上的", "背景上有", "背景上，", "、", "和",
                    "两", "三", "颗", "的大", "的小", "大的", "小的", "上面", "上方", "下面", "下方",
                    "左边", "左侧", "右边", "右侧", "，白色背景"}


def test_chinese_captions_use_the_measure_words_a_native_speaker_writes():
    for _, _, zh in _zh_and_en("train", 300) + _zh_and_en("held_out", 300):
        for shape, word in shapes.ZH_SHAPES.items():
            for m in re.finditer(rf"([一两三])([个颗])[^一两三个颗]*?{word}", zh):
                assert m.group(2) == shapes.ZH_MEASURE[shape], zh
        assert "二" not in zh and "一个星星" not in zh and "颗圆" not in zh, zh
    scene = {"kind": "count", "background": "white", "relation": None,
             "objects": [{"shape": "triangle", "colour": "green", "size": "small", "x": 0.2,
                          "y": 0.2, "r": 0.1}] * 2}
    caps = {shapes.caption(scene, np.random.default_rng(i), "zh") for i in range(60)}
    assert {"两个绿色的三角形", "两个绿色的小三角形", "两个小的绿色三角形",
            "白色背景上的两个绿色的三角形"} <= caps


@pytest.mark.parametrize("language", shapes.LANGUAGES)
@pytest.mark.parametrize("split", shapes.SPLITS)
def test_captions_of_every_split_parse_back_to_the_scene(language, split):
    src = shapes.ShapesSource(16, 200, split, seed=2, language=language)
    for i in range(len(src)):
        scene, cap = src.scene_and_caption(i)
        _check_parses_to(scene, cap)
        assert bool(re.search("[\u4e00-\u9fff]", cap)) == (language == "zh"), cap


def _check_parses_to(scene, cap):
    parsed = shapes.parse_caption(cap)
    objs = scene["objects"]
    assert sum(o["count"] for o in parsed["objects"]) == len(objs), cap
    if scene["relation"]:
        rel = scene["relation"]
        a, b = objs[rel["subject"]], objs[rel["object"]]
        assert parsed["relation"] == rel["relation"], cap
        assert [(g["shape"], g["colour"]) for g in parsed["objects"]] == [
            (a["shape"], a["colour"]), (b["shape"], b["colour"])], cap
        for g, o in zip(parsed["objects"], (a, b)):
            assert g["size"] in (None, o["size"]), cap
    else:
        assert parsed["relation"] is None, cap
        got = sorted((g["colour"], g["shape"]) for g in parsed["objects"]
                     for _ in range(g["count"]))
        assert got == sorted((o["colour"], o["shape"]) for o in objs), cap
        for g in parsed["objects"]:
            assert g["size"] in (None, *[o["size"] for o in objs if o["shape"] == g["shape"]
                                         and o["colour"] == g["colour"]]), cap
    assert parsed["background"] in (None, scene["background"]), cap


@pytest.mark.parametrize("language", shapes.LANGUAGES)
def test_held_out_holds_in_both_languages(language):
    """Held out is a property of the scene, so a caption in either language of a held-out
    scene names a held-out pair or relation, and no train or test caption does."""
    for split in shapes.SPLITS:
        src = shapes.ShapesSource(16, 300, split, seed=4, language=language)
        flags = [shapes.prompt_is_held_out(src.caption_at(i)) for i in range(len(src))]
        assert all(flags) if split == "held_out" else not any(flags), split
    assert shapes.prompt_is_held_out("一颗红色的星星") and shapes.prompt_is_held_out("a red star")
    assert shapes.prompt_is_held_out("一个红色的圆形在一个蓝色的三角形上面")
    assert shapes.prompt_is_held_out("一个蓝色的三角形在一个红色的圆形下面")  # the converse
    assert not shapes.prompt_is_held_out("一个红色的圆形在一个蓝色的三角形下面")


def test_parse_chinese_prompt_forms():
    p = shapes.parse_caption("一个红色的圆形在一个蓝色的正方形上面")
    assert p == {"objects": [{"count": 1, "size": None, "colour": "red", "shape": "circle"},
                             {"count": 1, "size": None, "colour": "blue", "shape": "square"}],
                 "relation": "above", "background": None}
    assert shapes.parse_caption("一个蓝色的正方形上面有一个红色的圆形") == p
    assert shapes.parse_caption("两个绿色的三角形") == shapes.parse_caption("two green triangles")
    assert shapes.parse_caption("白色背景上的一颗黄色的星星") == shapes.parse_caption(
        "a yellow star on a white background")
    assert shapes.parse_caption("一个小的红色圆形位于一个橙色十字的左侧。") == shapes.parse_caption(
        "a small red circle to the left of an orange cross")
    assert shapes.parse_caption("图中有一颗红色的星星、一个蓝色的正方形和一个黄色的圆形，背景是黑色的") \
        == shapes.parse_caption("a red star, a blue square and a yellow circle on a black "
                                "background")
    assert shapes.parse_caption("三个紫色的大十字，灰色背景")["objects"] == [
        {"count": 3, "size": "large", "colour": "purple", "shape": "cross"}]
    for bad, named in [("一只可爱的猫", "unknown words '只可爱', '猫'"),
                       ("一个red的圆形", "unknown words 'red'"),
                       ("一个粉色的六边形", "unknown words '粉色', '六边形'"),
                       ("一个红色的圆形，粉色背景", "unknown background '粉色'"),
                       ("两个三角形", "one colour and then one shape"),
                       ("一个红色的圆形在两个蓝色的正方形上面", "exactly one object on each side")]:
        with pytest.raises(ValueError, match=re.escape(named)) as e:
            shapes.parse_caption(bad)
        assert "\n" not in str(e.value) and repr(bad) in str(e.value)


def test_bilingual_source():
    """language='both': each example's language from a stream of its own, so the scenes and
    the English captions are those of an English source and the Chinese ones a Chinese
    source's."""
    en, zh = (shapes.ShapesSource(16, 200, "test", seed=6, language=x) for x in ("en", "zh"))
    both = shapes.ShapesSource(16, 200, "test", seed=6, language="both")
    langs = [both.language_at(i) for i in range(200)]
    assert 70 < langs.count("zh") < 130
    for i, lang in enumerate(langs):
        scene, cap = both.scene_and_caption(i)
        assert scene == en.scene_and_caption(i)[0]
        assert cap == (en if lang == "en" else zh).caption_at(i)
    assert "language='both'" in repr(both) and "language" not in repr(en)
    with pytest.raises(ValueError, match=r"caption language 'fr' is not one of .*'both'"):
        shapes.ShapesSource(16, 4, language="fr")
    with pytest.raises(ValueError, match="caption language 'both'"):
        shapes.caption(en.scene_and_caption(0)[0], np.random.default_rng(0), "both")
