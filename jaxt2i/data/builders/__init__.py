"""TFDS dataset builders: the shapes world, a user's own images with captions, and sharded
image-text data (img2dataset's webdataset or parquet output, other webdataset tars).

Both write array_record files with `tfds` and are read back through random access
(`builder.as_data_source(split)`), without TensorFlow: images are stored as encoded
PNG/JPEG bytes (`tfds.features.Image` would import TensorFlow to encode) and decoded with
Pillow by the pipeline.

User data comes as a folder of images with captions from a JSONL or CSV manifest, from
side-car `.txt` files, or from a COCO-style captions JSON (read by `inputs`); sharded data
from tar or parquet shards (read by `shards`, one machine, no Beam). Bad inputs never stop a
build: each is converted or skipped and counted in a `Report` with example paths, logged at
the end and written beside the data as `build_report.json`.

CLI (console script `jaxt2i-build-data`):
     python -m jaxt2i.data.builders --data_dir=DIR --root=IMAGES [--manifest=FILE]
     python -m jaxt2i.data.builders --data_dir=DIR --input=SHARDS [--source=parquet]
     python -m jaxt2i.data.builders --data_dir=DIR --shapes=64:10000
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import zlib
from concurrent import futures

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from jaxt2i import paths as paths_lib
from jaxt2i.data import inputs, shapes
from jaxt2i.data import shards as shards_lib

REPORT_FILE = "build_report.json"
INPUTS_FILE = "build_inputs.json"


def check_data_dir(data_dir) -> None:
    """Raises ValueError (one line) for a `data_dir` URL: builds are written to a local folder
    (URLs are read as inputs only, so far)."""
    if paths_lib.is_url(str(data_dir)):
        raise ValueError(f"--data_dir={str(data_dir)!r}: datasets are written to a local folder "
                         "for now (URLs are read as --input / --root / --manifest only); pass a "
                         "local --data_dir")


# --- the shapes world --------------------------------------------------------------------


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    """Resolution, split sizes and seed of a built shapes dataset."""

    resolution: int = 64
    train_size: int = 10000
    test_size: int = 1000
    held_out_size: int = 1000
    seed: int = 0


class ShapesWorld(tfds.core.GeneratorBasedBuilder):
    """The procedural shapes dataset (`jaxt2i.data.shapes`) at a chosen resolution."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [ShapesConfig(name="r64_n10000_s0")]
    code_path = None  # nothing is downloaded, so TFDS needs no checksums file beside us

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Procedural captioned shapes scenes (jaxt2i's embedded default).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # PNG bytes
                "caption": tfds.features.Text(),
                "scene": tfds.features.Text(),  # JSON of the structured scene
                "index": tfds.features.Scalar(dtype=np.int64),  # index in ShapesSource
            }))

    def _split_generators(self, dl_manager):
        del dl_manager
        c = self.builder_config
        sizes = {"train": c.train_size, "test": c.test_size, "held_out": c.held_out_size}
        return {k: self._generate_examples(k, n) for k, n in sizes.items() if n > 0}

    def _generate_examples(self, split: str, size: int):
        src = shapes.ShapesSource(self.builder_config.resolution, size, split,
                                  self.builder_config.seed)
        for i in range(size):
            ex = src[i]
            buf = io.BytesIO()
            Image.fromarray(ex["image"]).save(buf, "PNG", compress_level=3)
            yield i, {"image": buf.getvalue(), "caption": ex["caption"],
                      "scene": ex["scene"], "index": i}


def shapes_builder(data_dir: str, resolution: int, train_size: int, *, test_size: int = 0,
                   held_out_size: int = 0, seed: int = 0) -> ShapesWorld:
    """A `ShapesWorld` builder for one resolution/size/seed (call `build` on it).

    Args:
      data_dir: TFDS data directory.
      resolution: image side in pixels.
      train_size, test_size, held_out_size: examples per split (0 leaves a split out).
      seed: dataset seed.

    Returns:
      The builder; config name 'r{resolution}_n{train_size}_s{seed}'.
    """
    check_data_dir(data_dir)
    cfg = ShapesConfig(name=f"r{resolution}_n{train_size}_s{seed}", resolution=resolution,
                       train_size=train_size, test_size=test_size,
                       held_out_size=held_out_size, seed=seed)
    return ShapesWorld(config=cfg, data_dir=data_dir, file_format="array_record")


