"""DeepFloyd IF U-Nets (stage I: text -> 64 px; stage II: 64 -> 256 px) in Flax linen.

IF's U-Nets are the subset of diffusers' ``UNet2DConditionModel`` built from
ResnetDownsample / SimpleCrossAttn down blocks, a SimpleCrossAttn mid block and
SimpleCrossAttn / ResnetUpsample up blocks. ``IFUNet`` implements exactly that subset,
with diffusers' numerics (its masks, norms and scale factors), so that published weights load
by name (``jaxt2i.models.if_convert``) and give the same outputs:

  conv_in ─► down_blocks_0 ─► ... ─► down_blocks_{n-1} ─► mid_block
                 │ every resnet / attention output and downsampler output is a skip
  conv_out ◄─ up_blocks_{n-1} ◄─ ... ◄─ up_blocks_0 ◄──┘  (each up resnet takes a skip)

The conditioning vector is time embedding (+ the stage-II noise-augmentation level through
``class_embedding``) + attention-pooled text (``add_embedding``). Attention layers are
"added-KV": pixels attend to the projected text tokens concatenated with their own keys and
values (or to the text alone with ``only_cross_attention``). Parameter paths mirror diffusers'
state-dict names (``down_blocks_1/attentions_0/to_q/kernel`` is
``down_blocks.1.attentions.0.to_q.weight``), each resnet and attention is its own module (so
``remat`` wraps exactly one of them) and every kernel carries logical axis names, so the
sharding rules of ``jaxt2i.parallel`` apply unchanged.

Named sizes live in ``SIZES`` (``get_if_unet_config(name, **overrides)``); a diffusers
``unet/config.json`` is parsed by ``IFUNetConfig.from_diffusers``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxt2i.models import layers

Array = jax.Array

DOWN_BLOCKS = ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D")
UP_BLOCKS = ("ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DSimpleCrossAttn",)
ACTIVATIONS = ("gelu", "silu", "swish")
DTYPES = ("float32", "bfloat16")
# diffusers turns a 0/1 mask into this additive bias (not -inf), so an all-padding row still
# attends (uniformly); the same constant keeps outputs identical.
MASK_BIAS = -10000.0
# diffusers' cross-attention GroupNorm always has 32 groups (not norm_num_groups).
CROSS_NORM_GROUPS = 32


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"IFUNetConfig.{field} must be {allowed}, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class IFUNetConfig:
    """Architecture of one IF U-Net; field names and meanings are diffusers' own.

    The defaults are IF-I-XL's. Per-level fields (``layers_per_block``,
    ``only_cross_attention``) accept one value for every level.

    Attributes:
      sample_size: training resolution (64 for stage I, 256 for stage II); informational
        (the model runs at any size divisible by ``size_factor``).
      in_channels: 3 for stage I; 6 for stage II (x_t concatenated with the upscaled image).
      out_channels: 6: eps and the learned-range variance interpolation (3 + 3).
      block_out_channels: width of each level.
      layers_per_block: resnets per down level (up levels run one more).
      down_block_types / up_block_types: one of DOWN_BLOCKS / UP_BLOCKS per level; the
        up list runs from the deepest level to level 0.
      mid_block_type: 'UNetMidBlock2DSimpleCrossAttn'.
      attention_head_dim: channels per attention head (heads = width // head_dim).
      cross_attention_dim: width of the text tokens the attention layers read.
      encoder_hid_dim: width of the text encoder's output (4096 for T5-XXL), projected to
        cross_attention_dim by ``encoder_hid_proj``; None: the text is already that wide.
      addition_embed_type: 'text' adds attention-pooled text to the time embedding; or None.
      addition_embed_type_num_heads: heads of that attention pooling.
      act_fn: 'gelu' (exact, as torch's nn.GELU) or 'silu' / 'swish'.
      resnet_time_scale_shift: 'scale_shift' (GroupNorm then y * (1 + s) + t) or 'default'
        (the embedding is added before the norm).
      cross_attention_norm: 'group_norm' (32 groups over the text tokens) or None.
      class_embed_type: None or 'timestep' (stage II: the noise-augmentation level, embedded
        like a timestep, is added to the time embedding).
      only_cross_attention: per level, attention to the text only (no pixel keys/values).
      mid_block_only_cross_attention: the same for the mid block; None = True only when every
        level is cross-only (``from_diffusers`` resolves diffusers' own rule explicitly).
      resnet_skip_time_act: feed the embedding to each resnet without the activation.
      resnet_out_scale_factor: resnet outputs are (x + h) / this (stage II: 1 / 0.7071).
      mid_block_scale_factor: the same for the mid block's resnets.
      upcast_attention: accepted for config compatibility; IF's attention blocks always
        take the softmax in float32 (diffusers ignores this flag for them too).
      norm_num_groups / norm_eps: GroupNorm of resnets, attention inputs and the output.
      flip_sin_to_cos / freq_shift: layout of the sinusoidal timestep features.
      time_embedding_dim: width of the conditioning vector; None = 4 * block_out_channels[0].
      time_embedding_act_fn: activation applied to the summed embedding, or None.
      conv_in_kernel / conv_out_kernel: odd kernel sizes of the first and last convs.
      dtype: compute dtype, 'float32' or 'bfloat16' (parameters stay float32).
      remat: rematerialise every resnet and attention block in the backward pass.
      remat_policy: what the backward pass keeps of them (``layers.REMAT_POLICIES``; only
        when ``remat`` is on).
    """
    sample_size: int | None = 64
    in_channels: int = 3
    out_channels: int = 6
    block_out_channels: tuple[int, ...] = (704, 1408, 2112, 2816)
    layers_per_block: tuple[int, ...] = (3, 3, 3, 3)
    down_block_types: tuple[str, ...] = (
        "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D",
        "SimpleCrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = (
        "SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
        "ResnetUpsampleBlock2D")
    mid_block_type: str = "UNetMidBlock2DSimpleCrossAttn"
    attention_head_dim: int = 64
    cross_attention_dim: int = 2816
    encoder_hid_dim: int | None = 4096
    addition_embed_type: str | None = "text"
    addition_embed_type_num_heads: int = 64
    act_fn: str = "gelu"
    resnet_time_scale_shift: str = "scale_shift"
    cross_attention_norm: str | None = "group_norm"
    class_embed_type: str | None = None
    only_cross_attention: tuple[bool, ...] = (False, False, False, False)
    mid_block_only_cross_attention: bool | None = None
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    mid_block_scale_factor: float = 1.0
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    dtype: str = "float32"
    remat: bool = False
    remat_policy: str = "full"

    def __post_init__(self):
        levels = len(self.block_out_channels)
        for name, scalar in (("layers_per_block", int), ("only_cross_attention", bool)):
            value = getattr(self, name)
            value = (value,) * levels if isinstance(value, scalar) else tuple(value)
            object.__setattr__(self, name, value)
        for name in ("block_out_channels", "down_block_types", "up_block_types"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.mid_block_only_cross_attention is None:  # resolved once, so it round-trips
            object.__setattr__(self, "mid_block_only_cross_attention",
                               all(self.only_cross_attention))
        self._validate()

    def _validate(self) -> None:
        levels = len(self.block_out_channels)
        if levels < 1 or any(not _is_int(c) or c < 1 for c in self.block_out_channels):
            _fail("block_out_channels", self.block_out_channels, "positive ints")
        for name in ("in_channels", "out_channels", "attention_head_dim", "cross_attention_dim",
                     "addition_embed_type_num_heads", "norm_num_groups", "conv_in_kernel",
                     "conv_out_kernel"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                _fail(name, getattr(self, name), "a positive int")
        for name in ("layers_per_block", "only_cross_attention", "down_block_types",
                     "up_block_types"):
            if len(getattr(self, name)) != levels:
                _fail(name, getattr(self, name), f"one entry per level ({levels} levels)")
        if any(not _is_int(n) or n < 1 for n in self.layers_per_block):
            _fail("layers_per_block", self.layers_per_block, "positive ints")
        for name, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
            for kind in getattr(self, name):
                if kind not in allowed:
                    _fail(name, kind, f"one of {allowed}")
        choices = (("mid_block_type", MID_BLOCKS), ("act_fn", ACTIVATIONS),
                   ("resnet_time_scale_shift", ("scale_shift", "default")),
                   ("cross_attention_norm", (None, "group_norm")),
                   ("class_embed_type", (None, "timestep")),
                   ("addition_embed_type", (None, "text")),
                   ("time_embedding_act_fn", (None,) + ACTIVATIONS), ("dtype", DTYPES),
                   ("remat_policy", layers.REMAT_POLICY_NAMES))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                _fail(name, getattr(self, name), f"one of {allowed}")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            _fail("norm_num_groups", self.norm_num_groups,
                  f"a divisor of every block_out_channels {self.block_out_channels}")
        if self.cross_attention_norm and self.cross_attention_dim % CROSS_NORM_GROUPS:
            _fail("cross_attention_dim", self.cross_attention_dim,
                  f"divisible by {CROSS_NORM_GROUPS} (the groups of the 'group_norm' text norm)")
        if any(c < self.attention_head_dim for c in self.block_out_channels):
            _fail("attention_head_dim", self.attention_head_dim,
                  "at most the smallest width (heads = width // head_dim)")
        if self.addition_embed_type and self.text_dim % self.addition_embed_type_num_heads:
            _fail("addition_embed_type_num_heads", self.addition_embed_type_num_heads,
                  f"a divisor of the pooled text width {self.text_dim}")
        for name in ("conv_in_kernel", "conv_out_kernel"):
            if getattr(self, name) % 2 == 0:
                _fail(name, getattr(self, name), "an odd kernel size")
        if self.resnet_out_scale_factor == 0 or self.mid_block_scale_factor == 0:
            _fail("resnet_out_scale_factor/mid_block_scale_factor",
                  (self.resnet_out_scale_factor, self.mid_block_scale_factor), "non-zero")

    @property
    def size_factor(self) -> int:
        """Image height and width must be multiples of this (one halving per level)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def text_dim(self) -> int:
        """Width of the text embeddings the model takes."""
        return self.encoder_hid_dim or self.cross_attention_dim

    @property
    def time_embed_dim(self) -> int:
        """Width of the conditioning vector."""
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def compute_dtype(self) -> Any:
        """The jnp dtype of activations."""
        return jnp.dtype(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of every field (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "IFUNetConfig":
        """Builds a config from ``to_dict()`` output; unknown fields are refused."""
        _check_fields(d)
        return cls(**dict(d))

    @classmethod
    def from_diffusers(cls, d: Mapping[str, Any], **overrides: Any) -> "IFUNetConfig":
        """Parses a diffusers ``UNet2DConditionModel`` config.json (see ``if_convert``)."""
        from jaxt2i.models.if_convert import config_from_diffusers
        return config_from_diffusers(d, **overrides)

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers ``UNet2DConditionModel`` config.json describing this network."""
        from jaxt2i.models.if_convert import config_to_diffusers
        return config_to_diffusers(self)


def _check_fields(d: Mapping[str, Any]) -> None:
    allowed = [f.name for f in dataclasses.fields(IFUNetConfig)]
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise ValueError(f'unknown IFUNetConfig field(s) {unknown}; allowed: {", ".join(allowed)}')


def _act(name: str | None):
    if name == "gelu":  # torch's nn.GELU() is the exact erf form
        return functools.partial(jax.nn.gelu, approximate=False)
    return nn.silu


def timestep_features(t: Array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> Array:
    """diffusers' sinusoidal timestep features: [B] -> [B, dim] float32.

    Frequencies are exp(-ln(10000) * i / (dim / 2 - freq_shift)); the halves are
    [cos, sin] when ``flip_sin_to_cos`` (IF), else [sin, cos]; an odd dim is zero-padded.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]  # [B, half]
    parts = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
    out = jnp.concatenate(parts, axis=-1)
    return jnp.pad(out, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nn.Module):
    """linear_1 -> act -> linear_2 on timestep features ([B, C0] -> [B, E])."""
    cfg: IFUNetConfig

    @nn.compact
    def __call__(self, feats: Array) -> Array:
        cfg, e = self.cfg, self.cfg.time_embed_dim
        h = _act(cfg.act_fn)(layers.dense(cfg, e, ("embed", "mlp"), name="linear_1")(feats))
        return layers.dense(cfg, e, ("mlp", "embed"), name="linear_2")(h)


class AttentionPooling(nn.Module):
    """IF's text pooling: a query made of the mean token (+ a learned offset) attends to the
    tokens and itself. Like diffusers, every token (padding included) is pooled.

    [B, L, D] -> [B, D] (no output projection).
    """
    cfg: IFUNetConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, _, width = x.shape
        heads = self.cfg.addition_embed_type_num_heads
        hd = width // heads
        pos = self.param("positional_embedding", layers.partitioned(
            nn.initializers.normal(width ** -0.5), (None, "text_embed")), (1, width), jnp.float32)
        query = jnp.mean(x, axis=1, keepdims=True) + pos.astype(x.dtype)  # [B, 1, D]
        x = jnp.concatenate([query, x], axis=1)  # [B, 1+L, D]

        def proj(name, y):  # [B, T, D] -> [B, T, heads, hd]
            y = layers.dense(self.cfg, width, ("text_embed", "mlp"), name=name)(y)
            return y.reshape(b, -1, heads, hd)

        scale = hd ** -0.25  # on q and k separately, as IF does (fp16-friendly)
        q, k, v = proj("q_proj", query) * scale, proj("k_proj", x) * scale, proj("v_proj", x)
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32), axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", w.astype(v.dtype), v)  # [B, 1, heads, hd]
        return out.reshape(b, width)


class TextTimeEmbedding(nn.Module):
    """LayerNorm -> attention pooling -> dense -> LayerNorm: [B, L, D] -> [B, E]."""
    cfg: IFUNetConfig

    @nn.compact
    def __call__(self, text: Array) -> Array:
        cfg = self.cfg
        h = layers.layer_norm(cfg, name="norm1")(text)
        h = AttentionPooling(cfg, name="pool")(h)
        h = layers.dense(cfg, cfg.time_embed_dim, ("text_embed", "embed"), name="proj")(h)
        return layers.layer_norm(cfg, name="norm2")(h)


class HeadProjection(nn.Module):
    """Dense [..., C] -> [..., heads, head_dim] with a per-head kernel and bias."""
    cfg: IFUNetConfig
    heads: int
    head_dim: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dt = self.cfg.compute_dtype
        kernel = self.param("kernel", layers.partitioned(
            nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)), ("embed", "heads", "kv")),
            (x.shape[-1], self.heads, self.head_dim), jnp.float32)
        bias = self.param("bias", layers.partitioned(nn.initializers.zeros_init(), ("heads", "kv")),
                          (self.heads, self.head_dim), jnp.float32)
        return jnp.einsum("...c,chd->...hd", x.astype(dt), kernel.astype(dt)) + bias.astype(dt)


class HeadOutput(nn.Module):
    """Dense [..., heads, head_dim] -> [..., features] (attention output projection)."""
    cfg: IFUNetConfig
    features: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dt = self.cfg.compute_dtype
        kernel = self.param("kernel", layers.partitioned(
            nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2), ("heads", "kv", "embed")),
            (*x.shape[-2:], self.features), jnp.float32)
        bias = self.param("bias", layers.partitioned(nn.initializers.zeros_init(), ("embed",)),
                          (self.features,), jnp.float32)
        return jnp.einsum("...hd,hdc->...c", x, kernel.astype(dt)) + bias.astype(dt)


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D: GN-act-(resample)-conv, embedding, GN-act-conv, skip.

    Attributes:
      cfg: the model config.
      features: output channels (a 1x1 ``conv_shortcut`` matches the skip when they differ).
      out_scale: the output is (skip + h) / out_scale.
      resample: 'none', 'up' (nearest 2x) or 'down' (2x2 average pool), applied to both
        paths after the first activation.
    """
    cfg: IFUNetConfig
    features: int
    out_scale: float = 1.0
    resample: str = "none"

    @nn.compact
    def __call__(self, x: Array, emb: Array) -> Array:
        """[B, H, W, C], emb [B, E] -> [B, H', W', features]."""
        cfg, f = self.cfg, self.features
        act = _act(cfg.act_fn)
        norm = functools.partial(layers.GroupNorm, cfg, cfg.norm_eps, cfg.norm_num_groups)
        h = act(norm(name="norm1")(x))
        if self.resample == "up":
            x, h = (jnp.repeat(jnp.repeat(a, 2, axis=1), 2, axis=2) for a in (x, h))
        elif self.resample == "down":
            x, h = (_avg_pool2(a) for a in (x, h))
        h = layers.conv(cfg, f, name="conv1")(h)
        scale_shift = cfg.resnet_time_scale_shift == "scale_shift"
        t = emb if cfg.resnet_skip_time_act else act(emb)
        t = layers.dense(cfg, f * (2 if scale_shift else 1), name="time_emb_proj")(t)  # [B, F|2F]
        if scale_shift:
            h = norm(name="norm2")(h, tuple(jnp.split(t, 2, axis=-1)))
        else:
            h = norm(name="norm2")(h + t[:, None, None, :])
        h = layers.conv(cfg, f, name="conv2")(act(h))
        if x.shape[-1] != f:
            x = layers.conv(cfg, f, kernel=1, name="conv_shortcut")(x)
        return layers.constrain((x + h) / self.out_scale, layers.FMAP_AXES)


def _avg_pool2(x: Array) -> Array:
    b, h, w, c = x.shape
    return jnp.mean(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


class AddedKVAttention(nn.Module):
    """diffusers' Attention with AttnAddedKVProcessor: pixels attend to text (+ themselves).

    Attributes:
      cfg: the model config.
      only_cross: attend to the text tokens only (no to_k / to_v over the pixels).
    """
    cfg: IFUNetConfig
    only_cross: bool

    @nn.compact
    def __call__(self, x: Array, text: Array, text_bias: Array | None) -> Array:
        """x [B, H, W, C]; text [B, L, cross_attention_dim]; text_bias [B, L] additive or None.

        Returns:
          [B, H, W, C], the input plus the attention output.
        """
        cfg = self.cfg
        b, hh, ww, c = x.shape
        hd = cfg.attention_head_dim
        heads = c // hd
        proj = functools.partial(HeadProjection, cfg, heads, hd)
        h = layers.GroupNorm(cfg, 1e-5, cfg.norm_num_groups, name="group_norm")(x)
        h = layers.constrain(h.reshape(b, hh * ww, c), layers.TOKEN_AXES)  # [B, N, C]
        if cfg.cross_attention_norm == "group_norm":  # statistics over tokens x group channels
            text = layers.GroupNorm(cfg, 1e-5, CROSS_NORM_GROUPS, centered=True,
                                    name="norm_cross")(
                text[:, :, None, :])[:, :, 0, :]
        q = proj(name="to_q")(h)  # [B, N, heads, hd]
        k, v = proj(name="add_k_proj")(text), proj(name="add_v_proj")(text)  # [B, L, heads, hd]
        bias = text_bias
        if not self.only_cross:  # keys/values: [text tokens, pixels]
            k = jnp.concatenate([k, proj(name="to_k")(h)], axis=1)
            v = jnp.concatenate([v, proj(name="to_v")(h)], axis=1)
            if bias is not None:
                bias = jnp.concatenate([bias, jnp.zeros((b, hh * ww), bias.dtype)], axis=1)
        if bias is not None:
            bias = bias[:, None, None, :].astype(q.dtype)  # [B, 1, 1, S]
        out = jax.nn.dot_product_attention(layers.constrain(q, layers.HEAD_AXES), k, v, bias=bias)
        out = HeadOutput(cfg, c, name="to_out_0")(out).reshape(b, hh, ww, c)
        return layers.constrain(x + out, layers.FMAP_AXES)


def _blocks(cfg: IFUNetConfig):
    """The resnet and attention module classes, rematerialised if the config says so."""
    return layers.remat(ResnetBlock, cfg), layers.remat(AddedKVAttention, cfg)


class DownBlock(nn.Module):
    """One down level: resnets (+ attention), then a downsampling resnet unless deepest."""
    cfg: IFUNetConfig
    level: int

    @nn.compact
    def __call__(self, h, emb, text, bias) -> tuple[Array, list[Array]]:
        """Returns the block's output and its skips (one per resnet, one for the downsampler)."""
        cfg, i = self.cfg, self.level
        res, attn = _blocks(cfg)
        f, scale = cfg.block_out_channels[i], cfg.resnet_out_scale_factor
        skips = []
        for j in range(cfg.layers_per_block[i]):
            h = res(cfg, f, scale, name=f"resnets_{j}")(h, emb)
            if cfg.down_block_types[i] == "SimpleCrossAttnDownBlock2D":
                h = attn(cfg, cfg.only_cross_attention[i], name=f"attentions_{j}")(h, text, bias)
            skips.append(h)
        if i < len(cfg.block_out_channels) - 1:
            h = res(cfg, f, scale, "down", name="downsamplers_0")(h, emb)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the deepest level."""
    cfg: IFUNetConfig

    @nn.compact
    def __call__(self, h, emb, text, bias) -> Array:
        cfg = self.cfg
        res, attn = _blocks(cfg)
        f, scale = cfg.block_out_channels[-1], cfg.mid_block_scale_factor
        h = res(cfg, f, scale, name="resnets_0")(h, emb)
        h = attn(cfg, cfg.mid_block_only_cross_attention, name="attentions_0")(h, text, bias)
        return res(cfg, f, scale, name="resnets_1")(h, emb)


class UpBlock(nn.Module):
    """One up level (``index`` 0 is the deepest): each resnet first concatenates one skip."""
    cfg: IFUNetConfig
    index: int

    @nn.compact
    def __call__(self, h, skips, emb, text, bias) -> Array:
        """skips: this level's skips in the order they were made (the last is used first)."""
        cfg = self.cfg
        level = len(cfg.block_out_channels) - 1 - self.index
        res, attn = _blocks(cfg)
        f, scale = cfg.block_out_channels[level], cfg.resnet_out_scale_factor
        only_cross = cfg.only_cross_attention[level]
        for j, skip in enumerate(reversed(skips)):
            h = res(cfg, f, scale, name=f"resnets_{j}")(jnp.concatenate([h, skip], axis=-1), emb)
            if cfg.up_block_types[self.index] == "SimpleCrossAttnUpBlock2D":
                h = attn(cfg, only_cross, name=f"attentions_{j}")(h, text, bias)
        if level > 0:
            h = res(cfg, f, scale, "up", name="upsamplers_0")(h, emb)
        return h


