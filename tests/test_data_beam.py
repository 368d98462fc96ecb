"""Builds with Apache Beam (DirectRunner, two workers) equal the single-machine builds: the same
examples, byte for byte, and the same reports, for tar shards with every bad kind (corrupt and
truncated tars, keys repeated across and within shards), parquet shards, an image folder with a
manifest, and the shapes world.

apache-beam lives in a virtual environment of its own (it pins pillow<13 and protobuf<7), so
the main suite skips this file; run it there:

    PYTHONPATH=. /work/.venv-beam/bin/python -m pytest -q -o addopts="" tests/test_data_beam.py

The end-to-end example of docs/data.md (`-k e2e`) takes minutes: it trains on 2 processes.
"""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("apache_beam")

from jaxt2i.data import builders, pipeline, shapes  # noqa: E402
from jaxt2i.data.shapes_shards import tar_bytes  # noqa: E402
from test_data_builders import _jsonl_manifest, _make_images  # noqa: E402
from test_data_builders_shards import (EXPECTED_EVENTS, EXPECTED_SKIPS, _env,  # noqa: E402
                                       _make_img2dataset, _make_parquet, _render)

# Both of the DirectRunner's parallel modes work; the tests use each.
# PROCESSES is the command line of docs/data.md's "Building with Apache Beam".
PROCESSES = "--runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing"
THREADS = "--runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_threading"


def _examples(dataset_dir, split="train"):
    """{(path, caption, image bytes, every feature)} of a built split, read back without
    TensorFlow (shapes: its index for the path)."""
    src = builders.load_source(dataset_dir, split)
    out = set()
    for i in range(len(src)):
        rec = src[i]
        every = tuple((k, v if isinstance(v, bytes) else np.asarray(v).tolist())
                      for k, v in sorted(rec.items()))
        where = rec["path"].decode() if "path" in rec else int(rec["index"])
        out.add((where, rec["caption"].decode(), bytes(rec["image"]), every))
    return out


def _saved(builder):
    with open(os.path.join(builder.data_dir, builders.REPORT_FILE)) as f:
        return json.load(f)


def _both(tmp_path, make, splits=("train",), beam_options=PROCESSES, **kw):
    """Builds `make(data_dir, **kw)` without and with Beam; asserts the same examples and
    reports (returned, and saved as build_report.json); returns (report, builder)."""
    plain = make(str(tmp_path / "plain"), **kw)
    beam = make(str(tmp_path / "beam"), **kw)
    want = builders.build(plain)
    got = builders.build(beam, beam_options=beam_options)
    assert got.to_json() == want.to_json()
    assert _saved(beam) == _saved(plain) == want.to_json()
    for split in splits:
        a, b = _examples(plain.data_dir, split), _examples(beam.data_dir, split)
        assert a == b and a, split
    assert not [n for n in os.listdir(os.path.dirname(beam.data_dir))
                if n not in (os.path.basename(beam.data_dir), ".lock")]  # no report left over
    return got, beam


def _more_shards(root):
    """Two more tars: a key whose first sample is unusable and a later one is kept, a key
    shard 00001 already has, and a key twice in one shard."""
    def sample(key, i, image=None):
        img, cap = _render(i)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG")
        return [(f"{key}.png", buf.getvalue() if image is None else image),
                (f"{key}.txt", cap.encode())]

    members = (sample("late_winner", 100, b"not an image") + sample("000010005", 101)
               + sample("twice", 102) + sample("between", 103) + sample("twice", 104))
    (root / "00005.tar").write_bytes(tar_bytes(members)[0])
    (root / "00006.tar").write_bytes(tar_bytes(sample("late_winner", 105))[0])


