"""Logical axis names -> mesh axes, and the NamedShardings of state and batches.

Models name their parameter and activation axes ('batch', 'embed', 'mlp', 'heads', ...); the
config holds the rules mapping each name to mesh axes. Rules are tried in order and a mesh axis
is used at most once per array (flax's priority semantics), so 'batch' -> ('data', 'fsdp')
listed first keeps activations' 'embed' unsharded while parameters' 'embed' goes to 'fsdp'.
A dimension that a mesh axis does not divide is left unsharded (and reported once): tiny test
models and odd channel counts still run on any mesh.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger("jaxt2i")

# (logical name, mesh axes) in priority order.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    # Tensor parallelism: Megatron-style split of heads / MLP hidden / conv outputs / vocab.
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("conv_out", "tensor"),
    ("vocab", "tensor"),
    # FSDP: parameters split along their input/embedding dimension.
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("text_embed", "fsdp"),
    # Never sharded.
    ("kv", None), ("length", None), ("height", None), ("width", None), ("norm", None),
    ("relpos_buckets", None),
)


def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
    """Normalises config rules (lists from JSON) to flax's tuple form; None -> DEFAULT_RULES."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for rule in rules:
        if len(rule) != 2:
            raise ValueError(f"a sharding rule is (logical_name, mesh_axes), got {rule!r}")
        name, axes = rule
        if isinstance(axes, list):
            axes = tuple(axes)
        out.append((str(name), axes))
    return tuple(out)


def _fit(spec: P, shape: Sequence[int], mesh: Mesh, where: str, warned: set) -> P:
    """Drops mesh axes from dimensions they do not divide (and size-1 axes)."""
    fixed = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            fixed.append(None)
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        keep = []
        size = 1
        for a in names:
            if mesh.shape[a] == 1:
                continue  # a size-1 axis shards nothing; keep specs readable
            if dim % (size * mesh.shape[a]) == 0:
                keep.append(a)
                size *= mesh.shape[a]
        if len(keep) != len([a for a in names if mesh.shape[a] > 1]) and where not in warned:
            warned.add(where)
            log.info("sharding: %s dim %d is not divisible by mesh axes %s; using %s",
                     where, dim, names, keep or "replication")
        fixed.append(tuple(keep) if len(keep) > 1 else (keep[0] if keep else None))
    return P(*fixed)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules=None) -> Any:
    """NamedShardings for a tree of (possibly `nn.Partitioned`-boxed) abstract arrays.

    Leaves without logical names are replicated.
    """
    rules = rules_from_config(rules)
    specs = nn.get_partition_spec(abstract_tree)
    unboxed = nn.unbox(abstract_tree)
    warned: set = set()

    def one(path, spec, leaf):
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules) if spec else P()
        where = jax.tree_util.keystr(path)
        return NamedSharding(mesh, _fit(mesh_spec, getattr(leaf, "shape", ()), mesh, where, warned))

    return jax.tree_util.tree_map_with_path(
        one, specs, unboxed, is_leaf=lambda x: isinstance(x, P))


def shard_abstract_state(init_fn, mesh: Mesh, rules=None, *args):
    """(abstract state, shardings) of `init_fn(*args)` via `jax.eval_shape` (no memory spent)."""
    abstract = jax.eval_shape(init_fn, *args)
    return abstract, logical_shardings(abstract, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int, batch_axes=("data", "fsdp")) -> NamedSharding:
    """Sharding of a [B, ...] batch array: batch split over the data-parallel axes."""
    axes = tuple(a for a in batch_axes if mesh.shape[a] > 1) or None
    if axes is not None and len(axes) == 1:
        axes = axes[0]
    return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def undivided_dims(abstract_tree: Any, mesh: Mesh, rules=None) -> dict[str, tuple[int, str, int]]:
    """Logical dimensions that the mesh axes their rules name do not divide.

    `logical_shardings` leaves such a dimension unsharded (tiny models run on any mesh); a
    caller that wants every dimension split as the rules say reports these instead.

    Returns:
      {logical name: (dimension size, mesh axes joined by 'x', their total size)}, one entry
      per name (the first leaf found).
    """
    rules = rules_from_config(rules)
    specs = nn.get_partition_spec(abstract_tree)
    unboxed = nn.unbox(abstract_tree)
    bad: dict[str, tuple[int, str, int]] = {}

    def one(spec, leaf):
        if not spec:
            return
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules)
        for name, dim, axes in zip(spec, leaf.shape, mesh_spec):
            names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
            size = 1
            for a in names:
                size *= mesh.shape[a]
            if size > 1 and dim % size and name not in bad:
                bad[name] = (int(dim), "x".join(names), size)

    jax.tree_util.tree_map(one, specs, unboxed, is_leaf=lambda x: isinstance(x, P))
    return bad
