"""Readers of sharded image-text data: img2dataset's output and other webdataset tars.

Layouts read:

* 'webdataset': tar shards (img2dataset's `--output_format=webdataset`: `00000.tar` with
  members `KEY.jpg`, `KEY.txt`, `KEY.json`; or tars from other tools with any image
  extension and the caption in a `txt` / `caption` member or a JSON field). Members are
  grouped by key as webdataset does: the key is the member path up to the first dot of its
  file name, the rest (`jpg`, `seg.png`) its field; a key's members are consecutive, and a
  field seen twice starts another sample of the same key. img2dataset's per-shard
  `NNNNN_stats.json`, when present, is read for its own download failures (URLs that never
  reached the tar), reported as `img2dataset_<status>`; its per-shard `NNNNN.parquet` holds
  the same captions as the tar's `.json` members and is not read, so tars need no pyarrow.
* 'parquet': img2dataset's `--output_format=parquet` (`00000.parquet` with the image bytes
  in a `jpg` column, the caption in `txt` / `caption`, `key` and `status` columns; rows that
  failed to download have no image and a `status` other than 'success'), and other parquet
  files with an image column (bytes, or a Hugging Face `{"bytes", "path"}` struct). Needs
  pyarrow (the `[data]` extra).

`read_shard` is a generator over one shard, so a pipeline can map it over shards. It yields
a `Sample` per key read (those it cannot use carry the reason in `problem`) and a
`ShardProblem` when the shard itself is unreadable, truncated or corrupt: the members before
the damage are yielded, the shard's problem is yielded, and the next shard is read. Decoding
images and cleaning captions is the builder's work (`jaxt2i.data.inputs`); `ShardReport`
counts what happened to every sample, by kind and per shard, and checks that the samples
read equal those written plus those skipped.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import posixpath
import tarfile
import zlib
from typing import Iterator

from jaxt2i import paths as paths_lib
from jaxt2i.data import inputs

SOURCES = ("webdataset", "parquet")
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
# 'auto' captions: the first of these a sample has (a webdataset member, or the JSON member's
# field); parquet: the first of these columns the file has.
AUTO_CAPTION_MEMBERS = ("txt", "caption", "text")
AUTO_CAPTION_JSON_FIELDS = ("caption", "TEXT", "text")
AUTO_CAPTION_COLUMNS = ("txt", "caption", "TEXT", "text")
AUTO_IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img")
_PARQUET_BATCH = 64


@dataclasses.dataclass
class Sample:
    """One key of a shard.

    Attributes:
      key: the sample's key (webdataset: member path up to the first dot; parquet: the
        `key` column, else 'SHARDNAME/ROW').
      image: the image member's / column's bytes (None when there is none).
      captions: raw caption values (bytes / str / None / other JSON values) for
        `inputs._clean_captions`; [None] when the sample has no caption.
      meta: the sample's JSON member (webdataset) or its other columns (parquet).
      problem: why the sample cannot be used, decided while reading ('no_image',
        'failed_download', 'truncated_member'), else None.
      events: what the reader noticed about a usable sample ('extra_image',
        'ignored_member', 'bad_json', 'non_utf8_key').
    """

    key: str
    image: bytes | None = None
    captions: list = dataclasses.field(default_factory=lambda: [None])
    meta: dict = dataclasses.field(default_factory=dict)
    problem: str | None = None
    events: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ShardProblem:
    """Damage to a whole shard: 'bad_shard' (unreadable, not a tar / parquet file, or a
    parquet file without an image or caption column), 'truncated_tar' (it ends before its
    end-of-archive marker), 'corrupt_tar' (a member header is garbage); or a note about it:
    'ignored_member' (a tar member not named KEY.FIELD). `detail` says what and where."""

    kind: str
    detail: str


# --- listing shards ----------------------------------------------------------------------


def list_shards(pattern: str, source: str) -> list[str]:
    """The shard files of `pattern`, in order.

    Args:
      pattern: a folder (its `*.tar` / `*.tar.gz` / `*.tgz`, or `*.parquet`, files), a glob
        (`data/*.tar`), one file, or several of these joined by commas; each may be a URL
        (`gs://bucket/shards`, `gs://bucket/shards/*.tar`, any fsspec protocol:
        `jaxt2i.paths`).
      source: 'webdataset' or 'parquet'.

    Returns:
      Sorted paths (each once); URLs come back as URLs.

    Raises:
      ValueError: unknown `source`, or nothing matches (one line naming the input).
      paths.MissingFilesystem: a URL whose filesystem (gcsfs for gs://) is not installed.
    """
    if source not in SOURCES:
        raise ValueError(f"--source={source!r} must be one of {', '.join(SOURCES)}")
    exts = (".tar", ".tar.gz", ".tgz") if source == "webdataset" else (".parquet",)
    found: list[str] = []
    for part in (p for p in pattern.split(",") if p):
        if paths_lib.is_url(part):
            found.extend(_list_url(part, exts))
        elif os.path.isdir(part):
            found.extend(os.path.join(part, n) for n in os.listdir(part)
                         if n.lower().endswith(exts) and
                         os.path.isfile(os.path.join(part, n)))
        elif paths_lib.has_magic(part):
            found.extend(p for p in paths_lib.glob(part) if os.path.isfile(p))
        elif os.path.isfile(part):
            found.append(part)
    if not found:
        what = "tar shards (*.tar)" if source == "webdataset" else "parquet files (*.parquet)"
        raise ValueError(f"--input={pattern!r} has no {what}; pass a folder of "
                         f"{source} shards, a glob like DIR/*{exts[0]}, or files joined by "
                         f"commas")
    return sorted(set(found))


def _list_url(url: str, exts: tuple[str, ...]) -> list[str]:
    """`list_shards` of one URL: a folder's shard files, a glob's files, or the file."""
    fs, path = paths_lib.filesystem(url)
    if paths_lib.has_magic(path):
        return [fs.unstrip_protocol(n) for n, info in fs.glob(path, detail=True).items()
                if info.get("type") == "file"]
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return []
    if info.get("type") == "directory":
        return [fs.unstrip_protocol(e["name"]) for e in fs.ls(path, detail=True)
                if e.get("type") == "file" and e["name"].lower().endswith(exts)]
    return [fs.unstrip_protocol(path)]


def shard_root(shards: list[str]) -> str:
    """The folder that shard names in reports are relative to (a URL for URLs)."""
    return paths_lib.common_dir(shards)


def shard_name(path: str, root: str) -> str:
    """A shard's name in reports: its path below `root`."""
    return paths_lib.relpath(path, root) if root else path


def upstream_stats(shard: str) -> dict[str, int]:
    """img2dataset's own failures for a shard, from `NNNNN_stats.json` beside it: {status:
    count} for every status but 'success' (empty without the file, or if it is unreadable)."""
    base = shard
    for ext in (".tar.gz", ".tgz", ".tar", ".parquet"):
        if base.lower().endswith(ext):
            base = base[:-len(ext)]
            break
    try:
        with paths_lib.open_binary(base + "_stats.json") as f:
            stats = json.loads(f.read())
        status = stats.get("status_dict") or {}
        return {str(k): int(v) for k, v in status.items() if k != "success" and int(v) > 0}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


# --- reading one shard -------------------------------------------------------------------


def read_shard(path: str, source: str, *, caption_field: str = "auto",
               image_field: str = "auto") -> Iterator[Sample | ShardProblem]:
    """Yields the samples of one shard, then a `ShardProblem` if the shard is damaged.

    Args:
      path: a tar (webdataset) or parquet file; a URL is read through fsspec (seekable, so
        a truncated tar is told from a whole one as for a local file).
      source: 'webdataset' or 'parquet'.
      caption_field: 'auto'; webdataset: a member field ('txt') or 'json:FIELD' (a field of
        the sample's JSON member); parquet: a column name.
      image_field: 'auto', or (parquet) the image column / (webdataset) the image field.

    Never raises for bad data: whatever cannot be read is yielded as a problem.
    """
    if source == "webdataset":
        return _read_tar(path, caption_field, image_field)
    if source == "parquet":
        return _read_parquet(path, caption_field, image_field)
    raise ValueError(f"--source={source!r} must be one of {', '.join(SOURCES)}")


def check_fields(source: str, caption_field: str, image_field: str) -> None:
    """Raises ValueError (one line) for a field flag that cannot apply to `source`."""
    if source not in SOURCES:
        raise ValueError(f"--source={source!r} must be one of {', '.join(SOURCES)}")
    if not caption_field or (caption_field.startswith("json:") and not caption_field[5:]):
        raise ValueError(f"--caption_field={caption_field!r} must be 'auto', a field name "
                         f"(e.g. txt) or json:FIELD (e.g. json:caption)")
    if source == "parquet" and caption_field.startswith("json:"):
        raise ValueError(f"--caption_field={caption_field!r}: json:FIELD is for webdataset "
                         f"tars; with --source=parquet name the caption column (e.g. txt)")
    if not image_field:
        raise ValueError("--image_field must be 'auto' or a field / column name (e.g. jpg)")
    if source == "parquet":
        pyarrow_parquet()


def pyarrow_parquet():
    """`pyarrow.parquet`, or a one-line ImportError naming the extra that installs it."""
    try:
        import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise ImportError("reading parquet shards needs pyarrow: pip install 'jaxt2i[data]' "
                          "(or pip install pyarrow)") from None
    return pq


def _split_name(name: str) -> tuple[str, str] | None:
    """webdataset's split of a member path: ('dir/KEY', 'field') at the first dot of the file
    name; None for a name without one (or starting with one, e.g. macOS '._x' files)."""
    name = name[2:] if name.startswith("./") else name
    d, base = posixpath.split(name)
    stem, dot, field = base.partition(".")
    if not stem or not dot or not field:
        return None
    return posixpath.join(d, stem), field


def _is_image(field: str, image_field: str) -> bool:
    if image_field != "auto":
        return field.lower() == image_field.lower()
    return field.rsplit(".", 1)[-1].lower() in IMAGE_FIELDS


def _is_text(field: str, caption_field: str) -> bool:
    low = field.lower()
    if caption_field == "auto":
        return low in AUTO_CAPTION_MEMBERS or low == "json"
    if caption_field.startswith("json:"):
        return low == "json"
    return low in (caption_field.lower(), "json")


def _read_tar(path, caption_field, image_field):
    name = paths_lib.basename(path)
    fileobj = None
    try:
        if paths_lib.is_url(path):  # tarfile leaves a file object it was given open
            fileobj = paths_lib.open_binary(path)
        # member by member (headers, then data on demand)
        tf = tarfile.open(path if fileobj is None else None, "r:*", fileobj=fileobj)
    except tarfile.ReadError as e:  # its message lists every compression tried
        _close(fileobj)
        yield ShardProblem("bad_shard", f"{name}: not a tar file "
                           f"({_why(e).rsplit('; ', 1)[-1]})")
        return
    except (OSError, tarfile.TarError, EOFError) as e:
        _close(fileobj)
        yield ShardProblem("bad_shard", f"{name}: {_why(e)}")
        return
    key, fields, order = None, {}, []  # the sample being gathered
    try:
        while True:
            try:
                member = tf.next()
            except (OSError, tarfile.TarError, EOFError) as e:
                if key is not None:  # its members so far may be all it had: cannot tell
                    yield _sample(key, fields, order, caption_field, image_field,
                                  problem="truncated_member")
                    key = None
                yield ShardProblem("truncated_tar" if "unexpected end" in str(e)
                                   else "corrupt_tar", f"{name}: {_why(e)}")
                return
            tf.members.clear()  # `next()` keeps every header: a big shard would pile up
            if member is None:
                break
            if not member.isfile():  # folders, links: nothing to read
                continue
            split = _split_name(member.name)
            if split is None:  # no KEY.FIELD name: not part of any sample
                yield ShardProblem("ignored_member",
                                   f"{name}: {member.name}")
                continue
            mkey, field = split
            if key is not None and (mkey != key or field in fields):
                yield _sample(key, fields, order, caption_field, image_field)
                key, fields, order = None, {}, []
            if key is None:
                key = mkey
            order.append(field)
            if not (_is_image(field, image_field) or _is_text(field, caption_field)):
                fields[field] = None  # counted, not read
                continue
            try:
                fields[field] = tf.extractfile(member).read()
            except (OSError, tarfile.TarError, EOFError, zlib.error) as e:
                yield _sample(key, fields, order, caption_field, image_field,
                              problem="truncated_member")
                yield ShardProblem("truncated_tar" if "unexpected end" in str(e)
                                   else "corrupt_tar", f"{name}: {_why(e)} "
                                   f"(in {member.name})")
                return
        if key is not None:
            yield _sample(key, fields, order, caption_field, image_field)
            key = None
        # tarfile ends quietly where a header is missing or garbage; a whole tar has its
        # end-of-archive marker (a block of zeros) there.
        try:
            tf.fileobj.seek(tf.offset)
            end = tf.fileobj.read(tarfile.BLOCKSIZE)
        except (OSError, EOFError) as e:
            end = repr(e).encode()
        if end != tarfile.NUL * tarfile.BLOCKSIZE:
            kind = "truncated_tar" if len(end) < tarfile.BLOCKSIZE else "corrupt_tar"
            yield ShardProblem(kind, f"{name}: "
                               + ("ends without its end-of-archive marker" if kind ==
                                  "truncated_tar" else "unreadable member header")
                               + f" at byte {tf.offset}")
    finally:
        tf.close()
        _close(fileobj)


def _close(fileobj) -> None:
    if fileobj is not None:
        try:
            fileobj.close()
        except (OSError, ValueError):
            pass


def _why(e: BaseException) -> str:
    """The exception on one line."""
    text = "; ".join(x.strip(" -") for x in str(e).splitlines() if x.strip(" -"))
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _sample(key, fields, order, caption_field, image_field, problem=None) -> Sample:
    events = []
    clean = key.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if clean != key:  # tarfile decodes non-UTF-8 names with surrogates; keys must be UTF-8
        key = clean
        events.append("non_utf8_key")
    images = [f for f in order if _is_image(f, image_field)]
    texts = {f for f in order if _is_text(f, caption_field)}
    events += ["ignored_member"] * (len(order) - len(images) - len(texts))
    events += ["extra_image"] * (len(images) - 1)
    meta, caps = {}, [None]
    lower = {}  # field names as written (TXT, Json) -> lower case; the first of each wins
    for f in order:
        lower.setdefault(f.lower(), f)
    fields = {low: fields.get(f) for low, f in lower.items()}
    if fields.get("json") is not None:
        try:
            meta = json.loads(fields["json"].decode("utf-8", "surrogateescape"))
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except ValueError:
            events.append("bad_json")
            meta = {}
    if caption_field == "auto":
        member = next((f for f in AUTO_CAPTION_MEMBERS if f in fields), None)
        if member is not None:
            caps = [fields[member]]
        else:
            name = next((k for k in AUTO_CAPTION_JSON_FIELDS if k in meta), None)
            caps = _as_list(meta[name]) if name else [None]
    elif caption_field.startswith("json:"):
        caps = _as_list(meta.get(caption_field[5:]))
    else:
        member = caption_field.lower()
        caps = [fields[member]] if fields.get(member) is not None else [None]
    image = fields.get(images[0].lower()) if images else None
    if problem is None and image is None:
        problem = "no_image"
    return Sample(key=key, image=image, captions=caps or [None], meta=meta, problem=problem,
                  events=events)


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _read_parquet(path, caption_field, image_field):
    pq = pyarrow_parquet()
    name = paths_lib.basename(path)
    fileobj = None
    try:
        if paths_lib.is_url(path):  # pyarrow reads (seeks in) the fsspec file
            fileobj = paths_lib.open_binary(path)
        pf = pq.ParquetFile(path if fileobj is None else fileobj)
        columns = list(pf.schema_arrow.names)
    except Exception as e:  # pylint: disable=broad-except  # pyarrow raises many types
        _close(fileobj)
        yield ShardProblem("bad_shard", f"{name}: {_why(e)}")
        return
    try:
        yield from _parquet_rows(pf, path, name, columns, caption_field, image_field)
    finally:
        if hasattr(pf, "close"):
            pf.close()
        _close(fileobj)


def _parquet_rows(pf, path, name, columns, caption_field, image_field):
    image_col = (next((c for c in AUTO_IMAGE_COLUMNS if c in columns), None)
                 if image_field == "auto" else (image_field if image_field in columns
                                                else None))
    if image_col is None:
        hint = (" (img2dataset's per-shard metadata of a webdataset: use --source=webdataset)"
                if paths_lib.exists(path[:-len(".parquet")] + ".tar") else "")
        yield ShardProblem("bad_shard", f"{name}: no image column "
                           f"{image_field if image_field != 'auto' else ''}".rstrip()
                           + f" among {columns}; name it with --image_field{hint}")
        return
    caption_col = (next((c for c in AUTO_CAPTION_COLUMNS if c in columns), None)
                   if caption_field == "auto" else (caption_field if caption_field in columns
                                                    else None))
    if caption_col is None:
        yield ShardProblem("bad_shard", f"{name}: no caption column "
                           f"{caption_field if caption_field != 'auto' else ''}".rstrip()
                           + f" among {columns}; name it with --caption_field")
        return
    stem = name[:-len(".parquet")] if name.endswith(".parquet") else name
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH):
            for rec in batch.to_pylist():
                yield _row_sample(rec, row, stem, image_col, caption_col)
                row += 1
    except Exception as e:  # pylint: disable=broad-except
        yield ShardProblem("bad_shard", f"{name}: stopped after row {row}: {_why(e)}")


