"""Precomputed frozen-T5 embeddings, so training need not run T5 every step.

`build_text_cache` runs an encoder over a dataset's captions once and writes bfloat16
embeddings and bool masks in shards of `.npy` files (bfloat16 stored as its uint16 bit
pattern, so files memory-map with plain numpy) plus `index.json`. Each shard keeps only
as many tokens as its longest caption needs; `TextCache` pads back to the encoder's full
length with zeros (masked out) when read. Example i of the dataset is entry i of the cache.

A rerun skips shards already written for the same captions (file names carry a checksum),
so an interrupted build resumes.

CLI (console script `jaxt2i-text-cache`):
     python -m jaxt2i.data.text_cache --encoder=DIR --out_dir=DIR --shapes=train:10000
"""

from __future__ import annotations

import json
import os
import re
import zlib
from typing import Any, Iterable, Iterator

import ml_dtypes
import numpy as np

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


def _chunks(it: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk = []
    for c in it:
        chunk.append(c)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


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
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)  # a shard is either complete or absent


def build_text_cache(encoder, captions: Any, out_dir: str, *, shard_size: int = 4096,
                     batch_size: int = 64, log_every: int = 10) -> dict:
    """Encodes every caption once and writes the cache.

    Args:
      encoder: object with `encode(list[str]) -> (emb [B, L, D], mask [B, L])`,
        `max_length` (L) and `config.d_model` (D).
      captions: list of str, an iterable of str, or a random-access source whose records
        have a 'caption' (str or UTF-8 bytes), e.g. `ShapesSource` or a TFDS data source.
      out_dir: directory for the shards and index.json (created).
      shard_size: examples per shard file.
      batch_size: captions per `encode` call.
      log_every: print progress every this many shards (0: never).

    Returns:
      The index dict also written to `out_dir/index.json`.
    """
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size ({shard_size}) and batch_size ({batch_size}) must be "
                         f">= 1")
    os.makedirs(out_dir, exist_ok=True)
    stream, total = _caption_stream(captions)
    length, dim = int(encoder.max_length), int(encoder.config.d_model)
    shards, start = [], 0
    for k, chunk in enumerate(_chunks(stream, shard_size)):
        crc = zlib.crc32("\n".join(chunk).encode("utf-8", "replace")) & 0xFFFFFFFF
        name = f"{k:05d}_{crc:08x}"
        emb_file, mask_file = f"emb_{name}.npy", f"mask_{name}.npy"
        emb_path, mask_path = os.path.join(out_dir, emb_file), os.path.join(out_dir, mask_file)
        if os.path.exists(emb_path) and os.path.exists(mask_path):
            tokens = int(np.load(mask_path, mmap_mode="r").shape[1])  # written by a prior run
        else:
            emb, mask = _encode(encoder, chunk, batch_size)  # [n, L, D], [n, L]
            if emb.shape[1:] != (length, dim):
                raise ValueError(f"encoder returned embeddings {emb.shape[1:]} but declares "
                                 f"(max_length, d_model) = {(length, dim)}")
            tokens = max(1, int(mask.any(0).nonzero()[0].max(initial=0)) + 1)
            _save(emb_path, np.ascontiguousarray(emb[:, :tokens]))
            _save(mask_path, np.ascontiguousarray(mask[:, :tokens]))
        shards.append({"emb": emb_file, "mask": mask_file, "start": start,
                       "count": len(chunk), "tokens": tokens, "crc32": crc})
        start += len(chunk)
        if log_every and (k + 1) % log_every == 0:
            print(f"text cache: {start}/{total or '?'} captions", flush=True)
    index = {"num_examples": start, "max_length": length, "d_model": dim,
             "dtype": "bfloat16", "storage": "uint16 bits of bfloat16, .npy",
             "shard_size": shard_size, "shards": shards}
    with open(os.path.join(out_dir, INDEX_FILE + ".tmp"), "w") as f:
        json.dump(index, f, indent=1)
    os.replace(os.path.join(out_dir, INDEX_FILE + ".tmp"), os.path.join(out_dir, INDEX_FILE))
    keep = {s[k] for s in shards for k in ("emb", "mask")}
    for name in os.listdir(out_dir):  # shards of other captions, left by an earlier build
        if re.fullmatch(r"(emb|mask)_\d{5}_[0-9a-f]{8}\.npy", name) and name not in keep:
            os.remove(os.path.join(out_dir, name))
    return index


class TextCache:
    """Reads a cache written by `build_text_cache` (memory-mapped, random access).

    Picklable (the maps reopen lazily), so grain worker processes can hold one.
    """

    def __init__(self, path: str):
        """Args: path: the cache directory (with index.json)."""
        index_path = os.path.join(path, INDEX_FILE)
        if not os.path.exists(index_path):
            raise FileNotFoundError(f"no {INDEX_FILE} in {path}; build it with "
                                    f"`python -m jaxt2i.data.text_cache`")
        with open(index_path) as f:
            self.index = json.load(f)
        self.path = path
        self.max_length = int(self.index["max_length"])
        self.d_model = int(self.index["d_model"])
        self._starts = np.array([s["start"] for s in self.index["shards"]], np.int64)
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return int(self.index["num_examples"])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def _shard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self._maps:
            s = self.index["shards"][k]
            self._maps[k] = (np.load(os.path.join(self.path, s["emb"]), mmap_mode="r"),
                             np.load(os.path.join(self.path, s["mask"]), mmap_mode="r"))
        return self._maps[k]

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
