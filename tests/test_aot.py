"""Compiling without the devices (`jaxt2i.aot`): the abstract train step is the real one, the
command reports what the compiler says, and the TPU path runs where libtpu is installed."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i.config import load_config_file
from jaxt2i.train import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = ("topology", "devices", "mesh", "global_batch", "bytes_per_device",
            "hbm_bytes_per_device", "flops_per_step", "optimal_seconds", "compile_seconds")


def _signature(lowered) -> str:
    """The entry function's signature: every argument's and result's type, sharding and
    donation (aliasing) as lowered."""
    text = lowered.as_text()
    start = text.index("func.func public @main")
    return text[start:text.index("{\n", start)]


def test_abstract_step_lowers_with_the_real_steps_shardings():
    """Issue #25: the trainer could not be built for compile-only devices (it placed the text
    encoder and the state). Built abstract, nothing is placed, and the step it lowers has the
    same arguments, shardings and donations as the real trainer's on 4 CPU devices."""
    from jaxt2i.data.pipeline import to_global_array

    cfg = load_config_file(os.path.join(ROOT, "configs/base.py:tiny"))
    cfg.mesh.data, cfg.mesh.fsdp = 1, 4
    devices = jax.devices()[:4]
    real = Trainer(cfg, devices=devices)
    abstract = Trainer(cfg, encoder=real.encoder, devices=devices, abstract=True)
    assert all(isinstance(a, jax.ShapeDtypeStruct)
               for a in jax.tree_util.tree_leaves(abstract.text_params))
    with pytest.raises(ValueError, match="abstract Trainer has no device state"):
        abstract.init_state(0)
    c, b = real.unet_cfg, cfg.train.batch_size
    ids, mask = real.encoder.tokenizer(["a red circle above a blue square"] * b)
    batch = to_global_array({"image": np.zeros((b, c.image_size, c.image_size, 3), np.float32),
                             "ids": ids, "mask": mask}, real.mesh)
    key = jax.random.key(0)
    want = _signature(real.lower_step(real.init_state(0), batch, key, jnp.int32(0)))
    got = _signature(abstract.lower_step(
        abstract.abstract_state, abstract.abstract_batch(),
        jax.ShapeDtypeStruct((), key.dtype), jax.ShapeDtypeStruct((), jnp.int32)))
    assert got.count('{"fsdp"}') > 10  # params really are FSDP-sharded in both
    assert got == want


