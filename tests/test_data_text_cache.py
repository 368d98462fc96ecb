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
