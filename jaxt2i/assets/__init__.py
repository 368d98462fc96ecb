"""Files shipped inside the package: the demo's text encoder + tokenizer, the demo cascade, the
demo CLIP (trained on the shapes world with `configs/clip.py:size=demo`, docs/unclip.md) and the
unCLIP demo (its prior, its decoder and the demo cascade's SR stage; `--model=unclip`).

The text encoder is a small T5 (`shapes` size) with random, frozen weights and a closed-vocabulary
tokenizer: for the shapes world the U-Net only needs distinct, stable embeddings per word, which a
random encoder provides. Rebuild it with `python -m jaxt2i.assets`.
"""

from __future__ import annotations

import os

_HERE = os.path.dirname(os.path.abspath(__file__))
TEXT_ENCODER = "text_encoder"
DEMO_CASCADE = "demo_cascade"
DEMO_CLIP = "demo_clip"
DEMO_UNCLIP = "demo_unclip"
MODELS = ("imagen", "unclip")  # --model: the bundled demos of `sample` and `eval`
TEXT_MAX_LENGTH = 32
TEXT_SEED = 20260


def text_encoder_dir() -> str:
    """Directory of the bundled T5 encoder (Hugging Face layout)."""
    path = os.path.join(_HERE, TEXT_ENCODER)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"the bundled text encoder is missing from {path}; reinstall jaxt2i or rebuild it "
            "with `python -m jaxt2i.assets`")
    return path


def demo_cascade_dir() -> str:
    """The bundled demo cascade directory; ConfigError if it is not installed."""
    from jaxt2i.config import ConfigError

    path = os.path.join(_HERE, DEMO_CASCADE)
    if not os.path.exists(os.path.join(path, "cascade.json")):
        raise ConfigError("the bundled demo cascade is not installed yet (no "
                          f"{os.path.join(path, 'cascade.json')}); pass --checkpoint=DIR")
    return path


def demo_unclip_dir() -> str:
    """The bundled unCLIP demo (cascade.json "kind": "unclip": the prior, the decoder, and the
    Imagen demo's SR stage, which it shares); ConfigError if it is not installed."""
    from jaxt2i.config import ConfigError

    path = os.path.join(_HERE, DEMO_UNCLIP)
    if not os.path.exists(os.path.join(path, "cascade.json")):
        raise ConfigError("the bundled unCLIP demo is not installed (no "
                          f"{os.path.join(path, 'cascade.json')}); reinstall jaxt2i or pass "
                          "--checkpoint=DIR")
    return path


def demo_dir(model: str | None = None) -> str:
    """The bundled demo cascade `--model` names: 'imagen' (the default) or 'unclip'."""
    from jaxt2i.config import ConfigError

    if model in (None, "imagen"):
        return demo_cascade_dir()
    if model == "unclip":
        return demo_unclip_dir()
    raise ConfigError(f"--model={model!r} is not one of {', '.join(MODELS)}")


def demo_clip_dir() -> str:
    """Directory of the bundled shapes-world CLIP (Hugging Face layout: `load_clip` and
    transformers' `CLIPModel` read it; retrieval.json holds its measured accuracy)."""
    path = os.path.join(_HERE, DEMO_CLIP)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"the bundled demo CLIP is missing from {path}; reinstall jaxt2i or train one with "
            "`python -m jaxt2i.train --config=configs/clip.py:size=demo --workdir=DIR` "
            "(its DIR/export)")
    return path


def vocabulary() -> list[str]:
    """Whole-word vocabulary of the bundled tokenizer: the shapes world's words + common words."""
    from jaxt2i.data import shapes

    return sorted(set(_COMMON) | set(shapes.vocabulary()))


_COMMON = """a an the one two three four five of on in at with and above below left right
under over next to beside near background white black gray grey red green blue yellow purple
orange pink brown cyan magenta circle circles square squares triangle triangles star stars
hexagon hexagons diamond diamonds small large big tiny huge picture image photo drawing
""".split()


