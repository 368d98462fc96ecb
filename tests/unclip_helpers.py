"""Tiny random unCLIP cascade directories for the unCLIP tests (`test_unclip_pipeline`,
`test_unclip_variations`): a prior, a decoder and an SR stage of random params, exported as
training would, and the cascade.json that says unCLIP."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxt2i.config import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(spec, **sample):
    cfg = load_config_file(os.path.join(ROOT, "configs", spec))
    cfg.sample.update(sample)
    return cfg


def _random_params(init, seed):
    """Random params of init's shapes (no init compiled): norm scales near 1, the rest small
    (output layers too, which start at zero: every input changes the images)."""
    shapes = nn.unbox(jax.eval_shape(init, jax.random.key(0)))
    leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(tree, [
        np.float32("scale" in jax.tree_util.keystr(p)) + 0.05 * rng.standard_normal(
            a.shape).astype(np.float32) for p, a in leaves])


def _export_stage(cfg, out, seed):
    from jaxt2i.checkpoint import export_params
    from jaxt2i.stage import Stage, StageConfig

    stage = Stage(StageConfig.from_dict(cfg.to_dict()))
    export_params(_random_params(stage.init_params, seed), cfg.to_dict(), out, step=0)


def build_unclip_dir(root):
    """Writes prior/, decoder/ (16 px), sr/ (16 -> 32 px) and cascade.json under `root`."""
    from jaxt2i.models import prior as prior_lib
    from jaxt2i.prior_stage import PriorStage, export_prior

    pcfg = _config("prior.py:size=tiny", steps=4).to_dict()
    pcfg["model"].update(clip_dim=128, text_dim=128, max_text_len=32)
    prior = PriorStage.from_config(pcfg)
    params = _random_params(lambda k: prior.model.init(
        k, **prior_lib.example_inputs(prior.config, 1, 1)), 0)
    export_prior(params, pcfg, prior, str(root / "prior"), step=0)
    _export_stage(_config("unclip_decoder.py:size=tiny", steps=2, guidance=2.0),
                  str(root / "decoder"), 1)
    sr = _config("sr.py:size=tiny_sr", steps=2)
    sr.model.lowres_size, sr.model.image_size = 16, 32
    _export_stage(sr, str(root / "sr"), 2)
    with open(root / "cascade.json", "w") as f:
        json.dump({"kind": "unclip", "prior": "prior", "stages": ["decoder", "sr"]}, f)
    return root


@pytest.fixture(scope="module")
def unclip_dir(tmp_path_factory):
    """A tiny random unCLIP cascade directory (`build_unclip_dir`), once per test module."""
    return build_unclip_dir(tmp_path_factory.mktemp("unclip"))


@pytest.fixture(scope="module")
def pipe(unclip_dir):
    """The `UnCLIP` pipeline of the module's `unclip_dir`."""
    from jaxt2i.pipelines.unclip import load_unclip

    return load_unclip(str(unclip_dir))
