"""Pure-Flax T5 encoder stack (T5 v1.0, v1.1, Flan, mT5, umT5, ByT5), numerically matching
transformers.

The encoder is frozen in Imagen, so this module has no dropout and no decoder. It follows the
published T5 architecture:
  * a shared token embedding (no scaling),
  * pre-norm residual blocks with RMS layer norm (variance in float32, no mean, no bias),
  * self-attention without the 1/sqrt(d) scaling, biased by bidirectional relative-position
    buckets whose table lives in the first layer and is shared by all layers (umT5:
    `bias_per_layer`, every layer has its own table),
  * a feed-forward block, `relu` (v1.0) or `gated-gelu` (v1.1 / Flan, tanh-approximated GELU),
  * a final RMS norm.

mT5 is this architecture with a 250k SentencePiece vocabulary, ByT5 with a 384-row byte
vocabulary (and a deeper encoder); neither needs anything of its own here.

Every parameter carries logical axis names (vocab, embed, heads, kv, mlp, relpos_buckets, norm)
so a mesh can shard T5-XXL; the mapping to mesh axes lives in the config.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# What a config may name as the encoder's compute dtype (text.dtype).
COMPUTE_DTYPES = ("float32", "bfloat16")
_ACTIVATIONS = ("relu", "gelu", "silu")


def resolve_dtype(name: Any) -> Any:
    """Maps 'float32' / 'bfloat16' / 'float16' (or a dtype) to a jnp dtype; clear error otherwise."""
    if isinstance(name, str):
        if name not in _DTYPES:
            raise ValueError(f"dtype {name!r} is not supported; use one of {sorted(_DTYPES)}")
        return _DTYPES[name]
    return jnp.dtype(name).type


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture of a T5 encoder (field names follow Hugging Face's T5Config)."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 8
    num_heads: int = 6
    feed_forward_proj: str = "gated-gelu"  # 'relu' (v1.0), 'gated-gelu' (v1.1 / Flan), ...
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    # umT5: every layer has its own relative-position bias table (T5, mT5, ByT5: only the
    # first layer has one, and all layers use it).
    bias_per_layer: bool = False
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"

    def __post_init__(self):
        act, gated = self.activation
        if act not in _ACTIVATIONS:
            raise ValueError(
                f"feed_forward_proj {self.feed_forward_proj!r} is not supported; use 'relu', "
                "'gated-gelu' or another '[gated-]{relu,gelu,silu}'"
            )
        resolve_dtype(self.dtype)
        resolve_dtype(self.param_dtype)
        for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            if getattr(self, field) <= 0:
                raise ValueError(f"T5Config.{field} must be positive, got {getattr(self, field)}")

    @property
    def activation(self) -> tuple[str, bool]:
        """(activation name, gated?) parsed from `feed_forward_proj`."""
        parts = self.feed_forward_proj.split("-")
        gated = len(parts) == 2 and parts[0] == "gated"
        return parts[-1], gated

    def replace(self, **kw) -> "T5Config":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "T5Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown T5Config fields {unknown}; allowed: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "T5Config":
        """Builds the encoder config from a Hugging Face `config.json` dict.

        Fields config.json leaves out take transformers' defaults for its model_type (an old
        T5 config without `feed_forward_proj` is a ReLU T5, as transformers reads it). A
        config without model_type is named by its `architectures` (early umT5 uploads).
        """
        model_type = hf.get("model_type") or _model_type_of(hf.get("architectures") or [])
        if model_type not in _HF_DEFAULTS:
            raise ValueError(
                f"model_type {model_type!r} is not a T5 encoder this loader supports; "
                "use a t5 / mt5 / umt5 checkpoint (T5 v1.0, v1.1, Flan, mT5, umT5, ByT5)"
            )
        kw = dict(_HF_DEFAULTS[model_type])
        kw.update({f.name: hf[f.name] for f in dataclasses.fields(cls)
                   if f.name in hf and f.name not in ("dtype", "param_dtype", "bias_per_layer")})
        # HF's dtype is the storage dtype, not our compute dtype; bias_per_layer is not an HF
        # field: it follows from the model type.
        kw["bias_per_layer"] = model_type == "umt5"
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict:
        """The matching Hugging Face `config.json` fields (encoder part)."""
        act, gated = self.activation
        umt5 = self.bias_per_layer
        return {
            "model_type": "umt5" if umt5 else "t5",
            "architectures": ["UMT5EncoderModel" if umt5 else "T5EncoderModel"],
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "d_kv": self.d_kv,
            "d_ff": self.d_ff,
            "num_layers": self.num_layers,
            "num_decoder_layers": self.num_layers,
            "num_heads": self.num_heads,
            "feed_forward_proj": self.feed_forward_proj,
            "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": self.relative_attention_max_distance,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "is_gated_act": gated,
            "dense_act_fn": "gelu_new" if act == "gelu" else act,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "decoder_start_token_id": 0,
            "tie_word_embeddings": False,
        }


# transformers' defaults for the fields a config.json may leave out, by model_type.
_HF_DEFAULTS = {
    "t5": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
               feed_forward_proj="relu"),
    "mt5": dict(vocab_size=250112, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                feed_forward_proj="gated-gelu"),
    "umt5": dict(vocab_size=250112, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                 feed_forward_proj="gated-gelu"),
}


def _model_type_of(architectures: list) -> str:
    """The model_type an `architectures` list implies ('t5' when it names none we know)."""
    for arch in architectures:
        for prefix, model_type in (("UMT5", "umt5"), ("MT5", "mt5")):
            if str(arch).startswith(prefix):
                return model_type
    return "t5"


_V1_1 = {  # T5 v1.1 and Flan-T5 share these shapes (gated-GELU, untied, vocab 32128)
    "small": dict(d_model=512, d_ff=1024, num_layers=8, num_heads=6),
    "base": dict(d_model=768, d_ff=2048, num_layers=12, num_heads=12),
    "large": dict(d_model=1024, d_ff=2816, num_layers=24, num_heads=16),
    "xl": dict(d_model=2048, d_ff=5120, num_layers=24, num_heads=32),
    "xxl": dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64),
}
_V1_0 = {  # original T5 (ReLU feed-forward)
    "small": dict(d_model=512, d_ff=2048, num_layers=6, num_heads=8),
    "base": dict(d_model=768, d_ff=3072, num_layers=12, num_heads=12),
    "large": dict(d_model=1024, d_ff=4096, num_layers=24, num_heads=16),
    "3b": dict(d_model=1024, d_ff=16384, num_layers=24, num_heads=32, d_kv=128),
    "11b": dict(d_model=1024, d_ff=65536, num_layers=24, num_heads=128, d_kv=128),
}

_BYT5 = {  # ByT5: byte vocabulary (384 rows), wider and deeper encoders (12 / 18 / 36 layers)
    "small": dict(d_model=1472, d_ff=3584, num_layers=12, num_heads=6),
    "base": dict(d_model=1536, d_ff=3968, num_layers=18, num_heads=12),
    "large": dict(d_model=1536, d_ff=3840, num_layers=36, num_heads=16),
    "xl": dict(d_model=2560, d_ff=6720, num_layers=36, num_heads=32),
    "xxl": dict(d_model=4672, d_ff=12352, num_layers=36, num_heads=64),
}
_GATED = dict(feed_forward_proj="gated-gelu")

# Every named size, defined once (the published Hugging Face configurations of google/<name>).
SIZES: dict[str, dict] = {
    **{f"t5-v1_1-{k}": dict(v, **_GATED) for k, v in _V1_1.items()},
    **{f"flan-t5-{k}": dict(v, **_GATED) for k, v in _V1_1.items()},
    **{f"t5-{k}": dict(v, feed_forward_proj="relu") for k, v in _V1_0.items()},
    # mT5 and umT5 have T5 v1.1's shapes with multilingual SentencePiece vocabularies; umT5
    # has a position-bias table in every layer (and was published without a 'large').
    **{f"mt5-{k}": dict(v, vocab_size=250112, **_GATED) for k, v in _V1_1.items()},
    **{f"umt5-{k}": dict(v, vocab_size=256384, bias_per_layer=True, **_GATED)
       for k, v in _V1_1.items() if k != "large"},
    **{f"byt5-{k}": dict(v, vocab_size=384, **_GATED) for k, v in _BYT5.items()},
    # Tests: a few thousand parameters.
    "tiny": dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
    # The frozen, randomly initialised encoder of the bundled shapes demo (closed vocabulary).
    "shapes": dict(vocab_size=256, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4),
}


def get_t5_config(name: str, **overrides) -> T5Config:
    """Returns the T5Config of a named size (see SIZES), with optional field overrides."""
    if name not in SIZES:
        raise ValueError(f"unknown T5 size {name!r}; choose one of {sorted(SIZES)}")
    return T5Config(**{**SIZES[name], **overrides})


def relative_position_bucket(
    relative_position: np.ndarray, num_buckets: int = 32, max_distance: int = 128
) -> np.ndarray:
    """Bidirectional T5 bucketing of (key - query) offsets into `num_buckets` ids.

    Half the buckets are for keys after the query. Within each half, offsets below
    num_buckets/4 get a bucket each; larger ones share log-spaced buckets up to max_distance.
    Computed in numpy: the offsets depend only on the (static) sequence length.
    """
    half = num_buckets // 2
    buckets = (relative_position > 0).astype(np.int32) * half
    rp = np.abs(relative_position)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        large = max_exact + (
            np.log(np.maximum(rp, 1).astype(np.float32) / max_exact)
            / math.log(max_distance / max_exact)
            * (half - max_exact)
        ).astype(np.int32)
    large = np.minimum(large, half - 1)
    return buckets + np.where(rp < max_exact, rp, large)


class RMSNorm(nn.Module):
    """T5 layer norm: x / sqrt(mean(x^2) + eps) * scale, statistics in float32."""

    epsilon: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # [..., D] -> [..., D]
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x.shape[-1],), self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = (x32 * jax.lax.rsqrt(var + self.epsilon)).astype(self.dtype)
        return y * scale.astype(self.dtype)


class _Projection(nn.Module):
    """A bias-free projection `einsum(equation, x, kernel)` with a logically named kernel.

    (flax's DenseGeneral re-boxes its kernel through a flattened shape, which breaks
    multi-axis logical names under a mesh; an explicit einsum keeps them intact.)
    """

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    equation: str
    std: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(nn.initializers.normal(self.std), self.axes),
            self.shape, self.param_dtype)
        return jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))


class T5Attention(nn.Module):
    """Multi-head self-attention without 1/sqrt(d) scaling; `bias` carries positions + mask."""

    config: T5Config

    @nn.compact
    def __call__(self, x, bias):  # x [B, L, D], bias [B or 1, H, L, L] float32 -> [B, L, D]
        cfg = self.config
        dtype, pdtype = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)
        D, H, K = cfg.d_model, cfg.num_heads, cfg.d_kv

        def proj(name, std):
            return _Projection((D, H, K), ("embed", "heads", "kv"), "bld,dhk->blhk", std,
                               dtype, pdtype, name=name)(x)

        q = proj("query", (D * K) ** -0.5)  # [B, L, H, K]
        k = proj("key", D ** -0.5)
        v = proj("value", D ** -0.5)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(scores + bias, axis=-1).astype(dtype)  # [B, H, Lq, Lk]
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)  # [B, L, H, K]
        return _Projection((H, K, D), ("heads", "kv", "embed"), "blhk,hkd->bld",
                           (H * K) ** -0.5, dtype, pdtype, name="out")(out)


class T5MLP(nn.Module):
    """Feed-forward block: wo(act(wi x)) or, gated, wo(act(wi_0 x) * wi_1 x)."""

    config: T5Config

    @nn.compact
    def __call__(self, x):  # [B, L, D] -> [B, L, D]
        cfg = self.config
        dtype, pdtype = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)
        act_name, gated = cfg.activation
        act = {"relu": nn.relu, "gelu": lambda h: nn.gelu(h, approximate=True), "silu": nn.silu}[act_name]

        def dense(name, features, axes, std):
            return nn.Dense(
                features, use_bias=False, dtype=dtype, param_dtype=pdtype, name=name,
                kernel_init=nn.with_logical_partitioning(nn.initializers.normal(std), axes),
            )

        std_in = cfg.d_model ** -0.5
        if gated:
            h = act(dense("wi_0", cfg.d_ff, ("embed", "mlp"), std_in)(x))
            h = h * dense("wi_1", cfg.d_ff, ("embed", "mlp"), std_in)(x)
        else:
            h = act(dense("wi", cfg.d_ff, ("embed", "mlp"), std_in)(x))
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        return dense("wo", cfg.d_model, ("mlp", "embed"), cfg.d_ff ** -0.5)(h)


def _relpos_table(module: nn.Module, cfg: T5Config) -> jax.Array:
    """Declares a relative-position bias table [buckets, heads] on `module`."""
    return module.param(
        "relpos_bias",
        nn.with_logical_partitioning(
            nn.initializers.normal(cfg.d_model ** -0.5), ("relpos_buckets", "heads")),
        (cfg.relative_attention_num_buckets, cfg.num_heads), resolve_dtype(cfg.param_dtype),
    )


def _position_bias(table: jax.Array, buckets: np.ndarray) -> jax.Array:
    """[buckets, H] table, [Lq, Lk] bucket ids -> [1, H, Lq, Lk] float32 attention bias."""
    return jnp.transpose(table[buckets].astype(jnp.float32), (2, 0, 1))[None]


class T5Block(nn.Module):
    """One pre-norm encoder layer: x + attn(norm(x)), then x + mlp(norm(x)).

    With `config.bias_per_layer` (umT5) the layer owns a position-bias table (`relpos_bias`)
    and adds its bias to `bias` (then the mask only); `buckets` [L, L] indexes the table.
    """

    config: T5Config

    @nn.compact
    def __call__(self, x, bias, buckets=None):  # [B, L, D] -> [B, L, D]
        cfg = self.config
        dtype, pdtype = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)
        if cfg.bias_per_layer:
            bias = bias + _position_bias(_relpos_table(self, cfg), buckets)
        norm = lambda name: RMSNorm(cfg.layer_norm_epsilon, dtype, pdtype, name=name)  # noqa: E731
        x = x + T5Attention(cfg, name="attention")(norm("pre_attention_layer_norm")(x), bias)
        x = x + T5MLP(cfg, name="mlp")(norm("pre_mlp_layer_norm")(x))
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class T5Encoder(nn.Module):
    """The T5 encoder: token ids + padding mask -> contextual embeddings."""

    config: T5Config

    @nn.compact
    def __call__(self, input_ids, mask):
        """Encodes a batch.

        Args:
          input_ids: [B, L] int token ids.
          mask: [B, L] bool or int, 1 for real tokens (padding keys are ignored).

        Returns:
          [B, L, d_model] embeddings in the compute dtype (padding positions are computed but
          carry no meaning; use `mask`).
        """
        cfg = self.config
        dtype, pdtype = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)
        embed = self.param(
            "token_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
            (cfg.vocab_size, cfg.d_model), pdtype,
        )
        x = jnp.take(embed, input_ids, axis=0).astype(dtype)  # [B, L, D]
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        length = input_ids.shape[1]
        pos = np.arange(length)
        buckets = relative_position_bucket(
            pos[None, :] - pos[:, None],
            cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance,
        )  # [Lq, Lk]
        neg = jnp.finfo(jnp.float32).min
        bias = jnp.where(mask.astype(bool), 0.0, neg)[:, None, None, :]  # [B,1,1,L]
        if not cfg.bias_per_layer:  # one table, shared by every layer
            bias = bias + _position_bias(_relpos_table(self, cfg), buckets)  # [B,H,L,L]

        for i in range(cfg.num_layers):
            x = T5Block(cfg, name=f"layers_{i}")(x, bias, buckets)
        return RMSNorm(cfg.layer_norm_epsilon, dtype, pdtype, name="encoder_norm")(x)


def count_params(config: T5Config) -> int:
    """Number of parameters of an encoder, by `jax.eval_shape` (allocates nothing)."""
    model = T5Encoder(config)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(ids.shape, ids.dtype),
                                               jnp.ones(ids.shape, bool)))
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.unbox(shapes)))
