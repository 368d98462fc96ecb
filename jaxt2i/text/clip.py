"""Pure-Flax CLIP (text tower, vision tower, projections, logit scale), numerically matching
transformers' `CLIPModel`.

CLIP (Radford et al. 2021) embeds captions and images into one space; DALL·E 2 / unCLIP
conditions its prior and decoder on those embeddings. The towers follow the published
architecture:
  * text: token + learned position embeddings, pre-LN transformer layers with a causal mask
    (and the padding mask), a final LayerNorm; the pooled feature is the state at the
    end-of-text token (`eos_positions`, transformers' rule);
  * vision: a bias-free patch convolution, a class token, learned position embeddings, a
    LayerNorm before the layers (`pre_layrnorm`, transformers' spelling) and one on the class
    token after them (`post_layernorm`);
  * bias-free `text_projection` / `visual_projection` into the joint space and a learned
    temperature `logit_scale` (stored as a log).

There is no dropout (transformers' CLIP has none at inference either). Every parameter carries
logical axis names (vocab, embed, heads, kv, mlp, norm) so the project's sharding rules apply.
A config may leave out a tower (`text=None` or `vision=None`): a directory of
`CLIPTextModelWithProjection` or `CLIPVisionModelWithProjection` weights, or a text-only load of
a full CLIP, has only the other one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxt2i.models.layers import TOKEN_AXES, constrain, partitioned
from jaxt2i.text.t5 import resolve_dtype

# transformers' rule: checkpoints converted before its PR #24773 say eos_token_id == 2, and for
# them the pooled token is the position of the largest id (CLIP's end-of-text id is the
# vocabulary's last).
LEGACY_EOS_TOKEN_ID = 2
# OpenAI's per-channel RGB statistics of the CLIP training images (also used by LAION's).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI's CLIP
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # open_clip / LAION
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def _check_tower(tower: Any, kind: str) -> None:
    for field in ("width", "layers", "heads", "mlp_dim"):
        if getattr(tower, field) <= 0:
            raise ValueError(f"CLIP {kind}.{field} must be positive, got {getattr(tower, field)}")
    if tower.width % tower.heads:
        raise ValueError(f"CLIP {kind}.width ({tower.width}) must be divisible by "
                         f"{kind}.heads ({tower.heads})")
    if tower.activation not in _ACTIVATIONS:
        raise ValueError(f"CLIP {kind}.activation {tower.activation!r} is not supported; use one "
                         f"of {sorted(_ACTIVATIONS)}")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The text tower (defaults: OpenAI ViT-B/32's)."""

    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    max_length: int = 77  # learned positions (HF: max_position_embeddings)
    activation: str = "quick_gelu"
    # The token whose final state is the pooled feature; LEGACY_EOS_TOKEN_ID (2) selects the
    # largest id instead (transformers' rule for configs written before the fix).
    eos_token_id: int = 49407
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        _check_tower(self, "text")
        if self.vocab_size <= 0 or self.max_length <= 0:
            raise ValueError(f"CLIP text.vocab_size ({self.vocab_size}) and text.max_length "
                             f"({self.max_length}) must be positive")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The vision tower (defaults: OpenAI ViT-B/32's)."""

    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        _check_tower(self, "vision")
        if not 0 < self.patch_size <= self.image_size:
            raise ValueError(f"CLIP vision.patch_size ({self.patch_size}) must be in "
                             f"[1, image_size ({self.image_size})]")

    @property
    def grid(self) -> int:
        """Patches per side (a remainder of the image beyond grid * patch_size is unused)."""
        return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """A CLIP model: either tower may be None (a text-only or image-only checkpoint)."""

    text: CLIPTextConfig | None = dataclasses.field(default_factory=CLIPTextConfig)
    vision: CLIPVisionConfig | None = dataclasses.field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init: float = 2.6592  # log(1 / 0.07), CLIP's initial temperature
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.text is None and self.vision is None:
            raise ValueError("a CLIPConfig needs a text or a vision tower (both are None)")
        if self.projection_dim <= 0:
            raise ValueError(f"CLIP projection_dim must be positive, got {self.projection_dim}")
        resolve_dtype(self.dtype)
        resolve_dtype(self.param_dtype)

    def replace(self, **kw) -> "CLIPConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPConfig":
        d = dict(d)
        if d.get("text") is not None:
            d["text"] = CLIPTextConfig(**d["text"])
        if d.get("vision") is not None:
            d["vision"] = CLIPVisionConfig(**d["vision"])
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "CLIPConfig":
        """Builds the config from a Hugging Face `config.json` dict.

        Reads `CLIPModel` configs (model_type 'clip', with text_config / vision_config, or the
        old text_config_dict / vision_config_dict), `CLIPTextModelWithProjection`
        ('clip_text_model') and `CLIPVisionModelWithProjection` ('clip_vision_model'). Fields
        config.json leaves out take transformers' defaults, as transformers reads them.
        """
        model_type = hf.get("model_type")
        if model_type == "clip":
            text = {**(hf.get("text_config") or {}), **(hf.get("text_config_dict") or {})}
            vision = {**(hf.get("vision_config") or {}), **(hf.get("vision_config_dict") or {})}
            kw = dict(text=_text_from_hf(text), vision=_vision_from_hf(vision),
                      projection_dim=hf.get("projection_dim", 512),
                      logit_scale_init=hf.get("logit_scale_init_value", 2.6592))
        elif model_type == "clip_text_model":
            kw = dict(text=_text_from_hf(hf), vision=None,
                      projection_dim=hf.get("projection_dim", 512))
        elif model_type == "clip_vision_model":
            kw = dict(text=None, vision=_vision_from_hf(hf),
                      projection_dim=hf.get("projection_dim", 512))
        else:
            raise ValueError(
                f"model_type {model_type!r} is not a CLIP model this loader reads; use a "
                "CLIPModel, CLIPTextModelWithProjection or CLIPVisionModelWithProjection "
                "directory (model_type 'clip', 'clip_text_model' or 'clip_vision_model')")
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self, bos_token_id: int | None = None, pad_token_id: int | None = None) -> dict:
        """The matching Hugging Face `config.json` (CLIPModel, or the one tower with its
        projection when the other is None).

        The start and padding ids are the tokenizer's business (the model never reads them);
        `save_clip` passes its tokenizer's, otherwise they are left out (None).
        """
        text = vision = None
        if self.text is not None:
            t = self.text
            text = dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_dim,
                        num_hidden_layers=t.layers, num_attention_heads=t.heads,
                        max_position_embeddings=t.max_length, hidden_act=t.activation,
                        layer_norm_eps=t.layer_norm_eps, eos_token_id=t.eos_token_id,
                        bos_token_id=bos_token_id, pad_token_id=pad_token_id,
                        projection_dim=self.projection_dim)
        if self.vision is not None:
            v = self.vision
            vision = dict(image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.width,
                          intermediate_size=v.mlp_dim, num_hidden_layers=v.layers,
                          num_attention_heads=v.heads, hidden_act=v.activation,
                          layer_norm_eps=v.layer_norm_eps, num_channels=3,
                          projection_dim=self.projection_dim)
        if text is None:
            return dict(vision, model_type="clip_vision_model",
                        architectures=["CLIPVisionModelWithProjection"])
        if vision is None:
            return dict(text, model_type="clip_text_model",
                        architectures=["CLIPTextModelWithProjection"])
        return dict(model_type="clip", architectures=["CLIPModel"], text_config=text,
                    vision_config=vision, projection_dim=self.projection_dim,
                    logit_scale_init_value=self.logit_scale_init)