# --- a user's images with captions -------------------------------------------------------


@dataclasses.dataclass
class ImageTextConfig(tfds.core.BuilderConfig):
    """Where a user's images and captions are, and how to treat them.

    Attributes:
      root: folder of the images (relative manifest paths start here).
      manifest: JSONL / CSV / COCO captions JSON; None reads side-car `.txt` files.
      format: 'auto' (from the manifest's name and content), 'jsonl', 'csv', 'coco', 'txt'.
      min_size: skip images whose shorter side is smaller (0 keeps all; the pipeline
        upsamples small ones, and `small_warn` counts them).
      small_warn: shorter sides below this are counted as 'small' (e.g. the stage size).
      max_size: downscale images whose shorter side is larger (saves space).
      val_fraction: fraction of examples (by a hash of their path) put in 'validation'.
      num_threads: image decode/re-encode threads.
    """

    root: str = ""
    manifest: str | None = None
    format: str = "auto"
    min_size: int = 0
    small_warn: int = 0
    max_size: int | None = None
    val_fraction: float = 0.0
    num_threads: int = 4


def _image_text_features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # PNG/JPEG bytes
        "caption": tfds.features.Text(),
        "captions": tfds.features.Text(),  # all captions, one per line (COCO)
        "path": tfds.features.Text(),  # folder builds: the file; shards: 'SHARD:KEY'
        "width": tfds.features.Scalar(dtype=np.int32),
        "height": tfds.features.Scalar(dtype=np.int32),
    })


