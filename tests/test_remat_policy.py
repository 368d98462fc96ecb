"""`model.remat_policy`: what the backward pass keeps of a rematerialised block (issue #25's remat
sweep). Every policy gives the gradients of no remat; each keeps what its name says (read from
jax's own account of the saved residuals); old configs load unchanged; bad names are one line;
`python -m jaxt2i.aot` takes the flag and records it."""

import collections
import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys

import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from doc_commands import ROOT, bash_block
from jaxt2i.config import ConfigError, load_config_file, validate
from jaxt2i.models import UNet, UNetConfig, get_unet_config, layers
from jaxt2i.models import prior as prior_lib
from jaxt2i.models.if_unet import IFUNet, get_if_unet_config
from jaxt2i.models.if_unet import example_inputs as if_example_inputs
from jaxt2i.models.if_unet import param_shapes as if_param_shapes
from test_models_unet import make_inputs, random_params

POLICIES = layers.REMAT_POLICY_NAMES
# One level (a residual block, self- and cross-attention, down and up): every remat'd block
# kind, compiled quickly.
SMALL = dict(image_size=8, channel_mults=(1,), num_res_blocks=(1,), attention=("self+cross",))


def _config(policy):
    """The small U-Net without remat (policy None) or with remat and `policy`."""
    return get_unet_config("tiny", **SMALL, remat=policy is not None,
                           remat_policy=policy or "full")


@pytest.fixture(scope="module")
def small():
    config = _config(None)
    return random_params(config), make_inputs(config)


def _loss(config, inputs):
    return lambda p: jnp.mean(UNet(config).apply(p, **inputs) ** 2)


def test_every_policy_gives_the_gradients_of_no_remat(small):
    params, inputs = small
    names = (None,) + POLICIES
    # One program for all of them: one compile.
    grads = jax.jit(lambda p: [jax.grad(_loss(_config(n), inputs))(p) for n in names])(params)
    for name, g in zip(names[1:], grads[1:]):
        for want, got in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(g)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=name)
        assert max(float(np.abs(x).max()) for x in jax.tree.leaves(g)) > 1e-3  # not all zero


