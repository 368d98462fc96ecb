"""`python -m jaxt2i.bench` (console script `jaxt2i-bench`): speed, compile time, MFU and
memory, optionally side by side with imagen-pytorch on the same machine in the same run.

    python -m jaxt2i.bench                                 # every phase
    python -m jaxt2i.bench --phases=train,mfu --quick      # fewer iterations
    python -m jaxt2i.bench --vs-imagen-pytorch             # + the PyTorch reference, interleaved
    python -m jaxt2i.bench --json=bench.json               # all results in one file
    python -m jaxt2i.bench --phases=data --quick           # input throughput per core

Phases (each prints a table and one JSON line `{"bench": "jaxt2i", "phase": ...}`):
  train    steady-state train step of bench_23m (64 px, batch 8) and bench_sr22m (64->256,
           batch 4): median seconds, images/s, peak RSS
  sample   per-step time of the base stage at batch 4 with guidance 5 (and without), of the SR
           stage, and the 64->256 cascade end to end
  compile  compile time of the train steps and of the sampler at 10 / 100 / 1000 steps
  mfu      model FLOPs per train step (analytic conv + matmul count, cross-checked with XLA's
           cost analysis) / step time / the matmul peak measured in the same process
  memory   peak host RSS of every job, and XLA's compiled memory analysis of the paper's 2B
           base train step (bfloat16, remat) on a simulated FSDP mesh (--memory_devices)
  quality  shapes-evaluator scores of the bundled demo: dpmpp_2m / dpmpp_3m / heun / euler /
           ddim at 10 and 15 steps against DPM-Solver++(2M) at 25 (not in the default set: it
           samples 2 x 200 prompts x 11 runs; --quality_stages=1 for the base stage only)
  data     input throughput per core (a child pinned to one core, one thread): img2dataset-
           style webdataset shards of 256-px shapes JPEGs read + decoded + resized to the demo
           stages' 32 / 128 px by our reader and by webdataset's (`pip install
           'jaxt2i[bench]'`; without it the ratio is left out), the array_record dataset
           built from them through the training input pipeline, the build and the T5 cache
           build (captions/s, bytes per caption), and the pipeline's images/s over the demo
           train steps' (data / train > 1: training never waits). Not in the default set.

Every job runs in a fresh child process, one at a time, so peak RSS is per job and jobs never
share the CPU. With --vs-imagen-pytorch, the vendored anchor script
(jaxt2i/bench/imagen_pytorch_bench.py; in a venv of its own, --anchor_python) runs its matching
phase right after ours, with the same batch sizes and thread count, and the ratios are printed
pair by pair.
"""

from __future__ import annotations

import json

from absl import app, flags

from jaxt2i.bench.runner import (ANCHOR_SCRIPT, CHILD_TAG, DEFAULT_PHASES, PHASES,
                                 run_benchmarks, run_job)

FLAGS = flags.FLAGS


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    opts = {"quick": FLAGS.quick, "tiny": FLAGS.tiny, "cascade_steps": FLAGS.cascade_steps,
            "memory_batch": FLAGS.memory_batch or None, "quality_prompts": FLAGS.quality_prompts
            or None, "memory_devices": FLAGS.memory_devices,
            "quality_stages": FLAGS.quality_stages or None, "dtype": FLAGS.dtype or None,
            "quality_samplers": tuple(FLAGS.quality_samplers or ()) or None,
            "quality_steps": tuple(int(v) for v in FLAGS.quality_steps or ()) or None,
            "bench_data_dir": FLAGS.bench_data_dir, "data_vs_train": FLAGS.data_vs_train}
    if FLAGS.job:  # a child process started by run_child
        print(CHILD_TAG + json.dumps(run_job(FLAGS.job, FLAGS.quick, opts)), flush=True)
        return
    run_benchmarks(FLAGS.phases, opts, quick=FLAGS.quick, timeout=FLAGS.timeout,
                   vs_imagen_pytorch=FLAGS.vs_imagen_pytorch,
                   anchor_script=FLAGS.imagen_pytorch_script,
                   anchor_python=FLAGS.anchor_python, json_path=FLAGS.json)


def _define_flags() -> None:
    flags.DEFINE_list("phases", list(DEFAULT_PHASES),
                      f"Phases to run, from {', '.join(PHASES)}.")
    flags.DEFINE_bool("quick", False, "Fewer iterations and step counts (a smoke run).")
    flags.DEFINE_bool("vs_imagen_pytorch", False, "Also run imagen-pytorch's matching phases (in "
                      "--anchor_python's environment).")
    flags.DEFINE_string("anchor_python", None, "Python of the environment that has "
                        "imagen-pytorch (default: this one). Its torchvision breaks "
                        "transformers' torch models, so keep it in a venv of its own "
                        "(BENCHMARKS.md).")
    flags.DEFINE_string("imagen_pytorch_script", ANCHOR_SCRIPT,
                        "The imagen-pytorch anchor script.")
    flags.DEFINE_integer("cascade_steps", 4, "Sampling steps per stage of the end-to-end "
                         "cascade (the anchor uses 4).")
    flags.DEFINE_integer("memory_devices", 8, "Simulated devices of the FSDP mesh in `memory`.")
    flags.DEFINE_integer("memory_batch", 0, "Global batch of the memory phase (0: 8 per device, "
                         "the paper's 2048 spread over a pod).")
    flags.DEFINE_integer("quality_prompts", 0, "Prompts per split of `quality` (0: 200, 8 "
                         "with --quick).")
    flags.DEFINE_integer("quality_stages", 0, "Demo stages sampled by `quality` (0: all; 1: the "
                         "base stage, ten times cheaper).")
    flags.DEFINE_list("quality_samplers", [], "Samplers compared by `quality` (default: "
                      "dpmpp_2m, dpmpp_3m, heun, euler, ddim); DPM-Solver++(2M) at 25 steps "
                      "always runs as the reference.")
    flags.DEFINE_list("quality_steps", [], "Step counts of `quality` (default: 10,15).")
    flags.DEFINE_bool("tiny", False, "Test-sized models instead of the benchmark ones (smoke "
                      "runs; the figures mean nothing).")
    flags.DEFINE_string("bench_data_dir", None, "Where the data phase writes its shards, "
                        "dataset and text cache (default: a temporary folder, removed after; "
                        "a folder given here is rebuilt and kept).")
    flags.DEFINE_bool("data_vs_train", True, "The data phase also times the demo stages' "
                      "train steps (two compiles) for its data / train ratio.")
    flags.DEFINE_string("json", None, "Also write every result to this JSON file.")
    flags.DEFINE_enum("dtype", "", ["", "float32", "bfloat16"], "Compute dtype of the train_base "
                      "/ train_sr U-Nets (default: their configs'); the paper phase is bfloat16.")
    flags.DEFINE_string("job", None, "(internal) run one job in this process and print its "
                        "JSON.")
    flags.DEFINE_integer("timeout", 1800, "Seconds before a job is stopped.")


def cli() -> None:
    """Console-script entry point (`jaxt2i-bench`)."""
    from jaxt2i.cli import run_app

    run_app(main, _define_flags)


if __name__ == "__main__":
    cli()
