"""Tests of the TFDS builders: round trips without TensorFlow, and every bad-input kind."""

import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxt2i.data import builders, inputs, pipeline, shapes

_RNG = np.random.default_rng(0)
_RGB = _RNG.integers(0, 255, (40, 52, 3), np.uint8)


def _png(a, mode=None):
    buf = io.BytesIO()
    Image.fromarray(a, mode).save(buf, "PNG")
    return buf.getvalue()


def _make_images(root):
    """Writes one image per input kind; returns {file name: expected outcome}."""
    os.makedirs(os.path.join(root, "img"))
    def save(name, img, fmt=None):
        img.save(os.path.join(root, "img", name), fmt)
    save("ok.jpg", Image.fromarray(_RGB))
    save("gray.png", Image.fromarray(_RGB[..., 0]))
    save("rgba.png", Image.fromarray(np.dstack([_RGB, _RGB[..., :1]])))
    save("cmyk.jpg", Image.fromarray(_RGB).convert("CMYK"))
    save("deep.png", Image.fromarray(_RGB[..., 0].astype(np.uint16) * 257))  # 16-bit
    save("palette.gif", Image.fromarray(_RGB).convert("P"))
    save("small.png", Image.fromarray(_RGB[:12, :12]))  # kept, counted as small
    save("tiny.png", Image.fromarray(_RGB[:3, :3]))  # below min_size: skipped
    with open(os.path.join(root, "img", "truncated.png"), "wb") as f:
        f.write(_png(_RGB)[:300])
    with open(os.path.join(root, "img", "garbage.jpg"), "wb") as f:
        f.write(b"definitely not an image")
    for name in ("empty.png", "nocap.png", "latin1.png", "unicode.png"):
        save(name, Image.fromarray(_RGB))
    return {"ok.jpg": "un chat", "gray.png": "gray", "rgba.png": "rgba", "cmyk.jpg": "cmyk",
            "deep.png": "deep", "palette.gif": "palette", "small.png": "small",
            "tiny.png": "tiny", "truncated.png": "truncated", "garbage.jpg": "garbage",
            "empty.png": "   ", "nocap.png": None, "latin1.png": "caf\xe9 cr\xe8me",
            "unicode.png": "一只猫 🐈 ünïcode"}


_KEPT = {"ok.jpg", "gray.png", "rgba.png", "cmyk.jpg", "deep.png", "palette.gif", "small.png",
         "latin1.png", "unicode.png"}
_EXPECTED_COUNTS = {"ok": 9, "converted_L": 1, "converted_RGBA": 1, "converted_CMYK": 1,
                    "converted_I_16": 1, "converted_P": 1, "small": 1, "too_small": 1,
                    "truncated": 1, "unreadable": 1, "empty_caption": 1,
                    "missing_caption": 1, "non_utf8_caption": 1}


def _check(builder, report, bad_line=True):
    for kind, n in _EXPECTED_COUNTS.items():
        assert report.counts[kind] == n, (kind, report.summary())
    assert report.counts["missing_image"] == 1
    if bad_line:
        assert report.counts["bad_manifest_line"] == 1
    assert "img/truncated.png" in report.examples["truncated"]
    src = builder.as_data_source("train")
    assert len(src) == len(_KEPT)
    seen = {}
    for i in range(len(src)):
        rec = src[i]
        img = pipeline.decode_image(rec["image"])
        assert img.dtype == np.uint8 and img.shape[-1] == 3
        seen[rec["path"].decode()] = rec["caption"].decode()
    assert set(seen) == {f"img/{n}" for n in _KEPT}
    assert seen["img/latin1.png"] == "café crème"
    assert seen["img/unicode.png"] == "一只猫 🐈 ünïcode"
    with open(os.path.join(builder.data_dir, builders.REPORT_FILE)) as f:
        assert json.load(f)["counts"]["truncated"] == 1
    assert "tensorflow" not in sys.modules


def _caption_bytes(cap):
    return cap.encode("cp1252") if cap == "caf\xe9 cr\xe8me" else cap.encode()


def _jsonl_manifest(root, caps):
    """captions.jsonl for `_make_images`' files (raw caption bytes), plus a missing image and
    a line that is not JSON."""
    with open(os.path.join(root, "captions.jsonl"), "wb") as f:
        for name, cap in caps.items():
            row = {"image": f"img/{name}"}
            if cap is not None:
                row["caption"] = "@@"
            f.write(json.dumps(row, ensure_ascii=False).encode().replace(
                b"@@", _caption_bytes(cap) if cap is not None else b"") + b"\n")
        f.write(b'{"image": "img/missing.png", "caption": "gone"}\n{not json\n')


