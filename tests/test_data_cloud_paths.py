"""Data inputs as URLs (`jaxt2i.paths`): shards and image folders read from fsspec's
`memory://` and `file://` filesystems build the same dataset as the same files on disk; a
`gs://` URL without gcsfs is one line naming what to install. Never the network."""

import hashlib
import io
import json
import os
import subprocess
import sys

import fsspec
import numpy as np
import pytest

from jaxt2i import paths
from jaxt2i.data import builders, inputs, pipeline, shards
from jaxt2i.data.shapes_shards import tar_bytes

from test_data_builders import _caption_bytes, _jsonl_manifest, _make_images
from test_data_builders_shards import EXPECTED_SKIPS, _make_img2dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def memory(tmp_path):
    """A fresh `memory://BUCKET` of this test (removed after it); yields 'memory://BUCKET'."""
    fs = fsspec.filesystem("memory")
    bucket = "/" + tmp_path.name
    yield f"memory://{tmp_path.name}"
    if fs.exists(bucket):
        fs.rm(bucket, recursive=True)


def _upload(local_dir, url):
    """Copies a local folder to `url` (the folder's files below it)."""
    fs, path = paths.filesystem(url)
    for dirpath, _, names in os.walk(local_dir):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), local_dir).replace(os.sep, "/")
            with open(os.path.join(dirpath, n), "rb") as f:
                fs.pipe(f"{path}/{rel}", f.read())


def _records(source):
    """{stored path: (caption, image bytes, width, height)} of a data source."""
    out = {}
    for i in range(len(source)):
        rec = source[i]
        out[rec["path"].decode()] = (rec["caption"].decode(), bytes(rec["image"]),
                                     int(rec["width"]), int(rec["height"]))
    return out


def test_helpers_on_local_paths_and_urls(tmp_path, memory):
    assert paths.is_url("gs://b/x") and paths.is_url("memory://b") and paths.is_url("file:///x")
    assert not any(paths.is_url(p) for p in ("/x", "x/y", "C:\\x", "./a://b", "", None))
    assert paths.join("gs://b/d", "img/a.png") == "gs://b/d/img/a.png"
    assert paths.join("/data", "gs://b/a.png") == "gs://b/a.png"  # a manifest naming a URL
    assert paths.join("/data", "a.png") == os.path.join("/data", "a.png")
    assert paths.abspath("gs://b/x") == "gs://b/x" and paths.abspath("x") == os.path.abspath("x")
    assert paths.basename("gs://b/d/") == "d"
    fs, _ = paths.filesystem(memory)
    fs.pipe(f"/{tmp_path.name}/d/a.txt", b"hello")
    fs.pipe(f"/{tmp_path.name}/d/sub/b.txt", b"x")
    with paths.open_binary(f"{memory}/d/a.txt") as f:
        assert f.read() == b"hello"
    assert paths.exists(f"{memory}/d/a.txt") and not paths.exists(f"{memory}/d/zz")
    assert paths.isdir(f"{memory}/d") and paths.isfile(f"{memory}/d/a.txt")
    assert paths.listdir(f"{memory}/d") == ["a.txt", "sub"]
    assert [paths.relpath(p, f"{memory}/d") for p in paths.glob(f"{memory}/d/*.txt")] == [
        "a.txt"]
    walked = [(paths.relpath(d, memory), ds, fs_) for d, ds, fs_ in paths.walk(f"{memory}/d")]
    assert walked == [("d", ["sub"], ["a.txt"]), ("d/sub", [], ["b.txt"])]
    with pytest.raises(FileNotFoundError):
        paths.open_binary(f"{memory}/d/zz")
    with pytest.raises(ValueError, match=r"^'nosuch://x': unknown protocol 'nosuch'; pass a "
                       r"local path or an fsspec URL"):
        paths.exists("nosuch://x")