class ImageText(tfds.core.GeneratorBasedBuilder):
    """A user's own images with captions (folder + manifest, side-car text, or COCO)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [ImageTextConfig(name="default")]
    code_path = None  # nothing is downloaded, so TFDS needs no checksums file beside us

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description="Images with captions from a local folder.",
            features=_image_text_features())

    @property
    def report(self) -> inputs.Report:
        if not hasattr(self, "_report"):
            self._report = inputs.Report()
        return self._report

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        entries = list(inputs.read_entries(cfg.root, cfg.manifest, cfg.format, self.report))
        frac = self.builder_config.val_fraction
        if frac <= 0:
            return {"train": self._generate_examples(entries)}
        is_val = [zlib.crc32(e[0].encode("utf-8", "surrogateescape")) % 10000 < frac * 10000
                  for e in entries]
        return {"train": self._generate_examples([e for e, v in zip(entries, is_val) if not v]),
                "validation": self._generate_examples([e for e, v in zip(entries, is_val)
                                                       if v])}

    def _generate_examples(self, entries):
        cfg = self.builder_config
        seen = set()

        def work(entry):
            path, caps = entry
            try:
                with paths_lib.open_binary(path) as f:
                    data = f.read()
            except OSError:
                return entry, None, (0, 0), ["missing_image"]
            return (entry, *inputs.load_image(data, min_size=cfg.min_size,
                                              max_size=cfg.max_size))

        with futures.ThreadPoolExecutor(max(1, cfg.num_threads)) as pool:
            for (path, caps), data, (w, h), events in pool.map(work, entries):
                rel = paths_lib.relpath(path, cfg.root) if cfg.root else path
                clean = rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                if clean != rel:  # keys and stored paths must be valid UTF-8
                    rel = clean
                    self.report.add("non_utf8_path", rel)
                for ev in events:
                    self.report.add(ev, rel)
                if data is None:
                    continue
                if rel in seen:
                    self.report.add("duplicate", rel)
                    continue
                seen.add(rel)
                if cfg.small_warn and min(w, h) < cfg.small_warn:
                    self.report.add("small", rel)
                self.report.add("ok")
                yield rel, {"image": data, "caption": caps[0], "captions": "\n".join(caps),
                            "path": rel, "width": w, "height": h}


def image_text_builder(data_dir: str, root: str, manifest: str | None = None, *,
                       name: str | None = None, **options) -> ImageText:
    """An `ImageText` builder for a user's folder (call `build` on it).

    Args:
      data_dir: TFDS data directory.
      root: folder of the images: a local path or a URL (`gs://bucket/images`, any fsspec
        protocol: `jaxt2i.paths`).
      manifest: JSONL / CSV / COCO JSON path (or URL), or None for side-car `.txt` captions.
      name: config name (lowercase letters, digits, '_'); default from the folder name.
      **options: other `ImageTextConfig` fields (format, min_size, small_warn, max_size,
        val_fraction, num_threads).

    Returns:
      The builder.
    """
    check_data_dir(data_dir)
    if name is None:
        base = (paths_lib.basename(root) if paths_lib.is_url(root) else
                os.path.basename(os.path.normpath(root))).lower() or "default"
        name = "".join(ch if ch.isalnum() and ch.isascii() else "_" for ch in base)
    cfg = ImageTextConfig(name=name, root=root, manifest=manifest, **options)
    return ImageText(config=cfg, data_dir=data_dir, file_format="array_record")


# --- sharded image-text data (img2dataset output, webdataset tars, parquet) ---------------


@dataclasses.dataclass
class ShardsConfig(tfds.core.BuilderConfig):
    """Where the shards are, how to read them, and which images to keep.

    Attributes:
      input: a folder of shards, a glob, a file, or several joined by commas
        (`shards.list_shards`).
      source: 'webdataset' (tar shards) or 'parquet'.
      caption_field: 'auto' (webdataset: the `txt`, `caption` or `text` member, else the JSON
        member's `caption` / `TEXT` / `text`; parquet: the `txt`, `caption`, `TEXT` or `text`
        column), a member / column name, or 'json:FIELD' (webdataset).
      image_field: 'auto' (any image extension / a `jpg`, `png`, `webp`, `image` column) or
        a name.
      min_size, small_warn, max_size, val_fraction, num_threads: as in `ImageTextConfig`
        (the validation split is drawn by a hash of the sample's key).
      max_aspect: skip images more than this many times wider than high, or the reverse.
    """

    input: str = ""
    source: str = "webdataset"
    caption_field: str = "auto"
    image_field: str = "auto"
    min_size: int = 0
    small_warn: int = 0
    max_size: int | None = None
    max_aspect: float = inputs.MAX_ASPECT
    val_fraction: float = 0.0
    num_threads: int = 4


class ImageTextShards(tfds.core.GeneratorBasedBuilder):
    """Images with captions from tar (webdataset) or parquet shards, on one machine.

    The same features as `ImageText`; `path` is 'SHARD:KEY'. Every sample read is written or
    skipped for a counted reason, per shard (`shards.ShardReport`); damaged shards are
    counted and the build goes on. A key already written is skipped ('duplicate_key'): the
    first usable sample of a key, in shard order, is kept.
    """

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [ShardsConfig(name="default")]
    code_path = None  # nothing is downloaded, so TFDS needs no checksums file beside us

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description="Images with captions from tar or parquet shards.",
            features=_image_text_features())

    @property
    def report(self) -> shards_lib.ShardReport:
        if not hasattr(self, "_report"):
            self._report = shards_lib.ShardReport()
        return self._report

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        paths = shards_lib.list_shards(cfg.input, cfg.source)
        frac = cfg.val_fraction
        if frac <= 0:
            return {"train": self._generate_examples(paths, None, True, True)}

        def is_val(key):
            return zlib.crc32(key.encode("utf-8")) % 10000 < frac * 10000

        # Each split reads every shard and keeps its own keys; shard problems are counted
        # once, in the first.
        return {"train": self._generate_examples(paths, lambda k: not is_val(k), True, False),
                "validation": self._generate_examples(paths, is_val, False, True)}

    def _samples(self, paths, select, first):
        """(shard name, Sample, [caption], [events], outcome) of the samples `select`
        keeps, in order; captions are cleaned here (the report is not shared with threads)."""
        cfg = self.builder_config
        report, root = self.report, shards_lib.shard_root(paths)
        for path in paths:
            shard = shards_lib.shard_name(path, root)
            report.shard_counts(shard)  # listed even if nothing in it can be read
            if first:
                for status, n in sorted(shards_lib.upstream_stats(path).items()):
                    report.event(shard, f"img2dataset_{status}", shard, n)
            for item in shards_lib.read_shard(path, cfg.source, caption_field=cfg.caption_field,
                                              image_field=cfg.image_field):
                if isinstance(item, shards_lib.ShardProblem):
                    if first:
                        report.event(shard, item.kind, item.detail)
                    continue
                if select is not None and not select(item.key):
                    continue
                report.count_read(shard)
                where = f"{shard}:{item.key}"
                for ev in item.events:
                    report.event(shard, ev, where)
                if item.problem:
                    yield shard, item, None, [], item.problem
                    continue
                log = _KindLog()
                caps = inputs._clean_captions(  # pylint: disable=protected-access
                    item.captions, where, log)
                if not caps:
                    yield shard, item, None, log.kinds[:-1], log.kinds[-1]
                    continue
                yield shard, item, caps, log.kinds, None

    def _generate_examples(self, paths, select, first: bool, last: bool):
        """The examples of one split (`select`: its keys, None: all); `first` counts shard
        problems, `last` logs the balance of the whole build."""
        cfg, report = self.builder_config, self.report
        seen = set()

        def work(entry):
            shard, item, caps, events, outcome = entry
            if outcome is not None:
                return entry, None, (0, 0)
            data, size, more = inputs.load_image(item.image, min_size=cfg.min_size,
                                                 max_size=cfg.max_size,
                                                 max_aspect=cfg.max_aspect)
            if data is None:
                return (shard, item, caps, events + more[:-1], more[-1]), None, size
            return (shard, item, caps, events + more, None), data, size

        entries = self._samples(paths, select, first)
        for (shard, item, caps, events, outcome), data, (w, h) in _ordered_map(
                work, entries, max(1, cfg.num_threads)):
            where = f"{shard}:{item.key}"
            for ev in events:
                report.event(shard, ev, where)
            if outcome is None and item.key in seen:
                outcome = "duplicate_key"
            if outcome is not None:
                report.outcome(shard, outcome, where)
                continue
            seen.add(item.key)
            if cfg.small_warn and min(w, h) < cfg.small_warn:
                report.event(shard, "small", where)
            report.outcome(shard, "ok")
            yield item.key, {"image": data, "caption": caps[0], "captions": "\n".join(caps),
                             "path": where, "width": w, "height": h}
        if last:
            line = report.balance_line()
            (logging.info if report.balanced else logging.error)("%s", line)


class _KindLog:
    """Collects the kinds `inputs._clean_captions` reports for one sample."""

    def __init__(self):
        self.kinds: list[str] = []

    def add(self, kind: str, path: str | None = None) -> None:
        del path
        self.kinds.append(kind)


def _ordered_map(fn, items, threads: int, window: int = 64):
    """`fn` over `items` on `threads` threads, results in order, at most `window` ahead (a
    shard stream is not read into memory at once, as `Executor.map` would)."""
    with futures.ThreadPoolExecutor(threads) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= max(window, threads):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def shards_builder(data_dir: str, input: str,  # pylint: disable=redefined-builtin
                   source: str = "webdataset", *, name: str | None = None,
                   **options) -> ImageTextShards:
    """An `ImageTextShards` builder for tar or parquet shards (call `build` on it).

    Args:
      data_dir: TFDS data directory.
      input: the shards: a folder, a glob, a file, or several joined by commas; local or
        URLs (`gs://bucket/shards`, any fsspec protocol: `jaxt2i.paths`).
      source: 'webdataset' or 'parquet'.
      name: config name; default from the shards' folder name.
      **options: other `ShardsConfig` fields (caption_field, image_field, min_size,
        small_warn, max_size, max_aspect, val_fraction, num_threads).

    Returns:
      The builder (TFDS name 'image_text_shards').

    Raises:
      ValueError: an unknown source, a field flag that does not fit it, or no shards (one
        line each); ImportError: parquet without pyarrow (naming the `[data]` extra), a URL
        without its filesystem (`paths.MissingFilesystem`: gs:// needs gcsfs).
    """
    check_data_dir(data_dir)
    shards_lib.check_fields(source, options.get("caption_field", "auto"),
                            options.get("image_field", "auto"))
    paths = shards_lib.list_shards(input, source)
    if name is None:
        base = paths_lib.basename(shards_lib.shard_root(paths)).lower() or "default"
        name = "".join(ch if ch.isalnum() and ch.isascii() else "_" for ch in base)
    cfg = ShardsConfig(name=name, input=input, source=source, **options)
    return ImageTextShards(config=cfg, data_dir=data_dir, file_format="array_record")


def _input_files(builder) -> tuple[str, list[str]] | None:
    """(folder that names are relative to, the files a build reads), or None (shapes)."""
    cfg = builder.builder_config
    if isinstance(builder, ImageText):
        paths = [cfg.manifest] if cfg.manifest else []
        for dirpath, dirnames, names in paths_lib.walk(cfg.root):
            dirnames.sort()
            paths.extend(paths_lib.join(dirpath, x) for x in sorted(names))
        return cfg.root, paths
    if isinstance(builder, ImageTextShards):
        try:
            paths = shards_lib.list_shards(cfg.input, cfg.source)
        except ValueError:
            return "", []
        stats = []
        for p in paths:
            stem = p[:-len(".parquet")] if p.endswith(".parquet") else p.rsplit(".tar", 1)[0]
            stats.append(stem + "_stats.json")  # its upstream counts are in the report
        return shards_lib.shard_root(paths), paths + [p for p in stats if paths_lib.exists(p)]
    return None


def build_inputs(builder: tfds.core.DatasetBuilder) -> dict:
    """What a build was made from: the builder's options and, for a user's folder, a digest of
    every file under it (path, size, modification time) and of the manifest; for shards, of
    every shard (and img2dataset's `_stats.json` beside it). Inputs that are URLs are digested
    by (path, size, the store's generation / ETag / modification time); local ones exactly as
    before URLs were read, so earlier builds are not refused.

    Stored beside the data (`build_inputs.json`); a later build of the same name whose
    inputs differ is refused instead of returning the old data as new.
    """
    cfg = builder.builder_config
    options = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
               if f.name not in ("name", "version", "release_notes", "supported_versions",
                                 "description", "tags", "num_threads")}
    record: dict = {"builder": builder.name, "options": {}}
    for k, v in sorted(options.items()):
        if k in ("root", "manifest") and v:
            v = paths_lib.abspath(v)
        if k == "input" and v:
            v = ",".join(paths_lib.abspath(p) for p in v.split(",") if p)
        record["options"][k] = v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
    files = _input_files(builder)
    if files is not None:
        base, paths = files
        h, n = hashlib.sha256(), 0
        for path in paths:
            if paths_lib.is_url(path):
                try:
                    size, version = paths_lib.file_version(path)
                except OSError:
                    continue
                n += 1
                h.update(f"{paths_lib.relpath(path, base)}\0{size}\0{version}\n"
                         .encode("utf-8", "surrogateescape"))
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue
            n += 1
            h.update(f"{os.path.relpath(path, base)}\0{st.st_size}\0{st.st_mtime_ns}\n"
                     .encode("utf-8", "surrogateescape"))
        record["files"] = {"count": n, "sha256": h.hexdigest()}
    return record


def _inputs_difference(old: dict, new: dict) -> str | None:
    """How two `build_inputs` records differ, in words (None if they do not)."""
    for k in sorted(set(old.get("options", {})) | set(new.get("options", {}))):
        a, b = old.get("options", {}).get(k), new.get("options", {}).get(k)
        if a != b:
            return f"{k} was {a!r} when it was built, now {b!r}"
    if old.get("files") != new.get("files"):
        a, b = old.get("files") or {}, new.get("files") or {}
        return (f"the input files changed since it was built ({a.get('count', '?')} files then, "
                f"{b.get('count', '?')} now, or some were modified)")
    return None


def build(builder: tfds.core.DatasetBuilder, *, rebuild: bool = False,
          num_shards: int | None = None) -> inputs.Report:
    """Generates a dataset (if not already built from the same inputs) and returns its report.

    Args:
      builder: from `shapes_builder`, `image_text_builder` or `shards_builder`.
      rebuild: replace an existing build of the same name whose inputs differ (by default
        that is refused with a ValueError naming the difference).
      num_shards: files per split (default: TFDS's choice, by size); a layout choice, not an
        input: an existing build is kept whatever its file count.

    Returns:
      The `Report` (empty for shapes); also logged and written to
      `<builder.data_dir>/build_report.json`. A dataset already built from the same inputs
      returns the report saved with it.

    Builds of one dataset are serialised by a lock; a build that was killed leaves TFDS's
    `incomplete.*` directory, which the next build removes (builds are not resumable: it
    starts from the beginning, and says so).
    """
    from jaxt2i.workdir import WorkdirLock

    version_dir = builder.data_dir
    config_dir = os.path.dirname(version_dir)
    wanted = build_inputs(builder)
    with WorkdirLock(config_dir, flag="--data_dir (a build of this dataset is running)"):
        if builder.is_prepared():
            saved_inputs = _read_json(os.path.join(version_dir, INPUTS_FILE))
            diff = _inputs_difference(saved_inputs, wanted) if saved_inputs else None
            if saved_inputs is None:
                logging.warning("%s was built by an older jaxt2i without a record of its "
                                "inputs; it is used as it is (pass --rebuild to build it again)",
                                version_dir)
            elif diff and not rebuild:
                raise ValueError(
                    f"{version_dir} was built from other inputs: {diff}; pass --rebuild to "
                    "replace it, or --name=NEW (--data_dir=OTHER for shapes) to build beside it")
            if diff is None or not rebuild:
                return _saved_report(version_dir)
            logging.warning("rebuilding %s: %s", version_dir, diff)
            shutil.rmtree(version_dir)
            builder = _fresh(builder)
        stale = [d for d in _listdir(config_dir) if d.startswith("incomplete.")]
        for d in stale:
            shutil.rmtree(os.path.join(config_dir, d), ignore_errors=True)
        if stale:
            logging.warning("removed %d incomplete build(s) of %s left by a killed build; "
                            "this build starts from the beginning", len(stale), config_dir)
        downloads = os.path.join(str(builder.data_dir_root), "downloads")
        had_downloads = os.path.exists(downloads)
        try:
            if num_shards is not None and num_shards < 1:
                raise ValueError(f"num_shards ({num_shards}) must be at least 1")
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                num_shards=num_shards))
        except AssertionError as e:  # TFDS refuses to write an empty split
            if "number_of_shards" in str(e):  # more files than a split has examples
                raise ValueError(f"num_shards ({num_shards}) is more than a split has examples"
                                 f": {str(e).strip().splitlines()[-1]}") from None
            if "No examples" not in str(e):
                raise
            summary = getattr(builder, "report", inputs.Report()).summary()
            raise ValueError(f"no usable examples for {builder.name}/"
                             f"{builder.builder_config.name}; input report: "
                             f"{summary or 'no inputs found'}") from None
        finally:
            if not had_downloads:  # TFDS makes an empty downloads/extracted/ even offline
                _remove_empty_tree(downloads)
        report = getattr(builder, "report", inputs.Report())
        with open(os.path.join(version_dir, REPORT_FILE), "w") as f:
            json.dump(report.to_json(), f, indent=1, ensure_ascii=False)
        with open(os.path.join(version_dir, INPUTS_FILE), "w") as f:
            json.dump(wanted, f, indent=1, ensure_ascii=False)
    logging.info("built %s at %s:\n%s", builder.name, version_dir, report.summary())
    return report


def _fresh(builder):
    """The same builder, made again (TFDS caches what it found on disk when it was made)."""
    return type(builder)(config=builder.builder_config, data_dir=str(builder.data_dir_root),
                         file_format="array_record")


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _remove_empty_tree(path: str) -> None:
    for dirpath, _, _ in os.walk(path, topdown=False):  # children first
        try:
            os.rmdir(dirpath)
        except OSError:
            pass


def _saved_report(version_dir: str) -> inputs.Report:
    report = inputs.Report()
    saved = _read_json(os.path.join(version_dir, REPORT_FILE))
    if saved and "read" in saved:  # a shard build's
        return shards_lib.ShardReport.from_json(saved)
    if saved:
        report.counts.update(saved["counts"])
        report.examples.update(saved["examples"])
    return report


def load_source(dataset_dir: str, split: str = "train"):
    """Random-access source of a built dataset, without its builder class.

    Args:
      dataset_dir: the versioned directory, e.g. `<data_dir>/image_text/mydata/1.0.0`, or
        a directory above it (the newest version below is used).
      split: split name.

    Returns:
      A TFDS `ArrayRecordDataSource` (len, [i] -> dict of numpy values / bytes).
    """
    found = sorted(root for root, _, files in os.walk(dataset_dir)
                   if "dataset_info.json" in files)
    if not found:
        raise FileNotFoundError(f"no built dataset (dataset_info.json) under {dataset_dir}; "
                                f"build one with `python -m jaxt2i.data.builders`")
    if len(found) > 1 and os.path.dirname(found[0]) != os.path.dirname(found[-1]):
        raise ValueError(f"{dataset_dir} holds several datasets ({', '.join(found[:3])}, ...);"
                         f" name one, e.g. {os.path.relpath(found[0], dataset_dir)}")
    newest = max(found, key=lambda d: tuple(int(x) if x.isdigit() else 0 for x in
                                            os.path.basename(d).split(".")))
    return tfds.builder_from_directory(newest).as_data_source(split)
