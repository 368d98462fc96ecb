"""`python -m jaxt2i.train`: train one cascade stage (base or super-resolution).

    python -m jaxt2i.train --config=configs/base.py:size=demo --workdir=runs/base

The same code runs on 1 CPU, simulated devices, a GPU node or a TPU pod: the mesh and the
logical-axis rules come from the config, the state is created sharded (`jax.eval_shape` +
jitted init with `out_shardings`), and one jitted `train_step` with donated state does
everything per step: frozen T5 on the token ids (or cached embeddings), condition dropout,
noise-conditioning augmentation (SR), the diffusion loss, gradient accumulation, the optimizer,
EMA, and skipping of non-finite updates. Orbax checkpoints hold the state, the data iterator
position and the config; SIGTERM saves at the next step boundary and exits 0.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxt2i import diffusion
from jaxt2i.checkpoint import Checkpointer, export_params, host_gather
from jaxt2i.config import ConfigError, to_json, validate
from jaxt2i.images import save_grid, to_uint8
from jaxt2i.models.unet import UNetConfig
from jaxt2i.monitor import MetricWriter, StopSignal
from jaxt2i.parallel import initialize_distributed, logical_shardings, make_mesh
from jaxt2i.parallel.sharding import rules_from_config
from jaxt2i.stage import Stage, StageConfig, load_text_encoder, resolve_export_dir
from jaxt2i.text.tokenizer import UnknownTextError
from jaxt2i.train_state import TrainState, apply_gradients, create_train_state, make_optimizer
from jaxt2i.workdir import WorkdirLock, check_writable, disk_error, quiet_disk_errors

log = logging.getLogger("jaxt2i")
# Steps dispatched ahead of the oldest loss the loop reads: the host prepares the next batch
# while the device works, and at most this many steps' batches are queued on the device.
_IN_FLIGHT = 2


class TrainingStopped(RuntimeError):
    """Raised when training cannot go on (e.g. too many non-finite updates in a row)."""


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


class Trainer:
    """Holds the compiled pieces of one stage's training: its `Stage`, mesh, step functions."""

    def __init__(self, cfg: ml_collections.ConfigDict, encoder=None, devices=None):
        validate(cfg)
        self.cfg = cfg
        stage_cfg = StageConfig.from_dict(cfg.to_dict(), where="--config")
        self.unet_cfg = stage_cfg.model
        self.is_sr = self.unet_cfg.is_sr
        try:
            self.mesh = make_mesh(dict(cfg.mesh), devices)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _check_batch(cfg, self.mesh)
        self.rules = rules_from_config(cfg.sharding_rules)
        self.tx = make_optimizer(cfg.train)
        self.stage = Stage(stage_cfg)
        self.schedule = self.stage.schedule
        if self.schedule.is_discrete and self.unet_cfg.noise_scale != 1:
            raise ConfigError(
                f"diffusion.schedule={cfg.diffusion.schedule!r} feeds integer timesteps 0..N-1 "
                f"to the model, but model.noise_scale={self.unet_cfg.noise_scale:g} is for "
                "continuous t in [0, 1]: set --config.model.noise_scale=1")
        self.encoder = encoder if encoder is not None else load_text_encoder(stage_cfg.text)
        self.stage.encoder = self.encoder
        if self.encoder.config.d_model != self.unet_cfg.text_dim:
            raise ConfigError(
                f"the text encoder's width ({self.encoder.config.d_model}) differs from "
                f"model.text_dim ({self.unet_cfg.text_dim}); set --config.model.text_dim="
                f"{self.encoder.config.d_model}")
        self.replicated = NamedSharding(self.mesh, P())
        self._build_state_shardings()
        self._place_text_encoder()
        self._compile()

    # ----------------------------------------------------------------------------- state
    def _init_params(self, rng):
        return self.stage.init_params(rng)

    def _init_state(self, rng) -> TrainState:
        return create_train_state(nn.unbox(self._init_params(rng)), self.tx)

    def _build_state_shardings(self) -> None:
        boxed = jax.eval_shape(self._init_params, jax.random.key(0))
        param_sh = logical_shardings(boxed, self.mesh, self.rules)
        abstract = jax.eval_shape(self._init_state, jax.random.key(0))
        # Optimizer leaves shaped like their parameter (Adam moments) share its sharding;
        # others (Adafactor's factored row/column statistics, counters) are small: replicate.
        opt_sh = optax.tree_map_params(
            self.tx, lambda leaf, sh, p: sh if leaf.shape == p.shape else self.replicated,
            abstract.opt_state, param_sh, abstract.params,
            transform_non_params=lambda _: self.replicated)
        self.state_shardings = TrainState(
            step=self.replicated, params=param_sh, ema_params=param_sh, opt_state=opt_sh,
            skipped=self.replicated, total_skipped=self.replicated)
        self.abstract_state = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract, self.state_shardings)
        self.num_params = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(abstract.params))

    def _place_text_encoder(self) -> None:
        enc = self.encoder
        L = enc.max_length
        boxed = jax.eval_shape(lambda: enc.module.init(
            jax.random.key(0), jnp.zeros((1, L), jnp.int32), jnp.ones((1, L), bool)))["params"]
        self.text_shardings = logical_shardings(boxed, self.mesh, self.rules)
        self.text_params = jax.device_put(enc.params, self.text_shardings)
        ids, mask = enc.tokenizer([""])
        self.uncond_ids = jax.device_put(jnp.asarray(ids), self.replicated)
        self.uncond_mask = jax.device_put(jnp.asarray(mask), self.replicated)

    def init_state(self, seed: int) -> TrainState:
        """A fresh, sharded train state (created in place on the devices)."""
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
        computes what the export did.
        """
        from jaxt2i.checkpoint import flatten, load_exported, unflatten

        try:
            export_dir = resolve_export_dir(path)
        except ConfigError as e:
            raise ConfigError(f"train.init_from: {e}") from None
        loaded, _, step = load_exported(export_dir)
        state = self.init_state(seed)
        want, got = flatten(state.params), flatten(loaded)
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        allow_new = bool(self.cfg.train.get("init_from_allow_new", False))
        if extra or (missing and not allow_new):
            hint = ("use the source run's model config" if extra else
                    "use the source run's model config, or set train.init_from_allow_new=True "
                    "to keep the new params at their initialisation")
            raise ConfigError(
                f"train.init_from={path!r} does not fit this model: "
                f"{len(missing)} params missing (first: {missing[:1]}), {len(extra)} unexpected "
                f"(first: {extra[:1]}); {hint}")
        widened = []
        for name, a in want.items():
            if name not in got or tuple(got[name].shape) == tuple(a.shape):
                continue
            widens = _widens_text_conv(name, got[name].shape, a.shape)
            if widens and allow_new:
                widened.append(name)
                continue
            hint = ("; set train.init_from_allow_new=True to widen it (its new taps start at "
                    "zero)" if widens else "; use the source run's model config")
            raise ConfigError(
                f"train.init_from={path!r}: param {name} has shape {tuple(got[name].shape)} "
                f"but this model's is {tuple(a.shape)}{hint}")

        def place(a, target):
            a = np.asarray(a, target.dtype)
            return jax.make_array_from_callback(a.shape, target.sharding, lambda idx: a[idx])

        def widen(src, target):  # a narrower text_conv kernel, centred; outer taps zero as
            out = np.zeros(target.shape, target.dtype)  # the layer's own init (host-local)
            off = (out.shape[0] - src.shape[0]) // 2
            out[off:off + src.shape[0]] = np.asarray(src, out.dtype)
            return out

        def fill(tree):  # the export's values; this model's own for params it lacks
            return unflatten({n: a if n not in got else
                              place(widen(got[n], a) if n in widened else got[n], a)
                              for n, a in flatten(tree).items()})

        params, ema = fill(state.params), fill(state.ema_params)
        log.warning("initialised params and EMA from %s (step %s)%s%s", path, step,
                    f"; {len(missing)} new params keep their initialisation: "
                    f"{', '.join(missing)}" if missing else "",
                    f"; widened (centred, new taps zero): {', '.join(widened)}" if widened else "")
        return state.replace(params=params, ema_params=ema)

    def _context(self):
        import contextlib

        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    # ------------------------------------------------------------------------------ step
    def encode_text(self, text_params, ids, mask):
        """Frozen T5 inside the step: [B, L] ids -> [B, L, D] float32 (no gradient)."""
        return jax.lax.stop_gradient(self.stage.encode_text(text_params, ids, mask)[0])

    def _loss(self, params, batch, text_params, rng):
        cfg = self.cfg
        drop_rng, aug_rng, loss_rng = jax.random.split(rng, 3)
        if "text_emb" in batch:
            emb, mask = batch["text_emb"].astype(jnp.float32), batch["text_mask"].astype(bool)
        else:
            mask = batch["mask"].astype(bool)
            emb = self.encode_text(text_params, batch["ids"], mask)
        u_emb = self.encode_text(text_params, self.uncond_ids, self.uncond_mask)
        cond, _ = diffusion.drop_condition(
            drop_rng, {"text_emb": emb, "text_mask": mask},
            {"text_emb": u_emb, "text_mask": self.uncond_mask}, cfg.diffusion.cond_drop_prob)
        if self.is_sr:
            low, level = self.stage.augment(aug_rng, batch["lowres"],
                                            max_level=cfg.diffusion.aug_max_level)
            cond["lowres"], cond["aug_level"] = low, level
        per_example = diffusion.diffusion_loss(
            self.stage.denoiser(params), batch["image"], cond, loss_rng, schedule=self.schedule,
            objective=self.unet_cfg.objective, weighting=cfg.diffusion.loss_weighting,
            gamma=cfg.diffusion.min_snr_gamma)
        return jnp.mean(per_example)

    def _train_step(self, state: TrainState, batch: dict, text_params, root_rng, iteration):
        k = self.cfg.train.grad_accum
        rng = jax.random.fold_in(root_rng, iteration)
        grad_fn = jax.value_and_grad(self._loss)
        if k == 1:
            loss, grads = grad_fn(state.params, batch, text_params, rng)
        else:
            micro = jax.tree_util.tree_map(lambda x: x.reshape((k, -1) + x.shape[1:]), batch)

            def body(carry, xs):
                mb, i = xs
                loss_i, g_i = grad_fn(state.params, mb, text_params, jax.random.fold_in(rng, i))
                acc_loss, acc_g = carry
                return (acc_loss + loss_i / k,
                        jax.tree_util.tree_map(lambda a, g: a + g / k, acc_g, g_i)), None

            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                            (micro, jnp.arange(k)))
        new_state, gnorm = apply_gradients(state, grads, loss, self.tx, self.cfg.train.ema_decay)
        metrics = {"loss": loss, "grad_norm": gnorm, "skipped": new_state.skipped,
                   "total_skipped": new_state.total_skipped}
        return new_state, metrics

    def _compile(self) -> None:
        self._jit_init = jax.jit(self._init_state, out_shardings=self.state_shardings)
        self._jit_step = jax.jit(
            self._train_step,
            in_shardings=(self.state_shardings, None, self.text_shardings, self.replicated,
                          self.replicated),
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=(0,))

    def step(self, state, batch, rng, iteration: int):
        """One update (jitted once; same shapes never recompile); rng = fold_in(rng, iteration)."""
        with self._context():
            return self._jit_step(state, batch, self.text_params, rng,
                                  jnp.asarray(iteration, jnp.int32))

    def lower_step(self, state, batch, rng, iteration):
        """The jitted train step lowered for these (concrete or abstract, sharded) arguments:
        `.compile()` it for `memory_analysis()` / `cost_analysis()`, or call the result."""
        with self._context():
            return self._jit_step.lower(state, batch, self.text_params, rng, iteration)

    def step_jaxpr(self, state, batch, rng, iteration):
        """The train step's jaxpr for these arguments (analytic FLOP counts)."""
        with self._context():
            return jax.make_jaxpr(self._train_step)(state, batch, self.text_params, rng,
                                                     iteration)

    # --------------------------------------------------------------------------- samples
    def sample(self, params, prompts, rng, lowres=None, steps=None):
        """Samples images for `prompts` with the config's sampler (and `lowres` for SR)."""
        ids, mask = self.encoder.tokenizer(list(prompts))
        if not hasattr(self, "_jit_sample"):
            self._jit_sample = jax.jit(self._sample, static_argnames=("steps",))
        with self._context():
            return self._jit_sample(params, self.text_params, jnp.asarray(ids),
                                    jnp.asarray(mask), rng, lowres, steps=steps or self.cfg.sample.steps)

    def _sample(self, params, text_params, ids, mask, rng, lowres, steps):
        text = self.stage.encode_text(text_params, ids, mask)  # [B, L, D]
        uncond = self.stage.encode_text(text_params, self.uncond_ids, self.uncond_mask)
        return self.stage.sample(params, text, uncond, rng, lowres,
                                 settings=self.stage.config.sample.replace(steps=steps))


