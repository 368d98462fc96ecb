"""img2dataset-style webdataset shards of the shapes world, with bad members mixed in on request.

    python -m jaxt2i.data.shapes_shards --out=DIR --shards=3 --per_shard=24 --corrupt=all

writes what img2dataset's `--output_format=webdataset` writes (`00000.tar` with `KEY.jpg`,
`KEY.txt` and `KEY.json` per sample, `00000.parquet` with the `.json` rows when pyarrow is
installed, `00000_stats.json`), so that the sharded-data path (`python -m jaxt2i.data.builders
--input=DIR`, with or without Beam) can be tried, and tested, offline. Each kind named in
`--corrupt` is mixed in once (`all`: every kind of `KINDS`), spread over the shards: the
builder must skip or convert each one and count it (`build_report.json`).

The pieces (`encode_image`, `tar_bytes`, `sample_members`, `write_shard`) are also what the
tests use to write shards by hand.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

# Kind -> what `python -m jaxt2i.data.builders` counts for it (skips, then conversions).
SKIP_KINDS = {
    "empty_file": "empty_file",            # a zero-byte image member
    "unreadable": "unreadable",            # an HTML error page saved as the .jpg
    "truncated": "truncated",              # a JPEG cut in half
    "too_small": "too_small",              # 4 x 4 pixels
    "extreme_aspect": "extreme_aspect",    # 200 x 20 pixels
    "missing_caption": "missing_caption",  # no .txt and no caption in the .json
    "empty_caption": "empty_caption",      # an empty .txt (img2dataset's caption-less row)
    "no_image": "no_image",                # .txt and .json without an image member
    "duplicate_key": "duplicate_key",      # the first shard's first key again, in another shard
}
CONVERT_KINDS = {
    "cmyk": "converted_CMYK",              # a CMYK JPEG
    "gray16": "converted_I_16",            # a 16-bit grayscale PNG
    "palette": "converted_P",              # a 64-colour palette PNG
    "animated": "animated_first_frame",    # a two-frame GIF (also counted converted_P)
    "rgba": "converted_RGBA",              # a PNG with a transparent half (onto white)
    "non_utf8_caption": "non_utf8_caption",  # a Windows-1252 caption (a no-break space)
    "failed_download": "img2dataset_failed_to_download",  # a URL only in _stats.json
}
# Whole-shard damage: the last tar cut through its last sample's image (its earlier samples
# are read: `truncated_tar`, and `truncated_member` for the cut one), and one more file named
# like a shard that is no tar (`bad_shard`).
SHARD_KINDS = ("truncated_tar", "bad_shard")
KINDS = (*SKIP_KINDS, *CONVERT_KINDS, *SHARD_KINDS)


def encode_image(image, fmt: str = "JPEG", **kw) -> bytes:
    """A PIL image or uint8 array [H, W, C] -> the bytes of `fmt` (PIL's format name)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def tar_bytes(members):
    """[(name, bytes)] -> (tar bytes, {name: (header offset, data offset)})."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tf:
        where = {m.name: (m.offset, m.offset_data) for m in tf.getmembers()}
    return buf.getvalue(), where


def sample_members(key, image_ext, image, caption, size, meta_caption=True):
    """img2dataset's members of one sample: `KEY.<image_ext>` (none if image_ext is None),
    `KEY.txt` (none if caption is None; bytes as given) and `KEY.json` (its metadata; the
    caption repeated there unless meta_caption is False). size: (width, height)."""
    out = []
    if image_ext is not None:
        out.append((f"{key}.{image_ext}", image))
    if caption is not None:
        out.append((f"{key}.txt", caption))
    meta = {"url": f"http://example.com/{key}.jpg", "key": key, "status": "success",
            "error_message": None, "width": size[0], "height": size[1],
            "caption": (caption.decode("utf-8", "replace") if meta_caption
                        and caption is not None else None)}
    out.append((f"{key}.json", json.dumps(meta, indent=4).encode()))
    return out


def write_shard(folder, n, members, n_urls=None, data=None):
    """Writes shard `n` as img2dataset does: NNNNN.tar (`data`, default the tar of `members`),
    NNNNN.parquet (the .json rows; only where pyarrow is installed: the builder reads the tar)
    and NNNNN_stats.json (`n_urls` URLs tried, default: as many as samples)."""
    stem = os.path.join(folder, f"{n:05d}")
    with open(stem + ".tar", "wb") as f:
        f.write(tar_bytes(members)[0] if data is None else data)
    metas = [json.loads(d) for name, d in members if name.endswith(".json")]
    try:
        import pyarrow as pa  # pylint: disable=import-outside-toplevel
        import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    except ImportError:
        pass
    else:
        pq.write_table(pa.Table.from_pylist(metas), stem + ".parquet")
    ok = len(metas)
    status = {"success": ok}
    if n_urls and n_urls > ok:
        status["failed_to_download"] = n_urls - ok
    with open(stem + "_stats.json", "w") as f:
        json.dump({"count": n_urls or ok, "successes": ok, "status_dict": status}, f)


def parse_kinds(spec: str) -> list[str]:
    """'all', '' or 'KIND,KIND,...' -> the kinds, in `KINDS` order; ValueError naming an
    unknown one."""
    asked = [k.strip() for k in spec.split(",") if k.strip()]
    unknown = [k for k in asked if k not in KINDS and k != "all"]
    if unknown:
        raise ValueError(f"--corrupt={spec!r}: unknown kind {unknown[0]!r}; use 'all' or "
                         f"some of {', '.join(KINDS)}")
    return [k for k in KINDS if k in asked or "all" in asked]


def _bad_sample(kind, key, image, caption, size):
    """The members of sample `key` made into `kind` (image: uint8 [H, W, 3])."""
    pil = Image.fromarray(image)
    ext, data, cap = "jpg", encode_image(pil, "JPEG", quality=95), caption.encode()
    if kind == "empty_file":
        data = b""
    elif kind == "unreadable":
        data = b"<html>404 not found</html>"
    elif kind == "truncated":
        data = data[:len(data) // 2]
    elif kind == "too_small":
        data = encode_image(image[:4, :4], "JPEG")
    elif kind == "extreme_aspect":
        ext, data = "png", encode_image(Image.new("RGB", (200, 20), (200, 30, 30)), "PNG")
    elif kind == "missing_caption":
        cap = None
    elif kind == "empty_caption":
        cap = b""
    elif kind == "no_image":
        ext = None
    elif kind == "cmyk":
        data = encode_image(pil.convert("CMYK"), "JPEG", quality=95)
    elif kind == "gray16":
        gray = np.asarray(pil.convert("L")).astype(np.uint16) * 257
        ext, data = "png", encode_image(Image.fromarray(gray), "PNG")
    elif kind == "palette":
        ext = "png"
        data = encode_image(pil.convert("P", palette=Image.ADAPTIVE, colors=64), "PNG")
    elif kind == "animated":
        ext = "gif"
        data = encode_image(pil, "GIF", save_all=True, loop=0, duration=100,
                            append_images=[Image.fromarray(255 - image)])
    elif kind == "rgba":
        alpha = np.full(image.shape[:2], 255, np.uint8)
        alpha[:, image.shape[1] // 2:] = 0
        ext, data = "png", encode_image(np.dstack([image, alpha]), "PNG")
    elif kind == "non_utf8_caption":  # Windows text: a no-break space is byte 0xA0
        cap = caption.replace(" ", "\xa0", 1).encode("cp1252")
    return sample_members(key, ext, data, cap, size)


def write_shards(out: str, shards: int, per_shard: int, corrupt=(), resolution: int = 32,
                 seed: int = 0) -> dict:
    """Writes `shards` tars of `per_shard` shapes-world samples each into the new folder `out`,
    with one sample (or shard) of each kind in `corrupt` (see `KINDS`), spread over the shards.

    Returns:
      {'samples': samples in the tars, as the builder reads them (a `duplicate_key` and a
      `truncated_tar`'s cut one included, a `failed_download` not), 'files': tar files
      written (a `bad_shard` one included), 'kinds': {kind: the shard it went into}}.
    """
    from jaxt2i.data import shapes  # pylint: disable=import-outside-toplevel

    corrupt = [k for k in KINDS if k in set(corrupt)]
    per_sample = [k for k in corrupt if k not in SHARD_KINDS]
    if shards < 1 or resolution < 16:
        raise ValueError(f"--shards={shards} must be at least 1 and --resolution={resolution} "
                         f"at least 16")
    need = 2 + -(-len(per_sample) // shards)  # a good first and last sample in each shard
    if per_shard < need:
        raise ValueError(f"--per_shard={per_shard} is too small for {len(per_sample)} corrupt "
                         f"kinds over {shards} shards: pass at least {need}")
    if os.path.exists(out) and os.listdir(out):
        raise ValueError(f"--out={out!r} is not empty; pass a new folder")
    os.makedirs(out, exist_ok=True)
    world = shapes.ShapesSource(resolution, shards * per_shard, "train", seed)
    # kind j goes into shard j % shards, at position 1 + j // shards
    placed = {(j % shards, 1 + j // shards): k for j, k in enumerate(per_sample)}
    size = (resolution, resolution)
    for s in range(shards):
        members, n_urls = [], per_shard
        for i in range(per_shard):
            ex = world[s * per_shard + i]
            kind = placed.get((s, i))
            key = "000000000" if kind == "duplicate_key" else f"{s:05d}{i:04d}"
            if kind == "failed_download":  # never reached the tar: only its stats say so
                continue
            if kind in (None, "duplicate_key"):
                members += sample_members(key, "jpg", encode_image(ex["image"], quality=95),
                                          ex["caption"].encode(), size)
            else:
                members += _bad_sample(kind, key, ex["image"], ex["caption"], size)
        data = None
        if "truncated_tar" in corrupt and s == shards - 1:  # cut through the last image
            data, where = tar_bytes(members)
            data = data[:where[f"{s:05d}{per_shard - 1:04d}.jpg"][1] + 100]
        write_shard(out, s, members, n_urls=n_urls, data=data)
    if "bad_shard" in corrupt:
        with open(os.path.join(out, f"{shards:05d}.tar"), "wb") as f:
            f.write(b"\x89 not a tar " * 300)
    return {"samples": shards * per_shard - ("failed_download" in corrupt),
            "files": shards + ("bad_shard" in corrupt),
            "kinds": {k: (shards if k == "bad_shard" else shards - 1 if k == "truncated_tar"
                          else per_sample.index(k) % shards) for k in corrupt}}


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("out", None, "New folder for the shards.")
    flags.DEFINE_integer("shards", 3, "Tar shards to write.")
    flags.DEFINE_integer("per_shard", 24, "Samples per shard.")
    flags.DEFINE_string("corrupt", "", "Kinds of bad members to mix in, one of each: 'all' or "
                        f"some of {','.join(KINDS)}.")
    flags.DEFINE_integer("resolution", 32, "Image side (px).")
    flags.DEFINE_integer("seed", 0, "Seed of the shapes world.")
    flags.mark_flag_as_required("out")


def main(argv) -> None:
    """Writes the shards the flags ask for and says what went in."""
    from absl import flags

    from jaxt2i.config import ConfigError  # pylint: disable=import-outside-toplevel

    F = flags.FLAGS
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}")
    try:
        kinds = parse_kinds(F.corrupt)
        out = write_shards(F.out, F.shards, F.per_shard, kinds, F.resolution, F.seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    bad = ", ".join(f"{k} (shard {s})" for k, s in out["kinds"].items()) or "none"
    print(f"wrote {out['samples']} samples in {out['files']} tar files to {F.out}; bad: {bad}",
          flush=True)


def cli() -> None:
    """Console-script entry point (`jaxt2i-shapes-shards`)."""
    from jaxt2i.cli import run_app  # pylint: disable=import-outside-toplevel

    run_app(main, _define_flags)


if __name__ == "__main__":
    cli()
