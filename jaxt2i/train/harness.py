"""What the trainers of the models beside the cascade stages share: CLIP (`contrastive`) and
the unCLIP prior (`prior`).

`ShardedTrainer` builds the mesh, the logical-axis rules, the optimizer, the sharded train
state (`jax.eval_shape` + a jitted init with `out_shardings`) and the batch sharding over data x
fsdp; a subclass adds its jitted step. `run_training` is their loop: workdir lock, Orbax
checkpoints with the input pipeline's position (exact resume), metrics lines, evaluation every
`train.eval_every` steps and at the end, then the subclass's export. (The diffusion stages
have their own loop, `jaxt2i.train.loop`, for their text caches, sample grids and fine-tuning.)
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxt2i.checkpoint import open_run
from jaxt2i.config import ConfigError, validate
from jaxt2i.monitor import MetricWriter, StopSignal
from jaxt2i.parallel import logical_shardings, make_mesh
from jaxt2i.parallel.sharding import rules_from_config
from jaxt2i.train_state import TrainState, create_train_state, make_optimizer, state_layout
from jaxt2i.workdir import WorkdirLock, check_writable

log = logging.getLogger("jaxt2i")
# Metrics every step returns that are counters, not values to print.
_COUNTERS = ("skipped", "total_skipped")


class ShardedTrainer:
    """Mesh, rules, optimizer and sharded state of one run; subclasses add `step`.

    Attributes:
      cfg: the run's config (its `mesh`, `sharding_rules` and `train` sections are read here).
      mesh, rules, tx: the device mesh, logical-axis rules and optax optimizer.
      replicated, batch_sharding: shardings of scalars and of a batch (split over data x fsdp).
      state_shardings, abstract_state, num_params: the train state's layout (`state_layout`).
    """

    def __init__(self, cfg: ml_collections.ConfigDict, init_params: Callable, devices=None):
        """Args: cfg; init_params(key) -> boxed params (with logical axis names); devices."""
        self.cfg = cfg
        try:
            self.mesh = make_mesh(dict(cfg.mesh), devices)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        ways = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if cfg.train.batch_size % ways:
            raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be divisible by "
                              f"the data-parallel devices (data {self.mesh.shape['data']} x "
                              f"fsdp {self.mesh.shape['fsdp']} = {ways})")
        self.rules = rules_from_config(cfg.sharding_rules)
        self.tx = make_optimizer(cfg.train)
        self.replicated = NamedSharding(self.mesh, P())
        self._init_params = init_params
        self.state_shardings, self.abstract_state, self.num_params = state_layout(
            init_params, self.tx, self.mesh, self.rules)
        axes = tuple(a for a in ("data", "fsdp") if self.mesh.shape[a] > 1) or None
        self.batch_sharding = NamedSharding(self.mesh, P(axes))

    def context(self):
        """The mesh and the logical-axis rules, for tracing and running the jitted functions."""
        stack = contextlib.ExitStack()
        stack.enter_context(nn.logical_axis_rules(self.rules))
        stack.enter_context(self.mesh)
        return stack

    def init_state(self, seed: int) -> TrainState:
        """A fresh state, created sharded (never whole on one device)."""
        init = jax.jit(lambda k: create_train_state(nn.unbox(self._init_params(k)), self.tx),
                       out_shardings=self.state_shardings)
        with self.context():
            return init(jax.random.key(seed))

    def place_frozen(self, params: Any, boxed_shapes: Any) -> tuple[Any, Any]:
        """Puts a frozen model's params (plain arrays) on the mesh, sharded by the rules as
        its `boxed_shapes` (`jax.eval_shape` of its init) name their axes.

        Returns:
          (placed params, their shardings: the jitted step's in_shardings for them).
        """
        shardings = logical_shardings(boxed_shapes, self.mesh, self.rules)
        return jax.device_put(params, shardings), shardings

    def step(self, state: TrainState, batch: dict, iteration: int) -> tuple[TrainState, dict]:
        raise NotImplementedError


def locked(cfg: ml_collections.ConfigDict, workdir: str, run: Callable[[], dict]) -> dict:
    """Validates `cfg`, then runs `run()` holding the workdir's lock (process 0 takes it)."""
    validate(cfg)
    lock = None
    if jax.process_index() == 0:
        check_writable(workdir, "--workdir", urls=True)
        lock = WorkdirLock(workdir, log=log.warning).acquire()
    try:
        return run()
    finally:
        if lock is not None:
            lock.release()


def run_training(cfg: ml_collections.ConfigDict, workdir: str, trainer: ShardedTrainer, data, *,
                 what: str, evaluate: Callable[[Any, int, MetricWriter], dict],
                 export: Callable[[Any, int, dict], None]) -> dict:
    """Trains until `cfg.train.num_steps` updates, resuming from the newest checkpoint.

    Args:
      cfg, workdir: the run's config and directory (checkpoints/, metrics.jsonl, config.json).
      trainer: its state layout, `init_state` and `step(state, global batch, iteration)`.
      data: the input pipeline (`jaxt2i.data.pipeline`; its position is checkpointed).
      what: the model's name in the log.
      evaluate: (EMA params, step, writer) -> results; every `train.eval_every` steps and at
        the end of a finished run.
      export: (EMA params, step, final results) -> None, once a run finishes.

    Returns:
      {'step', 'last_loss', 'results'} (results: the final evaluation; {} if stopped).
    """
    from jaxt2i.data.pipeline import to_global_array
    from jaxt2i.train.loop import Cadence, TrainingStopped

    tc = cfg.train
    ckpt, config_dict, restored = open_run(cfg, workdir, trainer.abstract_state)
    if restored is not None:
        it, state, data_state, _ = restored
        if data_state:
            data.set_state(data_state)
        log.warning("resumed from %s at step %d", ckpt.directory, it)
    else:
        it, state = 0, trainer.init_state(tc.seed)
    writer = MetricWriter(workdir)
    log.warning("training %s (%s): %.2fM params, mesh %s, batch %d, steps %d..%d", what,
                cfg.model_size, trainer.num_params / 1e6, dict(trainer.mesh.shape),
                tc.batch_size, it, tc.num_steps)
    cadence = Cadence(int(tc.num_steps), int(tc.log_every), int(tc.save_every),
                      int(tc.eval_every))
    t_last, n_since, metrics, saved_at, failed = time.perf_counter(), 0, None, None, None
    with StopSignal() as stop:
        while it < tc.num_steps:
            batch = to_global_array(next(data), trainer.mesh)
            state, metrics = trainer.step(state, batch, it)
            it += 1
            n_since += 1
            actions = cadence.after_step(it, stopping=bool(stop.requested))
            if "log" in actions:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if m["skipped"] >= tc.max_skipped:
                    failed = (f"stopped: {int(m['skipped'])} non-finite updates in a row "
                              f"(train.max_skipped={tc.max_skipped}); lower train.lr")
                    break
                row = {k: v for k, v in m.items() if k not in _COUNTERS}
                row["images_per_s"] = n_since * tc.batch_size / (time.perf_counter() - t_last)
                writer.scalars(it, row)
                if jax.process_index() == 0:
                    print(f"step {it}/{tc.num_steps} " + " ".join(
                        f"{k} {v:.4g}" for k, v in row.items()), flush=True)
                t_last, n_since = time.perf_counter(), 0
            if "stop" in actions or "save" in actions:
                ckpt.save(it, state, data.get_state(), config_dict, force="stop" in actions)
                saved_at = it
            if "stop" in actions:
                break
            if "sample" in actions and it < tc.num_steps:  # eval_every (the end evals below)
                evaluate(state.ema_params, it, writer)
        if not failed and saved_at != it and it not in ckpt.all_steps():
            ckpt.save(it, state, data.get_state(), config_dict, force=True)
        ckpt.wait()
    results = {}
    if not failed and not stop.requested:
        results = evaluate(state.ema_params, it, writer)
        export(state.ema_params, it, results)
    writer.close()
    ckpt.close()
    data.close()
    if failed:
        raise TrainingStopped(failed)
    if jax.process_index() == 0:
        print(f"stopped by {stop.requested} at step {it}" if stop.requested
              else f"finished at step {it}: {workdir}", flush=True)
    last = float(jax.device_get(metrics)["loss"]) if metrics is not None else None
    return {"step": it, "last_loss": last, "results": results}


def shapes_pipeline(cfg: ml_collections.ConfigDict, image_size: int, tokenizer, what: str):
    """The run's batches of shapes-world scenes at `image_size` px, captions tokenized."""
    from jaxt2i.data import pipeline as data_pipeline
    from jaxt2i.data.shapes import ShapesSource

    if cfg.data.source != "shapes":
        raise ConfigError(f"data.source={cfg.data.source!r}: a {what} run trains on the shapes "
                          "world only so far; set data.source='shapes'")
    kinds = cfg.data.get("shapes_kinds", "") or None  # the scene-kind mix; None: the default
    try:
        source = ShapesSource(image_size, cfg.data.num_examples, "train", cfg.data.seed,
                              kinds=kinds)
    except ValueError as e:
        raise ConfigError(f"data.shapes_kinds={kinds!r}: {e}") from None
    return data_pipeline.make_pipeline(
        source,
        resolution=image_size, batch_size=cfg.train.batch_size, seed=cfg.data.seed,
        tokenizer=tokenizer, worker_count=cfg.data.worker_count)
