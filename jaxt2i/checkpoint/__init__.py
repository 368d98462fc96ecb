"""Orbax checkpoints of a training run, and params-only exports for inference.

`python -m jaxt2i.checkpoint --workdir=runs/base [--step=N] [--out=DIR]` writes the EMA params
of a run's latest (or step N's) checkpoint as an export (default `runs/base/export`), so a run
that is still training, or was stopped, can be sampled and evaluated.

A run directory holds `checkpoints/<step>/` with three items: `state` (the sharded TrainState,
every leaf a global array), `data` (the data iterator position, JSON) and `config` (JSON).
Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it on
completion; on `gs://` it writes a `commit_success.txt` last instead, as object stores have
no rename), so a crash mid-save never replaces the last good checkpoint. The workdir and the
export directory may be URLs (`gs://bucket/run`, see `jaxt2i.paths`). Restoring takes the
target shardings, so a run saved on one mesh resumes on another. A latest checkpoint that fails
to restore (corrupt, half-copied) is reported and the previous one is used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxt2i import paths
from jaxt2i.config import ConfigError

log = logging.getLogger("jaxt2i")

EXPORT_PARAMS = "params.safetensors"
EXPORT_CONFIG = "config.json"


CORRUPT_DIR = "corrupt_checkpoints"
# Config fields that define what a checkpoint's state is: resuming with any of them changed
# would restore into another model (or fail and restart). Others (steps, lr, logging) may
# change between runs.
# (Configs before format version 2 also had `stage`, which model.lowres_size decides.)
IDENTITY_FIELDS = ("model", "train.optimizer", "diffusion.schedule", "diffusion.aug_order")
# ... except these, which change how the same state is computed, not what it is.
FREE_FIELDS = ("model.dtype", "model.remat", "model.remat_policy", "model.unet.dtype",
               "model.unet.remat", "model.unet.remat_policy")


class CheckpointError(ConfigError):
    """A run directory's checkpoints exist but cannot be used (one line, what to do)."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint was saved by a run with another model config."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def config_mismatch(saved: dict, current: dict) -> str | None:
    """The first `IDENTITY_FIELDS` leaf that differs, as 'model.x: checkpoint A, config B'.

    Both are compared in the current format (`jaxt2i.stage.upgrade`), so a field an older
    run's config lacks stands for the value it had then (diffusion.aug_order: 'augment_first').
    """
    from jaxt2i.stage import upgrade

    try:
        saved, current = upgrade(saved), upgrade(current)
    except ConfigError:  # not a stage config the upgrade can read: compare what is there
        pass

    def leaves(tree, prefix):
        if isinstance(tree, dict):
            for k in sorted(tree):
                yield from leaves(tree[k], f"{prefix}.{k}" if prefix else k)
        else:
            yield prefix, tree

    def get(tree, path):
        for part in path.split("."):
            if not isinstance(tree, dict) or part not in tree:
                return _ABSENT
            tree = tree[part]
        return tree

    for field in IDENTITY_FIELDS:
        a, b = get(saved, field), get(current, field)
        if a is _ABSENT:  # an older run's config lacks the field: nothing to compare
            continue
        pairs = dict(leaves(a, field))
        for path, value in leaves(b, field):
            old = pairs.get(path, _ABSENT)
            if old is not _ABSENT and path not in FREE_FIELDS and _norm(old) != _norm(value):
                return f"{path}: checkpoint {old!r}, config {value!r}"
    return None


_ABSENT = object()


def _norm(v):
    """JSON round-trips turn tuples into lists: compare them alike."""
    return [_norm(x) for x in v] if isinstance(v, (list, tuple)) else v