def _tower_from_hf(hf: dict, defaults: dict) -> dict:
    """Our tower fields from a HF sub-config; defaults: transformers' for missing keys."""
    d = {**defaults, **{k: v for k, v in hf.items() if k in defaults}}
    return dict(width=d["hidden_size"], layers=d["num_hidden_layers"],
                heads=d["num_attention_heads"], mlp_dim=d["intermediate_size"],
                activation=d["hidden_act"], layer_norm_eps=d["layer_norm_eps"])


_HF_TOWER = dict(num_hidden_layers=12, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def _text_from_hf(hf: dict) -> CLIPTextConfig:
    eos = hf.get("eos_token_id", 49407)
    if isinstance(eos, (list, tuple)):
        if len(eos) != 1:
            raise ValueError(f"CLIP text_config.eos_token_id is a list {eos}; the pooled token "
                             "needs one id: set eos_token_id to the end-of-text id in config.json")
        eos = eos[0]
    tower = _tower_from_hf(hf, dict(_HF_TOWER, hidden_size=512, intermediate_size=2048,
                                    num_attention_heads=8))
    return CLIPTextConfig(vocab_size=hf.get("vocab_size", 49408),
                          max_length=hf.get("max_position_embeddings", 77),
                          eos_token_id=int(eos), **tower)


def _square(value: Any, field: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"CLIP vision_config.{field} {list(value)} is not square; only "
                             "square images and patches are supported")
        value = value[0]
    return int(value)


def _vision_from_hf(hf: dict) -> CLIPVisionConfig:
    if hf.get("num_channels", 3) != 3:
        raise ValueError(f"CLIP vision_config.num_channels is {hf['num_channels']}; only RGB "
                         "(3 channels) is supported")
    tower = _tower_from_hf(hf, dict(_HF_TOWER, hidden_size=768, intermediate_size=3072,
                                    num_attention_heads=12))
    return CLIPVisionConfig(image_size=_square(hf.get("image_size", 224), "image_size"),
                            patch_size=_square(hf.get("patch_size", 32), "patch_size"), **tower)


def _towers(text: tuple[int, int, int], vision: tuple[int, int, int], patch: int,
            projection_dim: int, activation: str = "quick_gelu") -> dict:
    """A named size from (width, layers, heads) per tower; the MLPs are 4x wide."""
    (tw, tl, th), (vw, vl, vh) = text, vision
    return dict(
        text=dict(width=tw, layers=tl, heads=th, mlp_dim=4 * tw, activation=activation),
        vision=dict(width=vw, layers=vl, heads=vh, mlp_dim=4 * vw, patch_size=patch,
                    activation=activation),
        projection_dim=projection_dim)


# Every named size, defined once: OpenAI's published CLIPs, LAION's open_clip ViT-H/14
# (laion/CLIP-ViT-H-14-laion2B-s32B-b79K: exact GELU), and a tiny one for tests.
SIZES: dict[str, dict] = {
    "ViT-B/32": _towers((512, 12, 8), (768, 12, 12), 32, 512),
    "ViT-B/16": _towers((512, 12, 8), (768, 12, 12), 16, 512),
    "ViT-L/14": _towers((768, 12, 12), (1024, 24, 16), 14, 768),
    "ViT-H/14": _towers((1024, 24, 16), (1280, 32, 16), 14, 1024, activation="gelu"),
    "tiny": dict(text=dict(vocab_size=128, width=32, layers=2, heads=4, mlp_dim=64, max_length=16,
                           eos_token_id=127),
                 vision=dict(image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_dim=64),
                 projection_dim=16),
}
# ViT-L/14 fine-tuned at 336 px: only the image size (and so the position table) differs.
SIZES["ViT-L/14-336"] = dict(SIZES["ViT-L/14"],
                             vision=dict(SIZES["ViT-L/14"]["vision"], image_size=336))


def get_clip_config(name: str, **overrides) -> CLIPConfig:
    """Returns the CLIPConfig of a named size (see SIZES), with optional field overrides."""
    if name not in SIZES:
        raise ValueError(f"unknown CLIP size {name!r}; choose one of {sorted(SIZES)}")
    size = SIZES[name]
    return CLIPConfig(text=CLIPTextConfig(**size["text"]),
                      vision=CLIPVisionConfig(**size["vision"]),
                      **{"projection_dim": size["projection_dim"], **overrides})


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """[B, L] ids -> [B] index of the token whose state is the pooled text feature.

    transformers' rule: the first position holding `eos_token_id`, except for configs with the
    legacy id 2, where it is the position of the largest id (the first, on ties). Like
    transformers, a row without the end-of-text token pools position 0.
    """
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


def _layer_norm(eps: float, dtype: Any, pdtype: Any, name: str) -> nn.LayerNorm:
    # use_fast_variance=False: E[(x - mean)^2] as PyTorch computes it (E[x^2] - mean^2 loses
    # digits on the large-mean residual stream).
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=pdtype, use_fast_variance=False,
                        scale_init=partitioned(nn.initializers.ones, ("norm",)),
                        bias_init=partitioned(nn.initializers.zeros, ("norm",)), name=name)


