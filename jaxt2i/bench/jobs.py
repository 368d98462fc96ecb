"""Benchmark jobs: each runs in its own child process (so peak RSS is per job) and returns a dict.

Jobs (see `JOBS`):
  train_base / train_sr  full train step (forward, backward, optimizer, EMA) of `bench_23m`
                         (64 px, batch 8) and `bench_sr22m` (64 -> 256 px, batch 4): compile time,
                         median step time after warm-up, images/s, model FLOPs (XLA's cost
                         analysis and an analytic count of every conv / matmul in the step's
                         jaxpr), the machine's matmul peak measured in the same process, MFU.
  sample_base / sample_sr  the stage's whole jitted sampler at batch 4 with classifier-free
                         guidance: compile time at 10 / 100 / 1000 steps and the per-step time
                         (difference of two step counts, so fixed per-call costs cancel).
  cascade                64 -> 256 cascade end to end through `Cascade.sample` (tokenizer, T5,
                         both stages), first call (with compilation) and steady state.
  memory_paper           XLA's compiled memory analysis of the paper's 2B base train step
                         (`paper_base64`, bfloat16, remat) on a simulated FSDP mesh: bytes per device.
  quality                the shapes evaluator on the demo cascade: DPM-Solver++(2M) at 25 steps vs
                         250-step ancestral sampling.
  train_demo_base / train_demo_sr  the demo stages' train steps at their configs' batch (the
                         data phase divides the input pipeline's rate by them); the data phase's
                         own jobs are in `data_jobs`.

Text conditioning is random [B, 32, 512] embeddings (like the imagen-pytorch anchor's
precomputed `text_embeds`); the frozen encoder inside the train step only embeds the empty
prompt, with a one-layer random T5 of width 512.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import time
from typing import Any, Callable

import numpy as np

from jaxt2i.bench import data_jobs

TEXT_LEN, TEXT_DIM = 32, 512
BATCH = {"train_base": 8, "train_sr": 4, "sample": 4,
         # the paper's 2B base on one accelerator: 2048 over 256 chips is 8 a chip; a GPU
         # with 141 GB holds more, and a fuller step measures its throughput
         "train_paper": 32}
# Dense bfloat16 peak FLOP/s by device kind (vendors' figures), for MFU of the device's peak.
NOMINAL_BF16_PEAK = {"NVIDIA H200": 989e12, "NVIDIA H100 80GB HBM3": 989e12,
                     "NVIDIA H100": 989e12, "NVIDIA A100-SXM4-80GB": 312e12}
GUIDANCE = 5.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def configs_dir() -> str:
    """The repository's configs/ (next to the jaxt2i package in a source checkout)."""
    import jaxt2i

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(jaxt2i.__file__))),
                        "configs")
    if not os.path.isdir(path):
        from jaxt2i.config import ConfigError

        raise ConfigError(f"configs/ not found at {path}; run the benchmarks from a source "
                          "checkout installed with `pip install -e .`")
    return path


# The benchmarked models, and the test-sized stand-ins of `--tiny` (smoke runs, the test suite).
SPECS = {"base": "base.py:size=bench_23m", "sr": "sr.py:size=bench_sr22m",
         "paper": "base.py:size=paper_base64",
         # the data phase's train steps: the shipped demo stages, their batch and optimizer
         "demo_base": "base.py:size=demo", "demo_sr": "sr.py:size=demo_sr"}
TINY_SPECS = {"base": "base.py:size=tiny", "sr": "sr.py:size=tiny_sr", "paper": "base.py:size=tiny",
              "demo_base": "base.py:size=tiny", "demo_sr": "sr.py:size=tiny_sr"}


def spec_of(kind: str, tiny: bool) -> str:
    return (TINY_SPECS if tiny else SPECS)[kind]


def stage_config(spec: str):
    """A stage config from 'base.py:size=bench_23m' style specs under configs/."""
    from jaxt2i.config import load_config_file

    cfg = load_config_file(os.path.join(configs_dir(), spec))
    cfg.text.max_length = TEXT_LEN if "paper" not in spec else cfg.text.max_length
    return cfg


