"""Two local processes (gloo CPU collectives on 127.0.0.1) train, save and resume together."""

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(workdir, logdir, steps):
    import sys
    env = dict(os.environ, PYTHON=sys.executable, LOG_DIR=str(logdir))
    env.pop("XLA_FLAGS", None)
    cmd = ["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"), "2", "1", "--",
           "--config=configs/base.py:tiny", f"--workdir={workdir}",
           f"--config.train.num_steps={steps}", "--config.train.save_every=2",
           "--config.train.log_every=1", "--config.data.num_examples=64",
           "--config.train.sample_prompts=('a red circle', 'two blue squares')"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _read(path):
    with open(path) as f:
        return f.read()


@pytest.mark.slow
def test_two_processes_train_save_resume(tmp_path):
    run = tmp_path / "run"
    r = _launch(run, tmp_path / "logs1", 4)
    logs = [_read(tmp_path / "logs1" / f"process_{i}.log") for i in range(2)]
    assert r.returncode == 0, r.stderr + logs[0][-3000:] + logs[1][-3000:]
    assert "step 4/4" in logs[0]  # process 0 reports progress
    assert "step 4/4" not in logs[1]  # the other one stays quiet
    assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]
    assert (run / "export" / "params.safetensors").exists()

    r = _launch(run, tmp_path / "logs2", 6)
    logs = [_read(tmp_path / "logs2" / f"process_{i}.log") for i in range(2)]
    assert r.returncode == 0, r.stderr + logs[0][-3000:] + logs[1][-3000:]
    for log in logs:
        assert "resumed from" in log and "at step 4" in log
    assert "step 5/6" in logs[0] and "step 1/" not in logs[0]
    assert "6" in os.listdir(run / "checkpoints")
