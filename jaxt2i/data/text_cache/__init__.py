"""Precomputed frozen-T5 embeddings, so training need not run T5 every step.

`build_text_cache` runs an encoder over a dataset's captions once and writes bfloat16
embeddings and bool masks in shards of `.npy` files (bfloat16 stored as its uint16 bit
pattern, so files memory-map with plain numpy) plus `index.json`. Each shard keeps only
as many tokens as its longest caption needs; `TextCache` pads back to the encoder's full
length with zeros (masked out) when read. Example i of the dataset is entry i of the cache.

A rerun skips shards already written for the same captions (file names carry a checksum),
so an interrupted build resumes.

The cache directory may be a URL (`gs://bucket/cache`, any fsspec URL: see `jaxt2i.paths`):
each shard file is then uploaded whole (one object, complete or absent, as a local file is
renamed into place), and `TextCache` reads a shard's files into memory the first time one of
its examples is asked for (a local cache is memory-mapped). Beside each shard, `key_*.npy` holds the CRC-32 of every
caption, so training checks that the cache and the dataset agree example by example.

Many processes build one cache together (`process_count` > 1, e.g. under `jax.distributed`):
process p encodes shards p, p + P, ...; after a barrier process 0 writes index.json. With a
built TFDS dataset the cache's shards follow the dataset's own shard lengths. Each process
encodes with T5 sharded over its own local devices only (`sharded.py`: a mesh of
`jax.local_devices()`, default fsdp over all of them; params split by the project's sharding
rules, captions split over data x fsdp), computing in float32 from bfloat16 params so that
the cache's bits do not depend on the mesh or batch size (a tensor axis reorders sums: ~0.03%
of values move by one bfloat16 ulp). Progress lines give captions/s and the time left per
process; index.json's "build" records the size and the throughput of all processes.

Picking the mesh for T5-XXL (encoder 4.76B params, 9.5 GB in bfloat16) on one host of a TPU
pod (4 v4 chips, 32 GiB each): `fsdp:4` keeps 2.4 GB of params per chip and splits each batch
four ways; its weights are all-gathered layer by layer, so raise --batch_size (e.g. 256) to
keep the gathers small next to the matmuls. `data:4` keeps a whole copy per chip (fits in
32 GiB) and gathers nothing. Add `tensor` (a size dividing its 64 heads and d_ff 10240) only
when a batch is too small to split over every device.

CLI (console script `jaxt2i-text-cache`):
     python -m jaxt2i.data.text_cache --encoder=DIR --out_dir=DIR --shapes=train:10000
"""

from __future__ import annotations

import io
import json
import os
import re
import time
import zlib
from typing import Any, Iterable, Iterator

import ml_dtypes
import numpy as np

from jaxt2i import paths as fspaths

INDEX_FILE = "index.json"


def _caption_stream(captions: Any) -> tuple[Iterator[str], int | None]:
    """Captions of a list, a random-access source or any iterable, and their number."""
    if hasattr(captions, "caption_at") and hasattr(captions, "__len__"):  # ShapesSource
        return (captions.caption_at(i) for i in range(len(captions))), len(captions)
    if hasattr(captions, "__getitem__") and hasattr(captions, "__len__") and not isinstance(
            captions, (list, tuple)):
        def records():
            for i in range(len(captions)):
                c = captions[i]["caption"]
                yield c.decode("utf-8", "replace") if isinstance(c, bytes) else str(c)
        return records(), len(captions)
    n = len(captions) if isinstance(captions, (list, tuple)) else None
    return (c.decode("utf-8", "replace") if isinstance(c, bytes) else str(c)
            for c in captions), n


def _chunks(it: Iterator[str], sizes: Iterator[int]) -> Iterator[list[str]]:
    """Consecutive chunks of the captions, of the given sizes (the last may be short)."""
    size, chunk = next(sizes), []
    for c in it:
        if size == 0:
            raise ValueError("there are more captions than the shard_sizes cover; the cache's "
                             "shards must cover the dataset exactly")
        chunk.append(c)
        if len(chunk) == size:
            yield chunk
            size, chunk = next(sizes, 0), []
    if chunk:
        yield chunk


def caption_key(caption: str) -> int:
    """The CRC-32 of a caption (UTF-8), the key `key_*.npy` stores per example."""
    return zlib.crc32(caption.encode("utf-8", "replace")) & 0xFFFFFFFF