def test_jsonl_manifest(tmp_path):
    root = str(tmp_path / "photos")
    caps = _make_images(root)
    _jsonl_manifest(root, caps)
    b = builders.image_text_builder(str(tmp_path / "tfds"), root,
                                    os.path.join(root, "captions.jsonl"), min_size=8,
                                    small_warn=16, num_threads=2)
    _check(b, builders.build(b))
    assert builders.build(b).counts["ok"] == 9  # a second build reuses the data and report
    root_dir = str(tmp_path / "tfds")
    assert len(pipeline.open_source(root_dir, resolution=16, dataset="image_text/photos")) == 9
    batch = next(pipeline.make_pipeline(builders.load_source(b.data_dir), resolution=16,
                                        lowres=8, batch_size=3, process_count=1,
                                        process_index=0))
    assert batch["image"].shape == (3, 16, 16, 3) and batch["lowres"].shape == (3, 8, 8, 3)


def test_csv_manifest_and_validation_split(tmp_path):
    root = str(tmp_path / "photos")
    caps = _make_images(root)
    with open(os.path.join(root, "list.csv"), "wb") as f:
        f.write(b"file_name,caption\n")
        for name, cap in caps.items():
            text = "" if cap is None else cap
            line = io.StringIO()
            csv.writer(line).writerow([f"img/{name}", "@@"])
            f.write(line.getvalue().encode().replace(b"@@", _caption_bytes(text)))
        f.write(b"img/missing.png,gone\n,no image\n")
    b = builders.image_text_builder(str(tmp_path / "tfds"), root, os.path.join(root, "list.csv"),
                                    min_size=8, small_warn=16)
    report = builders.build(b)
    # CSV cannot tell an empty cell from a missing one: both are 'empty_caption'.
    assert report.counts["empty_caption"] == 2 and report.counts["ok"] == 9
    src = b.as_data_source("train")
    assert len(src) == 9
    v = builders.image_text_builder(str(tmp_path / "tfds"), root, os.path.join(root, "list.csv"),
                                    name="withval", min_size=8, val_fraction=0.5)
    builders.build(v)
    n_train, n_val = len(v.as_data_source("train")), len(v.as_data_source("validation"))
    assert n_train + n_val == 9 and n_val > 0


def test_sidecar_txt(tmp_path):
    root = str(tmp_path / "photos")
    caps = _make_images(root)
    for name, cap in caps.items():
        if cap is not None:
            with open(os.path.join(root, "img", os.path.splitext(name)[0] + ".txt"), "wb") as f:
                f.write(_caption_bytes(cap))
    b = builders.image_text_builder(str(tmp_path / "tfds"), root, min_size=8, small_warn=16)
    report = builders.build(b)
    for kind, n in _EXPECTED_COUNTS.items():
        assert report.counts[kind] == n, (kind, report.summary())
    assert len(b.as_data_source("train")) == len(_KEPT)


