"""`python -m jaxt2i.checkpoint` (console script `jaxt2i-checkpoint`): export the EMA params of a
training run's newest (or `--step`) checkpoint, to sample or evaluate a run still training.

    python -m jaxt2i.checkpoint --workdir=runs/base [--step=N] [--out=DIR]

Parses the flags and calls `jaxt2i.checkpoint.export_checkpoint`.
"""

from __future__ import annotations

from jaxt2i.checkpoint import export_checkpoint


def main(argv) -> None:
    from absl import flags

    from jaxt2i.config import ConfigError

    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}")
    F = flags.FLAGS
    if not F.workdir:
        raise ConfigError("--workdir is required: the training run directory to export from")
    if F.out:
        from jaxt2i.workdir import check_writable

        check_writable(F.out, "--out", urls=True)
    try:
        out, step = export_checkpoint(F.workdir, F.step, F.out)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    print(f"exported the EMA params of step {step} to {out}", flush=True)


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "Training run directory (holds checkpoints/).")
    flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the newest).")
    flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/export).")


def cli() -> None:
    """Console-script entry point (`jaxt2i-checkpoint`) of `python -m jaxt2i.checkpoint`."""
    from jaxt2i.cli import run_app

    run_app(main, _define_flags)


if __name__ == "__main__":
    cli()
