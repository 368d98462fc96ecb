"""What a training run shows a person: metrics (JSONL + TensorBoard), images, signals.

Only process 0 writes files; every process takes part in computing what is written. Sample
grids are written with `jaxt2i.images.save_grid`.
"""

from __future__ import annotations

import json
import os
import signal

import jax
import numpy as np


class StopSignal:
    """SIGTERM / SIGINT -> stop at the next step boundary after saving."""

    def __init__(self):
        self.requested = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class MetricWriter:
    """JSONL + TensorBoard (tensorboardX) metrics, written by process 0 only."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.jsonl = None
        self.tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)

    def image(self, step: int, name: str, grid: np.ndarray) -> None:
        if self.enabled:
            self.tb.add_image(name, grid, step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