def _source(trainer: Trainer, cfg):
    """The run's data source: the on-the-fly shapes world or the data directory named."""
    source = cfg.data.source
    kinds = cfg.data.get("shapes_kinds", "")
    if kinds and source != "shapes":
        raise ConfigError(f"data.shapes_kinds={kinds!r} applies only to data.source='shapes' "
                          f"(not {source!r}); unset it")
    if kinds and cfg.text.cache:
        raise ConfigError(f"data.shapes_kinds={kinds!r} changes the shapes captions, so the text "
                          f"cache {cfg.text.cache!r} (built from the default mix) cannot serve "
                          f"them; unset text.cache")
    if source == "shapes":
        from jaxt2i.data.shapes import ShapesSource

        return ShapesSource(trainer.unet_cfg.image_size, cfg.data.num_examples, cfg.data.split,
                            cfg.data.seed, kinds=kinds or None)
    return source


def _pipeline(trainer: Trainer, cfg):
    from jaxt2i.data import pipeline as data_pipeline

    c = trainer.unet_cfg
    try:
        return data_pipeline.make_pipeline(
            _source(trainer, cfg), resolution=c.image_size, batch_size=cfg.train.batch_size,
            seed=cfg.data.seed, lowres=c.lowres_size or None, random_crop=cfg.data.random_crop,
            text_cache=cfg.text.cache or None, worker_count=cfg.data.worker_count,
            tokenizer=None if cfg.text.cache else trainer.encoder.tokenizer,
            split=cfg.data.split)
    except (FileNotFoundError, ValueError) as e:  # a user's data / cache path or size
        raise ConfigError(f"data: {e}") from None