def test_gs_without_gcsfs_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if not installed (it is not here)
    want = "'gs://bucket/laion' needs gcsfs: pip install gcsfs"
    with pytest.raises(paths.MissingFilesystem) as e:
        paths.isdir("gs://bucket/laion")
    assert str(e.value) == want and isinstance(e.value, ImportError)
    with pytest.raises(paths.MissingFilesystem, match=f"^{want}$"):
        builders.shards_builder(str(tmp_path / "d"), "gs://bucket/laion")
    with pytest.raises(paths.MissingFilesystem, match="^'gs://b/p' needs gcsfs"):
        list(inputs.read_entries("gs://b/p", None, "txt", inputs.Report()))
    # A URL --data_dir (an output: tests/test_cloud_outputs.py) says the same, before any work.
    for make in (lambda d: builders.shards_builder(d, str(tmp_path)),
                 lambda d: builders.image_text_builder(d, str(tmp_path)),
                 lambda d: builders.shapes_builder(d, 16, 8)):
        with pytest.raises(paths.MissingFilesystem, match="^'gs://b/tfds' needs gcsfs: pip "
                           "install gcsfs$"):
            make("gs://b/tfds")
    from jaxt2i.checkpoint import Checkpointer, load_exported
    from jaxt2i.data.text_cache import TextCache, build_text_cache
    from jaxt2i.workdir import check_writable

    for use in (lambda: check_writable("gs://b/run", "--workdir", urls=True),
                lambda: Checkpointer("gs://b/run").all_steps(),
                lambda: load_exported("gs://b/run/export"), lambda: TextCache("gs://b/run"),
                lambda: build_text_cache(None, [], "gs://b/run")):
        with pytest.raises(paths.MissingFilesystem, match="^'gs://b/run.*' needs gcsfs: pip "
                           "install gcsfs$"):
            use()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # Each command in a fresh process where gcsfs cannot be imported (it may be installed).
    without_gcsfs = ("import runpy, sys; sys.modules['gcsfs'] = None; "
                     "runpy.run_module(sys.argv.pop(1), run_name='__main__')")
    d = f"--data_dir={tmp_path / 'd'}"
    for cmd, expected in [
            (["jaxt2i.data.builders", d, "--input=gs://bucket/laion"], f"error: {want}"),
            (["jaxt2i.data.builders", "--data_dir=gs://bucket/tfds", "--shapes=16:8"],
             "error: 'gs://bucket/tfds' needs gcsfs: pip install gcsfs"),
            (["jaxt2i.data.builders", d, "--root=gs://bucket/photos"],
             "error: --root: 'gs://bucket/photos' needs gcsfs: pip install gcsfs"),
            (["jaxt2i.data.builders", d, f"--root={tmp_path}",
              "--manifest=gs://bucket/captions.jsonl"],
             "error: --manifest: 'gs://bucket/captions.jsonl' needs gcsfs: pip install gcsfs"),
            (["jaxt2i.train", "--config=configs/base.py:tiny", "--workdir=gs://bucket/run"],
             "error: 'gs://bucket/run' needs gcsfs: pip install gcsfs"),
            (["jaxt2i.sample", "--checkpoint=gs://bucket/run", "--prompt=a"],
             "error: 'gs://bucket/run' needs gcsfs: pip install gcsfs")]:
        r = subprocess.run([sys.executable, "-c", without_gcsfs, *cmd], capture_output=True,
                           text=True, timeout=300, env=env, cwd=ROOT)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [expected], (cmd, r.stderr)
    assert not (tmp_path / "d").exists()


def test_webdataset_shards_from_a_memory_url_build_as_from_disk(tmp_path, memory):
    """img2dataset's shards (every bad kind, a truncated and a garbage tar) in memory://:
    the same shards, counts, report and examples as the same files on disk."""
    local = str(tmp_path / "laion_part")
    expect = _make_img2dataset(local)
    url = f"{memory}/laion_part"
    _upload(local, url)
    listed = shards.list_shards(url, "webdataset")
    assert [paths.relpath(p, url) for p in listed] == [f"{i:05d}.tar" for i in range(5)]
    assert shards.list_shards(f"{url}/0000[12].tar", "webdataset") == listed[1:3]
    assert shards.list_shards(f"{url}/00004.tar,{url}/00000.tar", "webdataset") == [
        listed[0], listed[4]]
    assert shards.upstream_stats(listed[0]) == {"failed_to_download": 2}
    with pytest.raises(ValueError, match="has no tar shards"):
        shards.list_shards(f"{memory}/nothing_here", "webdataset")

    built = {}
    for where, src in (("disk", local), ("memory", url)):
        b = builders.shards_builder(str(tmp_path / f"tfds_{where}"), src, small_warn=16,
                                    num_threads=2)
        assert b.builder_config.name == "laion_part"
        built[where] = (builders.build(b), _records(b.as_data_source("train")), b)
    (disk, disk_recs, _), (mem, mem_recs, b) = built["disk"], built["memory"]
    assert mem.read == 60 and mem.written == 50 and mem.balanced
    assert dict(mem.outcomes) == {**EXPECTED_SKIPS, "ok": 50}
    assert mem.to_json() == disk.to_json()  # shard names, examples, truncation details
    assert mem_recs == disk_recs and len(mem_recs) == 50
    img = pipeline.decode_image(mem_recs["00000.tar:000000000"][1])
    np.testing.assert_array_equal(img, expect["000000000"])
    assert any("00004.tar: ends without its end-of-archive marker" in e
               for e in mem.examples["truncated_tar"])

    # The inputs are recorded as given; a shard rewritten there is a changed input.
    saved = json.load(open(os.path.join(b.data_dir, builders.INPUTS_FILE)))
    assert saved["options"]["input"] == url and saved["files"]["count"] == 9  # 5 + 4 stats
    again = builders.shards_builder(str(tmp_path / "tfds_memory"), url, small_warn=16)
    assert builders.build(again).to_json() == mem.to_json()
    fs, path = paths.filesystem(url)
    fs.pipe(f"{path}/00001.tar", fs.cat(f"{path}/00001.tar") + b"\0" * 512)
    with pytest.raises(ValueError, match="input files changed"):
        builders.build(builders.shards_builder(str(tmp_path / "tfds_memory"), url,
                                               small_warn=16))


