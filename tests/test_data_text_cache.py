"""Tests of the precomputed text-embedding cache (with a fake, hash-based encoder)."""

import os
import subprocess
import sys
import types
import zlib

import ml_dtypes
import numpy as np
import pytest

from jaxt2i.data import shapes, text_cache


class FakeEncoder:
    """Deterministic stand-in for the T5 encoder: one hashed vector per word."""

    max_length, d_model = 12, 8

    def __init__(self):
        self.config = types.SimpleNamespace(d_model=self.d_model)
        self.calls = 0

    def encode(self, prompts):
        self.calls += 1
        emb = np.zeros((len(prompts), self.max_length, self.d_model), np.float32)
        mask = np.zeros((len(prompts), self.max_length), bool)
        for i, p in enumerate(prompts):
            for j, w in enumerate(p.split()[:self.max_length]):
                emb[i, j] = np.random.default_rng(zlib.crc32(w.encode())).normal(size=self.d_model)
                mask[i, j] = True
        return emb, mask


def test_round_trip_and_padding(tmp_path):
    enc = FakeEncoder()
    caps = ["a red circle", "two small green triangles on a white background", "", "ünï 猫"]
    caps = caps * 5  # 20 captions in shards of 6: the last shard is partial
    index = text_cache.build_text_cache(enc, caps, str(tmp_path), shard_size=6, batch_size=4)
    assert index["num_examples"] == 20 and len(index["shards"]) == 4
    assert max(s["tokens"] for s in index["shards"]) < enc.max_length  # trimmed on disk
    cache = text_cache.TextCache(str(tmp_path))
    assert len(cache) == 20 and cache.max_length == 12 and cache.d_model == 8
    want_emb, want_mask = enc.encode(caps)
    for i in (0, 1, 2, 3, 13, 19):
        emb, mask = cache[i]
        assert emb.dtype == ml_dtypes.bfloat16 and emb.shape == (12, 8)
        np.testing.assert_array_equal(mask, want_mask[i])
        np.testing.assert_allclose(emb.astype(np.float32), want_emb[i], rtol=1e-2, atol=1e-2)
        assert not emb[~mask].astype(np.float32).any()
    emb, mask = cache.batch([3, 0])
    assert emb.shape == (2, 12, 8) and mask.shape == (2, 12)
    with pytest.raises(IndexError):
        cache[20]
    # Files are plain numpy: memory-mappable without ml_dtypes.
    arr = np.load(os.path.join(str(tmp_path), index["shards"][0]["emb"]), mmap_mode="r")
    assert arr.dtype == np.uint16


def test_resume_skips_written_shards(tmp_path):
    src = shapes.ShapesSource(8, 30, "train", seed=0)
    enc = FakeEncoder()
    text_cache.build_text_cache(enc, src, str(tmp_path), shard_size=10, batch_size=10)
    assert enc.calls == 3
    os.remove(os.path.join(str(tmp_path), text_cache.INDEX_FILE))
    first = sorted(os.listdir(str(tmp_path)))
    os.remove(os.path.join(str(tmp_path), [f for f in first if f.startswith("emb_00001")][0]))
    enc2 = FakeEncoder()
    text_cache.build_text_cache(enc2, src, str(tmp_path), shard_size=10, batch_size=10)
    assert enc2.calls == 1  # only the missing shard is encoded again
    cache = text_cache.TextCache(str(tmp_path))
    emb, mask = cache[17]
    want_emb, want_mask = enc.encode([src.caption_at(17)])
    np.testing.assert_array_equal(mask, want_mask[0])
    # Different captions under the same directory replace the old shards.
    text_cache.build_text_cache(FakeEncoder(), ["x y"] * 5, str(tmp_path), shard_size=10)
    assert len([f for f in os.listdir(str(tmp_path)) if f.startswith("emb_")]) == 1


