"""`python -m jaxt2i.assets [--out=DIR]` (console script `jaxt2i-assets`): rebuild the bundled
text encoder (deterministic), with `jaxt2i.assets.build_text_encoder`.

Without --out it rewrites the package's own `jaxt2i/assets/text_encoder/`; with --out it
writes the same files elsewhere (to compare them with the shipped ones).
"""

from __future__ import annotations

from absl import flags

from jaxt2i.assets import build_text_encoder
from jaxt2i.cli import run_app
from jaxt2i.config import ConfigError


def main(argv) -> None:
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}")
    print("wrote", build_text_encoder(flags.FLAGS.out), flush=True)


def _define_flags() -> None:
    flags.DEFINE_string("out", None, "Output directory (default: the package's own "
                        "jaxt2i/assets/text_encoder).")


def cli() -> None:
    """Console-script entry point (`jaxt2i-assets`)."""
    run_app(main, _define_flags)


if __name__ == "__main__":
    cli()
