"""The embedded default dataset: procedural captioned shapes scenes.

A scene holds 1-3 flat objects (shape, colour, size, position) on a plain background and
is drawn anti-aliased at any resolution, so every stage of a cascade trains on the same
world. Everything is a pure function of a seed: `ShapesSource(resolution, size, split,
seed)[i]` is the same image and caption on every machine, with no build step.

Captions come from several templates and always mention every object, so a caption can be
checked against the image (`jaxt2i.eval.detector`). They are English by default or Chinese
(`caption(..., language='zh')`, `ShapesSource(..., language='zh' | 'both')`), written as a
native speaker would ('一个红色的圆形在一个蓝色的正方形上面', '两个绿色的三角形').
`parse_caption` turns a caption or user prompt in either language back into its structured
form. Some colour-shape pairs and some stated
relations are held out of the 'train' and 'test' splits and make up the 'held_out' split,
which measures compositional generalisation.

Coordinates: x to the right, y downwards, both as fractions of the image side.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

# --- vocabulary --------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "star", "cross")
# Saturated colours at least ~80 apart in RGB from each other and from every background.
COLOURS = {
    "red": (220, 30, 30),
    "orange": (250, 130, 0),
    "yellow": (250, 230, 40),
    "green": (30, 170, 60),
    "blue": (40, 80, 230),
    "purple": (150, 50, 200),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SIZES = {"small": 0.10, "large": 0.16}  # object "radius" as a fraction of the image side
SIZE_JITTER = 0.08  # radii vary by +-8% so the two sizes never meet
SIZE_THRESHOLD = math.sqrt(SIZES["small"] * SIZES["large"])  # what the detector splits on
RELATIONS = ("left of", "right of", "above", "below")
SPLITS = ("train", "test", "held_out")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
LANGUAGES = ("en", "zh")  # caption languages
CAPTION_LANGUAGES = LANGUAGES + ("both",)  # what ShapesSource (data.caption_language) takes
_LANGUAGE_STREAM = 0x5A48  # seeds 'both' sources' per-example language draw

# Chinese captions: the words a native speaker writes. Stars take the measure word 颗 (一颗星星),
# every other shape 个; 两 (not 二) counts two things.
ZH_SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星星",
             "cross": "十字"}
ZH_MEASURE = {"circle": "个", "square": "个", "triangle": "个", "star": "颗", "cross": "个"}
ZH_COLOURS = {"red": "红色", "orange": "橙色", "yellow": "黄色", "green": "绿色", "blue": "蓝色",
              "purple": "紫色"}
ZH_BACKGROUNDS = {"white": "白色", "black": "黑色", "gray": "灰色"}
ZH_SIZES = {"small": "小", "large": "大"}
ZH_COUNT_WORDS = {1: "一", 2: "两", 3: "三"}
# Position words after the object ("在 ... 上面"); the first of each is the most common.
ZH_RELATIONS = {"above": ("上面", "上方"), "below": ("下面", "下方"), "left of": ("左边", "左侧"),
                "right of": ("右边", "右侧")}

# Held out of 'train'/'test'; a scene is held out if any object or its stated relation is.
HELD_OUT_COLOUR_SHAPES = frozenset({
    ("red", "star"), ("yellow", "circle"), ("green", "triangle"), ("blue", "cross"),
    ("purple", "square"),
})
_CONVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
_HELD_OUT_REL = (("circle", "above", "triangle"), ("square", "left of", "star"),
                 ("cross", "below", "circle"))
# The converse states the same picture ("a triangle below a circle"), so it is held out too.
HELD_OUT_RELATIONS = frozenset(
    set(_HELD_OUT_REL) | {(b, _CONVERSE[r], a) for a, r, b in _HELD_OUT_REL})

_MARGIN = 0.03  # free border around the scene
_GAP = 0.05  # minimum free space between two objects' boxes
_KIND_PROBS = {"single": 0.25, "relation": 0.35, "count": 0.2, "and": 0.2}
KINDS = tuple(_KIND_PROBS)  # scene kinds; `parse_kinds` reads a mix of them
_BG_PROBS = {"white": 0.5, "black": 0.25, "gray": 0.25}

# --- geometry ----------------------------------------------------------------------------


def _unit_polygon(shape: str) -> np.ndarray | None:
    """Vertices [V, 2] of a shape whose box is centred at 0 with half-extent <= 1."""
    if shape == "circle":
        return None
    if shape == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * 0.88
    elif shape == "triangle":  # equilateral, pointing up
        ang = np.deg2rad([-90, 30, 150])
        pts = np.stack([np.cos(ang), np.sin(ang)], 1) * 1.15
    elif shape == "star":  # five points; a fat inner radius keeps it readable at 32 px
        ang = np.deg2rad(-90 + 36 * np.arange(10))
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([np.cos(ang) * rad, np.sin(ang) * rad], 1)
    elif shape == "cross":
        a, w = 0.95, 0.33
        pts = np.array([[-w, -a], [w, -a], [w, -w], [a, -w], [a, w], [w, w], [w, a], [-w, a],
                        [-w, w], [-a, w], [-a, -w], [-w, -w]], np.float64)
    else:
        raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")
    return pts - (pts.min(0) + pts.max(0)) / 2  # centre the bounding box


def _polygon_props(pts: np.ndarray) -> tuple[float, np.ndarray]:
    """Area and centroid of a simple polygon (shoelace formula)."""
    x, y = pts[:, 0], pts[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cr = x * yn - xn * y
    area = cr.sum() / 2
    cen = np.array([((x + xn) * cr).sum(), ((y + yn) * cr).sum()]) / (6 * area)
    return abs(area), cen


_POLYGONS = {s: _unit_polygon(s) for s in SHAPES}
# Per shape: area, centroid offset from the box centre, and box half-extent, at radius 1.
UNIT_AREA: dict[str, float] = {"circle": math.pi}
UNIT_CENTROID: dict[str, np.ndarray] = {"circle": np.zeros(2)}
UNIT_HALF_EXTENT: dict[str, np.ndarray] = {"circle": np.ones(2)}
for _s, _p in _POLYGONS.items():
    if _p is not None:
        UNIT_AREA[_s], UNIT_CENTROID[_s] = _polygon_props(_p)
        UNIT_HALF_EXTENT[_s] = _p.max(0)


def shape_coverage(shape: str, cx: float, cy: float, r: float, xs: np.ndarray,
                   ys: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of one shape at pixel centres.

    The signed distance to the outline, in pixels, is mapped to coverage by a one-pixel ramp
    (0.5 - d), which is the area a straight edge covers of a pixel.

    Args:
      shape: one of SHAPES.
      cx, cy, r: box centre and radius in pixels.
      xs, ys: pixel-centre coordinates in pixels, broadcastable to each other.

    Returns:
      float32 coverage in [0, 1], shaped like xs + ys.
    """
    xs, ys = np.broadcast_arrays(np.asarray(xs, np.float32), np.asarray(ys, np.float32))
    px, py = xs - np.float32(cx), ys - np.float32(cy)
    poly = _POLYGONS[shape]
    if poly is None:
        d = np.sqrt(px * px + py * py) - np.float32(r)
    else:
        a = (poly * r).astype(np.float32)  # [V, 2]
        e = np.roll(a, -1, axis=0) - a  # edge vectors [V, 2]
        qx, qy = px[..., None] - a[:, 0], py[..., None] - a[:, 1]  # [..., V]
        t = np.clip((qx * e[:, 0] + qy * e[:, 1]) / (e ** 2).sum(1), 0, 1)
        dist = np.sqrt(((qx - t * e[:, 0]) ** 2 + (qy - t * e[:, 1]) ** 2).min(-1))
        # Even-odd test: a rightward ray from an inside point crosses the outline oddly.
        above = a[:, 1] > py[..., None]
        straddle = above != np.roll(above, -1, axis=-1)
        right = (qx * e[:, 1] < qy * e[:, 0]) == (e[:, 1] > 0)
        inside = np.logical_xor.reduce(straddle & right, axis=-1)
        d = np.where(inside, -dist, dist)
    return np.clip(0.5 - d, 0.0, 1.0).astype(np.float32)


