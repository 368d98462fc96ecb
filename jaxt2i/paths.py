"""Paths that may be URLs: `gs://bucket/dir`, `s3://...`, `memory://...`, `file:///...`, or
any other fsspec protocol; plain local paths go through `os` exactly as before.

Cloud storage is read through fsspec (https://filesystem-spec.readthedocs.io): `gs://` needs
gcsfs (`pip install gcsfs`), `s3://` s3fs, `az://` adlfs; `memory://` and `file://` need
nothing (the tests use them). A URL whose filesystem is not installed raises
`MissingFilesystem` (an ImportError) with one line naming the URL and the package, e.g.
"'gs://b/x' needs gcsfs: pip install gcsfs".

Why fsspec and not etils.epath (which TFDS and Orbax use): epath knows only `gs://`, `s3://`,
`az://` and `hf://` (no `memory://` or `file://`, so nothing to test against without the
network), and without TensorFlow (jaxt2i never imports it) epath hands those very URLs to
fsspec and gcsfs / s3fs itself; with TensorFlow installed it uses `tf.io.gfile` instead. So
`pip install gcsfs` is what both need, and a `gs://` path given to jaxt2i reads the same
bucket TFDS / Orbax would.

Writing (outputs: checkpoints' side files, exports, the text cache, datasets): `makedirs`,
`write_bytes`, `write_text`, `read_bytes`, `read_text`, `remove`, `rmtree`, `move`, `getsize`,
`local_file`, `local_dir`, `upload`, `download`. An object store has no atomic rename: a
local file is written to a temporary name and renamed into place as before, while a URL's
object is uploaded in one request (`fs.pipe` / `put_file`), and an upload is atomic per
object (GCS and S3 show the new object whole or not at all, never half-written). `move` of a
URL is copy-then-delete; writers that take only local names (safetensors, numpy, PIL, TFDS)
write to a local temporary file or folder that is then uploaded (`local_file`, `local_dir`).

Functions: `is_url`, `filesystem`, `open_binary`, `exists`, `isdir`, `isfile`, `listdir`,
`glob`, `has_magic`, `walk`, `join`, `basename`, `dirname`, `relpath`, `abspath`,
`file_version`, and the writing ones above.
"""

from __future__ import annotations

import contextlib
import glob as glob_lib
import json
import os
import posixpath
import re
import shutil
import tempfile
from typing import IO, Iterator

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


class MissingFilesystem(ImportError):
    """A URL whose fsspec filesystem (gcsfs for gs://, s3fs for s3://, ...) is not
    installed; the message is one line naming the URL and what to install."""


def is_url(path) -> bool:
    """Whether `path` is a URL (`protocol://...`) rather than a local path."""
    return isinstance(path, str) and _URL.match(path) is not None


def protocol(url: str) -> str:
    """'gs' of 'gs://bucket/x' ('' for a local path)."""
    return url.split("://", 1)[0].lower() if is_url(url) else ""


def filesystem(url: str):
    """(fsspec filesystem, the path within it) of a URL.

    Raises:
      MissingFilesystem: the protocol's package is not installed (one line: the URL, the
        package, `pip install PACKAGE`).
      ValueError: fsspec knows no such protocol (one line).
    """
    import fsspec.core  # pylint: disable=import-outside-toplevel

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise MissingFilesystem(_missing(url, e)) from None
    except ValueError as e:
        if "Protocol not known" not in str(e):
            raise
        raise ValueError(f"{url!r}: unknown protocol {protocol(url)!r}; pass a local path or "
                         f"an fsspec URL (gs://, s3://, file://, memory://, ...)") from None


def _missing(url: str, e: ImportError) -> str:
    from fsspec.registry import known_implementations  # pylint: disable=import-outside-toplevel

    cls = known_implementations.get(protocol(url), {}).get("class", "")
    package = cls.split(".", 1)[0]
    if package and package != "fsspec":  # gcsfs, s3fs, adlfs, huggingface_hub, ...
        return f"{url!r} needs {package}: pip install {package}"
    why = " ".join(str(e).split()) or type(e).__name__
    return f"{url!r} needs a package that is not installed: {why}"


def _url(fs, path: str) -> str:
    """A path of `fs` as a URL again (fsspec hands back paths without their protocol)."""
    return fs.unstrip_protocol(path)


def open_binary(path: str) -> IO[bytes]:
    """`open(path, 'rb')`, for URLs too (a seekable fsspec file)."""
    if not is_url(path):
        return open(path, "rb")
    fs, p = filesystem(path)
    return fs.open(p, "rb")


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    fs, p = filesystem(path)
    return fs.exists(p)


def isdir(path: str) -> bool:
    if not is_url(path):
        return os.path.isdir(path)
    fs, p = filesystem(path)
    return fs.isdir(p)