def _median_times(fn: Callable[[], Any], warmup: int, iters: int) -> dict:
    import jax

    warm = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        warm.append(time.perf_counter() - t0)
    times = []
    c0 = time.process_time()
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "n": len(times), "warmup_s": [round(t, 3) for t in warm],
            "all_s": [round(t, 3) for t in times],
            "cpu_s_per_iter": (time.process_time() - c0) / max(iters, 1)}


def random_encoder(width: int = TEXT_DIM, max_length: int = TEXT_LEN):
    """A one-layer random T5 of `width` with the bundled tokenizer (embeds the empty prompt)."""
    from jaxt2i import assets
    from jaxt2i.text.encoder import init_encoder
    from jaxt2i.text.t5 import get_t5_config
    from jaxt2i.text.tokenizer import load_tokenizer

    tok = load_tokenizer(assets.text_encoder_dir(), max_length)
    cfg = get_t5_config("tiny", vocab_size=len(tok.hf.get_vocab()), d_model=width, d_kv=64,
                        num_heads=max(1, min(8, width // 64)), d_ff=min(width, 1024),
                        num_layers=1)
    return init_encoder(cfg, tok, seed=0)


def random_text(batch: int, dim: int = TEXT_DIM, length: int = TEXT_LEN, seed: int = 1):
    """[B, L, D] float32 embeddings with padding zeroed, [B, L] bool mask (8..L tokens)."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((batch, length, dim)).astype(np.float32)
    lens = rng.integers(min(8, length), length + 1, batch)
    mask = np.arange(length)[None, :] < lens[:, None]
    return emb * mask[..., None], mask


# --------------------------------------------------------------------------- FLOP counting
def _prod(xs) -> int:
    return int(math.prod(int(x) for x in xs))


def jaxpr_flops(jaxpr) -> dict:
    """Analytic FLOPs (2 x multiply-adds) of every conv and matmul in a (closed) jaxpr.

    Walks sub-jaxprs (jit, custom_vjp/jvp, remat, cond: the costliest branch; scan: times its
    length). Elementwise work is not counted: this is the model-FLOP count of MFU. Taps on
    SAME padding count (the convolution does them); XLA's cost analysis skips them, so its
    figure is a few percent lower on small feature maps.
    """
    from jax.extend import core as jex_core

    out = {"conv": 0, "matmul": 0, "unknown_loops": 0}

    def walk(jx, mult):
        jx = getattr(jx, "jaxpr", jx)
        for eqn in jx.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                (lc, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                out["matmul"] += mult * 2 * _prod(eqn.outvars[0].aval.shape) * _prod(
                    lhs[i] for i in lc)
            elif name == "conv_general_dilated":
                rhs = eqn.invars[1].aval.shape
                dn = eqn.params["dimension_numbers"]
                rhs_spec = dn.rhs_spec  # (out feature dim, in feature dim, *spatial dims)
                per_out = rhs[rhs_spec[1]] * _prod(rhs[d] for d in rhs_spec[2:])
                out["conv"] += mult * 2 * _prod(eqn.outvars[0].aval.shape) * per_out
            sub_mult = mult * (eqn.params["length"] if name == "scan" else 1)
            if name == "while":
                out["unknown_loops"] += 1
            for key, val in eqn.params.items():
                if key == "branches":  # cond: count the costliest branch
                    costs = [jaxpr_flops(b) for b in val]
                    best = max(costs, key=lambda c: c["conv"] + c["matmul"])
                    out["conv"] += mult * best["conv"]
                    out["matmul"] += mult * best["matmul"]
                elif isinstance(val, (jex_core.ClosedJaxpr, jex_core.Jaxpr)):
                    walk(val, sub_mult)

    walk(jaxpr, 1)
    out["total"] = out["conv"] + out["matmul"]
    return out


def xla_flops(compiled) -> float | None:
    """FLOPs of a compiled executable from XLA's cost analysis (None if unavailable)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # pylint: disable=broad-except  # backend without cost analysis
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def matmul_peak(dtype: str = "float32", n: int | None = None, iters: int = 20) -> dict:
    """Measured matmul throughput (FLOP/s) of an n x n matmul on the default device: the best
    of `iters` runs (a peak; the median moves with other load on a small machine)."""
    import jax
    import jax.numpy as jnp

    gpu = jax.default_backend() not in ("cpu",)
    n = n or (8192 if gpu else 2048)
    dt = jnp.dtype(dtype)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dt)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dt)
    f = jax.jit(lambda x, y: x @ y)
    t = _median_times(lambda: f(a, b), warmup=2, iters=iters)
    return {"n": n, "dtype": str(dt), "median_s": t["median_s"], "min_s": t["min_s"],
            "flops_per_s": 2 * n**3 / t["min_s"]}


