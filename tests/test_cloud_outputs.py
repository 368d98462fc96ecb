"""Outputs at URLs: workdirs (checkpoints, metrics, samples), exports, the text cache and
TFDS data_dirs at real `gs://` URLs, served by a local GCS emulator (`gcs_emulator.py`: gcsfs,
etils.epath and TensorStore all talk to it; nothing leaves the machine), and `memory://`
where the code path is plain fsspec. Each is compared with the same thing written to a local
folder."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxt2i import paths
from jaxt2i.config import ConfigError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gcsfs") is None
    or importlib.util.find_spec("gcp_storage_emulator") is None,
    reason="needs gcsfs and gcp-storage-emulator (the `test` extra)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A running emulator; yields it (its `env` is set in this process while it runs)."""
    from gcs_emulator import Emulator

    with Emulator(str(tmp_path_factory.mktemp("gcs") / "emulator.log")) as emu:
        yield emu


@pytest.fixture
def bucket(gcs, request):
    """'gs://BUCKET/<this test's name>'."""
    from gcs_emulator import BUCKET

    return f"gs://{BUCKET}/{request.node.name}"


def _listing(url):
    fs, root = paths.filesystem(url)
    return sorted(posix[len(root) + 1:] for posix in fs.find(root))


def test_write_helpers_on_gs_memory_and_disk(tmp_path, bucket):
    mem = f"memory://{tmp_path.name}"
    for base in (bucket, mem, str(tmp_path / "disk")):
        paths.makedirs(paths.join(base, "d"))
        paths.write_text(paths.join(base, "d", "a.json"), '{"x": 1}')
        paths.write_bytes(paths.join(base, "d", "a.json"), b'{"x": 2}')  # replaced whole
        assert json.loads(paths.read_text(paths.join(base, "d", "a.json"))) == {"x": 2}
        assert paths.getsize(paths.join(base, "d", "a.json")) == 8
        with paths.local_file(paths.join(base, "d", "b.bin")) as local:
            assert not paths.is_url(local)
            with open(local, "wb") as f:
                f.write(b"\x00" * 1000)
        with paths.local_dir(paths.join(base, "e")) as local:
            os.makedirs(os.path.join(local, "sub"))
            with open(os.path.join(local, "sub", "c.txt"), "w") as f:
                f.write("c")
        assert paths.read_bytes(paths.join(base, "d", "b.bin")) == b"\x00" * 1000
        assert paths.read_text(paths.join(base, "e", "sub", "c.txt")) == "c"
        paths.move(paths.join(base, "e"), paths.join(base, "moved"))
        assert not paths.exists(paths.join(base, "e", "sub", "c.txt"))
        assert paths.read_text(paths.join(base, "moved", "sub", "c.txt")) == "c"
        time.sleep(0.01)  # a rewrite below has another modification time on every store
        copy = tmp_path / f"copy_{paths.protocol(base) or 'local'}"
        assert paths.download(paths.join(base, "moved"), str(copy)) == 1
        assert paths.download(paths.join(base, "moved"), str(copy)) == 0  # already there
        assert (copy / "sub" / "c.txt").read_text() == "c"
        paths.write_text(paths.join(base, "moved", "sub", "c.txt"), "C")  # same size, rewritten
        assert paths.download(paths.join(base, "moved"), str(copy)) == 1
        assert (copy / "sub" / "c.txt").read_text() == "C"
        paths.remove(paths.join(base, "d", "a.json"))
        with pytest.raises(FileNotFoundError):
            paths.remove(paths.join(base, "d", "a.json"))
        paths.rmtree(paths.join(base, "moved"))
        paths.rmtree(paths.join(base, "never_was"))
        assert not paths.exists(paths.join(base, "moved", "sub", "c.txt"))
    assert sorted(os.listdir(tmp_path / "disk" / "d")) == ["b.bin"]  # no temporary files


def test_workdir_checks_on_gs(bucket):
    from jaxt2i.workdir import WorkdirLock, check_writable

    run = f"{bucket}/run"
    assert check_writable(run, "--workdir", urls=True) == run
    assert not paths.exists(run) or _listing(run) == []  # the probe is gone
    paths.write_text(f"{bucket}/file", "x")
    with pytest.raises(ConfigError, match=rf"^--out={bucket}/file is a file, not a directory"):
        check_writable(f"{bucket}/file", "--out", urls=True)
    with pytest.raises(ConfigError, match=rf"^--out={run}: this output is written to local "
                       "folders only; pass a local path$"):  # a command that writes no URLs
        check_writable(run, "--out")
    said = []
    with WorkdirLock(run, log=said.append):  # an object store has no flock
        pass
    assert said == [f"{run} is not locked (a URL cannot be); make sure no other run writes "
                    "to it"]


