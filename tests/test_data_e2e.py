"""docs/data.md's "End to end" example, run as its commands read (each in a fresh process, from
the repository's root, through bash as a user types them): img2dataset-style shards with bad
members -> a built dataset -> a T5 cache built by 2 processes -> a tiny base stage trained by 2
processes. Here the build runs without Beam (apache-beam is not in this venv by design);
tests/test_data_beam.py runs the same example with `--beam` in the Beam venv.
"""

import json
import math
import os
import shlex
import subprocess
import sys
import zlib

import pytest

from doc_commands import ROOT, bash_block

SECTION = "## End to end: from img2dataset shards to a trained stage"
BEAM_PYTHON = ".venv-beam/bin/python"
# What the builder must report for `--shards=3 --per_shard=24 --corrupt=all`: one of each
# bad sample, the sample the cut tar ends in; the conversions (a GIF is a palette image too).
SKIPPED = {"empty_file": 1, "unreadable": 1, "truncated": 1, "too_small": 1,
           "extreme_aspect": 1, "missing_caption": 1, "empty_caption": 1, "no_image": 1,
           "duplicate_key": 1, "truncated_member": 1}
NOTED = {"converted_CMYK": 1, "converted_I_16": 1, "converted_P": 2, "animated_first_frame": 1,
         "converted_RGBA": 1, "non_utf8_caption": 1, "img2dataset_failed_to_download": 1,
         "truncated_tar": 1, "bad_shard": 1}
READ, WRITTEN = 3 * 24 - 1, 3 * 24 - 1 - 10


def example_commands(work, beam):
    """The docs' commands with `e2e/` in `work`, as argument lists. beam=False: the build runs
    without Beam, its command otherwise the docs' one (asserted)."""
    commands = [shlex.split(c.replace("e2e/", f"{work}/")) for c in bash_block("data.md",
                                                                                SECTION)]
    assert [c[:3] for c in commands] == [
        ["python", "-m", "jaxt2i.data.shapes_shards"], [BEAM_PYTHON, "-m", "jaxt2i.data.builders"],
        ["MODULE=jaxt2i.data.text_cache", "launch/local_multiprocess.sh", "2"],
        ["launch/local_multiprocess.sh", "2", "1"]], commands
    build = commands[1]
    if beam:
        build[0] = sys.executable  # the venv running this test is the Beam venv
    else:
        plain = ["python"] + [a for a in build[1:] if a != "--beam"
                              and not a.startswith("--beam_options=")]
        assert len(plain) == len(build) - 2, build  # the docs' command less --beam + options
        commands[1] = plain
    return commands


def run_example(tmp_path, beam):
    """Runs the docs' example in `tmp_path` (the Beam build or the one-machine one); returns
    the commands' stdout and the launched processes' logs, {i: [log of process 0, 1]}."""
    work = tmp_path / "e2e"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    env.pop("XLA_FLAGS", None)
    outs, logs = [], {}
    for i, args in enumerate(example_commands(work, beam)):
        logdir = tmp_path / f"logs{i}"
        r = subprocess.run(["bash", "-c", shlex.join(args)], cwd=ROOT,
                           env=dict(env, LOG_DIR=str(logdir)), capture_output=True, text=True,
                           timeout=1200)
        if logdir.exists():
            logs[i] = [(logdir / f"process_{p}.log").read_text() for p in range(2)]
        assert r.returncode == 0, (args, r.stderr[-3000:], logs.get(i))
        outs.append(r.stdout)
    return outs, logs


