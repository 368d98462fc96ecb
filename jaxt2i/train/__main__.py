"""`python -m jaxt2i.train`: train one cascade stage (base or super-resolution).

    python -m jaxt2i.train --config=configs/base.py:size=demo --workdir=runs/base

Parses the flags and calls `jaxt2i.train.train` (console script `jaxt2i-train`).
"""

from __future__ import annotations

import sys

from jaxt2i.config import ConfigError
from jaxt2i.parallel import initialize_distributed
from jaxt2i.train.loop import TrainingStopped, train


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
