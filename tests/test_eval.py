"""Tests of the shapes detector and prompt scorer."""

import json
import re

import numpy as np
import pytest

from jaxt2i.config import ConfigError
from jaxt2i.data import shapes
from jaxt2i.eval import detector


def _object_accuracy(resolution, n, split, seed):
    """Fraction of scenes whose every object is read back exactly (and scored 'whole')."""
    src = shapes.ShapesSource(resolution, n, split, seed)
    good, scores = 0, []
    for i in range(n):
        scene, cap = src.scene_and_caption(i)
        img = shapes.render(scene, resolution)
        found = detector.detect_scene(img)
        ok = found["background"] == scene["background"] and len(found["objects"]) == len(
            scene["objects"])
        for o in scene["objects"] if ok else []:
            m = min(found["objects"], key=lambda d: (d["x"] - o["x"]) ** 2 + (d["y"] - o["y"]) ** 2)
            ok &= (m["shape"], m["colour"], m["size"]) == (o["shape"], o["colour"], o["size"])
            ok &= abs(m["x"] - o["x"]) < 0.02 and abs(m["y"] - o["y"]) < 0.02
        s = detector.score(img, cap)
        scores.append(s)
        good += bool(ok and s["whole"])
    return good / n, detector.aggregate(scores)


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
        scores.append(detector.score(np.clip(img, 0, 255).astype(np.uint8), cap))
    assert detector.aggregate(scores)["whole"] >= 0.95


# a large red circle above a small blue square, on white
RED_CIRCLE_ABOVE_BLUE_SQUARE = {
    "kind": "relation", "background": "white",
    "relation": {"subject": 0, "relation": "above", "object": 1},
    "objects": [{"shape": "circle", "colour": "red", "size": "large", "x": 0.5, "y": 0.25,
                 "r": 0.16},
                {"shape": "square", "colour": "blue", "size": "small", "x": 0.5, "y": 0.75,
                 "r": 0.1}]}


def test_score_catches_wrong_attributes():
    img = shapes.render(RED_CIRCLE_ABOVE_BLUE_SQUARE, 64)
    good = detector.score(img, "a large red circle above a small blue square")
    assert good == {"colour": True, "shape": True, "size": True, "count": True,
                    "relation": True, "background": None, "whole": True,
                    "found": ["large red circle", "small blue square"]}
    assert detector.score(img, "a red circle below a blue square")["relation"] is False
    # Colours swapped: each object matches one prompt object by shape and the other by colour,
    # so which one is 'the blue circle' is undecidable and neither relation is credited.
    for rel in ("above", "below"):
        swapped = detector.score(img, f"a blue circle {rel} a red square")
        assert swapped["relation"] is False and swapped["count"] is True
    assert detector.score(img, "a green circle above a blue square")["colour"] is False
    star = detector.score(img, "a red star above a blue square")
    assert star["shape"] is False and star["found"] == good["found"]
    assert detector.score(img, "a small red circle above a blue square")["size"] is False
    s = detector.score(img, "three red circles on a black background")
    assert not s["count"] and not s["background"] and not s["whole"]
    blank = np.full((64, 64, 3), 255, np.uint8)
    assert detector.detect(blank) == [] and detector.score(blank, "a red circle")["found"] == []
    assert detector.score(blank, "a red circle")["whole"] is False
    agg = detector.evaluate([img, blank], ["a red circle above a blue square", "a red circle"])
    assert agg["n"] == 2 and agg["whole"] == 0.5 and agg["relation"] == 1.0 and agg["n_relation"] == 1


