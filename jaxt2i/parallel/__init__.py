"""Device mesh and logical-axis sharding: one Mesh with axes ('data', 'fsdp', 'tensor')."""

from jaxt2i.parallel.mesh import (MESH_AXES, initialize_distributed, make_mesh, mesh_shape,
                                 parse_mesh_spec)
from jaxt2i.parallel.sharding import (DEFAULT_RULES, batch_sharding, logical_shardings,
                                      rules_from_config, shard_abstract_state, undivided_dims)

__all__ = [
    "DEFAULT_RULES", "MESH_AXES", "batch_sharding", "initialize_distributed",
    "logical_shardings", "make_mesh", "mesh_shape", "parse_mesh_spec", "rules_from_config",
    "shard_abstract_state", "undivided_dims",
]