def newest_readable(steps: list[int], read, directory: str) -> tuple[int, Any, list[int]]:
    """The first of `steps` (newest first) that `read(step)` restores: (step, what it read,
    the steps that failed before it, each logged). Shared by resuming and exporting, so a
    corrupt newest step is handled the same way by both.

    Raises CheckpointError listing every step's failure when none can be read, and lets
    CheckpointMismatch (another model, not a damaged file) through at once.
    """
    failed: list[tuple[int, str]] = []
    for s in steps:
        try:
            return s, read(s), [f for f, _ in failed]
        except CheckpointMismatch:
            raise
        except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
            failed.append((s, _first_line(e)))
            log.warning("checkpoint at step %d in %s cannot be restored (%s)%s", s, directory,
                        failed[-1][1], "; trying the previous one" if s != steps[-1] else "")
    raise CheckpointError(
        f"no checkpoint in {directory} can be restored ("
        + "; ".join(f"step {s}: {r}" for s, r in failed)
        + "); nothing was changed: move the checkpoints/ directory away to start afresh, or "
        "restore it from a copy")


class Checkpointer:
    """Saves / restores (state, data-iterator state, config) under `workdir/checkpoints`.

    Made by the process that holds the workdir's lock (`jaxt2i.workdir.WorkdirLock`).
    """

    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
        if max_to_keep < 1:
            raise ConfigError(f"max_to_keep={max_to_keep} would delete every checkpoint; keep "
                              "at least 1")
        self.directory = paths.join(paths.abspath(workdir), "checkpoints")
        if paths.is_url(self.directory):  # gs:// without gcsfs: one line, before Orbax's own
            paths.filesystem(self.directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                # Temporary dirs of a killed save: safe to remove, the run holds the workdir lock.
                create=True, cleanup_tmp_directories=True),
            item_names=("state", "data", "config"),
        )

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

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

    def restore(self, abstract_state: Any, config: dict | None = None,
                step: int | None = None) -> tuple[int, Any, dict, dict] | None:
        """Restores the newest readable checkpoint (or `step`).

        A checkpoint saved with a different model (see `IDENTITY_FIELDS`) stops the run with
        `CheckpointMismatch`, never a fresh start that retention would then delete the run
        for. A newest checkpoint that cannot be read while an older one can (a corrupt or
        half-copied step) is moved aside to `WORKDIR/corrupt_checkpoints/` (kept for
        inspection) with a warning, so the retrained step can be saved again. When no
        checkpoint can be read, nothing is moved and `CheckpointError` says why.

        Args:
          abstract_state: pytree of `jax.ShapeDtypeStruct` with `.sharding` set: where each
            restored leaf goes (any mesh; it need not be the one that saved).
          config: this run's config as a dict (checked against each checkpoint's own).
          step: a specific step; None means the latest readable one.

        Returns:
          (step, state, data_state, config) or None when there is no checkpoint at all.
        """
        def check_identity(s: int) -> None:
            saved = self._saved_config(s) if config is not None else None
            diff = config_mismatch(saved, config) if saved is not None else None
            if diff:
                raise CheckpointMismatch(
                    f"the checkpoint at step {s} in {self.directory} was trained with "
                    f"another model ({diff}); to resume, use that run's settings (its "
                    f"config.json); to start afresh, pass another --workdir; to fine-tune "
                    f"from it, pass --config.train.init_from=<its workdir> with a new one")

        def read(s: int):
            check_identity(s)
            return self.manager.restore(s, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore()))

        if step is not None:  # asked for: its failure is the caller's to see
            s, out = step, read(step)
        else:
            steps = sorted(self.all_steps(), reverse=True)
            if not steps:
                return None
            s, out, failed = newest_readable(steps, read, self.directory)
            if failed:
                self._move_aside(failed)
        return s, out.state, dict(out.data or {}), dict(out.config or {})

    def _saved_config(self, step: int) -> dict | None:
        """The config saved with checkpoint `step` (None when it cannot be read)."""
        path = paths.join(self.directory, str(step), "config", "metadata")
        try:
            return json.loads(paths.read_text(path))
        except (OSError, ValueError):
            return None

    def _move_aside(self, steps: list[int]) -> None:
        """Moves unreadable step directories to WORKDIR/corrupt_checkpoints/ (process 0)."""
        if jax.process_index() == 0:
            aside = paths.join(paths.dirname(self.directory), CORRUPT_DIR)
            paths.makedirs(aside)
            stamp = time.strftime("%Y%m%dT%H%M%S")
            for s in steps:
                dst = paths.join(aside, f"{s}-{stamp}")
                paths.move(paths.join(self.directory, str(s)), dst)
                log.warning("moved the unreadable checkpoint of step %d to %s (kept for "
                            "inspection); its step will be trained and saved again", s, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxt2i_move_aside")
        self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def open_run(cfg, workdir: str, abstract_state: Any) -> tuple[Checkpointer, dict, Any]:
    """Opens a training run's checkpoints: every trainer's first step in its workdir.

    Restores the newest checkpoint (refused in one line if it was written by another model or
    config, before anything is written), then writes the run's `config.json` (process 0).

    Returns:
      (the Checkpointer, the config as a JSON dict (saved with every checkpoint), the restored
      (step, state, data_state, extra) or None for a fresh run).
    """
    from jaxt2i.config import to_json  # pylint: disable=import-outside-toplevel

    ckpt = Checkpointer(workdir, max_to_keep=cfg.train.keep_checkpoints)
    config_dict = json.loads(to_json(cfg))
    restored = ckpt.restore(abstract_state, config_dict)
    if jax.process_index() == 0:
        paths.write_text(paths.join(workdir, "config.json"), to_json(cfg))
    return ckpt, config_dict, restored


def export_params(params: Any, config: dict, out_dir: str, step: int | None = None) -> str:
    """Writes inference params (e.g. the EMA params) as safetensors + the config as JSON.

    Keys are '/'-joined tree paths. Only process 0 writes (arrays are gathered first). The
    config is written in the current stage format (`jaxt2i.stage.upgrade`: a checkpoint of an
    older run exports as a current one); a config with a `kind` (a model that is not a cascade
    stage, e.g. the unCLIP prior) is written as given.
    """
    from jaxt2i.stage import upgrade
    from jaxt2i.text.convert import write_safetensors

    if config.get("kind") is None:
        config = upgrade(config, f"the config of the export to {out_dir}")

    flat = flatten(host_gather(params))
    if jax.process_index() == 0:
        paths.makedirs(out_dir)
        with paths.local_file(paths.join(out_dir, EXPORT_PARAMS)) as local:
            write_safetensors({k: np.asarray(v, np.float32) for k, v in flat.items()}, local,
                              metadata={"step": str(step if step is not None else -1)})
        paths.write_text(paths.join(out_dir, EXPORT_CONFIG), json.dumps(
            {"config": config, "step": step}, indent=2, sort_keys=True, default=str))
    return out_dir


def host_gather(tree: Any) -> Any:
    """A pytree of global arrays as numpy on every host (all-gathers across processes)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def load_exported(out_dir: str) -> tuple[Any, dict, int | None]:
    """Reads `export_params` output: (params tree of numpy arrays, config dict, step).

    Raises FileNotFoundError when there is no export, and `CheckpointError` (one line naming
    the file and what is wrong) for a truncated, empty or foreign params file, a non-float or
    non-finite tensor, or a config.json that is not an export's.
    """
    from safetensors.numpy import load, load_file

    path = paths.join(out_dir, EXPORT_PARAMS)
    if not paths.exists(path):
        raise FileNotFoundError(f"no {EXPORT_PARAMS} in {out_dir}; export a training run's "
                                "checkpoint with `python -m jaxt2i.checkpoint --workdir=DIR`")
    config, step = read_export_config(out_dir)
    try:
        tensors = load(paths.read_bytes(path)) if paths.is_url(path) else load_file(path)
    except Exception as e:  # noqa: BLE001 - safetensors' own error types for a bad file
        raise CheckpointError(f"{path} is not a readable safetensors file ({_first_line(e)}); "
                              "it may be truncated: export the stage again") from None
    for name, a in tensors.items():
        if not np.issubdtype(a.dtype, np.floating):
            raise CheckpointError(f"{path}: tensor {name} is {a.dtype}; a stage export holds "
                                  "floating-point params only")
        if not np.isfinite(a).all():
            raise CheckpointError(f"{path}: tensor {name} has {int((~np.isfinite(a)).sum())} "
                                  "non-finite values (NaN or inf); export an earlier checkpoint")
    return unflatten(tensors), config, step


def read_export_config(out_dir: str, sections: tuple[str, ...] = ()) -> tuple[dict, int | None]:
    """(config, step) of a stage export's config.json; CheckpointError (one line) when it is
    not JSON, not an export's config, or lacks one of the config `sections`."""
    cfg_path = paths.join(out_dir, EXPORT_CONFIG)
    try:
        meta = json.loads(paths.read_text(cfg_path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path} cannot be read as JSON ({_first_line(e)}); export "
                              "the stage again") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{cfg_path} is not a stage export's config (a JSON object with a "
                              "'config' object); export the stage again")
    for section in sections:
        if not isinstance(meta["config"].get(section), dict):
            raise CheckpointError(f"{cfg_path} lacks its '{section}' section; export the stage "
                                  "again (python -m jaxt2i.checkpoint --workdir=RUN)")
    return meta["config"], meta.get("step")


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