def render(scene: dict, resolution: int) -> np.ndarray:
    """Draws a scene.

    Args:
      scene: a scene dict from `sample_scene` (or its JSON).
      resolution: output side R in pixels, 8..1024 or more.

    Returns:
      uint8 image [R, R, 3].
    """
    if isinstance(scene, str):
        scene = json.loads(scene)
    res = int(resolution)
    img = np.empty((res, res, 3), np.float32)
    img[:] = BACKGROUNDS[scene["background"]]
    for o in scene["objects"]:
        cx, cy, r = o["x"] * res, o["y"] * res, o["r"] * res
        hx, hy = UNIT_HALF_EXTENT[o["shape"]] * r + 1
        x0, x1 = max(0, int(cx - hx)), min(res, int(math.ceil(cx + hx)))
        y0, y1 = max(0, int(cy - hy)), min(res, int(math.ceil(cy + hy)))
        xs = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5
        ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5
        a = shape_coverage(o["shape"], cx, cy, r, xs, ys)[..., None]  # [h, w, 1]
        win = img[y0:y1, x0:x1]
        win += a * (np.asarray(COLOURS[o["colour"]], np.float32) - win)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# --- scenes ------------------------------------------------------------------------------


def _box(o: dict) -> tuple[float, float, float, float]:
    hx, hy = UNIT_HALF_EXTENT[o["shape"]] * o["r"]
    return o["x"] - hx, o["y"] - hy, o["x"] + hx, o["y"] + hy


