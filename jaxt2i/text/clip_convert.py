"""Hugging Face CLIP directories <-> Flax CLIP params, without torch, and the loaded `CLIP`.

`param_map` names, for every Flax leaf, the Hugging Face tensor it comes from and the layout
change between them; loading and saving both read it, so the two directions cannot drift apart.
PyTorch `nn.Linear` stores [out, in] and Flax [in, out]; attention projections are split per
head here ([embed, heads, kv]); the patch convolution is [out, in, kh, kw] in PyTorch and
[kh, kw, in, out] here. Reading goes through `convert.read_hf_tensors` (safetensors, single
file or sharded index, bfloat16 included).

    clip = load_clip("/models/clip-vit-large-patch14")
    text = clip.encode_text(["a photo of a cat", "a diagram"])   # states, pooled, embeds, mask
    image = clip.encode_image(images_uint8)                      # pooled, embeds
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxt2i.text import convert
from jaxt2i.text.clip import CLIPConfig, CLIPModel, init_clip, preprocess_images
from jaxt2i.text.convert import Entry
from jaxt2i.text.t5 import resolve_dtype
from jaxt2i.text.tokenizer import (TOKENIZER_FILES, Tokenizer, is_hub_id, load_tokenizer,
                                   resolve_model_dir)

_ident = lambda a: a  # noqa: E731
# Buffers some checkpoints carry that are not parameters (recomputed here).
_IGNORED_SUFFIXES = (".position_ids",)
# The HF tensors of each tower (what a text- or image-only load leaves unread).
_TOWER_PREFIXES = {"text": ("text_model.", "text_projection.", "logit_scale"),
                   "vision": ("vision_model.", "visual_projection.", "logit_scale")}


def _layer_entries(hf: str, fx: tuple, width: int, heads: int, mlp: int) -> list[Entry]:
    """One encoder layer: HF prefix `hf` ('text_model.encoder.layers.3.'), Flax path `fx`."""
    D, H, K = width, heads, width // heads
    entries = []
    for name in ("q_proj", "k_proj", "v_proj"):  # [H*K, D] -> [D, H, K]; bias [H*K] -> [H, K]
        entries += [
            Entry(f"{hf}self_attn.{name}.weight", fx + ("self_attn", name, "kernel"), (D, D),
                  lambda a: a.T.reshape(D, H, K), lambda a: a.reshape(D, H * K).T),
            Entry(f"{hf}self_attn.{name}.bias", fx + ("self_attn", name, "bias"), (D,),
                  lambda a: a.reshape(H, K), lambda a: a.reshape(H * K)),
        ]
    entries += [  # out: [D, H*K] -> [H, K, D]
        Entry(f"{hf}self_attn.out_proj.weight", fx + ("self_attn", "out_proj", "kernel"), (D, D),
              lambda a: a.T.reshape(H, K, D), lambda a: a.reshape(H * K, D).T),
        Entry(f"{hf}self_attn.out_proj.bias", fx + ("self_attn", "out_proj", "bias"), (D,),
              _ident, _ident),
        Entry(f"{hf}mlp.fc1.weight", fx + ("fc1", "kernel"), (mlp, D), np.transpose, np.transpose),
        Entry(f"{hf}mlp.fc1.bias", fx + ("fc1", "bias"), (mlp,), _ident, _ident),
        Entry(f"{hf}mlp.fc2.weight", fx + ("fc2", "kernel"), (D, mlp), np.transpose, np.transpose),
        Entry(f"{hf}mlp.fc2.bias", fx + ("fc2", "bias"), (D,), _ident, _ident),
    ]
    for norm in ("layer_norm1", "layer_norm2"):
        entries += _norm(f"{hf}{norm}", fx + (norm,), D)
    return entries


def _norm(hf: str, fx: tuple, width: int) -> list[Entry]:
    return [Entry(f"{hf}.weight", fx + ("scale",), (width,), _ident, _ident),
            Entry(f"{hf}.bias", fx + ("bias",), (width,), _ident, _ident)]


def param_map(cfg: CLIPConfig) -> list[Entry]:
    """Every parameter of `cfg`, in HF naming (CLIPModel's, which the *WithProjection models
    share), with its Flax location."""
    P = cfg.projection_dim
    entries = []
    if cfg.text is not None:
        t, fx = cfg.text, ("text_model",)
        entries += [
            Entry("text_model.embeddings.token_embedding.weight", fx + ("token_embedding",),
                  (t.vocab_size, t.width), _ident, _ident),
            Entry("text_model.embeddings.position_embedding.weight", fx + ("position_embedding",),
                  (t.max_length, t.width), _ident, _ident),
        ]
        for i in range(t.layers):
            entries += _layer_entries(f"text_model.encoder.layers.{i}.", fx + (f"layers_{i}",),
                                      t.width, t.heads, t.mlp_dim)
        entries += _norm("text_model.final_layer_norm", fx + ("final_layer_norm",), t.width)
        entries.append(Entry("text_projection.weight", ("text_projection", "kernel"),
                             (P, t.width), np.transpose, np.transpose))
    if cfg.vision is not None:
        v, fx = cfg.vision, ("vision_model",)
        p, n = v.patch_size, v.grid ** 2 + 1
        entries += [
            Entry("vision_model.embeddings.class_embedding", fx + ("class_embedding",),
                  (v.width,), _ident, _ident),
            Entry("vision_model.embeddings.patch_embedding.weight", fx + ("patch_embedding",),
                  (v.width, 3, p, p), lambda a: a.transpose(2, 3, 1, 0),
                  lambda a: a.transpose(3, 2, 0, 1)),
            Entry("vision_model.embeddings.position_embedding.weight",
                  fx + ("position_embedding",), (n, v.width), _ident, _ident),
        ]
        entries += _norm("vision_model.pre_layrnorm", fx + ("pre_layrnorm",), v.width)
        for i in range(v.layers):
            entries += _layer_entries(f"vision_model.encoder.layers.{i}.", fx + (f"layers_{i}",),
                                      v.width, v.heads, v.mlp_dim)
        entries += _norm("vision_model.post_layernorm", fx + ("post_layernorm",), v.width)
        entries.append(Entry("visual_projection.weight", ("visual_projection", "kernel"),
                             (P, v.width), np.transpose, np.transpose))
    if cfg.text is not None and cfg.vision is not None:
        entries.append(Entry("logit_scale", ("logit_scale",), (), _ident, _ident))
    return entries


def _listed(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def hf_to_flax(tensors: dict, names: Sequence[str], cfg: CLIPConfig, dtype: Any,
               where: str = "checkpoint", skip_prefixes: tuple[str, ...] = ()) -> dict:
    """Maps HF tensors to the Flax params tree; refuses missing, unexpected or misshaped
    tensors in one line that names them (`skip_prefixes`: tensors of towers not loaded)."""
    entries = param_map(cfg)
    expected = {e.hf_name for e in entries}
    missing = [e.hf_name for e in entries if e.hf_name not in tensors]
    if missing:
        raise ValueError(
            f"{where} lacks {len(missing)} tensor(s) its config.json implies: {_listed(missing)}; "
            "check that config.json belongs to these weights (a CLIPTextModel without "
            "text_projection is not supported)")
    unexpected = [n for n in names if n not in expected and not n.endswith(_IGNORED_SUFFIXES)
                  and not n.startswith(skip_prefixes)]
    if unexpected:
        raise ValueError(f"{where} has {len(unexpected)} tensor(s) a CLIP of its config.json "
                         f"does not: {_listed(unexpected)}; check that config.json belongs to "
                         "these weights")
    for e in entries:
        got = tuple(tensors[e.hf_name].shape)
        if got != e.hf_shape:
            raise ValueError(f"{where}: tensor {e.hf_name} has shape {list(got)}, expected "
                             f"{list(e.hf_shape)} from config.json; check that config.json "
                             "belongs to these weights")
    params: dict = {}
    for e in entries:
        node = params
        for k in e.path[:-1]:
            node = node.setdefault(k, {})
        # (np.asarray, not ascontiguousarray: that makes the scalar logit_scale 1-d)
        node[e.path[-1]] = np.asarray(e.to_flax(tensors[e.hf_name]), order="C").astype(dtype)
    return params


def flax_to_hf(params: dict, cfg: CLIPConfig) -> dict[str, np.ndarray]:
    """The inverse of `hf_to_flax`: HF names -> numpy arrays (PyTorch layouts)."""
    out = {}
    for e in param_map(cfg):
        node = params
        for k in e.path:
            if k not in node:
                raise ValueError(f"params lack {'/'.join(e.path)} (for {e.hf_name}); they do "
                                 "not belong to this CLIPConfig")
            node = node[k]
        if tuple(np.shape(node)) != tuple(np.shape(e.to_flax(np.zeros(e.hf_shape)))):
            raise ValueError(f"params {'/'.join(e.path)} has shape {list(np.shape(node))}, "
                             f"which does not fit {e.hf_name} {list(e.hf_shape)} of this config")
        out[e.hf_name] = np.asarray(e.to_hf(np.asarray(node)), order="C")
    return out


class TextFeatures(NamedTuple):
    states: jax.Array  # [B, L, Dt] token states after the final LayerNorm
    pooled: jax.Array  # [B, Dt] state at the end-of-text token
    embeds: jax.Array  # [B, P] projected (unnormalised) text embedding
    mask: jax.Array  # [B, L] bool


class ImageFeatures(NamedTuple):
    pooled: jax.Array  # [B, Dv] class token after post_layernorm
    embeds: jax.Array  # [B, P] projected (unnormalised) image embedding


def embed_pair(module: CLIPModel, params, ids, mask, pixels):
    """(text [B, P], image [B, P]) projected embeddings of a caption-image batch: CLIP applied
    for training (`jaxt2i.train.contrastive`), here beside the `CLIP` object, the two places
    the package applies CLIP. `pixels` are [B, H, W, 3] already preprocessed."""
    _, _, text = module.apply({"params": params}, ids, mask, method="encode_text")
    _, image = module.apply({"params": params}, pixels, method="encode_image")
    return text, image


class CLIP:
    """A CLIP model with its params and (optional) tokenizer.

    Attributes:
      config: the CLIPConfig (dtype = compute dtype).
      params: the Flax params pytree (plain arrays).
      tokenizer: fixed-length `Tokenizer` (default length: the model's 77 positions), or None.
      module: the `CLIPModel`; inside larger jitted functions call
        `clip.module.apply({"params": clip.params}, ids, mask, method="encode_text")`.
    """

    def __init__(self, config: CLIPConfig, params: Any, tokenizer: Tokenizer | None = None):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.module = CLIPModel(config)
        self._text = jax.jit(self.text_features)
        self._image = jax.jit(lambda p, px: self.module.apply(
            {"params": p}, px, method="encode_image"))
        if config.vision is not None:  # preprocessing and encoding in one program
            self._raw_image = jax.jit(lambda p, images: self._image(
                p, preprocess_images(images, config.vision.image_size)))

    def text_features(self, params, ids, mask) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Traceable (inside a larger jitted function, e.g. a train step): [B, L] ids + mask
        -> (states [B, L, Dt], pooled [B, Dt], embeds [B, P])."""
        return self.module.apply({"params": params}, ids, mask, method="encode_text")

    def image_embeds(self, params, images) -> jax.Array:
        """Traceable: [B, H, W, 3] images in [0, 1] (any size; `preprocess_images`) -> the
        projected, unnormalised image embedding [B, P]."""
        return self.pixel_embeds(params, preprocess_images(images, self.config.vision.image_size))

    def pixel_embeds(self, params, pixels) -> jax.Array:
        """Traceable: [B, S, S, 3] preprocessed pixels (`preprocess_images`) -> the projected,
        unnormalised image embedding [B, P]."""
        return self.module.apply({"params": params}, pixels, method="encode_image")[1]

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Prompts -> (ids [B, L] int32, mask [B, L] bool), padded to the tokenizer's length."""
        if self.tokenizer is None:
            raise ValueError("this CLIP has no tokenizer: load it from a directory with "
                             "tokenizer files, pass tokenizer=DIR, or call encode_text_ids")
        return self.tokenizer(prompts)

    def encode_text_ids(self, ids, mask) -> tuple[jax.Array, jax.Array, jax.Array]:
        """[B, L] ids + mask -> (states [B, L, Dt], pooled [B, Dt], embeds [B, P]), jitted."""
        return self._text(self.params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool))

    def encode_text(self, prompts: Sequence[str]) -> TextFeatures:
        """Tokenizes and encodes prompts ('' is valid: start and end-of-text tokens only)."""
        ids, mask = self.tokenize(prompts)
        return TextFeatures(*self.encode_text_ids(ids, mask), jnp.asarray(mask))

    def encode_image(self, images, preprocess: bool = True) -> ImageFeatures:
        """Encodes images.

        Args:
          images: with `preprocess`, [B, H, W, 3] RGB uint8 or float in [0, 1] of any size
            (`preprocess_images` resizes, crops and normalises); without, pixels already
            [B, S, S, 3] normalised.
        """
        if self.config.vision is None:
            raise ValueError("this CLIP has no vision tower (loaded from a text-only "
                             "checkpoint); load a full CLIPModel directory")
        encode = self._raw_image if preprocess else self._image
        return ImageFeatures(*encode(self.params, jnp.asarray(images)))


