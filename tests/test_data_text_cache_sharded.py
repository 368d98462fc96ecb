"""The text cache's T5 sharded over a process's local devices (4 simulated CPU devices here):
the cache equals the unsharded encoder's output, and bad meshes stop with one line."""

import dataclasses
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxt2i import assets
from jaxt2i.data import shapes, text_cache
from jaxt2i.data.text_cache import sharded
from jaxt2i.text.encoder import init_encoder, load_encoder, save_encoder
from jaxt2i.text.t5 import T5Config
from jaxt2i.text.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 24  # captions: 3 shards of 8


def _captions():
    src = shapes.ShapesSource(8, N, "train", 0)
    return [src.caption_at(i) for i in range(N)]


@pytest.fixture(scope="module")
def reference():
    """The unsharded encoder on one device (TextEncoder.encode, no mesh), float32 compute from
    bfloat16 params as the cache computes, rounded to bfloat16: (values [N, L, D], mask [N, L])."""
    enc = load_encoder(assets.text_encoder_dir(), "float32", param_dtype="bfloat16")
    emb, mask = enc.encode(_captions())
    return np.asarray(emb).astype(ml_dtypes.bfloat16).astype(np.float32), np.asarray(mask)


def _read(path, want_mask):
    """The cache's embeddings at the caption's tokens [T, D] (padding is the consumer's to
    ignore) after checking its mask."""
    cache = text_cache.TextCache(str(path))
    emb, mask = cache.batch(range(len(cache)))
    np.testing.assert_array_equal(mask, want_mask)
    return emb.astype(np.float32)[mask]


def _within_one_ulp(a, b):
    """|a - b| <= one bfloat16 ulp of the larger magnitude (2^-7 relative), or <= 1e-5 for
    values that float32 noise moves across many ulps because they are close to zero."""
    big = np.maximum(np.abs(a), np.abs(b))
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(big, 1e-30))) - 7)
    return np.abs(a - b) <= np.maximum(ulp, 1e-5)


def test_sharded_params_and_cache_equal_the_unsharded_encoder(tmp_path, reference):
    want, want_mask = reference
    enc = load_encoder(assets.text_encoder_dir(), "float32", param_dtype="bfloat16")
    assert len(jax.local_devices()) == 4
    for spec in ("fsdp:4", "data:2,tensor:2"):
        index = text_cache.build_text_cache(enc, _captions(), str(tmp_path / spec), shard_size=8,
                                            batch_size=8, mesh=spec, log_every=0)
        assert index["num_examples"] == N and index["build"]["captions_encoded"] == N
        got, want_tokens = _read(tmp_path / spec, want_mask), want[want_mask]
        if spec == "fsdp:4":  # weights all-gathered, batch split: the same bits
            np.testing.assert_array_equal(got, want_tokens)
        else:  # tensor: d_ff / heads reductions split and summed in another order
            close, moved = _within_one_ulp(got, want_tokens), (got != want_tokens).mean()
            assert close.all() and moved < 1e-3, (close.mean(), moved)
    # The params really are split as the rules say (fsdp over d_model, tensor over d_ff).
    on = sharded.ShardedEncoder(enc, sharded.local_mesh("fsdp:2,tensor:2"))
    kernel = on.params["layers_0"]["mlp"]["wi_0"]["kernel"]  # [d_model 128, d_ff 256]
    assert kernel.sharding.spec == P("fsdp", "tensor")
    assert {s.data.shape for s in kernel.addressable_shards} == {(64, 128)}
    emb, _ = on.encode(_captions()[:8])
    assert emb.sharding.spec == P("fsdp", None, None)  # batch over data x fsdp


def test_cli_on_four_devices_equals_one_device(tmp_path, reference):
    """The command docs/data.md shows, in a fresh process with 4 simulated devices."""
    want, want_mask = reference
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    r = subprocess.run([sys.executable, "-m", "jaxt2i.data.text_cache",
                        f"--encoder={assets.text_encoder_dir()}", f"--out_dir={tmp_path / 'c'}",
                        f"--shapes=train:{N}", "--shard_size=8", "--batch_size=8",
                        "--log_every=1", "--mesh=fsdp:4"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    progress = [ln for ln in lines if "of this process's captions done" in ln]
    assert len(progress) == 3 and all("captions/s" in ln and "ETA" in ln for ln in progress)
    assert "8/24" in progress[0] and "ETA 0:00:00" in progress[-1]
    assert lines[-1].startswith(f"wrote {N} captions to ") and "MiB in 3 shards" in lines[-1]
    assert "captions/s" in lines[-1] and "'fsdp': 4" in lines[-1]
    got = _read(tmp_path / "c", want_mask)
    np.testing.assert_array_equal(got, want[want_mask])  # bits equal


def test_bad_meshes_name_the_value_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"--mesh=fsdp:3 does not fit this process's 4 local "
                                         r"devices.*e\.g\. --mesh=fsdp:4"):
        sharded.local_mesh("fsdp:3")
    with pytest.raises(ValueError, match="AXIS:SIZE"):
        sharded.local_mesh("model:4")
    # A T5 whose 6 heads the tensor axis (4) does not divide.
    config = T5Config(vocab_size=256, d_model=48, d_kv=8, d_ff=64, num_layers=1, num_heads=6)
    with pytest.raises(ValueError, match=r"num_heads \(6\) is not divisible by tensor=4.*"
                                         r"tensor size in \[1, 2\]"):
        sharded.encoder_shardings(config, sharded.local_mesh("tensor:4"))
    with pytest.raises(ValueError, match=r"d_model \(50\) is not divisible by fsdp=4.*"
                                         r"fsdp size in \[1, 2\]"):
        sharded.encoder_shardings(dataclasses.replace(config, d_model=50),
                                  sharded.local_mesh("fsdp:4"))
    enc = load_encoder(assets.text_encoder_dir(), "float32", param_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"batch_size \(6\) must be a multiple of the 4 .*"
                                         r"--batch_size=8"):
        text_cache.build_text_cache(enc, _captions(), str(tmp_path / "x"), batch_size=6)
    assert not (tmp_path / "x").exists()
    # The command: one line on stderr, exit 2, before any weight is read.
    out = tmp_path / "odd"
    save_encoder(init_encoder(config, load_tokenizer(assets.text_encoder_dir(), 8)), str(out))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    bad = subprocess.run([sys.executable, "-m", "jaxt2i.data.text_cache", f"--encoder={out}",
                          f"--out_dir={tmp_path / 'y'}", "--shapes=train:8", "--mesh=tensor:4"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr
    assert "--mesh=tensor:4: the T5's num_heads (6) is not divisible by tensor=4" in lines[0]
