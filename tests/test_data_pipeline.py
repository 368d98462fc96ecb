"""Tests of the per-stage pipeline: preprocessing, resume, host sharding, global arrays."""

import io
import json
import subprocess
import sys
import textwrap
import types
import zlib

import jax
import numpy as np
import pytest
from PIL import Image

from jaxt2i.data import pipeline, shapes, text_cache


def _shapes(n=64, res=32):
    return shapes.ShapesSource(res, n, "train", seed=0)


def _same(a, b):
    return all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a) and a.keys() == b.keys()


def test_batches_have_the_stage_layout():
    p = pipeline.make_pipeline(_shapes(res=64), resolution=64, lowres=16, batch_size=4, seed=0,
                               process_index=0, process_count=1)
    b = next(p)
    assert b["image"].shape == (4, 64, 64, 3) and b["image"].dtype == np.float32
    assert b["lowres"].shape == (4, 16, 16, 3) and b["lowres"].dtype == np.float32
    assert b["image"].min() >= -1 and b["image"].max() <= 1 and b["image"].min() == -1
    assert b["index"].dtype == np.int64 and len(b["caption"]) == 4
    src = _shapes(res=64)
    i = int(b["index"][0])
    assert b["caption"][0] == src[i]["caption"]
    np.testing.assert_allclose((b["image"][0] + 1) * 127.5, src[i]["image"], atol=1e-3)
    want_low = pipeline.downsample(src[i]["image"], 16)
    np.testing.assert_allclose((b["lowres"][0] + 1) * 127.5, want_low, atol=1e-3)


def test_resize_and_crop():
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 40:] = 255
    out = pipeline.resize_crop(img, 20)
    assert out.shape == (20, 20, 3)
    assert out[:, 0].max() < 128 and out[:, -1].min() > 127  # centre crop keeps the edge mid
    crops = {pipeline.resize_crop(img, 20, np.random.default_rng(s))[0, :, 0].tobytes()
             for s in range(10)}
    assert len(crops) > 1
    small = pipeline.resize_crop(np.full((8, 12, 3), 7, np.uint8), 32)  # upsampled
    assert small.shape == (32, 32, 3) and (small == 7).all()


def test_restored_iterator_yields_identical_batches():
    kw = dict(resolution=32, batch_size=8, seed=5, random_crop=True, process_index=0,
              process_count=1)
    p = pipeline.make_pipeline(_shapes(40), **kw)
    for _ in range(3):  # 24 examples: the restore point is inside the first epoch
        next(p)
    state = json.loads(json.dumps(p.get_state()))
    want = [next(p) for _ in range(6)]  # crosses into the (reshuffled) second epoch
    q = pipeline.make_pipeline(_shapes(40), **kw)
    q.set_state(state)
    got = [next(q) for _ in range(6)]
    assert all(_same(a, b) for a, b in zip(want, got))


def test_epochs_are_reshuffled_and_finite():
    p = pipeline.make_pipeline(_shapes(16), resolution=32, batch_size=4, seed=0, num_epochs=2,
                               process_index=0, process_count=1)
    idx = [b["index"] for b in p]
    assert len(idx) == 8
    e1, e2 = np.concatenate(idx[:4]), np.concatenate(idx[4:])
    assert sorted(e1) == sorted(e2) == list(range(16)) and not np.array_equal(e1, e2)


def test_two_processes_read_disjoint_covering_shards():
    seen = []
    for pi in range(2):
        p = pipeline.make_pipeline(_shapes(20), resolution=32, batch_size=4, seed=0,
                                   num_epochs=1, process_index=pi, process_count=2)
        assert p.local_batch_size == 2
        seen.append(np.concatenate([b["index"] for b in p]).tolist())
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(20))
    with pytest.raises(ValueError, match=r"global batch size \(6\).*processes \(4\)"):
        pipeline.make_pipeline(_shapes(20), resolution=32, batch_size=6, process_index=0,
                               process_count=4)


def test_bad_records_are_skipped_at_run_time():
    good = io.BytesIO()
    Image.fromarray(np.full((10, 10), 200, np.uint8)).save(good, "PNG")  # grayscale PNG
    source = [{"image": good.getvalue(), "caption": b"fine"},
              {"image": b"\x89PNG broken", "caption": b"broken", "path": b"x.png"},
              {"image": np.zeros((12, 12, 4), np.uint8), "caption": "rgba array"},
              {"image": good.getvalue(), "caption": "caf\xe9".encode()}]
    p = pipeline.make_pipeline(source, resolution=8, batch_size=3, shuffle=False, num_epochs=1,
                               process_index=0, process_count=1)
    b = next(p)
    assert b["index"].tolist() == [0, 2, 3] and b["caption"][2] == "café"


