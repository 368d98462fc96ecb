"""`python -m jaxt2i.aot` (console script `jaxt2i-aot`): compile a stage's train step (and
sampler) for a TPU topology on this machine, without a TPU, and print the compiler's numbers.

    python -m jaxt2i.aot --config=configs/base.py:size=paper_base64 --topology=v4:4x4x8 \
        [--config.mesh.fsdp=-1 --config.mesh.data=1] [--text_cache] [--sampler] [--json=F]

TPU topologies need libtpu (`pip install 'jaxt2i[tpu]'`, in an environment of its own);
`--topology=cpu:N` compiles for N host CPU devices. A step that does not fit a chip is an
answer ("fits": false, exit 0); a bad flag is one line and exit 2.
"""

from __future__ import annotations

import json

from absl import flags

from jaxt2i.aot import compile_sampler, compile_train_step, format_report, topology_devices
from jaxt2i.cli import run_app
from jaxt2i.config import ConfigError


def main(argv) -> None:
    F = flags.FLAGS
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}")
    if F.config is None:
        raise ConfigError("--config is required, e.g. --config=configs/base.py:size=paper_base64")
    if not F.topology:
        raise ConfigError("--topology is required, e.g. --topology=v4:4x4x8 (or cpu:4)")
    devices = topology_devices(F.topology)
    results = {"topology": F.topology,
               "train_step": compile_train_step(F.config, devices, text_cache=F.text_cache)}
    print(format_report(results["train_step"]), flush=True)
    if F.sampler:
        batch = F.sample_batch or len(devices)
        results["sampler"] = compile_sampler(F.config, devices, batch=batch,
                                             steps=F.sample_steps or None)
        print(format_report(results["sampler"]), flush=True)
    if F.json:
        with open(F.json, "w") as f:
            json.dump({**results["train_step"], "topology": F.topology,
                       "mesh": results["train_step"].get("mesh"),
                       "sampler": results.get("sampler")}, f, indent=1, default=str)


def _define_flags() -> None:
    from jaxt2i.cli import define_config_flag

    define_config_flag()
    flags.DEFINE_string("topology", None, "TPU topology (v4:4x4x8, v5p:8x8x4, v5e:8x16, "
                        "v6e:16x16, ...) or cpu:N.")
    flags.DEFINE_boolean("text_cache", False, "Compile the step that reads cached T5 "
                         "embeddings (no T5 in the step).")
    flags.DEFINE_boolean("sampler", False, "Also compile the stage's sampler (the reverse "
                         "process) on the same devices.")
    flags.DEFINE_integer("sample_batch", 0, "Sampler batch (default: one image per device).")
    flags.DEFINE_integer("sample_steps", 0, "Sampler steps (default: the config's).")
    flags.DEFINE_string("json", None, "Also write the results to this JSON file.")


def cli() -> None:
    """Console-script entry point (`jaxt2i-aot`)."""
    run_app(main, _define_flags)


if __name__ == "__main__":
    cli()
