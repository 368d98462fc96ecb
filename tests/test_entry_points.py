"""Every console script in pyproject.toml resolves to a command's `cli()`, and each command's
`python -m <module> --help` works in a fresh process and lists the command's own flags."""

import os
import subprocess
import sys
import tomllib
from concurrent import futures
from importlib import import_module

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "pyproject.toml"), "rb") as _f:
    SCRIPTS = tomllib.load(_f)["project"]["scripts"]

# A flag each command defines itself (or through jaxt2i.cli), which --help must show.
OWN_FLAG = {
    "jaxt2i.train.__main__": "--workdir", "jaxt2i.checkpoint.__main__": "--step", "jaxt2i.sample": "--steps",
    "jaxt2i.eval.__main__": "--num_prompts", "jaxt2i.encode": "--max_length",
    "jaxt2i.export.__main__": "--guidance", "jaxt2i.data.builders.__main__": "--data_dir",
    "jaxt2i.data.text_cache.__main__": "--encoder", "jaxt2i.data.shapes_shards": "--per_shard",
    "jaxt2i.assets.__main__": "--out", "jaxt2i.train.align_text": "--first_row",
    "jaxt2i.bench.__main__": "--phases", "jaxt2i.aot.__main__": "--topology",
    "jaxt2i.convert": "--variant",
}


def test_every_command_has_a_console_script():
    modules = {target.split(":")[0] for target in SCRIPTS.values()}
    assert modules == set(OWN_FLAG), modules ^ set(OWN_FLAG)
    assert all(name.startswith("jaxt2i-") for name in SCRIPTS)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_resolves(name):
    module, _, attr = SCRIPTS[name].partition(":")
    assert attr == "cli" and callable(getattr(import_module(module), attr))


def test_help_of_every_command_in_a_fresh_process():
    def run(module):
        name = module.removesuffix(".__main__")
        return module, subprocess.run([sys.executable, "-m", name, "--help"], cwd=ROOT,
                                      capture_output=True, text=True, timeout=300)

    with futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, sorted(OWN_FLAG)))
    for module, r in results:
        assert r.returncode == 0, (module, r.stderr[-2000:])
        assert f"  {OWN_FLAG[module]}" in r.stdout, (module, r.stdout[-2000:])


def test_console_script_help_lists_the_flags():
    """As a console script (argv[0] is the script, not the module), --help still lists the
    command's flags, including those defined in jaxt2i.cli."""
    code = ("import sys; from jaxt2i.export.__main__ import cli; "
            "sys.argv = ['/usr/bin/jaxt2i-export', '--help']; cli()")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for flag in ("--format", "--guidance", "--text_encoder"):
        assert f"  {flag}" in r.stdout, r.stdout
