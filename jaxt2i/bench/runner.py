"""Running the benchmark phases: each job in its own child process, the imagen-pytorch anchor
beside it, and the tables and JSON records of the report. `python -m jaxt2i.bench` parses its
flags and calls `run_benchmarks`.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

from jaxt2i.bench import data_jobs
from jaxt2i.config import ConfigError

PHASES = ("train", "sample", "compile", "mfu", "memory", "quality", "paper", "data")
DEFAULT_PHASES = ("train", "sample", "compile", "mfu", "memory")
DATA_TRAIN_JOBS = ("train_demo_base", "train_demo_sr")  # --nodata_vs_train leaves them out
# The jobs each phase needs (a job runs once per invocation and serves every phase).
PHASE_JOBS = {
    "train": ("train_base", "train_sr"),
    "sample": ("sample_base", "sample_sr", "cascade"),
    "compile": ("train_base", "train_sr", "sample_base", "sample_sr"),
    "mfu": ("train_base", "train_sr"),
    "memory": ("memory_paper",),
    "quality": ("quality",),
    "paper": ("train_paper",),  # the 2B base step on one accelerator (GPU runs; --tiny on CPU)
    # input throughput per core vs the demo stages' train steps (not in the default set: it
    # writes and builds a dataset, and compiles two more train steps)
    "data": (*data_jobs.JOBS, *DATA_TRAIN_JOBS),
}
# Our job -> the anchor script's phase measuring the same thing.
ANCHOR_PHASE = {"train_base": "train_base", "train_sr": "train_sr", "sample_base": "sample_base",
                "sample_sr": "sample_sr", "cascade": "sample_cascade_e2e"}
ANCHOR_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagen_pytorch_bench.py")
CHILD_TAG = "BENCH_CHILD_JSON "


def _host() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": cpu, "nproc": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "jaxt2i"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def run_child(job: str, opts: dict, timeout: int) -> dict:
    """Runs one of our jobs in a fresh process; returns its dict or {'error': ...}."""
    env = dict(os.environ)
    if job == "memory_paper":
        kept = [f for f in env.get("XLA_FLAGS", "").split()
                if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(kept + ["--xla_force_host_platform_device_count="
                                            f"{opts['memory_devices']}"])
        env["JAX_PLATFORMS"] = "cpu"  # a simulated mesh: the compile happens on the host
    cmd = [sys.executable, "-m", "jaxt2i.bench", f"--job={job}",
           f"--cascade_steps={opts['cascade_steps']}", f"--memory_batch={opts['memory_batch'] or 0}",
           f"--quality_prompts={opts['quality_prompts'] or 0}",
           f"--quality_stages={opts.get('quality_stages') or 0}",
           f"--quality_samplers={','.join(opts.get('quality_samplers') or ())}",
           f"--quality_steps={','.join(map(str, opts.get('quality_steps') or ()))}"]
    cmd += (["--quick"] if opts["quick"] else []) + (["--tiny"] if opts.get("tiny") else [])
    cmd += [f"--bench_data_dir={opts['bench_data_dir']}"] if opts.get("bench_data_dir") else []
    return _run(cmd, env, timeout, CHILD_TAG, lambda d: d)


def run_anchor(phase: str, script: str, quick: bool, timeout: int,
               python: str | None = None) -> dict:
    """Runs the imagen-pytorch anchor's `phase` in a fresh process (of `python`)."""
    cmd = [python or sys.executable, script, "--phase", phase] + (["--quick"] if quick else [])
    return _run(cmd, dict(os.environ), timeout, "CHILD_JSON ",
                lambda d: {**d[phase], "_meta": d.get("_meta", {})})


def _run(cmd, env, timeout, tag, pick) -> dict:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        error = {"error": f"timed out after {timeout} s: {' '.join(cmd)}"}
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        lines = [ln for ln in out.splitlines() if ln.startswith(tag)]
        if lines:  # a job that reports as it goes (quality): keep what it finished
            return {**pick(json.loads(lines[-1][len(tag):])), **error}
        return error
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(tag)]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        error = {"error": f"exit {p.returncode}: " + " | ".join(tail)}
        # a job killed or failed part way keeps what it reported, like a timed-out one
        return {**pick(json.loads(lines[-1][len(tag):])), **error} if lines else error
    out = pick(json.loads(lines[-1][len(tag):]))
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


ANCHOR_INSTALL = ("python3 -m venv .venv-anchor && .venv-anchor/bin/pip install torch==2.13.0 "
                  "torchvision==0.28.0 imagen-pytorch==2.1.0")


