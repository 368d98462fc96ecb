"""Building the datasets with Apache Beam (`build(..., beam_options=...)`, the CLI's `--beam`).

Imported only for a Beam build: apache-beam is an optional dependency (`pip install
'jaxt2i[beam]'`, in a virtual environment of its own). The examples and the report are those
of the single-machine build (`jaxt2i.data.builders`), made by the same functions
(`_shard_entries`, `_decode_sample`, `_load_entry`, `_shapes_example`); what Beam changes is
where they run:

* shards (`ImageTextShards`): one element per tar / parquet file, read and decoded on a
  worker; a key seen in several samples is settled by a GroupByKey on the key: the first usable
  sample in (shard index, position) order is written, the others are 'duplicate_key', as on one
  machine.
* an image folder (`ImageText`): the manifest (or the side-car `.txt` files) is read on the
  launching machine; the images are read and decoded on workers, in chunks of entries; a path
  listed twice is settled by a GroupByKey as above ('duplicate').
* the shapes world: chunks of scene indices rendered on workers.

Reports: every worker adds what it counted to a `PartialReport` (counts, per-shard counts and,
per kind, the example paths first in the single-machine build's order); the partial reports
are merged by a `CombineGlobally` (sums, and the first examples by that order, so the merge is
the same in any order) and one final step writes the result as JSON to a file `build` reads
when the pipeline is done. Nothing goes through the builder object: workers are other
processes, or other machines.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import shlex
from concurrent import futures

import apache_beam as beam
from apache_beam.options import pipeline_options as options_lib

from jaxt2i.data import inputs, shapes
from jaxt2i.data import shards as shards_lib
from jaxt2i.data.builders import (_decode_sample, _entry_key, _is_validation, _load_entry,
                                  _ordered_map, _shapes_example, _shard_entries, _text_example)

_MAX_EXAMPLES = 5  # example paths kept per kind, as `inputs.Report`
# Images (a folder) / scenes (shapes) per work item: at most _CHUNK, and fewer when there are
# fewer than _CHUNK * _MIN_CHUNKS, so that a small input still makes _MIN_CHUNKS work items
# (or one per item) to spread over the workers.
_CHUNK = 256
_MIN_CHUNKS = 64


def pipeline_options(flags) -> options_lib.PipelineOptions:
    """Beam's `PipelineOptions` from Beam's own command-line flags.

    Args:
      flags: a string as on Beam's command lines ('--runner=DataflowRunner --project=P ...',
        split as a shell would) or a list of flags; '' or [] is the DirectRunner with its
        defaults.

    Raises:
      ValueError: (one line) a flag Beam does not know (a typo such as `--runer` would
        otherwise be dropped with a warning and the build run on the DirectRunner), a word
        that is not a flag, or the DataflowRunner (builds are written to local folders).
    """
    args = shlex.split(flags) if isinstance(flags, str) else [str(f) for f in flags]
    unknown = _unknown_flags(args)
    if unknown:
        raise ValueError(f"--beam_options: {' '.join(unknown)} is not a Beam pipeline option "
                         "(pass Beam's own flags, e.g. --runner=DirectRunner "
                         "--direct_num_workers=2)")
    options = options_lib.PipelineOptions(args)
    runner = str(options.view_as(options_lib.StandardOptions).runner or "")
    if "dataflow" in runner.lower():
        # Its workers would write the files to their own disks, and the build would fail
        # only at the end, after paying for the cluster.
        raise ValueError(f"--beam_options: --runner={runner} writes from Google Cloud workers, "
                         "which cannot reach a local --data_dir, and a build is written to a "
                         "local folder (a gs:// --data_dir is uploaded from one); run it with "
                         "SparkRunner / FlinkRunner on machines that share a filesystem, or on "
                         "this machine")
    return options


def _unknown_flags(args: list[str]) -> list[str]:
    """The flags of `args` that no registered `PipelineOptions` class defines."""
    parser_cls = getattr(options_lib, "_BeamArgumentParser", None)
    if parser_cls is None:  # a Beam without it: leave the check to Beam's own warning
        return []
    parser = parser_cls(allow_abbrev=False)
    seen = set()
    for cls in options_lib.PipelineOptions.__subclasses__():
        if str(cls) not in seen:
            seen.add(str(cls))
            cls._add_argparse_args(parser)  # pylint: disable=protected-access
    return parser.parse_known_args(args)[1]


# --- reports -----------------------------------------------------------------------------


class PartialReport:
    """What one worker counted, mergeable with others in any order into the report of the
    single-machine build (`inputs.Report`, or `shards.ShardReport` for shards).

    Every count is a sum. Example paths are kept with an `order` key, (split, unit, position):
    split 0 (train) or 1 (validation), unit the shard's / entry's index, position within it;
    the manifest's own problems come first (split -1). A kind's examples are the
    `_MAX_EXAMPLES` of least order: those the single-machine build meets first (it builds the
    train split, then the validation split, each in shard / entry order).
    """

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self.examples: dict[str, list] = {}  # kind -> sorted [(order, path)]
        self.read = 0
        self.outcomes: collections.Counter = collections.Counter()
        self.shards: dict[str, dict] = {}

    def add(self, kind: str, order: tuple, example: str | None = None, *, n: int = 1,
            shard: str | None = None, outcome: bool = False) -> None:
        """Counts `n` of `kind` (in `shard`'s counts too, if given; `outcome`: what became of
        a sample read, as `ShardReport.outcome`); `example` is a path to show for it."""
        self.counts[kind] += n
        if example is not None:
            self._keep(kind, [(order, str(example))])
        if outcome:
            self.outcomes[kind] += n
        if shard is not None:
            self.shard_counts(shard)["counts"][kind] += n

    def shard_counts(self, shard: str) -> dict:
        return self.shards.setdefault(shard, {"read": 0, "counts": collections.Counter()})

    def count_read(self, shard: str) -> None:
        self.read += 1
        self.shard_counts(shard)["read"] += 1

    def _keep(self, kind: str, new: list) -> None:
        self.examples[kind] = sorted(self.examples.get(kind, []) + new)[:_MAX_EXAMPLES]

    def merge(self, other: "PartialReport") -> "PartialReport":
        self.counts.update(other.counts)
        self.outcomes.update(other.outcomes)
        self.read += other.read
        for kind, eg in other.examples.items():
            self._keep(kind, eg)
        for shard, v in other.shards.items():
            mine = self.shard_counts(shard)
            mine["read"] += v["read"]
            mine["counts"].update(v["counts"])
        return self

    @classmethod
    def of_report(cls, report: inputs.Report, split: int = -1) -> "PartialReport":
        """A plain `inputs.Report` made on one machine, placed before everything else (its
        examples in its own order)."""
        part = cls()
        part.counts.update(report.counts)
        for kind, eg in report.examples.items():
            if eg:
                part._keep(kind, [((split, 0, i), p) for i, p in enumerate(eg)])
        return part

    def to_json(self, shard_report: bool) -> dict:
        """`to_json()` of the `ShardReport` (`shard_report`) or `inputs.Report` it adds up
        to."""
        report = shards_lib.ShardReport() if shard_report else inputs.Report()
        report.counts.update({k: n for k, n in self.counts.items() if n})
        for kind, eg in sorted(self.examples.items()):
            report.examples[kind] = [p for _, p in eg]
        if shard_report:
            report.read = self.read
            report.outcomes.update(self.outcomes)
            for shard, v in self.shards.items():
                report.shard_counts(shard)["read"] = v["read"]
                report.shard_counts(shard)["counts"].update(v["counts"])
        return report.to_json()


class _MergeReports(beam.CombineFn):
    """`PartialReport`s -> the JSON of the whole build's report."""

    def __init__(self, shard_report: bool):
        super().__init__()
        self.shard_report = shard_report

    def create_accumulator(self):
        return PartialReport()

    def add_input(self, accumulator, element):
        return accumulator.merge(element)

    def merge_accumulators(self, accumulators):
        accumulators = iter(accumulators)
        first = next(accumulators)
        for other in accumulators:
            first.merge(other)
        return first

    def extract_output(self, accumulator):
        return accumulator.to_json(self.shard_report)