def _apart(a: dict, b: dict, gap: float = _GAP) -> bool:
    """Whether two objects' boxes are separated by at least `gap` along some axis."""
    ax0, ay0, ax1, ay1 = _box(a)
    bx0, by0, bx1, by1 = _box(b)
    return max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1) >= gap


def relation_holds(a: dict, b: dict, relation: str, strict: bool = True) -> bool:
    """Whether object `a` is `relation` object `b` (e.g. a above b).

    Args:
      a, b: dicts with 'x', 'y' (box centres); with strict, also 'shape' and 'r'.
      relation: one of RELATIONS.
      strict: the generator's rule: boxes apart by a gap along the relation's axis and the
        offset across it at most half the offset along it. Otherwise (for scoring generated
        images) the stated direction merely dominates.

    Returns:
      bool.
    """
    axis, sign = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}[
        relation]
    d = np.array([a["x"] - b["x"], a["y"] - b["y"]]) * sign
    along, across = d[axis], abs(d[1 - axis])
    if not strict:
        return bool(along > 0 and along >= across)
    ba, bb = _box(a), _box(b)
    free = (bb[axis] - ba[axis + 2]) if sign < 0 else (ba[axis] - bb[axis + 2])
    return bool(free >= _GAP and across <= 0.5 * along)


def _pick(rng: np.random.Generator, probs: dict) -> str:
    keys = list(probs)
    return keys[rng.choice(len(keys), p=np.array([probs[k] for k in keys]))]


def _new_object(rng, shape, colour, size) -> dict:
    r = SIZES[size] * (1 + SIZE_JITTER * rng.uniform(-1, 1))
    hx, hy = UNIT_HALF_EXTENT[shape] * r
    x = rng.uniform(_MARGIN + hx, 1 - _MARGIN - hx)
    y = rng.uniform(_MARGIN + hy, 1 - _MARGIN - hy)
    return {"shape": shape, "colour": colour, "size": size, "x": round(float(x), 5),
            "y": round(float(y), 5), "r": round(float(r), 5)}


def _distinct_specs(rng, n: int) -> list[tuple[str, str, str]]:
    """n (shape, colour, size) with distinct (shape, colour), so no caption is ambiguous."""
    specs, seen = [], set()
    while len(specs) < n:
        s, c = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
        if (s, c) not in seen:
            seen.add((s, c))
            specs.append((s, c, list(SIZES)[rng.integers(len(SIZES))]))
    return specs


def _layout(rng, specs, relation: str | None) -> list[dict] | None:
    """Places objects apart (and satisfying `relation` between the first two), or None."""
    for _ in range(200):
        objs = [_new_object(rng, *s) for s in specs]
        if not all(_apart(a, b) for i, a in enumerate(objs) for b in objs[i + 1:]):
            continue
        if relation and not relation_holds(objs[0], objs[1], relation):
            continue
        return objs
    return None


def parse_kinds(spec: str | dict | None) -> dict[str, float]:
    """The scene-kind mix as probabilities: '' or None is the default mix.

    Args:
      spec: 'single=0.1,relation=0.45,count=0.1,and=0.35' (weights, normalised; kinds left out
        get 0) or such a dict.

    Returns:
      {kind: probability} over all of KINDS, summing to 1.
    """
    if not spec:
        return dict(_KIND_PROBS)
    if isinstance(spec, str):
        weights = {}
        for item in spec.split(","):
            key, eq, value = item.partition("=")
            try:
                weights[key.strip()] = float(value) if eq else float("nan")
            except ValueError:
                weights[key.strip()] = float("nan")
    else:
        weights = {str(k): float(v) for k, v in spec.items()}
    bad = [k for k in weights if k not in KINDS]
    if bad:
        raise ValueError(f"scene kinds {spec!r}: unknown kind {bad[0]!r}; use KIND=WEIGHT,... "
                         f"with kinds from {KINDS}")
    if not all(math.isfinite(w) and w >= 0 for w in weights.values()) or not sum(
            weights.values()) > 0:
        raise ValueError(f"scene kinds {spec!r}: weights must be numbers >= 0 with a positive "
                         f"sum, e.g. 'single=0.1,relation=0.45,count=0.1,and=0.35'")
    total = sum(weights.values())
    return {k: weights.get(k, 0.0) / total for k in KINDS}