def isfile(path: str) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    fs, p = filesystem(path)
    return fs.isfile(p)


def listdir(path: str) -> list[str]:
    """The names in a folder (like `os.listdir`; sorted for URLs)."""
    if not is_url(path):
        return os.listdir(path)
    fs, p = filesystem(path)
    if not fs.isdir(p):
        raise FileNotFoundError(f"{path!r} is not a folder")
    return sorted(posixpath.basename(n.rstrip("/")) for n in fs.ls(p, detail=False))


def has_magic(pattern: str) -> bool:
    """Whether `pattern` has glob characters (`*`, `?`, `[`)."""
    return glob_lib.has_magic(pattern)


def glob(pattern: str) -> list[str]:
    """Paths matching `pattern` (like `glob.glob`); URLs come back as URLs."""
    if not is_url(pattern):
        return glob_lib.glob(pattern)
    fs, p = filesystem(pattern)
    return [_url(fs, n) for n in fs.glob(p)]


def walk(top: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """`os.walk(top)` for URLs too: (folder, [sub-folder names], [file names]), top down;
    for URLs the names are sorted and the caller may prune the sub-folder list."""
    if not is_url(top):
        yield from os.walk(top)
        return
    fs, p = filesystem(top)
    yield from _walk(fs, p)


def _walk(fs, path: str):
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return
    dirs = sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries
                  if e.get("type") == "directory")
    files = sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries
                   if e.get("type") != "directory")
    dirs = [d for d in dirs if d]  # some stores list the folder itself
    yield _url(fs, path), dirs, files
    for d in dirs:
        yield from _walk(fs, posixpath.join(path, d))


def join(base: str, *parts: str) -> str:
    """`os.path.join` for local paths; for a URL base, '/'-joined. A part that is itself a
    URL (e.g. a manifest row naming gs://...) replaces what came before, as an absolute
    path does."""
    for part in parts:
        if is_url(part):
            base = part
        elif is_url(base):
            base = posixpath.join(base, part) if not part.startswith("/") else part
        else:
            base = os.path.join(base, part)
    return base


def basename(path: str) -> str:
    if not is_url(path):
        return os.path.basename(path)
    return posixpath.basename(path.rstrip("/").split("://", 1)[1])


def dirname(path: str) -> str:
    if not is_url(path):
        return os.path.dirname(path)
    fs, p = filesystem(path)
    return _url(fs, posixpath.dirname(p.rstrip("/")))


def relpath(path: str, start: str) -> str:
    """`os.path.relpath`; for two URLs of one filesystem, the '/'-separated path between
    them (a URL not below `start`, or of another filesystem, comes back whole)."""
    if not is_url(path) and not is_url(start):
        return os.path.relpath(path, start)
    if not (is_url(path) and is_url(start)) or protocol(path) != protocol(start):
        return path
    fs, p = filesystem(path)
    _, s = filesystem(start)
    rel = posixpath.relpath(p, s or "/")
    return path if rel.startswith("..") else rel


def abspath(path: str) -> str:
    """`os.path.abspath` of a local path; a URL as it is."""
    return path if is_url(path) else os.path.abspath(path)


def common_dir(paths: list[str]) -> str:
    """The deepest folder holding every path (their `os.path.commonpath` folder); for URLs
    of one filesystem the same as a URL; '' for URLs of several filesystems or a mix."""
    urls = [is_url(p) for p in paths]
    if not any(urls):
        return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    if not all(urls) or len({protocol(p) for p in paths}) > 1:
        return ""
    fs, _ = filesystem(paths[0])
    try:
        common = posixpath.commonpath([posixpath.dirname(filesystem(p)[1]) for p in paths])
    except ValueError:  # some absolute, some not: no folder holds them all
        return ""
    return _url(fs, common) if common else ""


def file_version(path: str) -> tuple[int, str]:
    """(size, what changes when the object is rewritten) of a URL's object, for digests of
    inputs: the store's generation / ETag / modification time, whichever it reports."""
    fs, p = filesystem(path)
    return _version(fs.info(p))


def _version(info: dict) -> tuple[int, str]:
    """`file_version` of an fsspec info dict."""
    for key in ("generation", "ETag", "etag", "md5Hash", "mtime", "updated", "LastModified",
                "last_modified", "created"):
        if info.get(key) not in (None, ""):
            return int(info.get("size") or 0), f"{key}={info[key]}"
    return int(info.get("size") or 0), ""