def _preview_inputs(trainer: Trainer, cfg) -> tuple[list[str], Any]:
    """What the sample grids show: a base stage samples `train.sample_prompts`; an SR stage
    upsamples the first examples of the run's own data (their captions and low-res inputs, as
    its input pipeline makes them), so the grid shows the data it learns from."""
    from jaxt2i.data import pipeline as data_pipeline

    prompts = list(cfg.train.sample_prompts)
    if not trainer.is_sr:
        return prompts, None
    c = trainer.unet_cfg
    try:
        with data_pipeline.make_pipeline(
                _source(trainer, cfg), resolution=c.image_size, batch_size=len(prompts),
                seed=cfg.data.seed, lowres=c.lowres_size, shuffle=False, process_index=0,
                process_count=1, split=cfg.data.split) as preview:
            batch = next(preview)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data: {e}") from None
    return [str(t) for t in batch["caption"]], jnp.asarray(batch["lowres"])


def _host_batch(trainer: Trainer, local: dict) -> dict:
    """Host-side preparation: the model's inputs, cropped for crop-trained SR stages."""
    out = {"image": local["image"]}
    if "lowres" in local:
        out["lowres"] = local["lowres"]
    c = trainer.unet_cfg
    if c.crop_size and c.crop_size < c.image_size:
        out = _random_crop_pair(out, c, np.asarray(local["index"]), trainer.cfg.data.seed)
    if "text_emb" in local:
        out["text_emb"], out["text_mask"] = local["text_emb"], local["text_mask"]
    else:  # tokenized by the input pipeline (in its workers, if any)
        out["ids"], out["mask"] = local["ids"], local["mask"]
    return out


