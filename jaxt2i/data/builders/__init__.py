"""TFDS dataset builders: the shapes world, a user's own images with captions, and sharded
image-text data (img2dataset's webdataset or parquet output, other webdataset tars).

Both write array_record files with `tfds` and are read back through random access
(`builder.as_data_source(split)`), without TensorFlow: images are stored as encoded
PNG/JPEG bytes (`tfds.features.Image` would import TensorFlow to encode) and decoded with
Pillow by the pipeline.

User data comes as a folder of images with captions from a JSONL or CSV manifest, from
side-car `.txt` files, or from a COCO-style captions JSON (read by `inputs`); sharded data
from tar or parquet shards (read by `shards`). Bad inputs never stop a build: each is
converted or skipped and counted in a `Report` with example paths, logged at the end and
written beside the data as `build_report.json`.

Builds run on this machine, or with Apache Beam (`build(..., beam_options=...)`, the CLI's
`--beam`: `jaxt2i.data.builders.beam`), which reads shards / image chunks / scene chunks on
its workers and gives the same examples and the same report.

CLI (console script `jaxt2i-build-data`):
     python -m jaxt2i.data.builders --data_dir=DIR --root=IMAGES [--manifest=FILE]
     python -m jaxt2i.data.builders --data_dir=DIR --input=SHARDS [--source=parquet]
     python -m jaxt2i.data.builders --data_dir=DIR --shapes=64:10000
     ... --beam [--beam_options="--runner=DirectRunner --direct_num_workers=2"]
"""

from __future__ import annotations

import collections
import dataclasses
import functools
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
from jaxt2i.data.builders import cloud

REPORT_FILE = "build_report.json"
INPUTS_FILE = "build_inputs.json"


URL_ATTR = "jaxt2i_data_dir_url"  # a builder's URL data_dir (it is built in a local folder)


def check_data_dir(data_dir) -> None:
    """For a `data_dir` URL: raises `paths.MissingFilesystem` (one line) when its filesystem
    package is not installed, before any work."""
    if paths_lib.is_url(str(data_dir)):
        paths_lib.filesystem(str(data_dir))


def _made(cls, cfg, data_dir: str):
    """`cls(config=cfg, data_dir=...)`; a URL data_dir is staged locally (`cloud`) and
    remembered on the builder for `build` to upload to."""
    check_data_dir(data_dir)
    url = str(data_dir) if paths_lib.is_url(str(data_dir)) else None
    builder = cls(config=cfg, data_dir=cloud.staging_dir(url) if url else data_dir,
                  file_format="array_record")
    setattr(builder, URL_ATTR, url)
    return builder


def dataset_location(builder) -> str:
    """Where a builder's dataset version is: its URL for a URL data_dir, else its folder."""
    url = getattr(builder, URL_ATTR, None)
    if not url:
        return str(builder.data_dir)
    rel = os.path.relpath(str(builder.data_dir), str(builder.data_dir_root))
    return paths_lib.join(url, *rel.split(os.sep))


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
            yield _shapes_example(src, i)

    def _beam_split_generators(self, dl_manager, pipeline):
        """`_split_generators` of a Beam build (`build(..., beam_options=...)`)."""
        del dl_manager
        from jaxt2i.data.builders import beam as beam_lib

        return beam_lib.shapes_splits(self, pipeline)