def _read_config(model_dir: str) -> dict:
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"no config.json in {model_dir}; is this a Hugging Face CLIP "
                                "directory (CLIPModel.save_pretrained)?")
    with open(cfg_path) as f:
        return json.load(f)


def load_clip(path: str, dtype: str = "float32", *, param_dtype: str | None = None,
              towers: Sequence[str] | None = None, max_length: int | None = None,
              tokenizer: str | None = None) -> CLIP:
    """Loads a Hugging Face CLIP directory without torch.

    Args:
      path: local directory of a `CLIPModel`, `CLIPTextModelWithProjection` or
        `CLIPVisionModelWithProjection` (config.json + model.safetensors or a sharded index),
        or a hub id (the only case that uses the network).
      dtype: compute dtype, 'float32' or 'bfloat16'.
      param_dtype: storage dtype of the params; defaults to `dtype`.
      towers: ('text',) or ('vision',) reads only that tower of a full CLIP (unCLIP's prior
        needs the text tower only); default: every tower the directory has.
      max_length: the tokenizer's fixed length; default: the model's positions (77).
      tokenizer: tokenizer directory if not `path` (default: `path`'s tokenizer files, if any).

    Returns:
      A `CLIP`.
    """
    if not os.path.isdir(path) and not is_hub_id(path):
        raise FileNotFoundError(
            f"CLIP {path!r} is not a directory; pass a local Hugging Face CLIP directory "
            "(config.json + model.safetensors + tokenizer files) or a hub id such as "
            "openai/clip-vit-large-patch14")
    model_dir = resolve_model_dir(path, allow_patterns=["*.json", "*.safetensors", "*.txt"])
    config = CLIPConfig.from_hf(_read_config(model_dir), dtype=dtype,
                                param_dtype=param_dtype or dtype)
    skip: tuple[str, ...] = ()
    if towers is not None:
        towers = tuple(towers)
        bad = [t for t in towers if t not in ("text", "vision")]
        if bad or not towers:
            raise ValueError(f"towers must name 'text' and/or 'vision', got {list(towers)}")
        absent = [t for t in towers if getattr(config, t) is None]
        if absent:
            raise ValueError(f"{model_dir} has no {absent[0]} tower (config.json model_type "
                             f"{config.to_hf()['model_type']!r}); drop it from towers")
        for t in ("text", "vision"):
            if t not in towers:
                config = config.replace(**{t: None})
                skip += _TOWER_PREFIXES[t]
    wanted = {e.hf_name for e in param_map(config)}
    tensors, names = convert.read_hf_tensors(model_dir, wanted)
    params = hf_to_flax(tensors, names, config, resolve_dtype(config.param_dtype),
                        where=model_dir, skip_prefixes=skip)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    tok = None
    if config.text is not None and max_length is not None and not (
            2 <= max_length <= config.text.max_length):
        raise ValueError(f"max_length {max_length} does not fit this CLIP: its text tower has "
                         f"{config.text.max_length} positions; use 2 to {config.text.max_length}")
    if config.text is not None:
        tok_dir = tokenizer or model_dir
        if tokenizer is not None or set(os.listdir(model_dir)) & set(TOKENIZER_FILES):
            tok = load_tokenizer(tok_dir, max_length or config.text.max_length)
            if len(tok.hf) > config.text.vocab_size:
                raise ValueError(f"the tokenizer in {tok_dir} has {len(tok.hf)} tokens but the "
                                 f"model's embedding has {config.text.vocab_size} rows; use "
                                 "this checkpoint's own tokenizer")
    return CLIP(config, params, tok)


def init_clip_model(config: CLIPConfig, tokenizer: Tokenizer | None = None,
                    seed: int = 0) -> CLIP:
    """A randomly initialised `CLIP` of `config` (tests, training from scratch)."""
    params = nn.unbox(jax.jit(lambda k: init_clip(config, k))(jax.random.key(seed)))
    return CLIP(config, params, tokenizer)


def save_clip(clip: CLIP, out_dir: str) -> None:
    """Writes a Hugging Face directory (config.json, model.safetensors, the tokenizer if any)
    that transformers' `CLIPModel.from_pretrained` (or the *WithProjection model of a
    one-tower CLIP) loads."""
    os.makedirs(out_dir, exist_ok=True)
    tensors = flax_to_hf(jax.device_get(clip.params), clip.config)
    convert.write_safetensors(tensors, os.path.join(out_dir, convert.SINGLE_FILE),
                              metadata={"format": "pt"})
    tok = clip.tokenizer.hf if clip.tokenizer is not None else None
    hf = clip.config.to_hf(bos_token_id=getattr(tok, "bos_token_id", None),
                           pad_token_id=getattr(tok, "pad_token_id", None))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    if clip.tokenizer is not None:
        clip.tokenizer.hf.save_pretrained(out_dir)