def _random_crop_pair(batch: dict, c: UNetConfig, index: np.ndarray, seed: int) -> dict:
    """Aligned random crops of each high-res image and its low-res input (the 1024 stage).

    The crop of example `i` depends only on (seed, i), so resumed runs see the same crops.
    """
    scale = c.image_size // c.lowres_size
    low_crop = c.crop_size // scale
    images, lows = [], []
    for n, i in enumerate(index):
        y, x = np.random.default_rng([seed, int(i)]).integers(0, c.lowres_size - low_crop + 1, 2)
        images.append(batch["image"][n, y * scale:y * scale + c.crop_size,
                                     x * scale:x * scale + c.crop_size])
        lows.append(batch["lowres"][n, y:y + low_crop, x:x + low_crop])
    return {**batch, "image": np.stack(images), "lowres": np.stack(lows)}


def train(cfg: ml_collections.ConfigDict, workdir: str, *, encoder=None, devices=None,
          progress: bool | None = None) -> dict:
    """Trains one stage until `cfg.train.num_steps` updates (resuming from `workdir`).

    Args:
      cfg: a stage config (configs/base.py or configs/sr.py).
      workdir: run directory: checkpoints/, metrics.jsonl, tensorboard/, samples/, export/.
      encoder: an already loaded text encoder (tests); default: the config's.
      devices: devices of the mesh (default: all devices of all processes).
      progress: show a tqdm bar (default: when stderr is a terminal).

    Returns:
      Summary dict: final step, last loss, losses per step, stop reason.
    """
    validate(cfg)  # bad values are refused before the workdir is touched
    lock = None
    if jax.process_index() == 0:  # one lock per run, held by process 0 of a multi-host run
        check_writable(workdir, "--workdir")
        lock = WorkdirLock(workdir, log=log.warning).acquire()
    try:
        with quiet_disk_errors():
            return _train_locked(cfg, workdir, encoder, devices, progress)
    except Exception as e:
        why = disk_error(e)
        if why is None:
            raise
        steps = _saved_steps(workdir)
        raise TrainingStopped(
            f"cannot write to {os.path.abspath(workdir)}: {why}; "
            + (f"the newest saved checkpoint (step {steps[-1]}) is intact" if steps else
               "no checkpoint was saved yet")
            + "; free space (or fix the permissions) and rerun the same command to resume"
        ) from None
    finally:
        if lock is not None:
            lock.release()


