"""The frozen text encoder object: tokenizer + T5 params + one jitted encode function.

`load_encoder(path)` reads a Hugging Face T5 / mT5 / umT5 / ByT5 directory (config.json,
model.safetensors or a sharded index, tokenizer files) without torch; `save_encoder` writes one
back that transformers' `T5EncoderModel.from_pretrained` (`UMT5EncoderModel` for umT5) loads; `init_encoder` makes a randomly
initialised one (tests, the bundled shapes demo).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxt2i.text import convert
from jaxt2i.text.t5 import T5Config, T5Encoder, resolve_dtype
from jaxt2i.text.tokenizer import (CLOSED_VOCABULARY_KEY, Tokenizer, load_tokenizer,
                                   resolve_model_dir)

DEFAULT_MAX_LENGTH = 128
_MAX_LENGTH_KEY = "jaxt2i_max_length"  # optional field of config.json: the text length L


class TextEncoder:
    """A frozen T5 encoder with its tokenizer.

    Attributes:
      config: the T5Config (dtype = compute dtype).
      params: the Flax params pytree (plain arrays, no partitioning boxes).
      tokenizer: fixed-length `Tokenizer`.
      module: the `T5Encoder` linen module. Inside larger jitted functions, call
        `encoder.embed(params, ids, mask)` (what training, sampling and the exporters use).
    """

    def __init__(self, config: T5Config, params: Any, tokenizer: Tokenizer):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.module = T5Encoder(config)
        self._encode = jax.jit(self.apply)

    def apply(self, params, ids, mask) -> jax.Array:
        """Traceable: [B, L] ids + [B, L] mask -> [B, L, D] embeddings in the compute dtype."""
        return self.module.apply({"params": params}, ids, mask)

    def embed(self, params, ids, mask) -> tuple[jax.Array, jax.Array]:
        """Traceable: the text conditioning of every stage, (emb [B, L, D] float32, mask [B, L]
        bool): what training, the cascade and the exporters all call."""
        return self.apply(params, ids, mask).astype(jnp.float32), mask.astype(bool)

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    def encode_ids(self, ids, mask) -> jax.Array:
        """[B, L] ids + [B, L] mask -> [B, L, D] embeddings (jitted)."""
        return self._encode(self.params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool))

    def encode(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
        """Encodes prompts.

        Args:
          prompts: list of strings; '' is the unconditional prompt.

        Returns:
          (embeddings [B, L, D] in the compute dtype, mask [B, L] bool). Embeddings at padding
          positions are whatever T5 computes there (as in transformers); consumers use `mask`.
        """
        ids, mask = self.tokenizer(prompts)
        return self.encode_ids(ids, mask), jnp.asarray(mask)


def _place(params, shardings):
    if shardings is None:
        return jax.tree_util.tree_map(jnp.asarray, params)
    if callable(shardings):
        shardings = shardings(params)
    return jax.device_put(params, shardings)


def load_encoder(
    path: str,
    dtype: str = "float32",
    *,
    param_dtype: str | None = None,
    max_length: int | None = None,
    tokenizer: str | None = None,
    shardings: Any | Callable | None = None,
) -> TextEncoder:
    """Loads a Hugging Face T5 (v1.0 / v1.1 / Flan / mT5 / umT5 / ByT5) encoder without torch.

    Args:
      path: local HF model directory, or a hub id (the only case that uses the network).
      dtype: compute dtype, 'float32' or 'bfloat16'.
      param_dtype: storage dtype of the params; defaults to `dtype` (a frozen model needs no
        float32 master copy: T5-XXL takes 9.5 GB in bfloat16).
      max_length: fixed text length; default: config.json's `jaxt2i_max_length` or 128.
      tokenizer: directory of the tokenizer if not `path`.
      shardings: optional pytree of `jax.sharding.Sharding` matching the params (or a function
        params -> shardings) to place a large encoder across a mesh.

    Returns:
      A `TextEncoder`.
    """
    model_dir = resolve_model_dir(
        path, allow_patterns=["*.json", "*.safetensors", "spiece.model", "*.model"])
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"no config.json in {model_dir}; is this a Hugging Face T5 directory?")
    with open(cfg_path) as f:
        hf_cfg = json.load(f)
    param_dtype = param_dtype or dtype
    config = T5Config.from_hf(hf_cfg, dtype=dtype, param_dtype=param_dtype)
    wanted = {e.hf_name for e in convert.param_map(config)}
    tensors, names = convert.read_hf_tensors(model_dir, wanted)
    params = convert.hf_to_flax(tensors, names, config, resolve_dtype(param_dtype))
    length = max_length or hf_cfg.get(_MAX_LENGTH_KEY, DEFAULT_MAX_LENGTH)
    tok = load_tokenizer(tokenizer or model_dir, length,
                         closed_vocabulary=bool(hf_cfg.get(CLOSED_VOCABULARY_KEY, False)))
    check_tokenizer_fits(tok, config, hf_cfg, tokenizer or model_dir)
    return TextEncoder(config, _place(params, shardings), tok)


def encode_to_file(encoder, prompts: list[str], out: str | None) -> dict:
    """Encodes `prompts`, optionally saves them, and returns a summary per prompt.

    Args:
      encoder: a `TextEncoder`.
      prompts: the prompts ('' is the unconditional prompt).
      out: if given, a .safetensors file for embeddings float32 [B, L, D], mask uint8 [B, L]
        and the prompts (JSON) and max_length in its metadata.

    Returns:
      {'shape': [B, L, D], 'rows': [{'prompt', 'tokens', 'rms'} per prompt]}.
    """
    emb, mask = encoder.encode(prompts)
    emb = np.asarray(emb, np.float32)
    mask = np.asarray(mask)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        convert.write_safetensors({"embeddings": emb, "mask": mask.astype(np.uint8)}, out,
                                  metadata={"prompts": json.dumps(prompts),
                                            "max_length": str(encoder.max_length)})
    rows = []
    for i, p in enumerate(prompts):
        m = mask[i]
        rows.append({"prompt": p, "tokens": int(m.sum()),
                     "rms": float(np.sqrt(np.mean(emb[i][m] ** 2)))})
    return {"shape": list(emb.shape), "rows": rows}


def check_tokenizer_fits(tok: Tokenizer, config: T5Config, hf_cfg: dict, where: str) -> None:
    """Raises ValueError (one line) unless `tok` can be this encoder's tokenizer.

    Its ids must index the embedding table (no more tokens than vocab_size); it must not be far
    smaller (T5 pads its table by < 128 rows: a tokenizer with under half the rows is another
    one, whose ids would select the wrong embeddings); and its <pad> / </s> ids must be the
    ones config.json names.
    """
    n, v = len(tok.hf), config.vocab_size
    fix = (f"the tokenizer in {where!r} is not this encoder's; put the tokenizer the encoder "
           "was trained with there (or pass tokenizer=DIR)")
    if n > v:
        raise ValueError(f"tokenizer has {n} tokens but the encoder's embedding table has "
                         f"vocab_size {v} rows; {fix}")
    if n < v // 2:
        raise ValueError(f"tokenizer has only {n} tokens for the encoder's vocab_size of {v} "
                         f"rows; {fix}")
    for name in ("pad_token_id", "eos_token_id"):
        want, got = hf_cfg.get(name), getattr(tok.hf, name)
        if want is not None and got != want:
            raise ValueError(f"tokenizer's {name} is {got} but the encoder's config.json says "
                             f"{want}; {fix}")


def init_encoder(config: T5Config, tokenizer: Tokenizer, seed: int = 0) -> TextEncoder:
    """A randomly initialised encoder (T5's initialisation scales)."""
    module = T5Encoder(config)
    ids = jnp.zeros((1, tokenizer.max_length), jnp.int32)
    variables = jax.jit(module.init)(jax.random.key(seed), ids, jnp.ones(ids.shape, bool))
    return TextEncoder(config, nn.unbox(variables["params"]), tokenizer)


def abstract_encoder(path: str, dtype: str = "float32", max_length: int | None = None
                     ) -> TextEncoder:
    """The encoder `path` names with shape-only params (`jax.ShapeDtypeStruct`s), its weights
    never read: for compiling a step that contains it without holding it (`jaxt2i.aot`).

    Args:
      path: 'bundled', a local Hugging Face directory (its config.json and tokenizer are read),
        or a hub id / size whose last part is a named size (`google/t5-v1_1-xxl`).
      dtype: compute and storage dtype of the frozen params.
      max_length: text length L (default: the directory's, or 128).

    Raises ValueError naming the known sizes when `path` is neither.
    """
    from jaxt2i import assets
    from jaxt2i.text.t5 import SIZES, get_t5_config

    if path == "bundled":
        path = assets.text_encoder_dir()
    tok_dir = assets.text_encoder_dir()
    if os.path.isdir(path):
        with open(os.path.join(path, "config.json")) as f:
            hf_cfg = json.load(f)
        config = T5Config.from_hf(hf_cfg, dtype=dtype, param_dtype=dtype)
        max_length = max_length or hf_cfg.get(_MAX_LENGTH_KEY, DEFAULT_MAX_LENGTH)
        tok_dir = path
    else:
        name = path.rstrip("/").split("/")[-1]
        if name not in SIZES:
            raise ValueError(f"text encoder {path!r} is neither a local directory nor a named "
                             f"size (its last part must be one of {sorted(SIZES)})")
        config = get_t5_config(name, dtype=dtype, param_dtype=dtype)
        max_length = max_length or DEFAULT_MAX_LENGTH
    # Only the empty prompt is tokenized (its ids are constants of the step); any tokenizer
    # at the right length gives the compiled program its shapes.
    tok = load_tokenizer(tok_dir, max_length)
    ids = jax.ShapeDtypeStruct((1, max_length), jnp.int32)
    mask = jax.ShapeDtypeStruct((1, max_length), jnp.bool_)
    shapes = jax.eval_shape(lambda i, m: T5Encoder(config).init(jax.random.key(0), i, m), ids,
                            mask)
    return TextEncoder(config, nn.unbox(shapes["params"]), tok)


def save_encoder(encoder: TextEncoder, out_dir: str, dtype: str | None = None) -> None:
    """Writes a Hugging Face T5 encoder directory (config.json, model.safetensors, tokenizer).

    `T5EncoderModel.from_pretrained(out_dir)` (`UMT5EncoderModel` for umT5) and
    `load_encoder(out_dir)` both read it.

    Args:
      encoder: the encoder to save.
      out_dir: target directory (created).
      dtype: storage dtype ('float32', 'bfloat16', 'float16'); default float32.
    """
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    store = np.dtype(resolve_dtype(dtype or "float32"))
    tensors = {k: v.astype(store) for k, v in convert.flax_to_hf(
        jax.device_get(encoder.params), encoder.config).items()}
    hf_cfg = encoder.config.to_hf()
    hf_cfg[_MAX_LENGTH_KEY] = encoder.max_length
    if encoder.tokenizer.closed_vocabulary:
        hf_cfg[CLOSED_VOCABULARY_KEY] = True
    hf_cfg["torch_dtype"] = dtype or "float32"
    convert.write_safetensors(tensors, os.path.join(out_dir, convert.SINGLE_FILE),
                              metadata={"format": "pt"}, save_file=save_file)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    encoder.tokenizer.hf.save_pretrained(out_dir)