# ------------------------------------------------------------------------------- jobs
def job_train(which: str, quick: bool, tiny: bool = False, dtype: str | None = None) -> dict:
    """Compile + steady-state time of the full train step, FLOPs, matmul peak and MFU.

    `train_paper` is the paper's 2B base step (its own optimizer, bfloat16 and remat) at a
    one-accelerator batch; `dtype` overrides the U-Net's compute dtype of the others.
    `train_demo_base` / `train_demo_sr` are the demo stages as their configs train them
    (batch, optimizer), for the data phase: time only, no FLOPs or MFU."""
    import jax
    import jax.numpy as jnp

    from jaxt2i.data.pipeline import to_global_array
    from jaxt2i.train import Trainer

    spec = spec_of(which.removeprefix("train_"), tiny)
    cfg = stage_config(spec)
    demo = which.startswith("train_demo_")
    b = (cfg.train.batch_size if demo else BATCH[which] if not (tiny and which == "train_paper")
         else 4)
    cfg.train.batch_size = b
    if which == "train_paper":  # the paper's numerics (the tiny stand-in gets them too)
        cfg.model.dtype, cfg.model.remat = "bfloat16", True
        cfg.text.max_length = TEXT_LEN  # random [B, 32, D] embeddings, as for the others
    elif not demo:
        cfg.train.optimizer, cfg.train.lr, cfg.train.b2 = "adamw", 1e-4, 0.99  # the anchor's Adam
    if dtype:
        cfg.model.dtype = dtype
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 1, 1
    trainer = Trainer(cfg, random_encoder(cfg.model.text_dim), devices=jax.devices()[:1])
    c = trainer.unet_cfg
    rng = np.random.default_rng(2)
    emb, mask = random_text(b, c.text_dim)
    batch = {"image": rng.uniform(-1, 1, (b, c.image_size, c.image_size, 3)).astype(np.float32),
             "text_emb": emb, "text_mask": mask}
    if trainer.is_sr:
        batch["lowres"] = rng.uniform(-1, 1, (b, c.lowres_size, c.lowres_size, 3)).astype(
            np.float32)
    batch = to_global_array(batch, trainer.mesh)
    key = jax.random.key(3)
    state = trainer.init_state(0)
    args = (state, batch, key, jnp.int32(0))
    t0 = time.perf_counter()
    lowered = trainer.lower_step(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    analytic = None if demo else jaxpr_flops(trainer.step_jaxpr(*args))  # before donation
    holder = {"state": state}

    def step():
        holder["state"], m = compiled(*trainer.step_args(holder["state"], batch, key,
                                                         jnp.int32(0)))
        return m["loss"]

    warmup, iters = (1, 3) if quick else (2, 8)
    times = _median_times(step, warmup, iters)
    if demo:  # what the step reaches on this CPU, for the data phase's data / train ratio
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
        # every core busy for the step's CPU time: the idle-machine rate it cannot beat (on a
        # shared machine the wall-clock rate is lower, and would flatter the ratio)
        bound = b * cores / times["cpu_s_per_iter"]
        return {"model": spec, "batch": b, "image_size": c.image_size, "dtype": c.dtype,
                "optimizer": cfg.train.optimizer, "compile_s": round(t2 - t0, 2), **times,
                "cores": cores, "wall_images_per_s": b / times["median_s"],
                "cpu_bound_images_per_s": bound,
                "images_per_s": max(b / times["median_s"], bound),
                "peak_rss_mb": round(peak_rss_mb(), 1)}
    peak = matmul_peak(c.dtype if c.dtype != "float32" else "float32")
    hw = xla_flops(compiled)
    med = times["median_s"]
    kind = str(jax.devices()[0].device_kind)
    return {
        "model": spec, "params": trainer.num_params,
        "batch": b, "image_size": c.image_size,
        "dtype": c.dtype, "device": str(jax.devices()[0].device_kind),
        "compile_s": round(t2 - t0, 2), "trace_lower_s": round(t1 - t0, 2),
        **times, "images_per_s": b / med,
        "flops_analytic": analytic["total"], "flops_conv": analytic["conv"],
        "flops_matmul": analytic["matmul"], "flops_xla": hw,
        "xla_over_analytic": (hw / analytic["total"]) if hw else None,
        "achieved_flops_per_s": analytic["total"] / med,
        "peak_flops_per_s": peak["flops_per_s"], "peak_matmul": peak,
        "mfu": analytic["total"] / med / peak["flops_per_s"],
        "mfu_of_nominal_peak": (analytic["total"] / med / NOMINAL_BF16_PEAK[kind]
                                if c.dtype == "bfloat16" and kind in NOMINAL_BF16_PEAK else None),
        "optimizer": cfg.train.optimizer, "remat": bool(c.remat),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def _bench_stage(spec: str, seed: int, image_size: int | None = None):
    """A `Stage` with random params for a configs/ spec (the bench models are never trained)."""
    import jax

    import flax.linen as nn

    from jaxt2i.stage import Stage, StageConfig

    cfg = stage_config(spec)
    if image_size:
        cfg.model.image_size = image_size
    stage = Stage(StageConfig.from_dict(cfg.to_dict(), where=spec), path=f"<random {spec}>",
                  step=0)
    stage.params = nn.unbox(jax.jit(stage.init_params)(jax.random.key(seed, impl="rbg")))
    return stage


def _bench_stages(tiny: bool, sr: bool) -> list:
    """[base] or [base, SR] with random params; the base makes the SR stage's input size."""
    if not sr:
        return [_bench_stage(spec_of("base", tiny), 0)]
    up = _bench_stage(spec_of("sr", tiny), 1)
    return [_bench_stage(spec_of("base", tiny), 0, up.unet_cfg.lowres_size), up]


def job_sample(which: str, quick: bool, tiny: bool = False) -> dict:
    """Per-step sampler time at batch 4 with guidance, and compile time vs step count."""
    import jax
    import jax.numpy as jnp

    from jaxt2i.cascade import Cascade, StageSettings

    stages = _bench_stages(tiny, sr=which != "sample_base")
    encoder = random_encoder(stages[0].unet_cfg.text_dim)
    cascade = Cascade(stages, encoder)
    k = len(stages) - 1
    st = stages[k]
    b = BATCH["sample"]
    emb, mask = (jnp.asarray(a) for a in random_text(b, st.unet_cfg.text_dim))
    lowres = None
    if st.is_sr:
        low = st.unet_cfg.lowres_size
        lowres = jax.random.uniform(jax.random.key(5), (b, low, low, 3), jnp.float32, -1, 1)
    fn = cascade.stage_fn(k)
    args = (st.params, emb, mask, *cascade.uncond, jax.random.key(4), lowres)

    def compile_at(steps, guidance=GUIDANCE):
        settings = StageSettings("ddpm", steps, guidance, "dynamic", 0.2)
        t0 = time.perf_counter()
        lowered = fn.lower(*args, settings=settings)
        compiled = lowered.compile()
        return compiled, time.perf_counter() - t0

    if st.is_sr:
        counts = (1, 3) if quick else (2, 6)
        compile_counts = counts
    else:
        counts = (5, 25) if quick else (10, 50)
        compile_counts = (10, 100) if quick else (10, 100, 1000)
    compiled, compile_s = {}, {}
    for n in sorted(set(counts) | set(compile_counts)):
        compiled[n], compile_s[n] = compile_at(n)
    iters = 1
    runs = {n: _median_times(lambda n=n: compiled[n](*args), 1, iters) for n in counts}
    lo, hi = counts
    per_step = (runs[hi]["median_s"] - runs[lo]["median_s"]) / (hi - lo)
    out = {"model": st.path, "params": sum(int(np.prod(a.shape))
                                          for a in jax.tree_util.tree_leaves(st.params)),
           "batch": b, "image_size": st.unet_cfg.image_size, "guidance": GUIDANCE,
           "sampler": "ddpm (ancestral), dynamic thresholding",
           "compile_s": {str(n): round(s, 2) for n, s in compile_s.items()},
           "runs": {str(n): r for n, r in runs.items()}, "s_per_step": per_step,
           "compile_ratio_max_over_min_steps": (compile_s[max(compile_s)] / compile_s[min(compile_s)])}
    if not st.is_sr and not quick:  # one forward per step: no guidance
        plain = {}
        for n in counts:
            c1, _ = compile_at(n, guidance=1.0)
            plain[n] = _median_times(lambda c1=c1: c1(*args), 1, iters)["median_s"]
        out["s_per_step_no_guidance"] = (plain[hi] - plain[lo]) / (hi - lo)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return out


def job_cascade(quick: bool, steps: int = 4, tiny: bool = False) -> dict:
    """The public path end to end: Cascade.sample through the 64 -> 256 cascade."""
    from jaxt2i.cascade import Cascade, StageSettings

    del quick
    stages = _bench_stages(tiny, sr=True)
    encoder = random_encoder(stages[0].unet_cfg.text_dim)
    cascade = Cascade(stages, encoder)
    settings = [StageSettings("ddpm", steps, GUIDANCE, "dynamic", 0.2) for _ in stages]
    prompts = ["a red circle above a blue square", "two green triangles", "a yellow star",
               "a large purple cross on a black background"]
    t0 = time.perf_counter()
    images = cascade.sample(prompts, seed=0, settings=settings)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    images = cascade.sample(prompts, seed=1, settings=settings)
    steady = time.perf_counter() - t0
    size = stages[-1].unet_cfg.image_size
    assert images.shape == (4, size, size, 3), images.shape
    return {"batch": 4, "steps_per_stage": steps, "guidance": GUIDANCE, "first_call_s": first,
            "total_s": steady, "output_shape": list(images.shape),
            "peak_rss_mb": round(peak_rss_mb(), 1)}


def job_memory_paper(quick: bool, batch: int | None = None, tiny: bool = False) -> dict:
    """Compiled memory of the paper base train step (bf16, remat) on an FSDP mesh of the
    visible devices: nothing is allocated, XLA reports what one device would hold."""
    import jax
    import jax.numpy as jnp

    from jaxt2i.train import Trainer

    del quick
    n = jax.device_count()
    cfg = stage_config(spec_of("paper", tiny))
    if tiny:  # the paper's numerics on the test-sized model
        cfg.model.dtype, cfg.model.remat, cfg.train.optimizer = "bfloat16", True, "adafactor"
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, n, 1
    b = batch or 8 * n  # a pod-scale per-device batch (the paper: 2048 over hundreds of chips)
    cfg.train.batch_size = b
    L, D = cfg.text.max_length, cfg.model.text_dim
    encoder = random_encoder(D, L)
    trainer = Trainer(cfg, encoder)
    c = trainer.unet_cfg
    sds = jax.ShapeDtypeStruct
    batch_abs = {"image": sds((b, c.image_size, c.image_size, 3), jnp.float32),
                 "text_emb": sds((b, L, D), jnp.bfloat16), "text_mask": sds((b, L), jnp.bool_)}
    batch_sh = jax.sharding.NamedSharding(trainer.mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    batch_abs = {k: sds(v.shape, v.dtype, sharding=batch_sh) for k, v in batch_abs.items()}
    t0 = time.perf_counter()
    compiled = trainer.lower_step(trainer.abstract_state, batch_abs,
                                  sds((), jax.random.key(0).dtype), sds((), jnp.int32)).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes")
    m = {f: int(getattr(mem, f, 0) or 0) for f in fields}
    per_device = (m["argument_size_in_bytes"] + m["output_size_in_bytes"]
                  + m["temp_size_in_bytes"] - m["alias_size_in_bytes"])
    state_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize
                      for a in jax.tree_util.tree_leaves(trainer.abstract_state))
    return {"model": spec_of("paper", tiny), "params": trainer.num_params, "dtype": c.dtype,
            "remat": bool(c.remat), "devices": n, "mesh": dict(trainer.mesh.shape),
            "global_batch": b, "per_device_batch": b // n, "compile_s": round(compile_s, 1),
            **m, "bytes_per_device": per_device, "train_state_bytes_total": state_bytes,
            "peak_rss_mb": round(peak_rss_mb(), 1)}


# The samplers `quality` compares at equal step counts, against DPM-Solver++(2M) at 25 steps.
QUALITY_SAMPLERS = ("dpmpp_2m", "dpmpp_3m", "heun", "euler", "ddim")
QUALITY_STEPS = (10, 15)


def job_quality(quick: bool, num_prompts: int | None = None, stages: int | None = None,
                report=None, samplers=None, steps_list=None) -> dict:
    """Shapes-evaluator scores of the demo cascade: each of `samplers` (default
    `QUALITY_SAMPLERS`; quick: DPM-Solver++ 2M / 3M) at each of `steps_list` steps (default
    `QUALITY_STEPS`; quick: 10) against DPM-Solver++(2M) at 25 steps, the same prompts and
    seeds for all; `nfe` counts the base stage's denoiser calls (`denoiser_evaluations`)."""
    from jaxt2i.assets import demo_cascade_dir
    from jaxt2i.cascade import load_cascade
    from jaxt2i.diffusion import denoiser_evaluations
    from jaxt2i.eval.evaluate import evaluate_cascade

    cascade = load_cascade([demo_cascade_dir()])
    n = num_prompts or (8 if quick else 200)
    k = stages or len(cascade.stages)
    samplers = samplers or (("dpmpp_2m", "dpmpp_3m") if quick else QUALITY_SAMPLERS)
    runs = [("dpmpp_2m", 25)] + [(s, steps) for steps in (steps_list or ((10,) if quick
                                                                         else QUALITY_STEPS))
                                 for s in samplers]
    base = cascade.stages[0]
    rows = []
    out = {"num_prompts_per_split": n, "stages": k, "rows": rows}
    for sampler, steps in runs:
        settings = cascade.settings([{"sampler": sampler, "steps": steps}] * k, num_stages=k)
        r = evaluate_cascade(cascade, splits=("held_out", "test"), num_prompts=n,
                             settings=settings, num_stages=k, progress=False)
        rows.append({"name": f"{sampler}_{steps}", "sampler": sampler, "steps": steps,
                     "nfe": denoiser_evaluations(base.schedule, sampler, steps,
                                                 settings[0].spacing),
                     "results": r["results"], "seconds": r["seconds"]})
        out.update(image_size=r["image_size"], peak_rss_mb=round(peak_rss_mb(), 1))
        if report is not None:  # what is done survives a timeout
            report({**out, "partial": f"{len(rows)} of {len(runs)} runs"})
    return out


JOBS = {
    "train_base": lambda q, o: job_train("train_base", q, o.get("tiny", False), o.get("dtype")),
    "train_sr": lambda q, o: job_train("train_sr", q, o.get("tiny", False), o.get("dtype")),
    "train_paper": lambda q, o: job_train("train_paper", q, o.get("tiny", False)),
    "train_demo_base": lambda q, o: job_train("train_demo_base", q, o.get("tiny", False)),
    "train_demo_sr": lambda q, o: job_train("train_demo_sr", q, o.get("tiny", False)),
    "sample_base": lambda q, o: job_sample("sample_base", q, o.get("tiny", False)),
    "sample_sr": lambda q, o: job_sample("sample_sr", q, o.get("tiny", False)),
    "cascade": lambda q, o: job_cascade(q, o.get("cascade_steps", 4), o.get("tiny", False)),
    "memory_paper": lambda q, o: job_memory_paper(q, o.get("memory_batch"), o.get("tiny", False)),
    "quality": lambda q, o: job_quality(q, o.get("quality_prompts"), o.get("quality_stages"),
                                        o.get("report"), o.get("quality_samplers"),
                                        o.get("quality_steps")),
    **{job: (lambda job: lambda q, o: data_jobs.run(job, q, o))(job) for job in data_jobs.JOBS},
}
