"""The `data` phase of `python -m jaxt2i.bench`: how fast image-text data reaches training.

It makes img2dataset-style webdataset shards from the shapes world (`write_shapes_shards`:
256 px JPEGs, img2dataset's default size, with `.txt` and `.json` members), then measures,
each job in a fresh child process pinned to one CPU core, rates per CPU-second of that process
(per core, and not lowered by other processes sharing the core; wall-clock rates are in the
JSON too):

  data_prep        writes the shards; builds the TFDS array_record dataset from them with the
                   project's builder (`builders.shards_builder`, one thread): images/s
  data_cache       the T5 cache of that dataset with the bundled demo encoder
                   (`build_text_cache`, as `python -m jaxt2i.data.text_cache` does):
                   captions/s and bytes per caption
  data_read_ours   our shard reader (`shards.read_shard`) + `pipeline.decode_image` (JPEG
                   draft mode) + `pipeline.resize_crop` at each demo stage's resolution
  data_read_webdataset  the same shards with webdataset's reader:
                   `wds.WebDataset(urls).decode("rgb8").to_tuple("jpg", "txt")` + the same
                   PIL resize; and its raw bytes through our decoder (which part is faster)
  data_pipeline    the dataset through the training input pipeline (`make_pipeline`: grain,
                   the demo configs' resolution, low-res input, batch and worker count, the
                   text cache), as training reads it

The phase's table compares them and divides the pipeline's rate by the demo stages' train-step
images/s (jobs `train_demo_base` / `train_demo_sr` on the whole CPU: the larger of the
wall-clock rate and batch x cores / CPU-seconds per step, the rate of an idle machine, so a
busy one does not flatter the ratio): above 1, one core of input keeps up with training on
every core.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

SHARD_PX = 256  # img2dataset's default --image_size
# (shards, samples per shard); --tiny for the test suite
SIZES = {"full": (8, 128), "quick": (4, 64), "tiny": (2, 8)}
DEMO_STAGES = ("demo_base", "demo_sr")
JOBS = ("data_prep", "data_cache", "data_read_ours", "data_read_webdataset", "data_pipeline")
WEBDATASET_MISSING = ("webdataset is not installed: pip install 'jaxt2i[bench]' to compare "
                      "with its reader")


def pin_to_one_core() -> int:
    """Pins this process (and the threads it starts) to one CPU core; returns the core.
    Call before importing jax, whose CPU thread pool is sized by the cores it may use."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    if not hasattr(os, "sched_setaffinity"):  # macOS: threads pinned to 1 only
        return -1
    core = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return core


def _size(quick: bool, tiny: bool) -> tuple[int, int]:
    return SIZES["tiny" if tiny else "quick" if quick else "full"]


def _min_seconds(quick: bool, tiny: bool) -> float:
    """How long each rate is measured for (whole passes / batches, at least this long)."""
    return 0.2 if tiny else 1.0 if quick else 3.0


def demo_stages(tiny: bool) -> dict:
    """{stage: {resolution, lowres, batch, worker_count, spec}} of the demo configs."""
    from jaxt2i.bench.jobs import spec_of, stage_config

    out = {}
    for stage in DEMO_STAGES:
        spec = spec_of(stage, tiny)
        c = stage_config(spec)
        out[stage] = {"spec": spec, "resolution": int(c.model.image_size),
                      "lowres": int(c.model.lowres_size) or None,
                      "batch": int(c.train.batch_size), "worker_count": int(c.data.worker_count)}
    return out


def _paths(data_dir: str) -> dict:
    return {k: os.path.join(data_dir, k) for k in ("shards", "tfds", "cache")}


def write_shapes_shards(out_dir: str, num_shards: int, per_shard: int, *,
                        resolution: int = SHARD_PX, seed: int = 0) -> list[str]:
    """Writes img2dataset-style webdataset shards of shapes-world scenes into the new folder
    `out_dir` (`jaxt2i.data.shapes_shards.write_shards`, no bad members): JPEGs at quality 95
    as img2dataset encodes them; sample k of shard s has key f"{s:05d}{k:04d}" and members
    KEY.jpg, KEY.txt (the caption) and KEY.json (img2dataset's metadata, caption included).

    Returns:
      The tar paths.
    """
    from jaxt2i.data.shapes_shards import write_shards

    write_shards(out_dir, num_shards, per_shard, resolution=resolution, seed=seed)
    return [os.path.join(out_dir, f"{s:05d}.tar") for s in range(num_shards)]