def _shapes_example(src: shapes.ShapesSource, i: int):
    """(key, example) of scene `i` of a shapes source (one machine or a Beam worker)."""
    ex = src[i]
    buf = io.BytesIO()
    Image.fromarray(ex["image"]).save(buf, "PNG", compress_level=3)
    return i, {"image": buf.getvalue(), "caption": ex["caption"], "scene": ex["scene"],
               "index": i}


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
    cfg = ShapesConfig(name=f"r{resolution}_n{train_size}_s{seed}", resolution=resolution,
                       train_size=train_size, test_size=test_size,
                       held_out_size=held_out_size, seed=seed)
    return _made(ShapesWorld, cfg, data_dir)


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
        is_val = [_is_validation(e[0], frac, "surrogateescape") for e in entries]
        return {"train": self._generate_examples([e for e, v in zip(entries, is_val) if not v]),
                "validation": self._generate_examples([e for e, v in zip(entries, is_val)
                                                       if v])}

    def _generate_examples(self, entries):
        cfg = self.builder_config
        seen = set()
        with futures.ThreadPoolExecutor(max(1, cfg.num_threads)) as pool:
            for (path, caps), data, (w, h), events in pool.map(
                    functools.partial(_load_entry, cfg=cfg), entries):
                rel, renamed = _entry_key(path, cfg.root)
                if renamed:  # keys and stored paths must be valid UTF-8
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
                yield rel, _text_example(rel, data, caps, w, h)

    def _beam_split_generators(self, dl_manager, pipeline):
        """`_split_generators` of a Beam build (`build(..., beam_options=...)`)."""
        del dl_manager
        from jaxt2i.data.builders import beam as beam_lib

        cfg = self.builder_config
        report = inputs.Report()  # what reading the manifest found (on this machine)
        entries = list(inputs.read_entries(cfg.root, cfg.manifest, cfg.format, report))
        return beam_lib.image_text_splits(self, pipeline, entries, report)


def _text_example(path: str, data: bytes, caps: list[str], width: int, height: int) -> dict:
    """The stored features of an image with its captions (a folder's or a shard's)."""
    return {"image": data, "caption": caps[0], "captions": "\n".join(caps), "path": path,
            "width": width, "height": height}


def _load_entry(entry, cfg: ImageTextConfig):
    """(entry, image bytes or None, (width, height), [report kinds]) of one (path, captions)
    entry of a folder build: the file read and `inputs.load_image`d."""
    path, _ = entry
    try:
        with paths_lib.open_binary(path) as f:
            data = f.read()
    except OSError:
        return entry, None, (0, 0), ["missing_image"]
    return (entry, *inputs.load_image(data, min_size=cfg.min_size, max_size=cfg.max_size))


def _entry_key(path: str, root: str) -> tuple[str, bool]:
    """(the example key / stored path of an image: its path below `root`, valid UTF-8;
    whether undecodable bytes in it were replaced)."""
    rel = paths_lib.relpath(path, root) if root else path
    clean = rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return clean, clean != rel


