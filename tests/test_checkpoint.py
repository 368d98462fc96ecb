"""Orbax checkpoints: cross-mesh restore, corrupt-latest fallback, params export."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
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


def test_corrupt_latest_falls_back_with_warning(tmp_path, caplog):
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
    assert any("step 2" in r.message and "falling back to step 1" in r.message for r in caplog.records)


def test_no_checkpoint_returns_none(tmp_path):
    assert Checkpointer(str(tmp_path)).restore(_abstract(_state(), lambda x: None)) is None


def test_export_round_trip(tmp_path):
    params = {"a": {"w": np.random.rand(3, 2).astype(np.float32)}, "b": np.zeros(2, np.float32)}
    export_params(params, {"model": {"size": "tiny"}}, str(tmp_path / "ema"), step=7)
    back, cfg, step = load_exported(str(tmp_path / "ema"))
    np.testing.assert_array_equal(back["a"]["w"], params["a"]["w"])
    assert cfg == {"model": {"size": "tiny"}} and step == 7
