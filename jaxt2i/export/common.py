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
from importlib import metadata
from typing import Any, Iterator, Sequence

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
    """'stage0_base_32px', 'stage1_sr_128px': one folder per stage."""
    kind = "sr" if unet_cfg.is_sr else "base"
    return f"stage{k}_{kind}_{unet_cfg.image_size}px"


@contextlib.contextmanager
def staging_dir(out: str, overwrite: bool = False) -> Iterator[str]:
    """Yields an empty directory to write into; on success it becomes `out`.

    Raises ConfigError if `out` is a non-empty directory (or a file) and `overwrite` is False.
    On an exception the partial directory is removed and `out` is left as it was.
    """
    out = os.path.abspath(out)
    if os.path.isfile(out):
        raise ConfigError(f"--out {out!r} is a file; choose a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ConfigError(f"--out {out!r} is not empty; pass --overwrite to replace it or choose "
                          "another directory")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{out}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(out):
        old = f"{out}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def write_manifest(root: str, *, fmt: str, stages: Sequence[Any], settings: Sequence[Any] | None,
                   packages: Sequence[str] = (), extra: dict | None = None) -> dict:
    """Writes root/manifest.json describing the export (call last: it hashes every file).

    Args:
      root: the export directory being written.
      fmt: one of FORMATS.
      stages: the exported `jaxt2i.cascade.Stage`s (path, step, config).
      settings: their `StageSettings` where the format bakes them in (StableHLO), else None.
      packages: extra library names whose versions matter for this format.
      extra: more top-level fields.
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
        "sources": [{"path": os.path.abspath(s.path), "step": s.step,
                     "config_sha256": config_hash(s.config), "model_size": s.config.get(
                         "model_size"), "stage": s.config.get("stage")} for s in stages],
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
