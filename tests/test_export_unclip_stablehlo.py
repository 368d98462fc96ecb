"""`python -m jaxt2i.export --format=stablehlo` of an unCLIP cascade: the prior's whole sampler,
the CLIP towers and the image-embedding decoder as `jax.export` artifacts, run by their
consumer (`jax.export.deserialize(...).call`, in a fresh process) and compared with the Flax
prior, CLIP and pipeline.

The cascade is the tiny random one of `unclip_helpers` (prior, 16 px decoder, 16 -> 32 px SR)
on the bundled demo CLIP; the command is the one docs/export.md shows.
"""

import json
import os
import shlex
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxt2i.export.common import file_sha256

from doc_commands import bash_block
from unclip_helpers import ROOT, pipe, unclip_dir  # noqa: F401 (fixtures)

TOL = 1e-5  # float32 max abs error: the same XLA program on the same CPU
PROMPTS = ["a red circle above a blue square", "two small green stars", ""]
SEED = 3

# The consumer: only the serialised artifacts, their params files and the CLIP tokenizer.
CONSUMER = """
import sys, json, os, numpy as np, jax, jax.numpy as jnp
from jaxt2i.export.stablehlo import load_exported, load_params, run_exported
out, inputs, result = sys.argv[1:4]
x = dict(np.load(inputs))
rec = json.load(open(os.path.join(out, "cascade.json")))
call = lambda f, *a: load_exported(os.path.join(out, rec[f])).call(*a)
clip_params = load_params(os.path.join(out, rec["clip_params"]))
prior_params = load_params(os.path.join(out, rec["prior"], "params.safetensors"))
states, embeds = call("clip_text", clip_params, jnp.asarray(x["ids"]), jnp.asarray(x["mask"]))
vision = call("clip_vision", clip_params, jnp.asarray(x["pixels"]))
z = call("prior_sampler", prior_params, states, jnp.asarray(x["mask"]), embeds, x["key_data"])
z1 = call("prior_sampler", prior_params, states[1:2], jnp.asarray(x["mask"][1:2]), embeds[1:2],
          x["key_data"])
images = run_exported(out, [str(p) for p in x["prompts"]], seed=int(x["seed"]))
np.savez(result, states=states, embeds=embeds, vision=vision, z=z, z1=z1, images=images)
"""


def _doc_command(unclip_dir, out):
    """docs/export.md's StableHLO command for an unCLIP directory, on the test's paths."""
    (cmd,) = [c for c in bash_block("export.md", "## Exporting an unCLIP cascade")
              if "--format=stablehlo" in c]
    cmd = cmd.replace("runs/unclip", str(unclip_dir)).replace("export_unclip_hlo", str(out))
    args = shlex.split(cmd)
    assert args[:3] == ["python", "-m", "jaxt2i.export"], cmd
    return [sys.executable, *args[1:]]


