"""Orbax checkpoints of a training run, and params-only exports for inference.

`python -m jaxt2i.checkpoint --workdir=runs/base [--step=N] [--out=DIR]` writes the EMA params
of a run's latest (or step N's) checkpoint as an export (default `runs/base/export`), so a run
that is still training, or was stopped, can be sampled and evaluated.

A run directory holds `checkpoints/<step>/` with three items: `state` (the sharded TrainState,
every leaf a global array), `data` (the data iterator position, JSON) and `config` (JSON).
Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it on
completion), so a crash mid-save never replaces the last good checkpoint. Restoring takes the
target shardings, so a run saved on one mesh resumes on another. A latest checkpoint that fails
to restore (corrupt, half-copied) is reported and the previous one is used.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger("jaxt2i")

EXPORT_PARAMS = "params.safetensors"
EXPORT_CONFIG = "config.json"


class Checkpointer:
    """Saves / restores (state, data-iterator state, config) under `workdir/checkpoints`."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                create=True),
            item_names=("state", "data", "config"),
        )

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict | None, config: dict,
             force: bool = False) -> bool:
        """Starts an (async) save of `state` at `step`; returns whether a save was started."""
        return self.manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state or {}),
                config=ocp.args.JsonSave(config),
            ),
            force=force,
        )

    def wait(self) -> None:
        """Blocks until pending async saves are durable."""
        self.manager.wait_until_finished()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict, dict] | None:
        """Restores the newest readable checkpoint (or `step`).

        Args:
          abstract_state: pytree of `jax.ShapeDtypeStruct` with `.sharding` set: where each
            restored leaf goes (any mesh; it need not be the one that saved).
          step: a specific step; None means the latest readable one.

        Returns:
          (step, state, data_state, config) or None when there is no checkpoint.
        """
        steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        for i, s in enumerate(steps):
            try:
                out = self.manager.restore(
                    s, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=ocp.args.JsonRestore(),
                        config=ocp.args.JsonRestore(),
                    ))
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                if step is not None:
                    raise
                reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                nxt = steps[i + 1] if i + 1 < len(steps) else None
                log.warning("checkpoint at step %d in %s cannot be restored (%s); %s", s,
                            self.directory, reason,
                            f"falling back to step {nxt}" if nxt is not None else "no older one left")
                continue
            return s, out.state, dict(out.data or {}), dict(out.config or {})
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def export_params(params: Any, config: dict, out_dir: str, step: int | None = None) -> str:
    """Writes inference params (e.g. the EMA params) as safetensors + the config as JSON.

    Keys are '/'-joined tree paths. Only process 0 writes (arrays are gathered first).
    """
    from jaxt2i.text.convert import write_safetensors

    flat = flatten(host_gather(params))
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        write_safetensors({k: np.asarray(v, np.float32) for k, v in flat.items()},
                          os.path.join(out_dir, EXPORT_PARAMS),
                          metadata={"step": str(step if step is not None else -1)})
        tmp = os.path.join(out_dir, EXPORT_CONFIG + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"config": config, "step": step}, f, indent=2, sort_keys=True, default=str)
        os.replace(tmp, os.path.join(out_dir, EXPORT_CONFIG))
    return out_dir


def host_gather(tree: Any) -> Any:
    """A pytree of global arrays as numpy on every host (all-gathers across processes)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def load_exported(out_dir: str) -> tuple[Any, dict, int | None]:
    """Reads `export_params` output: (params tree of numpy arrays, config dict, step)."""
    from safetensors.numpy import load_file

    path = os.path.join(out_dir, EXPORT_PARAMS)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {EXPORT_PARAMS} in {out_dir}; export a training run's "
                                "checkpoint with `python -m jaxt2i.checkpoint --workdir=DIR`")
    with open(os.path.join(out_dir, EXPORT_CONFIG)) as f:
        meta = json.load(f)
    return unflatten(load_file(path)), meta["config"], meta.get("step")


def flatten(tree: Any, sep: str = "/") -> dict[str, Any]:
    """Nested dicts -> {'a/b/c': leaf}."""
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{sep}{k}" if prefix else str(k))
        else:
            out[prefix] = node

    walk(tree, "")
    return out


def unflatten(flat: dict[str, Any], sep: str = "/") -> dict:
    """Inverse of `flatten`."""
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, last = key.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return tree


def export_checkpoint(workdir: str, step: int | None = None, out_dir: str | None = None) -> tuple[str, int]:
    """Exports the EMA params of a training run's checkpoint (what training exports at the end).

    Reads the checkpoint without building the model (each array onto the default device), so it
    works while the run goes on, after it was stopped, and for any mesh it was saved on.

    Args:
      workdir: the run directory (with checkpoints/).
      step: the checkpoint step; None = the newest one that restores.
      out_dir: where to write (default `workdir/export`), as `export_params` writes.

    Returns:
      (out_dir, step). Raises FileNotFoundError when there is no (such) checkpoint.
    """
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{workdir!r} has no checkpoints/ directory; pass a training "
                                "run's --workdir")
    from absl import logging as absl_logging

    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # read_only's "setting create=False" notes
    try:
        mgr = ocp.CheckpointManager(directory, item_names=("state", "data", "config"),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    finally:
        absl_logging.set_verbosity(level)
    with mgr:
        steps = sorted(mgr.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(f"no checkpoint at step {step} in {directory}; "
                                        f"steps there: {sorted(steps) or 'none'}")
            steps = [step]
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {directory} yet")
        for i, s in enumerate(steps):
            try:
                out = mgr.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(), config=ocp.args.JsonRestore()))
                ema, config = out.state["ema_params"], dict(out.config)
            except Exception as e:  # noqa: BLE001 - a half-written or corrupt step
                if step is not None or i + 1 == len(steps):
                    raise
                log.warning("checkpoint at step %d cannot be read (%s); trying step %d", s,
                            str(e).strip().splitlines()[0][:200] if str(e).strip() else
                            type(e).__name__, steps[i + 1])
                continue
            out_dir = out_dir or os.path.join(workdir, "export")
            return export_params(ema, config, out_dir, step=int(s)), int(s)
    raise AssertionError("unreachable")


def main(argv) -> None:
    from absl import flags

    from jaxt2i.config import ConfigError

    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}")
    F = flags.FLAGS
    if not F.workdir:
        raise ConfigError("--workdir is required: the training run directory to export from")
    try:
        out, step = export_checkpoint(F.workdir, F.step, F.out)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    print(f"exported the EMA params of step {step} to {out}", flush=True)


def cli() -> None:
    """Console entry point of `python -m jaxt2i.checkpoint`."""
    from absl import flags

    from jaxt2i.config import run_app

    flags.DEFINE_string("workdir", None, "Training run directory (holds checkpoints/).")
    flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the newest).")
    flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/export).")
    run_app(main)


if __name__ == "__main__":
    cli()
