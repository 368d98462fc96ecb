"""What every export format shares: the output-directory protocol and the manifest.

An export is written into a fresh sibling directory (`OUT.partial-PID`) and moved into place
only when complete, so a failed export leaves no half-written folder and never destroys an
earlier export at the same path. Every export carries `manifest.json`: the format, the
source checkpoints with their training step and config hash, the versions of the libraries
that wrote it and the SHA-256 of each file.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import socket
import tempfile
from importlib import metadata
from typing import Any, Iterator, Sequence

from jaxt2i import paths
from jaxt2i.config import ConfigError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
FORMATS = ("torch", "onnx", "stablehlo")


class ExportError(ConfigError):
    """The model cannot be written in the requested format (e.g. an op the converter lacks)."""


def config_hash(config: dict) -> str:
    """SHA-256 of a config's canonical JSON (sorted keys): equal configs, equal hashes."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def versions(*packages: str) -> dict[str, str | None]:
    """Installed versions of jaxt2i, jax, jaxlib, flax and `packages` (None if absent)."""
    out = {}
    for name in ("jaxt2i", "jax", "jaxlib", "flax", "safetensors", *packages):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def stage_dir_name(k: int, unet_cfg) -> str:
    """'stage0_base_32px', 'stage1_sr_128px' ('stage0_decoder_64px' for an unCLIP decoder):
    one folder per stage."""
    kind = "sr" if unet_cfg.is_sr else "decoder" if getattr(unet_cfg, "image_embed_dim", 0) \
        else "base"
    return f"stage{k}_{kind}_{unet_cfg.image_size}px"


def _is_export(path: str) -> bool:
    """Whether `path` holds a previous export (its manifest names a known format)."""
    try:
        return json.loads(paths.read_text(paths.join(path, MANIFEST))).get("format") in FORMATS
    except (OSError, ValueError, AttributeError):
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_partials(out: str, log=None) -> list[str]:
    """Removes `OUT.partial-HOST-PID` / `OUT.old-HOST-PID` left by dead exports of this host.

    A live process's partial (an export running now) and other hosts' are left alone.
    Returns the removed paths.
    """
    parent, base = os.path.split(os.path.abspath(out))
    host = socket.gethostname()
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        for kind in (".partial-", ".old-"):
            prefix = f"{base}{kind}"
            if not name.startswith(prefix):
                continue
            tag = name[len(prefix):]
            h, _, pid = tag.rpartition("-")
            if h and h != host or not pid.isdigit() or _pid_alive(int(pid)):
                continue
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            removed.append(os.path.join(parent, name))
            if log is not None:
                log(f"removed {os.path.join(parent, name)}, left by an export that was killed")
    return removed


@contextlib.contextmanager
def staging_dir(out: str, overwrite: bool = False, log=None) -> Iterator[str]:
    """Yields an empty directory to write into; on success it becomes `out`.

    Raises ConfigError if `out` is a non-empty directory (or a file) and `overwrite` is False,
    and, even with `overwrite`, if `out` is not a previous export (no manifest.json) or holds
    the current directory: only an export is ever replaced. Partial directories of killed
    exports are removed first. On an exception the partial directory is removed and `out` is
    left as it was.

    A URL `out` (`gs://...`) is written in a local temporary directory and uploaded when
    complete, manifest.json last (an object store has no rename: `--overwrite` removes the
    earlier export first, so a failed upload leaves no export there, never a mixed one).
    """
    if paths.is_url(out):
        with _url_staging(out, overwrite) as tmp:
            yield tmp
        return
    out = os.path.abspath(out)
    if os.path.isfile(out):
        raise ConfigError(f"--out {out!r} is a file; choose a directory")
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise ConfigError(f"--out {out!r} is not empty; pass --overwrite to replace an "
                              "earlier export there, or choose another directory")
        cwd = os.path.realpath(os.getcwd())
        real = os.path.realpath(out)
        if cwd == real or cwd.startswith(real + os.sep):
            raise ConfigError(f"--out {out!r} holds the current directory; --overwrite never "
                              "replaces it: choose another directory")
        if not _is_export(out):
            raise ConfigError(f"--out {out!r} is not an earlier export (it has no {MANIFEST}); "
                              "--overwrite replaces only an export: choose another directory")
    parent = os.path.dirname(out)
    clean_stale_partials(out, log)
    tag = f"{socket.gethostname()}-{os.getpid()}"
    tmp = f"{out}.partial-{tag}"
    try:
        os.makedirs(parent, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    except OSError as e:
        from jaxt2i.workdir import disk_error

        raise ConfigError(f"--out {out!r} cannot be written ({disk_error(e) or e.strerror}); "
                          "choose a writable directory") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(out):
        old = f"{out}.old-{tag}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _url_staging(out: str, overwrite: bool) -> Iterator[str]:
    """`staging_dir` for a URL."""
    if paths.isfile(out):
        raise ConfigError(f"--out {out!r} is a file; choose a directory")
    if paths.isdir(out) and paths.listdir(out):
        if not overwrite:
            raise ConfigError(f"--out {out!r} is not empty; pass --overwrite to replace an "
                              "earlier export there, or choose another directory")
        if not _is_export(out):
            raise ConfigError(f"--out {out!r} is not an earlier export (it has no {MANIFEST}); "
                              "--overwrite replaces only an export: choose another directory")
    with tempfile.TemporaryDirectory(prefix="jaxt2i-export-") as tmp:
        yield tmp
        paths.rmtree(out)
        paths.upload(tmp, out, last=(MANIFEST,))


def write_manifest(root: str, *, fmt: str, stages: Sequence[Any], settings: Sequence[Any] | None,
                   packages: Sequence[str] = (), extra: dict | None = None,
                   sources: Sequence[dict] = ()) -> dict:
    """Writes root/manifest.json describing the export (call last: it hashes every file).

    Args:
      root: the export directory being written.
      fmt: one of FORMATS.
      stages: the exported `jaxt2i.cascade.Stage`s (path, step, config).
      settings: their `StageSettings` where the format bakes them in (StableHLO), else None.
      packages: extra library names whose versions matter for this format.
      extra: more top-level fields.
      sources: more source records, listed before the stages' (e.g. an unCLIP prior's).
    """
    files = []
    for dirpath, _, names in os.walk(root):
        for n in sorted(names):
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            if rel != MANIFEST:
                files.append({"path": rel, "bytes": os.path.getsize(p), "sha256": file_sha256(p)})
    record = {
        "manifest_version": MANIFEST_VERSION,
        "format": fmt,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(*packages),
        "sources": [*sources] + [{"path": paths.abspath(s.path), "step": s.step,
                     "config_sha256": config_hash(dict(s.config.raw)),
                     "model_size": s.config.model_size,
                     "stage": "sr" if s.is_sr else "base"} for s in stages],
        "files": sorted(files, key=lambda f: f["path"]),
    }
    if settings is not None:
        record["settings"] = [dict(vars(s)) for s in settings]
    record.update(extra or {})
    with open(os.path.join(root, MANIFEST), "w") as f:
        json.dump(record, f, indent=2)
    return record


def write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)
