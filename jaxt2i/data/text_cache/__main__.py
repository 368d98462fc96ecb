"""`python -m jaxt2i.data.text_cache` (console script `jaxt2i-text-cache`): encode a dataset's
captions once into a T5 embedding cache.

    python -m jaxt2i.data.text_cache --encoder=T5_DIR --shapes=train:10000 --out_dir=CACHE

Several processes build one cache together with --coordinator/--num_processes/--process_id
(as `python -m jaxt2i.train`; `MODULE=jaxt2i.data.text_cache launch/local_multiprocess.sh`
starts them locally, a cluster launcher elsewhere). A cache of a built dataset (--dataset_dir)
has one shard per dataset file. Each process shards T5 over its own local devices (--mesh,
default fsdp over all of them; see `jaxt2i.data.text_cache.sharded`). Parses the flags and calls
`jaxt2i.data.text_cache.build_text_cache`.
"""

from __future__ import annotations

from jaxt2i.data.text_cache import build_text_cache, dataset_shard_lengths


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

    flags.DEFINE_string("encoder", None, "Hugging Face T5 directory (jaxt2i.text.encoder), or "
                        "'bundled': the package's small shapes-world T5 (text.encoder's default).")
    flags.DEFINE_string("out_dir", None, "Where to write the cache.")
    flags.DEFINE_string("shapes", None, "SPLIT:SIZE[:SEED] of the shapes world, e.g. "
                        "train:10000.")
    flags.DEFINE_string("dataset_dir", None, "A built TFDS dataset directory (name/config/ver).")
    flags.DEFINE_string("split", "train", "Split of --dataset_dir.")
    flags.DEFINE_integer("max_length", None, "Text length L (default: the encoder's).")
    flags.DEFINE_integer("shard_size", 4096, "Captions per shard file (--shapes; a built "
                         "dataset's cache follows the dataset's files unless --noaligned).")
    flags.DEFINE_bool("aligned", True, "With --dataset_dir: one cache shard per dataset file.")
    flags.DEFINE_string("coordinator", None, "host:port of process 0 when several processes "
                        "build the cache together.")
    flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator).")
    flags.DEFINE_integer("process_id", None, "This process's id (with --coordinator).")
    flags.DEFINE_integer("batch_size", 64, "Captions per encoder call (a multiple of the "
                         "mesh's data x fsdp size).")
    flags.DEFINE_string("mesh", "fsdp:-1", "How T5 is split over this process's local devices: "
                        "AXIS:SIZE[,...] of data / fsdp / tensor, -1 for the rest, e.g. fsdp:4 "
                        "or data:2,tensor:2 (default: fsdp over all local devices).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "T5's compute dtype (params "
                      "are bfloat16 either way); float32 gives the same cache on any mesh.")
    flags.DEFINE_integer("log_every", 10, "Print progress every this many shards (0: never).")
    flags.mark_flags_as_required(["encoder", "out_dir"])
    flags.mark_flags_as_mutual_exclusive(["shapes", "dataset_dir"], required=True)

def main(argv) -> None:
    """Encodes a dataset's captions into a cache, as the flags say."""
    from absl import flags

    from jaxt2i import assets
    from jaxt2i.config import ConfigError
    from jaxt2i.data.text_cache.sharded import local_mesh, load_sharded_encoder
    from jaxt2i.workdir import disk_error

    F = flags.FLAGS
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}")
    try:
        source = _source_from_flags(F)
        import jax

        from jaxt2i.parallel import initialize_distributed

        initialize_distributed(F.coordinator, F.num_processes, F.process_id)
        path = assets.text_encoder_dir() if F.encoder == "bundled" else F.encoder
        encoder = load_sharded_encoder(path, local_mesh(F.mesh), dtype=F.dtype,
                                       max_length=F.max_length)
        sizes = dataset_shard_lengths(source) if F.dataset_dir and F.aligned else None
        index = build_text_cache(encoder, source, F.out_dir, shard_size=F.shard_size,
                                 shard_sizes=sizes, batch_size=F.batch_size,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count(), log_every=F.log_every)
    except OSError as e:
        if disk_error(e) is not None:
            raise  # a full disk or an unwritable --out_dir: one line, exit 1 (run_app)
        raise ConfigError(str(e)) from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if jax.process_index() == 0:
        b = index["build"]
        print(f"wrote {index['num_examples']} captions to {F.out_dir}: "
              f"{index['bytes'] / 2**20:.1f} MiB in {len(index['shards'])} shards; encoded "
              f"{b['captions_encoded']} at {b['captions_per_s']:.0f} captions/s "
              f"({b['processes']} process(es) x {jax.local_device_count()} devices, mesh "
              f"{dict(encoder.mesh.shape)})", flush=True)


def cli() -> None:
    """Console-script entry point (`jaxt2i-text-cache`) of `python -m jaxt2i.data.text_cache`."""
    from jaxt2i.cli import run_app

    run_app(main, _define_flags)


if __name__ == "__main__":
    cli()
