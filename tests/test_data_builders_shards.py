"""Tests of the shard readers and builder: img2dataset-style webdataset and parquet shards made
here from the shapes world, with every kind of bad member mixed in."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxt2i.data import builders, pipeline, shapes, shards
from jaxt2i.data.shapes_shards import encode_image as _enc
from jaxt2i.data.shapes_shards import sample_members, tar_bytes, write_shard

RES = 32
_WORLD = shapes.ShapesSource(RES, 200, "train", seed=3)


def _render(i):
    ex = _WORLD[i]
    return ex["image"], ex["caption"]


def _members(key, ext, image, caption):
    """img2dataset's members of a sample of RES x RES pixels."""
    return sample_members(key, ext, image, caption, (RES, RES))


def _make_img2dataset(root):
    """Five webdataset shards as img2dataset writes them (plus its parquet / stats files),
    with every bad kind. Returns {key: what its image must decode to} for the kept ones."""
    os.makedirs(root)
    expect = {}
    # --- shard 0: one sample of each kind --------------------------------------------------
    members = [("README", b"not a sample")]
    for i in range(24):
        key = f"00000{i:04d}"
        img, cap = _render(i)
        pil = Image.fromarray(img)
        name, data, capb = "jpg", _enc(pil, "JPEG", quality=95), cap.encode()
        if i == 0:
            name, data = "png", _enc(pil, "PNG")
            expect[key] = img
        elif i == 1:  # CMYK JPEG
            data = _enc(pil.convert("CMYK"), "JPEG", quality=95)
            # stored as a JPEG again (its format): close to PIL's own conversion
            expect[key] = ("jpeg", np.asarray(Image.open(io.BytesIO(data)).convert("RGB")),
                           img)
        elif i == 2:  # 16-bit grayscale PNG
            gray = np.asarray(pil.convert("L"))
            name, data = "png", _enc(Image.fromarray(gray.astype(np.uint16) * 257), "PNG")
            expect[key] = np.repeat(gray[..., None], 3, -1)
        elif i == 3:  # palette PNG
            p = pil.convert("P", palette=Image.ADAPTIVE, colors=64)
            name, data = "png", _enc(p, "PNG")
            expect[key] = ("close", np.asarray(p.convert("RGB")), img)
        elif i == 4:  # animated GIF: its first frame
            frames = [pil, Image.fromarray(255 - img)]
            name = "gif"
            data = _enc(frames[0], "GIF", save_all=True, append_images=frames[1:],
                        duration=100, loop=0)
            expect[key] = ("close", np.asarray(Image.open(io.BytesIO(data)).convert("RGB")),
                           img)
        elif i == 5:  # zero bytes
            data = b""
        elif i == 6:  # a caption in Windows-1252, not UTF-8
            capb = (cap + " caf\xe9").encode("cp1252")
        elif i == 7:  # no .txt, and no caption in the .json either
            capb = None
        elif i == 8:
            data = _enc(Image.fromarray(img[:4, :4]), "PNG")
        elif i == 9:
            data = _enc(Image.new("RGB", (1000, 10), (200, 30, 30)), "PNG")
            name = "png"
        elif i == 10:  # a truncated JPEG
            data = data[:len(data) // 2]
        elif i == 11:
            data = b"<html>404 not found</html>"
        elif i == 12:  # RGBA: the transparent half becomes white
            alpha = np.zeros(img.shape[:2], np.uint8)
            alpha[:, :RES // 2] = 255
            name, data = "png", _enc(Image.fromarray(np.dstack([img, alpha])), "PNG")
            want = img.copy()
            want[:, RES // 2:] = 255
            expect[key] = want
        elif i == 13:
            name, data = "webp", _enc(pil, "WEBP", lossless=True)
            expect[key] = img
        elif i == 14:  # img2dataset writes "" for a row without a caption
            capb = b""
        elif i == 15:  # caption and metadata but no image
            name = None
        members += _members(key, name, data, capb)
    write_shard(root, 0, members, n_urls=26)
    # --- shard 1: a key that shard 0 already has -------------------------------------------
    members = []
    for i in range(20):
        key = "000000000" if i == 3 else f"00001{i:04d}"
        img, cap = _render(30 + i)
        members += _members(key, "jpg", _enc(Image.fromarray(img), "JPEG"), cap.encode())
    write_shard(root, 1, members)
    # --- shard 2: cut in the middle of its 11th sample's image -----------------------------
    members = []
    for i in range(20):
        img, cap = _render(60 + i)
        members += _members(f"00002{i:04d}", "jpg", _enc(Image.fromarray(img), "JPEG"),
                                   cap.encode())
    data, where = tar_bytes(members)
    start = where["000020010.jpg"][1]
    write_shard(root, 2, members, data=data[:start + 100])
    # --- shard 3: not a tar at all ---------------------------------------------------------
    with open(os.path.join(root, "00003.tar"), "wb") as f:
        f.write(b"\x89garbage" * 300)
    # --- shard 4: cut at a member boundary (tarfile would end quietly there) ---------------
    members = []
    for i in range(8):
        img, cap = _render(90 + i)
        members += _members(f"00004{i:04d}", "jpg", _enc(Image.fromarray(img), "JPEG"),
                                   cap.encode())
    data, where = tar_bytes(members)
    write_shard(root, 4, members, data=data[:where["000040005.jpg"][0]])
    return expect


EXPECTED_SKIPS = {"empty_file": 1, "missing_caption": 1, "too_small": 1, "extreme_aspect": 1,
                  "truncated": 1, "unreadable": 1, "empty_caption": 1, "no_image": 1,
                  "duplicate_key": 1, "truncated_member": 1}
EXPECTED_EVENTS = {"converted_CMYK": 1, "converted_I_16": 1, "converted_P": 2,
                   "animated_first_frame": 1, "converted_RGBA": 1, "non_utf8_caption": 1,
                   "img2dataset_failed_to_download": 2, "ignored_member": 1,
                   "truncated_tar": 2, "bad_shard": 1}


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _build_command(data_dir, *args):
    """`python -m jaxt2i.data.builders --data_dir=DATA ARGS` in a fresh process: (its stdout
    lines, the dataset directory, the saved build_report.json)."""
    r = subprocess.run([sys.executable, "-m", "jaxt2i.data.builders", f"--data_dir={data_dir}",
                        *args], capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout)
    out = r.stdout.strip().splitlines()
    dataset = out[-1].removeprefix("dataset: ")
    with open(os.path.join(dataset, builders.REPORT_FILE)) as f:
        return out, dataset, json.load(f)


def test_img2dataset_webdataset_build(tmp_path):
    """`python -m jaxt2i.data.builders --input=DIR` in a fresh process: every bad kind counted
    exactly, read == written + skipped, converted pixels right, and the training pipeline
    reads the result."""
    src = str(tmp_path / "laion_part")
    expect = _make_img2dataset(src)
    data_dir = str(tmp_path / "tfds")
    out, dataset, report = _build_command(data_dir, f"--input={src}", "--small_warn=16")
    assert ("read 60 samples from 5 shards: 50 written + 10 skipped (all accounted for)"
            in out), out
    assert report["read"] == 60 and report["written"] == 50 and report["balanced"]
    assert report["skipped"] == EXPECTED_SKIPS
    counts = report["counts"]
    for kind, n in {**EXPECTED_SKIPS, **EXPECTED_EVENTS, "ok": 50}.items():
        assert counts.get(kind, 0) == n, (kind, counts)
    assert set(counts) == set(EXPECTED_SKIPS) | set(EXPECTED_EVENTS) | {"ok"}, counts
    per = report["shards"]
    assert {s: v["read"] for s, v in per.items()} == {
        "00000.tar": 24, "00001.tar": 20, "00002.tar": 11, "00003.tar": 0, "00004.tar": 5}
    assert per["00002.tar"]["counts"] == {"ok": 10, "truncated_member": 1, "truncated_tar": 1}
    assert per["00003.tar"]["counts"] == {"bad_shard": 1}
    assert per["00004.tar"]["counts"] == {"ok": 5, "truncated_tar": 1}
    assert per["00001.tar"]["counts"] == {"ok": 19, "duplicate_key": 1}
    for s, v in per.items():  # per shard too: read == written + skipped
        assert v["read"] == sum(n for k, n in v["counts"].items()
                                if k == "ok" or k in EXPECTED_SKIPS), s
    assert "00000.tar:000000005" in report["examples"]["empty_file"]
    assert any("00004.tar: ends without its end-of-archive marker" in e
               for e in report["examples"]["truncated_tar"])

    source = builders.load_source(dataset)
    assert len(source) == 50
    got = {}
    for i in range(len(source)):
        rec = source[i]
        got[rec["path"].decode()] = rec
    assert got["00000.tar:000000000"]["caption"].decode() == _render(0)[1]
    assert got["00001.tar:000010004"]["caption"].decode() == _render(34)[1]
    assert got["00000.tar:000000006"]["caption"].decode() == _render(6)[1] + " café"
    for key, want in expect.items():
        img = pipeline.decode_image(got[f"00000.tar:{key}"]["image"])
        if isinstance(want, tuple):  # lossy input: its own RGB (exactly, unless re-encoded
            kind, converted, render = want  # as a JPEG), close to the render
            if kind == "jpeg":
                assert np.abs(img.astype(int) - converted).mean() < 6, key
            else:
                np.testing.assert_array_equal(img, converted, err_msg=key)
            assert np.abs(img.astype(int) - render).mean() < 12, key
        else:
            np.testing.assert_array_equal(img, want, err_msg=key)
    batch = next(pipeline.make_pipeline(
        pipeline.open_source(data_dir, resolution=16, dataset="image_text_shards/laion_part"),
        resolution=16, lowres=8, batch_size=4, process_count=1, process_index=0))
    assert batch["image"].shape == (4, 16, 16, 3) and batch["lowres"].shape == (4, 8, 8, 3)
    assert "tensorflow" not in sys.modules


def test_rebuild_rules_and_validation_split(tmp_path):
    src = str(tmp_path / "i2d")
    _make_img2dataset(src)
    data = str(tmp_path / "tfds")
    b = builders.shards_builder(data, src, val_fraction=0.3, num_threads=2)
    report = builders.build(b)
    n_train, n_val = len(b.as_data_source("train")), len(b.as_data_source("validation"))
    assert n_train + n_val == 50 and n_val > 0
    # both splits read every shard; each sample is counted in one, shard problems once
    assert report.read == 60 and report.written == 50 and report.balanced
    assert report.counts["truncated_tar"] == 2 and report.counts["bad_shard"] == 1
    assert report.counts["img2dataset_failed_to_download"] == 2
    again = builders.build(builders.shards_builder(data, src, val_fraction=0.3))
    assert again.to_json() == report.to_json()  # the same inputs: the saved build and report
    with pytest.raises(ValueError, match="max_aspect was 5.0 when it was built, now 20"):
        builders.build(builders.shards_builder(data, src, val_fraction=0.3, max_aspect=20))
    with open(os.path.join(src, "00001.tar"), "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(ValueError, match="input files changed"):
        builders.build(builders.shards_builder(data, src, val_fraction=0.3))


def test_plain_webdataset_caption_from_a_json_field(tmp_path):
    """Tars from other tools: keys with folders, any image extension, the caption in a JSON
    field named by --caption_field, extra fields counted and left out."""
    root = tmp_path / "wds"
    root.mkdir()
    members = []
    for i in range(6):
        img, cap = _render(120 + i)
        key = f"train/img_{i}"
        ext = ["png", "webp", "jpeg", "bmp", "tiff", "PNG"][i]
        kw = {"lossless": True} if ext == "webp" else {}
        fmt = {"jpeg": "JPEG", "bmp": "BMP", "tiff": "TIFF", "webp": "WEBP"}.get(ext, "PNG")
        members += [(f"{key}.{ext}", _enc(Image.fromarray(img), fmt, **kw)),
                    (f"{key}.json", json.dumps({"TEXT": cap, "score": 0.3}).encode()),
                    (f"{key}.cls", b"3")]
    members.append(("train/img_9.json", b"{not json"))  # no image and bad JSON
    (root / "part-a.tar").write_bytes(tar_bytes(members)[0])
    items = list(shards.read_shard(str(root / "part-a.tar"), "webdataset",
                                   caption_field="json:TEXT"))
    assert [s.key for s in items] == [f"train/img_{i}" for i in range(6)] + ["train/img_9"]
    assert items[1].captions == [_render(121)[1]] and items[1].meta["score"] == 0.3
    assert items[0].events == ["ignored_member"] and items[-1].problem == "no_image"
    assert "bad_json" in items[-1].events
    # The same tar gzipped reads the same; a garbage header ends the shard, counted.
    import gzip

    data, where = tar_bytes(members)
    gz = tmp_path / "other" / "a.tar.gz"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress(data))
    assert [s.key for s in shards.read_shard(str(gz), "webdataset")
            if isinstance(s, shards.Sample)] == [s.key for s in items]
    bad = bytearray(data)
    start = where["train/img_2.jpeg"][0]
    bad[start:start + 512] = b"x" * 512
    (gz.parent / "b.tar").write_bytes(bytes(bad))
    got = list(shards.read_shard(str(gz.parent / "b.tar"), "webdataset"))
    assert [s.key for s in got[:-1]] == ["train/img_0", "train/img_1"]
    assert got[-1].kind == "corrupt_tar" and "unreadable member header" in got[-1].detail

    _, dataset, report = _build_command(tmp_path / "tfds", f"--input={root / '*.tar'}",
                                        "--caption_field=json:TEXT")
    assert report["read"] == 7 and report["written"] == 6
    assert report["skipped"] == {"no_image": 1}
    assert report["counts"]["ignored_member"] == 6 and report["counts"]["bad_json"] == 1
    src = builders.load_source(dataset)
    paths = sorted(src[i]["path"].decode() for i in range(len(src)))
    assert paths[0] == "part-a.tar:train/img_0"
    for i in range(len(src)):
        rec = src[i]
        n = int(rec["path"].decode().rsplit("_", 1)[1])
        assert rec["caption"].decode() == _render(120 + n)[1]
        if n != 2:  # all but the JPEG come back exactly
            np.testing.assert_array_equal(pipeline.decode_image(rec["image"]),
                                          _render(120 + n)[0])


def _make_parquet(root):
    """img2dataset's --output_format=parquet (image bytes in a `jpg` column, failed rows
    without one), a Hugging Face-style parquet, and a corrupt file, in the folder `root`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir()
    rows = []
    for i in range(12):
        img, cap = _render(150 + i)
        row = {"key": f"00000{i:04d}", "jpg": _enc(Image.fromarray(img), "PNG"), "txt": cap,
               "caption": cap, "url": f"http://example.com/{i}", "status": "success",
               "error_message": None, "width": RES, "height": RES}
        if i in (3, 7):
            row.update(jpg=None, txt=None, status="failed_to_download",
                       error_message="HTTP 404")
        if i == 5:
            row["jpg"] = b"\xff\xd8\xff garbage"
        if i == 9:
            row["txt"] = None
        rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows), str(root / "00000.parquet"))
    hf = [{"image": {"bytes": _enc(Image.fromarray(_render(170 + i)[0]), "PNG"),
                     "path": f"{i}.png"}, "text": _render(170 + i)[1]} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(hf), str(root / "00001.parquet"))
    (root / "00002.parquet").write_bytes(b"PAR1 this is not parquet")


def test_img2dataset_parquet_layout(tmp_path):
    """img2dataset's --output_format=parquet (image bytes in a `jpg` column, failed rows
    without one), a Hugging Face-style parquet, and a corrupt file."""
    root = tmp_path / "pq"
    _make_parquet(root)
    out, dataset, report = _build_command(tmp_path / "tfds", f"--input={root}",
                                          "--source=parquet")
    assert "read 15 samples from 3 shards: 11 written + 4 skipped (all accounted for)" in out
    assert report["skipped"] == {"failed_download": 2, "unreadable": 1, "missing_caption": 1}
    assert report["counts"]["bad_shard"] == 1
    assert report["shards"]["00001.parquet"]["counts"] == {"ok": 3}
    src = builders.load_source(dataset)
    got = {src[i]["path"].decode(): src[i] for i in range(len(src))}
    np.testing.assert_array_equal(
        pipeline.decode_image(got["00000.parquet:000000004"]["image"]), _render(154)[0])
    assert got["00001.parquet:00001/2"]["caption"].decode() == _render(172)[1]


def test_cli_mistakes_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    cases = [
        ([f"--input={tmp_path / 'empty'}"],
         f"error: --input='{tmp_path / 'empty'}' has no tar shards (*.tar); pass a folder"),
        ([f"--input={tmp_path / 'empty'}", "--source=parquet", "--caption_field=json:TEXT"],
         "error: --caption_field='json:TEXT': json:FIELD is for webdataset tars"),
        (["--shapes=16:8", "--max_aspect=3"],
         "error: --max_aspect applies to --input only; drop it or pass --input"),
        ([f"--input={tmp_path}", "--max_aspect=0.5"], "error: --max_aspect=0.5 must be at"),
    ]
    for args, expected in cases:
        r = subprocess.run([sys.executable, "-m", "jaxt2i.data.builders",
                            f"--data_dir={tmp_path / 'd'}", *args], capture_output=True,
                           text=True, timeout=120, env=_env())
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected), (
            args, r.stderr)
    assert not (tmp_path / "d").exists()
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"pip install 'jaxt2i\[data\]'"):
        builders.shards_builder(str(tmp_path / "d"), str(tmp_path), "parquet")


def test_beam_without_apache_beam_is_one_line(tmp_path, monkeypatch):
    """--beam where apache-beam is not installed (this venv: it lives in a venv of its own)
    stops before anything is written, in one line naming the extra (in a venv that has it,
    its import is blocked to see the same); --beam_options without --beam is one line too."""
    blocked = ("import sys; sys.modules['apache_beam'] = None; "
               "from jaxt2i.data.builders.__main__ import cli; cli()")
    for args in (["--shapes=16:4", "--beam"],
                 [f"--input={tmp_path}", "--beam", "--beam_options=--direct_num_workers=2"]):
        r = subprocess.run([sys.executable, "-c", blocked, f"--data_dir={tmp_path / 'd'}",
                            *args], capture_output=True, text=True, timeout=120, env=_env())
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, (args, r.stderr)
        assert lines[0] == f"error: {builders.BEAM_MISSING}", lines
        assert "pip install 'jaxt2i[beam]'" in lines[0]
    assert not (tmp_path / "d").exists()
    monkeypatch.setitem(sys.modules, "apache_beam", None)
    with pytest.raises(ImportError, match=r"pip install 'jaxt2i\[beam\]'"):
        builders.build(builders.shapes_builder(str(tmp_path / "d"), 16, 4), beam_options="")
    assert not (tmp_path / "d").exists()
    r = subprocess.run([sys.executable, "-m", "jaxt2i.data.builders",
                        f"--data_dir={tmp_path / 'd'}", "--shapes=16:4",
                        "--beam_options=--direct_num_workers=2"],
                       capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: --beam_options applies with --beam only; add --beam or drop it"), r.stderr