def test_shards_beam_equals_one_machine(tmp_path):
    """img2dataset tars with every bad kind, a truncated tar, a file that is no tar, keys
    repeated across and within shards: the same examples and report, shard by shard."""
    src = tmp_path / "laion"
    _make_img2dataset(str(src))
    _more_shards(src)
    report, beam = _both(tmp_path, builders.shards_builder, input=str(src), small_warn=16,
                         num_threads=2)
    j = report.to_json()
    assert j["read"] == 60 + 6 and j["written"] == 50 + 3 and j["balanced"]
    assert j["skipped"] == {**EXPECTED_SKIPS, "duplicate_key": 3, "unreadable": 2}
    for kind, n in EXPECTED_EVENTS.items():
        assert j["counts"][kind] == n, kind
    assert j["shards"]["00005.tar"]["counts"] == {"ok": 2, "unreadable": 1,
                                                  "duplicate_key": 2}
    assert j["shards"]["00006.tar"]["counts"] == {"ok": 1}
    assert j["examples"]["duplicate_key"] == ["00001.tar:000000000", "00005.tar:000010005",
                                              "00005.tar:twice"]
    got = {p: img for p, _, img, _ in _examples(beam.data_dir)}
    assert "00006.tar:late_winner" in got and "00005.tar:late_winner" not in got
    np.testing.assert_array_equal(pipeline.decode_image(got["00005.tar:twice"]),
                                  _render(102)[0])  # the first of the two
    assert "tensorflow" not in sys.modules


def test_shards_validation_split_and_parquet(tmp_path):
    """A validation split (one read of the shards feeds both splits; the report's examples
    come in the one-machine build's order: train, then validation), on the threaded
    DirectRunner; and img2dataset's parquet layout with a corrupt file."""
    src = tmp_path / "laion"
    _make_img2dataset(str(src))
    _more_shards(src)
    report, _ = _both(tmp_path / "val", builders.shards_builder, ("train", "validation"),
                      beam_options=THREADS, input=str(src), val_fraction=0.3)
    assert report.read == 66 and report.balanced
    _make_parquet(tmp_path / "pq")
    report, _ = _both(tmp_path / "parquet", builders.shards_builder,
                      input=str(tmp_path / "pq"), source="parquet")
    assert report.to_json()["skipped"] == {"failed_download": 2, "unreadable": 1,
                                           "missing_caption": 1}
    assert report.counts["bad_shard"] == 1 and report.written == 11


def test_image_folder_beam_equals_one_machine(tmp_path):
    """A folder with a JSONL manifest (bad images, bad captions, a bad line, a missing file,
    a path listed twice) and a validation split; a folder with nothing usable fails the same
    way with Beam."""
    root = str(tmp_path / "photos")
    caps = _make_images(root)
    _jsonl_manifest(root, caps)
    with open(os.path.join(root, "captions.jsonl"), "ab") as f:
        f.write(b'{"image": "img/ok.jpg", "caption": "listed again"}\n')
    report, _ = _both(tmp_path, builders.image_text_builder, ("train", "validation"),
                      root=root, manifest=os.path.join(root, "captions.jsonl"), min_size=8,
                      small_warn=16, val_fraction=0.4, num_threads=2)
    assert report.counts["ok"] == 9 and report.counts["duplicate"] == 1
    assert report.counts["bad_manifest_line"] == 1 and report.counts["missing_image"] == 1
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not an image")
    (bad / "a.txt").write_text("a caption")
    for options in (None, PROCESSES):
        with pytest.raises(ValueError, match="no usable examples for image_text/bad; input "
                                             "report: unreadable: 1"):
            builders.build(builders.image_text_builder(str(tmp_path / "nothing"), str(bad)),
                           beam_options=options)


def test_shapes_beam_equals_one_machine(tmp_path):
    """The shapes world, rendered in chunks on the workers, into the files asked for."""
    make = builders.shapes_builder
    plain = make(str(tmp_path / "plain"), 16, 30, test_size=5)
    beam = make(str(tmp_path / "beam"), 16, 30, test_size=5)
    assert builders.build(plain).counts == {}
    assert builders.build(beam, beam_options=PROCESSES, num_shards=2).counts == {}
    for split in ("train", "test"):
        src = builders.load_source(beam.data_dir, split)
        assert _examples(plain.data_dir, split) == _examples(beam.data_dir, split)
        rec = src[0]
        assert rec["caption"].decode() == shapes.ShapesSource(16, 30 if split == "train" else 5,
                                                              split).caption_at(
                                                                  int(rec["index"]))
    assert len([n for n in os.listdir(beam.data_dir) if "-train.array_record" in n]) == 2