def _saved_steps(workdir: str) -> list[int]:
    """Steps of the complete checkpoints on disk (Orbax renames a step into place when done)."""
    root = os.path.join(workdir, "checkpoints")
    try:
        return sorted(int(d) for d in os.listdir(root) if d.isdigit())
    except OSError:
        return []


@dataclasses.dataclass(frozen=True)
class Cadence:
    """When the training loop logs, saves and samples: a pure function of the step count.

    Attributes:
      num_steps: the run's last step.
      log_every: log metrics (and check for non-finite updates) every this many steps.
      save_every: checkpoint every this many steps (0: only at the end).
      sample_every: write a sample grid every this many steps (0: only at the end).
    """

    num_steps: int
    log_every: int
    save_every: int = 0
    sample_every: int = 0

    @classmethod
    def from_config(cls, train_cfg) -> "Cadence":
        return cls(int(train_cfg.num_steps), int(train_cfg.log_every),
                   int(train_cfg.save_every), int(train_cfg.sample_every))

    def after_step(self, step: int, *, stopping: bool = False) -> tuple[str, ...]:
        """The actions due once `step` updates are done, in order: 'log'; then 'stop' (save
        and leave the loop) when a stop was requested, else 'save' and 'sample' when due."""
        actions = []
        if stopping or step >= self.num_steps or step % max(self.log_every, 1) == 0:
            actions.append("log")
        if stopping:
            return (*actions, "stop")
        if self.save_every and step % self.save_every == 0:
            actions.append("save")
        if self.sample_every and step % self.sample_every == 0:
            actions.append("sample")
        return tuple(actions)

    def at_end(self, step: int, *, saved_at: int | None, stopped: bool) -> tuple[str, ...]:
        """After the loop: 'save' unless step was just saved; a finished run (not stopped by a
        signal) also writes its final 'sample' grid and its 'export'."""
        actions = [] if saved_at == step else ["save"]
        return tuple(actions) if stopped else (*actions, "sample", "export")


