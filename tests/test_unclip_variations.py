"""What only unCLIP can do (`UnCLIP.variations`, `interpolate`, `text_diff`; the CLI's
--variations_of, --interpolate, --text_diff), on a tiny random unCLIP cascade: the decoder gets
the image's CLIP embedding (checked against a separately loaded CLIP), slerp against its
geometry, interpolation frames share one noise, the documented commands in fresh processes."""

import json
import os
import re
import shlex
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from unclip_helpers import build_unclip_dir, pipe  # noqa: F401 (a fixture)

from jaxt2i.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _image(seed, h=40, w=24):
    """A blocky random RGB image, not square (CLIP's resize + centre crop apply)."""
    small = np.random.default_rng(seed).integers(0, 256, (h // 8, w // 8, 3), np.uint8)
    return np.kron(small, np.ones((8, 8, 1), np.uint8))


@pytest.fixture(scope="module")
def unclip_dir(tmp_path_factory):
    root = build_unclip_dir(tmp_path_factory.mktemp("unclip"))
    for name, seed in (("a.png", 1), ("b.png", 2)):
        Image.fromarray(_image(seed)).save(root / name)
    return root


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "jaxt2i.sample", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)


def _decoded(pipe, z, seed, eta, shared=False):
    """The pipeline's decoder -> SR path (`generate`'s, checked against the stages called
    directly in test_unclip_pipeline) on embeddings z [B, P], empty caption, seed's keys."""
    from jaxt2i import diffusion

    key = jax.random.split(jax.random.key(seed))[1]
    return pipe._decode(z, [""] * (1 if shared else len(z)), key,
                        sampler=diffusion.DDIM(eta=eta), shared=shared)


def _differ(a, b):
    return np.abs(a.astype(int) - b.astype(int)).max() > 0


def test_slerp_and_text_diff_follow_the_great_circle():
    from jaxt2i.pipelines.unclip import slerp, text_diff_embeds

    rng = np.random.default_rng(0)
    a, b = 3.0 * rng.standard_normal(16), 0.5 * rng.standard_normal(16)
    ua, ub = a / np.linalg.norm(a), b / np.linalg.norm(b)
    t = np.linspace(0.0, 1.0, 6)
    z = slerp(a, b, t).astype(np.float64)
    np.testing.assert_allclose(z[0], ua, atol=1e-6)   # the endpoints: the unit inputs
    np.testing.assert_allclose(z[-1], ub, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-6)  # unit all along
    omega = np.arccos(ua @ ub)
    angle = np.arctan2(np.linalg.norm(z - np.outer(z @ ua, ua), axis=1), z @ ua)
    np.testing.assert_allclose(angle, t * omega, atol=1e-6)  # grows linearly with t
    basis = np.linalg.qr(np.stack([ua, ub], 1))[0]  # in the plane of a and b
    np.testing.assert_allclose(z - z @ basis @ basis.T, 0.0, atol=1e-6)
    np.testing.assert_allclose(slerp(a, 2 * a, t), np.tile(ua, (6, 1)), atol=1e-6)
    with pytest.raises(ValueError, match="opposite"):
        slerp(a, -a, t)

    old, new = rng.standard_normal(16), rng.standard_normal(16)
    d = (new - old) / np.linalg.norm(new - old)   # paper sec. 3.3: z_d
    z = text_diff_embeds(a, old, new, [0.0, 0.5, 1.0]).astype(np.float64)
    np.testing.assert_allclose(z[0], ua, atol=1e-6)
    np.testing.assert_allclose(z[2], d, atol=1e-6)
    np.testing.assert_allclose(z[1] @ ua, z[1] @ d, atol=1e-6)  # halfway: equal angles
    with pytest.raises(ConfigError, match="same CLIP text embedding"):
        text_diff_embeds(a, old, old, [0.0, 1.0])


def test_variations_decode_the_images_clip_embedding(pipe):
    from jaxt2i.prior_stage import resolve_clip_path
    from jaxt2i.text.clip_convert import load_clip

    image = _image(1)
    clip = load_clip(resolve_clip_path(pipe.stages[0].config.clip))  # loaded apart from pipe
    ref = np.asarray(clip.encode_image(image[None]).embeds, np.float64)
    ref /= np.linalg.norm(ref)
    np.testing.assert_allclose(pipe.image_embeds([image]), ref, atol=1e-6)

    got = pipe.variations(image, num_images=2, seed=3, eta=1.0)
    np.testing.assert_array_equal(got, _decoded(pipe, np.repeat(ref, 2, 0), 3, 1.0))
    assert got.shape == (2, 32, 32, 3) and _differ(got[0], got[1])  # each its own noise
    assert _differ(got, pipe.variations(image, num_images=2, seed=4, eta=1.0))  # seeds
    other = pipe.variations(_image(2), num_images=2, seed=3, eta=1.0)
    assert _differ(got, other)  # another image's embedding: other images
    det = pipe.variations(image, num_images=2, seed=3, eta=0.0)
    assert _differ(det, got)  # eta matters
    np.testing.assert_array_equal(det, pipe.variations(image, num_images=2, seed=3, eta=0.0))


def test_interpolation_frames_differ_only_through_the_embedding(pipe):
    from jaxt2i.pipelines.unclip import slerp

    a, b = _image(1), _image(2)
    same = pipe.interpolate(a, a, frames=3, seed=0, eta=1.0)  # step noise shared too
    assert same.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(same, np.stack([same[0]] * 3))
    frames = pipe.interpolate(a, b, frames=3, seed=0, eta=1.0)
    np.testing.assert_array_equal(frames[0], same[0])  # frame 0 is A's embedding
    assert _differ(frames[1], frames[0]) and _differ(frames[2], frames[1])
    za, zb = pipe.image_embeds([a, b])  # the frames decode slerp(z_a, z_b, k / 2)
    np.testing.assert_array_equal(frames, _decoded(pipe, slerp(za, zb, [0, 0.5, 1]), 0, 1.0,
                                                   shared=True))

    edit = pipe.text_diff(a, "a red circle", "a blue circle", frames=3, seed=0, eta=1.0)
    np.testing.assert_array_equal(edit[0], same[0])  # theta 0: the image's own embedding
    assert _differ(edit[2], edit[0])


def test_bad_options_are_one_line(pipe):
    with pytest.raises(ConfigError, match="frames=1 must be an integer >= 2"):
        pipe.interpolate(_image(1), _image(2), frames=1)
    with pytest.raises(ConfigError, match="eta=-1.0 must be a number >= 0"):
        pipe.variations(_image(1), eta=-1.0)
    with pytest.raises(ConfigError, match="max_theta=1.5 must be in"):
        pipe.text_diff(_image(1), "a red circle", "a blue circle", max_theta=1.5)


def _doc_commands():
    with open(os.path.join(ROOT, "docs", "unclip.md")) as f:
        docs = f.read()
    return [line for line in re.findall(r"^python -m jaxt2i\.sample .*$", docs, re.M)
            if any(f in line for f in ("--variations_of", "--interpolate", "--text_diff"))]


def test_documented_commands_run_in_fresh_processes(unclip_dir, pipe, tmp_path):
    """The three commands of docs/unclip.md, run at once (one process each: most of their
    time is start-up), on this module's cascade and images."""
    commands = _doc_commands()
    assert len(commands) == 3, commands
    runs = []
    for command in commands:
        args = [a.replace("runs/unclip", str(unclip_dir)).replace(
            "a.png,b.png", f"{unclip_dir / 'a.png'},{unclip_dir / 'b.png'}").replace(
            "photo.png", str(unclip_dir / "a.png")) for a in shlex.split(command)[3:]]
        out = tmp_path / next(a[6:] for a in args if a.startswith("--out="))
        args = [f"--out={out}" if a.startswith("--out=") else a for a in args]
        runs.append((command, out, subprocess.Popen(
            [sys.executable, "-m", "jaxt2i.sample", *args], cwd=ROOT, env=ENV,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for command, out, proc in runs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, (command, stderr[-3000:])
        with open(out / "sample.json") as f:
            record = json.load(f)
        images = np.stack([np.asarray(Image.open(out / n)) for n in record["images"]])
        want = {"variations": 2, "interpolate": 5, "text_diff": 4}[record["mode"]]
        assert images.shape == (want, 32, 32, 3) and _differ(images[0], images[-1])
        if record["mode"] == "variations":  # the API makes the same images
            np.testing.assert_array_equal(images, pipe.variations(
                _image(1), num_images=2, seed=record["seed"]))


@pytest.mark.parametrize("args, line", [
    (["--variations_of=missing.png"], "--variations_of 'missing.png' does not exist"),
    (["--interpolate=a.png,b.png", "--frames=1"], "frames=1 must be an integer >= 2"),
    (["--variations_of=a.png", "--frames=3"], "--frames does not apply to --variations_of"),
])
def test_cli_bad_input_is_one_line(unclip_dir, args, line):
    r = _cli(f"--checkpoint={unclip_dir}", *args)
    assert r.returncode != 0 and line in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_cli_refuses_image_modes_without_an_unclip_cascade(tmp_path):
    r = _cli(f"--checkpoint={tmp_path}", "--variations_of=a.png", f"--out={tmp_path / 'o'}")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--variations_of needs an unCLIP cascade" in r.stderr, r.stderr