def test_a_build_from_other_inputs_is_never_returned_as_the_old_one(tmp_path):
    root, other = str(tmp_path / "photos"), str(tmp_path / "other" / "photos")
    for r, n in ((root, 3), (other, 5)):
        os.makedirs(r)
        for i in range(n):
            Image.new("RGB", (40, 40), (40 * i, 0, 0)).save(os.path.join(r, f"{i}.png"))
            with open(os.path.join(r, f"{i}.txt"), "w") as f:
                f.write(f"a red square number {i}")
    data = str(tmp_path / "tfds")
    builders.build(builders.image_text_builder(data, root))
    again = builders.image_text_builder(data, root)
    builders.build(again)  # the same inputs: the existing build
    assert len(again.as_data_source("train")) == 3
    assert not os.path.exists(os.path.join(data, "downloads"))  # no empty leftovers
    # Same name ('photos'), other folder / option / files: refused, naming the difference.
    for b, expected in [
        (builders.image_text_builder(data, other), f"root was '{root}'"),
        (builders.image_text_builder(data, root, min_size=32), "min_size was 0"),
    ]:
        with pytest.raises(ValueError, match=expected):
            builders.build(b)
    Image.new("RGB", (40, 40)).save(os.path.join(root, "new.png"))
    with open(os.path.join(root, "new.txt"), "w") as f:
        f.write("a black square")
    with pytest.raises(ValueError, match=r"input files changed.*6 files then, 8 now"):
        builders.build(builders.image_text_builder(data, root))
    # A killed build's incomplete directory is removed; --rebuild replaces the old build.
    config_dir = os.path.join(data, "image_text", "photos")
    os.makedirs(os.path.join(config_dir, "incomplete.ABCDEF_1.0.0"))
    b = builders.image_text_builder(data, root)
    builders.build(b, rebuild=True)
    assert len(builders.image_text_builder(data, root).as_data_source("train")) == 4
    assert not [d for d in os.listdir(config_dir) if d.startswith("incomplete.")]
    # Another build of the same dataset running now: refused, not interleaved.
    from jaxt2i.workdir import WorkdirLock

    with WorkdirLock(config_dir):
        with pytest.raises(ValueError, match="is in use by process"):
            builders.build(builders.image_text_builder(data, root))
    # Shapes: another split size under the same name is another dataset.
    builders.build(builders.shapes_builder(data, 16, 8))
    with pytest.raises(ValueError, match="test_size was 0 when it was built, now 4"):
        builders.build(builders.shapes_builder(data, 16, 8, test_size=4))
    r = subprocess.run([sys.executable, "-m", "jaxt2i.data.builders", f"--data_dir={data}",
                        "--shapes=16:8:4"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "pass --rebuild" in r.stderr


def test_coco_captions(tmp_path):
    root = str(tmp_path / "coco")
    caps = _make_images(root)
    images, anns = [], []
    for i, (name, cap) in enumerate(caps.items()):
        images.append({"id": i, "file_name": f"img/{name}"})
        if cap is not None:
            anns.append({"id": 2 * i, "image_id": i, "caption": "@@%d@@" % i})
            anns.append({"id": 2 * i + 1, "image_id": i, "caption": f"second caption {i}"})
    images.append({"id": 99, "file_name": "img/missing.png"})
    anns.append({"id": 999, "image_id": 99, "caption": "gone"})
    text = json.dumps({"images": images, "annotations": anns}, ensure_ascii=False).encode()
    for i, cap in enumerate(caps.values()):
        if cap is not None:
            text = text.replace(b"@@%d@@" % i, _caption_bytes(cap))
    with open(os.path.join(root, "captions_train.json"), "wb") as f:
        f.write(text)
    b = builders.image_text_builder(str(tmp_path / "tfds"), root,
                                    os.path.join(root, "captions_train.json"), min_size=8,
                                    small_warn=16)
    report = builders.build(b)
    assert report.counts["missing_image"] == 1 and report.counts["missing_caption"] == 1
    # Empty first caption but a real second one: the image is kept with the second.
    assert report.counts["empty_caption"] == 0 and report.counts["ok"] == 10
    rec = b.as_data_source("train")[0]
    lines = rec["captions"].decode().split("\n")
    assert len(lines) == 2 and lines[1].startswith("second caption")


def test_shapes_builder_round_trip(tmp_path):
    b = builders.shapes_builder(str(tmp_path), 24, 20, test_size=4, held_out_size=4, seed=2)
    assert builders.build(b).counts == {}
    src = b.as_data_source("train")
    assert len(src) == 20 and len(b.as_data_source("held_out")) == 4
    ref = shapes.ShapesSource(24, 20, "train", seed=2)
    for i in (0, 5):
        rec = src[i]
        want = ref[int(rec["index"])]
        assert rec["caption"].decode() == want["caption"]
        np.testing.assert_array_equal(pipeline.decode_image(rec["image"]), want["image"])
        assert json.loads(rec["scene"]) == json.loads(want["scene"])
    assert "tensorflow" not in sys.modules


def test_load_image_conversions():
    data, size, events = inputs.load_image(_png(_RGB[..., 0].astype(np.uint16) * 257))
    assert events == ["converted_I_16"] and size == (52, 40)
    np.testing.assert_array_equal(pipeline.decode_image(data)[..., 0], _RGB[..., 0])
    assert inputs.load_image(_png(_RGB), min_size=64)[0] is None
    data, size, events = inputs.load_image(_png(_RGB), max_size=20)
    assert events == ["downscaled"] and min(size) == 20
    assert inputs.load_image(b"")[2] == ["empty_file"]
    frames = [Image.fromarray(_RGB), Image.fromarray(255 - _RGB)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    data, size, events = inputs.load_image(buf.getvalue())
    assert events == ["animated_first_frame", "converted_P"] and size == (52, 40)
    first = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    np.testing.assert_array_equal(pipeline.decode_image(data), first)
    wide = _png(np.zeros((10, 80, 3), np.uint8))
    assert inputs.load_image(wide)[2] == ["extreme_aspect"]
    assert inputs.load_image(wide, max_aspect=8)[0] is not None
    assert inputs.decode_text(b"caf\xe9") == ("café", True)
    assert inputs.decode_text("  two\nlines ") == ("two lines", False)
    with pytest.raises(ValueError, match="unknown format"):
        list(inputs.read_entries("/tmp", None, "xml", inputs.Report()))


def test_absurd_inputs_are_skipped_or_repaired_and_reported(tmp_path):
    """The cases a scraped folder holds that used to pass silently or crash the build."""
    def png(w, h):
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (200, 10, 10)).save(buf, "PNG")
        return buf.getvalue()

    assert inputs.load_image(png(1, 1))[2] == ["too_small"]
    assert inputs.load_image(png(2000, 20))[2] == ["extreme_aspect"]
    assert inputs.load_image(png(64, 48))[0] is not None  # an ordinary photo shape is kept
    # UTF-16 (as Windows Notepad saves it) is read as text, not mojibake.
    assert inputs.decode_text("ein roter Kreis über".encode("utf-16")) == (
        "ein roter Kreis über", False)
    report = inputs.Report()
    caps = inputs._clean_captions([{"en": "a cat"}, 3, "x" * 10_000_000, "a dog"], "p", report)
    assert caps == ["x" * inputs.MAX_CAPTION_CHARS, "a dog"]
    assert report.counts["non_text_caption"] == 2 and report.counts["long_caption_cut"] == 1

    # Malformed COCO entries are reported and skipped; a non-COCO file is one line.
    root = tmp_path / "coco"
    root.mkdir()
    (root / "a.png").write_bytes(png(32, 32))
    (root / "b.png").write_bytes(png(32, 32))
    coco = {"images": [{"id": 1, "file_name": "a.png"}, "junk", {"id": "2", "file_name": 7},
                       {"id": 3, "file_name": "b.png"}],
            "annotations": [{"id": 1, "image_id": 1, "caption": "a red square"}, None,
                            {"id": 2, "image_id": [3]}, {"id": 3, "image_id": 3,
                                                         "caption": "a red box"}]}
    (root / "captions.json").write_text(json.dumps(coco))
    report = inputs.Report()
    rows = list(inputs.read_entries(str(root), str(root / "captions.json"), "coco", report))
    assert [(os.path.basename(p), c) for p, c in rows] == [("a.png", ["a red square"]),
                                                          ("b.png", ["a red box"])]
    assert report.counts["bad_manifest_line"] == 4
    (root / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be an object with 'images' and 'annotations'"):
        list(inputs.read_entries(str(root), str(root / "list.json"), "coco", inputs.Report()))
    r = subprocess.run([sys.executable, "-m", "jaxt2i.data.builders",
                        f"--data_dir={tmp_path / 'd'}", "--shapes=100000:1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: --shapes resolution 100000 must be between 8 and 4096 px")


def test_cli_mistakes_are_one_line_and_exit_2(tmp_path):
    cases = [
        (["--data_dir", str(tmp_path / "d"), "--root", str(tmp_path / "nope")],
         f"error: image folder '{tmp_path / 'nope'}' not found; pass an existing --root"),
        (["--shapes=16:8"], "Flag --data_dir must have a value"),
        ([f"--data_dir={tmp_path / 'd'}", "--shapes=16:8", f"--root={tmp_path}"],
         "Exactly one of (shapes, root, input)"),
        ([f"--data_dir={tmp_path / 'd'}", "--shapes=16:8", "--min_size=big"],
         "--min_size"),
    ]
    for args, expected in cases:
        r = subprocess.run([sys.executable, "-m", "jaxt2i.data.builders", *args],
                           capture_output=True, text=True, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and expected in lines[0], (args, r.stderr)
    assert not (tmp_path / "d").exists()