def test_tar_damage_is_told_apart_in_memory_too(memory):
    """A URL's tar is read from a seekable fsspec file: a cut at a member boundary is still
    'truncated_tar' (not a quiet end), a cut inside a member too, gzip reads the same."""
    import gzip

    members = [(f"k{i}.{f}", f"{f} {i}".encode()) for i in range(4) for f in ("jpg", "txt")]
    data, where = tar_bytes(members)
    fs, root = paths.filesystem(memory)
    fs.pipe(f"{root}/whole.tar", data)
    fs.pipe(f"{root}/at_member.tar", data[:where["k2.jpg"][0]])
    fs.pipe(f"{root}/in_member.tar", data[:where["k1.txt"][1] + 2])
    fs.pipe(f"{root}/whole.tar.gz", gzip.compress(data))
    fs.pipe(f"{root}/garbage.tar", b"\x89garbage" * 300)
    got = {paths.basename(p): list(shards.read_shard(p, "webdataset"))
           for p in shards.list_shards(memory, "webdataset")}
    keys = {n: [s.key for s in v if isinstance(s, shards.Sample) and not s.problem]
            for n, v in got.items()}
    problems = {n: [s.kind for s in v if isinstance(s, shards.ShardProblem)]
                for n, v in got.items()}
    assert keys == {"whole.tar": ["k0", "k1", "k2", "k3"], "whole.tar.gz": ["k0", "k1", "k2", "k3"],
                    "at_member.tar": ["k0", "k1"], "in_member.tar": ["k0"], "garbage.tar": []}
    assert problems == {"whole.tar": [], "whole.tar.gz": [], "at_member.tar": ["truncated_tar"],
                        "in_member.tar": ["truncated_tar"], "garbage.tar": ["bad_shard"]}
    assert got["whole.tar"][0].captions == [b"txt 0"]


def test_parquet_shard_from_a_memory_url(memory):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"key": f"k{i}", "jpg": b"img%d" % i if i != 1 else None, "txt": f"cap {i}",
             "status": "success" if i != 1 else "failed_to_download"} for i in range(3)]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    fs, root = paths.filesystem(memory)
    fs.pipe(f"{root}/pq/00000.parquet", buf.getvalue())
    fs.pipe(f"{root}/pq/00001.parquet", b"PAR1 not parquet")
    found = shards.list_shards(f"{memory}/pq", "parquet")
    assert [paths.basename(p) for p in found] == ["00000.parquet", "00001.parquet"]
    items = list(shards.read_shard(found[0], "parquet"))
    assert [(s.key, s.image, s.captions, s.problem) for s in items] == [
        ("k0", b"img0", ["cap 0"], None), ("k1", None, ["cap 1"], "failed_download"),
        ("k2", b"img2", ["cap 2"], None)]
    bad = list(shards.read_shard(found[1], "parquet"))
    assert len(bad) == 1 and bad[0].kind == "bad_shard" and bad[0].detail.startswith(
        "00001.parquet: ")


