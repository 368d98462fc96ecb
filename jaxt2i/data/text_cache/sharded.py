"""The cache's T5, sharded over this process's local devices.

Each process that builds a cache encodes its own shards independently, so its encoder lives on
a mesh of `jax.local_devices()` only (never a multi-process mesh): axes ('data', 'fsdp',
'tensor') as in training, sizes from a `--mesh` spec ('fsdp:4', 'data:2,tensor:2'; default
`fsdp:-1`, all local devices). The params are placed by the project's sharding rules
(`jaxt2i.parallel.DEFAULT_RULES`): 'fsdp' splits every kernel along d_model (the 'embed'
dimension), 'tensor' splits heads, d_ff ('mlp') and the vocabulary; the batch of captions is
split over data x fsdp. Unlike training, a dimension the mesh does not divide is an error, not
silently replicated: the point of the mesh here is to fit the model.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxt2i.parallel import (batch_sharding, logical_shardings, make_mesh, parse_mesh_spec,
                             rules_from_config, undivided_dims)

DEFAULT_MESH = "fsdp:-1"
# The T5Config field behind each logical dimension of its params (for error messages).
_FIELDS = {"embed": "d_model", "heads": "num_heads", "mlp": "d_ff", "vocab": "vocab_size",
           "kv": "d_kv", "relpos_buckets": "relative_attention_num_buckets"}


def local_mesh(spec: str | Mapping[str, int] | None = None) -> Mesh:
    """A Mesh of this process's local devices from 'fsdp:4'-style sizes (None: DEFAULT_MESH).

    Raises ValueError (one line) when the sizes do not fit the local device count.
    """
    spec = DEFAULT_MESH if spec is None else spec
    sizes = parse_mesh_spec(spec) if isinstance(spec, str) else dict(spec)
    devices = jax.local_devices()
    try:
        return make_mesh(sizes, devices)
    except ValueError as e:
        n = len(devices)
        raise ValueError(f"--mesh={_spec_str(sizes)} does not fit this process's {n} local "
                         f"devices ({e}); give sizes whose product is {n}, or -1 for one axis, "
                         f"e.g. --mesh=fsdp:{n}") from None


def _spec_str(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{a}:{s}" for a, s in sizes.items() if s != 1) or "data:1"


def encoder_shardings(config, mesh: Mesh, rules=None) -> Any:
    """NamedShardings of a T5 encoder's params (a `T5Config`) on `mesh`, from shapes only.

    Raises ValueError (one line) when a mesh axis does not divide a dimension it splits.
    """
    from jaxt2i.text.t5 import T5Encoder  # pylint: disable=import-outside-toplevel

    ids = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(lambda: T5Encoder(config).init(
        jax.random.key(0), ids, jnp.ones((1, 1), bool)))["params"]
    bad = undivided_dims(boxed, mesh, rules)
    if bad:
        name, (dim, axes, size) = next(iter(bad.items()))
        n = mesh.devices.size
        fits = [s for s in range(1, n + 1) if n % s == 0 and dim % s == 0]
        raise ValueError(
            f"--mesh={_spec_str(dict(mesh.shape))}: the T5's {_FIELDS.get(name, name)} ({dim}) "
            f"is not divisible by {axes}={size}, which splits it; use a {axes} size in {fits} "
            f"(the rest of the {n} devices on another axis)")
    return logical_shardings(boxed, mesh, rules)


class ShardedEncoder:
    """A `TextEncoder` with its params placed on `mesh`; `encode` splits the batch over the
    mesh's data x fsdp devices. Has what `build_text_cache` needs: `encode`, `max_length`,
    `config`, `data_parallel`."""

    def __init__(self, encoder, mesh: Mesh, rules=None):
        self.encoder, self.mesh, self.rules = encoder, mesh, rules_from_config(rules)
        shardings = encoder_shardings(encoder.config, mesh, self.rules)
        self.params = jax.device_put(encoder.params, shardings)  # no copy if already there
        self._batch = batch = batch_sharding(mesh, 2)
        self._encode = jax.jit(encoder.apply, in_shardings=(shardings, batch, batch),
                               out_shardings=batch_sharding(mesh, 3))

    config = property(lambda self: self.encoder.config)
    max_length = property(lambda self: self.encoder.max_length)

    @property
    def data_parallel(self) -> int:
        """Devices the batch is split over (data x fsdp): batches must be a multiple."""
        return int(self.mesh.shape["data"] * self.mesh.shape["fsdp"])

    def encode(self, prompts) -> tuple[jax.Array, jax.Array]:
        """[B] prompts -> (emb [B, L, D] in the compute dtype, mask [B, L] bool)."""
        if len(prompts) % self.data_parallel:
            raise ValueError(f"a batch of {len(prompts)} captions does not split over the "
                             f"mesh's {self.data_parallel} data x fsdp devices; use a "
                             f"--batch_size that is a multiple of {self.data_parallel}")
        ids, mask = self.encoder.tokenizer(prompts)
        # The rules pin activations as training does: batch over data x fsdp, heads / mlp
        # over tensor (`nn.with_logical_constraint` in t5.py).
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            # Placed first: under jax.distributed, jit refuses host arrays for a sharded input
            # (even on a mesh of this process's devices only).
            ids, mask = jax.device_put((np.asarray(ids, np.int32), np.asarray(mask, bool)),
                                       self._batch)
            emb = self._encode(self.params, ids, mask)
        return emb, np.asarray(mask)


def on_mesh(encoder, mesh: Mesh | str | Mapping[str, int] | None = None):
    """`encoder` ready for the cache: a `TextEncoder` is sharded over a local mesh (`mesh`, a
    spec, or DEFAULT_MESH); a `ShardedEncoder` or any other object with `encode` is kept."""
    from jaxt2i.text.encoder import TextEncoder  # pylint: disable=import-outside-toplevel

    if not isinstance(encoder, TextEncoder):
        return encoder
    return ShardedEncoder(encoder, mesh if isinstance(mesh, Mesh) else local_mesh(mesh))


def load_sharded_encoder(path: str, mesh: Mesh, *, dtype: str = "float32",
                         max_length: int | None = None) -> ShardedEncoder:
    """`jaxt2i.text.encoder.load_encoder` with bfloat16 params placed straight onto `mesh`
    (never whole on one device). A local directory's dimensions are checked against the mesh
    before any weight is read.

    Args:
      path: Hugging Face T5 directory (or hub id).
      mesh: from `local_mesh`.
      dtype: compute dtype. float32 (the default) makes the bfloat16 cache the same bits on
        every mesh and batch size; bfloat16 compute rounds differently with the per-device
        batch shape (most values move by a few bfloat16 ulps).
      max_length: text length L (default: the directory's).
    """
    from jaxt2i.text.encoder import load_encoder  # pylint: disable=import-outside-toplevel
    from jaxt2i.text.t5 import T5Config  # pylint: disable=import-outside-toplevel

    shardings = None  # a hub id: loaded onto one device first, then moved
    cfg_path = os.path.join(path, "config.json")
    if os.path.exists(cfg_path):  # fail fast: T5-XXL's weights take a minute to read
        with open(cfg_path) as f:
            config = T5Config.from_hf(json.load(f), dtype=dtype, param_dtype="bfloat16")
        shardings = encoder_shardings(config, mesh)
    encoder = load_encoder(path, dtype, param_dtype="bfloat16", max_length=max_length,
                           shardings=shardings)
    return ShardedEncoder(encoder, mesh)