def _anchor_ready(script: str, python: str | None = None) -> str | None:
    """Why the anchor cannot run (one line), or None."""
    if not os.path.exists(script):
        return f"--imagen_pytorch_script {script!r} does not exist"
    if python is not None and not (os.path.isfile(python) and os.access(python, os.X_OK)):
        return f"--anchor_python {python!r} is not an executable Python"
    if os.path.abspath(script) != ANCHOR_SCRIPT:
        return None  # another copy of the anchor (or a stand-in): it brings its own environment
    probe = ("import importlib.util as u; print(','.join(m for m in ('torch', 'imagen_pytorch') "
             "if u.find_spec(m) is None))")
    p = subprocess.run([python or sys.executable, "-c", probe], capture_output=True, text=True,
                       timeout=120)
    missing = p.stdout.strip()
    if p.returncode != 0 or missing:
        return (f"--vs-imagen-pytorch needs {missing or 'torch, imagen_pytorch'} in "
                f"{python or sys.executable}; make an environment of its own ({ANCHOR_INSTALL}) "
                "and pass --anchor_python=.venv-anchor/bin/python")
    return None


# ---------------------------------------------------------------------------- reporting
def _fmt(v, unit=""):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}{unit}"
    return f"{v}{unit}"


def _ratio(a, b):
    return (a / b) if (a and b) else None