class _DropBelow(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


@contextlib.contextmanager
def _absl_below(level: int):
    """Drops absl log records (Orbax logs through absl) below `level` inside the block only.

    A filter on the 'absl' logger, removed on exit: absl's verbosity, its handlers and other
    threads' logging are left as they were.
    """
    logger = logging.getLogger("absl")
    drop = _DropBelow(level)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


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
    directory = paths.join(paths.abspath(workdir), "checkpoints")
    if not paths.isdir(directory):
        raise FileNotFoundError(f"{workdir!r} has no checkpoints/ directory; pass a training "
                                "run's --workdir")
    with _absl_below(logging.ERROR):  # read_only's "setting create=False" notes
        mgr = ocp.CheckpointManager(
            directory, options=ocp.CheckpointManagerOptions(read_only=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()})
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def read(s: int):
        # Every array onto this process's first device, whatever mesh saved it: without a
        # target Orbax would rebuild the saving run's shardings (another device count fails).
        meta = mgr.item_metadata(s)["state"]
        target = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
            getattr(meta, "tree", meta))
        return mgr.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), config=ocp.args.JsonRestore()))

    with mgr:
        steps = sorted(mgr.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(f"no checkpoint at step {step} in {directory}; "
                                        f"steps there: {sorted(steps) or 'none'}")
            steps = [step]
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {directory} yet")
        s, out, _ = newest_readable(steps, read, directory)
    out_dir = out_dir or paths.join(workdir, "export")
    _check_not_older(out_dir, int(s), explicit=step is not None)
    from jaxt2i.models import lora  # a LoRA run: merged params + its adapters alone

    ema = lora.ema_tree(out.state["params"], out.state["ema_params"])
    return lora.export(ema, dict(out.config), out_dir, step=int(s)), int(s)


def _check_not_older(out_dir: str, step: int, *, explicit: bool) -> None:
    """An export never goes back in steps unasked: refuse (or, for an explicit --step, warn)."""
    try:
        have = json.loads(paths.read_text(paths.join(out_dir, EXPORT_CONFIG))).get("step")
    except (OSError, ValueError, AttributeError):
        return
    if not isinstance(have, int) or have <= step:
        return
    if explicit:
        log.warning("replacing the export of step %d in %s with the older step %d (asked for "
                    "by --step)", have, out_dir, step)
        return
    raise CheckpointError(
        f"{out_dir} holds the export of step {have}, newer than the newest readable checkpoint "
        f"(step {step}); pass --step={step} to replace it anyway, or --out=DIR to write "
        "elsewhere")