def _state(seed):
    rng = np.random.default_rng(seed)
    return {"ema_params": {"w": rng.normal(size=(4, 3)).astype(np.float32)},
            "step": np.int32(seed)}


def _abstract(tree):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype,
                                                       sharding=sharding), tree)


def test_checkpoints_on_gs_resume_keep_and_set_aside(bucket):
    """Orbax on gs:// (TensorStore's GCS driver): saves commit with commit_success.txt,
    retention deletes, restore reads back, another model is refused, and an unreadable
    newest step is set aside to corrupt_checkpoints/ on the bucket."""
    from jaxt2i.checkpoint import CheckpointMismatch, Checkpointer

    run = f"{bucket}/run"
    config = {"model": {"channels": 8}}
    ck = Checkpointer(run, max_to_keep=2, async_save=False)
    for step in (1, 2, 3):
        ck.save(step, _state(step), {"pos": step}, config)
    ck.wait()
    assert ck.all_steps() == [2, 3]
    names = _listing(run)
    assert "checkpoints/3/commit_success.txt" in names and not any(
        n.startswith("checkpoints/1/") for n in names)
    ck.close()

    ck = Checkpointer(run, max_to_keep=2)
    step, state, data, saved = ck.restore(_abstract(_state(0)), config)
    assert (step, data, saved) == (3, {"pos": 3}, config)
    np.testing.assert_array_equal(state["ema_params"]["w"], _state(3)["ema_params"]["w"])
    with pytest.raises(CheckpointMismatch, match="model.channels: checkpoint 8, config 16"):
        ck.restore(_abstract(_state(0)), {"model": {"channels": 16}})
    fs, root = paths.filesystem(run)
    for name in fs.find(f"{root}/checkpoints/3/state"):  # damage the newest step's arrays
        if "/d/" in name:
            fs.pipe(name, b"garbage")
    step, state, _, _ = ck.restore(_abstract(_state(0)), config)
    assert step == 2
    np.testing.assert_array_equal(state["ema_params"]["w"], _state(2)["ema_params"]["w"])
    assert ck.all_steps() == [2]
    aside = paths.listdir(f"{run}/corrupt_checkpoints")
    assert len(aside) == 1 and aside[0].startswith("3-")
    ck.close()