def _shard_paths(data_dir: str) -> list[str]:
    from jaxt2i.data import shards

    return shards.list_shards(_paths(data_dir)["shards"], "webdataset")


def _rate(one_pass, min_seconds: float) -> dict:
    """Images per CPU-second of `one_pass()` (returns the images it handled): one warm-up
    pass, then passes until `min_seconds` of CPU time have gone by.

    CPU time of the whole process (its threads included), not wall time: on one pinned core
    that is the per-core rate, and other processes sharing the core do not lower it (on a
    busy machine the wall-clock rate, `wall_images_per_s`, can be half of it)."""
    one_pass()  # page cache, lazy imports, first-call work
    n = passes = 0
    c0, t0 = time.process_time(), time.perf_counter()
    while passes == 0 or time.process_time() - c0 < min_seconds:
        n += one_pass()
        passes += 1
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    return {"images_per_s": n / cpu, "wall_images_per_s": n / wall, "images": n,
            "cpu_s": round(cpu, 3), "wall_s": round(wall, 3), "passes": passes}


# ------------------------------------------------------------------------------- jobs
def job_prep(quick: bool, data_dir: str, tiny: bool = False) -> dict:
    """The shards, and the TFDS dataset built from them on one core."""
    core = pin_to_one_core()
    from jaxt2i.data import builders

    p = _paths(data_dir)
    for d in p.values():  # a reused --bench_data_dir is rebuilt, so the timing is a build's
        shutil.rmtree(d, ignore_errors=True)
    num_shards, per_shard = _size(quick, tiny)
    t0 = time.perf_counter()
    tars = write_shapes_shards(p["shards"], num_shards, per_shard)
    write_s = time.perf_counter() - t0
    builder = builders.shards_builder(p["tfds"], p["shards"], name="bench", num_threads=1)
    c0, t0 = time.process_time(), time.perf_counter()
    report = builders.build(builder)
    build_s, build_wall = time.process_time() - c0, time.perf_counter() - t0
    return {"core": core, "shards": num_shards, "per_shard": per_shard,
            "image_px": SHARD_PX, "samples": num_shards * per_shard,
            "shard_bytes": sum(os.path.getsize(t) for t in tars), "write_s": round(write_s, 2),
            "build_cpu_s": round(build_s, 2), "build_wall_s": round(build_wall, 2),
            "built": report.written,
            "build_images_per_s": report.written / build_s,
            "dataset_dir": builders.dataset_location(builder)}


def job_cache(quick: bool, data_dir: str, tiny: bool = False) -> dict:
    """The T5 cache of the built dataset with the bundled demo encoder (bfloat16, as the
    cache CLI loads it), after one warm-up batch compiled the encoder."""
    del quick, tiny
    core = pin_to_one_core()
    from jaxt2i import assets
    from jaxt2i.data.builders import load_source
    from jaxt2i.data.text_cache import build_text_cache, dataset_shard_lengths
    from jaxt2i.text.encoder import load_encoder

    p = _paths(data_dir)
    shutil.rmtree(p["cache"], ignore_errors=True)
    source = load_source(p["tfds"])
    encoder = load_encoder(assets.text_encoder_dir(), "bfloat16",
                           max_length=assets.TEXT_MAX_LENGTH)
    batch = 64  # the CLI's --batch_size
    encoder.encode(["a red circle"] * batch)  # compiles the encoder's one batch shape
    c0, t0 = time.process_time(), time.perf_counter()
    index = build_text_cache(encoder, source, p["cache"], shard_sizes=dataset_shard_lengths(
        source), batch_size=batch, log_every=0)
    seconds, wall = time.process_time() - c0, time.perf_counter() - t0
    n = index["num_examples"]
    return {"core": core, "captions": n, "build_cpu_s": round(seconds, 3),
            "build_wall_s": round(wall, 3),  # (the runner's `wall_s` is the whole job's)
            "captions_per_s": n / seconds, "wall_captions_per_s": n / wall,
            "bytes": index["bytes"],
            "bytes_per_caption": index["bytes"] / n, "max_length": index["max_length"],
            "d_model": index["d_model"], "shards": len(index["shards"])}