class IFUNet(nn.Module):
    """A DeepFloyd IF U-Net (stage I or II).

    Attributes:
      config: an IFUNetConfig.
    """
    config: IFUNetConfig

    @nn.compact
    def __call__(self, x: Array, t: Array, text: Array, text_mask: Array | None = None,
                 aug_level: Array | None = None) -> Array:
        """Predicts IF's output (eps and the variance interpolation for published stages).

        Args:
          x: [B, H, W, in_channels] NHWC; stage II passes x_t concatenated with the upscaled
            low-res image (diffusers' layout, channels [x_t, lowres]).
          t: [B] (or scalar) diffusion timesteps, diffusers' convention (0..999, int or float).
          text: [B, L, text_dim] text-encoder output (T5-XXL: 4096 wide).
          text_mask: [B, L] 1 for real tokens (diffusers' ``encoder_attention_mask``): padded
            tokens get a -10000 attention bias. The text pooling and the text GroupNorm see
            every token, as in diffusers. None = no mask (what IF's diffusers pipelines pass).
          aug_level: [B] (or scalar) noise-augmentation timestep for models with a
            ``class_embed_type`` (stage II; diffusers' ``class_labels``, e.g. 250).

        Returns:
          [B, H, W, out_channels] float32.
        """
        cfg = self.config
        dt = cfg.compute_dtype
        b, height, width, _ = x.shape
        if height % cfg.size_factor or width % cfg.size_factor:
            raise ValueError(f"image size {height}x{width} must be divisible by "
                             f"{cfg.size_factor} for this IF U-Net (one halving per level)")
        if text.shape[-1] != cfg.text_dim:
            raise ValueError(f"text embeddings are {text.shape[-1]} wide; this IF U-Net takes "
                             f"{cfg.text_dim} (encoder_hid_dim or cross_attention_dim)")
        c0 = cfg.block_out_channels[0]

        def features(v):  # [B] timestep-like values -> [B, C0] sinusoids in the compute dtype
            v = jnp.broadcast_to(jnp.asarray(v, jnp.float32), (b,))
            return timestep_features(v, c0, cfg.flip_sin_to_cos, cfg.freq_shift).astype(dt)

        emb = TimestepEmbedding(cfg, name="time_embedding")(features(t))  # [B, E]
        if cfg.class_embed_type == "timestep":
            if aug_level is None:
                raise ValueError("this IF U-Net embeds a noise-augmentation level "
                                 "(class_embed_type='timestep'): pass aug_level, e.g. 250")
            emb = emb + TimestepEmbedding(cfg, name="class_embedding")(features(aug_level))
        elif aug_level is not None:
            raise ValueError("aug_level given to an IF U-Net without class_embed_type")
        text = layers.constrain(text.astype(dt), layers.TOKEN_AXES)
        if cfg.addition_embed_type == "text":  # pooled from the unprojected text
            emb = emb + TextTimeEmbedding(cfg, name="add_embedding")(text)
        if cfg.time_embedding_act_fn:
            emb = _act(cfg.time_embedding_act_fn)(emb)
        emb = layers.constrain(emb, ("batch", "embed"))
        if cfg.encoder_hid_dim:
            text = layers.dense(cfg, cfg.cross_attention_dim, ("text_embed", "embed"),
                                name="encoder_hid_proj")(text)  # [B, L, cross_attention_dim]
        bias = None
        if text_mask is not None:
            bias = jnp.where(jnp.asarray(text_mask).astype(bool), 0.0, MASK_BIAS)  # [B, L]

        h = layers.conv(cfg, c0, cfg.conv_in_kernel, name="conv_in")(x.astype(dt))
        skips = [h]
        for i in range(len(cfg.block_out_channels)):
            h, level_skips = DownBlock(cfg, i, name=f"down_blocks_{i}")(h, emb, text, bias)
            skips += level_skips
        h = MidBlock(cfg, name="mid_block")(h, emb, text, bias)
        for i in range(len(cfg.block_out_channels)):
            n = cfg.layers_per_block[len(cfg.block_out_channels) - 1 - i] + 1
            h = UpBlock(cfg, i, name=f"up_blocks_{i}")(h, tuple(skips[-n:]), emb, text, bias)
            skips = skips[:-n]

        h = _act(cfg.act_fn)(layers.GroupNorm(cfg, cfg.norm_eps, cfg.norm_num_groups,
                                              name="conv_norm_out")(h))
        out = layers.conv(cfg, cfg.out_channels, cfg.conv_out_kernel, name="conv_out")(h)
        return out.astype(jnp.float32)


