"""Bad values on the command line: one line naming the value and the fix, exit 2, no work
done and no file written (each in a fresh process, as a user runs it)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, cwd):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_sample_refuses_bad_values_in_one_line(tmp_path):
    latin1 = tmp_path / "prompts.txt"
    latin1.write_bytes("a red circle caf\xe9\n".encode("latin-1"))
    out = tmp_path / "out"
    cases = [
        (["--guidance=nan"], "--guidance=nan is out of range"),
        (["--guidance=inf"], "--guidance=inf is out of range"),
        (["--guidance=3,nan"], "--guidance=nan is out of range"),
        (["--aug_level=5"], "--aug_level=5.0 is out of range"),
        (["--steps=0"], "--steps=0 is out of range"),
        (["--stages=0"], "--stages (0) must be between 1 and 2"),
        (["--num_images=100000"], "100000 images in one batch; at most 1024"),
        ([f"--seed={2 ** 70}"], "--seed=1180591620717411303424 must be in [0, 2**63)"),
        ([f"--prompts_file={latin1}"], "is not UTF-8 text (byte b'\\xe9' at offset 16)"),
    ]
    for extra, expected in cases:
        prompt = [] if any(a.startswith("--prompts_file") for a in extra) else ["--prompt=a red circle"]
        r = _run(["jaxt2i.sample", *prompt, f"--out={out}", *extra], tmp_path)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == 2, (extra, r.stderr[-2000:])
        assert len(lines) == 1 and expected in lines[0], (extra, r.stderr[-2000:])
        assert not out.exists() or not os.listdir(out), extra  # nothing written


def test_stablehlo_export_refuses_a_nan_guidance(tmp_path):
    r = _run(["jaxt2i.export", "--format=stablehlo", f"--out={tmp_path / 'hlo'}",
              "--guidance=nan"], tmp_path)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert "--guidance=nan is out of range" in lines[0]
    assert not (tmp_path / "hlo").exists()


def test_encode_refuses_bad_lengths_and_a_directory_out(tmp_path):
    for extra, expected in [
        (["--max_length=0"], "--max_length=0 must be between 1 and 4096"),
        (["--max_length=100000"], "--max_length=100000 must be between 1 and 4096"),
        ([f"--out={tmp_path}"], f"--out={tmp_path} is a directory; give a file path"),
    ]:
        r = _run(["jaxt2i.encode", "--prompt=a red circle", *extra], tmp_path)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == 2 and len(lines) == 1 and expected in lines[0], (extra, r.stderr)
    assert os.listdir(tmp_path) == []  # no DIR.tmp or other leftovers
    # A truncated model.safetensors of a text encoder.
    import shutil

    from jaxt2i import assets

    enc = tmp_path / "enc"
    shutil.copytree(assets.text_encoder_dir(), enc)
    raw = (enc / "model.safetensors").read_bytes()
    (enc / "model.safetensors").write_bytes(raw[:len(raw) // 2])
    r = _run(["jaxt2i.encode", "--prompt=a red circle", f"--text_encoder={enc}"], tmp_path)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert "model.safetensors is not a readable safetensors file" in lines[0]


def _doctored(src, dst, stage="base", edit=None, cascade=None):
    import json
    import shutil

    shutil.copytree(src, dst)
    path = dst / stage / "export" / "config.json"
    meta = json.loads(path.read_text())
    if edit is not None:
        meta = edit(meta)
    path.write_text(json.dumps(meta))
    if cascade is not None:
        (dst / "cascade.json").write_text(json.dumps(cascade))
    return dst


def test_sample_refuses_a_damaged_checkpoint_in_one_line(tiny_cascade_dir, tmp_path):
    def wider(m):
        m["config"]["model"]["base_channels"] *= 2
        return m

    def no_sample(m):
        del m["config"]["sample"]
        return m

    def hub(m):
        m["config"]["text"]["encoder"] = "someorg/some-t5"
        return m

    cases = [
        (_doctored(tiny_cascade_dir, tmp_path / "a", edit=wider),
         r"param \S+ has shape .* config.json and params.safetensors are from different models"),
        (_doctored(tiny_cascade_dir, tmp_path / "b", edit=no_sample), "lacks its 'sample' section"),
        (_doctored(tiny_cascade_dir, tmp_path / "c", edit=lambda m: [m]),
         "is not a stage export's config"),
        (_doctored(_doctored(tiny_cascade_dir, tmp_path / "d0", edit=hub), tmp_path / "d",
                   stage="sr", edit=hub),
         "text encoder 'someorg/some-t5' .* is not a local directory; pass --text_encoder=DIR"),
    ]
    import re

    for ckpt, expected in cases:
        r = _run(["jaxt2i.sample", f"--checkpoint={ckpt}", "--prompt=a red circle",
                  f"--out={tmp_path / 'out'}"], tmp_path)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == 2 and len(lines) == 1, (ckpt, r.stderr[-2000:])
        assert re.search(expected, lines[0]), (ckpt, lines[0])
    assert not (tmp_path / "out").exists()
    # A 10,000-character prompt: the error names it shortened, not in full.
    r = _run(["jaxt2i.sample", f"--checkpoint={tiny_cascade_dir}", "--prompt=" + "a " * 5000,
              f"--out={tmp_path / 'out'}"], tmp_path)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and len(lines[0]) < 300, r.stderr[-500:]


def test_a_cascade_naming_stages_elsewhere_says_so(tiny_cascade_dir, tmp_path):
    import json

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "cascade.json").write_text(json.dumps(
        {"stages": [str(tiny_cascade_dir / "base" / "export"), "../c2/sr"]}))
    import shutil

    shutil.copytree(tiny_cascade_dir / "sr", tmp_path / "c2" / "sr")
    r = _run(["jaxt2i.sample", f"--checkpoint={tmp_path / 'c'}", "--prompt=a red circle",
              "--steps=1", f"--out={tmp_path / 'out'}"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    warned = [x for x in r.stderr.splitlines() if "outside the cascade directory" in x]
    assert len(warned) == 2 and str(tiny_cascade_dir / "base" / "export") in warned[0]


def test_stage_settings_refuse_nan_and_out_of_range_values():
    """The Python API (and a saved stage config) checks what the flags check."""
    from jaxt2i.cascade import StageSettings
    from jaxt2i.config import ConfigError

    ok = dict(sampler="ddim", steps=4, guidance=3.0, thresholding="static", aug_level=0.1)
    StageSettings(**ok)
    for bad, expected in [({"guidance": float("nan")}, "sample.guidance=nan"),
                          ({"guidance": float("inf")}, "sample.guidance=inf"),
                          ({"aug_level": 5.0}, "sample.aug_level=5.0"),
                          ({"steps": 0}, "sample.steps=0")]:
        with pytest.raises(ConfigError, match=expected):
            StageSettings(**{**ok, **bad})