def test_cli_help_and_one_line_errors(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jaxt2i.data.text_cache", "--help"],
                         capture_output=True, text=True, timeout=120, check=True)
    assert "--encoder" in out.stdout and "--shapes" in out.stdout
    cases = [
        (["--encoder=/nope", f"--out_dir={tmp_path / 'x'}", "--shapes=train"], "SPLIT:SIZE"),
        # `--flag value` works as `--flag=value` did with argparse
        (["--encoder", "/nope", "--out_dir", str(tmp_path / "x"), "--shapes", "train"],
         "SPLIT:SIZE"),
        ([f"--out_dir={tmp_path / 'x'}", "--shapes=train:4"], "--encoder"),
        (["--encoder=/nope", f"--out_dir={tmp_path / 'x'}"], "shapes"),
        (["--encoder=/nope", f"--out_dir={tmp_path / 'x'}", "--shapes=train:4",
          f"--dataset_dir={tmp_path}"], "dataset_dir"),
    ]
    for args, expected in cases:
        bad = subprocess.run([sys.executable, "-m", "jaxt2i.data.text_cache", *args],
                             capture_output=True, text=True, timeout=120)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and expected in lines[0], (args, bad.stderr)
    assert not (tmp_path / "x").exists()


def _build_together(captions, out, count, **kw):
    """`count` processes (threads with a shared barrier) building one cache."""
    import threading

    barrier = threading.Barrier(count)
    encoders = [FakeEncoder() for _ in range(count)]
    results, errors = [None] * count, []

    def run(p):
        try:
            results[p] = text_cache.build_text_cache(
                encoders[p], captions, str(out), process_index=p, process_count=count,
                barrier=lambda name: barrier.wait(timeout=60), log_every=0, **kw)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(p,)) for p in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results, encoders


def test_processes_share_the_build_and_match_one_process(tmp_path):
    caps = [shapes.ShapesSource(8, 23, "train", 0).caption_at(i) for i in range(23)]
    single = text_cache.build_text_cache(FakeEncoder(), caps, str(tmp_path / "one"),
                                         shard_size=4, batch_size=4, log_every=0)
    (i0, i1), (e0, e1) = _build_together(caps, tmp_path / "two", 2, shard_size=4, batch_size=4)
    assert i0 == i1 and i0["shards"] == single["shards"] and i0["build"]["processes"] == 2
    assert (e0.calls, e1.calls) == (3, 3)  # shards 0, 2, 4 and 1, 3, 5 (one call each)
    assert i0["build"]["captions_encoded"] == 23  # both processes' counts, summed by process 0
    assert [p["encoded"] for p in i0["build"]["per_process"]] == [12, 11]
    assert not [f for f in os.listdir(tmp_path / "two") if f.startswith("build_")]
    one, two = text_cache.TextCache(str(tmp_path / "one")), text_cache.TextCache(str(tmp_path / "two"))
    for i in range(23):
        for a, b in zip(one[i], two[i]):
            np.testing.assert_array_equal(a, b)
        assert two.key(i) == zlib.crc32(caps[i].encode())
    # A killed build resumes: only the shards without files are encoded again.
    for kind in ("emb", "mask"):
        os.remove(str(tmp_path / "two" / i0["shards"][3][kind]))
    (j0, _), (f0, f1) = _build_together(caps, tmp_path / "two", 2, shard_size=4, batch_size=4)
    assert (f0.calls, f1.calls) == (0, 1) and j0["shards"] == i0["shards"]
    assert j0["build"]["captions_encoded"] == 4  # only the re-encoded shard 3


def test_shards_follow_the_datasets_files(tmp_path):
    caps = [f"caption {i}" for i in range(10)]
    index = text_cache.build_text_cache(FakeEncoder(), caps, str(tmp_path), shard_sizes=[3, 5, 2],
                                        log_every=0)
    assert [(s["start"], s["count"]) for s in index["shards"]] == [(0, 3), (3, 5), (8, 2)]
    assert index["aligned_shards"] and index["bytes"] == sum(
        os.path.getsize(os.path.join(str(tmp_path), s[k])) for s in index["shards"]
        for k in ("emb", "mask", "key"))
    for captions, sizes, message in [  # a list's length is known before anything is encoded
            (caps, [3, 5], "add up to 8 examples but there are 10"),
            (iter(caps), [3, 5], "more captions than the shard_sizes cover"),
            (iter(caps), [3, 5, 4], "add up to 12 examples but there are 10")]:
        with pytest.raises(ValueError, match=message):
            text_cache.build_text_cache(FakeEncoder(), captions, str(tmp_path / "x"),
                                        shard_sizes=sizes, log_every=0)