def _dense(features: int, axes: tuple, std: float, dtype: Any, pdtype: Any, name: str,
           use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=pdtype, name=name,
                    kernel_init=partitioned(nn.initializers.normal(std), axes),
                    bias_init=partitioned(nn.initializers.zeros, axes[1:]))


class _Projection(nn.Module):
    """`einsum(equation, x, kernel) + bias` with logically named kernel and bias.

    (An explicit einsum keeps the per-head kernel [D, H, K] and its names intact; flax's
    DenseGeneral re-boxes kernels through a flattened shape.)
    """

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    bias_axes: tuple[str, ...]
    equation: str
    std: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        n = len(self.bias_axes)
        kernel = self.param("kernel", partitioned(nn.initializers.normal(self.std), self.axes),
                            self.shape, self.param_dtype)
        bias = self.param("bias", partitioned(nn.initializers.zeros, self.bias_axes),
                          self.shape[-n:], self.param_dtype)
        y = jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))
        return y + bias.astype(self.dtype)


class CLIPAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections, kernels split per head."""

    width: int
    heads: int
    layers: int  # of the tower: sets the initial scale, as in CLIP
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask):  # x [B, L, D], mask [B, 1, L, L] bool or None -> [B, L, D]
        D, H = self.width, self.heads
        K = D // H
        in_std = D ** -0.5 * (2 * self.layers) ** -0.5

        def proj(name):  # [B, L, D] -> [B, L, H, K]
            return _Projection((D, H, K), ("embed", "heads", "kv"), ("heads", "kv"),
                               "bld,dhk->blhk", in_std, self.dtype, self.param_dtype,
                               name=name)(x)

        q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
        q = constrain(q, ("batch", "length", "heads", "kv"))
        out = jax.nn.dot_product_attention(q, k, v, mask=mask)  # scale 1/sqrt(K)
        return _Projection((H, K, D), ("heads", "kv", "embed"), ("embed",), "blhk,hkd->bld",
                           D ** -0.5, self.dtype, self.param_dtype, name="out_proj")(out)


class CLIPEncoderLayer(nn.Module):
    """x + attn(ln1(x)), then x + fc2(act(fc1(ln2(x)))) (pre-LN, as in CLIP)."""

    tower: CLIPTextConfig | CLIPVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):  # [B, L, D] -> [B, L, D]
        t, dt, pdt = self.tower, self.dtype, self.param_dtype
        h = _layer_norm(t.layer_norm_eps, dt, pdt, "layer_norm1")(x)
        x = x + CLIPAttention(t.width, t.heads, t.layers, dt, pdt, name="self_attn")(h, mask)
        h = _layer_norm(t.layer_norm_eps, dt, pdt, "layer_norm2")(x)
        h = _dense(t.mlp_dim, ("embed", "mlp"), (2 * t.width) ** -0.5, dt, pdt, "fc1")(h)
        h = _ACTIVATIONS[t.activation](h)
        h = _dense(t.width, ("mlp", "embed"), t.width ** -0.5 * (2 * t.layers) ** -0.5, dt, pdt,
                   "fc2")(h)
        return constrain(x + h, TOKEN_AXES)


class CLIPTextTransformer(nn.Module):
    """CLIP's text tower: token ids + padding mask -> token states and the pooled feature."""

    config: CLIPConfig

    @nn.compact
    def __call__(self, input_ids, mask):
        """Encodes a batch.

        Args:
          input_ids: [B, L] int token ids, L <= text.max_length (the tokenizer adds the start
            and end-of-text tokens).
          mask: [B, L] bool or int, 1 for real tokens: padding keys are ignored on top of the
            causal mask.

        Returns:
          (states [B, L, width] after the final LayerNorm, pooled [B, width]: the state at the
          end-of-text token, see `eos_positions`), in the compute dtype.
        """
        cfg, t = self.config, self.config.text
        dt, pdt = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)
        if input_ids.ndim != 2 or mask.shape != input_ids.shape:
            raise ValueError(f"CLIP text input must be ids [B, L] with a mask of the same shape; "
                             f"got ids {tuple(input_ids.shape)}, mask {tuple(mask.shape)}")
        B, L = input_ids.shape
        if L > t.max_length:
            raise ValueError(f"CLIP text length {L} exceeds the {t.max_length} positions of this "
                             f"model; tokenize with max_length={t.max_length}")
        tokens = self.param("token_embedding",
                            partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
                            (t.vocab_size, t.width), pdt)
        positions = self.param("position_embedding",
                               partitioned(nn.initializers.normal(0.01), (None, "embed")),
                               (t.max_length, t.width), pdt)
        x = (jnp.take(tokens, input_ids, axis=0) + positions[:L]).astype(dt)  # [B, L, D]
        x = constrain(x, TOKEN_AXES)
        causal = jnp.tril(jnp.ones((L, L), bool))
        attn_mask = causal[None, None] & mask.astype(bool)[:, None, None, :]  # [B, 1, L, L]
        for i in range(t.layers):
            x = CLIPEncoderLayer(t, dt, pdt, name=f"layers_{i}")(x, attn_mask)
        x = _layer_norm(t.layer_norm_eps, dt, pdt, "final_layer_norm")(x)
        # (take_along_axis rather than x[arange(B), eos]: it keeps B symbolic for ONNX export)
        eos = eos_positions(input_ids, t.eos_token_id)
        pooled = jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]  # [B, D]
        return x, pooled