def dataset_shard_lengths(source) -> list[int] | None:
    """Examples per file of a TFDS data source's split (None for other sources)."""
    info, split = getattr(source, "dataset_info", None), getattr(source, "split", None)
    try:
        lengths = [int(n) for n in info.splits[split].shard_lengths]
    except Exception:  # noqa: BLE001 - not a TFDS source, or no shard lengths recorded
        return None
    return lengths or None


def _barrier(name: str) -> None:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _encode(encoder, captions: list[str], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """[N] captions -> (uint16 bits of bfloat16 [N, L, D], bool [N, L])."""
    embs, masks = [], []
    for i in range(0, len(captions), batch_size):
        batch = captions[i:i + batch_size]
        pad = batch_size - len(batch)  # a fixed batch shape compiles the encoder once
        emb, mask = encoder.encode(batch + [""] * pad)
        emb = np.asarray(emb)[:len(batch)].astype(ml_dtypes.bfloat16)
        embs.append(emb.view(np.uint16))
        masks.append(np.asarray(mask, bool)[:len(batch)])
    return np.concatenate(embs), np.concatenate(masks)


def _save(path: str, array: np.ndarray) -> None:
    if fspaths.is_url(path):  # one upload: the object is complete or absent
        buf = io.BytesIO()
        np.save(buf, array)
        fspaths.write_bytes(path, buf.getvalue())
        return
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)  # a shard is either complete or absent


def _load(path: str) -> np.ndarray:
    """A .npy file memory-mapped (read whole for a URL)."""
    if fspaths.is_url(path):
        return np.load(io.BytesIO(fspaths.read_bytes(path)))
    return np.load(path, mmap_mode="r")


def _my_share(sizes, total, shard_size, p, count) -> int | None:
    """Captions in the shards process p encodes (None when the total is not known)."""
    if sizes is None:
        if total is None:
            return None
        sizes = [min(shard_size, total - i) for i in range(0, total, shard_size)]
    return sum(n for k, n in enumerate(sizes) if k % count == p)


class _Progress:
    """This process's counts, and its progress line: captions/s and the time left."""

    def __init__(self, share: int | None, who: str):
        self.share, self.who, self.t0 = share, who, time.perf_counter()
        self.encoded = self.written = self.done = 0  # done: of its shards, encoded or found

    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, shards: int) -> None:
        rate = self.encoded / max(self.seconds(), 1e-9)
        left = None if self.share is None else self.share - self.done
        if left is None or (left and not rate):
            eta = "?"
        else:
            m, sec = divmod(round(left / rate if left else 0), 60)
            eta = f"{m // 60}:{m % 60:02d}:{sec:02d}"
        print(f"text cache: {self.who}{self.done}/{self.share or '?'} of this process's "
              f"captions done, {shards} shards read ({self.encoded} encoded at {rate:.0f} "
              f"captions/s; ETA {eta}; {self.written / 2**20:.1f} MiB written)", flush=True)


