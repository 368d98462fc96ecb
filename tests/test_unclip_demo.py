"""The bundled unCLIP demo (`--model=unclip`, jaxt2i/assets/demo_unclip) and the commands of
docs/unclip.md that made it and compare it with the Imagen demo, each in a fresh process:
the demo draws what a prompt says (read back by the shapes detector), and the recipe's
commands run as written, shortened to a few steps of small batches."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from doc_commands import bash_block, shortened, workspace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a red circle above a blue square"


def _run(args, cwd=ROOT, timeout=900):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1",  # `python`: this one
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (args, r.stderr[-3000:])
    return r


def test_the_bundled_unclip_demo_is_a_cascade_of_the_shipped_parts():
    from jaxt2i.assets import demo_cascade_dir, demo_clip_dir, demo_dir, demo_unclip_dir
    from jaxt2i.pipelines.unclip import read_spec

    spec = read_spec(demo_unclip_dir())
    assert spec == {"kind": "unclip", "prior": "prior",
                    "stages": ["decoder", "../demo_cascade/sr"]}
    # the SR stage is the Imagen demo's own (shipped once)
    assert os.path.samefile(os.path.join(demo_unclip_dir(), spec["stages"][1]),
                            os.path.join(demo_cascade_dir(), "sr"))
    assert demo_dir("unclip") == demo_unclip_dir() and demo_dir() == demo_cascade_dir()
    for part in ("prior", "decoder"):
        with open(os.path.join(demo_unclip_dir(), part, "config.json")) as f:
            assert json.load(f)["config"]["clip"] == {"path": "bundled"}
    assert os.path.isfile(os.path.join(demo_clip_dir(), "model.safetensors"))


@pytest.mark.slow
def test_sample_model_unclip_draws_what_the_prompt_says(tmp_path):
    """docs/unclip.md's and the README's `python -m jaxt2i.sample --model=unclip ...`: the
    detector reads the prompt's colours and shapes in most samples (chance: 1 in 6 colours,
    1 in 8 shapes)."""
    from PIL import Image

    from jaxt2i.eval import detector

    cmd = bash_block("unclip.md", "## The bundled unCLIP demo")
    sample = [c for c in cmd if c.startswith("python -m jaxt2i.sample --model=unclip")]
    assert sample == [f'python -m jaxt2i.sample --model=unclip --prompt "{PROMPT}" '
                      '--num_images=4 --out=samples_unclip']
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert sample[0] in f.read()
    _run(["bash", "-c", sample[0]], cwd=tmp_path)
    record = json.loads((tmp_path / "samples_unclip" / "sample.json").read_text())
    assert record["kind"] == "unclip" and len(record["images"]) == 4
    images = [np.asarray(Image.open(tmp_path / "samples_unclip" / n).convert("RGB"))
              for n in record["images"]]
    assert images[0].shape == (128, 128, 3)
    scores = [detector.score(im, PROMPT) for im in images]
    assert sum(s["colour"] and s["shape"] for s in scores) >= 3, [s["found"] for s in scores]


@pytest.mark.slow  # three training commands at demo size, 2 steps each, and three evaluations
def test_recipe_and_comparison_commands_run_as_written(tmp_path):
    """docs/unclip.md: the prior and decoder commands of the bundled demo, the assembly of
    their exports into an unCLIP cascade (which must load and fit together), the Imagen run of
    the same compute and the three evaluations of the comparison, in fresh processes."""
    from jaxt2i.pipelines.unclip import load_unclip

    ws = workspace(tmp_path)
    recipe = bash_block("unclip.md", "## The bundled unCLIP demo", 1)
    assert [c.split()[:3] for c in recipe if c.startswith("python")] == [
        ["python", "-m", "jaxt2i.train"]] * 2
    assert "--config=configs/prior.py:size=demo" in recipe[0]
    assert "--config.train.init_from=jaxt2i/assets/demo_cascade/base" in recipe[1]
    for cmd in recipe:
        _run(["bash", "-c", shortened(cmd)], cwd=ws)
    pipe = load_unclip(str(ws / "runs" / "unclip"))
    assert pipe.stages[0].step == 2 and pipe.prior.step == 2
    assert len(pipe.stages) == 2 and pipe.stages[1].is_sr

    compare = bash_block("unclip.md", "## unCLIP against Imagen: the same data, the same compute")
    evals = [c for c in compare if c.startswith("python -m jaxt2i.eval")]
    assert len(evals) == 3 and compare[0].startswith("python -m jaxt2i.train")
    _run(["bash", "-c", shortened(compare[0])], cwd=ws)
    rows = {}
    for cmd in evals:
        r = _run(["bash", "-c", shortened(cmd)], cwd=ws)
        record = json.loads(r.stdout.strip().splitlines()[-1])
        assert record["diversity"] == 2 and record["results"]["held_out"]["n_layouts"] == 2
        rows[cmd] = record
    assert [r.get("kind") for r in rows.values()] == [None, None, "unclip"]
    assert rows[evals[1]]["steps_trained"][0] == 2  # the run above, not the bundled base
