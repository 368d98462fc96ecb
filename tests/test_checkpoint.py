"""Orbax checkpoints: cross-mesh restore, corrupt-latest fallback, params export."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxt2i.checkpoint import Checkpointer, export_params, load_exported
from jaxt2i.parallel import make_mesh
from jaxt2i.train_state import create_train_state


def _state():
    params = {"dense": {"kernel": jnp.arange(32.0).reshape(8, 4), "bias": jnp.ones(4)}}
    return create_train_state(params, optax.adam(1e-3))


def _abstract(state, sharding_fn):
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_fn(x)), state)


def test_save_on_fsdp_mesh_restore_on_one_device(tmp_path):
    mesh = make_mesh({"data": 1, "fsdp": 4})
    state = _state()
    shard = lambda x: NamedSharding(mesh, P("fsdp") if x.ndim and x.shape[0] % 4 == 0 else P())  # noqa: E731
    state = jax.device_put(state, jax.tree_util.tree_map(shard, state))
    assert state.params["dense"]["kernel"].addressable_shards[0].data.shape == (2, 4)
    ck = Checkpointer(str(tmp_path), max_to_keep=2)
    ck.save(3, state, {"position": 12}, {"name": "t"})
    ck.wait()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    step, restored, data, cfg = Checkpointer(str(tmp_path)).restore(_abstract(state, lambda x: one))
    assert step == 3 and data == {"position": 12} and cfg == {"name": "t"}
    k = restored.params["dense"]["kernel"]
    assert k.sharding == one
    np.testing.assert_array_equal(np.asarray(k), np.arange(32.0).reshape(8, 4))
    ck.close()


def test_corrupt_latest_is_moved_aside_with_warning(tmp_path, caplog):
    state = _state()
    ck = Checkpointer(str(tmp_path), max_to_keep=3)
    ck.save(1, state, {"position": 1}, {})
    ck.wait()
    ck.save(2, state.replace(step=jnp.asarray(2, jnp.int32)), {"position": 2}, {})
    ck.close()
    # Damage step 2: remove the array data of its state item.
    state_dir = os.path.join(tmp_path, "checkpoints", "2", "state")
    for entry in os.listdir(state_dir):
        p = os.path.join(state_dir, entry)
        if os.path.isdir(p):
            shutil.rmtree(p)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with caplog.at_level("WARNING", logger="jaxt2i"):
        step, restored, data, _ = Checkpointer(str(tmp_path)).restore(_abstract(state, lambda x: one))
    assert step == 1 and data == {"position": 1}
    assert any("step 2" in r.message and "cannot be restored" in r.message for r in caplog.records)
    # The unreadable step is kept for inspection, out of the way of the retrained one.
    aside = os.listdir(os.path.join(tmp_path, "corrupt_checkpoints"))
    assert len(aside) == 1 and aside[0].startswith("2-")
    assert os.listdir(os.path.join(tmp_path, "corrupt_checkpoints", aside[0], "state"))
    assert sorted(os.listdir(os.path.join(tmp_path, "checkpoints"))) == ["1"]


def test_no_checkpoint_returns_none(tmp_path):
    assert Checkpointer(str(tmp_path)).restore(_abstract(_state(), lambda x: None)) is None


def test_export_round_trip(tmp_path):
    from jaxt2i.stage import FORMAT_VERSION

    params = {"a": {"w": np.random.rand(3, 2).astype(np.float32)}, "b": np.zeros(2, np.float32)}
    export_params(params, {"model": {"size": "tiny"}}, str(tmp_path / "ema"), step=7)
    back, cfg, step = load_exported(str(tmp_path / "ema"))
    np.testing.assert_array_equal(back["a"]["w"], params["a"]["w"])
    # written in the current stage-config format (jaxt2i.stage.upgrade of the given config)
    assert cfg == {"model": {"size": "tiny"}, "format_version": FORMAT_VERSION} and step == 7


def test_damaged_exports_are_one_line_errors(tmp_path):
    """Files a user may hand `sample` or `train.init_from`: each is refused naming the file
    and the problem, never a safetensors / JSON traceback or silently wrong params."""
    from safetensors.numpy import save_file

    from jaxt2i.checkpoint import CheckpointError

    params = {"a": {"w": np.random.rand(3, 2).astype(np.float32)}}
    good = str(tmp_path / "good")
    export_params(params, {"model": {}}, good, step=1)
    raw = open(os.path.join(good, "params.safetensors"), "rb").read()

    def damaged(name, params_bytes=None, config_text=None, tensors=None):
        d = tmp_path / name
        shutil.copytree(good, d)
        if params_bytes is not None:
            (d / "params.safetensors").write_bytes(params_bytes)
        if tensors is not None:
            save_file(tensors, str(d / "params.safetensors"))
        if config_text is not None:
            (d / "config.json").write_text(config_text)
        return str(d)

    for d, expected in [
        (damaged("truncated", raw[:len(raw) // 2]), "not a readable safetensors file"),
        (damaged("empty", b""), "not a readable safetensors file"),
        (damaged("foreign", b"PK\x03\x04 a zip file"), "not a readable safetensors file"),
        (damaged("int", tensors={"a/w": np.ones((3, 2), np.int32)}), "tensor a/w is int32"),
        (damaged("nan", tensors={"a/w": np.full((3, 2), np.nan, np.float32)}),
         "tensor a/w has 6 non-finite values"),
        (damaged("list", config_text="[1, 2]"), "is not a stage export's config"),
        (damaged("bad_json", config_text="{"), "cannot be read as JSON"),
    ]:
        with pytest.raises(CheckpointError, match=expected) as info:
            load_exported(d)
        assert "\n" not in str(info.value) and d in str(info.value)


def test_export_checkpoint_writes_the_ema_params_of_a_sharded_checkpoint(tmp_path, caplog):
    import logging

    from absl import logging as absl_logging

    from jaxt2i.checkpoint import export_checkpoint
    from jaxt2i.stage import FORMAT_VERSION

    mesh = make_mesh({"data": 1, "fsdp": 4})
    state = _state()
    ema = {"dense": {"kernel": -jnp.arange(32.0).reshape(8, 4), "bias": jnp.full(4, 0.5)}}
    shard = lambda x: NamedSharding(mesh, P("fsdp") if x.ndim and x.shape[0] % 4 == 0 else P())  # noqa: E731
    ck = Checkpointer(str(tmp_path), max_to_keep=3)
    ck.save(1, state, {}, {"stage": "base", "at": 1})
    ck.wait()
    later = jax.device_put(state.replace(ema_params=ema), jax.tree_util.tree_map(shard, state))
    ck.save(2, later, {}, {"stage": "base", "at": 2})
    ck.close()
    verbosity, filters = absl_logging.get_verbosity(), list(logging.getLogger("absl").filters)
    with caplog.at_level(logging.WARNING):
        out, step = export_checkpoint(str(tmp_path))
    assert step == 2 and out == os.path.join(str(tmp_path), "export")
    # Orbax's read-only notes are dropped for the call only; absl's state is left as it was.
    assert not [r for r in caplog.records if "read_only=True" in r.getMessage()]
    assert absl_logging.get_verbosity() == verbosity
    assert logging.getLogger("absl").filters == filters
    params, cfg, saved_step = load_exported(out)
    np.testing.assert_array_equal(params["dense"]["kernel"], -np.arange(32.0).reshape(8, 4))
    np.testing.assert_array_equal(params["dense"]["bias"], np.full(4, 0.5))
    # a checkpoint of a version-1 run (with `stage`) exports in the current format
    assert cfg == {"at": 2, "format_version": FORMAT_VERSION} and saved_step == 2
    out, step = export_checkpoint(str(tmp_path), step=1, out_dir=str(tmp_path / "s1"))
    params, cfg, _ = load_exported(out)
    np.testing.assert_array_equal(params["dense"]["kernel"], np.arange(32.0).reshape(8, 4))
    assert step == 1 and cfg["at"] == 1
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 5 .* steps there: \[1, 2\]"):
        export_checkpoint(str(tmp_path), step=5)
    with pytest.raises(FileNotFoundError, match="has no checkpoints/ directory"):
        export_checkpoint(str(tmp_path / "nowhere"))

    # Saved across 4 devices, exported by the CLI in a process that has one (a pod's run
    # exported on a workstation): every array lands whole on that device.
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    r = subprocess.run([sys.executable, "-m", "jaxt2i.checkpoint", f"--workdir={tmp_path}",
                        f"--out={tmp_path / 'one'}"], env=env, capture_output=True, text=True,
                       timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-2000:]
    params, _, step = load_exported(str(tmp_path / "one"))
    assert step == 2
    np.testing.assert_array_equal(params["dense"]["kernel"], -np.arange(32.0).reshape(8, 4))


def test_export_checkpoint_cli_matches_the_export_written_by_training(tiny_cascade_dir, tmp_path):
    """The tiny cascade's base run ends with a checkpoint and an export at the same step: the
    CLI's export of that checkpoint must equal training's own export; a workdir without an
    export is refused by the sampler with the command that makes one."""
    import subprocess
    import sys

    from jaxt2i.cascade import load_cascade
    from jaxt2i.config import ConfigError

    run = tiny_cascade_dir / "base"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "jaxt2i.checkpoint", f"--workdir={run}",
                        f"--out={tmp_path / 'exp'}"], cwd=root, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == f"exported the EMA params of step 2 to {tmp_path / 'exp'}"
    mine, cfg, step = load_exported(str(tmp_path / "exp"))
    theirs, cfg_t, step_t = load_exported(str(run / "export"))
    assert step == step_t == 2 and cfg == cfg_t
    flat_m, flat_t = jax.tree_util.tree_leaves_with_path(mine), jax.tree_util.tree_leaves_with_path(theirs)
    assert [p for p, _ in flat_m] == [p for p, _ in flat_t] and len(flat_m) > 10
    for (_, a), (_, b) in zip(flat_m, flat_t):
        np.testing.assert_array_equal(a, b)
    bad = subprocess.run([sys.executable, "-m", "jaxt2i.checkpoint", f"--workdir={tmp_path}"],
                         cwd=root, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0, bad.stderr
    assert "has no checkpoints/ directory" in bad.stderr
    partial = tmp_path / "partial"
    shutil.copytree(run / "checkpoints", partial / "checkpoints")
    with pytest.raises(ConfigError, match="has no export/ yet .*`python -m jaxt2i.checkpoint --workdir="):
        load_cascade([str(partial), str(tiny_cascade_dir / "sr")])


def test_identity_check_reads_a_run_from_before_aug_order_as_augment_first():
    """A run saved before diffusion.aug_order existed augmented first: resuming it with
    today's default (resize first) is another training task, refused like another model;
    resuming with augment_first, or with a config that also lacks the field, is not."""
    from jaxt2i.checkpoint import config_mismatch

    old = {"model": {"image_size": 16}, "diffusion": {"schedule": "cosine"}}
    new = {"model": {"image_size": 16},
           "diffusion": {"schedule": "cosine", "aug_order": "resize_first"}}
    assert config_mismatch(old, new) == ("diffusion.aug_order: checkpoint 'augment_first', "
                                         "config 'resize_first'")
    new["diffusion"]["aug_order"] = "augment_first"
    assert config_mismatch(old, new) is None
    assert config_mismatch(old, old) is None
    assert config_mismatch(new, dict(new, train={"lr": 1.0})) is None  # other fields are free