def test_text_cache_in_the_pipeline(tmp_path):
    src = _shapes(12)
    enc = types.SimpleNamespace(max_length=6, config=types.SimpleNamespace(d_model=4))

    def encode(prompts):
        emb = np.array([[[zlib.crc32(p.encode()) % 97 + j] * 4 for j in range(6)]
                        for p in prompts], np.float32)
        return emb, np.ones((len(prompts), 6), bool)

    enc.encode = encode
    text_cache.build_text_cache(enc, src, str(tmp_path), shard_size=5)
    p = pipeline.make_pipeline(src, resolution=32, batch_size=4, text_cache=str(tmp_path),
                               process_index=0, process_count=1)
    b = next(p)
    assert b["text_emb"].shape == (4, 6, 4) and b["text_mask"].shape == (4, 6)
    want, _ = encode(list(b["caption"]))
    np.testing.assert_allclose(b["text_emb"].astype(np.float32), want, rtol=1e-2)
    with pytest.raises(ValueError, match="text cache has 12"):
        pipeline.make_pipeline(_shapes(13), resolution=32, batch_size=4,
                               text_cache=str(tmp_path), process_index=0, process_count=1)
    # The same number of examples with other captions: refused by example key, in one line.
    other = shapes.ShapesSource(32, 12, "train", seed=5)
    with pytest.raises(ValueError, match=r"does not match the dataset: example 0 is 'a") as e:
        pipeline.make_pipeline(other, resolution=32, batch_size=4, text_cache=str(tmp_path),
                               process_index=0, process_count=1)
    assert "\n" not in str(e.value)
    # A caption changed after the build, found when its example is read.
    cache = text_cache.TextCache(str(tmp_path))
    cache.check_caption(7, src.caption_at(7))
    with pytest.raises(ValueError, match="example 7 is 'a blue"):
        cache.check_caption(7, "a blue moon")


def test_to_global_array_shards_the_batch():
    devices = np.array(jax.devices()[:4]).reshape(2, 2, 1)
    mesh = jax.sharding.Mesh(devices, ("data", "fsdp", "tensor"))
    p = pipeline.make_pipeline(_shapes(), resolution=32, lowres=8, batch_size=8,
                               process_index=0, process_count=1)
    local = next(p)
    g = pipeline.to_global_array(local, mesh)
    assert isinstance(g["image"], jax.Array) and g["image"].shape == (8, 32, 32, 3)
    assert len(g["image"].addressable_shards) == 4
    assert g["image"].addressable_shards[0].data.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(np.asarray(g["lowres"]), local["lowres"])
    assert isinstance(g["caption"], np.ndarray) and g["index"].dtype == np.int64
    with pytest.raises(ValueError, match=r"global batch size \(6\).*\(4 devices\)"):
        pipeline.to_global_array({"image": np.zeros((6, 2))}, mesh)


def test_open_source_specs():
    src = pipeline.open_source("shapes:50:3", resolution=16, split="held_out")
    assert len(src) == 50 and src.seed == 3 and src.split == "held_out"
    with pytest.raises(FileNotFoundError, match="neither"):
        pipeline.open_source("/no/such/dir", resolution=16)


def _tokenizer(max_length=12):
    from jaxt2i import assets
    from jaxt2i.text import load_tokenizer

    return load_tokenizer(assets.text_encoder_dir(), max_length)


def test_the_pipeline_tokenizes_each_batch(tmp_path):
    tok = _tokenizer(max_length=6)  # short: some captions are truncated
    p = pipeline.make_pipeline(_shapes(12), resolution=16, batch_size=4, tokenizer=tok,
                               process_index=0, process_count=1)
    b = next(p)
    want_ids, want_mask = tok([str(c) for c in b["caption"]])
    assert b["ids"].dtype == np.int32 and b["mask"].dtype == bool
    np.testing.assert_array_equal(b["ids"], want_ids)
    np.testing.assert_array_equal(b["mask"], want_mask)
    assert b["mask"].all(axis=1).any()  # truncated captions fill all L positions
    with pytest.raises(ValueError, match="tokenizer=None with text_cache"):
        pipeline.make_pipeline(_shapes(12), resolution=16, batch_size=4, tokenizer=tok,
                               text_cache=str(tmp_path),
                               process_index=0, process_count=1)


def test_worker_processes_need_parsed_flags_and_do_not_parse_them():
    """grain's workers read absl flags: without them parsed, make_pipeline says what to call
    (run in a fresh process, where no earlier test has parsed them)."""
    code = textwrap.dedent("""
        from absl import flags
        from jaxt2i.data import pipeline, shapes
        src = shapes.ShapesSource(16, 8, "train", 0)
        kw = dict(resolution=16, batch_size=4, process_index=0, process_count=1, worker_count=1)
        try:
            pipeline.make_pipeline(src, **kw)
        except ValueError as e:
            print("refused:", e)
        assert not flags.FLAGS.is_parsed()
        pipeline.allow_grain_workers()
        with pipeline.make_pipeline(src, **kw) as p:
            print("batch", len(next(p)["index"]))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "refused: worker_count=1 starts grain worker processes" in r.stdout
    assert "call jaxt2i.data.pipeline.allow_grain_workers() once first" in r.stdout
    assert "batch 4" in r.stdout


def test_worker_processes_resume_exactly():
    pipeline.allow_grain_workers()
    tok = _tokenizer()
    kw = dict(resolution=16, batch_size=4, seed=2, random_crop=True, process_index=0,
              process_count=1, worker_count=2, tokenizer=tok)
    with pipeline.make_pipeline(_shapes(40, 16), **kw) as p:
        for _ in range(3):
            next(p)
        state = json.loads(json.dumps(p.get_state()))
        want = [next(p) for _ in range(3)]
    with pipeline.make_pipeline(_shapes(40, 16), **kw) as q:
        q.set_state(state)
        got = [next(q) for _ in range(3)]
    assert all(_same(a, b) for a, b in zip(want, got))
    for b in want:  # tokenized in the worker processes, as the main process would
        ids, mask = tok([str(c) for c in b["caption"]])
        np.testing.assert_array_equal(b["ids"], ids)
        np.testing.assert_array_equal(b["mask"], mask)