class CLIPVisionTransformer(nn.Module):
    """CLIP's vision tower: normalised pixels -> token states and the pooled (class) feature."""

    config: CLIPConfig

    @nn.compact
    def __call__(self, pixels):
        """Encodes a batch of images.

        Args:
          pixels: [B, S, S, 3] (NHWC) at the model's image size S, normalised as
            `preprocess_images` does (CLIP mean / std).

        Returns:
          (states [B, 1 + grid^2, width] before the post-LayerNorm, pooled [B, width]: the
          class token after `post_layernorm`), in the compute dtype.
        """
        cfg, v = self.config, self.config.vision
        dt, pdt = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)
        S, P, G, D = v.image_size, v.patch_size, v.grid, v.width
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (S, S, 3):
            raise ValueError(
                f"CLIP images must be [B, {S}, {S}, 3] (NHWC, the model's image size {S}); got "
                f"{tuple(pixels.shape)}: resize and crop them with "
                f"jaxt2i.text.clip.preprocess_images(images, {S})")
        B = pixels.shape[0]
        kernel = self.param("patch_embedding",
                            partitioned(nn.initializers.normal(0.02), (None, None, None, "embed")),
                            (P, P, 3, D), pdt)
        # A stride-P convolution without bias = a matmul over non-overlapping patches (any
        # remainder beyond G * P pixels is dropped, as the convolution does).
        x = pixels[:, :G * P, :G * P].astype(dt).reshape(B, G, P, G, P, 3)
        x = jnp.einsum("bgphqc,pqcd->bghd", x, kernel.astype(dt)).reshape(B, G * G, D)
        cls = self.param("class_embedding", partitioned(nn.initializers.normal(D ** -0.5),
                                                        ("embed",)), (D,), pdt)
        positions = self.param("position_embedding",
                               partitioned(nn.initializers.normal(0.02), (None, "embed")),
                               (G * G + 1, D), pdt)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(dt), (B, 1, D)), x], axis=1)
        x = constrain(x + positions.astype(dt), TOKEN_AXES)  # [B, 1 + G^2, D]
        x = _layer_norm(v.layer_norm_eps, dt, pdt, "pre_layrnorm")(x)
        for i in range(v.layers):
            x = CLIPEncoderLayer(v, dt, pdt, name=f"layers_{i}")(x)
        pooled = _layer_norm(v.layer_norm_eps, dt, pdt, "post_layernorm")(x[:, 0])
        return x, pooled


