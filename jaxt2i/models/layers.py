"""U-Net building blocks with logical axis names on every parameter.

Each block takes the model's ``UNetConfig`` (for dtype, norm groups, head sizes) rather than
a long list of keywords. Parameters are float32 and annotated with
``nn.with_logical_partitioning``; the main activations are pinned with
``nn.with_logical_constraint`` so that the parallel layer can shard the model through the
logical-to-mesh rules kept in the experiment config.

Logical names used here:
  parameters   dense ('embed', 'mlp') / ('mlp', 'embed'); attention q/k/v
               ('embed', 'heads', 'kv') with a leading None axis when fused; attention
               output ('heads', 'kv', 'embed'); conv (None, None, 'conv_in', 'conv_out');
               norm ('norm',); text projection ('text_embed', 'embed').
  activations  feature maps ('batch', 'height', 'width', 'embed'); tokens
               ('batch', 'length', 'embed'); heads ('batch', 'length', 'heads', 'kv').
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

FMAP_AXES = ("batch", "height", "width", "embed")
TOKEN_AXES = ("batch", "length", "embed")
HEAD_AXES = ("batch", "length", "heads", "kv")

_zeros = nn.initializers.zeros_init()
_ones = nn.initializers.ones_init()


# What the backward pass keeps of a rematerialised block's forward pass (`remat_policy` of the
# model configs; it applies only when `remat` is on); everything else is recomputed. Each is
# one of jax.checkpoint_policies:
#   'full'           nothing but the block's inputs: least memory, one more forward pass.
#   'dots'           also every matmul and convolution output (`dots_saveable`): most device
#                    memory of the four, least recompute (norms, activations, softmaxes).
#   'dots_no_batch'  also the matmul outputs without batch dimensions (`dots_with_no_batch_
#                    dims_saveable`): the dense / q-k-v / output projections; attention's
#                    batched score and value matmuls and every convolution are recomputed.
#   'offload_dots_no_batch'  the same outputs, kept in host memory instead of the device's
#                    (`offload_dot_with_no_batch_dims('device', 'pinned_host')`).
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload_dots_no_batch": jax.checkpoint_policies.offload_dot_with_no_batch_dims(
        "device", "pinned_host"),
}
REMAT_POLICY_NAMES = tuple(REMAT_POLICIES)


def remat(module_cls: type[nn.Module], cfg: Any) -> type[nn.Module]:
    """``module_cls``, rematerialised with ``cfg.remat_policy`` when ``cfg.remat`` is on.

    Args:
      module_cls: a block's module class (its call arguments are arrays only).
      cfg: a model config with ``remat`` (bool) and ``remat_policy`` (a REMAT_POLICIES name).

    Returns:
      ``module_cls`` itself, or ``nn.remat`` of it.
    """
    if not cfg.remat:
        return module_cls
    return nn.remat(module_cls, policy=REMAT_POLICIES[cfg.remat_policy])


def partitioned(init: Any, names: Sequence[str | None]) -> Any:
    """Wraps an initializer so the created parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, tuple(names))


def constrain(x: Array, names: Sequence[str | None]) -> Array:
    """Pins an activation to logical axes (a no-op outside a mesh with rules)."""
    return nn.with_logical_constraint(x, tuple(names))


def conv(cfg: Any, features: int, kernel: int = 3, zero_init: bool = False,
         name: str | None = None, spatial_dims: int = 2) -> nn.Conv:
    """Returns a 'SAME'-padded channels-last convolution with partitioned kernel and bias.

    Args:
      cfg: the model's UNetConfig (compute dtype).
      features: output channels.
      kernel: kernel size along every spatial dimension.
      zero_init: start the kernel at zero (output layers of residual branches).
      name: module name.
      spatial_dims: 2 for images [B, H, W, C], 1 for sequences [B, L, C].

    Returns:
      An unbound ``nn.Conv``.
    """
    kinit = _zeros if zero_init else nn.initializers.lecun_normal()
    return nn.Conv(
        features, (kernel,) * spatial_dims, padding="SAME",
        dtype=cfg.compute_dtype, param_dtype=jnp.float32,
        kernel_init=partitioned(kinit, (None,) * spatial_dims + ("conv_in", "conv_out")),
        bias_init=partitioned(_zeros, ("conv_out",)), name=name)


