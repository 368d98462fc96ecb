"""`python -m jaxt2i.bench --phases=data`: the phase end to end at tiny size in a fresh process
(its shards, dataset and cache checked against the files themselves), its report's ratios,
the row without webdataset, and the scratch folder's removal."""

import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tomllib

import pytest

from jaxt2i.bench import data_jobs, runner
from jaxt2i.data.shapes import ShapesSource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _doc_block() -> list[str]:
    """The command lines of docs/benchmarks.md's data section."""
    with open(os.path.join(ROOT, "docs", "benchmarks.md")) as f:
        section = f.read().split("## Input throughput", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [ln.split("#", 1)[0].strip() for ln in block.strip().splitlines()]


def test_docs_install_line_is_the_bench_extra():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert _doc_block()[0] == "pip install 'jaxt2i[bench]'"
    assert [r.split(">")[0] for r in extras["bench"]] == ["webdataset"]
    assert extras["bench"][0] in extras["test"]


def test_data_phase_in_a_fresh_process(tmp_path):
    """The docs' command at tiny size (--tiny, and without the two train-step compiles:
    --nodata_vs_train): the table and the JSON line, every rate positive, both readers seeing
    every sample of the shards."""
    data_dir, out = tmp_path / "data", tmp_path / "bench.json"
    cmd = shlex.split(_doc_block()[1])
    assert cmd[:3] == ["python", "-m", "jaxt2i.bench"] and "--phases=data" in cmd
    p = subprocess.run([sys.executable, *cmd[1:], "--tiny", "--nodata_vs_train",
                        f"--bench_data_dir={data_dir}", f"--json={out}"], capture_output=True,
                       text=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    for title in ("== data: images per CPU-second", "== array_record dataset -> training",
                  "== builds", "tar shards: read + decode + resize to 16 px"):
        assert title in p.stdout, p.stdout
    lines = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith('{"bench"')]
    assert len(lines) == 1 and lines[0]["phase"] == "data"
    rec = lines[0]
    assert set(rec) >= {"shards", "read", "pipeline", "train_vs_data", "build", "text_cache",
                        "meta"}
    n = data_jobs.SIZES["tiny"][0] * data_jobs.SIZES["tiny"][1]
    assert rec["shards"]["samples"] == n == rec["build"]["examples"]

    # the shards are img2dataset's layout: KEY.jpg / .txt / .json, in order, per tar
    tars = sorted(data_dir.glob("shards/*.tar"))
    assert [t.name for t in tars] == ["00000.tar", "00001.tar"]
    with tarfile.open(tars[1]) as tf:
        names = tf.getnames()
        caption = tf.extractfile("000010002.txt").read().decode()
        meta = json.loads(tf.extractfile("000010002.json").read())
    assert names[:3] == ["000010000.jpg", "000010000.txt", "000010000.json"]
    world = ShapesSource(8, n, "train", 0)  # sample k of shard s is scene s * per_shard + k
    assert caption == meta["caption"] == world.caption_at(n // 2 + 2)
    assert meta["key"] == "000010002" and meta["status"] == "success"
    assert len(names) == 3 * n // 2
    assert rec["shards"]["shard_bytes"] == sum(t.stat().st_size for t in tars)

    jobs = json.loads(out.read_text())["jobs"]
    assert [r for r in rec["read"]] == ["16"]  # the tiny base and SR stages are both 16 px
    for res, r in rec["read"].items():
        assert r["ours"] > 0 and r["webdataset"] > 0 and r["webdataset_reader_our_decode"] > 0
        assert r["ours_over_webdataset"] == pytest.approx(r["ours"] / r["webdataset"])
        # whole passes over all the samples, by both readers
        assert jobs["data_read_ours"][res]["images"] % n == 0
        assert jobs["data_read_webdataset"][res]["images"] % n == 0
        assert all(jobs[j]["core"] >= 0 for j in data_jobs.JOBS)  # pinned (Linux)
    for stage, (px, low) in {"demo_base": (16, None), "demo_sr": (16, 8)}.items():
        d = rec["pipeline"][stage]
        assert d["images_per_s"] > 0 and (d["resolution"], d["lowres"]) == (px, low)
        assert d["images"] % d["batch"] == 0 and d["worker_count"] == 0
        assert rec["train_vs_data"][stage]["data_over_train"] is None  # no train jobs
    cache = rec["text_cache"]
    index = json.loads((data_dir / "cache" / "index.json").read_text())
    on_disk = sum(f.stat().st_size for f in (data_dir / "cache").glob("*.npy"))
    assert cache["captions"] == index["num_examples"] == n
    assert cache["bytes_per_caption"] == pytest.approx(on_disk / n)
    assert cache["captions_per_s"] > 0 and rec["build"]["images_per_s"] > 0


def _fake(ours_32=600.0, wds_32=200.0):
    return {"data_prep": {"shards": 2, "per_shard": 8, "image_px": 256, "samples": 16,
                          "build_images_per_s": 100.0, "built": 16},
            "data_cache": {"captions_per_s": 50.0, "bytes_per_caption": 4000.0,
                           "captions": 16, "max_length": 32, "d_model": 128},
            "data_read_ours": {"32": {"images_per_s": ours_32}, "128": {"images_per_s": 300.0}},
            "data_read_webdataset": {"32": {"images_per_s": wds_32},
                                     "32_raw_ours_decode": {"images_per_s": 500.0},
                                     "128": {"images_per_s": 150.0}},
            "data_pipeline": {"demo_base": {"images_per_s": 800.0, "resolution": 32,
                                            "batch": 32, "worker_count": 0},
                              "demo_sr": {"images_per_s": 400.0, "resolution": 128,
                                          "lowres": 32, "batch": 16, "worker_count": 0}},
            "train_demo_base": {"images_per_s": 80.0}, "train_demo_sr": {"images_per_s": 500.0}}


def test_report_ratios_and_the_row_without_webdataset():
    text, rec = runner.report("data", _fake(), {})
    assert rec["read"]["32"]["ours_over_webdataset"] == pytest.approx(3.0)
    assert rec["read"]["128"]["ours_over_webdataset"] == pytest.approx(2.0)
    assert rec["read"]["32"]["webdataset_reader_our_decode"] == 500.0
    assert rec["train_vs_data"]["demo_base"]["data_over_train"] == pytest.approx(10.0)
    assert rec["train_vs_data"]["demo_sr"]["data_over_train"] == pytest.approx(0.8)
    assert "32 px + " not in text and "128 px + 32 px low-res, batch 16" in text
    ours = _fake()
    ours["data_read_webdataset"] = {"core": 0, "missing": data_jobs.WEBDATASET_MISSING}
    text, rec = runner.report("data", ours, {})
    assert rec["read"]["32"]["ours_over_webdataset"] is None and "errors" not in rec
    assert rec["read"]["32"]["ours"] == 600.0
    assert "webdataset is not installed: pip install 'jaxt2i[bench]'" in text


def test_webdataset_job_without_webdataset(monkeypatch, tmp_path):
    monkeypatch.setattr(data_jobs, "pin_to_one_core", lambda: -1)  # not this test process
    monkeypatch.setitem(sys.modules, "webdataset", None)  # `import webdataset` fails
    monkeypatch.setitem(sys.modules, "torch", sys.modules.get("torch"))  # the job blocks it
    out = data_jobs.job_read_webdataset(True, str(tmp_path), tiny=True)
    assert out == {"core": -1, "missing": data_jobs.WEBDATASET_MISSING}


def test_the_scratch_folder_is_removed(monkeypatch):
    """Without --bench_data_dir the runner makes a temporary folder for the jobs and removes
    it afterwards; --nodata_vs_train leaves the train steps out."""
    seen = []

    def child(job, opts, timeout):
        assert os.path.isdir(opts["bench_data_dir"])
        seen.append((job, opts["bench_data_dir"]))
        return {}

    monkeypatch.setattr(runner, "run_child", child)
    runner.run_benchmarks(["data"], {"data_vs_train": False}, quick=True, timeout=1)
    assert [j for j, _ in seen] == list(data_jobs.JOBS)
    assert len({d for _, d in seen}) == 1 and not os.path.exists(seen[0][1])