@pytest.mark.slow
def test_two_processes_build_a_cache_of_a_built_dataset(tmp_path):
    """The command under `launch/local_multiprocess.sh` (2 processes of 2 devices each, T5
    sharded fsdp:2 within each, gloo on 127.0.0.1) over a dataset built with 3 files: one cache
    shard per file, bit-equal to a one-process, one-device build."""
    from jaxt2i import assets
    from jaxt2i.data import builders

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable)
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, "-m", "jaxt2i.data.builders",
                        f"--data_dir={tmp_path / 'tfds'}", "--shapes=16:30:3:3",
                        "--num_shards=3"], cwd=root, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    dataset = r.stdout.strip().splitlines()[-1].removeprefix("dataset: ")
    lengths = text_cache.dataset_shard_lengths(builders.load_source(dataset))
    assert lengths is not None and len(lengths) == 3 and sum(lengths) == 30
    flags = [f"--encoder={assets.text_encoder_dir()}", f"--dataset_dir={dataset}",
             "--batch_size=4"]
    r = subprocess.run(["bash", os.path.join(root, "launch", "local_multiprocess.sh"), "2", "2",
                        "--", *flags, f"--out_dir={tmp_path / 'two'}"], cwd=root,
                       env=dict(env, MODULE="jaxt2i.data.text_cache",
                                LOG_DIR=str(tmp_path / "logs")),
                       capture_output=True, text=True, timeout=600)
    logs = [(tmp_path / "logs" / f"process_{i}.log").read_text() for i in range(2)]
    assert r.returncode == 0, r.stderr[-2000:] + logs[0][-2000:] + logs[1][-2000:]
    assert "wrote 30 captions" in logs[0] and "wrote 30 captions" not in logs[1]
    last = logs[0].strip().splitlines()[-1]
    assert "MiB in 3 shards" in last and "2 process(es) x 2 devices" in last, last
    assert "'fsdp': 2" in last and "captions/s" in last, last
    r = subprocess.run([sys.executable, "-m", "jaxt2i.data.text_cache", *flags,
                        f"--out_dir={tmp_path / 'one'}"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    one, two = text_cache.TextCache(str(tmp_path / "one")), text_cache.TextCache(str(tmp_path / "two"))
    assert [s["count"] for s in two.index["shards"]] == lengths
    assert two.index["build"]["processes"] == 2 and one.index["shards"] == two.index["shards"]
    assert two.index["build"]["captions_encoded"] == 30  # both processes' shards counted
    for i in range(30):
        for a, b in zip(one[i], two[i]):
            np.testing.assert_array_equal(a, b)


def test_training_refuses_a_cache_of_another_length_or_width(tmp_path):
    """A cache built at another max_length (or by an encoder of another width) than the stage's
    would not fit the compiled train step: training stops in one line naming both and the
    command that rebuilds it; a cache that fits is opened."""
    from jaxt2i.config import ConfigError, load_config_file
    from jaxt2i.train.loop import _pipeline

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config_file(os.path.join(root, "configs/base.py:tiny"))
    cfg.data.num_examples = 8
    text_cache.build_text_cache(FakeEncoder(), shapes.ShapesSource(8, 8), str(tmp_path))
    cfg.text.cache, cfg.text.encoder = str(tmp_path), "/models/umt5-base"
    for length, width, stage in [(16, 8, "length 16 (text.max_length) and width 8"),
                                 (12, 32, "length 12 (text.max_length) and width 32")]:
        trainer = types.SimpleNamespace(
            unet_cfg=types.SimpleNamespace(image_size=16, lowres_size=0, text_dim=width),
            encoder=types.SimpleNamespace(max_length=length))
        with pytest.raises(ConfigError) as e:
            _pipeline(trainer, cfg)
        assert str(e.value) == (
            f"data: text cache {tmp_path} holds embeddings of length 12 and width 8, but the "
            f"stage takes {stage} (model.text_dim); rebuild it with `python -m "
            f"jaxt2i.data.text_cache --encoder=/models/umt5-base --max_length={length}`")
    trainer.unet_cfg.text_dim, trainer.encoder.max_length = 8, 12
    with _pipeline(trainer, cfg) as data:
        assert next(data)["text_emb"].shape == (4, 12, 8)
