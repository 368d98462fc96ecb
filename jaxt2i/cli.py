"""What every command shares: absl flag parsing with one-line errors, the per-stage sampling
flags and the prompt reader.

Commands (`jaxt2i/sample.py`, `jaxt2i/eval/__main__.py`, ...) define their flags in a
`_define_flags()` and call `run_app(main, _define_flags)` from their `cli()`; nothing here
defines a flag or changes logging when imported. A user's mistake (a misspelled flag, a bad
value, a `ConfigError` raised by the library) is one line `error: ...` on stderr and exit
code 2; a full disk or an unwritable output is one line and exit code 1.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

from absl import app, flags
from ml_collections import config_flags

from jaxt2i.config import (RANGES, ConfigError, _importable, check_range, explain_override,
                           load_config_file)

def define_config_flag(name: str = "config", help_string: str | None = None):
    """Defines `--config` (a Python config file + ':variant') with locked fields."""
    return config_flags.DEFINE_config_file(
        name, None, help_string or "Experiment config: configs/NAME.py[:variant]; "
        "override fields with --config.a.b=value.", lock_config=True)


def _config_error_line(argv: list[str], name: str, exc: Exception) -> str:
    spec = None
    overrides = []
    for i, a in enumerate(argv[1:], start=1):
        if a.startswith(f"--{name}="):
            spec = a.split("=", 1)[1]
        elif a == f"--{name}" and i + 1 < len(argv):
            spec = argv[i + 1]
        elif a.startswith(f"--{name}."):
            path, _, value = a[len(name) + 3:].partition("=")
            overrides.append((path, value))
    if spec is not None:
        try:
            cfg = load_config_file(spec)
        except ConfigError as e:
            return str(e)
        except Exception as e:  # noqa: BLE001 - the user's config file raised
            return f"config {spec!r} failed to load: {type(e).__name__}: {e}".splitlines()[0]
        for path, value in overrides:
            msg = explain_override(cfg, path, value)
            if msg:
                return msg
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return first.strip("'\"")


def _underscored(arg: str) -> str:
    """'--num-images=4' -> '--num_images=4' when that flag exists; anything else unchanged."""
    if not arg.startswith("--") or arg == "--":
        return arg
    name, eq, value = arg[2:].partition("=")
    if "-" not in name or "." in name:
        return arg
    alt = name.replace("-", "_")
    if alt in flags.FLAGS:
        return f"--{alt}{eq}{value}"
    if alt.startswith("no_") and alt[3:] in flags.FLAGS:  # --no-progress -> --noprogress
        return f"--no{alt[3:]}{eq}{value}"
    return arg


_HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def parse_flags_or_exit(argv: list[str], config_flag: str = "config") -> list[str]:
    """absl flag parsing that turns any flag/config mistake into one line and exit code 2.

    `--num-images=4` is accepted for a flag defined as `num_images` (and `--no-foo` for
    `--nofoo`'s underscore spelling); config overrides (`--config.a.b`) are left alone.
    `--help` and its kin exit 0 (absl exits 1).
    """
    argv = [argv[0]] + [_underscored(a) for a in argv[1:]]
    for i, a in enumerate(argv[1:], start=1):
        if a.startswith(f"--{config_flag}="):
            _importable(a.split("=", 1)[1].partition(":")[0])
        elif a == f"--{config_flag}" and i + 1 < len(argv):
            _importable(argv[i + 1].partition(":")[0])
    try:
        try:
            rest = flags.FLAGS(argv)
        except SystemExit as e:  # absl exits 1 after --help; asking for help is no error
            if e.code == 1 and any(a.partition("=")[0] in _HELP_FLAGS for a in argv[1:]):
                sys.exit(0)
            raise
        if config_flag in flags.FLAGS and flags.FLAGS[config_flag].present:
            value = flags.FLAGS[config_flag].value
            if type(value).__name__ == "_ErrorConfig":  # config_flags defers load failures
                value.keys()  # raises the load error here, where it is reported in one line
        return rest
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError, ImportError,
            OSError) as e:
        msg = _config_error_line(argv, config_flag, e)
        print(f"{argv[0].split('/')[-1]}: error: {msg}", file=sys.stderr)
        sys.exit(2)


def run_app(main: Callable[[list[str]], Any],
            define_flags: Callable[[], None] | None = None) -> None:
    """`absl.app.run` with one-line errors for flag/config mistakes, for `ConfigError` and for
    a URL whose filesystem package is missing (`paths.MissingFilesystem`) (exit 2), and for a full disk or unwritable output (exit 1).

    `define_flags` (the command's `_define_flags`) is called first; the flags it defines are
    made key flags of the program, so `--help` lists them however the command was started
    (`python -m ...` or a console script) and wherever they were defined (e.g. this module's
    `define_stage_flags`).
    """
    if define_flags is not None:
        before = set(flags.FLAGS)
        define_flags()
        for name in sorted(set(flags.FLAGS) - before):
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])

    def wrapped(argv):
        from absl import logging as absl_logging

        if not any(a.startswith(("--verbosity", "-v=", "--v=")) for a in argv):
            absl_logging.set_verbosity(absl_logging.WARNING)  # keep library chatter off screen
        from jaxt2i.paths import MissingFilesystem
        from jaxt2i.workdir import disk_error

        try:
            return main(argv)
        except (ConfigError, MissingFilesystem) as e:  # MissingFilesystem: gs:// sans gcsfs
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except OSError as e:  # a full disk or an unwritable path while writing results
            why = disk_error(e)
            if why is None:
                raise
            print(f"error: cannot write: {why}; free space or choose another output directory "
                  "(files written before this point are complete)", file=sys.stderr)
            sys.exit(1)

    app.run(wrapped, flags_parser=parse_flags_or_exit)


# --- Sampling flags shared by sample, eval and export ---------------------------------------

def stage_flags() -> dict[str, type]:
    """{flag name: type} of the per-stage flags: the fields of `jaxt2i.stage.StageSettings`
    (declared there once; a new setting becomes a flag by itself)."""
    from jaxt2i.stage import setting_types

    return setting_types()


def per_stage(name: str, value: str | None, num_stages: int) -> list:
    """'25,10' -> [25, 10]; '25' -> [25] * num_stages; None -> [None] * num_stages."""
    if value is None or value == "":
        return [None] * num_stages
    parts = [p.strip() for p in str(value).split(",")]
    if len(parts) not in (1, num_stages):
        raise ConfigError(f"--{name}={value} has {len(parts)} values; give one for all stages or "
                          f"one per stage ({num_stages})")
    try:
        vals = [stage_flags()[name](p) for p in parts]
    except ValueError:
        raise ConfigError(f"--{name}={value}: values must be "
                          f"{stage_flags()[name].__name__}") from None
    if f"sample.{name}" in RANGES:  # NaN, infinities, out-of-range levels
        for v in vals:
            check_range(f"sample.{name}", v, f"--{name}")
    return vals * num_stages if len(vals) == 1 else vals


def per_stage_floats(name: str, value: str, num_stages: int) -> list[float]:
    """'0.6,1' -> [0.6, 1.0] (one per stage) or '0.6' -> [0.6] * num_stages, for flags that are
    not stage settings (e.g. --strength, an input of the compiled sampler)."""
    parts = [p.strip() for p in str(value).split(",")]
    if len(parts) not in (1, num_stages):
        raise ConfigError(f"{name}={value} has {len(parts)} values; give one for all stages or "
                          f"one per stage ({num_stages})")
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"{name}={value}: values must be numbers") from None
    return vals * num_stages if len(vals) == 1 else vals


def check_stage_flags(overrides: dict | None) -> None:
    """Parses and range-checks per-stage flag values before any work is done (whether there
    is one value per stage is checked once the cascade, and its stage count, is loaded)."""
    for name, value in (overrides or {}).items():
        if value not in (None, ""):
            per_stage(name, value, len(str(value).split(",")))


def stage_settings(cascade, stages: int | None, overrides: dict | None) -> list:
    """Validated `--stages` + per-stage flag strings -> one `StageSettings` per stage run.

    Args:
      cascade: the loaded `Cascade`.
      stages: how many stages to run (None = all).
      overrides: {setting name: '25,10' | '25' | None}.

    Raises ConfigError (one line) for a bad stage count or value.
    """
    from jaxt2i.stage import SETTING_NAMES

    n = len(cascade.stages) if stages is None else stages
    if not 1 <= n <= len(cascade.stages):
        raise ConfigError(f"--stages ({n}) must be between 1 and {len(cascade.stages)} (the "
                          "cascade's stages)")
    columns = {k: per_stage(k, (overrides or {}).get(k), n) for k in SETTING_NAMES}
    try:
        return cascade.settings([{k: columns[k][i] for k in SETTING_NAMES} for i in range(n)],
                                num_stages=n)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def define_text_encoder_flag() -> None:
    """Defines --text_encoder: where to load the stages' text encoder from instead."""
    flags.DEFINE_string("text_encoder", None, "Load the text encoder from this Hugging Face "
                        "directory or hub id instead of the stages' text.encoder (a checkpoint "
                        "never makes jaxt2i download; naming a hub id here does).")


def define_model_flag() -> None:
    """Defines --model: which bundled demo runs when no --checkpoint is given."""
    flags.DEFINE_enum("model", None, ["imagen", "unclip"], "The bundled demo to run when no "
                      "--checkpoint is given: imagen (the default: T5 -> base -> SR) or unclip "
                      "(DALL-E 2: CLIP -> prior -> decoder -> SR; docs/unclip.md).")


def checkpoints_or_demo(checkpoints: Sequence[str] | None, model: str | None) -> list[str]:
    """--checkpoint's values, or the bundled demo --model names; one line if both are given."""
    from jaxt2i.assets import demo_dir

    if checkpoints and model:
        raise ConfigError(f"--model={model} picks a bundled demo; with --checkpoint, drop it "
                          "(a checkpoint directory says which kind of cascade it is)")
    return list(checkpoints) if checkpoints else [demo_dir(model)]


def define_stage_flags(what: str = "Per-stage") -> None:
    """Defines --sampler --steps --guidance --thresholding --aug_level --spacing --churn (the
    `StageSettings` fields; comma lists per stage)."""
    for name, kind in stage_flags().items():
        flags.DEFINE_string(name, None, f"{what} {name} ({kind.__name__}): one value for all "
                            "stages or a comma list (default: each stage's saved config).")


def stage_flag_values() -> dict:
    """The per-stage flags' raw values, for `stage_settings`."""
    return {k: getattr(flags.FLAGS, k) for k in stage_flags()}


def read_prompts(prompts: Sequence[str] | None, prompts_file: str | None) -> list[str]:
    """The prompts of --prompt (repeatable) and --prompts_file, in that order.

    --prompt values are kept as given (`--prompt ""` is the unconditional prompt); the file is
    UTF-8 text with one prompt a line, each stripped, blank lines skipped.

    Raises ConfigError (one line naming the file) for a missing, unreadable or non-UTF-8 file,
    and when there are no prompts at all.
    """
    out = list(prompts or [])
    if prompts_file:
        try:
            with open(prompts_file, encoding="utf-8") as f:
                out += [line.strip() for line in f if line.strip()]
        except FileNotFoundError:
            raise ConfigError(f"--prompts_file {prompts_file!r} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"--prompts_file {prompts_file!r} is a directory; give a text "
                              "file with one prompt a line") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"--prompts_file {prompts_file!r} is not UTF-8 text (byte "
                              f"{e.object[e.start:e.start + 1]!r} at offset {e.start}); save it "
                              "as UTF-8") from None
        except OSError as e:
            raise ConfigError(f"--prompts_file {prompts_file!r} cannot be read "
                              f"({e.strerror or e})") from None
    if not out:
        raise ConfigError("no prompts given: pass --prompt TEXT (repeatable) or --prompts_file "
                          "FILE (one prompt a line)")
    return out


__all__ = [
    "check_stage_flags", "define_config_flag", "define_stage_flags", "define_text_encoder_flag", "stage_flags",
    "parse_flags_or_exit", "per_stage", "read_prompts", "run_app", "stage_flag_values",
    "stage_settings",
]
