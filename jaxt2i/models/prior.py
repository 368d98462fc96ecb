"""The unCLIP diffusion prior: a causal Transformer that generates CLIP image embeddings.

DALL·E 2 (Ramesh et al. 2022, arXiv 2204.06125, sec. 2.1) first turns a caption into a CLIP
image embedding z_i and then decodes z_i into pixels. Its diffusion prior is a decoder-only
Transformer with a causal attention mask over the sequence, in this order,

    [text tokens (projected) x L, CLIP text embedding, timestep, noised z_i, learned query]

and the output at the final query is the prediction of the clean z_i (the paper predicts the
unnoised embedding and regresses it with a mean-squared error, rather than eps). Padded text
tokens are masked out of every attention (on top of the causal mask).

Embedding space. CLIP embeddings only carry meaning up to their length (CLIP compares them by
cosine), and a unit vector of D components has components of size ~1/sqrt(D), far below the
unit-variance data the noise schedules assume. With ``normalize_embeds`` (the default) the
prior therefore works on ``sqrt(D) * z / |z|`` (per-component RMS 1, as DALLE2-pytorch's
``image_embed_scale``): `prior_loss` maps the target there, the model maps its CLIP text
embedding input there, and `sample_prior` returns unit-norm embeddings (the direction, the
part CLIP and the decoder use).

Classifier-free guidance. In training the text conditions are dropped for 10% of the examples
(paper sec. 2.1): the model's ``keep`` input [B] is False for them, and then every text token is
masked out and the CLIP text embedding's slot holds a learned null vector. Masking the tokens
(rather than substituting learned null tokens) keeps padding irrelevant also for the null
caption and ties no parameter to the maximum text length; a learned null embedding (rather
than zeros) lets the model place "no caption" where no real caption projects, and zeros would
also break the normalisation above. Sampling runs the conditional and unconditional halves as
one batched call (`jaxt2i.diffusion.sample`).

Logical axis names: the same as models/layers.py ('embed', 'mlp', 'heads', 'kv', 'norm'), with
'text_embed' for the encoder-side width of the input and output projections and 'length' for
the position table, so the project's sharding rules (parallel/sharding.py) apply unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxt2i import diffusion
from jaxt2i.models import layers

Array = jax.Array

OBJECTIVES = ("x0", "eps", "v")
DTYPES = ("float32", "bfloat16")
# Positions after the text tokens: CLIP text embedding, timestep, noised image embedding, query.
NUM_EXTRA_TOKENS = 4


def _fail(field: str, value: Any, allowed: Any) -> None:
    raise ValueError(f"PriorConfig.{field} must be {allowed}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class PriorConfig:
    """Architecture and numerics of the diffusion prior.

    Attributes:
      clip_dim: width of the CLIP joint embedding space (image and text embeddings).
      text_dim: width of the text token features given to the prior (e.g. the CLIP text
        tower's token states, `CLIPModel.encode_text`'s first output).
      max_text_len: most text tokens a caption may have (sizes the position table).
      width: Transformer width.
      layers: number of Transformer blocks.
      heads: attention heads (width must be divisible by heads).
      mlp_ratio: MLP hidden width / width.
      noise_scale: multiplier on the noise level before its sinusoidal embedding (1000 for a
        continuous time in [0, 1]; 1 for discrete timesteps or log-SNR), as in UNetConfig.
      objective: what the output predicts: 'x0' (the paper), 'eps' or 'v'.
      normalize_embeds: work on sqrt(clip_dim) * z / |z| (see the module docstring).
      dtype: compute dtype, 'float32' or 'bfloat16' (parameters stay float32).
      remat: rematerialise every Transformer block in the backward pass.
      remat_policy: what the backward pass keeps of them (``layers.REMAT_POLICIES``; only
        when ``remat`` is on).
    """
    clip_dim: int = 1024
    text_dim: int = 1024
    max_text_len: int = 256
    width: int = 2048
    layers: int = 24
    heads: int = 32
    mlp_ratio: int = 4
    noise_scale: float = 1000.0
    objective: str = "x0"
    normalize_embeds: bool = True
    dtype: str = "float32"
    remat: bool = False
    remat_policy: str = "full"

    def __post_init__(self):
        for name in ("clip_dim", "text_dim", "max_text_len", "width", "layers", "heads",
                     "mlp_ratio"):
            if getattr(self, name) < 1:
                _fail(name, getattr(self, name), "a positive int")
        if self.width % self.heads:
            _fail("width", self.width, f"divisible by heads ({self.heads})")
        if self.width % 2:
            _fail("width", self.width, "even (it sizes the timestep's sinusoidal features)")
        if self.objective not in OBJECTIVES:
            _fail("objective", self.objective, f"one of {OBJECTIVES}")
        if self.dtype not in DTYPES:
            _fail("dtype", self.dtype, f"one of {DTYPES}")
        if self.remat_policy not in layers.REMAT_POLICY_NAMES:
            _fail("remat_policy", self.remat_policy, f"one of {layers.REMAT_POLICY_NAMES}")

    @property
    def compute_dtype(self) -> Any:
        """The jnp dtype of activations (what layers.dense / layer_norm read)."""
        return jnp.dtype(self.dtype)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_dim(self) -> int:
        return self.mlp_ratio * self.width

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PriorConfig":
        """Builds a config from ``to_dict()`` output; unknown fields are refused, listed."""
        _check_fields(d)
        return cls(**dict(d))


def _check_fields(d: Mapping[str, Any]) -> None:
    allowed = [f.name for f in dataclasses.fields(PriorConfig)]
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise ValueError(f'unknown PriorConfig field(s) {unknown}; allowed: {", ".join(allowed)}')


def to_prior_space(embed: Array) -> Array:
    """[..., D] CLIP embeddings -> sqrt(D) * z / |z| (float32; a zero vector stays zero)."""
    z = jnp.asarray(embed, jnp.float32)
    sq = jnp.sum(jnp.square(z), axis=-1, keepdims=True)
    return z * jax.lax.rsqrt(jnp.maximum(sq, 1e-12)) * math.sqrt(z.shape[-1])


def unit_norm(embed: Array) -> Array:
    """[..., D] -> z / |z| (float32; a zero vector stays zero)."""
    z = jnp.asarray(embed, jnp.float32)
    return z * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(z), -1, keepdims=True), 1e-24))


def _param(module: nn.Module, name: str, names: tuple, shape: tuple, init: Any, dtype: Any):
    return module.param(name, layers.partitioned(init, names), shape, jnp.float32).astype(dtype)


class PriorBlock(nn.Module):
    """Pre-norm Transformer block: masked self-attention, then a GELU MLP.

    Attributes:
      config: the PriorConfig.
    """
    config: PriorConfig

    @nn.compact
    def __call__(self, x: Array, mask: Array) -> Array:
        """Args: x [B, N, W]; mask [B, N, N] bool (query, key) pairs that may attend.

        Returns:
          [B, N, W].
        """
        cfg, dt = self.config, self.config.compute_dtype
        w, heads, hd = cfg.width, cfg.heads, cfg.head_dim
        h = layers.layer_norm(cfg, name="norm1")(x)
        qkv_w = _param(self, "qkv", (None, "embed", "heads", "kv"), (3, w, heads, hd),
                       nn.initializers.lecun_normal(in_axis=1, out_axis=(2, 3), batch_axis=0), dt)
        q, k, v = jnp.einsum("bnc,tchd->tbnhd", h, qkv_w)  # 3 x [B, N, heads, hd]
        q = layers.constrain(q, layers.HEAD_AXES)
        att = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])  # [B, N, heads, hd]
        out_w = _param(self, "out", ("heads", "kv", "embed"), (heads, hd, w),
                       nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2), dt)
        x = layers.constrain(x + jnp.einsum("bnhd,hdc->bnc", att, out_w), layers.TOKEN_AXES)
        h = layers.layer_norm(cfg, name="norm2")(x)
        h = layers.dense(cfg, cfg.mlp_dim, ("embed", "mlp"), name="fc1")(h)  # [B, N, M]
        h = layers.dense(cfg, w, ("mlp", "embed"), name="fc2")(nn.gelu(h))
        return layers.constrain(x + h, layers.TOKEN_AXES)


class DiffusionPrior(nn.Module):
    """unCLIP's diffusion prior (see the module docstring).

    Attributes:
      config: a PriorConfig.
    """
    config: PriorConfig

    @nn.compact
    def __call__(self, x_t: Array, noise_level: Array, text_tokens: Array, text_mask: Array,
                 text_embed: Array, keep: Array | None = None,
                 return_hidden: bool = False) -> Array:
        """Predicts the clean image embedding (or eps / v, ``config.objective``).

        Args:
          x_t: [B, clip_dim] noised image embedding (in the prior's space).
          noise_level: [B] float: continuous time, log-SNR or a discrete step (see
            ``config.noise_scale``).
          text_tokens: [B, L, text_dim] text-encoder token features, L <= max_text_len.
          text_mask: [B, L] bool/int, 1 for real tokens; padded positions change nothing.
          text_embed: [B, clip_dim] CLIP text embedding (any length when normalize_embeds).
          keep: [B] bool; False drops the caption (classifier-free guidance's null
            condition: tokens masked out, the learned null text embedding). None = all kept.
          return_hidden: return the final-normed states of every position [B, L + 4, width]
            (float32) instead of the prediction (for tests and probes).

        Returns:
          [B, clip_dim] float32 prediction.
        """
        cfg = self.config
        dt = cfg.compute_dtype
        b, length = text_tokens.shape[:2]
        if length > cfg.max_text_len:
            raise ValueError(f"text has {length} tokens but this prior takes at most "
                             f"{cfg.max_text_len} (PriorConfig.max_text_len)")
        for name, value, dim in (("x_t", x_t, cfg.clip_dim), ("text_embed", text_embed,
                                 cfg.clip_dim), ("text_tokens", text_tokens, cfg.text_dim)):
            if value.shape[-1] != dim:
                raise ValueError(f"{name} has width {value.shape[-1]}, this prior expects {dim}")
        keep = (jnp.ones((b,), bool) if keep is None
                else jnp.broadcast_to(jnp.asarray(keep).astype(bool), (b,)))
        mask = jnp.asarray(text_mask).astype(bool) & keep[:, None]  # [B, L]
        noise_level = jnp.broadcast_to(jnp.asarray(noise_level, jnp.float32), (b,))

        # Text tokens; padded (and dropped) ones are zeroed so that even inf cannot leak.
        text = jnp.where(mask[..., None], jnp.asarray(text_tokens, jnp.float32), 0.0)
        text = layers.layer_norm(cfg, name="text_norm")(text)
        text = layers.dense(cfg, cfg.width, ("text_embed", "embed"), name="text_proj")(text)

        temb = jnp.asarray(text_embed, jnp.float32)
        if cfg.normalize_embeds:
            temb = to_prior_space(temb)
        temb = layers.dense(cfg, cfg.width, ("text_embed", "embed"), name="text_embed_proj")(
            temb.astype(dt))  # [B, W]
        null = _param(self, "null_text_embed", ("embed",), (cfg.width,),
                      nn.initializers.normal(1.0), dt)
        temb = jnp.where(keep[:, None], temb, null)

        feats = layers.sinusoidal_embedding(noise_level, cfg.width, cfg.noise_scale).astype(dt)
        time = layers.dense(cfg, cfg.width, ("embed", "mlp"), name="time_fc1")(feats)
        time = layers.dense(cfg, cfg.width, ("mlp", "embed"), name="time_fc2")(nn.silu(time))

        x = layers.dense(cfg, cfg.width, ("text_embed", "embed"), name="x_proj")(
            jnp.asarray(x_t, jnp.float32).astype(dt))
        query = _param(self, "query", ("embed",), (cfg.width,), nn.initializers.normal(1.0), dt)
        extra = jnp.stack([temb, time, x, jnp.broadcast_to(query, x.shape)], axis=1)  # [B, 4, W]

        # Learned positions; the last four are fixed whatever L, so extra padding is inert.
        pos = _param(self, "pos_embed", ("length", "embed"),
                     (cfg.max_text_len + NUM_EXTRA_TOKENS, cfg.width),
                     nn.initializers.normal(0.02), dt)
        h = jnp.concatenate([text + pos[:length], extra + pos[cfg.max_text_len:]], axis=1)
        h = layers.constrain(h, layers.TOKEN_AXES)  # [B, N, W], N = L + 4

        n = length + NUM_EXTRA_TOKENS
        idx = jnp.arange(n)  # comparisons, not tril / eye (ONNX Runtime has no bool EyeLike)
        causal = idx[:, None] >= idx[None, :]
        valid = jnp.concatenate([mask, jnp.ones((b, NUM_EXTRA_TOKENS), bool)], axis=1)  # [B, N]
        # Each position also sees itself, so a padded query (whose output nothing reads)
        # never has an empty row.
        allowed = causal[None] & (valid[:, None, :] | (idx[:, None] == idx[None, :])[None])

        block = layers.remat(PriorBlock, cfg)
        for i in range(cfg.layers):
            h = block(cfg, name=f"block{i}")(h, allowed)
        h = layers.layer_norm(cfg, name="final_norm")(h)
        if return_hidden:
            return h.astype(jnp.float32)
        out = layers.dense(cfg, cfg.clip_dim, ("embed", "text_embed"), name="out_proj")(h[:, -1])
        return out.astype(jnp.float32)  # [B, clip_dim]


def example_inputs(config: PriorConfig, batch_size: int = 1,
                   text_len: int | None = None) -> dict[str, Array]:
    """Zero inputs with the right shapes for ``DiffusionPrior(config).init`` / eval_shape."""
    length = config.max_text_len if text_len is None else text_len
    return {
        "x_t": jnp.zeros((batch_size, config.clip_dim), jnp.float32),
        "noise_level": jnp.zeros((batch_size,), jnp.float32),
        "text_tokens": jnp.zeros((batch_size, length, config.text_dim), jnp.float32),
        "text_mask": jnp.ones((batch_size, length), bool),
        "text_embed": jnp.ones((batch_size, config.clip_dim), jnp.float32),
    }


def param_shapes(config: PriorConfig) -> Any:
    """Abstract (shape-only, logically partitioned) variables of the prior; no memory spent."""
    def init():
        return DiffusionPrior(config).init(jax.random.PRNGKey(0), **example_inputs(config, 1, 1))
    return jax.eval_shape(init)


def count_params(config: PriorConfig) -> int:
    """Number of parameters of ``DiffusionPrior(config)``, computed with ``jax.eval_shape``."""
    params = nn.unbox(param_shapes(config))["params"]
    return sum(int(x.size) for x in jax.tree.leaves(params))


# ---------------------------------------------------------------- training and sampling


def prior_denoiser(model: DiffusionPrior, variables: Any):
    """The prior as the diffusion core's ``denoise_fn(x_t, model_t, cond)``.

    The one place the prior network is applied (as `Stage.denoise` is for the U-Nets); ``cond``
    holds 'text_tokens', 'text_mask', 'text_embed' and 'keep' (see `DiffusionPrior`).
    """
    def denoise(x_t, model_t, cond):
        return model.apply(variables, x_t, model_t, cond["text_tokens"], cond["text_mask"],
                           cond["text_embed"], keep=cond["keep"])
    return denoise


def prior_loss(model: DiffusionPrior, params: Any, batch: Mapping[str, Array], rng: Array, *,
               schedule="cosine", text_drop: float = 0.1, weighting: str = "uniform") -> Array:
    """The prior's training loss for one batch (a pure function: jit / grad it).

    Draws t from the schedule, noises the (normalised) image embedding with
    `jaxt2i.diffusion.diffusion_loss`, and regresses ``config.objective`` (x0 in the paper)
    with a mean-squared error. Each example's caption (tokens and CLIP text embedding) is
    dropped with probability ``text_drop`` (the ``keep`` input; see the module docstring).

    Args:
      model: the DiffusionPrior.
      params: its variables, ``{'params': ...}``.
      batch: 'text_tokens' [B, L, text_dim], 'text_mask' [B, L], 'text_embed' [B, clip_dim],
        'image_embed' [B, clip_dim] (CLIP embeddings as the CLIP model gives them).
      rng: PRNG key.
      schedule: a schedule object or name (continuous schedules with noise_scale 1000).
      text_drop: probability of dropping an example's caption (0.1 in the paper).
      weighting: 'uniform' or 'min_snr' (see diffusion.losses).

    Returns:
      Scalar float32 loss (mean over the batch).
    """
    cfg = model.config
    x0 = jnp.asarray(batch["image_embed"], jnp.float32)
    if cfg.normalize_embeds:
        x0 = to_prior_space(x0)
    drop_rng, loss_rng = jax.random.split(rng)
    b = x0.shape[0]
    keep, _ = diffusion.drop_condition(drop_rng, {"keep": jnp.ones((b,), bool)},
                                       {"keep": jnp.zeros((1,), bool)}, text_drop)
    cond = {"text_tokens": batch["text_tokens"], "text_mask": batch["text_mask"],
            "text_embed": batch["text_embed"], "keep": keep["keep"]}
    per_example = diffusion.diffusion_loss(prior_denoiser(model, params), x0, cond, loss_rng,
                                           schedule=schedule, objective=cfg.objective,
                                           weighting=weighting)
    return jnp.mean(per_example)


def select_candidates(candidates: Array, text_embed: Array) -> tuple[Array, Array]:
    """Keeps, per caption, the candidate with the highest dot product with its text embedding.

    Args:
      candidates: [B, K, D] image embeddings.
      text_embed: [B, D] CLIP text embeddings.

    Returns:
      (chosen [B, D], index [B] int32 into K).
    """
    scores = jnp.einsum("bkd,bd->bk", candidates.astype(jnp.float32),
                        jnp.asarray(text_embed, jnp.float32))
    index = jnp.argmax(scores, axis=1).astype(jnp.int32)
    chosen = jnp.take_along_axis(candidates, index[:, None, None], axis=1)[:, 0]
    return chosen, index


def sample_prior(model: DiffusionPrior, params: Any, text_tokens: Array, text_mask: Array,
                 text_embed: Array, rng: Array, *, schedule="cosine", num_candidates: int = 2,
                 guidance: float | Array | None = None, steps: int = 64, sampler="ddim",
                 return_candidates: bool = False):
    """Samples CLIP image embeddings for captions (pure and jittable; one lax.scan).

    ``num_candidates`` embeddings are drawn per caption (as one batch of B * K) and the one
    with the highest dot product with the caption's CLIP text embedding is kept (paper sec.
    2.1, two candidates). With ``guidance`` the conditional and unconditional (caption
    dropped) predictions run as one batched call and combine as uncond + w (cond - uncond).

    Args:
      model, params: the DiffusionPrior and its variables ``{'params': ...}``.
      text_tokens: [B, L, text_dim]; text_mask: [B, L]; text_embed: [B, clip_dim].
      rng: PRNG key.
      schedule: the schedule the prior was trained with (object or name; static).
      num_candidates: K >= 1 (static).
      guidance: classifier-free guidance scale w (a float or traced scalar); None runs no
        unconditional half at all. w = 1 gives the conditional prediction.
      steps: sampler steps (static; 64 in the paper).
      sampler: a sampler name or object of jaxt2i.diffusion (static).
      return_candidates: also return all candidates [B, K, clip_dim] and the chosen index [B].

    Returns:
      [B, clip_dim] float32 image embeddings (unit norm when ``normalize_embeds``), or
      (embeddings, candidates, index) with ``return_candidates``.
    """
    cfg = model.config
    if num_candidates < 1:
        raise ValueError(f"num_candidates ({num_candidates}) must be at least 1")
    b, length = text_tokens.shape[:2]
    k = num_candidates
    rep = lambda x: jnp.repeat(jnp.asarray(x), k, axis=0)  # noqa: E731 - [B, ...] -> [B*K, ...]
    cond = {"text_tokens": rep(text_tokens), "text_mask": rep(text_mask),
            "text_embed": rep(text_embed), "keep": jnp.ones((b * k,), bool)}
    uncond = None
    if guidance is not None:  # batch-1 leaves, broadcast by the core; all masked out anyway
        uncond = {"text_tokens": jnp.zeros((1, length, cfg.text_dim), jnp.float32),
                  "text_mask": jnp.zeros((1, length), bool),
                  "text_embed": jnp.zeros((1, cfg.clip_dim), jnp.float32),
                  "keep": jnp.zeros((1,), bool)}
    x0 = diffusion.sample(prior_denoiser(model, params), (b * k, cfg.clip_dim), rng,
                          schedule=schedule, sampler=sampler, num_steps=steps, cond=cond,
                          uncond=uncond, guidance_scale=1.0 if guidance is None else guidance,
                          prediction=cfg.objective)
    candidates = x0.reshape(b, k, cfg.clip_dim)
    if cfg.normalize_embeds:
        candidates = unit_norm(candidates)
    chosen, index = select_candidates(candidates, text_embed)
    return (chosen, candidates, index) if return_candidates else chosen


# Every named size, defined once.
SIZES: dict[str, PriorConfig] = {
    # Tests: the tiny CLIP's widths (text tower 32, joint space 16, 16 positions).
    "tiny": PriorConfig(clip_dim=16, text_dim=32, max_text_len=16, width=64, layers=2, heads=4),
    # The shapes demo: a 128-wide CLIP (like the demo cascade's T5), 32-token captions.
    "demo": PriorConfig(clip_dim=128, text_dim=128, max_text_len=32, width=256, layers=6,
                        heads=4),
    # The paper's diffusion prior. Ramesh et al. 2022, appendix C, Table 3 ("Hyperparameters
    # for the models"), diffusion-prior column: 1B parameters; its Transformer is listed in
    # the text-encoder rows: context 256, width 2048, depth 24, heads 32; cosine schedule with
    # 1000 diffusion steps, 64 sampling steps. Not stated there: the MLP ratio (4 assumed, the
    # GPT convention) and the CLIP width; the paper's CLIP is a ViT-H/16 whose joint embedding
    # width it does not give, so 1024 (LAION's ViT-H/14) is assumed for clip_dim and text_dim.
    # The paper's prior reads the caption's tokens itself (context 256); here it reads
    # encoder token features (text_dim) through a projection, as the issue specifies.
    "paper": PriorConfig(),
}


def get_prior_config(name: str, **overrides: Any) -> PriorConfig:
    """Returns the named prior size with optional field overrides.

    Raises:
      ValueError: for an unknown size or field (the message lists the allowed ones) or an
        invalid value.
    """
    if name not in SIZES:
        raise ValueError(f'unknown prior size {name!r}; choose one of: {", ".join(SIZES)}')
    _check_fields(overrides)
    return dataclasses.replace(SIZES[name], **overrides)
