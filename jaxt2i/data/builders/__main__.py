"""`python -m jaxt2i.data.builders` (console script `jaxt2i-build-data`): build the shapes world,
a folder of captioned images, or tar / parquet shards (img2dataset's output) into a TFDS data
dir.

    python -m jaxt2i.data.builders --data_dir=DIR --root=IMAGES [--manifest=FILE]
    python -m jaxt2i.data.builders --data_dir=DIR --input=SHARDS [--source=parquet]
    python -m jaxt2i.data.builders --data_dir=DIR --shapes=64:10000

Any of them with Apache Beam (apache-beam installed: `pip install 'jaxt2i[beam]'`, in a venv of
its own); --beam_options are Beam's own pipeline options, passed through:

    python -m jaxt2i.data.builders ... --beam \
        --beam_options="--runner=DirectRunner --direct_num_workers=2 \
                        --direct_running_mode=multi_processing"

--root, --manifest and --input may be URLs (gs://bucket/dir, s3://..., any fsspec protocol;
gs:// needs gcsfs); --data_dir may be one too (built in a local folder, then uploaded).

Parses the flags and calls `jaxt2i.data.builders.build` on the builder they name.
"""

from __future__ import annotations

from jaxt2i import paths as paths_lib
from jaxt2i.data.builders import (beam_module, build, check_data_dir, dataset_location,
                                  image_text_builder, shapes_builder, shards_builder)

_SHARD_FLAGS = ("source", "caption_field", "image_field", "max_aspect")
_ROOT_FLAGS = ("manifest", "format")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("data_dir", None, "TFDS data directory: a local folder or a URL "
                        "(gs://bucket/tfds: built locally, then uploaded).")
    flags.DEFINE_string("shapes", None, "Build the shapes world: RES:TRAIN[:TEST[:HELD_OUT[:SEED]]],"
                        " e.g. 64:10000.")
    flags.DEFINE_string("root", None, "Build a folder of images with captions (a path or a URL: "
                        "gs://bucket/dir needs gcsfs).")
    flags.DEFINE_string("manifest", None, "JSONL / CSV / COCO JSON captions of --root (a path or "
                        "a URL); none: side-car .txt files.")
    flags.DEFINE_string("format", "auto", "Manifest format: auto, jsonl, csv, coco or txt.")
    flags.DEFINE_string("input", None, "Build tar or parquet shards (img2dataset's output): a "
                        "folder, a glob (DIR/*.tar) or files joined by commas; paths or URLs "
                        "(gs://bucket/dir needs gcsfs).")
    flags.DEFINE_enum("source", "webdataset", ["webdataset", "parquet"], "Layout of --input: "
                      "tar shards (webdataset) or parquet files with the image bytes.")
    flags.DEFINE_string("caption_field", "auto", "Caption of --input: auto, a member / column "
                        "name (txt, caption) or json:FIELD (a field of each sample's .json).")
    flags.DEFINE_string("image_field", "auto", "Image of --input: auto (any image extension; "
                        "parquet: jpg / png / webp / image column) or a name.")
    flags.DEFINE_float("max_aspect", 5.0, "Skip --input images more than this many times "
                       "wider than high, or the reverse.")
    flags.DEFINE_string("name", None, "Config name (default: the folder's name).")
    flags.DEFINE_integer("num_shards", None, "Files per split (default: TFDS picks by size).")
    flags.DEFINE_integer("min_size", 0, "Skip smaller images (px).")
    flags.DEFINE_integer("small_warn", 0, "Count images below this size (px).")
    flags.DEFINE_integer("max_size", None, "Downscale larger images (px).")
    flags.DEFINE_float("val_fraction", 0.0, "Fraction of --root's / --input's examples in a "
                       "validation split.")
    flags.DEFINE_boolean("beam", False, "Build with Apache Beam (needs apache-beam: pip install "
                         "'jaxt2i[beam]'); the same examples and report as without.")
    flags.DEFINE_string("beam_options", None, "With --beam: Beam's own pipeline options, as on "
                        "Beam's command lines, e.g. \"--runner=DirectRunner "
                        "--direct_num_workers=2 --direct_running_mode=multi_processing\" or "
                        "\"--runner=FlinkRunner --flink_master=HOST:8081\" (default: the "
                        "DirectRunner, one worker; DataflowRunner needs a gs:// --data_dir, "
                        "not supported yet).")
    flags.DEFINE_boolean("rebuild", False, "Replace an earlier build of the same name whose "
                         "inputs or options differ (refused by default).")
    flags.mark_flag_as_required("data_dir")
    flags.mark_flags_as_mutual_exclusive(["shapes", "root", "input"], required=True)