def build_text_cache(encoder, captions: Any, out_dir: str, *, shard_size: int = 4096,
                     shard_sizes: Iterable[int] | None = None, batch_size: int = 64,
                     log_every: int = 10, process_index: int = 0, process_count: int = 1,
                     barrier=None, mesh=None) -> dict:
    """Encodes every caption once and writes the cache (this process's share of it).

    Args:
      encoder: a `jaxt2i.text.encoder.TextEncoder` (sharded over this process's local devices
        by `mesh`), a `sharded.ShardedEncoder`, or any object with
        `encode(list[str]) -> (emb [B, L, D], mask [B, L])`, `max_length` (L) and
        `config.d_model` (D), used as is.
      captions: list of str, an iterable of str, or a random-access source whose records
        have a 'caption' (str or UTF-8 bytes), e.g. `ShapesSource` or a TFDS data source.
      out_dir: directory for the shards and index.json (created).
      shard_size: examples per shard file, unless `shard_sizes` is given.
      shard_sizes: examples of each shard in order (e.g. `dataset_shard_lengths(source)`, so
        cache shard k holds the examples of the dataset's file k); must cover every caption.
      batch_size: captions per `encode` call.
      log_every: print progress every this many shards (0: never).
      process_index, process_count: this process's place among those building the cache
        together; process p encodes shards k with k % process_count == p. Every process reads
        all captions (for the shards' checksums) and must call this with the same arguments.
      barrier: callable(name) that waits for every process (default, with process_count > 1:
        `jax.experimental.multihost_utils.sync_global_devices`).
      mesh: for a `TextEncoder`: a `jax.sharding.Mesh` of local devices or its sizes
        ('fsdp:4', {'data': 2, 'tensor': 2}); default `sharded.DEFAULT_MESH` (fsdp over all
        local devices).

    Returns:
      The index dict also written (by process 0) to `out_dir/index.json`.
    """
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size ({shard_size}) and batch_size ({batch_size}) must be "
                         f">= 1")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index ({process_index}) must be in [0, process_count="
                         f"{process_count})")
    sizes = [int(n) for n in shard_sizes] if shard_sizes is not None else None
    if sizes is not None and (not sizes or min(sizes) < 1):
        raise ValueError(f"shard_sizes must be positive counts, got {sizes[:8]}")
    from jaxt2i.data.text_cache.sharded import on_mesh  # pylint: disable=import-outside-toplevel

    encoder = on_mesh(encoder, mesh)
    dp = int(getattr(encoder, "data_parallel", 1))
    if batch_size % dp:
        raise ValueError(f"batch_size ({batch_size}) must be a multiple of the {dp} devices the "
                         f"mesh splits the batch over (data x fsdp); use --batch_size="
                         f"{-(-batch_size // dp) * dp}")
    fspaths.makedirs(out_dir)
    stream, total = _caption_stream(captions)
    if sizes is not None and total is not None and sum(sizes) != total:
        raise ValueError(f"shard_sizes add up to {sum(sizes)} examples but there are {total} "
                         "captions; the cache's shards must cover the dataset exactly")
    length, dim = int(encoder.max_length), int(encoder.config.d_model)
    progress = _Progress(_my_share(sizes, total, shard_size, process_index, process_count),
                         f"process {process_index}: " if process_count > 1 else "")
    shards, start = [], 0
    chunks = _chunks(stream, iter(sizes) if sizes is not None else iter(lambda: shard_size, 0))
    for k, chunk in enumerate(chunks):
        crc = zlib.crc32("\n".join(chunk).encode("utf-8", "replace")) & 0xFFFFFFFF
        name = f"{k:05d}_{crc:08x}"
        files = {kind: f"{kind}_{name}.npy" for kind in ("emb", "mask", "key")}
        where = {kind: fspaths.join(out_dir, f) for kind, f in files.items()}
        mine = k % process_count == process_index
        if mine and not (fspaths.exists(where["emb"]) and fspaths.exists(where["mask"])):
            emb, mask = _encode(encoder, chunk, batch_size)  # [n, L, D], [n, L]
            if emb.shape[1:] != (length, dim):
                raise ValueError(f"encoder returned embeddings {emb.shape[1:]} but declares "
                                 f"(max_length, d_model) = {(length, dim)}")
            tokens = max(1, int(mask.any(0).nonzero()[0].max(initial=0)) + 1)
            _save(where["emb"], np.ascontiguousarray(emb[:, :tokens]))
            _save(where["mask"], np.ascontiguousarray(mask[:, :tokens]))
            progress.encoded += len(chunk)
            progress.written += fspaths.getsize(where["emb"]) + fspaths.getsize(where["mask"])
        if mine and not fspaths.exists(where["key"]):  # also for shards of older caches
            _save(where["key"], np.array([caption_key(c) for c in chunk], np.uint32))
        shards.append({**files, "start": start, "count": len(chunk), "crc32": crc})
        start += len(chunk)
        progress.done += len(chunk) if mine else 0
        if log_every and (k + 1) % log_every == 0:
            progress.log(k + 1)
    if sizes is not None and start != sum(sizes):
        raise ValueError(f"shard_sizes add up to {sum(sizes)} examples but there are {start} "
                         "captions; the cache's shards must cover the dataset exactly")
    counts = {"encoded": progress.encoded, "seconds": round(progress.seconds(), 3)}
    if process_count > 1:  # each process's count, for process 0's totals
        fspaths.write_text(fspaths.join(out_dir, f"build_{process_index:05d}.json"),
                           json.dumps(counts))
        (barrier or _barrier)("jaxt2i_text_cache_shards")
    index_path = fspaths.join(out_dir, INDEX_FILE)
    if process_index == 0:
        seconds = progress.seconds()  # until every process has written its shards
        per_process = [counts] + [json.loads(fspaths.read_text(fspaths.join(
            out_dir, f"build_{p:05d}.json"))) for p in range(1, process_count)]
        encoded = sum(p_["encoded"] for p_ in per_process)
        for s_ in shards:  # every shard's token count, whichever process wrote it
            s_["tokens"] = int(_load(fspaths.join(out_dir, s_["mask"])).shape[1])
        size = sum(fspaths.getsize(fspaths.join(out_dir, s_[kind])) for s_ in shards
                   for kind in ("emb", "mask", "key"))
        index = {"num_examples": start, "max_length": length, "d_model": dim,
                 "dtype": "bfloat16", "storage": "uint16 bits of bfloat16, .npy",
                 "shard_size": shard_size if sizes is None else None,
                 "aligned_shards": sizes is not None, "bytes": size,
                 "build": {"processes": process_count, "seconds": round(seconds, 3),
                           "captions_encoded": encoded,
                           "captions_per_s": round(encoded / max(seconds, 1e-9), 1),
                           "per_process": per_process},
                 "shards": shards}
        fspaths.write_text(index_path, json.dumps(index, indent=1))
        keep = {s_[kind] for s_ in shards for kind in ("emb", "mask", "key")}
        for fname in fspaths.listdir(out_dir):  # files of other captions or earlier builds
            if (re.fullmatch(r"(emb|mask|key)_\d{5}_[0-9a-f]{8}\.npy", fname) and fname not in keep
                    or re.fullmatch(r"build_\d{5}\.json", fname)):
                fspaths.remove(fspaths.join(out_dir, fname))
        if log_every:
            print(f"text cache: {start} captions, {size / 2**20:.1f} MiB in {len(shards)} shards"
                  f"; {encoded} encoded by {process_count} process(es) in {seconds:.1f} s "
                  f"({encoded / max(seconds, 1e-9):.0f} captions/s)", flush=True)
    if process_count > 1:
        (barrier or _barrier)("jaxt2i_text_cache_index")
    return json.loads(fspaths.read_text(index_path))