def _residuals(config, params, inputs) -> collections.Counter:
    """What the backward pass keeps, as jax itself reports it: {primitive: count} of saved
    values that are outputs of an operation ('argument' for params and inputs)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(_loss(config, inputs), params)
    kinds = collections.Counter()
    for line in out.getvalue().splitlines():
        m = re.search(r" output of (\w+)", line)
        kinds[m.group(1) if m else "argument"] += 1
    return kinds


def test_each_policy_keeps_what_its_name_says(small):
    """'full' keeps no matmul or convolution output, 'dots' keeps both, 'dots_no_batch' the
    matmuls only (fewer: attention's batched ones are recomputed), and
    'offload_dots_no_batch' moves those same outputs to the host (device_put) instead."""
    params, inputs = small
    kept = {name: _residuals(_config(name), params, inputs) for name in (None,) + POLICIES}
    total = {name: sum(k.values()) for name, k in kept.items()}
    assert total[None] > total["dots"] > total["dots_no_batch"] > total["full"]
    assert kept["full"]["dot_general"] == kept["full"]["conv_general_dilated"] == 0
    assert kept["dots"]["conv_general_dilated"] > 0
    assert kept["dots"]["dot_general"] > kept["dots_no_batch"]["dot_general"] > 0
    assert kept["dots_no_batch"]["conv_general_dilated"] == 0
    offload = kept["offload_dots_no_batch"]
    assert offload["dot_general"] == 0 and offload["device_put"] == kept["dots_no_batch"][
        "dot_general"]
    # Off: the policy is ignored, nothing is rematerialised.
    off = get_unet_config("tiny", **SMALL, remat=False, remat_policy="dots")
    assert _residuals(off, params, inputs) == kept[None]


def _policies(jaxpr) -> list:
    """The policy of every remat (checkpoint) equation, sub-jaxprs included."""
    out = []
    for eqn in jaxpr.eqns:
        if "policy" in eqn.params and "prevent_cse" in eqn.params:
            out.append(eqn.params["policy"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(sub, (jex_core.ClosedJaxpr, jex_core.Jaxpr)):
                    out += _policies(getattr(sub, "jaxpr", sub))
    return out


@pytest.mark.parametrize("family", ["if", "prior"])
def test_the_if_unet_and_the_prior_remat_with_the_policy(family):
    name = "dots_no_batch"  # a policy that is not None, so it must be passed on
    if family == "if":
        config = get_if_unet_config("tiny", remat=True, remat_policy=name)
        model, inputs = IFUNet(config), if_example_inputs(config, 1, 4)
        params = nn.unbox(if_param_shapes(config))
        blocks = 2 * sum(config.layers_per_block) + len(config.layers_per_block)  # at least
    else:
        config = prior_lib.get_prior_config("tiny", remat=True, remat_policy=name)
        model, inputs = prior_lib.DiffusionPrior(config), prior_lib.example_inputs(config, 1, 4)
        params = nn.unbox(prior_lib.param_shapes(config))
        blocks = config.layers
    got = _policies(jax.make_jaxpr(lambda p: model.apply(p, **inputs))(params).jaxpr)
    assert len(got) >= blocks and all(p is layers.REMAT_POLICIES[name] for p in got), got
    assert config.to_dict()["remat_policy"] == name


def test_configs_without_the_field_load_as_before():
    """Configs and exports written before the field: 'full' (what remat was); and a config
    at the default writes no new key, so what older jaxt2i wrote and reads is unchanged."""
    old = get_unet_config("tiny", remat=True).to_dict()
    assert "remat_policy" not in old
    assert UNetConfig.from_dict(old).remat_policy == "full"
    new = get_unet_config("tiny", remat=True, remat_policy="dots").to_dict()
    assert new["remat_policy"] == "dots" and UNetConfig.from_dict(new).remat_policy == "dots"
    from jaxt2i.checkpoint import config_mismatch
    # Resuming with another policy (or remat / dtype of an IF model) is not another model.
    saved = {"model": dict(old)}
    assert config_mismatch(saved, {"model": dict(old, remat=False, remat_policy="dots")}) is None
    unet = get_if_unet_config("tiny").to_dict()
    assert config_mismatch({"model": {"unet": unet}}, {"model": {"unet": dict(
        unet, remat=True, remat_policy="dots", dtype="bfloat16")}}) is None
    assert "base_channels" in config_mismatch(saved, {"model": dict(old, base_channels=32)})


def test_a_bad_policy_name_is_one_line():
    with pytest.raises(ValueError, match=r"remat_policy must be one of .*'dots'.*got 'dot'"):
        get_unet_config("tiny", remat_policy="dot")
    with pytest.raises(ValueError, match="remat_policy"):
        get_if_unet_config("tiny", remat_policy="dot")
    with pytest.raises(ValueError, match="remat_policy"):
        prior_lib.get_prior_config("tiny", remat_policy="dot")
    cfg = load_config_file(os.path.join(ROOT, "configs/base.py:tiny"))
    assert cfg.model.remat_policy == "full"
    cfg.model.remat_policy = "dot"
    with pytest.raises(ConfigError, match=r"model.remat_policy='dot' .*did you mean 'dots'"):
        validate(cfg)
    # The command line: exit 2, one line naming the value and the choices.
    r = subprocess.run([sys.executable, "-m", "jaxt2i.aot", "--config=configs/base.py:tiny",
                        "--topology=cpu:1", "--config.model.remat_policy=dot"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith(("W1", "I1"))]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "model.remat_policy='dot'" in lines[0] and ", ".join(POLICIES) in lines[0]


def test_aot_command_of_the_docs_records_the_policy(tmp_path):
    """docs/aot.md's remat-policy command, run as a user would; its JSON says which policy."""
    (command,) = bash_block("aot.md", "## Remat policies")
    args = shlex.split(command)
    assert args[:3] == ["python", "-m", "jaxt2i.aot"]
    args = [sys.executable] + [a.replace("aot_dots.json", str(tmp_path / "aot.json"))
                               for a in args[1:]]
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((tmp_path / "aot.json").read_text())
    assert rec["remat"] is True and rec["remat_policy"] == "dots"
    assert "remat policy dots" in r.stdout
    assert rec["bytes_per_device"] > 0 and rec["flops_per_step"] > 0


def test_the_paper_variants_default_to_dots_and_small_configs_to_full():
    """The paper stages keep matmul / conv outputs (the compiler's choice on the paper's pod,
    BENCHMARKS.md); configs that do not remat keep the old default."""
    for paper in ("base.py:size=paper_base64", "sr.py:size=paper_sr256",
                  "sr.py:size=paper_sr1024"):
        cfg = load_config_file(os.path.join(ROOT, "configs", paper))
        assert cfg.model.remat and cfg.model.remat_policy == "dots", paper
    assert load_config_file(os.path.join(ROOT, "configs/base.py:demo")).model.remat_policy == "full"


def test_aot_model_flops_leave_out_what_remat_recomputes():
    """`jaxt2i.aot`'s `flops_per_step` is the step's count without remat (model FLOPs, what
    its utilisation divides by) and `flops_per_step_with_remat` the count with it: `full`
    recomputes each block's convolutions and matmuls (more), `dots` keeps them (the same as no
    remat). Counted here from each config's own step, traced without compiling."""
    from jaxt2i.aot import compile_train_step
    from jaxt2i.bench.jobs import jaxpr_flops
    from jaxt2i.train import Trainer

    def config(remat, policy="full"):
        cfg = load_config_file(os.path.join(ROOT, "configs/base.py:tiny"))
        cfg.model.remat, cfg.model.remat_policy = remat, policy
        return cfg

    def count(cfg):
        trainer = Trainer(cfg, devices=jax.devices()[:1], abstract=True)
        args = (trainer.abstract_state, trainer.abstract_batch(),
                jax.ShapeDtypeStruct((), jax.random.key(0).dtype),
                jax.ShapeDtypeStruct((), jnp.int32))
        return float(jaxpr_flops(trainer.step_jaxpr(*args))["total"])

    plain, full, dots = count(config(False)), count(config(True)), count(config(True, "dots"))
    assert full > 1.1 * plain and dots == plain, (plain, full, dots)
    rec = compile_train_step(config(True), jax.devices()[:1])
    assert rec["flops_per_step"] == plain and rec["flops_per_step_with_remat"] == full
    rec = compile_train_step(config(False), jax.devices()[:1])
    assert rec["flops_per_step"] == rec["flops_per_step_with_remat"] == plain