def check_example(tmp_path, outs, logs):
    """What the example must have done: every bad member counted by kind, a cache of the
    dataset's captions in the dataset's shards built by 2 processes, a training run of both
    processes with finite losses and its checkpoint."""
    from jaxt2i.data import builders, text_cache

    work = tmp_path / "e2e"
    assert f"wrote {READ} samples in 4 tar files to {work}/shards" in outs[0], outs[0]
    assert (f"read {READ} samples from 4 shards: {WRITTEN} written + 10 skipped (all "
            "accounted for)") in outs[1], outs[1]
    dataset = outs[1].strip().splitlines()[-1].removeprefix("dataset: ")
    assert dataset == f"{work}/tfds/image_text_shards/shards/1.0.0"
    with open(os.path.join(dataset, builders.REPORT_FILE)) as f:
        report = json.load(f)
    assert report["read"] == READ and report["written"] == WRITTEN and report["balanced"]
    assert report["skipped"] == SKIPPED
    assert report["counts"] == {**SKIPPED, **NOTED, "ok": WRITTEN}, report["counts"]
    assert report["shards"]["00003.tar"]["counts"] == {"bad_shard": 1}

    source = builders.load_source(dataset)
    captions = [source[i]["caption"].decode() for i in range(len(source))]
    assert len(captions) == WRITTEN
    cache = text_cache.TextCache(str(work / "cache"))
    lengths = text_cache.dataset_shard_lengths(source)
    assert len(lengths) == 4 and [s["count"] for s in cache.index["shards"]] == lengths
    assert cache.index["build"]["processes"] == 2 and len(cache) == WRITTEN
    assert [cache.key(i) for i in range(WRITTEN)] == [zlib.crc32(c.encode()) for c in captions]
    assert all(cache[i][1].sum() > 0 for i in range(WRITTEN))  # every caption has tokens
    # each process encodes every other shard: process 0 the 1st and 3rd, process 1 the rest
    assert [p["encoded"] for p in cache.index["build"]["per_process"]] == [
        lengths[0] + lengths[2], lengths[1] + lengths[3]]
    assert f"wrote {WRITTEN} captions" in logs[2][0] and "Traceback" not in logs[2][1]

    run = work / "run"
    train_logs = logs[3]
    assert f"finished at step 10: {run}" in train_logs[0], train_logs[0][-2000:]
    assert "training base stage" in train_logs[1] and "Traceback" not in train_logs[1]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10], rows
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows), rows
    assert os.listdir(run / "checkpoints") == ["10"]
    assert (run / "export" / "params.safetensors").exists()
    assert (run / "samples" / "step_0000010.png").exists()
    return dataset


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 10-12 min on the shared 2-core machine: two processes compile
def test_doc_end_to_end_without_beam(tmp_path):  # the train step, then the sample grid's loop
    """The docs' commands (the build without --beam), then a cache of other captions is
    refused by training in one line."""
    outs, logs = run_example(tmp_path, beam=False)
    check_example(tmp_path, outs, logs)
    work = tmp_path / "e2e"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    # the shapes world's first captions: as many as the dataset's, but not its own
    r = subprocess.run([sys.executable, "-m", "jaxt2i.data.text_cache", "--encoder=bundled",
                        f"--shapes=train:{WRITTEN}", f"--out_dir={work}/other"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "jaxt2i.train", "--config=configs/base.py:tiny",
                        f"--workdir={work}/refused", f"--config.data.source={work}/tfds",
                        f"--config.text.cache={work}/other"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith(f"error: data: text cache {work}/other does not match the "
                               "dataset: example 0 is "), lines
    assert not list((work / "refused").glob("checkpoints/*"))  # no step was saved
    assert not (work / "refused" / "metrics.jsonl").exists()


def test_shapes_shards_counted_by_kind_and_one_line_mistakes(tmp_path):
    """The shards of the docs' first command, built here in this process: each kind lands in
    the shard it is said to, and the builder counts it there; converted images are right;
    mistakes on the command line are one line, exit 2, nothing written."""
    import numpy as np

    from jaxt2i.data import builders, pipeline, shapes, shapes_shards

    out = shapes_shards.write_shards(str(tmp_path / "shards"), 3, 24, shapes_shards.KINDS)
    assert out["samples"] == READ and out["files"] == 4
    report = builders.build(builders.shards_builder(str(tmp_path / "tfds"),
                                                    str(tmp_path / "shards"))).to_json()
    assert report["counts"] == {**SKIPPED, **NOTED, "ok": WRITTEN}
    names = {**shapes_shards.SKIP_KINDS, **shapes_shards.CONVERT_KINDS,
             "truncated_tar": "truncated_tar", "bad_shard": "bad_shard"}
    for kind, shard in out["kinds"].items():
        assert report["shards"][f"{shard:05d}.tar"]["counts"][names[kind]] >= 1, kind
    world = shapes.ShapesSource(32, 72, "train", 0)
    src = builders.load_source(str(tmp_path / "tfds"))
    got = {src[i]["path"].decode(): src[i] for i in range(len(src))}
    j = list(shapes_shards.KINDS).index("rgba")  # shard j % 3, position 1 + j // 3
    rec = got[f"{j % 3:05d}.tar:{j % 3:05d}{1 + j // 3:04d}"]
    img, want = pipeline.decode_image(rec["image"]), world[24 * (j % 3) + 1 + j // 3]["image"]
    np.testing.assert_array_equal(img[:, :16], want[:, :16])  # opaque half: exact (PNG)
    assert (img[:, 16:] == 255).all()  # the transparent half onto white
    j = list(shapes_shards.KINDS).index("non_utf8_caption")
    rec = got[f"{j % 3:05d}.tar:{j % 3:05d}{1 + j // 3:04d}"]
    assert rec["caption"].decode() == world[24 * (j % 3) + 1 + j // 3]["caption"]

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for args, expected in [
            (["--corrupt=all,cmyc"], "error: --corrupt='all,cmyc': unknown kind 'cmyc'; use "
             "'all' or some of empty_file, "),
            (["--corrupt=all", "--per_shard=6"], "error: --per_shard=6 is too small for 16 "
             "corrupt kinds over 3 shards: pass at least 8"),
            (["--shards=0"], "error: --shards=0 must be at least 1")]:
        r = subprocess.run([sys.executable, "-m", "jaxt2i.data.shapes_shards",
                            f"--out={tmp_path / 'new'}", *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected), (
            args, r.stderr)
    assert not (tmp_path / "new").exists()
    r = subprocess.run([sys.executable, "-m", "jaxt2i.data.shapes_shards",
                        f"--out={tmp_path / 'shards'}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == (
        f"error: --out='{tmp_path / 'shards'}' is not empty; pass a new folder"), r.stderr