class TextCache:
    """Reads a cache written by `build_text_cache` (memory-mapped, random access).

    Picklable (the maps reopen lazily), so grain worker processes can hold one.
    """

    def __init__(self, path: str):
        """Args: path: the cache directory (with index.json)."""
        index_path = fspaths.join(path, INDEX_FILE)
        if not fspaths.exists(index_path):
            raise FileNotFoundError(f"no {INDEX_FILE} in {path}; build it with "
                                    f"`python -m jaxt2i.data.text_cache`")
        self.index = json.loads(fspaths.read_text(index_path))
        self.path = path
        self.max_length = int(self.index["max_length"])
        self.d_model = int(self.index["d_model"])
        self._starts = np.array([s["start"] for s in self.index["shards"]], np.int64)
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._keys: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.index["num_examples"])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"], state["_keys"] = {}, {}
        return state

    def _shard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self._maps:
            s = self.index["shards"][k]
            self._maps[k] = (_load(fspaths.join(self.path, s["emb"])),
                             _load(fspaths.join(self.path, s["mask"])))
        return self._maps[k]

    def key(self, i: int) -> int | None:
        """The CRC-32 of example i's caption when cached (None for caches without keys)."""
        k = int(np.searchsorted(self._starts, int(i), side="right")) - 1
        s = self.index["shards"][k]
        if "key" not in s:
            return None
        if k not in self._keys:
            self._keys[k] = _load(fspaths.join(self.path, s["key"]))
        return int(self._keys[k][int(i) - int(self._starts[k])])

    def check_caption(self, i: int, caption: str) -> None:
        """Raises ValueError (one line) if example i of the cache is not `caption`'s."""
        want = self.key(i)
        if want is not None and want != caption_key(caption):
            raise ValueError(f"text cache {self.path} does not match the dataset: example {i} "
                             f"is {caption[:60]!r} there, but the cache was built from another "
                             "caption; rebuild it with `python -m jaxt2i.data.text_cache` for "
                             "this dataset")

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Example i -> (bfloat16 [L, D], bool [L]), zero-padded to the full length."""
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a cache of {len(self)} captions")
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        emb_bits, mask = self._shard(k)
        j = i - int(self._starts[k])
        tokens = mask.shape[1]
        emb = np.zeros((self.max_length, self.d_model), np.uint16)
        emb[:tokens] = emb_bits[j]
        full_mask = np.zeros((self.max_length,), bool)
        full_mask[:tokens] = mask[j]
        return emb.view(ml_dtypes.bfloat16), full_mask

    def batch(self, indices: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        """Indices [B] -> (bfloat16 [B, L, D], bool [B, L])."""
        items = [self[i] for i in indices]
        return np.stack([e for e, _ in items]), np.stack([m for _, m in items])