def test_exports_on_gs_read_as_local_ones(tmp_path, bucket):
    from jaxt2i.checkpoint import EXPORT_PARAMS, export_params, load_exported
    from jaxt2i.config import load_config_file, to_json

    config = json.loads(to_json(load_config_file(os.path.join(ROOT, "configs/base.py:tiny"))))
    params = {"a": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": np.ones(4)}
    export_params(params, config, f"{bucket}/export", step=7)
    export_params(params, config, str(tmp_path / "export"), step=7)
    assert _listing(f"{bucket}/export") == ["config.json", EXPORT_PARAMS]
    assert paths.read_bytes(f"{bucket}/export/{EXPORT_PARAMS}") == (
        tmp_path / "export" / EXPORT_PARAMS).read_bytes()
    got, cfg, step = load_exported(f"{bucket}/export")
    want, want_cfg, _ = load_exported(str(tmp_path / "export"))
    assert step == 7 and cfg == want_cfg
    np.testing.assert_array_equal(got["a"]["w"], want["a"]["w"])
    from jaxt2i.stage import resolve_export_dir

    assert resolve_export_dir(bucket) == f"{bucket}/export"  # a workdir's export/


def test_format_exports_to_gs_replace_only_an_export(bucket):
    """`python -m jaxt2i.export --out=gs://...`'s folder: written locally, uploaded when
    complete (manifest.json last); a non-empty --out needs --overwrite and an export there."""
    from jaxt2i.export.common import MANIFEST, staging_dir

    out = f"{bucket}/export_pt"

    def export(files, overwrite=False):
        with staging_dir(out, overwrite) as root:
            assert not paths.is_url(root)
            for name, text in files.items():
                os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
                with open(os.path.join(root, name), "w") as f:
                    f.write(text)

    export({"stage0/model.safetensors": "v1", MANIFEST: '{"format": "torch"}'})
    assert _listing(out) == [MANIFEST, "stage0/model.safetensors"]
    with pytest.raises(ConfigError, match=rf"^--out '{out}' is not empty; pass --overwrite"):
        export({MANIFEST: "{}"})
    with pytest.raises(RuntimeError):  # a failed export leaves the earlier one as it was
        with staging_dir(out, overwrite=True):
            raise RuntimeError("conversion failed")
    assert paths.read_text(f"{out}/stage0/model.safetensors") == "v1"
    export({"stage0/model.safetensors": "v2", "x.json": "{}", MANIFEST: '{"format": "torch"}'},
           overwrite=True)
    assert _listing(out) == [MANIFEST, "stage0/model.safetensors", "x.json"]
    assert paths.read_text(f"{out}/stage0/model.safetensors") == "v2"
    paths.write_text(f"{bucket}/notes/a.txt", "mine")
    with pytest.raises(ConfigError, match="is not an earlier export"):
        with staging_dir(f"{bucket}/notes", overwrite=True):
            pass
    assert paths.read_text(f"{bucket}/notes/a.txt") == "mine"


def test_metrics_and_sample_grids_on_gs(bucket):
    from jaxt2i.images import save_grid
    from jaxt2i.monitor import MetricWriter

    run = f"{bucket}/run"
    w = MetricWriter(run, sync_every_s=0.0)
    w.scalars(1, {"loss": 0.5})
    assert paths.read_text(f"{run}/metrics.jsonl") == '{"step": 1, "loss": 0.5}\n'
    w.close()
    w = MetricWriter(run)  # a resumed run appends
    w.scalars(2, {"loss": 0.25})
    w.close()
    rows = [json.loads(r) for r in paths.read_text(f"{run}/metrics.jsonl").splitlines()]
    assert rows == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
    assert any(n.startswith("tensorboard/events.out.tfevents") for n in _listing(run))
    images = np.random.default_rng(0).integers(0, 255, (3, 8, 8, 3), dtype=np.uint8)
    grid = save_grid(images, f"{run}/samples/step_0000002.png")
    from PIL import Image
    import io

    back = np.asarray(Image.open(io.BytesIO(paths.read_bytes(f"{run}/samples/step_0000002.png"))))
    np.testing.assert_array_equal(back, grid)


def test_text_cache_on_gs_as_on_disk(tmp_path, bucket):
    from jaxt2i.data import text_cache
    from test_data_text_cache import FakeEncoder

    caps = ["a red circle", "two small green triangles", "", "ünï 猫"] * 5
    enc = FakeEncoder()
    local = text_cache.build_text_cache(enc, caps, str(tmp_path / "c"), shard_size=6,
                                        batch_size=4, log_every=0)
    url = f"{bucket}/cache"
    index = text_cache.build_text_cache(enc, caps, url, shard_size=6, batch_size=4, log_every=0)
    assert {k: v for k, v in index.items() if k != "build"} == {
        k: v for k, v in local.items() if k != "build"}
    assert sorted(_listing(url)) == sorted(os.listdir(tmp_path / "c"))
    a, b = text_cache.TextCache(url), text_cache.TextCache(str(tmp_path / "c"))
    for i in range(len(caps)):
        ea, ma = a[i]
        eb, mb = b[i]
        np.testing.assert_array_equal(ea.view(np.uint16), eb.view(np.uint16))
        np.testing.assert_array_equal(ma, mb)
        a.check_caption(i, caps[i])
    with pytest.raises(ValueError, match="does not match the dataset: example 0"):
        a.check_caption(0, "another caption")
    calls = enc.calls  # a rerun (a resumed build) encodes nothing again
    text_cache.build_text_cache(enc, caps, url, shard_size=6, batch_size=4, log_every=0)
    assert enc.calls == calls
    caps[0] = "a blue square"  # shard 0 changes: its old files are removed
    text_cache.build_text_cache(enc, caps, url, shard_size=6, batch_size=4, log_every=0)
    assert len(_listing(url)) == len(os.listdir(tmp_path / "c"))
    assert enc.calls == calls + 2


def test_dataset_built_to_gs_reads_as_the_local_one(tmp_path, bucket, monkeypatch):
    from jaxt2i.data import builders, pipeline

    monkeypatch.setenv("JAXT2I_CACHE", str(tmp_path / "cache"))
    url = f"{bucket}/tfds"
    b_url = builders.shapes_builder(url, 16, 8, test_size=2)
    b_disk = builders.shapes_builder(str(tmp_path / "tfds"), 16, 8, test_size=2)
    builders.build(b_url)
    builders.build(b_disk)
    where = builders.dataset_location(b_url)
    assert where == f"{url}/shapes_world/r16_n8_s0/1.0.0"
    assert not os.path.exists(tmp_path / "cache" / "staging") or not os.listdir(
        tmp_path / "cache" / "staging")  # the staging folder is removed after the upload
    names = _listing(where)
    assert "dataset_info.json" in names and builders.INPUTS_FILE in names
    assert sum(n.endswith(tuple(f"-of-{k:05d}" for k in range(1, 9))) for n in names) >= 2
    builders.build(builders.shapes_builder(url, 16, 8, test_size=2))  # kept: same inputs
    for split in ("train", "test"):
        got = pipeline.open_source(url, resolution=16, split=split)  # as training opens it
        want = b_disk.as_data_source(split)
        assert len(got) == len(want)
        for i in range(len(want)):
            assert got[i]["caption"] == want[i]["caption"]
            np.testing.assert_array_equal(got[i]["image"], want[i]["image"])


def _run(args, env, timeout=600):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-3000:])
    return r


