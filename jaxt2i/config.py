"""Configs: loading `configs/X.py:variant` files, checking fields, explaining bad overrides.

Configs are Python files whose `get_config(arg)` returns an `ml_collections.ConfigDict`
(absl `config_flags`; the `--config` flag itself and the one-line flag errors are in
`jaxt2i.cli`). This module adds what config_flags lacks for users:
  * a misspelled field or a bad value is ONE line naming the field and what is allowed,
    never a traceback;
  * enumerated fields are checked against the values the library accepts (`CHOICES`);
  * variants are parsed from 'size=tiny,steps=10' strings with unknown keys refused.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import sys
from typing import Any, Callable, Iterable, Mapping

import ml_collections


class ConfigError(ValueError):
    """A user mistake in a config or its overrides; the message is one line."""


def parse_variant(arg: str | None, defaults: Mapping[str, Any]) -> dict:
    """Parses the ':...' part of `--config=configs/X.py:size=tiny,seed=3`.

    A bare word is taken as the first key's value (`:tiny` == `:size=tiny`).

    Args:
      arg: the variant string, or None / '' for all defaults.
      defaults: allowed keys and their default values (the type of each default is used to
        convert the string).

    Returns:
      dict of every key in `defaults`, overridden by `arg`.
    """
    out = dict(defaults)
    if not arg:
        return out
    first = next(iter(defaults))
    for part in filter(None, (p.strip() for p in arg.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            key, value = first, part
        key = key.strip()
        if key not in defaults:
            raise ConfigError(f"unknown config variant key {key!r}; allowed: {', '.join(defaults)}")
        default = defaults[key]
        try:
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                out[key] = value.lower() in ("true", "1")
            elif isinstance(default, (int, float)) and default is not None:
                out[key] = type(default)(value)
            else:
                out[key] = value
        except ValueError:
            raise ConfigError(
                f"config variant {key}={value!r} is not a {type(default).__name__}") from None
    return out


def _lazy(module: str, name: str) -> Callable[[], Iterable[str]]:
    def get():
        return getattr(importlib.import_module(module), name)
    return get


# Enumerated config fields and the values the library accepts. Values may be a tuple or a
# zero-argument callable returning one (so modules are imported only when checked).
CHOICES: dict[str, Any] = {
    "text.dtype": _lazy("jaxt2i.text.t5", "COMPUTE_DTYPES"),
    "model.dtype": _lazy("jaxt2i.models.unet", "DTYPES"),
    "model.objective": _lazy("jaxt2i.models.unet", "OBJECTIVES"),
    "model.remat_policy": _lazy("jaxt2i.models.layers", "REMAT_POLICY_NAMES"),
    "model.unet.remat_policy": _lazy("jaxt2i.models.layers", "REMAT_POLICY_NAMES"),  # 'if'
    "diffusion.schedule": _lazy("jaxt2i.diffusion", "SCHEDULE_NAMES"),
    # the augmentation level in [0, 1] is a continuous schedule's time, or a discrete one's
    # timestep / num_train_timesteps (DeepFloyd IF's image-noising DDPM)
    "diffusion.aug_schedule": _lazy("jaxt2i.diffusion", "SCHEDULE_NAMES"),
    "diffusion.aug_order": _lazy("jaxt2i.stage", "AUG_ORDERS"),
    "diffusion.loss_weighting": _lazy("jaxt2i.diffusion", "WEIGHTINGS"),
    "sample.sampler": _lazy("jaxt2i.diffusion", "SAMPLER_NAMES"),
    "sample.thresholding": _lazy("jaxt2i.diffusion", "THRESHOLDINGS"),
    "sample.spacing": _lazy("jaxt2i.diffusion", "GRID_SPACINGS"),
    "data.caption_language": _lazy("jaxt2i.data.shapes", "CAPTION_LANGUAGES"),
    "train.optimizer": _lazy("jaxt2i.train_state", "OPTIMIZERS"),
    "train.schedule": _lazy("jaxt2i.train_state", "SCHEDULES"),
}


def _get(cfg, path: str):
    node = cfg
    for part in path.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def validate(cfg: ml_collections.ConfigDict, choices: Mapping[str, Any] | None = None) -> None:
    """Checks every enumerated field (and every numeric field's range, `RANGES`) present in
    `cfg`; raises a one-line ConfigError."""
    for path, allowed in (choices or CHOICES).items():
        value = _get(cfg, path)
        if value is _MISSING:
            continue
        allowed = tuple(allowed() if callable(allowed) else allowed)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"config field {path}={value!r} is not allowed{hint}; allowed values: "
                + ", ".join(map(str, allowed)))
    if choices is None:
        for path, spec in RANGES.items():
            value = _get(cfg, path)
            if value is not _MISSING:
                _check_range(path, value, spec)


# Numeric config fields and their sensible ranges: (low, high, low inclusive, high inclusive,
# what the field means). NaN, infinities and absurd values (a learning rate of 1e30 trains to
# finite garbage) are refused before any work starts.
_INF = float("inf")
RANGES: dict[str, tuple] = {
    "train.lr": (0.0, 1.0, False, True, "the peak learning rate (e.g. 1e-4)"),
    "train.b1": (0.0, 1.0, True, False, "Adam's beta1"),
    "train.b2": (0.0, 1.0, True, False, "Adam's beta2"),
    "train.eps": (0.0, 1.0, False, True, "Adam's epsilon"),
    "train.weight_decay": (0.0, 10.0, True, True, "the decoupled weight decay"),
    "train.end_lr_factor": (0.0, 1.0, True, True, "the final learning rate / peak"),
    "train.grad_clip": (0.0, _INF, True, False, "the global-norm clip (0 = off)"),
    "train.ema_decay": (0.0, 1.0, True, True, "the EMA decay"),
    "train.warmup_steps": (0, _INF, True, False, "warmup steps"),
    "train.num_steps": (0, _INF, True, False, "the number of updates"),
    "train.batch_size": (1, _INF, True, False, "the global batch size"),
    "train.grad_accum": (1, _INF, True, False, "micro-batches per update"),
    "train.max_skipped": (1, _INF, True, False, "non-finite updates in a row before stopping"),
    "train.log_every": (1, _INF, True, False, "steps between log lines"),
    "train.save_every": (0, _INF, True, False, "steps between checkpoints (0 = at the end)"),
    "train.sample_every": (0, _INF, True, False, "steps between sample grids (0 = at the end)"),
    # Retention keeps this many newest checkpoints; 0 would delete every one of them.
    "train.keep_checkpoints": (1, _INF, True, False, "how many checkpoints to keep"),
    "diffusion.cond_drop_prob": (0.0, 1.0, True, True, "the text-dropout probability"),
    "diffusion.aug_max_level": (0.0, 1.0, True, True, "the largest augmentation level"),
    "diffusion.text_drop_prob": (0.0, 1.0, True, True, "the prior's caption-dropout probability"),
    "diffusion.image_drop_prob": (0.0, 1.0, True, True,
                                  "the decoder's image-embedding dropout probability"),
    "sample.num_candidates": (1, 64, True, True, "the prior's samples per caption"),
    "diffusion.min_snr_gamma": (0.0, _INF, False, False, "the min-SNR gamma"),
    "diffusion.vlb_weight": (0.0, 1.0, True, True, "lambda of the hybrid loss (IF: 0.001)"),
    "sample.steps": (1, _INF, True, False, "sampler steps"),
    "sample.guidance": (0.0, 100.0, True, True, "the guidance scale (1 = none)"),
    "sample.aug_level": (0.0, 1.0, True, True, "the augmentation level at sampling"),
    "sample.churn": (0.0, 1000.0, True, True, "EDM's S_churn (0 = none)"),
    "sample.guidance_rescale": (0.0, 1.0, True, True, "the guidance rescale phi"),
    "sample.guidance_t_min": (0.0, 1.0, True, True, "the guidance interval's start"),
    "sample.guidance_t_max": (0.0, 1.0, True, True, "the guidance interval's end"),
    "sample.threshold_percentile": (50.0, 100.0, True, True,
                                    "the dynamic-thresholding percentile"),
    "sample.inpaint_resample": (0, 100, True, True, "RePaint jumps per step"),
    "sample.threshold_max_value": (0.0, 100.0, True, True,
                                   "dynamic thresholding's largest scale (0 = no limit)"),
}


def check_range(path: str, value: Any, label: str | None = None) -> None:
    """Raises a one-line ConfigError if `value` is outside `RANGES[path]` (or not finite).

    `label` names the value in the message (default 'config field <path>'), e.g. '--guidance'.
    """
    _check_range(path, value, RANGES[path], label)


def _check_range(path: str, value: Any, spec: tuple, label: str | None = None) -> None:
    lo, hi, lo_in, hi_in, what = spec
    label = label or f"config field {path}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{label}={value!r} must be a number ({what})")
    ok = (math.isfinite(value) and (value >= lo if lo_in else value > lo)
          and (value <= hi if hi_in else value < hi))
    if not ok:
        left, right = "[" if lo_in else "(", "]" if hi_in else ")"
        hi_s = "inf" if hi == _INF else f"{hi:g}"
        raise ConfigError(f"{label}={value!r} is out of range: {what} must be in "
                          f"{left}{lo:g}, {hi_s}{right}")


def _importable(path: str) -> None:
    """Config files import their siblings as `configs.common`: put their parent on sys.path."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:
        sys.path.insert(0, root)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads 'path/to/config.py[:variant]' the way `--config` does (for tests and tools)."""
    path, _, arg = spec.partition(":")
    _importable(path)
    mod_spec = importlib.util.spec_from_file_location("_jaxt2i_config", path)
    if mod_spec is None:
        raise ConfigError(f"config file {path!r} not found; pass --config=configs/NAME.py[:variant]")
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path!r} not found; pass --config=configs/NAME.py[:variant]") from None
    return module.get_config(arg or None) if arg else module.get_config()


def explain_override(cfg: ml_collections.ConfigDict, path: str, value: str) -> str | None:
    """Why `--config.<path>=<value>` cannot apply to `cfg`, as one line (None if it can)."""
    node, walked = cfg, []
    for part in path.split("."):
        if not isinstance(node, ml_collections.ConfigDict):
            return f"config field {'.'.join(walked)} is a value, it has no field {part!r}"
        if part not in node:
            where = ".".join(walked) or "the config"
            keys = sorted(node.keys())
            close = difflib.get_close_matches(part, keys, n=1)
            hint = f" (did you mean {'.'.join(walked + [close[0]])!r}?)" if close else ""
            return (f"unknown config field {path!r}{hint}; fields of {where}: " + ", ".join(keys))
        walked.append(part)
        node = node[part]
    if isinstance(node, ml_collections.ConfigDict):
        return f"config field {path!r} is a group; set one of its fields: " + ", ".join(node.keys())
    if isinstance(node, bool):
        ok = value.lower() in ("true", "false", "1", "0")
    elif isinstance(node, int):
        ok = _convertible(int, value)
    elif isinstance(node, float):
        ok = _convertible(float, value)
    else:
        ok = True
    if not ok:
        return f"config field {path}={value!r} must be a {type(node).__name__} (now {node!r})"
    return None


def _convertible(kind, value) -> bool:
    try:
        kind(value)
        return True
    except ValueError:
        return False


def to_json(cfg: ml_collections.ConfigDict) -> str:
    """The config as JSON (written beside every checkpoint)."""
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)


def from_json(text: str) -> ml_collections.ConfigDict:
    """Inverse of `to_json`."""
    return ml_collections.ConfigDict(json.loads(text))


__all__ = [
    "CHOICES", "RANGES", "ConfigError", "check_range", "explain_override", "from_json",
    "load_config_file", "parse_variant", "to_json", "validate",
]