class CLIPModel(nn.Module):
    """Both towers, their projections into the joint space, and the logit scale.

    Apply a single tower with `method`:
    `CLIPModel(cfg).apply({"params": p}, ids, mask, method="encode_text")`.
    """

    config: CLIPConfig

    def setup(self):
        cfg = self.config
        dt, pdt = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)
        if cfg.text is not None:
            self.text_model = CLIPTextTransformer(cfg)
            self.text_projection = _dense(cfg.projection_dim, ("embed", None),
                                          cfg.text.width ** -0.5, dt, pdt, None, use_bias=False)
        if cfg.vision is not None:
            self.vision_model = CLIPVisionTransformer(cfg)
            self.visual_projection = _dense(cfg.projection_dim, ("embed", None),
                                            cfg.vision.width ** -0.5, dt, pdt, None,
                                            use_bias=False)
        if cfg.text is not None and cfg.vision is not None:
            self.logit_scale = self.param(
                "logit_scale", partitioned(nn.initializers.constant(cfg.logit_scale_init), ()),
                (), pdt)

    def _need(self, tower: str) -> None:
        if getattr(self.config, tower) is None:
            other = "vision" if tower == "text" else "text"
            raise ValueError(f"this CLIP has no {tower} tower (config.{tower} is None: loaded "
                             f"from a {other}-only checkpoint); load a full CLIPModel directory")

    def encode_text(self, input_ids, mask):
        """[B, L] ids, [B, L] mask -> (states [B, L, Dt], pooled [B, Dt], embeds [B, P]).

        `embeds` is the projected, unnormalised text embedding (HF's `text_embeds` before the
        L2 normalisation of `CLIPModel.forward`; `get_text_features`)."""
        self._need("text")
        states, pooled = self.text_model(input_ids, mask)
        return states, pooled, self.text_projection(pooled)

    def encode_image(self, pixels):
        """[B, S, S, 3] normalised pixels -> (pooled [B, Dv], embeds [B, P], unnormalised)."""
        self._need("vision")
        _, pooled = self.vision_model(pixels)
        return pooled, self.visual_projection(pooled)

    def __call__(self, input_ids, mask, pixels):
        """Image-text similarities, as transformers' CLIPModel returns them.

        Returns:
          dict with logits_per_image [Bi, Bt], logits_per_text [Bt, Bi] (cosine similarity
          times exp(logit_scale)), and the L2-normalised text_embeds [Bt, P] / image_embeds
          [Bi, P], all float32.
        """
        self._need("text")
        self._need("vision")
        _, _, text = self.encode_text(input_ids, mask)
        _, image = self.encode_image(pixels)
        text = text.astype(jnp.float32)
        image = image.astype(jnp.float32)
        text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
        image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
        logits_per_text = text @ image.T * jnp.exp(self.logit_scale.astype(jnp.float32))
        return dict(logits_per_image=logits_per_text.T, logits_per_text=logits_per_text,
                    text_embeds=text, image_embeds=image)