def example_inputs(config: IFUNetConfig, batch_size: int = 1, text_len: int = 8,
                   image_size: int | None = None) -> dict[str, Array]:
    """Zero inputs of the right shapes for ``IFUNet(config).init`` (or ``jax.eval_shape``)."""
    size = image_size or config.sample_size or 8 * config.size_factor
    inputs = {
        "x": jnp.zeros((batch_size, size, size, config.in_channels), jnp.float32),
        "t": jnp.zeros((batch_size,), jnp.float32),
        "text": jnp.zeros((batch_size, text_len, config.text_dim), jnp.float32),
        "text_mask": jnp.ones((batch_size, text_len), bool),
    }
    if config.class_embed_type:
        inputs["aug_level"] = jnp.zeros((batch_size,), jnp.float32)
    return inputs


@functools.lru_cache(maxsize=16)
def param_shapes(config: IFUNetConfig) -> Any:
    """Abstract (shape-only, logically partitioned) variables of ``IFUNet(config)``."""
    # The smallest valid image: parameter shapes do not depend on it.
    inputs = example_inputs(config, text_len=2, image_size=config.size_factor)
    return jax.eval_shape(lambda: IFUNet(config).init(jax.random.PRNGKey(0), **inputs))


def count_params(config: IFUNetConfig) -> int:
    """Number of parameters of ``IFUNet(config)``, by ``jax.eval_shape`` (no memory spent)."""
    params = nn.unbox(param_shapes(config))["params"]
    return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(params))


