"""Mesh construction and logical-axis sharding on 4 simulated CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxt2i.parallel import (batch_sharding, logical_shardings, make_mesh, mesh_shape,
                             rules_from_config, shard_abstract_state)
from jaxt2i.text import T5Encoder, get_t5_config


def test_mesh_shape_resolution_and_errors():
    assert mesh_shape({"data": -1}, 8) == (8, 1, 1)
    assert mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
    assert mesh_shape({"data": 1, "fsdp": -1}, 4) == (1, 4, 1)
    with pytest.raises(ValueError, match=r"needs a multiple of 3 devices, but there are 4"):
        mesh_shape({"data": -1, "fsdp": 3}, 4)
    with pytest.raises(ValueError, match=r"has 2 devices but 4 are available"):
        mesh_shape({"data": 2}, 4)
    with pytest.raises(ValueError, match=r"unknown mesh axes \['model'\]"):
        mesh_shape({"model": 2}, 4)
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        mesh_shape({"data": -1, "fsdp": -1}, 4)


def test_t5_params_sharded_by_rules():
    assert jax.device_count() == 4
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2})
    cfg = get_t5_config("tiny")
    init = lambda: T5Encoder(cfg).init(  # noqa: E731
        jax.random.key(0), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool))
    abstract, shardings = shard_abstract_state(init, mesh)
    s = shardings["params"]
    assert s["token_embedding"].spec == P("tensor", "fsdp")
    assert s["layers_0"]["attention"]["query"]["kernel"].spec == P("fsdp", "tensor", None)
    assert s["layers_1"]["mlp"]["wo"]["kernel"].spec == P("tensor", "fsdp")
    assert s["encoder_norm"]["scale"].spec == P(None)
    # Materialise with out_shardings: each device holds a quarter of a 2-D sharded kernel.
    params = jax.jit(lambda: jax.tree_util.tree_map(
        lambda x: x, __import__("flax").linen.unbox(init())), out_shardings=shardings)()
    q = params["params"]["layers_0"]["attention"]["query"]["kernel"]
    assert q.addressable_shards[0].data.shape == (cfg.d_model // 2, cfg.num_heads // 2, cfg.d_kv)


def test_indivisible_dims_fall_back_to_replication():
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 1})
    tree = {"w": __import__("flax").linen.Partitioned(
        jax.ShapeDtypeStruct((6, 8), jnp.float32), names=("embed", "mlp"))}
    sh = logical_shardings(tree, mesh)
    assert sh["w"].spec == P(None, None)  # 6 is not divisible by fsdp=4
    tree = {"w": __import__("flax").linen.Partitioned(
        jax.ShapeDtypeStruct((8, 8), jnp.float32), names=("embed", "mlp"))}
    assert logical_shardings(tree, mesh)["w"].spec == P("fsdp", None)


def test_batch_sharding_and_config_rules():
    mesh = make_mesh({"data": 2, "fsdp": 2})
    x = jax.device_put(np.zeros((8, 3)), batch_sharding(mesh, 2))
    assert x.addressable_shards[0].data.shape == (2, 3)
    rules = rules_from_config([["batch", ["data", "fsdp"]], ["embed", None]])
    assert rules == (("batch", ("data", "fsdp")), ("embed", None))
    with pytest.raises(ValueError, match="a sharding rule is"):
        rules_from_config([["batch"]])