@pytest.fixture(scope="module")
def hlo_export(unclip_dir, tmp_path_factory):
    """The documented command in a fresh process: (output dir, completed process)."""
    out = tmp_path_factory.mktemp("hlo") / "export_unclip_hlo"
    r = subprocess.run(_doc_command(unclip_dir, out), cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    return out, r


def test_cli_writes_the_prior_clip_and_stages_in_a_fresh_process(hlo_export, unclip_dir, pipe):
    out, r = hlo_export
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "exported the prior, the CLIP and 2 stage(s) as stablehlo" in r.stdout
    record = json.loads((out / "cascade.json").read_text())
    assert record["kind"] == "unclip" and record["format"] == "stablehlo"
    assert record["stages"] == ["stage0_decoder_16px", "stage1_sr_32px"]
    assert record["clip_text_length"] == 32 and record["clip_image_size"] == 32
    for f in ("prior/sampler.jax_exported", "prior/sampler.mlir", "prior/params.safetensors",
              "clip/text.jax_exported", "clip/vision.jax_exported", "clip/params.safetensors",
              "clip/config.json", "clip/model.safetensors", "clip/tokenizer.json",
              "text_encoder/encode.jax_exported", "stage0_decoder_16px/sampler.jax_exported",
              "stage1_sr_32px/sampler.jax_exported"):
        assert (out / f).is_file(), f
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "stablehlo"
    assert [s["stage"] for s in m["sources"]] == ["prior", "base", "sr"]
    assert m["sources"][0]["path"] == os.path.abspath(unclip_dir / "prior")
    assert [s["steps"] for s in m["settings"]] == [2, 2]  # the stages' saved settings
    on_disk = {os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs}
    assert {f["path"] for f in m["files"]} == on_disk - {"manifest.json"}
    for f in m["files"]:
        assert file_sha256(out / f["path"]) == f["sha256"]

    cfg = json.loads((out / "prior" / "config.json").read_text())
    assert cfg["settings"] == {"sampler": "ddim", "steps": 4, "guidance": 1.0,
                               "num_candidates": 2} == vars(pipe.prior.settings)
    assert cfg["prior"]["clip_dim"] == 128 and cfg["schedule"] == "cosine"
    assert cfg["platforms"] == ["cpu", "cuda", "tpu"] and len(cfg["inputs"]) == 5
    exp = jax.export.deserialize(bytearray((out / "prior" / "sampler.jax_exported").read_bytes()))
    assert set(exp.platforms) == {"cpu", "cuda", "tpu"}
    assert [str(a.shape) for a in exp.in_avals[-4:]] == ["(B, 32, 128)", "(B, 32)", "(B, 128)",
                                                         "(2,)"]
    assert str(exp.out_avals[0].shape) == "(B, 128)"
    dec = jax.export.deserialize(bytearray(
        (out / "stage0_decoder_16px" / "sampler.jax_exported").read_bytes()))
    assert [str(a.shape) for a in dec.in_avals[-5:]] == [  # key, image_embed, the edit inputs
        "(2,)", "(B, 128)", "(B, 16, 16, 3)", "(B, 16, 16, 1)", "()"]
    dcfg = json.loads((out / "stage0_decoder_16px" / "config.json").read_text())
    assert dcfg["inputs"][6].startswith("image_embed [B, 128]")


def test_consumer_matches_the_flax_prior_clip_and_pipeline(hlo_export, pipe, tmp_path):
    from jaxt2i.prior_stage import load_frozen_clip

    out, r = hlo_export
    assert r.returncode == 0, r.stderr[-3000:]
    clip = load_frozen_clip("bundled")
    ids, mask = clip.tokenize(PROMPTS)
    size = clip.config.vision.image_size
    pixels = np.random.default_rng(4).standard_normal((2, size, size, 3)).astype(np.float32)
    prior_key = jax.random.split(jax.random.key(SEED))[0]
    np.savez(tmp_path / "in.npz", ids=ids.astype(np.int32), mask=mask.astype(bool),
             pixels=pixels, key_data=np.asarray(jax.random.key_data(prior_key)),
             prompts=np.array(PROMPTS), seed=SEED)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    c = subprocess.run([sys.executable, "-c", CONSUMER, str(out), str(tmp_path / "in.npz"),
                        str(tmp_path / "got.npz")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert c.returncode == 0, c.stderr[-3000:]
    got = np.load(tmp_path / "got.npz")

    # CLIP: the text tower's states (where the mask is set) and embeddings, the vision tower
    states, _, embeds = (np.asarray(a) for a in clip.encode_text_ids(ids, mask))
    assert np.abs(embeds).max() > 0.1
    m = mask[..., None]
    np.testing.assert_allclose(got["states"] * m, states * m, atol=TOL, rtol=0)
    np.testing.assert_allclose(got["embeds"], embeds, atol=TOL, rtol=0)
    want = np.asarray(clip.encode_image(pixels, preprocess=False).embeds)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got["vision"], want, atol=TOL, rtol=0)

    # the prior's whole sampler (2 candidates, the better kept) on the exported CLIP's features
    want = np.asarray(pipe.prior.generate(states, mask, embeds, prior_key))
    np.testing.assert_allclose(got["z"], want, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got["z"], axis=-1), 1.0, atol=1e-5)
    assert np.abs(got["z"][0] - got["z"][1]).max() > 0.05  # the caption matters
    want1 = np.asarray(pipe.prior.generate(states[1:2], mask[1:2], embeds[1:2], prior_key))
    np.testing.assert_allclose(got["z1"], want1, atol=TOL, rtol=0)  # another batch size

    # prompts -> CLIP -> prior -> decoder -> SR, all from the export: UnCLIP.generate's images
    # (the exported samplers take the edit inputs; with the plain ones, the decoder's floats
    # differ from plain sampling by float32 rounding, ~1e-6, so a pixel may move one level)
    want = pipe.generate(PROMPTS, seed=SEED)
    assert got["images"].shape == want.shape == (3, 32, 32, 3)
    diff = np.abs(got["images"].astype(int) - want)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
    assert want.std() > 5  # not a flat image