def _table(title: str, header: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in header]] + [[_fmt(c) if not isinstance(c, str) else c for c in r]
                                           for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths)))
    out = [f"== {title}", line(cells[0]), "-" * len(line(cells[0]))]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def report(phase: str, ours: dict, theirs: dict) -> tuple[str, dict]:
    """(table text, JSON record) of one phase from the job results."""
    g = lambda job, key: (ours.get(job) or {}).get(key)
    t = lambda job, key: (theirs.get(job) or {}).get(key)
    rec: dict = {"bench": "jaxt2i", "phase": phase}
    if phase == "train":
        rows = []
        for job in ("train_base", "train_sr"):
            o = ours.get(job, {})
            th = theirs.get(job, {})
            rec[job] = {k: o.get(k) for k in ("params", "batch", "image_size", "median_s",
                                               "images_per_s", "peak_rss_mb", "error")}
            if theirs:
                rec[job]["imagen_pytorch"] = {k: th.get(k) for k in (
                    "params", "median_s", "images_per_s", "peak_rss_mb", "error")}
                rec[job]["speedup"] = _ratio(o.get("images_per_s"), th.get("images_per_s"))
            rows.append([job, o.get("params"), o.get("batch"), o.get("median_s"),
                         o.get("images_per_s"), th.get("images_per_s") if theirs else None,
                         rec[job].get("speedup"), o.get("peak_rss_mb"),
                         th.get("peak_rss_mb") if theirs else None])
        text = _table("train: full step (fwd + bwd + Adam + EMA), medians after warm-up",
                      ["job", "params", "batch", "s/step", "img/s", "img/s torch", "x vs torch",
                       "RSS MB", "RSS torch"], rows)
    elif phase == "sample":
        rows = []
        for job, key, tkey in (("sample_base", "s_per_step", "cfg5_standard"),
                               ("sample_base", "s_per_step_no_guidance", "no_cfg"),
                               ("sample_sr", "s_per_step", "cfg5_standard")):
            mine = g(job, key)
            other = ((t(job, tkey) or {}).get("median_s")) if theirs else None
            name = f"{job}{' (no guidance)' if 'no_g' in key else ' (guidance 5)'}"
            rec[name] = {"s_per_step": mine, "imagen_pytorch_s_per_step": other,
                         "speedup": _ratio(other, mine)}
            rows.append([name, g(job, "batch"), g(job, "image_size"), mine, other,
                         rec[name]["speedup"]])
        e2e_t = t("cascade", "total_s") if theirs else None
        rec["cascade"] = {"steps_per_stage": g("cascade", "steps_per_stage"),
                          "total_s": g("cascade", "total_s"),
                          "first_call_s": g("cascade", "first_call_s"),
                          "imagen_pytorch_total_s": e2e_t,
                          "speedup": _ratio(e2e_t, g("cascade", "total_s"))}
        rows.append([f"cascade, {g('cascade', 'steps_per_stage')} steps/stage (s per call)",
                     4, (g("cascade", "output_shape") or [None, None])[1], g("cascade", "total_s"), e2e_t, rec["cascade"]["speedup"]])
        text = _table("sample: seconds per sampler step at batch 4 (cascade: seconds per call, "
                      f"first call with compilation {_fmt(g('cascade', 'first_call_s'))} s)",
                      ["what", "batch", "px", "ours s", "torch s", "x vs torch"], rows)
    elif phase == "compile":
        rows = []
        for job in ("train_base", "train_sr"):
            rows.append([f"{job} step", _fmt(g(job, "compile_s")), ""])
            rec[job] = {"compile_s": g(job, "compile_s")}
        for job in ("sample_base", "sample_sr"):
            cs = g(job, "compile_s") or {}
            rows.append([f"{job} sampler", ", ".join(f"{k} steps: {_fmt(cs[k])}"
                                                     for k in sorted(cs, key=int)),
                         g(job, "compile_ratio_max_over_min_steps")])
            rec[job] = {"compile_s_by_steps": cs,
                        "ratio_max_over_min": g(job, "compile_ratio_max_over_min_steps")}
        text = _table("compile: seconds (train step; sampler by step count, one lax.scan)",
                      ["what", "seconds", "most / fewest steps"], rows)
    elif phase == "mfu":
        rows = []
        for job in ("train_base", "train_sr"):
            o = ours.get(job, {})
            if not o:
                continue
            rec[job] = {k: o.get(k) for k in (
                "flops_analytic", "flops_xla", "xla_over_analytic", "median_s",
                "achieved_flops_per_s", "peak_flops_per_s", "mfu", "device", "error")}
            rows.append([job, (o.get("flops_analytic") or 0) / 1e9 or None,
                         (o.get("flops_xla") or 0) / 1e9 or None, o.get("xla_over_analytic"),
                         o.get("median_s"), (o.get("achieved_flops_per_s") or 0) / 1e9 or None,
                         (o.get("peak_flops_per_s") or 0) / 1e9 or None,
                         f"{100 * o['mfu']:.1f}%" if o.get("mfu") else "-"])
        text = _table("mfu: model FLOPs per step / step time / measured matmul peak (same process)",
                      ["job", "GFLOP", "GFLOP xla", "xla/ana", "s/step", "GFLOP/s",
                       "peak GFLOP/s", "MFU"], rows)
    elif phase == "memory":
        rows = []
        for job, o in ours.items():
            if job != "memory_paper":
                rows.append([f"{job}: peak RSS MB", o.get("peak_rss_mb"),
                             (theirs.get(job) or {}).get("peak_rss_mb") if theirs else None])
        m = ours.get("memory_paper", {})
        rec["peak_rss_mb"] = {job: o.get("peak_rss_mb") for job, o in ours.items()}
        if theirs:
            rec["imagen_pytorch_peak_rss_mb"] = {j: o.get("peak_rss_mb") for j, o in theirs.items()}
        rec["paper_base64"] = {k: m.get(k) for k in (
            "model", "params", "dtype", "remat", "devices", "global_batch", "per_device_batch",
            "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "alias_size_in_bytes", "bytes_per_device", "train_state_bytes_total", "compile_s",
            "error")}
        gib = lambda v: (v / 2**30) if isinstance(v, (int, float)) else None
        rows.append([f"{m.get('model', 'paper_base64')} train step, {m.get('devices')} devices FSDP, batch "
                     f"{m.get('global_batch')} ({m.get('per_device_batch')}/device): GiB/device",
                     gib(m.get("bytes_per_device")), None])
        rows.append(["  of which temporaries (activations) GiB", gib(m.get("temp_size_in_bytes")),
                     None])
        rows.append(["  train state (params + EMA + Adam), all devices GiB",
                     gib(m.get("train_state_bytes_total")), None])
        if m.get("error"):
            rows.append([f"  error: {m['error'][:100]}", None, None])
        text = _table("memory", ["what", "ours", "torch"], rows)
    elif phase == "paper":
        o = ours.get("train_paper", {})
        rec["train_paper"] = {k: o.get(k) for k in (
            "model", "params", "batch", "image_size", "dtype", "remat", "optimizer", "device",
            "compile_s", "median_s", "images_per_s", "flops_analytic", "achieved_flops_per_s",
            "peak_flops_per_s", "mfu", "mfu_of_nominal_peak", "peak_rss_mb", "error")}
        pct = lambda v: f"{100 * v:.1f}%" if v else "-"  # noqa: E731
        rows = [[o.get("model"), o.get("params"), o.get("batch"), o.get("dtype"),
                 o.get("median_s"), o.get("images_per_s"),
                 (o.get("achieved_flops_per_s") or 0) / 1e12 or None, pct(o.get("mfu")),
                 pct(o.get("mfu_of_nominal_peak"))]]
        text = _table("paper: the 2B base train step on one device (its optimizer, bf16, remat)",
                      ["model", "params", "batch", "dtype", "s/step", "img/s", "TFLOP/s",
                       "MFU (measured peak)", "MFU (nominal bf16 peak)"], rows)
    elif phase == "data":
        text, fields = data_jobs.report(ours, _table)
        rec.update(fields)
    else:  # quality
        q = ours.get("quality", {})
        rows = []
        for run in q.get("rows") or []:
            for split, r in run["results"].items():
                rows.append([f"{run['sampler']} {run['steps']} ({run['nfe']} calls) {split}",
                             *[None if r.get(k) is None else 100 * r[k]
                               for k in ("colour", "shape", "count", "relation", "whole")],
                             run["seconds"]])
        rec.update({k: q.get(k) for k in ("num_prompts_per_split", "stages", "image_size",
                                          "rows", "error")})
        text = _table(f"quality: shapes evaluator on the demo cascade, {q.get('stages')} stage(s), "
                      f"{q.get('image_size')} px, {q.get('num_prompts_per_split')} prompts per "
                      "split (% correct)",
                      ["sampler steps split", "colour", "shape", "count", "relation", "whole",
                       "s"], rows)
    errors = {j: o["error"] for j, o in {**ours, **{f"imagen_pytorch:{k}": v for k, v in
                                                   theirs.items()}}.items()
              if isinstance(o, dict) and o.get("error")}
    if errors:
        rec["errors"] = errors
    return text, rec