def job_read_ours(quick: bool, data_dir: str, tiny: bool = False) -> dict:
    """Our shard reader + decode (JPEG draft) + resize, at each demo stage's resolution."""
    core = pin_to_one_core()
    from jaxt2i.data import shards
    from jaxt2i.data.inputs import decode_text
    from jaxt2i.data.pipeline import decode_image, resize_crop

    tars = _shard_paths(data_dir)

    def one_pass(res):
        n = 0
        for path in tars:
            for item in shards.read_shard(path, "webdataset"):
                if isinstance(item, shards.Sample) and item.problem is None:
                    resize_crop(decode_image(item.image, res), res)
                    decode_text(item.captions[0])
                    n += 1
        return n

    return {"core": core, **{str(r): _rate(lambda r=r: one_pass(r), _min_seconds(quick, tiny))
                             for r in _resolutions(tiny)}}


def job_read_webdataset(quick: bool, data_dir: str, tiny: bool = False) -> dict:
    """webdataset's reader and decoder (+ the same resize); and its raw bytes through our
    decoder. Without webdataset: {'missing': why} (not an error: the ratio is left out)."""
    core = pin_to_one_core()
    # webdataset imports torch only for its DataLoader classes (mocked without it): a JAX
    # user's webdataset, and 6 s less start-up where torch is installed
    sys.modules.setdefault("torch", None)
    try:
        import webdataset as wds
    except ImportError:
        return {"core": core, "missing": WEBDATASET_MISSING}
    from jaxt2i.data.pipeline import decode_image, resize_crop

    tars = _shard_paths(data_dir)

    def wds_pass(res):
        n = 0
        ds = wds.WebDataset(tars, shardshuffle=False).decode("rgb8").to_tuple("jpg", "txt")
        for img, _ in ds:
            resize_crop(img, res)
            n += 1
        return n

    def raw_pass(res):  # webdataset's tar reading, our decode
        n = 0
        for data, txt in wds.WebDataset(tars, shardshuffle=False).to_tuple("jpg", "txt"):
            resize_crop(decode_image(data, res), res)
            txt.decode("utf-8")
            n += 1
        return n

    secs = _min_seconds(quick, tiny)
    out = {"core": core, "version": getattr(wds, "__version__", None)}
    for r in _resolutions(tiny):
        out[str(r)] = _rate(lambda r=r: wds_pass(r), secs)
        out[f"{r}_raw_ours_decode"] = _rate(lambda r=r: raw_pass(r), secs)
    return out


def job_pipeline(quick: bool, data_dir: str, tiny: bool = False) -> dict:
    """The built dataset through `make_pipeline` as each demo stage's training reads it: its
    resolution (and low-res input), batch and worker count, the text cache, one thread.
    (Grain worker processes' CPU time would not be counted; the demo configs use none.)"""
    core = pin_to_one_core()
    from jaxt2i.data import pipeline

    pipeline.allow_grain_workers()  # a config with worker_count > 0 (this is a child process)
    p = _paths(data_dir)
    out = {"core": core}
    for stage, s in demo_stages(tiny).items():
        with pipeline.make_pipeline(
                p["tfds"], resolution=s["resolution"], batch_size=s["batch"],
                lowres=s["lowres"], text_cache=p["cache"], worker_count=s["worker_count"],
                num_threads=1, process_index=0, process_count=1) as it:

            def one_batch(it=it):
                return len(next(it)["index"])

            out[stage] = {**_rate(one_batch, _min_seconds(quick, tiny)), **s}
    return out


def _resolutions(tiny: bool) -> list[int]:
    return sorted({s["resolution"] for s in demo_stages(tiny).values()})


