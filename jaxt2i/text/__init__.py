"""Frozen text encoders: pure-Flax T5 and CLIP, Hugging Face checkpoint loading, tokenization."""

from jaxt2i.text.clip import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig,
                              get_clip_config, preprocess_images)
from jaxt2i.text.clip_convert import CLIP, init_clip_model, load_clip, save_clip
from jaxt2i.text.encoder import TextEncoder, init_encoder, load_encoder, save_encoder
from jaxt2i.text.t5 import SIZES, T5Config, T5Encoder, count_params, get_t5_config
from jaxt2i.text.tokenizer import Tokenizer, build_word_tokenizer, load_tokenizer

__all__ = [
    "CLIP", "CLIPConfig", "CLIPModel", "CLIPTextConfig", "CLIPVisionConfig", "SIZES",
    "T5Config", "T5Encoder", "TextEncoder", "Tokenizer", "build_word_tokenizer", "count_params",
    "get_clip_config", "get_t5_config", "init_clip_model", "init_encoder", "load_clip",
    "load_encoder", "load_tokenizer", "preprocess_images", "save_clip", "save_encoder",
]
