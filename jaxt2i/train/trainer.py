"""The compiled pieces of one stage's training: `Trainer`.

It builds the stage (`jaxt2i.stage.Stage`) from a config, the device mesh and logical-axis
rules, the sharded train state (`jax.eval_shape` + a jitted init with `out_shardings`, never
built on one device and moved), and one jitted `train_step` with donated state: frozen T5 on
the token ids (or cached embeddings), condition dropout, noise-conditioning augmentation (SR),
the diffusion loss (the hybrid loss of `jaxt2i.diffusion.vlb` for a network with a learned
variance, DeepFloyd IF), gradient accumulation, the optimizer, EMA, and skipping of non-finite
updates. With `train.lora.rank > 0` the params are {'base', 'lora'}: the frozen network and
its LoRA adapters (`jaxt2i.models.lora`), the optimizer masked to the adapters, the EMA of
the adapters alone (`lora.ema_tree` gives the params to sample and export).
`lower_step` / `step_jaxpr` expose the step for compile-only analysis.
"""

from __future__ import annotations

import contextlib
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxt2i import diffusion
from jaxt2i.diffusion.vlb import VLB_WEIGHT, hybrid_loss
from jaxt2i.config import ConfigError, validate
from jaxt2i.models import lora as lora_lib
from jaxt2i.models.unet import drop_decoder_conditions
from jaxt2i.parallel import logical_shardings, make_mesh
from jaxt2i.parallel.sharding import rules_from_config
from jaxt2i.stage import Stage, StageConfig, load_text_encoder, resolve_export_dir
from jaxt2i.text.encoder import abstract_encoder
from jaxt2i.train_state import (TrainState, apply_gradients, create_train_state, make_optimizer,
                                 state_layout)

log = logging.getLogger("jaxt2i")


