"""Efficient U-Net for Imagen's base (text-to-64 px) and super-resolution stages.

One linen module, ``UNet``, configured by one frozen dataclass, ``UNetConfig``. The layout
follows the Efficient U-Net of the Imagen paper (arXiv 2205.11487, appendix B.1):

  stem conv ─► DBlock_0 ─► DBlock_1 ─► ... ─► DBlock_{n-1}
                  │skip        │skip                │ (deepest level, no skip)
  head conv ◄─ UBlock_0 ◄── UBlock_1 ◄── ... ◄── UBlock_{n-1}

A DBlock downsamples first (2x2 stride-2 conv; level 0 too when ``stem_downsample``) and
then runs its residual blocks; a UBlock takes its level's skip (concatenated or added,
scaled by 1/sqrt(2)), runs its residual blocks and then upsamples (2x2 transposed conv).
Every residual block may be followed by attention layers ('self', 'cross' or 'concat').
Residual blocks are conditioned by scale-and-shift from one embedding: noise level +
attention-pooled text (+ augmentation level for SR stages). SR stages resize the low-res
image to the output size and concatenate it to x_t.

unCLIP's decoder (DALL·E 2, Ramesh et al. 2022, arXiv 2204.06125, sec. 2, after GLIDE) is
this U-Net with ``image_embed_dim`` set: the CLIP image embedding is projected and added to
the conditioning embedding, and projected into ``image_embed_tokens`` extra context tokens
concatenated to the text tokens that the 'cross' / 'concat' attention layers read. Off by
default, so every other config, param tree and config.json is unchanged.

Named sizes live in ``SIZES`` and are picked with ``get_unet_config(name, **overrides)``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxt2i.models import layers

Array = jax.Array

# The augmentation level (SR stages) is continuous in [0, 1] whatever the diffusion schedule,
# so its sinusoidal embedding has a fixed scale (model.noise_scale follows the schedule).
AUG_LEVEL_SCALE = 1000.0
OBJECTIVES = ("eps", "v", "x0")
DTYPES = ("float32", "bfloat16")
ATTENTION_KINDS = ("self", "cross", "concat")
RESIZE_METHODS = ("nearest", "bilinear", "bicubic", "lanczos3")
SKIP_MODES = ("concat", "add")


def _fail(field: str, value: Any, allowed: Any) -> None:
    raise ValueError(f"UNetConfig.{field} must be {allowed}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture and numerics of one U-Net stage.

    Attributes:
      image_size: output resolution the stage is trained for (the model itself accepts any
        size divisible by ``size_factor``).
      channels: image channels of x_t and of the prediction.
      base_channels: width of level 0; level i has base_channels * channel_mults[i].
      channel_mults: width multiplier per level (one level per resolution).
      num_res_blocks: residual blocks per level, used on the way down and again on the way up.
      attention: per level, 'none' or '+'-joined attention kinds run after every residual
        block: 'self', 'cross' (to text tokens), 'concat' (self-attention with the text tokens
        concatenated into keys/values), e.g. 'self+cross'.
      head_dim: attention head size.
      num_heads: fixed number of heads; 0 means width // head_dim at each level.
      emb_channels: width of the conditioning embedding and projected text tokens;
        0 means 4 * base_channels.
      text_dim: width of the text encoder's embeddings (4096 for T5-XXL).
      text_conv: width of a 1-D convolution over the projected text tokens, added to them
        (zero-initialised, so a model gains it as an identity and can be fine-tuned from an
        export without it): each token's vector then also carries its neighbours' words, e.g.
        a noun its colour, which a frozen encoder may carry only faintly. 0 = none; else odd.
      noise_scale: multiplier on the noise level before its sinusoidal embedding
        (1000 for continuous t in [0, 1]; 1 for discrete timesteps or log-SNR; training
        refuses a discrete schedule with another value). The augmentation level of an SR
        stage is always continuous in [0, 1] and has its own fixed scale, AUG_LEVEL_SCALE.
      lowres_size: resolution of the conditioning image for SR stages; 0 for a base model.
      lowres_resize: jax.image.resize method that brings the low-res image to x_t's size.
      crop_size: training crop of the SR input pipeline (the 1024 stage); 0 = full image.
      norm_groups: GroupNorm groups (reduced to gcd with the channel count).
      stem_downsample: level 0 also downsamples before its blocks, so only the stem and head
        run at full resolution (the paper's strided first DBlock; imagen-pytorch's
        memory-efficient U-Net); a stem-to-head skip carries the full-resolution detail.
      skip_mode: how a UBlock takes its level's skip: 'concat' (channels, as in the paper)
        or 'add' (cheaper: the first block of each UBlock is not widened).
      scale_skip: multiply skip connections by 1/sqrt(2) (for 'add', the sum is scaled).
      objective: what the output predicts: 'eps', 'v' or 'x0'.
      dtype: compute dtype, 'float32' or 'bfloat16' (parameters stay float32).
      remat: rematerialise every residual / attention block in the backward pass.
      remat_policy: what the backward pass keeps of a rematerialised block's forward pass:
        one of ``layers.REMAT_POLICIES`` ('full': nothing, 'dots', 'dots_no_batch',
        'offload_dots_no_batch'); applies only when ``remat`` is on.
      image_embed_dim: width of a CLIP image embedding the model is conditioned on (the unCLIP
        decoder); 0 = none. Its LayerNorm makes the conditioning independent of the
        embedding's length, and an all-zero embedding (the classifier-free null, see
        `drop_decoder_conditions`) gives a learned constant through the norm's and the
        projections' biases.
      image_embed_tokens: extra context tokens projected from the image embedding (4 in the
        paper); 0 = the embedding only enters the conditioning embedding.
    """
    image_size: int = 64
    channels: int = 3
    base_channels: int = 128
    channel_mults: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: tuple[int, ...] = (2, 2, 2, 2)
    attention: tuple[str, ...] = ("none", "concat", "concat", "concat")
    head_dim: int = 64
    num_heads: int = 0
    emb_channels: int = 0
    text_dim: int = 4096
    text_conv: int = 0
    noise_scale: float = 1000.0
    lowres_size: int = 0
    lowres_resize: str = "bilinear"
    crop_size: int = 0
    norm_groups: int = 32
    stem_downsample: bool = False
    skip_mode: str = "concat"
    scale_skip: bool = True
    objective: str = "eps"
    dtype: str = "float32"
    remat: bool = False
    remat_policy: str = "full"
    image_embed_dim: int = 0
    image_embed_tokens: int = 4

    def __post_init__(self):
        levels = len(self.channel_mults)
        # Accept lists (JSON) and a single int / kind for every level.
        for name, scalar in (("num_res_blocks", int), ("attention", str)):
            value = getattr(self, name)
            value = (value,) * levels if isinstance(value, scalar) else tuple(value)
            object.__setattr__(self, name, value)
        object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
        self._validate()

    def _validate(self) -> None:
        levels = len(self.channel_mults)
        if levels < 1 or any(m < 1 for m in self.channel_mults):
            _fail("channel_mults", self.channel_mults, "a non-empty tuple of positive ints")
        for name in ("num_res_blocks", "attention"):
            if len(getattr(self, name)) != levels:
                _fail(name, getattr(self, name), f"one entry per level ({levels} levels)")
        if any(n < 1 for n in self.num_res_blocks):
            _fail("num_res_blocks", self.num_res_blocks, "positive ints")
        for kinds in self.attention:
            if kinds != "none" and any(k not in ATTENTION_KINDS for k in kinds.split("+")):
                _fail("attention", kinds, f"'none' or '+'-joined kinds from {ATTENTION_KINDS}")
        for name in ("image_size", "channels", "base_channels", "head_dim", "text_dim",
                     "norm_groups"):
            if getattr(self, name) < 1:
                _fail(name, getattr(self, name), "a positive int")
        if self.base_channels % 2:
            _fail("base_channels", self.base_channels, "even (it sizes the sinusoidal features)")
        if self.image_embed_dim < 0 or self.image_embed_tokens < 0:
            _fail("image_embed_dim/image_embed_tokens",
                  (self.image_embed_dim, self.image_embed_tokens), ">= 0")
        if self.num_heads < 0 or self.emb_channels < 0 or self.crop_size < 0:
            _fail("num_heads/emb_channels/crop_size",
                  (self.num_heads, self.emb_channels, self.crop_size), ">= 0")
        if self.text_conv < 0 or (self.text_conv and self.text_conv % 2 == 0):
            _fail("text_conv", self.text_conv, "0 (none) or an odd kernel width")
        for name in ("image_size", "crop_size"):
            if getattr(self, name) % self.size_factor:
                _fail(name, getattr(self, name),
                      f"divisible by {self.size_factor} (one halving per downsample)")
        if self.lowres_size < 0 or self.lowres_size >= self.image_size:
            _fail("lowres_size", self.lowres_size, f"0 (base model) or in [1, {self.image_size})")
        if self.crop_size and not self.lowres_size:
            _fail("crop_size", self.crop_size, "0 for a base model (crops are for SR stages)")
        if self.lowres_resize not in RESIZE_METHODS:
            _fail("lowres_resize", self.lowres_resize, f"one of {RESIZE_METHODS}")
        if self.skip_mode not in SKIP_MODES:
            _fail("skip_mode", self.skip_mode, f"one of {SKIP_MODES}")
        if self.objective not in OBJECTIVES:
            _fail("objective", self.objective, f"one of {OBJECTIVES}")
        if self.dtype not in DTYPES:
            _fail("dtype", self.dtype, f"one of {DTYPES}")
        if self.remat_policy not in layers.REMAT_POLICY_NAMES:
            _fail("remat_policy", self.remat_policy, f"one of {layers.REMAT_POLICY_NAMES}")

    @property
    def is_sr(self) -> bool:
        """True for super-resolution stages (conditioned on a low-res image)."""
        return self.lowres_size > 0

    @property
    def size_factor(self) -> int:
        """Image height and width must be multiples of this (one halving per downsample)."""
        return 2 ** (len(self.channel_mults) - 1 + int(self.stem_downsample))

    @property
    def emb_dim(self) -> int:
        """Width of the conditioning embedding and of the projected text tokens."""
        return self.emb_channels or 4 * self.base_channels

    @property
    def compute_dtype(self) -> Any:
        """The jnp dtype of activations."""
        return jnp.dtype(self.dtype)

    @property
    def widths(self) -> tuple[int, ...]:
        """Channel width of every level."""
        return tuple(self.base_channels * m for m in self.channel_mults)

    @property
    def has_self_attention(self) -> bool:
        """Whether any level attends across pixels (then the model is not translation-local)."""
        return any(k in ("self", "concat") for kinds in self.attention for k in kinds.split("+"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of every field (tuples become lists).

        Fields added after the first format (`_LATER_FIELDS`) are left out while they hold
        their default, so the config.json of a model without them is byte-identical to the
        one older jaxt2i wrote (and older readers still read it).
        """
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()
                if k not in _LATER_FIELDS or v != _LATER_FIELDS[k]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UNetConfig":
        """Builds a config from ``to_dict()`` output (or any mapping of known fields).

        Raises:
          ValueError: naming unknown fields and listing the allowed ones.
        """
        _check_fields(d)
        return cls(**dict(d))


# Later fields and their defaults (written by to_dict only when set).
_LATER_FIELDS = {"image_embed_dim": 0, "image_embed_tokens": 4, "remat_policy": "full"}


def _check_fields(d: Mapping[str, Any]) -> None:
    allowed = [f.name for f in dataclasses.fields(UNetConfig)]
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise ValueError(f'unknown UNetConfig field(s) {unknown}; allowed: {", ".join(allowed)}')


class UNet(nn.Module):
    """Text-conditional diffusion U-Net (base or super-resolution stage).

    Attributes:
      config: a UNetConfig.
    """
    config: UNetConfig

    @nn.compact
    def __call__(self, x_t: Array, noise_level: Array, text_emb: Array, text_mask: Array,
                 lowres: Array | None = None, aug_level: Array | None = None,
                 image_embed: Array | None = None) -> Array:
        """Predicts eps, v or x0 (``config.objective``) for a noisy image.

        Args:
          x_t: [B, H, W, C] noisy images; H and W divisible by ``config.size_factor``.
          noise_level: [B] float: continuous time, log-SNR or a discrete step (see
            ``config.noise_scale``).
          text_emb: [B, L, text_dim] text-encoder outputs.
          text_mask: [B, L] bool/int, 1 for real tokens; padded positions change nothing and
            an all-zero row is allowed (a learned null token is always attended).
          lowres: SR stages only: [B, h, w, C] low-resolution image in [-1, 1] (noise-augmented).
          aug_level: SR stages only: [B] augmentation level in [0, 1] (zeros if None).
          image_embed: models with ``config.image_embed_dim`` only (required there):
            [B, image_embed_dim] CLIP image embedding; all zeros is the null condition.

        Returns:
          [B, H, W, C] float32 prediction.
        """
        cfg = self.config
        dt = cfg.compute_dtype
        b, height, width, _ = x_t.shape
        if height % cfg.size_factor or width % cfg.size_factor:
            raise ValueError(f"image size {height}x{width} must be divisible by "
                             f"{cfg.size_factor} for this U-Net (one halving per downsample)")
        noise_level = jnp.broadcast_to(jnp.asarray(noise_level, jnp.float32), (b,))

        x = x_t.astype(jnp.float32)
        if cfg.is_sr:
            if lowres is None:
                raise ValueError("this is a super-resolution U-Net (lowres_size > 0): pass lowres")
            x = jnp.concatenate([x, self._resize(lowres, x.shape)], axis=-1)  # [B, H, W, 2C]
        elif lowres is not None or aug_level is not None:
            raise ValueError("lowres/aug_level given to a base U-Net (config.lowres_size == 0)")

        # Conditioning: noise level + pooled text (+ augmentation level), shared by all blocks.
        emb = layers.LevelEmbedding(cfg, name="noise_embed")(noise_level)  # [B, E]
        tokens, mask = self._text_tokens(text_emb, text_mask)  # [B, 1+L, E], [B, 1+L]
        emb = emb + layers.AttentionPool(cfg, name="text_pool")(tokens, mask)
        if cfg.image_embed_dim:  # unCLIP decoder: CLIP image embedding -> emb and tokens
            image_emb, image_tokens = self._image_embed(image_embed, b)
            emb = emb + image_emb
            if image_tokens is not None:
                tokens = jnp.concatenate([tokens, image_tokens], axis=1)  # [B, 1+L+T, E]
                mask = jnp.concatenate(
                    [mask, jnp.ones(image_tokens.shape[:2], bool)], axis=1)
        elif image_embed is not None:
            raise ValueError("image_embed given to a U-Net without image conditioning "
                             "(config.image_embed_dim == 0)")
        if cfg.is_sr:
            aug = jnp.zeros((b,), jnp.float32) if aug_level is None else aug_level
            aug = jnp.broadcast_to(jnp.asarray(aug, jnp.float32), (b,))
            emb = emb + layers.LevelEmbedding(cfg, AUG_LEVEL_SCALE, name="aug_embed")(aug)
        emb = nn.silu(emb)

        res_block = layers.remat(layers.ResBlock, cfg)
        attn_block = layers.remat(layers.AttentionBlock, cfg)

        def stage(h, i, j, prefix):
            h = res_block(cfg, cfg.widths[i], name=f"{prefix}{i}_res{j}")(h, emb)
            if cfg.attention[i] != "none":
                for k, kind in enumerate(cfg.attention[i].split("+")):
                    h = attn_block(cfg, kind, name=f"{prefix}{i}_attn{j}_{k}")(h, tokens, mask)
            return h

        def merge(h, skip):  # a UBlock's input and its level's skip
            scale = jnp.asarray(2 ** -0.5 if cfg.scale_skip else 1.0, dt)
            if cfg.skip_mode == "add":
                return (h + skip) * scale
            return jnp.concatenate([h, skip * scale], axis=-1)

        stem = layers.conv(cfg, cfg.widths[0], name="stem")(x.astype(dt))  # [B, H, W, C0]
        h = layers.constrain(stem, layers.FMAP_AXES)
        skips = []
        for i, blocks in enumerate(cfg.num_res_blocks):
            if i > 0 or cfg.stem_downsample:  # downsample before the blocks
                h = layers.Downsample(cfg, cfg.widths[i], name=f"down{i}_downsample")(h)
            for j in range(blocks):
                h = stage(h, i, j, "down")
            skips.append(h)

        last = len(cfg.widths) - 1
        for i in reversed(range(len(cfg.widths))):
            if i < last:  # the deepest level's skip would be its own input
                h = merge(h, skips[i])
            for j in range(cfg.num_res_blocks[i]):
                h = stage(h, i, j, "up")
            if i > 0 or cfg.stem_downsample:  # upsample after the blocks
                h = layers.Upsample(cfg, cfg.widths[max(i - 1, 0)], name=f"up{i}_upsample")(h)
        if cfg.stem_downsample:  # full-resolution detail bypasses the half-resolution blocks
            h = merge(h, stem)

        h = nn.silu(layers.GroupNorm(cfg, name="head_norm")(h))
        out = layers.conv(cfg, cfg.channels, zero_init=True, name="head")(h)
        return out.astype(jnp.float32)  # [B, H, W, C]

    def _resize(self, lowres: Array, shape: tuple[int, ...]) -> Array:
        """Resizes the low-res image to x_t's [B, H, W, C] (float32)."""
        return resize_lowres(lowres, shape[1:3], self.config.lowres_resize)

    def _image_embed(self, image_embed: Array | None, b: int) -> tuple[Array, Array | None]:
        """Projects the CLIP image embedding to the conditioning embedding and to tokens.

        Returns:
          emb [B, E] and tokens [B, image_embed_tokens, E] (None when there are none).
        """
        cfg = self.config
        if image_embed is None:
            raise ValueError(f"this U-Net is conditioned on a CLIP image embedding "
                             f"(image_embed_dim={cfg.image_embed_dim}): pass image_embed "
                             "(zeros for the unconditional half of guidance)")
        if image_embed.shape != (b, cfg.image_embed_dim):
            raise ValueError(f"image_embed has shape {tuple(image_embed.shape)}, this U-Net "
                             f"expects ({b}, {cfg.image_embed_dim})")
        z = layers.layer_norm(cfg, name="image_norm")(jnp.asarray(image_embed, jnp.float32))
        emb = layers.dense(cfg, cfg.emb_dim, ("text_embed", "embed"), name="image_proj")(z)
        if not cfg.image_embed_tokens:
            return emb, None
        tokens = layers.dense(cfg, cfg.image_embed_tokens * cfg.emb_dim, ("text_embed", "embed"),
                              name="image_tokens")(z)
        tokens = tokens.reshape(b, cfg.image_embed_tokens, cfg.emb_dim)
        return emb, layers.constrain(tokens, layers.TOKEN_AXES)

    def _text_tokens(self, text_emb: Array, text_mask: Array) -> tuple[Array, Array]:
        """Normalises and projects text tokens, prepending a learned always-valid null token.

        Returns:
          tokens [B, 1+L, E] in the compute dtype and mask [B, 1+L] bool.
        """
        cfg = self.config
        b = text_emb.shape[0]
        mask = jnp.asarray(text_mask).astype(bool)  # [B, L]
        # Zero padded positions so that even non-finite padding cannot leak through 0 * inf.
        text = jnp.where(mask[..., None], text_emb.astype(jnp.float32), 0.0)
        text = layers.layer_norm(cfg, name="text_norm")(text)
        text = layers.dense(cfg, cfg.emb_dim, ("text_embed", "embed"), name="text_proj")(text)
        if cfg.text_conv:
            # Padded positions are zeros to their real neighbours (text is right-padded).
            text = jnp.where(mask[..., None], text, jnp.zeros((), text.dtype))
            text = text + layers.conv(cfg, cfg.emb_dim, cfg.text_conv, zero_init=True,
                                      spatial_dims=1, name="text_conv")(text)
        null = self.param("text_null", layers.partitioned(nn.initializers.normal(0.02), ("embed",)),
                          (cfg.emb_dim,), jnp.float32)
        null = jnp.broadcast_to(null.astype(text.dtype), (b, 1, cfg.emb_dim))
        tokens = jnp.concatenate([null, text], axis=1)
        mask = jnp.concatenate([jnp.ones((b, 1), bool), mask], axis=1)
        return layers.constrain(tokens, layers.TOKEN_AXES), mask


def resize_lowres(lowres: Array, size: tuple[int, int], method: str) -> Array:
    """The U-Net's resize of its low-res input: [B, h, w, C] -> [B, H, W, C] float32.

    `UNet` applies it to the image it is given; `Stage.augment` applies it before the
    noise-conditioning augmentation when `diffusion.aug_order` is 'resize_first' (the U-Net
    then gets an image of x_t's size, which it passes through unchanged).
    """
    lowres = lowres.astype(jnp.float32)
    (h, w), (hh, ww) = lowres.shape[1:3], tuple(size)
    if (h, w) == (hh, ww):
        return lowres
    # jax.image.resize is linear and separable, so it equals one interpolation matrix per
    # axis (the resize of an identity). As einsums the batch size may stay symbolic
    # (jax.export, ONNX), which the resize primitive does not allow.
    rows, cols = resize_matrix(h, hh, method), resize_matrix(w, ww, method)
    return jnp.einsum("Hh,bhwc,Ww->bHWc", rows, lowres, cols,
                      precision=jax.lax.Precision.HIGHEST)


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(np.float32(0), np.float32(1) - x)


def _keys_cubic(x: np.ndarray) -> np.ndarray:  # Keys (1981) cubic, a = -0.5
    f = np.float32
    near = ((f(1.5) * x - f(2.5)) * x) * x + f(1)
    far = ((f(-0.5) * x + f(2.5)) * x - f(4)) * x + f(2)
    return np.where(x >= 2, f(0), np.where(x >= 1, far, near))


def _lanczos3(x: np.ndarray) -> np.ndarray:
    f, r = np.float32, np.float32(3)
    y = r * np.sin(f(np.pi) * x) * np.sin(f(np.pi) * x / r)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(x > f(1e-3), y / (f(np.pi**2) * x * x), f(1))
    return np.where(x > r, f(0), out)


_KERNELS = {"bilinear": _triangle, "bicubic": _keys_cubic, "lanczos3": _lanczos3}


@functools.lru_cache(maxsize=None)
def resize_matrix(n: int, size: int, method: str) -> np.ndarray:
    """[size, n] float32 matrix M with M @ v == jax.image.resize(v, (size,), method).

    Built with numpy (the same float32 arithmetic as jax.image's `compute_weight_mat`,
    antialiased), so it is a constant even while a tracer patches jax.image.resize (jax2onnx
    does, and then refuses to run it).
    """
    f = np.float32
    out_pos = np.arange(size, dtype=f) + f(0.5)
    if method == "nearest":
        src = np.floor(out_pos * f(n) / f(size)).astype(np.int64)
        m = np.zeros((size, n), f)
        m[np.arange(size), src] = 1
        return m
    inv_scale = f(1.0 / (size / n))  # as jax.image: 1 / scale, rounded to float32
    sample = out_pos * inv_scale - f(0.5)  # [size] input coordinate of each output centre
    x = np.abs(sample[None, :] - np.arange(n, dtype=f)[:, None])  # [n, size]
    # Downsampling widens the kernel (antialiasing); upsampling only interpolates.
    w = _KERNELS[method](x / max(inv_scale, f(1)))
    total = w.sum(0, keepdims=True, dtype=f)
    w = np.where(np.abs(total) > f(1000 * np.finfo(np.float32).eps),
                 w / np.where(total != 0, total, f(1)), f(0))
    # Outputs whose centre falls outside the input get weight 0.
    w = np.where(((sample >= -0.5) & (sample <= n - 0.5))[None, :], w, f(0))
    return np.ascontiguousarray(w.T.astype(f))


def example_inputs(config: UNetConfig, batch_size: int = 1, text_len: int = 8,
                   image_size: int | None = None) -> dict[str, Array]:
    """Zero inputs with the right shapes for ``UNet(config).init`` (or ``jax.eval_shape``).

    Args:
      config: the U-Net config.
      batch_size: leading dimension.
      text_len: number of text tokens.
      image_size: spatial size of x_t (default ``config.crop_size or config.image_size``).

    Returns:
      Keyword arguments for ``UNet.__call__``.
    """
    size = image_size or config.crop_size or config.image_size
    inputs = {
        "x_t": jnp.zeros((batch_size, size, size, config.channels), jnp.float32),
        "noise_level": jnp.zeros((batch_size,), jnp.float32),
        "text_emb": jnp.zeros((batch_size, text_len, config.text_dim), jnp.float32),
        "text_mask": jnp.ones((batch_size, text_len), bool),
    }
    if config.is_sr:
        low = size * config.lowres_size // config.image_size
        inputs["lowres"] = jnp.zeros((batch_size, low, low, config.channels), jnp.float32)
        inputs["aug_level"] = jnp.zeros((batch_size,), jnp.float32)
    if config.image_embed_dim:
        inputs["image_embed"] = jnp.zeros((batch_size, config.image_embed_dim), jnp.float32)
    return inputs


def param_shapes(config: UNetConfig) -> Any:
    """Abstract (shape-only) variables of ``UNet(config)``; no memory is spent."""
    def init():
        return UNet(config).init(jax.random.PRNGKey(0), **example_inputs(config))
    return jax.eval_shape(init)


def count_params(config: UNetConfig) -> int:
    """Number of parameters of ``UNet(config)``, computed with ``jax.eval_shape``."""
    params = nn.unbox(param_shapes(config))["params"]
    return sum(int(x.size) for x in jax.tree.leaves(params))


# Every named size, defined once; variants override a few fields of a stage's base.
_BASE = UNetConfig(image_size=64, text_dim=4096)
_SR = UNetConfig(image_size=256, lowres_size=64, text_dim=4096, base_channels=128,
                 channel_mults=(1, 2, 4, 8), num_res_blocks=(2, 4, 8, 8), stem_downsample=True,
                 attention=("none", "none", "none", "self+cross"))
_TINY = dict(image_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=(1, 1),
             head_dim=8, text_dim=32, norm_groups=8)
SIZES: dict[str, UNetConfig] = {
    # Tests: ~0.1M parameters, both text-attention kinds.
    "tiny": dataclasses.replace(_BASE, **_TINY, attention=("cross", "concat")),
    # Tests of SR stages: cross-attention only, so it runs at any crop size.
    "tiny_sr": dataclasses.replace(_SR, **_TINY, lowres_size=8, attention=("none", "cross")),
    # The shapes demo cascade (text from the bundled 128-wide T5): 32 px base, 32 -> 128 SR.
    "demo": dataclasses.replace(_BASE, image_size=32, base_channels=32, channel_mults=(1, 2, 4),
                                num_res_blocks=(1, 2, 2), attention=("none", "concat", "concat"),
                                head_dim=32, text_dim=128),
    "demo_sr": dataclasses.replace(_SR, image_size=128, lowres_size=32, base_channels=32,
                                   channel_mults=(1, 2, 3, 3), num_res_blocks=(1, 1, 2, 2),
                                   attention=("none", "none", "none", "cross"), head_dim=32,
                                   text_dim=128),
    # Imagen paper sizes, conditioned on T5-XXL (4096-wide): ~2B, ~600M, ~400M parameters.
    # Per-level skips make blocks cheaper than the paper's base U-Net, so the extra blocks
    # go to the low resolutions as in the Efficient U-Net.
    "paper_base64": dataclasses.replace(_BASE, base_channels=512, channel_mults=(1, 2, 3, 4),
                                        num_res_blocks=(3, 3, 4, 5),
                                        attention=("none", "concat", "concat", "concat")),
    "paper_sr256": _SR,
    # No self-attention (trained on 256 px crops of 1024 px images); cross-attention kept.
    "paper_sr1024": dataclasses.replace(_SR, image_size=1024, lowres_size=256, crop_size=256,
                                        channel_mults=(1, 2, 4, 7),
                                        attention=("none", "none", "none", "cross")),
    # Same work as the imagen-pytorch CPU benchmark (64 px / 64 -> 256, text 512 x 32 tokens;
    # 22.95M / 21.84M parameters there): the same width at every resolution as its U-Nets
    # (base: full-resolution first level; SR: memory-efficient, i.e. stem_downsample), text
    # attention at the deepest level with 8 heads of 64, extra blocks at low resolution.
    "bench_23m": dataclasses.replace(_BASE, base_channels=64, channel_mults=(1, 1, 2, 3),
                                     num_res_blocks=(2, 2, 3, 5), text_dim=512, num_heads=8,
                                     attention=("none", "none", "none", "concat+cross")),
    "bench_sr22m": dataclasses.replace(_SR, base_channels=32, num_res_blocks=(2, 2, 2, 4),
                                       text_dim=512, num_heads=8,
                                       attention=("none", "none", "none", "concat+cross")),
}


def get_unet_config(name: str, **overrides: Any) -> UNetConfig:
    """Returns the named U-Net size with optional field overrides.

    Args:
      name: a key of SIZES.
      **overrides: UNetConfig fields to change, e.g. ``dtype='bfloat16', remat=True``.

    Returns:
      The validated UNetConfig.

    Raises:
      ValueError: for an unknown size or field (the message lists the allowed ones) or an
        invalid value.
    """
    if name not in SIZES:
        raise ValueError(f'unknown U-Net size {name!r}; choose one of: {", ".join(SIZES)}')
    _check_fields(overrides)
    return dataclasses.replace(SIZES[name], **overrides)


def drop_decoder_conditions(rng: Array, text_emb: Array, text_mask: Array, image_embed: Array,
                            *, text_drop: float = 0.5, image_drop: float = 0.1,
                            null_text: tuple[Array, Array] | None = None
                            ) -> tuple[Array, Array, Array]:
    """Classifier-free dropout of the unCLIP decoder's conditions, for its training step.

    The paper (sec. 2) sets the CLIP image embedding to zero for 10% of the examples and drops
    the caption for 50%; the two draws are independent, so 5% of the examples are fully
    unconditional. A dropped image embedding becomes zeros (the U-Net's null, see
    ``UNetConfig.image_embed_dim``). A dropped caption becomes ``null_text`` (e.g. the encoded
    empty prompt, as the Imagen trainer drops text) or, by default, zeros with an all-False
    mask, leaving only the U-Net's learned null token. Sampling with guidance must use the
    same nulls for its unconditional half.

    Args:
      rng: PRNG key.
      text_emb: [B, L, D] text-encoder outputs; text_mask: [B, L].
      image_embed: [B, image_embed_dim] CLIP image embeddings.
      text_drop: probability of dropping an example's caption (0.5 in the paper).
      image_drop: probability of zeroing an example's image embedding (0.1 in the paper).
      null_text: optional (emb [1 or B, L, D], mask [1 or B, L]) that replaces a caption.

    Returns:
      (text_emb, text_mask bool, image_embed) with the dropped examples replaced.
    """
    text_rng, image_rng = jax.random.split(rng)
    b = image_embed.shape[0]
    drop_text = jax.random.bernoulli(text_rng, text_drop, (b,))
    drop_image = jax.random.bernoulli(image_rng, image_drop, (b,))
    text_mask = jnp.asarray(text_mask).astype(bool)
    if null_text is None:
        null_emb, null_mask = jnp.zeros((), text_emb.dtype), jnp.zeros((), bool)
    else:
        null_emb, null_mask = (jnp.asarray(null_text[0], text_emb.dtype),
                               jnp.asarray(null_text[1]).astype(bool))
    text_emb = jnp.where(drop_text[:, None, None], null_emb, text_emb)
    text_mask = jnp.where(drop_text[:, None], null_mask, text_mask)
    image_embed = jnp.where(drop_image[:, None], jnp.zeros((), image_embed.dtype), image_embed)
    return text_emb, text_mask, image_embed