class _Reporter:
    """Turns the metrics of logged steps into metrics.jsonl / TensorBoard rows and a line on
    the console (or the tqdm bar): rates are over the steps since the previous log."""

    def __init__(self, writer, bar, batch_size: int, num_steps: int):
        self.writer, self.bar = writer, bar
        self.batch_size, self.num_steps = batch_size, num_steps
        self.t_last, self.data_wait, self.steps = time.perf_counter(), 0.0, 0

    def stepped(self, data_wait: float) -> None:
        self.steps += 1
        self.data_wait += data_wait
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, m: dict) -> None:
        n = max(self.steps, 1)
        dt = time.perf_counter() - self.t_last
        line = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                "images_per_s": n * self.batch_size / dt, "step_time_s": dt / n,
                "data_wait_s": self.data_wait / n, "skipped_total": int(m["total_skipped"])}
        self.writer.scalars(step, line)
        msg = (f"loss {line['loss']:.4f} {line['images_per_s']:.1f} img/s "
               f"step {line['step_time_s'] * 1e3:.0f} ms data {line['data_wait_s'] * 1e3:.0f} ms")
        if self.bar is not None:
            self.bar.set_postfix_str(msg)
        elif jax.process_index() == 0:
            print(f"step {step}/{self.num_steps} {msg}", flush=True)
        self.t_last, self.data_wait, self.steps = time.perf_counter(), 0.0, 0


def _next_batch(trainer: Trainer, data) -> tuple[dict, float]:
    """The next global batch and the seconds spent waiting for it."""
    from jaxt2i.data.pipeline import to_global_array

    t0 = time.perf_counter()
    try:
        local = next(data)
    except UnknownTextError as e:  # a caption the closed-vocabulary encoder cannot read
        raise ConfigError(f"data: {e}; use a real T5 (text.encoder) for such captions") from None
    batch = to_global_array(_host_batch(trainer, local), trainer.mesh)
    return batch, time.perf_counter() - t0