def _run(args, python=sys.executable, **env):
    full = {**os.environ, "JAX_PLATFORMS": "", **env}
    return subprocess.run([python, "-m", "jaxt2i.aot", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env=full)


def test_user_mistakes_are_one_line():
    cases = [(["--config=configs/base.py:tiny", "--topology=cpu:64"],
              "--topology='cpu:64': 4 CPU devices here"),
             (["--config=configs/base.py:tiny", "--topology=cpu:x"], "takes a device count"),
             (["--topology=cpu:4"], "--config is required")]
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:  # the suite's own environment
        cases.append((["--config=configs/base.py:tiny", "--topology=v4:4x4x8"],
                      "needs the TPU compiler: pip install libtpu"))
    for args, expected in cases:
        r = _run(args, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
        lines = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith(("W1", "I1"))]
        assert r.returncode == 2 and len(lines) == 1 and expected in lines[0], (args, r.stderr)


def _check_report(path, devices):
    rec = json.loads(open(path).read())
    assert all(k in rec for k in REQUIRED), [k for k in REQUIRED if k not in rec]
    assert rec["devices"] == devices and rec["global_batch"] == 8
    assert rec["bytes_per_device"] == (rec["argument_size_in_bytes"] + rec["output_size_in_bytes"]
                                       + rec["temp_size_in_bytes"] - rec["alias_size_in_bytes"])
    assert rec["bytes_per_device"] > 0 and rec["flops_per_step"] > 1e8
    assert rec["sampler"]["what"] == "sampler" and rec["sampler"]["steps"] == 2
    return rec


@pytest.mark.slow
def test_aot_command_compiles_for_cpu_devices(tmp_path):
    out = tmp_path / "aot.json"
    r = _run(["--config=configs/base.py:tiny", "--topology=cpu:4", "--config.mesh.fsdp=4",
              "--config.mesh.data=1", "--config.train.batch_size=8", "--sampler",
              "--sample_steps=2", f"--json={out}"],
             XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    rec = _check_report(out, 4)
    assert rec["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert rec["fits"] is None and rec["hbm_bytes_per_device"] is None  # a CPU has no HBM
    assert "train_step on 4 x cpu" in r.stdout and "sampler on 4 x cpu" in r.stdout


def _tpu_python():
    """A Python with libtpu: $JAXT2I_TPU_PYTHON (an environment of its own; libtpu is kept out
    of the test environment), or this one if it has libtpu."""
    import importlib.util

    python = os.environ.get("JAXT2I_TPU_PYTHON")
    if python:
        return python
    return sys.executable if importlib.util.find_spec("libtpu") else None


@pytest.mark.slow
@pytest.mark.skipif(_tpu_python() is None, reason="no libtpu: set JAXT2I_TPU_PYTHON to a Python "
                    "with libtpu and jaxt2i's dependencies (pip install libtpu in a venv of its "
                    "own) to compile for a TPU topology")
def test_tpu_topology_compiles_without_a_tpu(tmp_path):
    out = tmp_path / "aot.json"
    r = _run(["--config=configs/base.py:tiny", "--topology=v4:2x2x1", "--config.mesh.fsdp=-1",
              "--config.mesh.data=1", "--config.train.batch_size=8", "--sampler",
              "--sample_steps=2", f"--json={out}"], python=_tpu_python(), PYTHONPATH=ROOT,
             TPU_WORKER_HOSTNAMES="localhost", TPU_ACCELERATOR_TYPE="v4-8")
    assert r.returncode == 0, r.stderr[-3000:]
    rec = _check_report(out, 8)
    assert rec["topology_kind"] == "TPU v4" and rec["chips"] == 4
    assert rec["hbm_bytes_per_device"] == 16 << 30 and rec["fits"] is True
    assert rec["optimal_seconds"] > 0 and 0 < rec["roofline_utilisation"] < 1


def test_roofline_falls_back_to_xlas_counts_when_the_compiler_gives_no_time():
    """The TPU compiler reports no optimal_seconds for the 2B steps: the report then takes the
    roofline of XLA's per-device FLOPs and bytes (a v4 device is half a chip: 137.5 TFLOP/s and
    614 GB/s), and says so."""
    from types import SimpleNamespace

    from jaxt2i.aot import _summary, format_report

    devices = [SimpleNamespace(device_kind="TPU v4", coords=(i // 2, 0, 0), id=i)
               for i in range(8)]
    mem = SimpleNamespace(argument_size_in_bytes=1 << 30, output_size_in_bytes=0,
                          temp_size_in_bytes=2 << 30, alias_size_in_bytes=0,
                          generated_code_size_in_bytes=0)

    def compiled(cost):
        return SimpleNamespace(memory_analysis=lambda: mem, cost_analysis=lambda: cost)

    flops, nbytes = 1.1e13, 1e11  # per device
    r = _summary("train_step", devices, compiled({"flops": flops, "bytes accessed": nbytes}),
                 1.0, 64, 8e13)
    want = max(flops / (275e12 / 2), nbytes / (1228e9 / 2))  # memory-bound: 0.163 s
    assert r["optimal_seconds"] == pytest.approx(want) and want == pytest.approx(nbytes / 614e9)
    assert r["optimal_seconds_source"].startswith("roofline")
    assert r["roofline_utilisation"] == pytest.approx(8e13 / (want * 275e12 * 4))
    assert r["fits"] and r["bytes_per_device"] == 3 << 30
    assert "roofline time (XLA's flops and bytes accessed)" in format_report(r)
    r = _summary("train_step", devices, compiled({"flops": flops, "bytes accessed": nbytes,
                                                  "optimal_seconds": 0.05}), 1.0, 64, 8e13)
    assert r["optimal_seconds"] == 0.05 and r["optimal_seconds_source"] == "compiler"
    assert "compiler's optimal time 50.0 ms" in format_report(r)


def test_a_step_that_does_not_fit_is_reported_with_its_layout(monkeypatch):
    """The compiler's out-of-memory is an answer: "fits": false, its reason, and the layout
    that did not fit (mesh, grad_accum, params), so the next layout to try can be read off."""
    from jaxt2i import aot

    class Lowered:
        def compile(self):
            raise RuntimeError("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory "
                               "on HBM, the total memory required for HLO temporaries (42.08G) "
                               "exceeds available HBM (15.25G).")

    monkeypatch.setattr(Trainer, "lower_step", lambda self, *args: Lowered())
    cfg = load_config_file(os.path.join(ROOT, "configs/base.py:tiny"))
    cfg.mesh.fsdp, cfg.train.grad_accum = 2, 2
    r = aot.compile_train_step(cfg, jax.devices()[:2])
    assert r["fits"] is False and r["reason"].startswith("RESOURCE_EXHAUSTED")
    assert r["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1} and r["grad_accum"] == 2
    assert r["params"] > 0 and r["global_batch"] == cfg.train.batch_size
    report = aot.format_report(r)
    assert "does not fit: RESOURCE_EXHAUSTED" in report and "fsdp': 2" in report
