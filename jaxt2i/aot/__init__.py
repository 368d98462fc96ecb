"""Ahead-of-time compilation of a stage for a device topology, without the devices.

`compile_train_step` builds the stage's `Trainer` with nothing placed on devices (abstract
state, abstract text-encoder params, an abstract sharded batch), lowers its one jitted train
step for the topology's mesh and compiles it; the compiler's memory and cost analyses say
whether it fits a chip and how fast it could run. `compile_sampler` does the same for the
stage's whole reverse process on a serving topology. TPU topologies come from libtpu's
compile-only client (`jax.experimental.topologies`), so a pod configuration is checked on a
CPU machine; `cpu:N` compiles for N host devices instead (tests, no libtpu).
`python -m jaxt2i.aot` is the command.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxt2i.config import ConfigError

GiB = 1 << 30
# Per chip: HBM bytes, peak dense bfloat16 FLOP/s and HBM bandwidth in bytes/s (Google
# Cloud's published figures).
CHIPS = {
    "TPU v4": (32 * GiB, 275e12, 1228e9),
    "TPU v5 lite": (16 * GiB, 197e12, 819e9),  # v5e
    "TPU v5": (95 * GiB, 459e12, 2765e9),  # v5p
    "TPU v5p": (95 * GiB, 459e12, 2765e9),
    "TPU v6 lite": (32 * GiB, 918e12, 1640e9),  # v6e (Trillium)
}


def topology_devices(name: str) -> list:
    """The devices of a topology: 'v4:4x4x8' style TPU topologies (compile-only, via libtpu)
    or 'cpu:N' (the first N host CPU devices). Raises ConfigError (one line) otherwise."""
    if name.startswith("cpu:"):
        try:
            n = int(name[4:])
        except ValueError:
            raise ConfigError(f"--topology={name!r}: 'cpu:N' takes a device count") from None
        devices = jax.devices("cpu")
        if not 1 <= n <= len(devices):
            raise ConfigError(f"--topology={name!r}: {len(devices)} CPU devices here; simulate "
                              f"more with XLA_FLAGS=--xla_force_host_platform_device_count={n}")
        return devices[:n]
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(f"--topology={name!r} needs the TPU compiler: pip install libtpu (the "
                          "[tpu] extra) in an environment of its own, or use --topology=cpu:N")
    import os

    from jax.experimental import topologies

    # A compile-only client holds no chip: let several (two aot runs, a test) share libtpu.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except Exception as e:  # noqa: BLE001 - libtpu's own errors for an unknown topology
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--topology={name!r} is not a TPU topology libtpu knows ({first}); "
                          "e.g. v4:4x4x8, v5p:8x8x4, v5e:8x16, v6e:16x16") from None


def chip_of(devices) -> dict:
    """{'kind', 'chips', 'devices_per_chip', 'hbm_bytes_per_device', 'peak_flops_per_chip',
    'hbm_bandwidth_per_chip'} (None for kinds not in `CHIPS`, e.g. CPU)."""
    kind = devices[0].device_kind
    coords = {tuple(getattr(d, "coords", ()) or (d.id,)) for d in devices}
    per_chip = max(1, len(devices) // max(1, len(coords)))
    hbm, peak, bandwidth = CHIPS.get(kind, (None, None, None))
    return {"kind": kind, "chips": len(devices) // per_chip, "devices_per_chip": per_chip,
            "hbm_bytes_per_device": hbm // per_chip if hbm else None,
            "peak_flops_per_chip": peak, "hbm_bandwidth_per_chip": bandwidth}


def _memory(compiled) -> dict:
    mem = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes")
    m = {f: int(getattr(mem, f, 0) or 0) for f in fields}
    # Donated (aliased) state is counted once: arguments + outputs + temporaries - aliases.
    m["bytes_per_device"] = (m["argument_size_in_bytes"] + m["output_size_in_bytes"]
                             + m["temp_size_in_bytes"] - m["alias_size_in_bytes"])
    return m


def _cost(compiled) -> dict:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - a backend without cost analysis
        return {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def _summary(kind: str, devices, compiled, seconds: float, batch: int, model_flops: float
             ) -> dict[str, Any]:
    chip = chip_of(devices)
    mem, cost = _memory(compiled), _cost(compiled)
    hbm = chip["hbm_bytes_per_device"]
    optimal = cost.get("optimal_seconds")
    optimal = float(optimal) if optimal is not None and optimal > 0 else None
    source = "compiler" if optimal else None
    flops_dev, bytes_dev = cost.get("flops"), cost.get("bytes accessed")
    peak, bandwidth = chip["peak_flops_per_chip"], chip["hbm_bandwidth_per_chip"]
    if optimal is None and flops_dev and bytes_dev and peak and bandwidth:
        # The compiler gives no optimal time for some large programs: the roofline of its own
        # per-device FLOPs and bytes accessed (a device has 1 / devices_per_chip of a chip).
        share = chip["devices_per_chip"]
        optimal = max(flops_dev * share / peak, bytes_dev * share / bandwidth)
        source = "roofline of XLA's flops and bytes accessed"
    out = {"what": kind, "topology_kind": chip["kind"], "devices": len(devices),
           "chips": chip["chips"], "devices_per_chip": chip["devices_per_chip"],
           "global_batch": batch, **mem, "hbm_bytes_per_device": hbm,
           "fits": None if hbm is None else mem["bytes_per_device"] <= hbm,
           "flops_per_step": model_flops, "xla_flops_per_device": cost.get("flops"),
           "bytes_accessed_per_device": cost.get("bytes accessed"),
           "optimal_seconds": optimal, "optimal_seconds_source": source,
           "compile_seconds": round(seconds, 1)}
    if optimal:
        out["images_per_s_bound"] = batch / optimal
        if peak:  # model FLOPs over what the chips could do in the compiler's optimal time
            out["roofline_utilisation"] = model_flops / (optimal * peak * chip["chips"])
    return out


def _without_remat(cfg):
    """A copy of `cfg` whose model does not rematerialise (model.unet for an IF stage)."""
    c = copy.deepcopy(cfg)
    (c.model.unet if "unet" in c.model else c.model).remat = False
    return c


def compile_train_step(cfg, devices, *, text_cache: bool = False) -> dict:
    """Compiles `cfg`'s train step for `devices` (nothing allocated) and reports on it.

    Args:
      cfg: a stage config (its mesh is laid over `devices`).
      devices: e.g. `topology_devices('v4:4x4x8')`.
      text_cache: the batch holds cached T5 embeddings instead of token ids (no T5 in the
        step).

    Returns:
      memory per device, whether it fits the chip's HBM, the model FLOPs per step (analytic
      count of every conv and matmul of the step without remat; `flops_per_step_with_remat`
      counts what remat recomputes too), XLA's own cost analysis, the compiler's optimal time
      and the images/s and utilisation it bounds. A step too large for the chip comes back
      with "fits": False and the compiler's reason, not an exception.
    """
    from jaxt2i.bench.jobs import jaxpr_flops
    from jaxt2i.train import Trainer

    sds = jax.ShapeDtypeStruct

    def traced(trainer):
        args = (trainer.abstract_state, trainer.abstract_batch(text_cache),
                sds((), jax.random.key(0).dtype), sds((), jnp.int32))
        return args, float(jaxpr_flops(trainer.step_jaxpr(*args))["total"])

    trainer = Trainer(cfg, devices=devices, abstract=True)
    args, flops_remat = traced(trainer)
    # Model FLOPs: the same step without remat (what remat recomputes is not the model's work;
    # the count with it is the hardware's, reported beside).
    flops = (traced(Trainer(_without_remat(cfg), devices=devices, abstract=True))[1]
             if trainer.unet_cfg.remat else flops_remat)
    about = dict(mesh=dict(trainer.mesh.shape), params=trainer.num_params,  # fits or not
                 dtype=trainer.unet_cfg.dtype, remat=bool(trainer.unet_cfg.remat),
                 remat_policy=trainer.unet_cfg.remat_policy if trainer.unet_cfg.remat else None,
                 optimizer=cfg.train.optimizer, grad_accum=int(cfg.train.grad_accum),
                 text_in_step=not text_cache, flops_per_step_with_remat=flops_remat)
    t0 = time.perf_counter()
    try:
        compiled = trainer.lower_step(*args).compile()
    except Exception as e:  # noqa: BLE001 - the compiler's out-of-memory is an answer
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text and "exceeds" not in text.lower():
            raise
        chip = chip_of(devices)
        return {"what": "train_step", "topology_kind": chip["kind"], "devices": len(devices),
                "global_batch": int(cfg.train.batch_size), "fits": False,
                "hbm_bytes_per_device": chip["hbm_bytes_per_device"],
                "reason": text.strip().splitlines()[0][:300], "flops_per_step": flops,
                "compile_seconds": round(time.perf_counter() - t0, 1), **about}
    out = _summary("train_step", devices, compiled, time.perf_counter() - t0,
                   int(cfg.train.batch_size), flops)
    out.update(about)
    return out


def compile_sampler(cfg, devices, *, batch: int, steps: int | None = None) -> dict:
    """Compiles the stage's whole reverse process (its config's sampler and guidance) for a
    serving topology: params replicated, the batch split over every device."""
    import flax.linen as nn

    from jaxt2i.bench.jobs import jaxpr_flops
    from jaxt2i.parallel import make_mesh
    from jaxt2i.parallel.sharding import rules_from_config
    from jaxt2i.stage import Stage, StageConfig
    from jaxt2i.text.encoder import abstract_encoder

    stage_cfg = StageConfig.from_dict(cfg.to_dict(), where="--config")
    encoder = abstract_encoder(stage_cfg.text.encoder, dtype=stage_cfg.text.dtype,
                               max_length=stage_cfg.text.max_length)
    stage = Stage(stage_cfg, encoder=encoder)
    settings = stage_cfg.sample.replace(steps=steps)
    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)
    if batch % len(devices):
        raise ConfigError(f"--sample_batch ({batch}) must be divisible by the {len(devices)} "
                          "devices")
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data",)))
    params = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
        nn.unbox(jax.eval_shape(stage.init_params, jax.random.key(0))))
    c, L = stage_cfg.model, encoder.max_length
    sds = jax.ShapeDtypeStruct
    args = [params, sds((batch, L, c.text_dim), jnp.float32, sharding=split),
            sds((batch, L), jnp.bool_, sharding=split), sds((1, L, c.text_dim), jnp.float32,
                                                            sharding=rep),
            sds((1, L), jnp.bool_, sharding=rep), sds((), jax.random.key(0).dtype)]
    if c.is_sr:
        args.append(sds((batch, c.lowres_size, c.lowres_size, c.channels), jnp.float32,
                        sharding=split))

    def run(params, emb, mask, u_emb, u_mask, rng, lowres=None):
        return stage.sample(params, (emb, mask), (u_emb, u_mask), rng, lowres,
                            settings=settings)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules_from_config(cfg.sharding_rules)):
        flops = float(jaxpr_flops(jax.make_jaxpr(run)(*args))["total"])
        t0 = time.perf_counter()
        compiled = jax.jit(run).lower(*args).compile()
    out = _summary("sampler", devices, compiled, time.perf_counter() - t0, batch, flops)
    out.update(steps=settings.steps, sampler=settings.sampler, guidance=settings.guidance)
    return out


def format_report(r: dict) -> str:
    """A few human lines of a `compile_*` result."""
    def gib(b):
        if b is None:
            return "-"
        return f"{b / GiB:.2f} GiB" if b >= GiB / 10 else f"{b / (1 << 20):.1f} MiB"

    head = (f"{r['what']} on {r['devices']} x {r['topology_kind']}"
            + (f" (mesh {r['mesh']})" if r.get("mesh") else "") + f", global batch "
            f"{r['global_batch']}" + (f", remat policy {r['remat_policy']}"
                                      if r.get("remat_policy") else ""))
    if r.get("reason"):
        return (f"{head}\n  does not fit: {r['reason']}\n  HBM per device "
                f"{gib(r['hbm_bytes_per_device'])}")
    lines = [head,
             f"  per device: arguments {gib(r['argument_size_in_bytes'])}, temporaries "
             f"{gib(r['temp_size_in_bytes'])}, outputs {gib(r['output_size_in_bytes'])} "
             f"(aliased {gib(r['alias_size_in_bytes'])}), total {gib(r['bytes_per_device'])} "
             f"of {gib(r['hbm_bytes_per_device'])} HBM: "
             + {True: "fits", False: "DOES NOT FIT", None: "no HBM figure"}[r["fits"]],
             f"  model FLOPs per step {r['flops_per_step']:.3e}"
             + (f" ({r['flops_per_step_with_remat']:.3e} with what remat recomputes)"
                if r.get("flops_per_step_with_remat", r["flops_per_step"]) != r["flops_per_step"]
                else "") + f"; compiled in {r['compile_seconds']} s"]
    if r.get("optimal_seconds"):
        what = ("compiler's optimal time" if r.get("optimal_seconds_source") == "compiler"
                else "roofline time (XLA's flops and bytes accessed)")
        lines.append(f"  {what} {r['optimal_seconds'] * 1e3:.1f} ms -> at most "
                     f"{r['images_per_s_bound']:.0f} images/s"
                     + (f", roofline utilisation {100 * r['roofline_utilisation']:.1f}%"
                        if r.get("roofline_utilisation") is not None else ""))
    return "\n".join(lines)


__all__ = ["CHIPS", "chip_of", "compile_sampler", "compile_train_step", "format_report",
           "topology_devices"]