def _is_validation(text: str, frac: float, errors: str = "strict") -> bool:
    """Whether an example (by its path / key) belongs to the validation split."""
    return zlib.crc32(text.encode("utf-8", errors)) % 10000 < frac * 10000


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
    return _made(ImageText, cfg, data_dir)


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
    """Images with captions from tar (webdataset) or parquet shards (on one machine, or a
    shard per Beam work item).

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
            return _is_validation(key, frac)

        # Each split reads every shard and keeps its own keys; shard problems are counted
        # once, in the first.
        return {"train": self._generate_examples(paths, lambda k: not is_val(k), True, False),
                "validation": self._generate_examples(paths, is_val, False, True)}

    def _samples(self, paths, select, first):
        """(shard name, Sample, [caption], [events], outcome) of the samples `select`
        keeps, in order (`_shard_entries`; the report is not shared with threads)."""
        cfg = self.builder_config
        report, root = self.report, shards_lib.shard_root(paths)
        for path in paths:
            shard = shards_lib.shard_name(path, root)
            report.shard_counts(shard)  # listed even if nothing in it can be read
            for entry in _shard_entries(path, shard, cfg, first):
                if entry[0] == "shard":
                    _, kind, detail, n = entry
                    report.event(shard, kind, detail, n)
                    continue
                _, item, caps, events, outcome = entry
                if select is not None and not select(item.key):
                    continue
                report.count_read(shard)
                where = f"{shard}:{item.key}"
                for ev in item.events:
                    report.event(shard, ev, where)
                yield shard, item, caps, events, outcome

    def _generate_examples(self, paths, select, first: bool, last: bool):
        """The examples of one split (`select`: its keys, None: all); `first` counts shard
        problems, `last` logs the balance of the whole build."""
        cfg, report = self.builder_config, self.report
        seen = set()
        entries = self._samples(paths, select, first)
        for (shard, item, caps, events, outcome), data, (w, h) in _ordered_map(
                functools.partial(_decode_sample, cfg=cfg), entries, max(1, cfg.num_threads)):
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
            yield item.key, _text_example(where, data, caps, w, h)
        if last:
            line = report.balance_line()
            (logging.info if report.balanced else logging.error)("%s", line)

    def _beam_split_generators(self, dl_manager, pipeline):
        """`_split_generators` of a Beam build (`build(..., beam_options=...)`)."""
        del dl_manager
        from jaxt2i.data.builders import beam as beam_lib

        return beam_lib.shards_splits(self, pipeline)


def _shard_entries(path: str, shard: str, cfg: ShardsConfig, first: bool):
    """What reading one shard gives, in order: ('shard', kind, example, n) for what concerns
    the shard itself (img2dataset's own failures, damage; only when `first`, as a build with a
    validation split reads every shard twice), and ('sample', Sample, [caption], [events],
    outcome) per sample: its captions cleaned, `outcome` why it is skipped (None: usable so
    far). Shared by the single-machine and the Beam build."""
    if first:
        for status, n in sorted(shards_lib.upstream_stats(path).items()):
            yield "shard", f"img2dataset_{status}", shard, n
    for item in shards_lib.read_shard(path, cfg.source, caption_field=cfg.caption_field,
                                      image_field=cfg.image_field):
        if isinstance(item, shards_lib.ShardProblem):
            if first:
                yield "shard", item.kind, item.detail, 1
            continue
        if item.problem:
            yield "sample", item, None, [], item.problem
            continue
        log = _KindLog()
        caps = inputs._clean_captions(  # pylint: disable=protected-access
            item.captions, f"{shard}:{item.key}", log)
        if not caps:
            yield "sample", item, None, log.kinds[:-1], log.kinds[-1]
            continue
        yield "sample", item, caps, log.kinds, None


def _decode_sample(entry, cfg: ShardsConfig):
    """((shard, Sample, [caption], [events], outcome), image bytes or None, (width, height))
    of a sample `_shard_entries` gave: its image `inputs.load_image`d, what that did added to
    the events (and the reason it is skipped, if it is)."""
    shard, item, caps, events, outcome = entry
    if outcome is not None:
        return entry, None, (0, 0)
    data, size, more = inputs.load_image(item.image, min_size=cfg.min_size,
                                         max_size=cfg.max_size, max_aspect=cfg.max_aspect)
    if data is None:
        return (shard, item, caps, events + more[:-1], more[-1]), None, size
    return (shard, item, caps, events + more, None), data, size


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
    return _made(ImageTextShards, cfg, data_dir)


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


BEAM_MISSING = ("--beam needs apache-beam, which is not installed: pip install 'jaxt2i[beam]' "
                "(in a virtual environment of its own: apache-beam pins pillow<13 and "
                "protobuf<7)")
_BEAM_REPORT = "beam_report.json"  # beside the versions while a Beam build runs


def beam_module():
    """`jaxt2i.data.builders.beam` (imports apache-beam).

    Raises:
      ImportError: apache-beam is not installed (`BEAM_MISSING`, one line naming the
        extra).
    """
    def no_bigquery_note(record):  # Beam's import warns that BigQuery's client is missing
        return "apitools not found" not in str(record.msg)

    root = logging.getLogger()
    root.addFilter(no_bigquery_note)
    try:
        from jaxt2i.data.builders import beam as beam_lib
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "apache_beam":
            raise
        raise ImportError(BEAM_MISSING) from None
    finally:
        root.removeFilter(no_bigquery_note)
    return beam_lib


def build(builder: tfds.core.DatasetBuilder, *, rebuild: bool = False,
          num_shards: int | None = None, beam_options=None) -> inputs.Report:
    """Generates a dataset (if not already built from the same inputs) and returns its report.

    Args:
      builder: from `shapes_builder`, `image_text_builder` or `shards_builder`.
      rebuild: replace an existing build of the same name whose inputs differ (by default
        that is refused with a ValueError naming the difference).
      num_shards: files per split (default: TFDS's choice, by size); a layout choice, not an
        input: an existing build is kept whatever its file count.
      beam_options: None builds on this machine, without Beam. Otherwise build with Apache
        Beam (`jaxt2i.data.builders.beam`) and these pipeline options: Beam's own flags, as a
        string ('--runner=DirectRunner --direct_num_workers=2', split as a shell would) or a
        list; '' is Beam's default, the DirectRunner on one worker. The examples and the
        report are those of the single-machine build; like `num_shards`, this is not an
        input: a build made either way is kept.

    Returns:
      The `Report` (empty for shapes); also logged and written to
      `<builder.data_dir>/build_report.json`. A dataset already built from the same inputs
      returns the report saved with it.

    Builds of one dataset are serialised by a lock; a build that was killed leaves TFDS's
    `incomplete.*` directory, which the next build removes (builds are not resumable: it
    starts from the beginning, and says so).
    """
    from jaxt2i.workdir import WorkdirLock

    if getattr(builder, URL_ATTR, None):
        return _build_to_url(builder, rebuild=rebuild, num_shards=num_shards,
                             beam_options=beam_options)
    beam_lib = options = None
    if beam_options is not None:  # before anything is locked or written
        beam_lib = beam_module()
        options = beam_lib.pipeline_options(beam_options)
    version_dir = builder.data_dir
    config_dir = os.path.dirname(version_dir)
    wanted = build_inputs(builder)
    with WorkdirLock(config_dir, flag="--data_dir (a build of this dataset is running)"):
        if builder.is_prepared():
            if _keep_built(version_dir, wanted, rebuild):
                return _saved_report(version_dir)
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
        beam_report = os.path.join(config_dir, _BEAM_REPORT)
        config = tfds.download.DownloadConfig(num_shards=num_shards)
        if beam_lib is not None:
            _remove(beam_report, beam_report + ".tmp")  # a killed build's
            # TFDS hands `_split_generators` the Beam pipeline when it takes one: the splits
            # then share one read of the inputs.
            # pylint: disable=protected-access
            builder._split_generators = builder._beam_split_generators
            builder._beam_report_path = beam_report
            # pylint: enable=protected-access
            config = tfds.download.DownloadConfig(num_shards=num_shards, beam_options=options)
        try:
            if num_shards is not None and num_shards < 1:
                raise ValueError(f"num_shards ({num_shards}) must be at least 1")
            builder.download_and_prepare(download_config=config)
            if beam_lib is not None:
                _take_beam_report(builder, beam_report)
        except AssertionError as e:  # TFDS refuses to write an empty split
            if "number_of_shards" in str(e):  # more files than a split has examples
                raise ValueError(f"num_shards ({num_shards}) is more than a split has examples"
                                 f": {str(e).strip().splitlines()[-1]}") from None
            if "No examples" not in str(e):
                raise
            raise _no_examples(builder) from None
        except Exception as e:  # pylint: disable=broad-except  # a runner raises its own types
            # TFDS's BeamWriter refuses an empty split ('... is 0 for split train. This
            # should be >0!'), wrapped in whatever the runner raises
            if beam_lib is None or "should be >0" not in str(e):
                raise
            if not os.path.exists(beam_report) and hasattr(builder, "report"):
                logging.warning("a split of %s has no usable examples; reading the inputs "
                                "again for the report", builder.name)
                beam_lib.report_only(builder, options)
            _take_beam_report(builder, beam_report, required=False)
            raise _no_examples(builder) from None
        finally:
            if not had_downloads:  # TFDS makes an empty downloads/extracted/ even offline
                _remove_empty_tree(downloads)
            _remove(beam_report, beam_report + ".tmp")
        report = getattr(builder, "report", inputs.Report())
        if beam_lib is not None and isinstance(report, shards_lib.ShardReport):
            line = report.balance_line()  # as the single-machine build logs it
            (logging.info if report.balanced else logging.error)("%s", line)
        with open(os.path.join(version_dir, REPORT_FILE), "w") as f:
            json.dump(report.to_json(), f, indent=1, ensure_ascii=False)
        with open(os.path.join(version_dir, INPUTS_FILE), "w") as f:
            json.dump(wanted, f, indent=1, ensure_ascii=False)
    logging.info("built %s at %s:\n%s", builder.name, version_dir, report.summary())
    return report


def _keep_built(version_dir: str, wanted: dict, rebuild: bool) -> bool:
    """Whether the dataset built at `version_dir` (local or URL) is used as it is; raises
    ValueError (one line) when it was built from other inputs and `rebuild` is not set."""
    saved_inputs = _read_json(paths_lib.join(version_dir, INPUTS_FILE))
    diff = _inputs_difference(saved_inputs, wanted) if saved_inputs else None
    if saved_inputs is None:
        logging.warning("%s was built by an older jaxt2i without a record of its inputs; it is "
                        "used as it is (pass --rebuild to build it again)", version_dir)
    elif diff and not rebuild:
        raise ValueError(
            f"{version_dir} was built from other inputs: {diff}; pass --rebuild to "
            "replace it, or --name=NEW (--data_dir=OTHER for shapes) to build beside it")
    if diff is None or not rebuild:
        return True
    logging.warning("rebuilding %s: %s", version_dir, diff)
    return False


def _build_to_url(builder, **options) -> inputs.Report:
    """`build` for a URL data_dir: built in the local staging folder, then uploaded
    (`cloud.publish`); a dataset already at the URL is kept, or refused, as a local one is."""
    target = dataset_location(builder)
    if paths_lib.exists(paths_lib.join(target, "dataset_info.json")):
        if _keep_built(target, build_inputs(builder), options["rebuild"]):
            return _saved_report(target)
        paths_lib.rmtree(target)
    url = getattr(builder, URL_ATTR)
    setattr(builder, URL_ATTR, None)  # within: the local build of `build`
    try:
        report = build(builder, **options)
    finally:
        setattr(builder, URL_ATTR, url)
    cloud.publish(str(builder.data_dir), target)
    shutil.rmtree(str(builder.data_dir_root), ignore_errors=True)
    return report


def _no_examples(builder) -> ValueError:
    summary = getattr(builder, "report", inputs.Report()).summary()
    return ValueError(f"no usable examples for {builder.name}/{builder.builder_config.name}; "
                      f"input report: {summary or 'no inputs found'}")


def _take_beam_report(builder, path: str, required: bool = True) -> None:
    """Makes the report a Beam build wrote (merged from its workers) the builder's own."""
    if not hasattr(builder, "report"):  # shapes: nothing to report
        return
    saved = _read_json(path)
    if saved is None and required:  # never an empty report in its place
        raise RuntimeError(f"the Beam pipeline of {builder.name}/{builder.builder_config.name} "
                           f"finished without writing its report ({path}); the build is not "
                           "kept")
    if saved is not None:
        builder._report = _report_of_json(saved)  # pylint: disable=protected-access


def _remove(*paths: str) -> None:
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _fresh(builder):
    """The same builder, made again (TFDS caches what it found on disk when it was made)."""
    return type(builder)(config=builder.builder_config, data_dir=str(builder.data_dir_root),
                         file_format="array_record")


def _read_json(path: str):
    try:
        return json.loads(paths_lib.read_text(path))
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
    return _report_of_json(_read_json(paths_lib.join(version_dir, REPORT_FILE)))


def _report_of_json(saved: dict | None) -> inputs.Report:
    """The `Report` (a `ShardReport` for shards) that `to_json` gave `saved`."""
    report = inputs.Report()
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
    found = cloud.find_datasets(dataset_dir)
    if not found:
        raise FileNotFoundError(f"no built dataset (dataset_info.json) under {dataset_dir}; "
                                f"build one with `python -m jaxt2i.data.builders`")
    if len(found) > 1 and paths_lib.dirname(found[0]) != paths_lib.dirname(found[-1]):
        raise ValueError(f"{dataset_dir} holds several datasets ({', '.join(found[:3])}, ...);"
                         f" name one, e.g. {paths_lib.relpath(found[0], dataset_dir)}")
    newest = max(found, key=lambda d: tuple(int(x) if x.isdigit() else 0 for x in
                                            paths_lib.basename(d).split(".")))
    if paths_lib.is_url(newest):  # array_record reads local files: a local copy, cached
        newest = cloud.local_copy(newest)
    return tfds.builder_from_directory(newest).as_data_source(split)
