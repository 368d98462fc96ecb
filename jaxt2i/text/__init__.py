"""Frozen T5 text encoder: pure-Flax model, Hugging Face checkpoint loading, tokenization."""

from jaxt2i.text.encoder import TextEncoder, init_encoder, load_encoder, save_encoder
from jaxt2i.text.t5 import SIZES, T5Config, T5Encoder, count_params, get_t5_config
from jaxt2i.text.tokenizer import Tokenizer, build_word_tokenizer, load_tokenizer

__all__ = [
    "SIZES", "T5Config", "T5Encoder", "TextEncoder", "Tokenizer", "build_word_tokenizer",
    "count_params", "get_t5_config", "init_encoder", "load_encoder", "load_tokenizer",
    "save_encoder",
]
