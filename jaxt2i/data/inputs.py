"""Reading a user's images and captions so that no bad input stops a build.

Images: empty, unreadable or truncated files are skipped; grayscale, palette, RGBA, CMYK and
16-bit images become 8-bit RGB (transparency composited onto white), animated ones their
first frame; EXIF-rotated photos are turned upright; images below a minimum size (and always
those under `MIN_SIDE` pixels) or more than `MAX_ASPECT` times wider than high (or the
reverse) are skipped, huge ones optionally downscaled. Captions: any language (UTF-8, or
UTF-16 with its byte-order mark); other non-UTF-8 bytes are decoded as Windows-1252; captions
longer than `MAX_CAPTION_CHARS` are cut there; a caption that is not text (a JSON object, a
number) is skipped; empty or missing captions skip the image. Every case is counted in a
`Report` with example paths.

Captions come from a JSONL or CSV manifest, side-car `.txt` files next to the images, or a
COCO-style captions JSON (`read_entries`). The folder, the manifest and the image paths in it
may be URLs (`gs://bucket/images`, any fsspec protocol: `jaxt2i.paths`).
"""

from __future__ import annotations

import collections
import csv
import io
import json
import os
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps

from jaxt2i import paths as paths_lib

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_IMAGE_KEYS = ("image", "file_name", "file", "filename", "path", "image_path")
_CAPTION_KEYS = ("caption", "text", "prompt", "captions")
MIN_SIDE = 8  # no stage can learn a scene from fewer pixels
MAX_ASPECT = 5.0  # a square crop of a wider strip keeps under a fifth of it
MAX_CAPTION_CHARS = 4096  # text encoders read ~128 tokens; megabyte "captions" are data errors


class Report:
    """Counts of how each input was handled, with a few example paths per kind."""

    def __init__(self, max_examples: int = 5):
        self.counts: collections.Counter = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)
        self.max_examples = max_examples

    def add(self, kind: str, path: str | None = None) -> None:
        self.counts[kind] += 1
        if path is not None and len(self.examples[kind]) < self.max_examples:
            self.examples[kind].append(str(path))

    def to_json(self) -> dict:
        return {"counts": dict(self.counts), "examples": dict(self.examples)}

    def summary(self) -> str:
        """One line per kind: 'kind: count (e.g. path, path)'."""
        lines = []
        for kind, n in sorted(self.counts.items()):
            eg = self.examples.get(kind)
            lines.append(f"{kind}: {n}" + (f" (e.g. {', '.join(eg)})" if eg else ""))
        return "\n".join(lines)


def decode_text(raw: bytes | str) -> tuple[str, bool]:
    """Bytes or str (possibly with surrogate escapes) -> (clean text, was_not_utf8).

    Whitespace runs become one space, so captions never contain newlines.
    """
    if isinstance(raw, str):
        try:
            raw.encode("utf-8")
            return " ".join(raw.split()), False
        except UnicodeEncodeError:  # undecodable bytes smuggled in as surrogates
            raw = raw.encode("utf-8", "surrogateescape")
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):  # UTF-16 with its byte-order mark
        try:
            return " ".join(raw.decode("utf-16").split()), False
        except UnicodeDecodeError:
            pass
    try:
        return " ".join(raw.decode("utf-8-sig").split()), False
    except UnicodeDecodeError:
        return " ".join(raw.decode("cp1252", "replace").split()), True


