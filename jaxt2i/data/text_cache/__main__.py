"""`python -m jaxt2i.data.text_cache` (console script `jaxt2i-text-cache`): encode a dataset's
captions once into a T5 embedding cache.

    python -m jaxt2i.data.text_cache --encoder=T5_DIR --shapes=train:10000 --out_dir=CACHE

Parses the flags and calls `jaxt2i.data.text_cache.build_text_cache`.
"""

from __future__ import annotations

from jaxt2i.data.text_cache import build_text_cache


def _source_from_flags(args):
    if args.shapes:
        from jaxt2i.data.shapes import ShapesSource  # pylint: disable=import-outside-toplevel
        parts = args.shapes.split(":")
        if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts[1:]):
            raise ValueError(f"--shapes={args.shapes!r} must be SPLIT:SIZE[:SEED], e.g. "
                             f"train:10000")
        # Captions do not depend on the resolution; 8 px keeps construction cheap.
        return ShapesSource(8, int(parts[1]), parts[0], int(parts[2]) if len(parts) > 2 else 0)
    from jaxt2i.data.builders import load_source  # pylint: disable=import-outside-toplevel
    return load_source(args.dataset_dir, args.split)


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("encoder", None, "Hugging Face T5 directory (jaxt2i.text.encoder).")
    flags.DEFINE_string("out_dir", None, "Where to write the cache.")
    flags.DEFINE_string("shapes", None, "SPLIT:SIZE[:SEED] of the shapes world, e.g. "
                        "train:10000.")
    flags.DEFINE_string("dataset_dir", None, "A built TFDS dataset directory (name/config/ver).")
    flags.DEFINE_string("split", "train", "Split of --dataset_dir.")
    flags.DEFINE_integer("max_length", None, "Text length L (default: the encoder's).")
    flags.DEFINE_integer("shard_size", 4096, "Captions per shard file.")
    flags.DEFINE_integer("batch_size", 64, "Captions per encoder call.")
    flags.mark_flags_as_required(["encoder", "out_dir"])
    flags.mark_flags_as_mutual_exclusive(["shapes", "dataset_dir"], required=True)

def main(argv) -> None:
    """Encodes a dataset's captions into a cache, as the flags say."""
    from absl import flags

    from jaxt2i.config import ConfigError
    from jaxt2i.text.encoder import load_encoder  # pylint: disable=import-outside-toplevel
    from jaxt2i.workdir import disk_error

    F = flags.FLAGS
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}")
    try:
        source = _source_from_flags(F)
        encoder = load_encoder(F.encoder, "bfloat16", max_length=F.max_length)
        index = build_text_cache(encoder, source, F.out_dir, shard_size=F.shard_size,
                                 batch_size=F.batch_size)
    except OSError as e:
        if disk_error(e) is not None:
            raise  # a full disk or an unwritable --out_dir: one line, exit 1 (run_app)
        raise ConfigError(str(e)) from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(f"wrote {index['num_examples']} captions to {F.out_dir}", flush=True)


def cli() -> None:
    """Console-script entry point (`jaxt2i-text-cache`) of `python -m jaxt2i.data.text_cache`."""
    from jaxt2i.cli import run_app

    run_app(main, _define_flags)


if __name__ == "__main__":
    cli()