def run_job(job: str, quick: bool, opts: dict) -> dict:
    """Runs one job in this process (the child side of `run_child`). Jobs that report partial
    results as they go (`opts['report']`) print them tagged like the final one, so a job
    stopped by the timeout still gives what it finished."""
    from jaxt2i.bench.jobs import JOBS

    if job not in JOBS:
        raise ConfigError(f"unknown --job {job!r}; one of {', '.join(JOBS)}")
    report = lambda partial: print(CHILD_TAG + json.dumps(partial), flush=True)  # noqa: E731
    return JOBS[job](quick, {**opts, "report": report})


def run_benchmarks(phases, opts: dict, *, quick: bool, timeout: int,
                   vs_imagen_pytorch: bool = False, anchor_script: str = ANCHOR_SCRIPT,
                   anchor_python: str | None = None, json_path: str | None = None) -> list[dict]:
    """Runs the jobs the `phases` need, one child process at a time (with the anchor's
    matching phase after each when `vs_imagen_pytorch`), prints each phase's table and JSON
    line, and returns the records (also written to `json_path`). Raises SystemExit naming the
    jobs that failed, after reporting the others."""
    phases = [p.strip() for p in phases if p.strip()]
    bad = [p for p in phases if p not in PHASES]
    if bad or not phases:
        raise ConfigError(f"--phases {','.join(phases)!r}: unknown {bad}; choose from "
                          f"{', '.join(PHASES)}")
    if vs_imagen_pytorch:
        why = _anchor_ready(anchor_script, anchor_python)
        if why:
            raise ConfigError(why)
    jobs = []
    for p in phases:
        jobs += [j for j in PHASE_JOBS[p] if j not in jobs]
    if not opts.get("data_vs_train", True):
        jobs = [j for j in jobs if j not in DATA_TRAIN_JOBS]
    ours, theirs = {}, {}
    started = time.perf_counter()
    scratch = None
    if "data" in phases and not opts.get("bench_data_dir"):  # its shards and dataset
        scratch = tempfile.mkdtemp(prefix="jaxt2i_bench_data_")
        opts = {**opts, "bench_data_dir": scratch}
    try:
        for i, job in enumerate(jobs):
            print(f"[{i + 1}/{len(jobs)}] {job} ...", file=sys.stderr, flush=True)
            ours[job] = run_child(job, opts, timeout)
            print(f"    ours: {ours[job].get('wall_s', '-')} s"
                  + (f"  ERROR {ours[job]['error']}" if "error" in ours[job] else ""),
                  file=sys.stderr, flush=True)
            if vs_imagen_pytorch and job in ANCHOR_PHASE:
                theirs[job] = run_anchor(ANCHOR_PHASE[job], anchor_script, quick, timeout,
                                         anchor_python)
                print(f"    imagen-pytorch: {theirs[job].get('wall_s', '-')} s"
                      + (f"  ERROR {theirs[job]['error']}" if "error" in theirs[job] else ""),
                      file=sys.stderr, flush=True)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "host": _host(), "versions": _versions(),
            "quick": quick, "total_s": round(time.perf_counter() - started, 1)}
    if theirs:
        meta["imagen_pytorch"] = next((v.get("_meta") for v in theirs.values() if v.get("_meta")),
                                      None)
    records = []
    for p in phases:
        text, rec = report(p, ours, theirs)
        rec["meta"] = meta
        print(text)
        print(json.dumps(rec, default=str), flush=True)
        print()
        records.append(rec)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "phases": records, "jobs": ours,
                       "imagen_pytorch_jobs": theirs}, f, indent=1, default=str)
    failed = [j for j, o in {**ours, **theirs}.items() if "error" in o]
    if failed:
        raise SystemExit(f"benchmark jobs failed: {', '.join(failed)} (see the JSON 'errors')")
    return records