def _row_sample(rec: dict, row: int, stem: str, image_col: str, caption_col: str):
    key = rec.get("key")
    key = str(key) if key not in (None, "") else f"{stem}/{row}"
    image = rec.get(image_col)
    if isinstance(image, dict):  # a Hugging Face datasets Image: {"bytes", "path"}
        image = image.get("bytes")
    if isinstance(image, str):
        image = None
    caps = _as_list(rec.get(caption_col))
    meta = {k: v for k, v in rec.items() if k != image_col and not isinstance(v, bytes)}
    problem = None
    status = rec.get("status")
    if image is None:
        problem = ("failed_download" if status not in (None, "success") else "no_image")
    return Sample(key=key, image=image, captions=caps or [None], meta=meta, problem=problem)


# --- the report --------------------------------------------------------------------------


class ShardReport(inputs.Report):
    """`inputs.Report` by shard: every sample read ends in one outcome ('ok' = written, or
    why it was skipped); other kinds are events (conversions, upstream failures) and shard
    problems. `summary()` starts with read == written + skipped (checked)."""

    SHARD_KINDS = ("bad_shard", "truncated_tar", "corrupt_tar")

    def __init__(self, max_examples: int = 5):
        super().__init__(max_examples)
        self.read = 0
        self.outcomes: collections.Counter = collections.Counter()
        self.shards: dict[str, dict] = {}

    def shard_counts(self, shard: str) -> dict:
        """{'read': n, 'counts': Counter} of one shard (made empty on first use)."""
        return self.shards.setdefault(shard, {"read": 0, "counts": collections.Counter()})

    def count_read(self, shard: str) -> None:
        self.read += 1
        self.shard_counts(shard)["read"] += 1

    def event(self, shard: str, kind: str, example: str | None = None, n: int = 1) -> None:
        """A conversion / note / shard problem (not a sample's outcome)."""
        self.add(kind, example)
        self.counts[kind] += n - 1
        self.shard_counts(shard)["counts"][kind] += n

    def outcome(self, shard: str, kind: str, example: str | None = None) -> None:
        """What became of one sample read: 'ok' (written) or the reason it was skipped."""
        self.add(kind, example)
        self.outcomes[kind] += 1
        self.shard_counts(shard)["counts"][kind] += 1

    @classmethod
    def from_json(cls, saved: dict) -> "ShardReport":
        """The report `to_json` saved (for a build that is already there)."""
        report = cls()
        report.counts.update(saved.get("counts", {}))
        report.examples.update(saved.get("examples", {}))
        report.read = saved.get("read", 0)
        report.outcomes.update(saved.get("skipped", {}))
        report.outcomes["ok"] = saved.get("written", 0)
        for shard, v in saved.get("shards", {}).items():
            report.shard_counts(shard)["read"] = v.get("read", 0)
            report.shard_counts(shard)["counts"].update(v.get("counts", {}))
        return report

    @property
    def written(self) -> int:
        return self.outcomes["ok"]

    @property
    def skipped(self) -> int:
        return sum(n for k, n in self.outcomes.items() if k != "ok")

    @property
    def balanced(self) -> bool:
        return self.read == self.written + self.skipped

    def balance_line(self) -> str:
        line = (f"read {self.read} samples from {len(self.shards)} shards: {self.written} "
                f"written + {self.skipped} skipped")
        return line + (" (all accounted for)" if self.balanced else
                       f" != {self.read} read: {self.read - self.written - self.skipped} "
                       "samples unaccounted for (a bug: please report it)")

    def to_json(self) -> dict:
        out = super().to_json()
        out.update(read=self.read, written=self.written,
                   skipped={k: n for k, n in sorted(self.outcomes.items()) if k != "ok"},
                   balanced=self.balanced,
                   shards={s: {"read": v["read"], "counts": dict(v["counts"])}
                           for s, v in sorted(self.shards.items())})
        return out

    def summary(self, max_shards: int = 20) -> str:
        """The balance line, then one line per kind (skips first), then the shards with
        anything but 'ok' (up to `max_shards`; all of them in `to_json`)."""
        skips = {k for k in self.outcomes if k != "ok"}
        lines = [self.balance_line()]
        for title, kinds in (("skipped", sorted(skips)),
                             ("shard problems", [k for k in self.SHARD_KINDS
                                                 if self.counts[k]]),
                             ("converted / noted", sorted(set(self.counts) - skips - {"ok"}
                                                          - set(self.SHARD_KINDS)))):
            for kind in kinds:
                eg = self.examples.get(kind)
                lines.append(f"{title}: {kind}: {self.counts[kind]}"
                             + (f" (e.g. {', '.join(eg)})" if eg else ""))
        bad = [(s, v) for s, v in sorted(self.shards.items())
               if set(v["counts"]) - {"ok"}]
        for s, v in bad[:max_shards]:
            other = ", ".join(f"{k} {n}" for k, n in sorted(v["counts"].items()) if k != "ok")
            lines.append(f"shard {s}: read {v['read']}, ok {v['counts']['ok']}; {other}")
        if len(bad) > max_shards:
            lines.append(f"... {len(bad) - max_shards} more shards with problems "
                         f"(see build_report.json)")
        return "\n".join(lines)
