"""Test session setup: JAX on CPU with 4 simulated devices (set before jax is imported)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# XLA's CPU compiler dominates the suite's time (a tiny U-Net's random init compiles for
# ~10 s): share compiled programs between tests and the CLI subprocesses they start.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), "jaxt2i-test-compilation-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cascade_dir(tmp_path_factory):
    """A tiny base (16 px) and SR stage (16 -> 32 px) trained 2 steps each through
    `jaxt2i.train.train`, in a cascade directory (~1 min; shared by the sampling and export
    tests). Under pytest-xdist the workers share one: the first to get here builds it while
    the others wait on a lock in the session's common temp directory."""
    import fcntl

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return _build_tiny_cascade(tmp_path_factory.mktemp("cascade"))
    root = tmp_path_factory.getbasetemp().parent / "shared_tiny_cascade"
    with open(str(root) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (root / "cascade.json").exists():
            _build_tiny_cascade(root)
    return root


def _build_tiny_cascade(root):
    import json

    import jax

    from jaxt2i.config import load_config_file
    from jaxt2i.train import train

    root_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, spec in [("base", "configs/base.py:tiny"), ("sr", "configs/sr.py:tiny_sr")]:
        cfg = load_config_file(os.path.join(root_dir, spec))
        cfg.train.num_steps = 2
        cfg.train.log_every = 1
        cfg.train.save_every = 0
        cfg.data.num_examples = 64
        if name == "sr":
            cfg.model.lowres_size = 16
            cfg.model.image_size = 32
        train(cfg, str(root / name), devices=jax.devices()[:1], progress=False)
    with open(root / "cascade.json", "w") as f:
        json.dump({"stages": ["base/export", "sr/export"]}, f)
    return root
