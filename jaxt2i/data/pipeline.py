"""Per-stage input pipeline: decode, resize, crop, shard, batch, resume.

A random-access source (a TFDS data source from `builders`, `shapes.ShapesSource`, or any
object with `len` and `[i] -> {'image', 'caption'}`) becomes host-local numpy batches:

  image   float32 [B, R, R, 3] in [-1, 1]   (shorter side resized to R, centre/random crop)
  lowres  float32 [B, r, r, 3] in [-1, 1]   (SR stages: the same crop downsampled to r)
  caption str [B]                           (host side, for logging and on-the-fly T5)
  text_emb bfloat16 [B, L, D], text_mask bool [B, L]   (when a text cache is given)
  ids int32 [B, L], mask bool [B, L]                    (when a tokenizer is given)
  index   int64 [B]                         (example ids in the source)

Iteration runs on grain: each process reads only its shard (every process_count-th
example), the order is a seeded per-epoch shuffle, per-example randomness is seeded by the
element's position, so the iterator's position is a small JSON state and a restored
iterator yields exactly the batches the uninterrupted one would. Tokenization, like decoding,
runs in the grain worker processes when there are any, off the training loop's thread.
`to_global_array` turns each process's batch into one sharded `jax.Array` over the mesh's
data axes.
"""

from __future__ import annotations

import io
import logging
from typing import Any, Sequence

import grain
from absl import flags
import jax
import numpy as np
from PIL import Image

from jaxt2i.data import shapes
from jaxt2i.data.text_cache import TextCache
from jaxt2i.images import to_float

RESAMPLE = Image.BICUBIC  # Pillow's resize widens the kernel when shrinking: anti-aliased


def decode_image(value: Any, min_side: int | None = None) -> np.ndarray:
    """Encoded bytes or an array -> uint8 RGB [H, W, 3].

    Args:
      value: PNG/JPEG/... bytes, or a uint8 array [H, W], [H, W, 1|3|4].
      min_side: if given, JPEGs are decoded at the smallest DCT scale whose shorter side is
        still >= min_side (much faster for large photos).

    Returns:
      uint8 [H, W, 3].
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        img = Image.open(io.BytesIO(bytes(value)))
        if min_side and img.format == "JPEG":
            w, h = img.size
            f = min_side / min(w, h)
            img.draft("RGB", (max(1, int(w * f + 0.5)), max(1, int(h * f + 0.5))))
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.asarray(img)
    a = np.asarray(value)
    if a.dtype != np.uint8:
        raise ValueError(f"image array dtype {a.dtype} must be uint8; store 8-bit images")
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, -1)
    return a[..., :3]


def resize_crop(img: np.ndarray, resolution: int,
                rng: np.random.Generator | None = None) -> np.ndarray:
    """Resizes the shorter side to `resolution` and crops a square.

    Args:
      img: uint8 [H, W, 3].
      resolution: output side R.
      rng: None for a centre crop, else the generator of a random crop offset.

    Returns:
      uint8 [R, R, 3].
    """
    h, w = img.shape[:2]
    if (h, w) != (resolution, resolution):
        f = resolution / min(h, w)
        size = (max(resolution, round(w * f)), max(resolution, round(h * f)))  # (W, H)
        if size != (w, h):
            img = np.asarray(Image.fromarray(img).resize(size, RESAMPLE))
        h, w = img.shape[:2]
    if rng is None:
        top, left = (h - resolution) // 2, (w - resolution) // 2
    else:
        top, left = int(rng.integers(h - resolution + 1)), int(rng.integers(w - resolution + 1))
    return img[top:top + resolution, left:left + resolution]


def downsample(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 [R, R, 3] -> uint8 [size, size, 3], anti-aliased (the SR stage's input)."""
    return np.asarray(Image.fromarray(img).resize((size, size), RESAMPLE))


def _text(value: Any) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


class _Indexed:
    """Wraps a source so each record travels with its index (for ids and the text cache)."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        return int(i), self.source[int(i)]


class _Preprocess(grain.transforms.RandomMap):
    """(index, record) -> one example dict, or None if the record cannot be decoded."""

    def __init__(self, resolution, lowres, random_crop, text_cache, random_caption):
        self.resolution, self.lowres, self.random_crop = resolution, lowres, random_crop
        self.text_cache, self.random_caption = text_cache, random_caption

    def random_map(self, element, rng: np.random.Generator):
        index, rec = element
        try:
            img = decode_image(rec["image"], self.resolution)
        except Exception as e:  # pylint: disable=broad-except  # a bad record must not stop training
            logging.warning("skipping example %d (%s): %s", index,
                            _text(rec.get("path", "?")), e)
            return None
        img = resize_crop(img, self.resolution, rng if self.random_crop else None)
        caption = _text(rec.get("caption", ""))
        if self.random_caption and rec.get("captions"):
            options = _text(rec["captions"]).split("\n")
            caption = options[int(rng.integers(len(options)))]
        out = {"image": to_float(img), "caption": caption, "index": np.int64(index)}
        if self.lowres:
            out["lowres"] = to_float(downsample(img, self.lowres))
        if self.text_cache is not None:
            self.text_cache.check_caption(index, caption)  # the cache is this dataset's
            out["text_emb"], out["text_mask"] = self.text_cache[index]
        return out


class _Tokenize(grain.transforms.Map):
    """Adds 'ids' and 'mask' to a batch: its captions through the text tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def map(self, element):
        element["ids"], element["mask"] = self.tokenizer([_text(c) for c in element["caption"]])
        return element


