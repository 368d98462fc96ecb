"""Importing jaxt2i changes no global flag or logging state: commands define their flags in
`cli()`, and library code never parses flags or sets verbosity (each in a fresh process)."""

import json
import subprocess
import sys
import textwrap

CHECK = textwrap.dedent("""
    import importlib, json, logging, pkgutil
    from absl import flags, logging as absl_logging
    import jaxt2i

    verbosity = absl_logging.get_verbosity()
    absl_filters = list(logging.getLogger("absl").filters)
    root_level = logging.getLogger().level
    imported, skipped = [], {}
    for m in pkgutil.walk_packages(jaxt2i.__path__, "jaxt2i."):
        try:
            importlib.import_module(m.name)
            imported.append(m.name)
        except ImportError as e:  # an optional extra (torch, jax2onnx) that is not installed
            skipped[m.name] = str(e)
    ours = sorted(k for k in flags.FLAGS.flags_by_module_dict() if "jaxt2i" in k)
    print(json.dumps({
        "imported": imported, "skipped": skipped, "flag_modules": ours,
        "names": sorted(n for n in ("prompt", "out", "checkpoint", "workdir", "phases",
                                    "data_dir", "encoder", "config") if n in flags.FLAGS),
        "parsed": flags.FLAGS.is_parsed(),
        "verbosity": [verbosity, absl_logging.get_verbosity()],
        "absl_filters": [len(absl_filters), len(logging.getLogger("absl").filters)],
        "root_level": [root_level, logging.getLogger().level],
    }))
""")


def test_importing_every_module_leaves_flags_and_logging_alone():
    r = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    must = {"jaxt2i.cli", "jaxt2i.sample", "jaxt2i.encode", "jaxt2i.train", "jaxt2i.checkpoint",
            "jaxt2i.data.pipeline", "jaxt2i.data.builders", "jaxt2i.data.text_cache",
            "jaxt2i.eval.__main__", "jaxt2i.export.__main__", "jaxt2i.bench.__main__",
            "jaxt2i.assets.__main__", "jaxt2i.train.__main__", "jaxt2i.checkpoint.__main__",
            "jaxt2i.data.builders.__main__", "jaxt2i.data.text_cache.__main__"}
    assert must <= set(got["imported"]), (must - set(got["imported"]), got["skipped"])
    assert got["flag_modules"] == [] and got["names"] == [], got
    assert got["parsed"] is False
    assert got["verbosity"][0] == got["verbosity"][1]
    assert got["absl_filters"][0] == got["absl_filters"][1]
    assert got["root_level"][0] == got["root_level"][1]