def init_inputs(config: CLIPConfig, batch: int = 1) -> dict:
    """Dummy inputs that touch every parameter of `config` (for init / eval_shape)."""
    inputs = {}
    if config.text is not None:
        L = config.text.max_length
        inputs.update(input_ids=jnp.zeros((batch, L), jnp.int32), mask=jnp.ones((batch, L), bool))
    if config.vision is not None:
        S = config.vision.image_size
        inputs["pixels"] = jnp.zeros((batch, S, S, 3), jnp.float32)
    return inputs


def init_clip(config: CLIPConfig, rng: jax.Array) -> Any:
    """Randomly initialised params of `config` (boxed with their logical axis names)."""
    model, x = CLIPModel(config), init_inputs(config)

    def run(m):  # touches every tower the config has
        if config.text is not None:
            m.encode_text(x["input_ids"], x["mask"])
        if config.vision is not None:
            m.encode_image(x["pixels"])
        if config.text is not None and config.vision is not None:
            return m.logit_scale
        return None

    return model.init(rng, method=run)["params"]


def count_params(config: CLIPConfig) -> int:
    """Number of parameters of `config`, by `jax.eval_shape` (allocates nothing)."""
    shapes = jax.eval_shape(lambda: init_clip(config, jax.random.key(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.unbox(shapes)))


def preprocess_images(images: jax.Array, image_size: int, mean=IMAGE_MEAN,
                      std=IMAGE_STD) -> jax.Array:
    """CLIP's image preprocessing in jnp (jit-friendly): what the vision tower expects.

    As transformers' CLIPImageProcessor: the shorter side is resized to `image_size` (bicubic,
    antialiased when shrinking; the longer side to int(image_size * long / short)), the centre
    `image_size` square is cropped, and each channel is normalised with CLIP's mean / std.
    PIL's bicubic filter differs slightly from `jax.image.resize`'s: resized images differ
    from transformers' by about 0.005 on average (at most ~0.1) in normalised units, whose
    range is about 4; without a resize they are equal.

    Args:
      images: [B, H, W, 3] RGB, uint8 in [0, 255] or float in [0, 1] (map [-1, 1] diffusion
        samples with (x + 1) / 2 first).
      image_size: the model's input size (config.vision.image_size).

    Returns:
      [B, image_size, image_size, 3] float32.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3] RGB (NHWC), got {tuple(images.shape)}")
    x = images.astype(jnp.float32)
    if jnp.issubdtype(images.dtype, jnp.integer):
        x = x / 255.0
    B, H, W, _ = x.shape
    S = int(image_size)
    if min(H, W) != S:
        short, long = (H, W) if H <= W else (W, H)
        new_long = int(S * long / short)
        h, w = (S, new_long) if H <= W else (new_long, S)
        x = jnp.clip(jax.image.resize(x, (B, h, w, 3), method="bicubic", antialias=True), 0, 1)
        H, W = h, w
    top, left = (H - S) // 2, (W - S) // 2
    x = x[:, top:top + S, left:left + S]
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