def makedirs(path: str) -> None:
    """`os.makedirs(path, exist_ok=True)`; for URLs the store's own (a no-op on object
    stores, whose folders exist by holding objects)."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)
        return
    fs, p = filesystem(path)
    fs.makedirs(p, exist_ok=True)


def write_bytes(path: str, data: bytes) -> None:
    """Writes a whole file so that a reader sees the old one or the new one, never part of
    it: local files through a temporary name + `os.replace`, URLs as one upload."""
    if is_url(path):
        fs, p = filesystem(path)
        fs.pipe(p, bytes(data))
        return
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:  # a full disk, ...: no stray temporary file
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def write_text(path: str, text: str) -> None:
    """`write_bytes` of UTF-8 text."""
    write_bytes(path, text.encode("utf-8"))


def read_bytes(path: str) -> bytes:
    with open_binary(path) as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def remove(path: str) -> None:
    """`os.remove` of a file (FileNotFoundError when absent)."""
    if not is_url(path):
        os.remove(path)
        return
    fs, p = filesystem(path)
    if not fs.exists(p):
        raise FileNotFoundError(path)
    fs.rm(p)


def rmtree(path: str) -> None:
    """Removes a folder and all below it; nothing when it is absent."""
    if not is_url(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs, p = filesystem(path)
    if fs.exists(p):
        fs.rm(p, recursive=True)
        _forget_listings(fs)


def move(src: str, dst: str) -> None:
    """`os.replace(src, dst)` of a file or folder; for URLs (one filesystem) a copy then a
    delete: not atomic, so callers use it only for what may be seen half-moved (a corrupt
    checkpoint set aside)."""
    if not is_url(src) and not is_url(dst):
        os.replace(src, dst)
        return
    fs, s = filesystem(src)
    _, d = filesystem(dst)
    fs.copy(s, d, recursive=fs.isdir(s))
    fs.rm(s, recursive=True)
    _forget_listings(fs)


def _forget_listings(fs) -> None:
    """Drops the folder listings every instance of `fs`'s filesystem class has cached (gcsfs
    caches them per instance, and etils.epath, hence Orbax, holds an instance of its own:
    without this it would still list what was just moved or removed)."""
    for instance in list(getattr(type(fs), "_cache", {}).values()) + [fs]:
        instance.invalidate_cache()


def getsize(path: str) -> int:
    if not is_url(path):
        return os.path.getsize(path)
    fs, p = filesystem(path)
    return int(fs.size(p))


@contextlib.contextmanager
def local_file(path: str):
    """Yields a local file name to write `path` through, for writers that take only local
    names (safetensors, numpy, PIL): `path` itself when it is local, else a temporary file
    uploaded to the URL (one upload) when the block ends without an error."""
    if not is_url(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="jaxt2i-upload-") as d:
        local = os.path.join(d, basename(path))
        yield local
        fs, p = filesystem(path)
        fs.put_file(local, p)


@contextlib.contextmanager
def local_dir(path: str):
    """`local_file` for a folder: yields `path` itself when local, else a temporary folder
    whose files are uploaded below the URL when the block ends without an error."""
    if not is_url(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="jaxt2i-upload-") as d:
        yield d
        upload(d, path)


def upload(local_dir: str, url: str, last: tuple[str, ...] = ()) -> int:
    """Copies a local folder's files to below `url` (same relative paths; others there are
    left alone); files named in `last` (e.g. a manifest, which says "complete") go last.
    Each file is one upload (`write_bytes`' atomicity per file). Returns the file count."""
    fs, root = filesystem(url)
    files = []
    for dirpath, _, names in os.walk(local_dir):
        files += [os.path.join(dirpath, n) for n in names]
    files.sort(key=lambda p: (os.path.basename(p) in last, p))
    for p in files:
        rel = os.path.relpath(p, local_dir).replace(os.sep, "/")
        fs.put_file(p, posixpath.join(root, rel))
    return len(files)


def download(url: str, local_dir: str) -> int:
    """Copies the files below `url` to `local_dir` (same relative paths), skipping those
    already copied from the same object version (size and generation / ETag / time, recorded
    in `local_dir/.jaxt2i-download.json`); returns how many were copied."""
    fs, root = filesystem(url)
    record_path = os.path.join(local_dir, DOWNLOAD_RECORD)
    try:
        with open(record_path) as f:
            have = json.load(f)
    except (OSError, ValueError):
        have = {}
    copied = 0
    for name, info in sorted(fs.find(root, detail=True).items()):
        rel = posixpath.relpath(name, root)
        dst = os.path.join(local_dir, *rel.split("/"))
        version = list(_version(info))
        if have.get(rel) == version and os.path.exists(dst):
            continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        part = f"{dst}.part-{os.getpid()}"  # processes of one host may copy at once
        fs.get_file(name, part)
        os.replace(part, dst)
        have[rel] = version
        copied += 1
    if copied:
        write_text(record_path, json.dumps(have))
    return copied


DOWNLOAD_RECORD = ".jaxt2i-download.json"