def _write_json(report: dict, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def _add_report(parts, shard_report: bool, path: str) -> None:
    """Merges the `PartialReport` PCollections `parts` and writes the JSON to `path`."""
    _ = (parts | "FlattenReports" >> beam.Flatten()
         | "MergeReports" >> beam.CombineGlobally(_MergeReports(shard_report))
         | "WriteReport" >> beam.Map(_write_json, path=path))


def report_only(builder, options: options_lib.PipelineOptions) -> None:
    """Runs the reading part of `builder`'s Beam build for its report alone (nothing is
    written but the report): when a split had no usable examples, TFDS's writer stops the
    pipeline, and the report may not have been written yet."""
    with beam.Pipeline(options=options) as pipeline:
        builder._beam_split_generators(None, pipeline)  # pylint: disable=protected-access


def report_path(builder) -> str:
    """Where the Beam build of `builder` writes its merged report (`build` sets it)."""
    path = getattr(builder, "_beam_report_path", None)
    if not path:
        raise ValueError("a Beam build runs through jaxt2i.data.builders.build(builder, "
                         "beam_options=...), which says where the report goes")
    return path


# --- splitting the winners of each key into the dataset's splits -------------------------


def _split_index(element, num_partitions):
    del num_partitions
    return element[0]


def _drop_split(element):
    return element[1]


def _to_splits(examples, names: list[str]) -> dict:
    """(split index, (key, example)) -> {split name: PCollection of (key, example)}."""
    if len(names) == 1:
        return {names[0]: examples | "Examples_" + names[0] >> beam.Map(_drop_split)}
    parts = examples | "PartitionSplits" >> beam.Partition(_split_index, len(names))
    return {name: parts[i] | "Examples_" + name >> beam.Map(_drop_split)
            for i, name in enumerate(names)}


# --- tar / parquet shards ----------------------------------------------------------------


class _ReadShard(beam.DoFn):
    """(shard index, path) -> ((split, key), (order, shard, where, w, h, example)) per usable
    sample, and one `PartialReport` of the shard (tag 'report')."""

    def __init__(self, cfg, root: str):
        super().__init__()
        self.cfg, self.root = cfg, root

    def process(self, element):
        index, path = element
        cfg = self.cfg
        shard = shards_lib.shard_name(path, self.root)
        part = PartialReport()
        part.shard_counts(shard)  # listed even if nothing in it can be read

        def samples():
            for n, entry in enumerate(_shard_entries(path, shard, cfg, True)):
                if entry[0] == "shard":
                    _, kind, detail, count = entry
                    part.add(kind, (0, index, n), detail, n=count, shard=shard)
                    continue
                item = entry[1]
                split = int(cfg.val_fraction > 0 and _is_validation(
                    item.key, cfg.val_fraction))
                order = (split, index, n)
                part.count_read(shard)
                for ev in item.events:
                    part.add(ev, order, f"{shard}:{item.key}", shard=shard)
                yield order, entry[1:]

        def decode(numbered):
            order, entry = numbered
            return order, _decode_sample((shard, *entry), cfg)

        for order, ((_, item, caps, events, outcome), data, (w, h)) in _ordered_map(
                decode, samples(), max(1, cfg.num_threads)):
            where = f"{shard}:{item.key}"
            for ev in events:
                part.add(ev, order, where, shard=shard)
            if outcome is not None:
                part.add(outcome, order, where, shard=shard, outcome=True)
                continue
            yield ((order[0], item.key),
                   (order, shard, where, w, h, _text_example(
                       where, data, caps, w, h)))
        yield beam.pvalue.TaggedOutput("report", part)


class _FirstOfKey(beam.DoFn):
    """((split, key), [(order, unit, where, w, h, example)]) -> (split, (key, example)) of the
    first by order; the others counted as `duplicate` (tag 'report', with the winner's
    'small' / 'ok'). `shard_report`: counts go to the unit's shard, as outcomes."""

    def __init__(self, small_warn: int, duplicate: str, shard_report: bool):
        super().__init__()
        self.small_warn, self.duplicate, self.shard_report = small_warn, duplicate, shard_report

    def process(self, element):
        (split, key), values = element
        values = sorted(values, key=lambda v: v[0])
        part = PartialReport()
        order, unit, where, w, h, example = values[0]
        shard = unit if self.shard_report else None
        if self.small_warn and min(w, h) < self.small_warn:
            part.add("small", order, where, shard=shard)
        part.add("ok", order, shard=shard, outcome=self.shard_report)
        for order, unit, where, *_ in values[1:]:
            part.add(self.duplicate, order, where, shard=unit if self.shard_report else None,
                     outcome=self.shard_report)
        yield split, (key, example)
        yield beam.pvalue.TaggedOutput("report", part)


def shards_splits(builder, pipeline) -> dict:
    """The split PCollections of an `ImageTextShards` Beam build (shards read in parallel,
    one per element); the report goes to `report_path(builder)`."""
    cfg = builder.builder_config
    paths = shards_lib.list_shards(cfg.input, cfg.source)
    root = shards_lib.shard_root(paths)
    read = (pipeline
            | "ListShards" >> beam.Create(list(enumerate(paths)))
            | "ReadShards" >> beam.ParDo(_ReadShard(cfg, root)).with_outputs(
                "report", main="samples"))
    first = (read.samples
             | "GroupByKey" >> beam.GroupByKey()
             | "FirstOfKey" >> beam.ParDo(_FirstOfKey(cfg.small_warn, "duplicate_key",
                                                      True)).with_outputs(
                 "report", main="examples"))
    _add_report((read.report, first.report), True, report_path(builder))
    names = ["train"] + (["validation"] if cfg.val_fraction > 0 else [])
    return _to_splits(first.examples, names)


# --- an image folder ---------------------------------------------------------------------


def _chunks(n: int) -> list[tuple[int, int]]:
    size = max(1, min(_CHUNK, math.ceil(n / _MIN_CHUNKS)))
    return [(i, min(n, i + size)) for i in range(0, n, size)]


class _ReadImages(beam.DoFn):
    """(first index, [(path, captions)]) -> ((split, key), (order, key, key, w, h, example))
    per usable image, and one `PartialReport` (tag 'report')."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def process(self, element):
        start, entries = element
        cfg = self.cfg
        part = PartialReport()
        with futures.ThreadPoolExecutor(max(1, cfg.num_threads)) as pool:
            loaded = pool.map(functools.partial(_load_entry, cfg=cfg), entries)
            for i, ((path, caps), data, (w, h), events) in enumerate(loaded, start):
                split = int(cfg.val_fraction > 0 and _is_validation(
                    path, cfg.val_fraction, "surrogateescape"))
                order = (split, i, 0)
                rel, renamed = _entry_key(path, cfg.root)
                if renamed:
                    part.add("non_utf8_path", order, rel)
                for ev in events:
                    part.add(ev, order, rel)
                if data is None:
                    continue
                yield ((split, rel), (order, rel, rel, w, h,
                                      _text_example(rel, data, caps, w, h)))
        yield beam.pvalue.TaggedOutput("report", part)


def image_text_splits(builder, pipeline, entries: list, manifest_report: inputs.Report) -> dict:
    """The split PCollections of an `ImageText` Beam build: `entries` ((path, captions), read
    from the manifest on this machine, whose problems `manifest_report` counted) read and
    decoded in parallel, in chunks."""
    cfg = builder.builder_config
    chunks = [(a, entries[a:b]) for a, b in _chunks(len(entries))]
    read = (pipeline
            | "ListImages" >> beam.Create(chunks)
            | "ReadImages" >> beam.ParDo(_ReadImages(cfg)).with_outputs("report",
                                                                        main="images"))
    first = (read.images
             | "GroupByKey" >> beam.GroupByKey()
             | "FirstOfKey" >> beam.ParDo(_FirstOfKey(cfg.small_warn, "duplicate",
                                                      False)).with_outputs(
                 "report", main="examples"))
    manifest = pipeline | "ManifestReport" >> beam.Create(
        [PartialReport.of_report(manifest_report)])
    _add_report((manifest, read.report, first.report), False, report_path(builder))
    names = ["train"] + (["validation"] if cfg.val_fraction > 0 else [])
    return _to_splits(first.examples, names)


# --- the shapes world --------------------------------------------------------------------


def _render_shapes(chunk, resolution: int, size: int, split: str, seed: int):
    start, stop = chunk
    src = shapes.ShapesSource(resolution, size, split, seed)
    for i in range(start, stop):
        yield _shapes_example(src, i)


def shapes_splits(builder, pipeline) -> dict:
    """The split PCollections of a `ShapesWorld` Beam build: chunks of scene indices
    rendered in parallel (no report: nothing can go wrong with an input)."""
    c = builder.builder_config
    sizes = {"train": c.train_size, "test": c.test_size, "held_out": c.held_out_size}
    return {split: (pipeline
                    | f"Indices_{split}" >> beam.Create(_chunks(n))
                    | f"Render_{split}" >> beam.FlatMap(_render_shapes, c.resolution, n,
                                                        split, c.seed))
            for split, n in sizes.items() if n > 0}