# The Chinese words' embedding rows start as the row of the English word named here (a
# random row where none is), before `python -m jaxt2i.train.align_text` learns them.
_ZH_START = {
    **dict.fromkeys(("一",), "a"), **dict.fromkeys(("两", "二"), "two"), "三": "three",
    "四": "four", "五": "five", **dict.fromkeys(("红色", "红"), "red"),
    **dict.fromkeys(("橙色", "橙", "橘色", "橘"), "orange"), **dict.fromkeys(("黄色", "黄"), "yellow"),
    **dict.fromkeys(("绿色", "绿"), "green"), **dict.fromkeys(("蓝色", "蓝"), "blue"),
    **dict.fromkeys(("紫色", "紫"), "purple"), "大": "large", "小": "small",
    **dict.fromkeys(("圆形", "圆", "圆圈"), "circle"),
    **dict.fromkeys(("正方形", "方形", "方块"), "square"),
    **dict.fromkeys(("三角形", "三角"), "triangle"),
    **dict.fromkeys(("星星", "星", "五角星", "星形"), "star"),
    **dict.fromkeys(("十字", "十字形"), "cross"), **dict.fromkeys(("白色", "白"), "white"),
    **dict.fromkeys(("黑色", "黑"), "black"), **dict.fromkeys(("灰色", "灰"), "gray"),
    **dict.fromkeys(("上面", "上方", "上边", "之上"), "above"),
    **dict.fromkeys(("下面", "下方", "下边", "之下", "底下"), "below"),
    **dict.fromkeys(("左边", "左侧", "左面", "左方"), "left"),
    **dict.fromkeys(("右边", "右侧", "右面", "右方"), "right"),
    "背景": "background", "上": "on", "和": "and", "有": "there", "是": "is", "为": "is",
    **dict.fromkeys(("中", "里"), "in"),
    **dict.fromkeys(("图中", "图里", "图片中", "图片里", "画面中", "画面里", "画面上", "画中"),
                    "picture"),
}
TEXT_VOCAB_SIZE = 384  # embedding rows: the English words' 256, then the Chinese words'
LEARNED_ROWS_KEY = "jaxt2i_learned_rows_from"  # config.json: first row align_text learns


def build_text_encoder(out_dir: str | None = None) -> str:
    """(Re)builds the bundled encoder before its Chinese rows are learned.

    The tokenizer holds `vocabulary()` (one token per English word, then single characters)
    and, after those 256 ids, the shapes world's Chinese words (`shapes.vocabulary_zh()`). The
    random T5 'shapes' weights of the first 256 rows are what they were when the encoder was
    English only, so English prompts encode exactly as before; each Chinese word's row starts
    as its English translation's (`_ZH_START`; a random row for words like 的, 个, 在).
    config.json's `jaxt2i_learned_rows_from` (256) marks the rows that
    `python -m jaxt2i.train.align_text` then learns; the shipped encoder holds learned rows.
    """
    import dataclasses

    import jax
    import numpy as np

    from jaxt2i.data import shapes
    from jaxt2i.text import TextEncoder, get_t5_config, init_encoder, save_encoder
    from jaxt2i.text.tokenizer import Tokenizer, build_word_tokenizer

    out_dir = out_dir or os.path.join(_HERE, TEXT_ENCODER)
    words = vocabulary()
    english = build_word_tokenizer(words)
    hf_tok = build_word_tokenizer(words, unspaced_words=shapes.vocabulary_zh())
    cfg = get_t5_config("shapes")
    n_en, n = len(english), len(hf_tok)
    if n_en != cfg.vocab_size or n > TEXT_VOCAB_SIZE:
        raise ValueError(f"tokenizer has {n_en} English / {n} tokens; the encoder is built for "
                         f"{cfg.vocab_size} / at most {TEXT_VOCAB_SIZE}")
    tok = Tokenizer(hf_tok, TEXT_MAX_LENGTH, closed_vocabulary=True)
    enc = init_encoder(cfg, tok, seed=TEXT_SEED)
    table = np.asarray(jax.device_get(enc.params["token_embedding"]))
    rows = np.zeros((TEXT_VOCAB_SIZE - n_en, table.shape[1]), np.float32)  # unused: zero
    rng = np.random.default_rng(TEXT_SEED)
    for i in range(n_en, n):
        piece = hf_tok.convert_ids_to_tokens(i)
        start = _ZH_START.get(piece)
        rows[i - n_en] = (table[hf_tok.convert_tokens_to_ids("\u2581" + start)] if start
                          else rng.standard_normal(table.shape[1]))
    params = {**enc.params, "token_embedding": np.concatenate([table, rows])}
    enc = TextEncoder(dataclasses.replace(cfg, vocab_size=TEXT_VOCAB_SIZE), params, tok)
    save_encoder(enc, out_dir)
    mark_learned_rows(out_dir, n_en)
    return out_dir


def mark_learned_rows(encoder_dir: str, first: int, record: dict | None = None) -> None:
    """Writes `jaxt2i_learned_rows_from` (and `record`, what learned them, as
    `jaxt2i_learned_rows`) into an encoder directory's config.json."""
    import json

    path = os.path.join(encoder_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg[LEARNED_ROWS_KEY] = int(first)
    if record is not None:
        cfg["jaxt2i_learned_rows"] = record
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