def test_image_folder_from_file_and_memory_urls_build_as_from_disk(tmp_path, memory):
    """A folder with a JSONL manifest as a `file://` URL, and with side-car captions in
    `memory://`: the same images, captions and counts as the folder on disk."""
    root = str(tmp_path / "photos")
    caps = _make_images(root)
    _jsonl_manifest(root, caps)
    url = "file://" + root
    b_disk = builders.image_text_builder(str(tmp_path / "tfds_disk"), root,
                                         os.path.join(root, "captions.jsonl"), min_size=8,
                                         small_warn=16, num_threads=2)
    b_url = builders.image_text_builder(str(tmp_path / "tfds_url"), url,
                                        url + "/captions.jsonl", min_size=8, small_warn=16,
                                        num_threads=2)
    assert b_url.builder_config.name == "photos"
    disk, got = builders.build(b_disk), builders.build(b_url)
    assert got.counts == disk.counts and got.counts["ok"] == 9
    assert got.counts["missing_image"] == 1 and got.counts["bad_manifest_line"] == 1
    assert got.examples["truncated"] == ["img/truncated.png"]
    recs = _records(b_url.as_data_source("train"))
    assert recs == _records(b_disk.as_data_source("train"))
    assert recs["img/latin1.png"][0] == "café crème"
    saved = json.load(open(os.path.join(b_url.data_dir, builders.INPUTS_FILE)))
    then = json.load(open(os.path.join(b_disk.data_dir, builders.INPUTS_FILE)))
    assert saved["options"]["root"] == url and saved["files"]["count"] == then["files"]["count"]

    # side-car .txt captions, the folder in memory://
    side = str(tmp_path / "side" / "photos")
    caps = _make_images(side)
    for name, cap in caps.items():
        if cap is not None:
            with open(os.path.join(side, "img", os.path.splitext(name)[0] + ".txt"), "wb") as f:
                f.write(_caption_bytes(cap))
    _upload(side, f"{memory}/photos")
    b_mem = builders.image_text_builder(str(tmp_path / "tfds_mem"), f"{memory}/photos",
                                        min_size=8, small_warn=16, num_threads=2)
    b_side = builders.image_text_builder(str(tmp_path / "tfds_side"), side, min_size=8,
                                         small_warn=16, num_threads=2)
    mem, side_report = builders.build(b_mem), builders.build(b_side)
    assert mem.counts == side_report.counts and mem.counts["ok"] == 9
    assert mem.to_json() == side_report.to_json()
    assert _records(b_mem.as_data_source("train")) == _records(b_side.as_data_source("train"))


def _old_digest(base, files):
    """`build_inputs`' digest as it was before URLs were read (local files only)."""
    h, n = hashlib.sha256(), 0
    for path in files:
        try:
            st = os.stat(path)
        except OSError:
            continue
        n += 1
        h.update(f"{os.path.relpath(path, base)}\0{st.st_size}\0{st.st_mtime_ns}\n"
                 .encode("utf-8", "surrogateescape"))
    return {"count": n, "sha256": h.hexdigest()}


def test_local_inputs_are_recorded_exactly_as_before(tmp_path, monkeypatch):
    """Builds made before URLs were read are not refused as 'other inputs': a local folder's
    and local shards' `build_inputs` record is byte-for-byte the one of then."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "photos"
    root.mkdir()
    (root / "a.png").write_bytes(b"png")
    (root / "a.txt").write_text("a cat")
    (root / "sub").mkdir()
    (root / "sub" / "b.jpg").write_bytes(b"jpg")
    rec = builders.build_inputs(builders.image_text_builder("tfds", "photos"))
    assert rec["options"]["root"] == str(root) and rec["options"]["manifest"] is None
    assert rec["files"] == _old_digest("photos", ["photos/a.png", "photos/a.txt",
                                                  "photos/sub/b.jpg"])
    sh = tmp_path / "sh"
    sh.mkdir()
    for n in ("00000.tar", "00001.tar", "00000_stats.json"):
        (sh / n).write_bytes(n.encode())
    rec = builders.build_inputs(builders.shards_builder("tfds", "sh/*.tar,sh/00000.tar"))
    assert rec["options"]["input"] == f"{sh}/*.tar,{sh}/00000.tar"
    assert rec["files"] == _old_digest(str(sh), [str(sh / "00000.tar"), str(sh / "00001.tar"),
                                                 str(sh / "00000_stats.json")])