class _RenderingCascade:
    """Stands in for a cascade: 'samples' the true render of each prompt's scene (optionally
    with every object recoloured), so the evaluator's bookkeeping is checked against the
    detector on images whose answers are known."""

    def __init__(self, scenes_by_prompt, size=64, recolour=None, lowres_size=16,
                 sr_reshape=None):
        self.scenes, self.size, self.recolour = scenes_by_prompt, size, recolour
        self.sr_reshape = sr_reshape
        base = type("Stage", (), {"unet_cfg": type("Cfg", (), {"image_size": lowres_size})})
        self.stages = [base, None]
        self.calls = []

    def check_prompts(self, prompts):
        pass

    def sample(self, prompts, seed, *, settings=None, num_stages=None, start_stage=0,
               lowres=None):
        """With start_stage=1 it checks that `lowres` is each prompt's true low-res render
        and then draws the scene correctly (a perfect SR stage behind a maybe wrong base), or
        with every object turned into `sr_reshape` (an SR stage that loses the shapes)."""
        self.calls.append((len(prompts), seed))
        if start_stage:
            r = self.stages[0].unet_cfg.image_size
            want = np.stack([shapes.render(self.scenes[p], r) for p in prompts])
            np.testing.assert_array_equal(lowres, want)
            out = []
            for p in prompts:
                scene = json.loads(json.dumps(self.scenes[p]))
                for o in scene["objects"] if self.sr_reshape else []:
                    o["shape"] = self.sr_reshape
                out.append(shapes.render(scene, self.size))
            return np.stack(out)
        out = []
        for p in prompts:
            scene = json.loads(json.dumps(self.scenes[p]))
            if self.recolour:
                for o in scene["objects"]:
                    o["colour"] = self.recolour
            out.append(shapes.render(scene, self.size))
        return np.stack(out)


def _scenes(num, seed=0):
    from jaxt2i.eval.evaluate import eval_prompts

    return {c: s for split in ("held_out", "test") for lang in shapes.LANGUAGES
            for s, c in eval_prompts(split, num, seed, lang)}


def test_eval_prompts_respect_the_splits():
    from jaxt2i.eval.evaluate import eval_prompts

    held = eval_prompts("held_out", 40)
    seen = eval_prompts("test", 40)
    assert all(shapes.is_held_out(s) for s, _ in held)
    assert not any(shapes.is_held_out(s) for s, _ in seen)
    assert [c for _, c in held] == [c for _, c in eval_prompts("held_out", 40)]  # deterministic
    assert [c for _, c in held] != [c for _, c in eval_prompts("held_out", 40, seed=1)]
    train_caps = {shapes.ShapesSource(32, 2000, "train", 0).caption_at(i) for i in range(2000)}
    assert not train_caps & {c for _, c in held}


def test_evaluate_cascade_scores_true_renders_perfectly_and_wrong_colours_not(tmp_path):
    from jaxt2i.eval.evaluate import evaluate_cascade, format_table

    scenes = _scenes(10)
    perfect = _RenderingCascade(scenes)
    res = evaluate_cascade(perfect, num_prompts=10, batch_size=4, reference=True,
                           out=str(tmp_path), progress=False)
    for row in ("held_out", "test", "held_out (true renders)", "test (true renders)"):
        agg = res["results"][row]
        assert agg["n"] == 10 and agg["whole"] == 1.0, (row, agg)
    # 10 prompts in batches of 4: 3 calls per split, each padded to the full batch
    assert [n for n, _ in perfect.calls] == [4] * 6
    assert len({s for _, s in perfect.calls}) == 6  # every batch its own seed
    assert len(res["per_image"]["held_out"]) == 10
    lines = (tmp_path / "held_out.jsonl").read_text().splitlines()
    assert len(lines) == 10 and json.loads(lines[0])["prompt"] in scenes
    assert (tmp_path / "test.png").exists()
    assert "held_out" in format_table(res["results"])

    wrong = _RenderingCascade(scenes, recolour="yellow")
    res = evaluate_cascade(wrong, num_prompts=10, batch_size=4, progress=False)
    n_yellow = sum("yellow" in c for c in list(scenes)[:10])
    assert res["results"]["held_out"]["colour"] <= n_yellow / 10 < 1
    assert res["results"]["held_out"]["shape"] == 1.0
    assert "held_out (SR of true 16 px)" not in res["results"]

    # a wrong base behind a right SR stage: --true_lowres tells them apart
    wrong = _RenderingCascade(scenes, recolour="yellow")
    res = evaluate_cascade(wrong, num_prompts=10, batch_size=4, true_lowres=True,
                           progress=False)
    assert res["results"]["held_out"]["colour"] <= n_yellow / 10 < 1
    assert res["results"]["held_out (SR of true 16 px)"]["whole"] == 1.0
    assert res["results"]["test (SR of true 16 px)"]["n"] == 10
    assert [n for n, _ in wrong.calls] == [4] * 12  # the last batch's lowres padded too
    assert "held_out (SR of true 16 px)" in format_table(res["results"])
    with pytest.raises(ConfigError, match="needs a super-resolution stage"):
        evaluate_cascade(wrong, num_prompts=2, num_stages=1, true_lowres=True, progress=False)