@pytest.mark.slow
def test_commands_end_to_end_on_gs(tmp_path, gcs, bucket):
    """The documented commands with gs:// paths, each in a fresh process: build a dataset to
    gs://, its text cache to gs://, train 2 steps on both with checkpoints there, resume to 3,
    export the checkpoint to gs://, and sample from the run's gs:// export (to a local folder)
    and from that export (to gs://): the same images."""
    env = dict(os.environ, **gcs.env, JAX_PLATFORMS="cpu", JAXT2I_CACHE=str(tmp_path / "cache"),
               XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    r = _run(["-m", "jaxt2i.data.builders", f"--data_dir={bucket}/tfds", "--shapes=16:32"], env)
    data = f"{bucket}/tfds/shapes_world/r16_n32_s0/1.0.0"
    assert r.stdout.strip().endswith(f"dataset: {data}")
    from jaxt2i import assets

    _run(["-m", "jaxt2i.data.text_cache", f"--encoder={assets.text_encoder_dir()}",
          f"--out_dir={bucket}/cache", f"--dataset_dir={data}"], env)
    assert json.loads(paths.read_text(f"{bucket}/cache/index.json"))["num_examples"] == 32
    run = f"{bucket}/run"
    train = ["-m", "jaxt2i.train", "--config=configs/base.py:tiny", f"--workdir={run}",
             f"--config.data.source={data}", f"--config.text.cache={bucket}/cache",
             "--config.train.log_every=1", "--config.train.save_every=1", "--config.mesh.data=1"]
    _run([*train, "--config.train.num_steps=2"], env)
    r = _run([*train, "--config.train.num_steps=3"], env)
    assert f"resumed from {run}/checkpoints at step 2" in r.stderr
    steps = [json.loads(x)["step"] for x in paths.read_text(f"{run}/metrics.jsonl").splitlines()]
    assert steps == [1, 2, 3]
    names = _listing(run)
    assert {"config.json", "export/config.json", "export/params.safetensors",
            "samples/step_0000003.png", "checkpoints/3/commit_success.txt"} <= set(names)
    r = _run(["-m", "jaxt2i.checkpoint", f"--workdir={run}", f"--out={bucket}/exported"], env)
    assert r.stdout.strip() == f"exported the EMA params of step 3 to {bucket}/exported"
    assert paths.read_bytes(f"{bucket}/exported/params.safetensors") == paths.read_bytes(
        f"{run}/export/params.safetensors")
    _run(["-m", "jaxt2i.sample", f"--checkpoint={run}", "--prompt=a red circle",
          f"--out={tmp_path / 'out'}"], env)
    _run(["-m", "jaxt2i.sample", f"--checkpoint={bucket}/exported", "--prompt=a red circle",
          f"--out={bucket}/samples"], env)
    assert paths.read_bytes(f"{bucket}/samples/grid.png") == (
        tmp_path / "out" / "grid.png").read_bytes()
    assert json.loads(paths.read_text(f"{bucket}/samples/sample.json"))["checkpoints"] == [
        f"{bucket}/exported"]