def test_cli_beam(tmp_path):
    """`python -m jaxt2i.data.builders --input=... --beam --beam_options=...` in a fresh
    process: the report it prints and saves is the one-machine build's; Beam options it does
    not know are one line."""
    src = tmp_path / "laion"
    _make_img2dataset(str(src))
    want = builders.build(builders.shards_builder(str(tmp_path / "plain"), str(src))).to_json()
    r = subprocess.run([sys.executable, "-m", "jaxt2i.data.builders",
                        f"--data_dir={tmp_path / 'tfds'}", f"--input={src}", "--beam",
                        f"--beam_options={PROCESSES}"],
                       capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout.strip().splitlines()
    assert "read 60 samples from 5 shards: 50 written + 10 skipped (all accounted for)" in out
    dataset = out[-1].removeprefix("dataset: ")
    with open(os.path.join(dataset, builders.REPORT_FILE)) as f:
        assert json.load(f) == want
    assert _examples(dataset) == _examples(str(tmp_path / "plain"))
    for options, expected in [
            ("--runer=DataflowRunner", "error: --beam_options: --runer=DataflowRunner is not a "
             "Beam pipeline option (pass Beam's own flags, e.g. --runner=DirectRunner "
             "--direct_num_workers=2)"),
            ("--runner=DataflowRunner --project=p --region=r --temp_location=gs://b/t",
             "error: --beam_options: --runner=DataflowRunner writes from Google Cloud workers, "
             "which cannot reach a local --data_dir")]:
        r = subprocess.run([sys.executable, "-m", "jaxt2i.data.builders",
                            f"--data_dir={tmp_path / 'other'}", "--shapes=16:4", "--beam",
                            f"--beam_options={options}"],
                           capture_output=True, text=True, timeout=120, env=_env())
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected), r.stderr
    assert not (tmp_path / "other").exists()


def test_partial_reports_merge_in_any_order():
    """The merge the pipeline does: sums, and each kind's first examples by order, whatever
    order the workers' parts arrive in."""
    from jaxt2i.data.builders import beam as beam_lib

    parts = []
    for shard in range(4):
        part = beam_lib.PartialReport()
        name = f"{shard:05d}.tar"
        part.shard_counts(name)
        for n in range(3):
            part.count_read(name)
            part.add("unreadable", (0, shard, n), f"{name}:{n}", shard=name, outcome=True)
        parts.append(part)
    merged = [beam_lib.PartialReport(), beam_lib.PartialReport()]
    for p in parts:
        merged[0].merge(p)
    for p in reversed(parts):
        merged[1].merge(p)
    a, b = (m.to_json(True) for m in merged)
    assert a == b and a["read"] == 12 and a["skipped"] == {"unreadable": 12}
    assert a["examples"]["unreadable"] == ["00000.tar:0", "00000.tar:1", "00000.tar:2",
                                           "00001.tar:0", "00001.tar:1"]


@pytest.mark.slow
def test_e2e_doc_example_with_beam(tmp_path):
    """docs/data.md's "End to end" example exactly as shown (the build with --beam on the
    DirectRunner's 2 processes, then the 2-process T5 cache and 2-process training in this
    venv), checked as the main suite checks its one-machine run; the Beam build equals a
    one-machine build of the same shards, report and examples."""
    from test_data_e2e import check_example, run_example

    outs, logs = run_example(tmp_path, beam=True)
    dataset = check_example(tmp_path, outs, logs)
    plain = builders.shards_builder(str(tmp_path / "plain"), str(tmp_path / "e2e" / "shards"))
    want = builders.build(plain, num_shards=4)
    with open(os.path.join(dataset, builders.REPORT_FILE)) as f:
        assert json.load(f) == want.to_json()
    assert _examples(dataset) == _examples(plain.data_dir)