class Pipeline:
    """An iterator of host-local batches whose position is a JSON-serialisable state."""

    def __init__(self, dataset: grain.IterDataset, local_batch_size: int, num_examples: int):
        self._dataset = dataset
        self._iter = iter(dataset)
        self.local_batch_size = local_batch_size
        self.num_examples = num_examples  # examples in this process's shard (one epoch)

    def __iter__(self) -> "Pipeline":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def get_state(self) -> dict:
        """The iterator position (a small JSON-serialisable dict) for a checkpoint."""
        return self._iter.get_state()

    def set_state(self, state: dict) -> None:
        """Moves to a position from `get_state`; the next batch is the one that followed."""
        self._iter.set_state(state)

    def close(self) -> None:
        """Stops worker processes and threads (also done at exit)."""
        if hasattr(self._iter, "close"):
            self._iter.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_source(spec: Any, *, resolution: int, split: str = "train", dataset: str = "",
                num_examples: int = 100_000, seed: int = 0):
    """A random-access source from config-style fields.

    Args:
      spec: a source object (returned as is); 'shapes' (the on-the-fly shapes world at
        `resolution`), also 'shapes:SIZE[:SEED]'; or a TFDS data dir (with `dataset`) or a
        built dataset's own directory.
      resolution: image side for the shapes world.
      split: split name ('train', 'test', 'held_out' for shapes).
      dataset: dataset under a data dir, e.g. 'image_text/mydata' or
        'shapes_world/r64_n10000_s0' (the newest version is used).
      num_examples, seed: size and seed of the shapes world.

    Returns:
      An object with `len` and `[i] -> dict`.
    """
    if not isinstance(spec, str):
        return spec
    if spec == "shapes" or spec.startswith("shapes:"):
        parts = spec.split(":")[1:]
        if len(parts) > 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"source {spec!r} must be 'shapes', 'shapes:SIZE' or "
                             f"'shapes:SIZE:SEED'")
        size = int(parts[0]) if parts else num_examples
        return shapes.ShapesSource(resolution, size, split, int(parts[1]) if len(parts) > 1
                                   else seed)
    from jaxt2i import paths  # pylint: disable=import-outside-toplevel

    if not paths.isdir(spec):
        raise FileNotFoundError(f"source {spec!r} is neither 'shapes' nor a data directory; "
                                f"build one with `python -m jaxt2i.data.builders`")
    from jaxt2i.data.builders import load_source  # pylint: disable=import-outside-toplevel
    return load_source(paths.join(spec, dataset) if dataset else spec, split)