def main(argv) -> None:
    """Builds the shapes world, a user's folder or shards into a TFDS data dir, as the flags
    say."""
    from absl import flags

    from jaxt2i.config import ConfigError
    from jaxt2i.workdir import disk_error

    F = flags.FLAGS
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}")
    if F.root:  # before TFDS starts (and logs) anything
        for name in ("root", "manifest"):  # a URL's filesystem (gs:// needs gcsfs)
            if paths_lib.is_url(F[name].value):
                try:
                    paths_lib.filesystem(F[name].value)
                except (paths_lib.MissingFilesystem, ValueError) as e:
                    raise ConfigError(f"--{name}: {e}") from None
        if not paths_lib.isdir(F.root):
            raise ConfigError(f"image folder {F.root!r} not found; pass an existing --root")
    for names, needs in ((_SHARD_FLAGS, "input"), (_ROOT_FLAGS, "root")):
        for name in names:
            if F[name].present and not F[needs].value:
                raise ConfigError(f"--{name} applies to --{needs} only; drop it or pass "
                                  f"--{needs}")
    if F.beam_options is not None and not F.beam:
        raise ConfigError("--beam_options applies with --beam only; add --beam or drop it")
    if F.input and not F.max_aspect >= 1:
        raise ConfigError(f"--max_aspect={F.max_aspect} must be at least 1 (5 skips strips "
                          "more than five times wider than high)")
    try:
        check_data_dir(F.data_dir)
        beam_options = None
        if F.beam:  # apache-beam, and its options, before anything is read or written
            beam_options = F.beam_options or ""
            try:
                beam_module().pipeline_options(beam_options)
            except ImportError as e:  # not installed: names the extra
                raise ConfigError(str(e)) from None
        if F.shapes:
            parts = F.shapes.split(":")
            if not 2 <= len(parts) <= 5 or not all(x.isdigit() for x in parts):
                raise ValueError(f"--shapes={F.shapes!r} must be "
                                 f"RES:TRAIN[:TEST[:HELD_OUT[:SEED]]], e.g. 64:10000")
            n = [int(x) for x in parts] + [0] * (5 - len(parts))
            if not 8 <= n[0] <= 4096:
                raise ValueError(f"--shapes resolution {n[0]} must be between 8 and 4096 px")
            builder = shapes_builder(F.data_dir, n[0], n[1], test_size=n[2],
                                     held_out_size=n[3], seed=n[4])
        elif F.input:
            try:
                builder = shards_builder(
                    F.data_dir, F.input, F.source, name=F.name, caption_field=F.caption_field,
                    image_field=F.image_field, min_size=F.min_size, small_warn=F.small_warn,
                    max_size=F.max_size, max_aspect=F.max_aspect, val_fraction=F.val_fraction)
            except ImportError as e:  # parquet without pyarrow: names the extra
                raise ConfigError(str(e)) from None
        else:
            builder = image_text_builder(
                F.data_dir, F.root, F.manifest, name=F.name, format=F.format,
                min_size=F.min_size, small_warn=F.small_warn, max_size=F.max_size,
                val_fraction=F.val_fraction)
        report = build(builder, rebuild=F.rebuild, num_shards=F.num_shards,
                       beam_options=beam_options)
    except paths_lib.MissingFilesystem as e:  # gs:// without gcsfs: what to install
        raise ConfigError(str(e)) from None
    except OSError as e:
        if disk_error(e) is not None:
            raise  # a full disk or an unwritable --data_dir: one line, exit 1 (run_app)
        raise ConfigError(str(e)) from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(report.summary() or "no input problems")
    print(f"dataset: {dataset_location(builder)}", flush=True)


def cli() -> None:
    """Console-script entry point (`jaxt2i-build-data`) of `python -m jaxt2i.data.builders`."""
    from jaxt2i.cli import run_app

    run_app(main, _define_flags)


if __name__ == "__main__":
    cli()