# Every named size, defined once. Sources: IF-I-XL and IF-II-L are the published diffusers
# unet/config.json files of DeepFloyd/IF-I-XL-v1.0 and DeepFloyd/IF-II-L-v1.0, as copied into
# fine-tuned repositories on the Hub (IF-I-XL also matches its original config.yml:
# model_channels 704, channel_mult 1,2,3,4, encoder_channels 2816); the IF-II-L fields that
# copy did not show (sample_size, up_block_types, time_embedding_*) follow diffusers'
# scripts/convert_if.py. The M and L configs were not available here: they are reconstructed,
# unverified, as the same architectures with the width scaled to the published parameter
# counts (cross_attention_dim and time_embedding_dim follow the widest level, as in XL and
# II-L). `load_if_unet` reads each checkpoint's own config.json, so these tables never
# decide how weights load.
_IF_I = IFUNetConfig()
_IF_II = dataclasses.replace(
    _IF_I, sample_size=256, in_channels=6, block_out_channels=(160, 320, 640, 960, 1280),
    layers_per_block=(2, 2, 3, 5, 5), only_cross_attention=False,
    down_block_types=(DOWN_BLOCKS[0],) * 3 + (DOWN_BLOCKS[1],) * 2,
    up_block_types=(UP_BLOCKS[1],) * 2 + (UP_BLOCKS[0],) * 3,
    cross_attention_dim=1280, class_embed_type="timestep", resnet_skip_time_act=True,
    resnet_out_scale_factor=1 / 0.7071, mid_block_scale_factor=1 / 0.7071,  # IF's 1/0.7071
    time_embedding_act_fn="gelu", time_embedding_dim=1280)