def test_true_lowres_separates_a_lossy_sr_stage_from_the_base_resolution(tmp_path):
    """An SR stage that turns every shape into a circle scores below the mere bilinear
    upsampling of the same true low-res renders, which at 32 px still show every shape."""
    from jaxt2i.eval.evaluate import eval_prompts, evaluate_cascade

    scenes = _scenes(12)
    lossy = _RenderingCascade(scenes, size=128, lowres_size=32, sr_reshape="circle")
    res = evaluate_cascade(lossy, num_prompts=12, batch_size=6, true_lowres=True,
                           out=str(tmp_path), progress=False)
    for split in ("held_out", "test"):
        sr = res["results"][f"{split} (SR of true 32 px)"]
        up = res["results"][f"{split} (true 32 px, bilinear)"]
        assert up["n"] == sr["n"] == 12
        assert up["shape"] == up["whole"] == 1.0, up  # the 32 px renders still show the shapes
        circles_only = [all(o["shape"] == "circle" for o in s["objects"])
                        for s, _ in eval_prompts(split, 12)]
        assert sr["shape"] == pytest.approx(np.mean(circles_only)) and sr["shape"] < 1
        assert sr["colour"] == 1.0  # colours kept, so only the shapes are lost
        lines = [json.loads(x) for x in
                 (tmp_path / f"{split}_sr_true.jsonl").read_text().splitlines()]
        assert lines == res["per_image"][f"{split}_sr_true"] and len(lines) == 12
        assert all(f.endswith(" circle") for x in lines for f in x["found"])
        assert (tmp_path / f"{split}_sr_true.png").exists()


# --- prompts in Chinese (issue #28) -------------------------------------------------------


def test_score_reads_chinese_prompts():
    img = shapes.render(RED_CIRCLE_ABOVE_BLUE_SQUARE, 64)
    for zh, en in [("一个红色的圆形在一个蓝色的正方形上面", "a red circle above a blue square"),
                   ("一个蓝色的小正方形上面有一个红色的大圆形", "a large red circle above a small "
                                                             "blue square"),
                   ("一个红色的圆形在一个蓝色的正方形下面", "a red circle below a blue square"),
                   ("一颗红色的星星在一个蓝色的正方形上面", "a red star above a blue square"),
                   ("黑色背景上的三个红色的圆形", "three red circles on a black background")]:
        assert detector.score(img, zh) == detector.score(img, en), zh
    assert detector.score(img, "一个红色的圆形在一个蓝色的正方形上面")["whole"] is True
    with pytest.raises(ValueError, match="unknown words '只可爱', '猫'"):
        detector.score(img, "一只可爱的猫")


@pytest.mark.parametrize("split", shapes.SPLITS)
def test_eval_prompts_in_chinese_are_the_same_scenes(split):
    from jaxt2i.eval.evaluate import eval_prompts

    en, zh = eval_prompts(split, 60, 3), eval_prompts(split, 60, 3, language="zh")
    assert [s for s, _ in zh] == [s for s, _ in en]
    for (scene, e), (_, z) in zip(en, zh):
        assert shapes.parse_caption(z) == shapes.parse_caption(e), (e, z)
        assert shapes.prompt_is_held_out(z) == (split == "held_out")
        img = shapes.render(scene, 64)
        assert detector.score(img, z) == detector.score(img, e)
    with pytest.raises(ConfigError, match="--language: 'fr' is not one of"):
        eval_prompts(split, 2, language="fr")