def allow_grain_workers() -> None:
    """Lets `make_pipeline(worker_count > 0)` run where absl flags were never parsed (a
    notebook, a test, a script without `absl.app.run`); the commands need not call it.

    grain (0.2) reads its own absl flags (`FLAGS.grain_enable_multiprocess_worker_profiling`
    and others) when it starts worker processes, and absl refuses reads of unparsed flags. So
    the global `absl.flags.FLAGS` must be parsed; this marks it parsed (every flag keeps its
    default). That changes process-wide state, so the library never does it by itself (it
    used to, silently, inside `make_pipeline`): `make_pipeline` raises instead, naming this
    function, and the caller decides.
    """
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_pipeline(source: Any, *, resolution: int, batch_size: int, seed: int = 0,
                  lowres: int | None = None, shuffle: bool = True, random_crop: bool = False,
                  num_epochs: int | None = None, process_index: int | None = None,
                  process_count: int | None = None, text_cache: str | TextCache | None = None,
                  random_caption: bool = False, tokenizer: Any = None, worker_count: int = 0,
                  num_threads: int = 4, split: str = "train") -> Pipeline:
    """Builds the batch iterator of one cascade stage on this process.

    Args:
      source: random-access source or spec (see `open_source`).
      resolution: stage resolution R.
      batch_size: global batch size (all processes together).
      seed: shuffle / crop seed.
      lowres: low-resolution side r of an SR stage (adds 'lowres'); None for the base.
      shuffle: reshuffle every epoch (else source order).
      random_crop: random instead of centre crops.
      num_epochs: None repeats forever.
      process_index, process_count: this host's shard; default `jax.process_index()` /
        `jax.process_count()`.
      text_cache: a `TextCache` or its directory: adds 'text_emb' and 'text_mask'.
      random_caption: pick one of a record's 'captions' lines at random (COCO-style data;
        not with a text cache, which holds the first caption only).
      tokenizer: a picklable callable, list of captions -> (ids [B, L] int32, mask [B, L]
        bool), e.g. `jaxt2i.text.Tokenizer`: adds 'ids' and 'mask' to each batch (in the
        worker processes when worker_count > 0). Not with a text cache.
      worker_count: grain worker processes (0: threads in this process only). Each
        worker reads every worker_count-th batch, so the batch order depends on it: keep
        it fixed across a run's restarts.
      num_threads: decode threads per process (or per worker).
      split: split for string specs.

    Returns:
      A `Pipeline` of host-local batches with batch_size / process_count examples.
    """
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if batch_size % pc:
        raise ValueError(f"global batch size ({batch_size}) must be divisible by the number "
                         f"of processes ({pc})")
    if not 0 <= pi < pc:
        raise ValueError(f"process_index ({pi}) must be in [0, process_count={pc})")
    if lowres is not None and not 0 < lowres <= resolution:
        raise ValueError(f"lowres ({lowres}) must be in (0, resolution={resolution}]")
    source = open_source(source, resolution=resolution, split=split)
    if text_cache is not None and tokenizer is not None:
        raise ValueError("a text cache already gives the text embeddings; pass "
                         "tokenizer=None with text_cache")
    if isinstance(text_cache, str):
        text_cache = TextCache(text_cache)
    if text_cache is not None:
        if len(text_cache) != len(source):
            raise ValueError(f"text cache has {len(text_cache)} captions but the source has "
                             f"{len(source)} examples; rebuild the cache for this source")
        if random_caption:
            raise ValueError("random_caption=True cannot use a text cache (it holds the first "
                             "caption only); pass random_caption=False")
        n = len(source)  # a few examples now, every example as it is read
        for i in sorted({0, 1, n // 2, n - 1} & set(range(n))):
            text_cache.check_caption(i, _text(source[i].get("caption", "")))
    local_batch = batch_size // pc
    # Equal shards (dropping at most pc - 1 examples) keep processes in step to the end.
    per_process = len(source) // pc
    if per_process < local_batch:
        raise ValueError(f"each of {pc} processes gets {per_process} examples, fewer than its "
                         f"batch of {local_batch}; use a smaller batch or more data")
    ds = grain.MapDataset.source(_Indexed(source))[pi:per_process * pc:pc]
    ds = ds.seed(seed)
    if shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(num_epochs)
    ds = ds.random_map(_Preprocess(resolution, lowres, random_crop, text_cache, random_caption))
    opts = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * local_batch)
    it = ds.to_iter_dataset(opts).batch(local_batch, drop_remainder=True)
    if tokenizer is not None:  # one call per batch (the tokenizer batches in Rust)
        it = it.map(_Tokenize(tokenizer))
    if worker_count > 0:
        if not flags.FLAGS.is_parsed():
            raise ValueError(
                f"worker_count={worker_count} starts grain worker processes, and grain reads "
                "its absl flags then, which this process has not parsed (it is not running "
                "under absl.app.run); call jaxt2i.data.pipeline.allow_grain_workers() once "
                "first, or pass worker_count=0")
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return Pipeline(it, local_batch, per_process)


def to_global_array(local_batch: dict, mesh: jax.sharding.Mesh,
                    batch_axes: Sequence[str] = ("data", "fsdp"),
                    host_keys: Sequence[str] = ("caption", "index")) -> dict:
    """Host-local numpy batch -> global `jax.Array`s sharded along the batch dimension.

    Args:
      local_batch: this process's batch (leading dimension = global batch / processes).
      mesh: the device mesh.
      batch_axes: mesh axes the batch is split over (those missing from the mesh are
        ignored).
      host_keys: entries left as host-local numpy (strings always are; 'index' stays
        int64 there, as jax without x64 would make it int32).

    Returns:
      The same dict with every other array replaced by a global array of the full batch.
    """
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    spec = jax.sharding.PartitionSpec(axes if axes else None)
    sharding = jax.sharding.NamedSharding(mesh, spec)
    out = {}
    for k, v in local_batch.items():
        v = np.asarray(v)
        if k in host_keys or v.dtype.kind in "USO":
            out[k] = v
            continue
        global_b = v.shape[0] * jax.process_count()
        if global_b % ways:
            raise ValueError(f"global batch size ({global_b}) must be divisible by the "
                             f"{'x'.join(axes)} mesh axes ({ways} devices)")
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out