_TINY = dict(block_out_channels=(32, 64, 64), norm_num_groups=8, attention_head_dim=8,
             cross_attention_dim=32, encoder_hid_dim=48, addition_embed_type_num_heads=2,
             sample_size=16)
SIZES: dict[str, IFUNetConfig] = {
    "IF-I-M": dataclasses.replace(_IF_I, block_out_channels=(192, 384, 576, 768),
                                  cross_attention_dim=768),
    "IF-I-L": dataclasses.replace(_IF_I, block_out_channels=(320, 640, 960, 1280),
                                  cross_attention_dim=1280),
    "IF-I-XL": _IF_I,
    "IF-II-M": dataclasses.replace(_IF_II, block_out_channels=(96, 192, 384, 576, 768),
                                   cross_attention_dim=768, time_embedding_dim=768),
    "IF-II-L": _IF_II,
    # Tests: every IF feature at ~1M parameters; per-level layers; self+cross attention.
    "tiny": dataclasses.replace(_IF_I, **_TINY, layers_per_block=(1, 2, 1),
                                down_block_types=(DOWN_BLOCKS[0],) + (DOWN_BLOCKS[1],) * 2,
                                up_block_types=(UP_BLOCKS[1],) * 2 + (UP_BLOCKS[0],),
                                only_cross_attention=False),
    # Stage-II-like: aug level, skip_time_act, scale factors, cross-only attention at the
    # deepest level and in the mid block, self+cross above it.
    "tiny-ii": dataclasses.replace(
        _IF_II, **_TINY, layers_per_block=(1, 1, 2),
        down_block_types=(DOWN_BLOCKS[0],) + (DOWN_BLOCKS[1],) * 2,
        up_block_types=(UP_BLOCKS[1],) * 2 + (UP_BLOCKS[0],),
        only_cross_attention=(False, False, True), mid_block_only_cross_attention=True,
        time_embedding_dim=64),
}


def get_if_unet_config(name: str, **overrides: Any) -> IFUNetConfig:
    """Returns the named IF U-Net size with optional field overrides (e.g. dtype, remat).

    Raises:
      ValueError: for an unknown size or field (the message lists the allowed ones).
    """
    if name not in SIZES:
        raise ValueError(f'unknown IF U-Net size {name!r}; choose one of: {", ".join(SIZES)}')
    _check_fields(overrides)
    return dataclasses.replace(SIZES[name], **overrides)
