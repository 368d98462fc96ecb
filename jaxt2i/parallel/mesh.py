"""Builds the one `jax.sharding.Mesh` every program runs on, and multi-host start-up.

Axes are ('data', 'fsdp', 'tensor'): pure data parallelism, fully-sharded data parallelism
(parameters and optimizer state split along 'fsdp', batch too), and tensor (model) parallelism.
Sizes come from the config; one of them may be -1, meaning "all remaining devices".
"""

from __future__ import annotations

import logging
import math
import os
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

log = logging.getLogger("jaxt2i")

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves {'data': -1, 'fsdp': 2, 'tensor': 1} against the device count.

    Raises:
      ValueError: naming the sizes and the device count when they do not fit.
    """
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; the mesh axes are {list(MESH_AXES)}")
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    free = [i for i, s in enumerate(shape) if s == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {dict(zip(MESH_AXES, shape))}")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, shape))}")
    known = math.prod(s for s in shape if s != -1)
    if free:
        if num_devices % known:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, shape))} needs a multiple of {known} devices, "
                f"but there are {num_devices}; give sizes whose product divides {num_devices}")
        shape[free[0]] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, shape))} has {math.prod(shape)} devices but "
            f"{num_devices} are available; set one axis to -1 to use the rest")
    return tuple(shape)


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """'fsdp:4' or 'data:2,tensor:2' (a command's --mesh) -> {'fsdp': 4}; -1: the rest.

    Raises:
      ValueError: one line naming the spec and the expected form.
    """
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, size = part.partition(":")
        if name not in MESH_AXES or name in sizes or not size.lstrip("-").isdigit():
            raise ValueError(f"mesh {spec!r} must be AXIS:SIZE[,AXIS:SIZE...] with axes from "
                             f"{list(MESH_AXES)} (each once) and sizes >= 1 or -1 for the rest, "
                             "e.g. fsdp:4 or data:2,tensor:2")
        sizes[name] = int(size)
    if not sizes:
        raise ValueError(f"mesh {spec!r} is empty; give e.g. fsdp:-1 (all devices on fsdp)")
    return sizes


def make_mesh(sizes: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh over `devices` (default: all, every process) with axes MESH_AXES.

    Uses `jax.experimental.mesh_utils` so the layout follows the physical topology (ICI rings
    on TPU, NVLink islands on GPU) when the devices allow it.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(dict(sizes or {"data": -1}), len(devices))
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except Exception:  # noqa: BLE001 - topology-unaware fallback (e.g. CPU, odd sizes)
        arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES)


_CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_ids=None) -> bool:
    """Starts multi-host JAX when there is more than one process.

    With explicit arguments (a local multi-process run), they are used; under a cluster
    launcher (SLURM, Open MPI, Cloud TPU pod) `jax.distributed.initialize()` discovers them.
    On CPU the collectives use gloo.

    Returns:
      True if `jax.distributed` was initialised.
    """
    explicit = coordinator is not None
    in_cluster = any(k in os.environ for k in _CLUSTER_ENV)
    if not explicit and not in_cluster:
        return False
    if explicit and (num_processes is None or process_id is None):
        raise ValueError("--coordinator needs --num_processes and --process_id as well")
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if explicit:
        kwargs = dict(coordinator_address=coordinator, num_processes=num_processes,
                      process_id=process_id)
        if local_device_ids is not None:
            kwargs["local_device_ids"] = local_device_ids
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())
    return True
