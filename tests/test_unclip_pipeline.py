"""The unCLIP pipeline (`jaxt2i.pipelines.unclip`): a cascade directory whose cascade.json says
"kind": "unclip" (prior -> decoder -> SR stage), built here from tiny random models, sampled
by `python -m jaxt2i.sample` in a fresh process and through the Python API."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from unclip_helpers import pipe, unclip_dir  # noqa: F401 (fixtures)

from jaxt2i.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red circle above a blue square", "two green triangles"]


def test_docs_show_the_command():
    with open(os.path.join(ROOT, "docs", "unclip.md")) as f:
        docs = f.read()
    assert ('python -m jaxt2i.sample --checkpoint=runs/unclip --prompt "a red circle above a '
            'blue square" --num_images=2 --out=samples') in docs
    assert '{"kind": "unclip", "prior": "prior", "stages": ["decoder", "sr"]}' in docs


def test_sample_command_runs_the_unclip_cascade(unclip_dir, pipe, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    r = subprocess.run([sys.executable, "-m", "jaxt2i.sample", f"--checkpoint={unclip_dir}",
                        f"--prompt={PROMPTS[0]}", "--num_images=2", f"--out={out}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "sample.json") as f:
        record = json.load(f)
    assert record["kind"] == "unclip" and record["images"] == ["000.png", "001.png"]
    a, b = (np.asarray(Image.open(out / n)) for n in record["images"])
    assert a.shape == (32, 32, 3) and np.abs(a.astype(int) - b.astype(int)).max() > 0

    images = pipe.generate([PROMPTS[0]] * 2, seed=0)
    np.testing.assert_array_equal(images, np.stack([a, b]))  # the API makes the same images

    # --out at a URL: the same files, uploaded (fsspec's memory filesystem as the bucket)
    import fsspec

    from jaxt2i.pipelines import unclip

    unclip.sample_to_dir(str(unclip_dir), [PROMPTS[0]], "memory://unclip-test/out",
                         num_images=2, seed=0)
    fs = fsspec.filesystem("memory")
    assert json.loads(fs.cat("/unclip-test/out/sample.json"))["images"] == record["images"]
    for name, want in zip(record["images"], (a, b)):
        with fs.open(f"/unclip-test/out/{name}") as f:
            np.testing.assert_array_equal(np.asarray(Image.open(f)), want)

    r = subprocess.run([sys.executable, "-m", "jaxt2i.sample", f"--checkpoint={unclip_dir}",
                        "--prompt=x", "--steps=3", f"--out={tmp_path / 'o2'}"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "drop --steps" in r.stderr and "Traceback" not in r.stderr


def test_api_chains_prior_decoder_and_sr_with_its_keys(pipe):
    """generate = the prior's best-of-2 embedding -> the decoder -> the SR stage, each with
    its documented key; another embedding gives other images."""
    from jaxt2i.images import to_uint8

    got = pipe.generate(PROMPTS, seed=5)
    prior_key, stage_key = jax.random.split(jax.random.key(5))
    z, cands, index = pipe.prior.embed_prompts(pipe.clip, PROMPTS, prior_key,
                                               return_candidates=True)
    text = pipe.clip.encode_text(PROMPTS).embeds
    scores = np.einsum("bkd,bd->bk", np.asarray(cands), np.asarray(text))
    np.testing.assert_array_equal(np.asarray(index), scores.argmax(1))  # the higher dot kept
    emb, mask = pipe.encoder.encode(PROMPTS)
    u = pipe.encoder.encode([""])
    text, uncond = (emb.astype(np.float32), mask), (u[0].astype(np.float32), u[1])

    def run(z):
        dec, sr = pipe.stages
        x = dec.sample(dec.params, text, uncond, jax.random.fold_in(stage_key, 0),
                       settings=dec.config.sample, image_embed=z)
        return to_uint8(np.asarray(sr.sample(sr.params, text, uncond,
                                              jax.random.fold_in(stage_key, 1), x,
                                              settings=sr.config.sample)))

    np.testing.assert_array_equal(got, run(z))
    assert np.abs(run(-z).astype(int) - got.astype(int)).max() > 0


def test_mismatched_parts_are_one_line(unclip_dir, tmp_path):
    import shutil

    from jaxt2i.pipelines.unclip import load_unclip

    bad = tmp_path / "bad"
    shutil.copytree(unclip_dir, bad)
    path = bad / "decoder" / "config.json"
    meta = json.loads(path.read_text())
    meta["config"]["clip"]["path"] = "/elsewhere/clip"
    path.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="the decoder was trained on CLIP '/elsewhere/clip'"):
        load_unclip(str(bad))
    (bad / "cascade.json").write_text(json.dumps({"kind": "unclip", "prior": "prior"}))
    with pytest.raises(ConfigError, match="must hold \"prior\""):
        load_unclip(str(bad))
