"""Files shipped inside the package: the demo's text encoder + tokenizer, the demo cascade, and
the demo CLIP (trained on the shapes world with `configs/clip.py:size=demo`, docs/unclip.md).

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


def build_text_encoder(out_dir: str | None = None) -> str:
    """(Re)builds the bundled encoder: tokenizer from `vocabulary()`, random T5 'shapes' weights."""
    from jaxt2i.text import get_t5_config, init_encoder, save_encoder
    from jaxt2i.text.tokenizer import Tokenizer, build_word_tokenizer

    out_dir = out_dir or os.path.join(_HERE, TEXT_ENCODER)
    hf_tok = build_word_tokenizer(vocabulary())
    cfg = get_t5_config("shapes")
    if len(hf_tok) > cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(hf_tok)} tokens > T5 'shapes' vocab {cfg.vocab_size}")
    enc = init_encoder(cfg, Tokenizer(hf_tok, TEXT_MAX_LENGTH, closed_vocabulary=True),
                       seed=TEXT_SEED)
    save_encoder(enc, out_dir)
    return out_dir
