"""Config plumbing: variants, overrides, validation, one-line CLI errors."""

import json
import os
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from jaxt2i.config import (ConfigError, explain_override, from_json, load_config_file,
                           parse_variant, to_json, validate)

CONFIG = textwrap.dedent('''
    import ml_collections
    from jaxt2i.config import parse_variant

    def get_config(arg=None):
        v = parse_variant(arg, {"size": "tiny", "steps": 10, "ema": True})
        c = ml_collections.ConfigDict()
        c.model = ml_collections.ConfigDict({"size": v["size"], "dtype": "float32"})
        c.train = ml_collections.ConfigDict({"steps": v["steps"], "lr": 1e-4, "ema": v["ema"]})
        return c
''')

CLI = textwrap.dedent('''
    from absl import flags
    from jaxt2i.cli import define_config_flag, run_app
    from jaxt2i.config import validate, ConfigError
    _C = define_config_flag()
    def main(argv):
        validate(_C.value, {"model.dtype": ("float32", "bfloat16"), "model.size": ("tiny", "demo")})
        print("OK", _C.value.model.size, _C.value.model.dtype, _C.value.train.steps, _C.value.train.lr)
    run_app(main)
''')


@pytest.fixture
def files(tmp_path):
    (tmp_path / "cfg.py").write_text(CONFIG)
    (tmp_path / "cli.py").write_text(CLI)
    return tmp_path


def test_variants(files):
    c = load_config_file(f"{files}/cfg.py:demo,steps=5,ema=false")
    assert (c.model.size, c.train.steps, c.train.ema) == ("demo", 5, False)
    assert load_config_file(f"{files}/cfg.py").model.size == "tiny"
    with pytest.raises(ConfigError, match=r"unknown config variant key 'sise'; allowed: size, steps, ema"):
        parse_variant("sise=demo", {"size": "tiny", "steps": 10, "ema": True})
    with pytest.raises(ConfigError, match=r"steps='many' is not a int"):
        parse_variant("steps=many", {"size": "tiny", "steps": 10})


def test_validate_and_explain():
    c = ml_collections.ConfigDict({"model": {"dtype": "float8", "size": "tiny"}})
    with pytest.raises(ConfigError, match=r"model.dtype='float8' is not allowed.*allowed values: float32, bfloat16"):
        validate(c, {"model.dtype": ("float32", "bfloat16")})
    validate(c, {"model.size": ("tiny",), "absent.field": ("x",)})
    msg = explain_override(c, "model.dtpye", "bfloat16")
    assert "unknown config field 'model.dtpye'" in msg and "did you mean 'model.dtype'" in msg
    assert "fields of model: dtype, size" in msg
    assert explain_override(c, "model.size", "demo") is None
    c2 = ml_collections.ConfigDict({"train": {"steps": 3}})
    assert "must be a int" in explain_override(c2, "train.steps", "lots")
    assert "is a group" in explain_override(c2, "train", "1")


def test_json_round_trip():
    c = ml_collections.ConfigDict({"a": {"b": [1, 2], "c": "x"}, "d": 1.5})
    assert from_json(to_json(c)).to_dict() == c.to_dict()


def _run(files, *args):
    return subprocess.run([sys.executable, str(files / "cli.py"), *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_overrides_and_one_line_errors(files):
    ok = _run(files, f"--config={files}/cfg.py:demo", "--config.train.lr=0.5",
              "--config.model.dtype=bfloat16")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split() == ["OK", "demo", "bfloat16", "10", "0.5"]

    cases = [
        (["--config.train.lerning_rate=1"], "unknown config field 'train.lerning_rate'"),
        (["--config.train.steps=ten"], "train.steps='ten' must be a int"),
        (["--config.model.dtype=float8"], "model.dtype='float8' is not allowed"),
    ]
    for extra, expected in cases:
        r = _run(files, f"--config={files}/cfg.py", *extra)
        assert r.returncode == 2, (extra, r.stderr)
        lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and expected in lines[0], (extra, r.stderr)
    r = _run(files, f"--config={files}/missing.py")
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr


def test_encode_cli(tmp_path):
    out = tmp_path / "emb.safetensors"
    r = subprocess.run([sys.executable, "-m", "jaxt2i.encode", "--prompt", "a red circle",
                        "--prompt", "", "--out", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    from safetensors.numpy import load_file
    t = load_file(str(out))
    assert t["embeddings"].shape[0] == 2 and t["mask"].sum(1).tolist()[1] == 1
    r = subprocess.run([sys.executable, "-m", "jaxt2i.encode"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no prompts" in r.stderr


@pytest.mark.parametrize("spec", [
    "base.py:tiny", "base.py:demo", "base.py:bench_23m", "base.py:paper_base64",
    "sr.py:tiny_sr", "sr.py:demo_sr", "sr.py:bench_sr22m", "sr.py:paper_sr256",
    "sr.py:paper_sr1024"])
def test_every_shipped_config_variant_is_valid(spec):
    import os

    from jaxt2i.models.unet import UNetConfig
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    c = load_config_file(os.path.join(root, spec))
    validate(c)
    unet = UNetConfig.from_dict(c.model.to_dict())
    assert unet.is_sr == spec.startswith("sr.py")  # the stage kind is the model's lowres_size
    assert from_json(to_json(c)).to_dict() == json.loads(to_json(c))
    if "paper" in spec:
        assert c.text.encoder == "google/t5-v1_1-xxl" and unet.text_dim == 4096
        # Imagen (arXiv 2205.11487): unweighted eps loss, augmentation levels in [0, 1],
        # Nichol & Dhariwal's cosine for the base and 64->256, linear for 256->1024.
        assert unet.objective == "eps" and c.diffusion.loss_weighting == "uniform"
        assert c.diffusion.aug_max_level == 1.0 and c.diffusion.aug_order == "resize_first"
        want = "linear" if spec.endswith("1024") else "cosine_offset"
        assert c.diffusion.schedule == want
        assert c.train.optimizer == ("adafactor" if spec.startswith("base") else "adamw")


def test_config_variant_with_unknown_size_is_one_line():
    with pytest.raises(ValueError, match="paper_base65"):
        load_config_file(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                      "configs", "base.py:paper_base65"))