def _train_locked(cfg, workdir: str, encoder, devices, progress) -> dict:
    trainer = Trainer(cfg, encoder, devices)
    tc = cfg.train
    ckpt = Checkpointer(workdir, max_to_keep=tc.keep_checkpoints)
    config_dict = json.loads(to_json(cfg))
    # Checked before anything is written: a checkpoint of another model stops the run here.
    restored = ckpt.restore(trainer.abstract_state, config_dict)
    if jax.process_index() == 0:
        tmp = os.path.join(workdir, "config.json.tmp")
        with open(tmp, "w") as f:
            f.write(to_json(cfg))
        os.replace(tmp, os.path.join(workdir, "config.json"))
    data = _pipeline(trainer, cfg)
    preview = _preview_inputs(trainer, cfg)
    if restored is not None:
        it, state, data_state, _ = restored
        if data_state:
            data.set_state(data_state)
        log.warning("resumed from %s at step %d", ckpt.directory, it)
    elif tc.get("init_from"):
        it, state = 0, trainer.init_state_from(tc.init_from, tc.seed)
    else:
        it, state = 0, trainer.init_state(tc.seed)
    root_rng = jax.random.key(tc.seed + 1)
    writer = MetricWriter(workdir)
    log.warning("training %s stage: %s U-Net, %.2fM params, mesh %s, batch %d, steps %d..%d",
                "sr" if trainer.is_sr else "base", cfg.model_size, trainer.num_params / 1e6,
                dict(trainer.mesh.shape), tc.batch_size, it, tc.num_steps)
    show_bar = progress if progress is not None else sys.stderr.isatty()
    bar = None
    if show_bar and jax.process_index() == 0:
        from tqdm import tqdm

        bar = tqdm(total=tc.num_steps, initial=it, unit="step", dynamic_ncols=True)
    cadence = Cadence.from_config(tc)
    report = _Reporter(writer, bar, tc.batch_size, tc.num_steps)
    reason, failed, saved_at, metrics = "finished", False, None, None
    in_flight = collections.deque()  # losses of dispatched steps not known to be done
    with StopSignal() as stop:
        while it < tc.num_steps:
            batch, wait = _next_batch(trainer, data)
            state, metrics = trainer.step(state, batch, root_rng, it)
            in_flight.append(metrics["loss"])
            if len(in_flight) > _IN_FLIGHT:  # the host prepares the next batch while the
                jax.block_until_ready(in_flight.popleft())  # device works, never further ahead
            it += 1
            report.stepped(wait)
            actions = cadence.after_step(it, stopping=bool(stop.requested))
            if "log" in actions:
                m = jax.device_get(metrics)
                if int(m["skipped"]) >= tc.max_skipped:
                    reason = (f"stopped: {int(m['skipped'])} non-finite updates in a row "
                              f"(train.max_skipped={tc.max_skipped}); the last good checkpoint "
                              f"in {ckpt.directory} is intact; lower train.lr or check the data")
                    failed = True
                    break
                report.log(it, m)
            if "stop" in actions:
                ckpt.save(it, state, data.get_state(), config_dict, force=True)
                saved_at = it
                reason = f"stopped by {stop.requested}: checkpoint saved at step {it}"
                break
            if "save" in actions:
                ckpt.save(it, state, data.get_state(), config_dict)
                saved_at = it
            if "sample" in actions:
                _write_samples(trainer, state, it, workdir, writer, preview)
        if saved_at != it and it in ckpt.all_steps():  # resumed at the last step
            saved_at = it
        end = () if failed else cadence.at_end(it, saved_at=saved_at,
                                               stopped=bool(stop.requested))
        if "save" in end:
            ckpt.save(it, state, data.get_state(), config_dict, force=True)
        ckpt.wait()
    if bar is not None:
        bar.close()
    if "sample" in end:
        _write_samples(trainer, state, it, workdir, writer, preview)
    if "export" in end:
        export_params(state.ema_params, config_dict, os.path.join(workdir, "export"), step=it)
    writer.close()
    ckpt.close()
    data.close()
    if failed:
        raise TrainingStopped(reason)
    if jax.process_index() == 0:
        print(reason if stop.requested else f"finished at step {it}: {workdir}", flush=True)
    last_loss = float(jax.device_get(metrics)["loss"]) if metrics is not None else None
    return {"step": it, "reason": reason, "last_loss": last_loss}


def _write_samples(trainer: Trainer, state, step: int, workdir: str, writer, preview) -> None:
    """A grid of EMA samples of the preview prompts (SR: of the preview low-res inputs)."""
    prompts, lowres = preview
    images = trainer.sample(state.ema_params, prompts, jax.random.key(trainer.cfg.train.seed + 2),
                            lowres)
    images = to_uint8(host_gather(images))
    if jax.process_index() == 0:
        grid = save_grid(images, os.path.join(workdir, "samples", f"step_{step:07d}.png"))
        writer.image(step, "samples", grid)


def main(argv) -> None:
    from absl import flags

    F = flags.FLAGS
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}")
    if not F.workdir:
        raise ConfigError("--workdir is required (where checkpoints, metrics and samples go)")
    if F.config is None:
        raise ConfigError("--config is required, e.g. --config=configs/base.py:size=demo")
    initialize_distributed(F.coordinator, F.num_processes, F.process_id)
    try:
        train(F.config, F.workdir)
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def _define_flags():
    from absl import flags

    from jaxt2i.cli import define_config_flag

    define_config_flag()
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, samples, export).")
    flags.DEFINE_string("coordinator", None, "host:port of process 0 for a multi-process run "
                        "without a cluster launcher (see launch/local_multiprocess.sh).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator).")
    flags.DEFINE_integer("process_id", None, "This process's id (with --coordinator).")


def cli() -> None:
    """Console-script entry point (`jaxt2i-train`)."""
    from jaxt2i.cli import run_app

    run_app(main, _define_flags)


if __name__ == "__main__":
    cli()