def test_evaluate_cascade_in_both_languages_side_by_side(tmp_path):
    """--language=both prompts the same scenes in English and Chinese with the same sampling
    seeds: rows '<split> (zh)' beside '<split>', and equal scores for equal images."""
    from jaxt2i.eval.evaluate import evaluate_cascade, format_table

    scenes = _scenes(6)
    wrong = _RenderingCascade(scenes, recolour="yellow")
    res = evaluate_cascade(wrong, num_prompts=6, batch_size=4, reference=True, language="both",
                           out=str(tmp_path), progress=False)
    rows = res["results"]
    assert list(rows) == ["held_out", "held_out (true renders)", "held_out (zh)",
                          "held_out (zh, true renders)", "test", "test (true renders)",
                          "test (zh)", "test (zh, true renders)"]
    for split in ("held_out", "test"):
        assert rows[f"{split} (zh)"] == rows[split] and rows[split]["n"] == 6
        assert rows[f"{split} (zh, true renders)"]["whole"] == 1.0
        lines = [json.loads(x) for x in (tmp_path / f"{split}_zh.jsonl").read_text().splitlines()]
        assert lines == res["per_image"][f"{split}_zh"] and len(lines) == 6
        assert all(re.search("[\u4e00-\u9fff]", x["prompt"]) for x in lines)
        assert (tmp_path / f"{split}_zh.png").exists() and (tmp_path / f"{split}.png").exists()
    seeds = [s for _, s in wrong.calls]  # 2 batches per split and language
    assert seeds[0:2] == seeds[2:4] and seeds[4:6] == seeds[6:8] and seeds[0:2] != seeds[4:6]
    assert "held_out (zh, true renders)" in format_table(rows)
    zh_only = evaluate_cascade(_RenderingCascade(scenes), num_prompts=6, batch_size=4,
                               language="zh", progress=False)
    assert list(zh_only["results"]) == ["held_out (zh)", "test (zh)"]
    with pytest.raises(ConfigError, match="--language='fr' is not one of en, zh, both"):
        evaluate_cascade(wrong, num_prompts=2, language="fr", progress=False)


class _EnglishOnlyCascade(_RenderingCascade):
    """Refuses Chinese prompts the way the bundled demo encoder's tokenizer does."""

    def check_prompts(self, prompts):
        for p in prompts:
            if re.search("[\u4e00-\u9fff]", p):
                raise ConfigError(f"prompt {p!r} has text the tokenizer does not know")


def test_chinese_prompts_the_encoder_cannot_read_stop_before_sampling():
    from jaxt2i.eval.evaluate import evaluate_cascade

    cascade = _EnglishOnlyCascade(_scenes(4))
    for language in ("zh", "both"):
        with pytest.raises(ConfigError, match=rf"^--language={language}: prompt '.*' has text "
                           r"the tokenizer does not know; evaluate English prompts with "
                           r"--language=en, or score the true renders alone with "
                           r"--renders_only$"):
            evaluate_cascade(cascade, num_prompts=4, language=language, progress=False)
    assert cascade.calls == []  # refused before any sampling, English included
    res = evaluate_cascade(cascade, num_prompts=4, language="both", renders_only=True,
                           progress=False, num_stages=1)
    assert cascade.calls == [] and res["image_size"] == 16
    assert list(res["results"]) == ["held_out (true renders)", "held_out (zh, true renders)",
                                    "test (true renders)", "test (zh, true renders)"]
    assert all(r["n"] == 4 for r in res["results"].values())
    with pytest.raises(ConfigError, match="--renders_only samples nothing"):
        evaluate_cascade(cascade, num_prompts=2, renders_only=True, true_lowres=True,
                         progress=False)