def _sample_any(rng: np.random.Generator, kinds: dict | None = None) -> dict:
    kind = _pick(rng, kinds or _KIND_PROBS)
    relation = None
    if kind == "single":
        specs = _distinct_specs(rng, 1)
    elif kind == "relation":
        specs = _distinct_specs(rng, 2)
        relation = RELATIONS[rng.integers(len(RELATIONS))]
    elif kind == "count":
        specs = _distinct_specs(rng, 1) * int(rng.integers(2, 4))
    else:
        specs = _distinct_specs(rng, int(rng.integers(2, 4)))
    objs = None
    while objs is None:  # a failed layout (rare: three large objects) retries the sizes
        objs = _layout(rng, specs, relation)
        specs = [(s, c, "small") for s, c, _ in specs] if objs is None else specs
    return {"kind": kind, "background": _pick(rng, _BG_PROBS), "objects": objs,
            "relation": None if relation is None else {"subject": 0, "relation": relation,
                                                       "object": 1}}


def is_held_out(scene: dict) -> bool:
    """Whether a scene uses a held-out colour-shape pair or a held-out stated relation."""
    if any((o["colour"], o["shape"]) in HELD_OUT_COLOUR_SHAPES for o in scene["objects"]):
        return True
    rel = scene.get("relation")
    if rel:
        a, b = scene["objects"][rel["subject"]], scene["objects"][rel["object"]]
        return (a["shape"], rel["relation"], b["shape"]) in HELD_OUT_RELATIONS
    return False


def prompt_is_held_out(prompt: str | dict) -> bool:
    """Whether a prompt (text in either language, or `parse_caption` output) names a held-out
    colour-shape pair or a held-out relation: a caption of a scene is iff the scene is."""
    parsed = parse_caption(prompt) if isinstance(prompt, str) else prompt
    objs = parsed["objects"]
    if any((o["colour"], o["shape"]) in HELD_OUT_COLOUR_SHAPES for o in objs):
        return True
    return bool(parsed["relation"]) and (
        objs[0]["shape"], parsed["relation"], objs[1]["shape"]) in HELD_OUT_RELATIONS