def load_image(data: bytes, *, min_size: int = 0, max_size: int | None = None,
               max_aspect: float = MAX_ASPECT):
    """Decodes image bytes into an 8-bit RGB image ready to store.

    Args:
      data: the file's bytes.
      min_size: images whose shorter side is below this are rejected ('too_small').
      max_size: images whose shorter side is above this are downscaled to it.
      max_aspect: images more than this many times wider than high (or the reverse) are
        rejected ('extreme_aspect').

    Returns:
      (encoded bytes or None if rejected, (width, height), list of event kinds for the
      report). When the image is rejected the last kind is the reason: 'empty_file',
      'unreadable', 'truncated', 'too_small' or 'extreme_aspect'; the others say what was
      done to a kept image: 'converted_<mode>', 'animated_first_frame', 'exif_rotated',
      'downscaled'.
    """
    if not data:
        return None, (0, 0), ["empty_file"]
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        img.load()
    except OSError as e:  # PIL raises OSError subclasses for both cases
        # PNG: 'image file is truncated', JPEG: 'Truncated File Read'
        return None, (0, 0), ["truncated" if "truncated" in str(e).lower() else "unreadable"]
    except Exception:  # pylint: disable=broad-except  # decoders raise many types
        return None, (0, 0), ["unreadable"]
    events, changed = [], False
    if getattr(img, "n_frames", 1) > 1:  # an animated GIF / WebP / PNG: its first frame
        events.append("animated_first_frame")
        changed = True
    if img.getexif().get(0x0112, 1) != 1:  # EXIF orientation: camera photos stored sideways
        img, changed = ImageOps.exif_transpose(img), True
        events.append("exif_rotated")
    if img.mode != "RGB":
        events.append(f"converted_{img.mode.replace(';', '_')}")
        img, changed = _to_rgb(img), True
    w, h = img.size
    if min(w, h) < max(min_size, MIN_SIDE):
        return None, (w, h), events + ["too_small"]
    if max(w, h) > max_aspect * min(w, h):
        return None, (w, h), events + ["extreme_aspect"]
    if max_size and min(w, h) > max_size:
        f = max_size / min(w, h)
        img, changed = img.resize((max(1, round(w * f)), max(1, round(h * f))),
                                  Image.BICUBIC), True
        events.append("downscaled")
    if not changed and fmt in ("JPEG", "PNG"):
        return data, img.size, events  # already fine: keep the original bytes
    out = io.BytesIO()
    if fmt == "JPEG":
        img.save(out, "JPEG", quality=95)
    else:
        img.save(out, "PNG", compress_level=3)
    return out.getvalue(), img.size, events


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited onto white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img).astype(np.float64)
        top = 65535.0 if a.max() > 255 else 255.0  # 16-bit data, or 8-bit data in 'I'
        img = Image.fromarray(np.clip(a * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")



def _clean_captions(raw_caps, path: str, report: Report) -> list[str]:
    caps = []
    for raw in raw_caps:
        if raw is None:
            continue
        if not isinstance(raw, (str, bytes)):  # a JSON object / number: not a caption
            report.add("non_text_caption", path)
            continue
        text, bad = decode_text(raw)
        if bad:
            report.add("non_utf8_caption", path)
        if len(text) > MAX_CAPTION_CHARS:
            report.add("long_caption_cut", path)
            text = text[:MAX_CAPTION_CHARS]
        if text:
            caps.append(text)
    if not caps:
        report.add("empty_caption" if any(r is not None for r in raw_caps)
                   else "missing_caption", path)
    return caps


def read_entries(root: str, manifest: str | None, fmt: str,
                 report: Report) -> Iterator[tuple[str, list[str]]]:
    """Lists a user's images with their captions.

    Args:
      root: folder of the images (relative manifest paths start here; default: the
        manifest's folder); a local path or a URL.
      manifest: JSONL / CSV / COCO JSON path or URL, or None for side-car `.txt` files.
      fmt: 'auto', 'jsonl', 'csv', 'coco' or 'txt'.
      report: counts bad rows and captions.

    Yields:
      (image path, [cleaned captions]) in a stable order; entries without a caption are
      counted and left out.
    """
    requested = fmt
    if fmt == "auto":
        fmt = _guess_format(manifest)
    if fmt not in ("jsonl", "csv", "coco", "txt"):
        raise ValueError(f"unknown format {requested!r}; use 'auto', 'jsonl', 'csv', "
                         f"'coco' or 'txt'")
    if root and not paths_lib.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} not found; pass an existing --root")
    if fmt == "txt":
        rows = _txt_rows(root)
    else:
        if not manifest or not paths_lib.exists(manifest):
            raise FileNotFoundError(f"manifest {manifest!r} not found; pass the path of "
                                    f"the {fmt} file")
        base = root or paths_lib.dirname(manifest)
        rows = {"jsonl": _jsonl_rows, "csv": _csv_rows, "coco": _coco_rows}[fmt](
            manifest, base, report)
    for path, raw_caps in rows:
        caps = _clean_captions(raw_caps, paths_lib.relpath(path, root or "."), report)
        if caps:
            yield path, caps


def _guess_format(manifest: str | None) -> str:
    if manifest is None:
        return "txt"
    low = manifest.lower()
    if low.endswith(".csv") or low.endswith(".tsv"):
        return "csv"
    if low.endswith(".jsonl"):
        return "jsonl"
    with paths_lib.open_binary(manifest) as f:
        head = f.read(4096).lstrip()
    return "coco" if head.startswith(b"{") and b'"images"' in head else "jsonl"


def _txt_rows(root: str):
    for dirpath, dirnames, files in paths_lib.walk(root):
        dirnames.sort()
        names = set(files)
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            txt = paths_lib.join(dirpath, stem + ".txt")
            if stem + ".txt" in names:
                with paths_lib.open_binary(txt) as f:
                    yield paths_lib.join(dirpath, name), [f.read()]
            else:
                yield paths_lib.join(dirpath, name), [None]


def _pick(row: dict, keys) -> object:
    for k in keys:
        if k in row:
            return row[k]
    return None


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _jsonl_rows(manifest: str, base: str, report: Report):
    with paths_lib.open_binary(manifest) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:  # surrogateescape keeps non-UTF-8 bytes for decode_text to repair
                row = json.loads(line.decode("utf-8", "surrogateescape"))
                image = _pick(row, _IMAGE_KEYS)
                if not isinstance(image, str):
                    raise ValueError("no image key")
            except (ValueError, AttributeError, TypeError):
                report.add("bad_manifest_line", f"{manifest}:{n}")
                continue
            yield paths_lib.join(base, image), _as_list(_pick(row, _CAPTION_KEYS))


def _csv_rows(manifest: str, base: str, report: Report):
    with io.TextIOWrapper(paths_lib.open_binary(manifest), newline="", encoding="utf-8",
                          errors="surrogateescape") as f:
        delim = "\t" if manifest.lower().endswith(".tsv") else ","
        reader = csv.DictReader(f, delimiter=delim)
        fields = {k.strip().lower(): k for k in reader.fieldnames or []}
        img_key = next((fields[k] for k in _IMAGE_KEYS if k in fields), None)
        cap_key = next((fields[k] for k in _CAPTION_KEYS if k in fields), None)
        if img_key is None:
            raise ValueError(f"CSV {manifest} has columns {list(fields)}; name the image "
                             f"column one of {_IMAGE_KEYS}")
        for n, row in enumerate(reader, 2):
            if not row.get(img_key):
                report.add("bad_manifest_line", f"{manifest}:{n}")
                continue
            yield paths_lib.join(base, row[img_key]), [row.get(cap_key) if cap_key else None]


def _coco_rows(manifest: str, base: str, report: Report):
    with paths_lib.open_binary(manifest) as f:
        try:
            coco = json.loads(f.read().decode("utf-8", "surrogateescape"))
        except ValueError as e:
            raise ValueError(f"COCO captions file {manifest} is not JSON ({e})") from None
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k, []), list)
                                             for k in ("images", "annotations")):
        raise ValueError(f"COCO captions file {manifest} must be an object with 'images' and "
                         "'annotations' lists")

    def order(entry):  # numeric ids in numeric order (as before), then any others
        i = entry.get("id", 0) if isinstance(entry, dict) else None
        return (0, i, "") if isinstance(i, (int, float)) else (1, 0, str(i))

    caps = collections.defaultdict(list)
    for n, ann in enumerate(sorted(coco.get("annotations", []), key=order)):
        if isinstance(ann, dict) and isinstance(ann.get("image_id"), (int, str)):
            caps[ann["image_id"]].append(ann.get("caption"))
        else:
            where = ann.get("id", n) if isinstance(ann, dict) else n
            report.add("bad_manifest_line", f"{manifest}:annotation {where}")
    for n, im in enumerate(sorted(coco.get("images", []), key=order)):
        if not isinstance(im, dict) or not isinstance(im.get("file_name"), str):
            where = im.get("id", n) if isinstance(im, dict) else n
            report.add("bad_manifest_line", f"{manifest}:image {where}")
            continue
        key = im.get("id")
        yield (paths_lib.join(base, im["file_name"]),
               (caps.get(key) if isinstance(key, (int, str)) else None) or [None])
