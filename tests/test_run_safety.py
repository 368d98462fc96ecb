"""Never lose a run: what `python -m jaxt2i.train` and `python -m jaxt2i.checkpoint` promise
when a user (or the machine) does something hostile, each tried as a user would, in fresh
processes: a resume with another model, a corrupt newest checkpoint, two runs on one workdir,
a killed run's lock, a full disk. docs/guarantees.md points at each test here."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _train(workdir, *extra, fsize=None, timeout=600):
    cmd = [sys.executable, "-m", "jaxt2i.train", "--config=configs/base.py:tiny",
           f"--workdir={workdir}", "--config.train.num_steps=4", "--config.train.log_every=2",
           "--config.train.save_every=2", "--config.data.num_examples=64", *extra]
    if fsize is not None:  # a "full disk": no file may grow past `fsize` bytes
        cmd = _limited(fsize, cmd)
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _limited(fsize, cmd):
    """`cmd` under a file-size limit, set in the child itself (no preexec_fn: forking a
    process that runs JAX threads may deadlock)."""
    code = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, "
            f"({fsize}, {fsize})); os.execv(sys.executable, [sys.executable] + sys.argv[1:])")
    return [sys.executable, "-c", code, *cmd[1:]]


def _error_lines(stderr):
    """Lines a user reads: absl's W/I log lines and blank lines aside."""
    return [x for x in stderr.splitlines() if x.strip() and not x.startswith(("W1", "I1"))]


def _steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 4-step tiny run with checkpoints 2 and 4 and an export of step 4."""
    run = tmp_path_factory.mktemp("safety") / "run1"
    r = _train(run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _steps(run) == [2, 4]
    return run


def _copy(run, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(run, dst)
    return dst


def test_resume_with_another_model_is_refused_and_loses_nothing(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path, "changed")
    config_before = (run / "config.json").read_text()
    r = _train(run, "--config.model.base_channels=64", "--config.train.num_steps=50")
    assert r.returncode == 2, r.stderr[-3000:]
    lines = _error_lines(r.stderr)
    assert len(lines) == 1, r.stderr[-3000:]
    assert "model.base_channels: checkpoint 16, config 64" in lines[0]
    assert "train.init_from" in lines[0]  # the way to fine-tune from it
    assert _steps(run) == [2, 4]  # retention deleted nothing
    assert (run / "config.json").read_text() == config_before


def test_corrupt_newest_checkpoint_is_moved_aside_and_retrained(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path, "corrupt")
    for p in (run / "checkpoints" / "4").iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    # Exporting now would go back from step 4 to step 2: refused unless asked for by --step.
    cmd = [sys.executable, "-m", "jaxt2i.checkpoint", f"--workdir={run}"]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = _error_lines(r.stderr)
    assert len(lines) == 1 and "holds the export of step 4" in lines[0], r.stderr[-3000:]
    assert json.loads((run / "export" / "config.json").read_text())["step"] == 4

    # Settings that do not change the state (here the learning rate) may change on resume.
    r = _train(run, "--config.train.lr=2e-4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "at step 2" in r.stderr
    aside = os.listdir(run / "corrupt_checkpoints")
    assert len(aside) == 1 and aside[0].startswith("4-")  # kept for inspection
    assert _steps(run) == [2, 4]
    assert (run / "checkpoints" / "4" / "state").is_dir()  # a readable step 4 again
    assert json.loads((run / "export" / "config.json").read_text())["step"] == 4

    # No checkpoint readable at all: refused, nothing moved, never a silent fresh start.
    run = _copy(finished_run, tmp_path, "all_corrupt")
    for s in ("2", "4"):
        for p in (run / "checkpoints" / s).iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    r = _train(run)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = _error_lines(r.stderr)
    assert len(lines) == 1 and "no checkpoint in" in lines[0] and "can be restored" in lines[0]
    assert _steps(run) == [2, 4] and not (run / "corrupt_checkpoints").exists()


def test_second_run_on_a_live_workdir_is_refused_and_a_dead_runs_lock_taken_over(tmp_path):
    run = tmp_path / "live"
    first = subprocess.Popen(
        [sys.executable, "-m", "jaxt2i.train", "--config=configs/base.py:tiny",
         f"--workdir={run}", "--config.train.num_steps=100000", "--config.train.save_every=0",
         "--config.data.num_examples=64"],
        cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = run / ".lock"
        deadline = time.time() + 300
        while not (lock.exists() and lock.read_text()) and time.time() < deadline:
            assert first.poll() is None, "the first run ended early"
            time.sleep(0.1)
        holder = json.loads(lock.read_text())
        assert holder["pid"] == first.pid
        r = _train(run)
        assert r.returncode == 2, r.stderr[-3000:]
        lines = _error_lines(r.stderr)
        assert len(lines) == 1, r.stderr[-3000:]
        assert f"in use by process {first.pid}" in lines[0] and "--workdir" in lines[0]
        assert json.loads(lock.read_text())["pid"] == first.pid  # the live run keeps it
        assert first.poll() is None
    finally:
        first.kill()  # SIGKILL: no clean-up ran
        first.wait()
    from jaxt2i.workdir import WorkdirLock

    said = []
    with WorkdirLock(str(run), log=said.append) as taken:
        assert taken.took_over["pid"] == first.pid
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert len(said) == 1 and f"left by process {first.pid}" in said[0]
    assert lock.read_text() == ""  # released cleanly: the next taker has nothing to report
    with WorkdirLock(str(run)) as taken:
        assert taken.took_over is None


def test_full_disk_is_one_line_and_the_run_resumes(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path, "full")
    # Checkpoint files of this model are ~600 KB: the save of step 6 fails.
    r = _train(run, "--config.train.num_steps=6", fsize=200_000)
    assert r.returncode == 1, r.stderr[-3000:]
    lines = _error_lines(r.stderr)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len([x for x in lines if not x.startswith("step ")]) == 1, r.stderr[-3000:]
    assert "cannot write to" in lines[-1] and "step 4) is intact" in lines[-1]
    assert _steps(run) == [2, 4]
    r = _train(run, "--config.train.num_steps=6")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 4" in r.stderr
    assert _steps(run) == [2, 4, 6]
    assert not [d for d in os.listdir(run / "checkpoints") if "tmp" in d]  # the dead save's


@pytest.mark.parametrize("argv,flag", [
    (["jaxt2i.sample", "--prompt=a red circle"], "--out"),
    (["jaxt2i.checkpoint"], "--out"),
    (["jaxt2i.train", "--config=configs/base.py:tiny"], "--workdir"),
])
def test_unwritable_output_is_refused_before_any_work(argv, flag, finished_run, tmp_path):
    """A path where nothing can be written (here: a file-size limit of 0 bytes, as a full
    disk) is one line at once, before sampling or training starts."""
    out = tmp_path / "out"
    extra = ([f"--workdir={finished_run}", f"--out={out}"] if argv[0] == "jaxt2i.checkpoint"
             else [f"--workdir={out}"] if argv[0] == "jaxt2i.train" else [f"--out={out}"])

    t0 = time.time()
    r = subprocess.run(_limited(0, [sys.executable, "-m", *argv, *extra]), cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = _error_lines(r.stderr)
    assert len(lines) == 1 and f"{flag}={out} cannot be written" in lines[0], r.stderr[-3000:]
    assert time.time() - t0 < 60  # refused up front, not after the work