def sample_scene(rng: np.random.Generator, split: str = "train",
                 kinds: dict | None = None) -> dict:
    """Samples a scene.

    Args:
      rng: numpy Generator (the scene is a pure function of its state).
      split: 'train' or 'test' (never held-out combinations) or 'held_out' (only them).
      kinds: the scene-kind mix ({kind: probability}, see `parse_kinds`); None: the default.

    Returns:
      A JSON-serialisable dict: kind ('single' | 'relation' | 'count' | 'and'), background,
      objects [{shape, colour, size, x, y, r}] and relation ({subject, relation, object}
      indices into objects, or None).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    want = split == "held_out"
    while True:
        scene = _sample_any(rng, kinds)
        if is_held_out(scene) == want:
            return scene


# --- captions ----------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _phrase(o: dict, with_size: bool, count: int = 1) -> str:
    words = ([o["size"]] if with_size else []) + [o["colour"]]
    if count == 1:
        return f"{_article(words[0])} {' '.join(words)} {o['shape']}"
    return f"{COUNT_WORDS[count]} {' '.join(words)} {_plural(o['shape'])}"


def caption(scene: dict, rng: np.random.Generator, language: str = "en") -> str:
    """Writes one caption for a scene from a random template; every object is mentioned.

    Args:
      scene: a scene dict.
      rng: numpy Generator choosing the template and which optional words appear.
      language: 'en' or 'zh'. Both draw the same first numbers from `rng` (size words or not,
        lead-in, background mentioned or not), so from one rng state the two captions state
        the same attributes; Chinese then draws its own word-order choices.

    Returns:
      e.g. 'a red circle above a blue square', 'two small green triangles on a white
      background'; in Chinese e.g. '一个红色的圆形在一个蓝色的正方形上面', '两个绿色的小三角形',
      '白色背景上的一颗黄色的星星'.
    """
    if language == "zh":
        return _caption_zh(scene, rng)
    if language != "en":
        raise ValueError(f"caption language {language!r} is not one of {LANGUAGES}; pass "
                         f"language='en' or 'zh'")
    objs, kind = scene["objects"], scene["kind"]
    sized = bool(rng.random() < 0.5)
    if kind == "count":
        body = _phrase(objs[0], sized, len(objs))
    elif kind == "relation":
        rel = scene["relation"]
        word = {"left of": "to the left of", "right of": "to the right of"}.get(
            rel["relation"], rel["relation"])
        body = (f"{_phrase(objs[rel['subject']], sized)} {word} "
                f"{_phrase(objs[rel['object']], sized)}")
    else:
        parts = [_phrase(o, sized) for o in objs]
        body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    prefix = ["", "", "a picture of ", "there is " if len(objs) == 1 or kind == "relation"
              else "there are "][rng.integers(4)]
    suffix = f" on {_article(scene['background'])} {scene['background']} background" if (
        rng.random() < 0.4) else ""
    return prefix + body + suffix


def _phrase_zh(o: dict, sized: bool, style: int, count: int = 1) -> str:
    """'一个红色的小圆形' (style 0) or '一个小的红色圆形' / '一个红色圆形' (style 1)."""
    head = ZH_COUNT_WORDS[count] + ZH_MEASURE[o["shape"]]
    colour, shape = ZH_COLOURS[o["colour"]], ZH_SHAPES[o["shape"]]
    size = ZH_SIZES[o["size"]] if sized else ""
    if style == 0:
        return f"{head}{colour}的{size}{shape}"
    return f"{head}{size}的{colour}{shape}" if sized else f"{head}{colour}{shape}"


def _caption_zh(scene: dict, rng: np.random.Generator) -> str:
    """The Chinese caption (see `caption`): its first three draws are the English ones."""
    objs, kind = scene["objects"], scene["kind"]
    sized = bool(rng.random() < 0.5)
    lead = int(rng.integers(4))  # English: '', '', 'a picture of ', 'there is/are '
    with_bg = bool(rng.random() < 0.4)
    style = int(rng.integers(2))
    bg = ZH_BACKGROUNDS[scene["background"]]
    if kind == "relation":
        rel = scene["relation"]
        a = _phrase_zh(objs[rel["subject"]], sized, style)
        b = _phrase_zh(objs[rel["object"]], sized, style)
        where = ZH_RELATIONS[rel["relation"]][int(rng.integers(2))]
        if rng.random() < 0.5:  # 一个红色的圆形在一个蓝色的正方形上面
            clause = ("有" if lead == 3 else "") + f"{a}在{b}{where}"
        else:  # 一个蓝色的正方形上面有一个红色的圆形
            clause = f"{b}{where}有{a}"
        if lead == 2:
            clause = "图中，" + clause
        if not with_bg:
            return clause
        if rng.random() < 0.5:
            return f"{clause}，背景是{bg}的"
        return f"{bg}背景上，{clause.removeprefix('图中，')}"
    if kind == "count":
        body = _phrase_zh(objs[0], sized, style, len(objs))
    else:
        parts = [_phrase_zh(o, sized, style) for o in objs]
        body = parts[0] if len(parts) == 1 else "、".join(parts[:-1]) + "和" + parts[-1]
    head = ("", "", "图中有", "有")[lead]
    if not with_bg:
        return head + body
    form = int(rng.integers(3))
    if form == 0:  # 白色背景上的一颗黄色的星星 / 白色背景上有两个绿色的三角形
        return f"{bg}背景上{'有' if head else '的'}{body}"
    if form == 1:
        return f"{head}{body}，背景是{bg}的"
    return f"{head}{body}，{bg}背景"


_NUMBER = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5,
           "1": 1, "2": 2, "3": 3, "4": 4, "5": 5}
_REL_RE = re.compile(r"\b(?:to the |on the )?(left of|right of|above|below|under|over)\b")
_BG_RE = re.compile(r"\bon (?:an? |the )?(\w+) background\b")
_PREFIX_RE = re.compile(r"^(?:a picture of|an image of|a photo of|there is|there are)\s+")
_SHAPE_WORDS = {**{s: s for s in SHAPES}, **{_plural(s): s for s in SHAPES}}


def _parse_group(text: str, prompt: str) -> dict:
    words = text.split()
    count = 1
    if words and words[0] in _NUMBER:
        count = _NUMBER[words.pop(0)]
    size = words.pop(0) if words and words[0] in SIZES else None
    if len(words) != 2 or words[0] not in COLOURS or words[1] not in _SHAPE_WORDS:
        raise ValueError(f"cannot parse {text!r} in prompt {prompt!r}; write objects as "
                         f"'[a|two|three] [small|large] <colour> <shape>'")
    return {"count": count, "size": size, "colour": words[0], "shape": _SHAPE_WORDS[words[1]]}


def parse_caption(prompt: str) -> dict:
    """Parses a caption or user prompt back into its structured form.

    Args:
      prompt: e.g. 'a red circle above a blue square', 'two green triangles on a white
        background', 'a small red star, a blue cross and a yellow square'.

    Returns:
      {'objects': [{count, size (or None), colour, shape}], 'relation': None or one of
      RELATIONS (objects[0] relation objects[1]), 'background': name or None}.

    Raises:
      ValueError: words outside the shapes vocabulary.

    A prompt with Chinese characters is read as Chinese ('一个红色的圆形在一个蓝色的正方形上面',
    '两个绿色的三角形', '白色背景上的一颗黄色的星星'), into the same structure.
    """
    if _HAN_RE.search(prompt):
        return _parse_zh(prompt)
    text = re.sub(r"[^\w\s,]", " ", prompt.lower()).replace(",", " , ")
    text = " ".join(text.split())
    background = None
    m = _BG_RE.search(text)
    if m:
        if m.group(1) not in BACKGROUNDS:
            raise ValueError(f"unknown background {m.group(1)!r} in {prompt!r}; use one of "
                             f"{tuple(BACKGROUNDS)}")
        background = m.group(1)
        text = (text[:m.start()] + text[m.end():]).strip()
    text = _PREFIX_RE.sub("", text)
    relation = None
    parts = [text]
    m = _REL_RE.search(text)
    if m:
        relation = {"under": "below", "over": "above"}.get(m.group(1), m.group(1))
        parts = [text[:m.start()], text[m.end():]]
    groups = [g for p in parts for g in re.split(r"\s*,\s*(?:and\s+)?|\s+and\s+", p.strip())
              if g.strip()]
    objects = [_parse_group(g, prompt) for g in groups]
    if relation and (len(objects) != 2 or any(o["count"] != 1 for o in objects)):
        raise ValueError(f"a relation needs exactly one object on each side: {prompt!r}")
    if not objects:
        raise ValueError(f"no object in prompt {prompt!r}; e.g. 'a red circle'")
    return {"objects": objects, "relation": relation, "background": background}


# --- Chinese prompts ---------------------------------------------------------------------

_HAN_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_ZH_NUMBER = {"一": 1, "两": 2, "二": 2, "三": 3, "四": 4, "五": 5, "1": 1, "2": 2, "3": 3,
              "4": 4, "5": 5}
_ZH_MEASURES = ("个", "颗")
_ZH_COLOUR_WORDS = {**{w: c for c, w in ZH_COLOURS.items()},
                    **{w[0]: c for c, w in ZH_COLOURS.items()}, "橘色": "orange", "橘": "orange"}
_ZH_SIZE_WORDS = {w: s for s, w in ZH_SIZES.items()}
_ZH_SHAPE_WORDS = {**{w: s for s, w in ZH_SHAPES.items()}, "圆": "circle", "圆圈": "circle",
                   "方形": "square", "方块": "square", "三角": "triangle", "星": "star",
                   "五角星": "star", "星形": "star", "十字形": "cross"}
_ZH_BACKGROUND_WORDS = {**{w: b for b, w in ZH_BACKGROUNDS.items()},
                        **{w[0]: b for b, w in ZH_BACKGROUNDS.items()}}
_ZH_WHERE = {"上面": "above", "上方": "above", "上边": "above", "之上": "above",
             "下面": "below", "下方": "below", "下边": "below", "之下": "below", "底下": "below",
             "左边": "left of", "左侧": "left of", "左面": "left of", "左方": "left of",
             "右边": "right of", "右侧": "right of", "右面": "right of", "右方": "right of"}
_ZH_LEXICON = sorted({*_ZH_NUMBER, *_ZH_MEASURES, *_ZH_COLOUR_WORDS, *_ZH_SIZE_WORDS,
                      *_ZH_SHAPE_WORDS, "的"}, key=len, reverse=True)
_ZH_COL = r"(?:[\u4e00-\u9fff]色|白|黑|灰)"  # a background colour (others are named wrong)
_ZH_BG_LEAD_RE = re.compile(rf"^在?(?P<c>{_ZH_COL})的?背景(?:上|中|里)?(?:的|有|，)?")
_ZH_BG_TAIL_RE = re.compile(rf"，?(?:背景(?:是|为)(?P<c>{_ZH_COL})的?|在?(?P<d>{_ZH_COL})的?背景"
                            r"(?:上|中|里)?)$")
_ZH_LEAD_RE = re.compile(r"^(?:(?:图中|图里|图片中|图片里|画面中|画面里|画面上|画中)(?:有|，)?|有)")
_ZH_WHERE_ALT = "|".join(sorted(_ZH_WHERE, key=len, reverse=True))
_ZH_REL_RES = (  # (subject, object): 'A在B上面', 'A位于B的上方'; 'B上面有A'
    re.compile(rf"^(?P<a>.+?)(?:在|位于)(?P<b>.+?)的?(?P<w>{_ZH_WHERE_ALT})$"),
    re.compile(rf"^(?P<b>.+?)的?(?P<w>{_ZH_WHERE_ALT})(?:有|是)(?P<a>.+)$"),
)
_ZH_FORM = ("write objects as '[一个|两个|三个]<颜色>的[大|小]<形状>', e.g. '两个绿色的三角形' "
            f"(colours {' '.join(ZH_COLOURS.values())}; shapes {' '.join(ZH_SHAPES.values())})")


def _segment_zh(text: str) -> list[tuple[str, bool]]:
    """Longest-match segmentation into (word, known); unknown text runs are single items."""
    out, i = [], 0
    while i < len(text):
        word = next((w for w in _ZH_LEXICON if text.startswith(w, i)), None)
        if word:
            out.append((word, True))
            i += len(word)
        elif out and not out[-1][1]:
            out[-1] = (out[-1][0] + text[i], False)
            i += 1
        else:
            out.append((text[i], False))
            i += 1
    return out


def _parse_group_zh(text: str, prompt: str) -> dict:
    words = _segment_zh(text)
    unknown = [w for w, known in words if not known]
    if unknown:
        raise ValueError(f"cannot parse {text!r} in prompt {prompt!r}: unknown words "
                         f"{', '.join(repr(w) for w in unknown)}; {_ZH_FORM}")
    words = [w for w, _ in words]
    count = 1
    if words and words[0] in _ZH_NUMBER:
        count = _ZH_NUMBER[words.pop(0)]
    if words and words[0] in _ZH_MEASURES:
        words.pop(0)
    mods = [w for w in words[:-1] if w != "的"]
    colours = [_ZH_COLOUR_WORDS[w] for w in mods if w in _ZH_COLOUR_WORDS]
    sizes = [_ZH_SIZE_WORDS[w] for w in mods if w in _ZH_SIZE_WORDS]
    if (not words or words[-1] not in _ZH_SHAPE_WORDS or len(colours) != 1 or len(sizes) > 1
            or len(colours) + len(sizes) != len(mods)):
        raise ValueError(f"cannot parse {text!r} in prompt {prompt!r}: each object needs one "
                         f"colour and then one shape; {_ZH_FORM}")
    return {"count": count, "size": sizes[0] if sizes else None, "colour": colours[0],
            "shape": _ZH_SHAPE_WORDS[words[-1]]}


def _parse_zh(prompt: str) -> dict:
    """`parse_caption` for a Chinese prompt."""
    text = "".join(prompt.split())
    text = re.sub(r"[,;；:：]", "，", text)
    text = re.sub(r"[。.！!？?\"“”'‘’「」]", "", text).strip("，")
    background = None
    for rx in (_ZH_BG_LEAD_RE, _ZH_BG_TAIL_RE):
        m = rx.search(text)
        if m:
            word = m.group("c") or m.groupdict().get("d")
            if word not in _ZH_BACKGROUND_WORDS:
                raise ValueError(f"unknown background {word!r} in {prompt!r}; use one of "
                                 f"{', '.join(ZH_BACKGROUNDS.values())} (e.g. '白色背景上的"
                                 f"一颗黄色的星星')")
            background = _ZH_BACKGROUND_WORDS[word]
            text = (text[:m.start()] + text[m.end():]).strip("，")
            break
    if "背景" in text:
        raise ValueError(f"cannot read the background of {prompt!r}; write e.g. '白色背景上的"
                         f"一颗黄色的星星' or '...，背景是白色的' (backgrounds "
                         f"{', '.join(ZH_BACKGROUNDS.values())})")
    text = _ZH_LEAD_RE.sub("", text).strip("，")
    relation, parts = None, [text]
    for rx in _ZH_REL_RES:
        m = rx.match(text)
        if m:
            relation = _ZH_WHERE[m.group("w")]
            parts = [m.group("a"), m.group("b")]
            break
    groups = [g for p in parts for g in re.split(r"和|、|以及|与|跟|还有|，", _ZH_LEAD_RE.sub(
        "", p.strip("，"))) if g]
    if not groups:
        raise ValueError(f"no object in prompt {prompt!r}; e.g. '一个红色的圆形'")
    objects = [_parse_group_zh(g, prompt) for g in groups]
    if relation and (len(objects) != 2 or any(o["count"] != 1 for o in objects)):
        raise ValueError(f"a relation needs exactly one object on each side: {prompt!r}; e.g. "
                         f"'一个红色的圆形在一个蓝色的正方形上面'")
    return {"objects": objects, "relation": relation, "background": background}


# --- random-access source ----------------------------------------------------------------


class ShapesSource:
    """Shapes scenes generated on the fly from their index: random access, no build.

    `source[i]` is a pure function of (seed, split, i, resolution), so shards, restarts and
    machines agree. Different splits draw from different seed streams.
    """

    def __init__(self, resolution: int, size: int, split: str = "train", seed: int = 0,
                 kinds: str | dict | None = None, language: str = "en"):
        """Args: resolution: image side; size: number of examples; split: one of SPLITS;
        seed: dataset seed; kinds: the scene-kind mix (`parse_kinds`; None: the default);
        language: caption language, 'en', 'zh' or 'both' (each example's language drawn at
        even odds from a stream of its own, so the scenes, and the English captions there
        are, are those of an 'en' source)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
        if language not in CAPTION_LANGUAGES:
            raise ValueError(f"caption language {language!r} is not one of "
                             f"{CAPTION_LANGUAGES}; use 'en', 'zh' or 'both'")
        self.language = language
        if resolution < 8 or size < 1:
            raise ValueError(f"resolution ({resolution}) must be >= 8 and size ({size}) >= 1")
        self.resolution, self.size, self.split, self.seed = int(resolution), int(size), split, int(
            seed)
        self.kinds = parse_kinds(kinds)

    def __len__(self) -> int:
        return self.size

    def scene_and_caption(self, index: int) -> tuple[dict, str]:
        """The scene and caption of example `index`, without rendering."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} examples")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), int(index)])
        scene = sample_scene(rng, self.split, self.kinds)
        return scene, caption(scene, rng, self.language_at(index))

    def language_at(self, index: int) -> str:
        """The caption language of example `index` ('en' or 'zh')."""
        if self.language != "both":
            return self.language
        pick = np.random.default_rng([self.seed, SPLITS.index(self.split), int(index),
                                      _LANGUAGE_STREAM])
        return LANGUAGES[int(pick.integers(len(LANGUAGES)))]

    def caption_at(self, index: int) -> str:
        """The caption of example `index` (cheap: no rendering)."""
        return self.scene_and_caption(index)[1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene, text = self.scene_and_caption(int(index))
        return {"image": render(scene, self.resolution), "caption": text,
                "scene": json.dumps(scene)}

    def __repr__(self) -> str:
        kinds = (", kinds=" + ",".join(f"{k}={p:g}" for k, p in self.kinds.items())
                 if self.kinds != _KIND_PROBS else "")
        language = f", language={self.language!r}" if self.language != "en" else ""
        return (f"ShapesSource(resolution={self.resolution}, size={self.size}, "
                f"split={self.split!r}, seed={self.seed}{kinds}{language})")


# Chinese words of the templates and of `parse_caption` beyond its object words.
_ZH_FUNCTION_WORDS = ("的", "在", "位于", "有", "是", "为", "和", "、", "，", "图中", "图里",
                      "图片中", "图片里", "画面中", "画面里", "画面上", "画中", "背景", "上",
                      "中", "里")


def vocabulary_zh() -> list[str]:
    """The Chinese words of the shapes world: every word `caption(..., language='zh')` writes
    and `parse_caption` reads ('一', '个', '红色', '圆形', '上面', '背景', '，', ...), longest
    first. Segmenting a Chinese caption greedily by them leaves nothing over (a test checks)."""
    words = (set(_ZH_LEXICON) | set(_ZH_BACKGROUND_WORDS) | set(_ZH_WHERE)
             | set(_ZH_FUNCTION_WORDS))
    return sorted((w for w in words if not w.isascii()), key=lambda w: (-len(w), w))


def vocabulary(num_captions: int = 2000) -> list[str]:
    """Every word the caption templates produce (for a closed-vocabulary tokenizer).

    Collected from the vocabulary tables plus `num_captions` generated captions of every
    split (deterministic), so template words ("on", "background", ...) are included too.
    """
    words = set(SHAPES) | {_plural(s) for s in SHAPES} | set(COLOURS) | set(SIZES)
    words |= set(BACKGROUNDS) | set(COUNT_WORDS.values())
    for rel in RELATIONS:
        words |= set(rel.split())
    for i in range(num_captions):
        split = SPLITS[i % len(SPLITS)]
        rng = np.random.default_rng([20260, i])
        words |= set(re.findall(r"[a-z]+", caption(sample_scene(rng, split), rng).lower()))
    return sorted(words)