def run(job: str, quick: bool, opts: dict) -> dict:
    """One data job (`JOBS`) in this process."""
    data_dir = opts.get("bench_data_dir")
    if not data_dir:
        from jaxt2i.config import ConfigError

        raise ConfigError(f"--job={job} needs --bench_data_dir (the runner makes one)")
    fn = {"data_prep": job_prep, "data_cache": job_cache, "data_read_ours": job_read_ours,
          "data_read_webdataset": job_read_webdataset, "data_pipeline": job_pipeline}[job]
    return fn(quick, data_dir, opts.get("tiny", False))


# ---------------------------------------------------------------------------- reporting
def report(ours: dict, table) -> tuple[str, dict]:
    """(table text, JSON fields) of the data phase from the job results; `table` is the
    runner's table formatter."""
    get = lambda job: ours.get(job) or {}  # noqa: E731
    prep, cache, mine, theirs, pipe = (get(j) for j in JOBS)
    rec: dict = {"shards": {k: prep.get(k) for k in ("shards", "per_shard", "image_px",
                                                     "samples", "shard_bytes")},
                 "read": {}, "pipeline": {}, "train_vs_data": {}}
    wds_note = theirs.get("missing") or theirs.get("error")
    rows = []
    for res in sorted({k for k in mine if k.isdigit()}, key=int):
        a = (mine.get(res) or {}).get("images_per_s")
        b = (theirs.get(res) or {}).get("images_per_s")
        raw = (theirs.get(f"{res}_raw_ours_decode") or {}).get("images_per_s")
        ratio = a / b if a and b else None
        rec["read"][res] = {"ours": a, "webdataset": b, "webdataset_reader_our_decode": raw,
                            "ours_over_webdataset": ratio}
        rows.append([f"tar shards: read + decode + resize to {res} px", a,
                     b if b else (wds_note or "-"), ratio])
        if raw:
            rows.append([f"  webdataset's tar reader + our decode, {res} px", a, raw, a / raw])
    text = [table(f"data: images per CPU-second (a process pinned to one core), "
                  f"{prep.get('samples')} {prep.get('image_px')}-px JPEGs in "
                  f"{prep.get('shards')} img2dataset-style shards",
                  ["what", "ours", "webdataset", "ours / wds"], rows)]
    rows = []
    for stage in DEMO_STAGES:
        d, t = pipe.get(stage) or {}, get(f"train_{stage}")
        ips, train = d.get("images_per_s"), t.get("images_per_s")
        ratio = ips / train if ips and train else None
        rec["pipeline"][stage] = d
        rec["train_vs_data"][stage] = {"data_images_per_s": ips, "train_images_per_s": train,
                                       "data_over_train": ratio}
        size = (f"{d.get('resolution')} px" + (f" + {d['lowres']} px low-res"
                                                if d.get("lowres") else ""))
        rows.append([f"{stage} ({d.get('spec', '?')}): {size}, batch {d.get('batch')}, "
                     f"{d.get('worker_count')} workers", ips, train, ratio])
    text.append(table("array_record dataset -> training input pipeline (grain, text cache; "
                      "images per CPU-second, one core) vs the demo train step (images/s on "
                      "all cores: the larger of the wall-clock rate and batch x cores / "
                      "CPU-seconds per step)",
                      ["stage", "data img/s", "train img/s", "data / train"], rows))
    rec["build"] = {"images_per_s": prep.get("build_images_per_s"),
                    "cpu_s": prep.get("build_cpu_s"), "examples": prep.get("built")}
    rec["text_cache"] = {k: cache.get(k) for k in ("captions", "captions_per_s",
                                                   "bytes_per_caption", "bytes", "max_length",
                                                   "d_model")}
    text.append(table("builds (per CPU-second, one core)", ["what", "rate", "unit"], [
        ["TFDS array_record build from the shards", prep.get("build_images_per_s"),
         "images/s"],
        ["T5 text cache, bundled demo encoder (bfloat16)", cache.get("captions_per_s"),
         "captions/s"],
        [f"  its size ({cache.get('max_length')} tokens x {cache.get('d_model')}, bf16, "
         "trimmed to the longest caption)", cache.get("bytes_per_caption"), "bytes/caption"]]))
    return "\n\n".join(text), rec