def dense(cfg: Any, features: int, axes: tuple[str, str] = ("embed", "mlp"),
          name: str | None = None) -> nn.Dense:
    """Returns a dense layer whose kernel is named ``axes`` and bias ``axes[1:]``.

    Args:
      cfg: the model's UNetConfig (compute dtype).
      features: output features.
      axes: logical names of the kernel's (input, output) axes.
      name: module name.

    Returns:
      An unbound ``nn.Dense``.
    """
    return nn.Dense(
        features, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
        kernel_init=partitioned(nn.initializers.lecun_normal(), axes),
        bias_init=partitioned(_zeros, axes[1:]), name=name)


class GroupNorm(nn.Module):
    """GroupNorm over NHWC maps, optionally fused with a per-example scale and shift.

    Statistics are float32 sums over height and width first (one pass over the map), then
    over the channels of each group; normalisation, the affine parameters and the
    scale-and-shift conditioning fold into one multiply-add per element. The number of
    groups is ``gcd(groups or cfg.norm_groups, channels)``.

    Attributes:
      cfg: the model's UNetConfig.
      epsilon: added to the variance.
      groups: number of groups; 0 takes ``cfg.norm_groups`` (a model with norms of several
        group counts, such as DeepFloyd IF's 32-group text norm, passes its own).
      centered: the variance from x minus the group mean (a second pass) instead of
        E[x^2] - E[x]^2, which cancels in float32 when a group is nearly constant (text padded
        with many equal tokens: DeepFloyd IF's text norm).
    """
    cfg: Any
    epsilon: float = 1e-5
    groups: int = 0
    centered: bool = False

    @nn.compact
    def __call__(self, x: Array, scale_shift: tuple[Array, Array] | None = None) -> Array:
        """Args: x [B, H, W, C]; scale_shift: optional ([B, C], [B, C]) -> y * (1 + s) + t.

        Returns:
          [B, H, W, C] in x's dtype.
        """
        b, h, w, c = x.shape
        groups = math.gcd(self.groups or self.cfg.norm_groups, c)
        gamma = self.param("scale", partitioned(_ones, ("norm",)), (c,), jnp.float32)
        beta = self.param("bias", partitioned(_zeros, ("norm",)), (c,), jnp.float32)
        xf = x.astype(jnp.float32)
        s1 = jnp.sum(xf, axis=(1, 2)).reshape(b, groups, c // groups)  # [B, G, C/G]
        s2 = jnp.sum(jnp.square(xf), axis=(1, 2)).reshape(b, groups, c // groups)
        n = h * w * (c // groups)
        mean = jnp.sum(s1, axis=-1, keepdims=True) / n  # [B, G, 1]
        if self.centered:
            dev = xf - jnp.repeat(mean, c // groups, axis=-1).reshape(b, 1, 1, c)
            var = jnp.sum(jnp.sum(jnp.square(dev), axis=(1, 2)).reshape(b, groups, -1),
                          axis=-1, keepdims=True) / n
        else:
            var = jnp.maximum(jnp.sum(s2, axis=-1, keepdims=True) / n - jnp.square(mean), 0.0)
        inv = jax.lax.rsqrt(var + self.epsilon)
        a = (inv * gamma.reshape(groups, -1)).reshape(b, c)  # [B, C]
        shift = beta - (mean * inv).repeat(c // groups, axis=-1).reshape(b, c) * gamma
        if scale_shift is not None:
            a = a * (1 + scale_shift[0].astype(jnp.float32))
            shift = shift * (1 + scale_shift[0].astype(jnp.float32)) + scale_shift[1]
        a = a[:, None, None, :].astype(x.dtype)
        return x * a + shift[:, None, None, :].astype(x.dtype)


def layer_norm(cfg: Any, name: str | None = None) -> nn.LayerNorm:
    """Returns a LayerNorm over the last axis with float32 statistics."""
    return nn.LayerNorm(
        epsilon=1e-5, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
        scale_init=partitioned(_ones, ("norm",)), bias_init=partitioned(_zeros, ("norm",)),
        name=name)


def sinusoidal_embedding(t: Array, dim: int, scale: float) -> Array:
    """Sinusoidal features of a scalar per example (noise level, time or log-SNR).

    Args:
      t: [B] (or scalar) float values.
      dim: even number of features.
      scale: multiplier on ``t`` before the sinusoids (1000 for t in [0, 1], 1 for discrete
        timesteps or log-SNR), so the lowest frequency still spans the input's range.

    Returns:
      [B, dim] float32 features.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (jnp.asarray(t, jnp.float32) * scale)[:, None] * freqs[None, :]  # [B, half]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class LevelEmbedding(nn.Module):
    """Embeds a per-example scalar (noise level or augmentation level) into a vector.

    Attributes:
      cfg: the model's UNetConfig.
      scale: multiplier before the sinusoids; None = cfg.noise_scale (the noise level's).
    """
    cfg: Any
    scale: float | None = None

    @nn.compact
    def __call__(self, t: Array) -> Array:
        """Maps [B] floats to [B, emb_dim] features through sinusoids and a 2-layer MLP."""
        cfg = self.cfg
        scale = cfg.noise_scale if self.scale is None else self.scale
        feats = sinusoidal_embedding(t, cfg.base_channels, scale)  # [B, C0]
        feats = feats.astype(cfg.compute_dtype)
        h = dense(cfg, cfg.emb_dim, ("embed", "mlp"), name="fc1")(feats)
        h = dense(cfg, cfg.emb_dim, ("mlp", "embed"), name="fc2")(nn.silu(h))
        return constrain(h, ("batch", "embed"))  # [B, E]


def _heads(cfg: Any, channels: int) -> tuple[int, int]:
    """(number of heads, head dimension) for an attention layer over ``channels``."""
    if cfg.num_heads:
        return cfg.num_heads, cfg.head_dim
    return max(1, channels // cfg.head_dim), cfg.head_dim


def _param(module: nn.Module, name: str, names: Sequence[str | None], shape: Sequence[int],
           init: Any, dtype: Any) -> Array:
    """Creates a float32 partitioned parameter and returns it cast to ``dtype``."""
    return module.param(name, partitioned(init, names), tuple(shape), jnp.float32).astype(dtype)


def _attend(q: Array, k: Array, v: Array, mask: Array | None) -> Array:
    """Scaled dot-product attention; ``mask`` [B, S] marks the keys that may be attended."""
    q = constrain(q, HEAD_AXES)
    if mask is not None:
        mask = mask[:, None, None, :]  # [B, 1, 1, S]
    return jax.nn.dot_product_attention(q, k, v, mask=mask)  # [B, T, N, D]


class AttentionPool(nn.Module):
    """Pools text tokens into one vector with a learned query, respecting the mask.

    Attributes:
      cfg: the model's UNetConfig.
    """
    cfg: Any

    @nn.compact
    def __call__(self, tokens: Array, mask: Array) -> Array:
        """Args: tokens [B, L, E] (masked positions ignored), mask [B, L] bool.

        Returns:
          [B, emb_dim] pooled embedding.
        """
        cfg, dt = self.cfg, self.cfg.compute_dtype
        width = tokens.shape[-1]
        heads, hd = _heads(cfg, width)
        init = nn.initializers.normal(width ** -0.5)
        query = _param(self, "query", ("heads", "kv"), (heads, hd), init, dt)
        kv_w = _param(self, "kv", (None, "embed", "heads", "kv"), (2, width, heads, hd),
                      nn.initializers.lecun_normal(in_axis=1, out_axis=(2, 3), batch_axis=0), dt)
        kv = jnp.einsum("ble,tehd->tblhd", tokens, kv_w)  # [2, B, L, heads, hd]
        q = jnp.broadcast_to(query, (tokens.shape[0], 1, heads, hd))  # [B, 1, heads, hd]
        out = _attend(q, kv[0], kv[1], mask)[:, 0]  # [B, heads, hd]
        out_w = _param(self, "out", ("heads", "kv", "embed"), (heads, hd, cfg.emb_dim),
                       nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2), dt)
        return jnp.einsum("bhd,hde->be", out, out_w)  # [B, E]


class ResBlock(nn.Module):
    """Residual block: GN-SiLU-conv, scale-and-shift from the embedding, GN-SiLU-conv.

    Attributes:
      cfg: the model's UNetConfig.
      features: output channels (a 1x1 conv matches the shortcut when they differ).
    """
    cfg: Any
    features: int

    @nn.compact
    def __call__(self, x: Array, emb: Array) -> Array:
        """Args: x [B, H, W, C_in]; emb [B, E], already passed through SiLU.

        Returns:
          [B, H, W, features].
        """
        cfg = self.cfg
        h = nn.silu(GroupNorm(cfg, name="norm1")(x))
        h = conv(cfg, self.features, name="conv1")(h)  # [B, H, W, F]
        film = dense(cfg, 2 * self.features, name="film")(emb)  # [B, 2F]
        h = GroupNorm(cfg, name="norm2")(h, tuple(jnp.split(film, 2, axis=-1)))
        h = conv(cfg, self.features, zero_init=True, name="conv2")(nn.silu(h))
        if x.shape[-1] != self.features:
            x = conv(cfg, self.features, kernel=1, name="shortcut")(x)
        return constrain(x + h, FMAP_AXES)


class AttentionBlock(nn.Module):
    """Pre-norm attention over the pixels of a feature map, with text conditioning.

    Attributes:
      cfg: the model's UNetConfig.
      kind: 'self' (pixels only), 'cross' (pixels attend to text tokens) or 'concat'
        (self-attention whose keys/values also hold the text tokens, Imagen's base model).
    """
    cfg: Any
    kind: str

    @nn.compact
    def __call__(self, x: Array, text: Array, text_mask: Array) -> Array:
        """Args: x [B, H, W, C]; text [B, L, E] tokens; text_mask [B, L] bool.

        Returns:
          [B, H, W, C], the input plus the attention output.
        """
        cfg, dt = self.cfg, self.cfg.compute_dtype
        b, hh, ww, c = x.shape
        heads, hd = _heads(cfg, c)
        qkv_init = nn.initializers.lecun_normal(in_axis=1, out_axis=(2, 3), batch_axis=0)
        h = GroupNorm(cfg, name="norm")(x).reshape(b, hh * ww, c)  # [B, N, C]
        h = constrain(h, TOKEN_AXES)
        mask = None
        if self.kind == "cross":
            q_w = _param(self, "q", ("embed", "heads", "kv"), (c, heads, hd),
                         nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)), dt)
            q = jnp.einsum("bnc,chd->bnhd", h, q_w)  # [B, N, heads, hd]
        else:
            qkv_w = _param(self, "qkv", (None, "embed", "heads", "kv"), (3, c, heads, hd),
                           qkv_init, dt)
            q, k, v = jnp.einsum("bnc,tchd->tbnhd", h, qkv_w)  # 3 x [B, N, heads, hd]
        if self.kind in ("cross", "concat"):
            e = text.shape[-1]
            tkv_w = _param(self, "text_kv", (None, "embed", "heads", "kv"), (2, e, heads, hd),
                           qkv_init, dt)
            tk, tv = jnp.einsum("ble,tehd->tblhd", text, tkv_w)  # 2 x [B, L, heads, hd]
            if self.kind == "cross":
                k, v, mask = tk, tv, text_mask
            else:
                k = jnp.concatenate([k, tk], axis=1)
                v = jnp.concatenate([v, tv], axis=1)
                mask = jnp.concatenate([jnp.ones((b, hh * ww), bool), text_mask], axis=1)
        out = _attend(q, k, v, mask)  # [B, N, heads, hd]
        out_w = _param(self, "out", ("heads", "kv", "embed"), (heads, hd, c), _zeros, dt)
        out = jnp.einsum("bnhd,hdc->bnc", out, out_w).reshape(b, hh, ww, c)
        return constrain(x + out, FMAP_AXES)


class Downsample(nn.Module):
    """Halves the resolution with a 2x2, stride-2 convolution (a matmul over 2x2 patches).

    Attributes:
      cfg: the model's UNetConfig.
      features: output channels.
    """
    cfg: Any
    features: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """[B, H, W, C] -> [B, H/2, W/2, features]."""
        b, h, w, c = x.shape
        kernel = _param(self, "kernel", (None, None, "conv_in", "conv_out"),
                        (2, 2, c, self.features), nn.initializers.lecun_normal(), x.dtype)
        bias = _param(self, "bias", ("conv_out",), (self.features,), _zeros, x.dtype)
        x = x.reshape(b, h // 2, 2, w // 2, 2, c)
        return constrain(jnp.einsum("bhiwjc,ijco->bhwo", x, kernel) + bias, FMAP_AXES)


class Upsample(nn.Module):
    """Doubles the resolution with a 2x2, stride-2 transposed convolution (sub-pixel conv).

    Each input pixel feeds its own 2x2 output patch, so the cost is that of a 1x1 conv at
    the output resolution (a 3x3 conv after nearest upsampling costs 9 times more).

    Attributes:
      cfg: the model's UNetConfig.
      features: output channels.
    """
    cfg: Any
    features: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """[B, H, W, C] -> [B, 2H, 2W, features]."""
        b, h, w, c = x.shape
        kernel = _param(self, "kernel", (None, None, "conv_in", "conv_out"),
                        (2, 2, c, self.features),
                        nn.initializers.lecun_normal(batch_axis=(0, 1)), x.dtype)
        bias = _param(self, "bias", ("conv_out",), (self.features,), _zeros, x.dtype)
        y = jnp.einsum("bhwc,ijco->bhiwjo", x, kernel)  # [B, H, 2, W, 2, F]
        return constrain(y.reshape(b, 2 * h, 2 * w, self.features) + bias, FMAP_AXES)