def _check_batch(cfg, mesh) -> None:
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    b, k = cfg.train.batch_size, cfg.train.grad_accum
    if k < 1 or b % k:
        raise ConfigError(f"train.batch_size ({b}) must be divisible by train.grad_accum ({k})")
    if (b // k) % ways:
        raise ConfigError(
            f"micro-batch size ({b // k} = batch_size {b} / grad_accum {k}) must be divisible by "
            f"the data-parallel devices (data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']} = "
            f"{ways})")
    if b % jax.process_count():
        raise ConfigError(f"train.batch_size ({b}) must be divisible by the number of processes "
                          f"({jax.process_count()})")


def _widens_text_conv(name: str, src_shape, want_shape) -> bool:
    """Whether `src_shape` is a narrower (odd) width of the text_conv kernel `want_shape`:
    [k, in, out] -> [K, in, out] with k < K. The layer is zero-initialised, so the wider
    kernel with the narrow one in its centre computes the same function."""
    return (name.split("/")[-2:] == ["text_conv", "kernel"] and len(src_shape) == 3
            and len(want_shape) == 3 and tuple(src_shape[1:]) == tuple(want_shape[1:])
            and src_shape[0] % 2 == 1 and src_shape[0] < want_shape[0])


def _starts_at_zero(name: str) -> bool:
    """Whether a param missing from an `init_from` export starts at zero: the unCLIP decoder's
    image-embedding projections, so a base made into a decoder ignores the embedding at first
    rather than reading random projections of it."""
    return any(part in ("image_proj", "image_tokens") for part in name.split("/"))


def fit_exported(want: dict[str, tuple], got: dict[str, tuple], *, allow_new: bool,
                 what: str) -> tuple[list[str], list[str]]:
    """Checks an export's params (name -> shape) against a model's before fine-tuning from it.

    Returns (missing, widened): the model's params the export lacks (they keep their
    initialisation) and the text_conv kernels the export has narrower (widened, centred).
    Both need `allow_new`; any other difference raises ConfigError naming the param.
    """
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if extra or (missing and not allow_new):
        hint = ("use the source run's model config" if extra else
                "use the source run's model config, or set train.init_from_allow_new=True "
                "to keep the new params at their initialisation")
        raise ConfigError(
            f"{what} does not fit this model: {len(missing)} params missing (first: "
            f"{missing[:1]}), {len(extra)} unexpected (first: {extra[:1]}); {hint}")
    widened = []
    for name, shape in want.items():
        if name not in got or got[name] == shape:
            continue
        widens = _widens_text_conv(name, got[name], shape)
        if widens and allow_new:
            widened.append(name)
            continue
        hint = ("; set train.init_from_allow_new=True to widen it (its new taps start at "
                "zero)" if widens else "; use the source run's model config")
        raise ConfigError(f"{what}: param {name} has shape {got[name]} but this model's is "
                          f"{shape}{hint}")
    return missing, widened


class Trainer:
    """Holds the compiled pieces of one stage's training: its `Stage`, mesh, step functions."""

    def __init__(self, cfg: ml_collections.ConfigDict, encoder=None, devices=None, *,
                 abstract: bool = False):
        """Builds the stage, mesh, state shardings and the jitted step.

        Args:
          cfg: a stage config.
          encoder: an already loaded text encoder (default: the config's).
          devices: the mesh's devices (default: all devices of all processes).
          abstract: nothing is placed on the devices: the text encoder's params are shapes
            (`jax.ShapeDtypeStruct`s with their shardings; its weights are never read), so the
            step can be lowered and compiled for devices that cannot hold data, e.g. a TPU
            topology's compile-only devices (`jaxt2i.aot`). `init_state` is then refused.
        """
        validate(cfg)
        self.cfg = cfg
        self.abstract = abstract
        stage_cfg = StageConfig.from_dict(cfg.to_dict(), where="--config")
        # train.lora.rank > 0: params are {'base' (frozen), 'lora' (adapters)} (`lora_lib`)
        self.lora = lora_lib.LoraConfig.from_config(cfg.train.get("lora"))
        # the params the optimizer moves and the EMA averages (None: all of them)
        self.trainable = lora_lib.trainable if self.lora is not None else None
        if self.lora is not None and not cfg.train.get("init_from"):
            raise ConfigError("train.lora.rank > 0 adapts a trained stage: set "
                              "train.init_from=STAGE_EXPORT (or set train.lora.rank=0)")
        self.unet_cfg = stage_cfg.model
        self.is_sr = self.unet_cfg.is_sr
        c = self.unet_cfg
        # A crop-trained SR stage that resizes first gets the crop of its upsampled low-res
        # image from the host (`jaxt2i.train.loop`): the pixels sampling's full-size upsample
        # has there, borders included, which upsampling a low-res crop would not give.
        self.host_upsamples_lowres = bool(
            self.is_sr and 0 < c.crop_size < c.image_size
            and stage_cfg.diffusion.aug_order == "resize_first")
        try:
            self.mesh = make_mesh(dict(cfg.mesh), devices)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _check_batch(cfg, self.mesh)
        self.rules = rules_from_config(cfg.sharding_rules)
        self.tx = make_optimizer(cfg.train)
        self.stage = Stage(stage_cfg)
        if self.lora is not None:  # the optimizer updates (and holds state for) adapters only
            self.tx = lora_lib.masked(self.tx, nn.unbox(jax.eval_shape(
                self._init_params, jax.random.key(0))))
        self.schedule = self.stage.schedule
        if self.schedule.is_discrete and getattr(self.unet_cfg, "noise_scale", 1) != 1:
            raise ConfigError(
                f"diffusion.schedule={cfg.diffusion.schedule!r} feeds integer timesteps 0..N-1 "
                f"to the model, but model.noise_scale={self.unet_cfg.noise_scale:g} is for "
                "continuous t in [0, 1]: set --config.model.noise_scale=1")
        if self.stage.learned_variance and not self.schedule.is_discrete:
            raise ConfigError(f"diffusion.schedule={cfg.diffusion.schedule!r}: a model with a "
                              "learned variance trains with the hybrid loss, whose L_vlb needs "
                              "a discrete schedule (e.g. 'discrete_squaredcos_cap_v2')")
        if encoder is None:
            encoder = (abstract_encoder(stage_cfg.text.encoder, dtype=stage_cfg.text.dtype,
                                        max_length=stage_cfg.text.max_length) if abstract
                       else load_text_encoder(stage_cfg.text))
        self.encoder = encoder
        self.stage.encoder = self.encoder
        if self.encoder.config.d_model != self.unet_cfg.text_dim:
            raise ConfigError(
                f"the text encoder's width ({self.encoder.config.d_model}) differs from "
                f"model.text_dim ({self.unet_cfg.text_dim}); set --config.model.text_dim="
                f"{self.encoder.config.d_model}")
        self.replicated = NamedSharding(self.mesh, P())
        self._build_state_shardings()
        self._place_text_encoder()
        self._place_clip(stage_cfg)
        self._compile()

    # ----------------------------------------------------------------------------- state
    def _init_params(self, rng):
        params = self.stage.init_params(rng)
        if self.lora is None:
            return params
        return {"base": params, "lora": lora_lib.init(params, self.lora,
                                                      jax.random.fold_in(rng, 1))}

    def _init_state(self, rng) -> TrainState:
        return create_train_state(nn.unbox(self._init_params(rng)), self.tx, self.trainable)

    def _build_state_shardings(self) -> None:
        self.state_shardings, self.abstract_state, self.num_params = state_layout(
            self._init_params, self.tx, self.mesh, self.rules, self.trainable)

    def _place_text_encoder(self) -> None:
        enc = self.encoder
        L = enc.max_length
        boxed = jax.eval_shape(lambda: enc.module.init(
            jax.random.key(0), jnp.zeros((1, L), jnp.int32), jnp.ones((1, L), bool)))["params"]
        self.text_shardings = logical_shardings(boxed, self.mesh, self.rules)
        ids, mask = enc.tokenizer([""])
        if self.abstract:  # shapes only; the empty prompt's ids become constants of the step
            self.text_params = jax.tree_util.tree_map(
                lambda a, s: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=s),
                enc.params, self.text_shardings)
            self.uncond_ids, self.uncond_mask = np.asarray(ids), np.asarray(mask)
            return
        self.text_params = jax.device_put(enc.params, self.text_shardings)
        self.uncond_ids = jax.device_put(jnp.asarray(ids), self.replicated)
        self.uncond_mask = jax.device_put(jnp.asarray(mask), self.replicated)

    def _place_clip(self, stage_cfg) -> None:
        """An unCLIP decoder's frozen CLIP image tower (`clip.path`), placed like the text
        encoder; None for every other stage."""
        self.clip = self.clip_params = self.clip_shardings = None
        if not self.stage.image_embed_dim:
            return
        from jaxt2i.prior_stage import load_frozen_clip
        from jaxt2i.text.clip import init_clip

        self.clip = load_frozen_clip(stage_cfg.clip, towers=("vision",))
        if self.clip.config.projection_dim != self.stage.image_embed_dim:
            raise ConfigError(f"model.image_embed_dim ({self.stage.image_embed_dim}) differs from "
                              f"the CLIP's embedding width ({self.clip.config.projection_dim}); "
                              f"set --config.model.image_embed_dim="
                              f"{self.clip.config.projection_dim}")
        boxed = jax.eval_shape(lambda: init_clip(self.clip.config, jax.random.key(0)))
        self.clip_shardings = logical_shardings(boxed, self.mesh, self.rules)
        self.clip_params = (jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=s),
            self.clip.params, self.clip_shardings) if self.abstract
            else jax.device_put(self.clip.params, self.clip_shardings))

    def image_embed(self, clip_params, images):
        """Frozen CLIP inside the step: [B, S, S, 3] images in [-1, 1] -> [B, P] (no gradient)."""
        return jax.lax.stop_gradient(
            self.clip.image_embeds(clip_params, (images + 1.0) / 2.0).astype(jnp.float32))

    def abstract_batch(self, text_cache: bool = False) -> dict:
        """A global batch as `jax.ShapeDtypeStruct`s sharded like `to_global_array`'s: images
        (and low-res inputs) and token ids + mask, or cached embeddings with `text_cache`."""
        c, L, b = self.unet_cfg, self.encoder.max_length, self.cfg.train.batch_size
        axes = tuple(a for a in ("data", "fsdp") if a in self.mesh.axis_names)
        sh = NamedSharding(self.mesh, P(axes))
        size = c.crop_size or c.image_size
        shapes = {"image": ((b, size, size, c.channels), jnp.float32)}
        if self.is_sr:
            low = size if self.host_upsamples_lowres else size * c.lowres_size // c.image_size
            shapes["lowres"] = ((b, low, low, c.channels), jnp.float32)
        if text_cache:  # the cache stores bfloat16 embeddings
            shapes.update(text_emb=((b, L, c.text_dim), jnp.bfloat16), text_mask=((b, L), bool))
        else:
            shapes.update(ids=((b, L), jnp.int32), mask=((b, L), bool))
        return {k: jax.ShapeDtypeStruct(s, d, sharding=sh) for k, (s, d) in shapes.items()}

    def init_state(self, seed: int) -> TrainState:
        """A fresh, sharded train state (created in place on the devices)."""
        if self.abstract:
            raise ValueError("an abstract Trainer has no device state: lower its step with "
                             "lower_step(trainer.abstract_state, trainer.abstract_batch(), ...)")
        with self._context():
            # rbg keys compile ~3x faster than threefry for a many-parameter init.
            return self._jit_init(jax.random.key(seed, impl="rbg"))

    def init_state_from(self, path: str, seed: int) -> TrainState:
        """A fresh train state whose params and EMA params are those of an exported model.

        `path` is a stage export (params.safetensors + config.json) or a training workdir with
        one in export/. The optimizer, step and EMA warm-up start afresh (fine-tuning); the
        model's objective, loss and schedule may differ from the source run's, its shapes may not.
        With `train.init_from_allow_new`, params the export lacks (a layer added to the model,
        e.g. a zero-initialised `model.text_conv`) keep this model's initialisation, and a
        narrower text_conv kernel is widened: centred, with zero outer taps, so the model
        computes what the export did. The unCLIP image-embedding projections (`image_proj`,
        `image_tokens`: an Imagen base made into an unCLIP decoder) start at zero instead: the
        decoder starts from the base with the embedding changing nothing (its 4 context tokens
        are zero vectors, which cross-attention still reads, so the base's function moves a
        little), and the projections get gradients through their LayerNormed input.
        """
        from jaxt2i.checkpoint import flatten, load_exported, unflatten

        try:
            export_dir = resolve_export_dir(path)
        except ConfigError as e:
            raise ConfigError(f"train.init_from: {e}") from None
        loaded, _, step = load_exported(export_dir)
        state = self.init_state(seed)
        got = flatten(loaded)
        # LoRA: the export is the frozen base; the adapters keep their init (B = 0)
        base = state.params["base"] if self.lora else state.params
        missing, widened = fit_exported(
            {n: tuple(a.shape) for n, a in flatten(base).items()},
            {n: tuple(a.shape) for n, a in got.items()},
            allow_new=bool(self.cfg.train.get("init_from_allow_new", False)),
            what=f"train.init_from={path!r}")

        def place(a, target):
            a = np.asarray(a, target.dtype)
            if a.shape != target.shape:  # a narrower text_conv kernel, centred; the outer
                out = np.zeros(target.shape, target.dtype)  # taps zero, as the layer's init
                off = (out.shape[0] - a.shape[0]) // 2
                out[off:off + a.shape[0]] = a
                a = out
            return jax.make_array_from_callback(a.shape, target.sharding, lambda idx: a[idx])

        zeroed = [n for n in missing if _starts_at_zero(n)]

        def fill(tree):  # the export's values; this model's own for params it lacks
            return unflatten({n: place(got[n], a) if n in got else
                              place(np.zeros(a.shape), a) if n in zeroed else a
                              for n, a in flatten(tree).items()})

        if self.lora:  # the EMA holds the adapters alone: their init
            params, ema = {**state.params, "base": fill(state.params["base"])}, state.ema_params
        else:
            params, ema = fill(state.params), fill(state.ema_params)
        kept = [n for n in missing if n not in zeroed]
        log.warning("initialised params and EMA from %s (step %s)%s%s%s", path, step,
                    f"; {len(kept)} new params keep their initialisation: "
                    f"{', '.join(kept)}" if kept else "",
                    f"; {len(zeroed)} new image-embedding projections start at zero: "
                    f"{', '.join(zeroed)}" if zeroed else "",
                    f"; widened (centred, new taps zero): {', '.join(widened)}" if widened else "")
        return state.replace(params=params, ema_params=ema)

    def _context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    # ------------------------------------------------------------------------------ step
    def encode_text(self, text_params, ids, mask):
        """Frozen T5 inside the step: [B, L] ids -> [B, L, D] float32 (no gradient)."""
        return jax.lax.stop_gradient(self.stage.encode_text(text_params, ids, mask)[0])

    def _loss(self, params, batch, text_params, rng, clip_params=None):
        cfg = self.cfg
        drop_rng, aug_rng, loss_rng = jax.random.split(rng, 3)
        if "text_emb" in batch:
            emb, mask = batch["text_emb"].astype(jnp.float32), batch["text_mask"].astype(bool)
        else:
            mask = batch["mask"].astype(bool)
            emb = self.encode_text(text_params, batch["ids"], mask)
        u_emb = self.encode_text(text_params, self.uncond_ids, self.uncond_mask)
        if self.clip is not None:  # unCLIP decoder: caption and image embedding dropped apart
            emb, mask, z = drop_decoder_conditions(
                drop_rng, emb, mask, self.image_embed(clip_params, batch["image"]),
                text_drop=cfg.diffusion.cond_drop_prob, image_drop=cfg.diffusion.image_drop_prob,
                null_text=(u_emb, self.uncond_mask))
            cond = {"text_emb": emb, "text_mask": mask, "image_embed": z}
        else:
            cond, _ = diffusion.drop_condition(
                drop_rng, {"text_emb": emb, "text_mask": mask},
                {"text_emb": u_emb, "text_mask": self.uncond_mask}, cfg.diffusion.cond_drop_prob)
        if self.is_sr:
            low, level = self.stage.augment(aug_rng, batch["lowres"],
                                            max_level=cfg.diffusion.aug_max_level,
                                            size=batch["image"].shape[1])
            cond["lowres"], cond["aug_level"] = low, level
        params = lora_lib.network_params(params, self.lora)
        if self.stage.learned_variance:  # IF: eps + variance, the hybrid loss
            return jnp.mean(hybrid_loss(
                lambda x_t, t, c: self.stage.network_output(params, x_t, t, c), batch["image"],
                cond, loss_rng, schedule=self.schedule, weighting=cfg.diffusion.loss_weighting,
                gamma=cfg.diffusion.min_snr_gamma,
                vlb_weight=cfg.diffusion.get("vlb_weight", VLB_WEIGHT)))
        per_example = diffusion.diffusion_loss(
            self.stage.denoiser(params), batch["image"], cond, loss_rng, schedule=self.schedule,
            objective=self.unet_cfg.objective, weighting=cfg.diffusion.loss_weighting,
            gamma=cfg.diffusion.min_snr_gamma)
        return jnp.mean(per_example)

    def _train_step(self, state: TrainState, batch: dict, text_params, root_rng, iteration,
                    clip_params=None):
        k = self.cfg.train.grad_accum
        rng = jax.random.fold_in(root_rng, iteration)
        grad_fn = jax.value_and_grad(self._loss)
        if k == 1:
            loss, grads = grad_fn(state.params, batch, text_params, rng, clip_params)
        else:
            micro = jax.tree_util.tree_map(lambda x: x.reshape((k, -1) + x.shape[1:]), batch)
            # A LoRA run accumulates its adapters' gradients only: the frozen base's are zero
            # (stop-gradded), and a full-size accumulator would be carried through the loop.
            trained = (lambda g: g["lora"]) if self.lora else (lambda g: g)

            def body(carry, xs):
                mb, i = xs
                loss_i, g_i = grad_fn(state.params, mb, text_params, jax.random.fold_in(rng, i),
                                      clip_params)
                acc_loss, acc_g = carry
                return (acc_loss + loss_i / k,
                        jax.tree_util.tree_map(lambda a, g: a + g / k, acc_g, trained(g_i))), None

            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            (loss, acc), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), trained(zeros)),
                                          (micro, jnp.arange(k)))
            grads = {**zeros, "lora": acc} if self.lora else acc
        new_state, gnorm = apply_gradients(state, grads, loss, self.tx, self.cfg.train.ema_decay,
                                           self.trainable)
        metrics = {"loss": loss, "grad_norm": gnorm, "skipped": new_state.skipped,
                   "total_skipped": new_state.total_skipped}
        return new_state, metrics

    def _compile(self) -> None:
        self._jit_init = jax.jit(self._init_state, out_shardings=self.state_shardings)
        self._jit_step = jax.jit(
            self._train_step,
            in_shardings=(self.state_shardings, None, self.text_shardings, self.replicated,
                          self.replicated, self.clip_shardings),
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=(0,))

    def step(self, state, batch, rng, iteration: int):
        """One update (jitted once; same shapes never recompile); rng = fold_in(rng, iteration)."""
        with self._context():
            return self._jit_step(state, batch, self.text_params, rng,
                                  jnp.asarray(iteration, jnp.int32), self.clip_params)

    def step_args(self, state, batch, rng, iteration) -> tuple:
        """The jitted train step's full arguments (the frozen encoders' params included): what
        `lower_step(...).compile()` is called with."""
        return state, batch, self.text_params, rng, iteration, self.clip_params

    def lower_step(self, state, batch, rng, iteration):
        """The jitted train step lowered for these (concrete or abstract, sharded) arguments:
        `.compile()` it for `memory_analysis()` / `cost_analysis()`, or call the result with
        `step_args(...)`."""
        with self._context():
            return self._jit_step.lower(*self.step_args(state, batch, rng, iteration))

    def step_jaxpr(self, state, batch, rng, iteration):
        """The train step's jaxpr for these arguments (analytic FLOP counts)."""
        with self._context():
            return jax.make_jaxpr(self._train_step)(*self.step_args(state, batch, rng, iteration))

    # --------------------------------------------------------------------------- samples
    def sample(self, params, prompts, rng, lowres=None, steps=None, image_embed=None):
        """Samples images for `prompts` with the config's sampler (and `lowres` for SR,
        `image_embed` [B, P] for an unCLIP decoder)."""
        ids, mask = self.encoder.tokenizer(list(prompts))
        if not hasattr(self, "_jit_sample"):
            self._jit_sample = jax.jit(self._sample, static_argnames=("steps",))
        with self._context():
            return self._jit_sample(params, self.text_params, jnp.asarray(ids),
                                    jnp.asarray(mask), rng, lowres, image_embed,
                                    steps=steps or self.cfg.sample.steps)

    def _sample(self, params, text_params, ids, mask, rng, lowres, image_embed, steps):
        params = lora_lib.network_params(params, self.lora)
        text = self.stage.encode_text(text_params, ids, mask)  # [B, L, D]
        uncond = self.stage.encode_text(text_params, self.uncond_ids, self.uncond_mask)
        return self.stage.sample(params, text, uncond, rng, lowres, image_embed=image_embed,
                                 settings=self.stage.config.sample.replace(steps=steps))
