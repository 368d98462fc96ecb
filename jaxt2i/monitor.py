"""What a training run shows a person: metrics (JSONL + TensorBoard), images, signals.

Only process 0 writes files; every process takes part in computing what is written. Sample
grids are written with `jaxt2i.images.save_grid`.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time

import jax
import numpy as np

from jaxt2i import paths


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
    """JSONL + TensorBoard (tensorboardX) metrics, written by process 0 only.

    A URL workdir (`gs://...`; object stores cannot append) is written through a local
    folder: its metrics.jsonl is fetched first (a resumed run appends to it), and the folder
    is uploaded at most every `sync_every_s` seconds and on `close`.
    """

    def __init__(self, workdir: str, sync_every_s: float = 30.0):
        self.enabled = jax.process_index() == 0
        self.jsonl = None
        self.tb = None
        self.url = workdir if paths.is_url(workdir) else None
        self._local = None
        self._sync_every_s, self._synced = sync_every_s, time.monotonic()
        if self.enabled:
            if self.url:
                self._local = tempfile.TemporaryDirectory(prefix="jaxt2i-metrics-")
                workdir = self._local.name
                metrics = paths.join(self.url, "metrics.jsonl")
                if paths.exists(metrics):  # a resumed run's: appended to
                    with open(os.path.join(workdir, "metrics.jsonl"), "wb") as f:
                        f.write(paths.read_bytes(metrics))
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
        self._sync()

    def image(self, step: int, name: str, grid: np.ndarray) -> None:
        if self.enabled:
            self.tb.add_image(name, grid, step, dataformats="HWC")
            self._sync()

    def _sync(self) -> None:
        """Uploads the local folder of a URL workdir (at most every `sync_every_s`)."""
        if self._local is None or time.monotonic() - self._synced < self._sync_every_s:
            return
        self.tb.flush()
        paths.upload(self._local.name, self.url)
        self._synced = time.monotonic()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
            if self._local is not None:
                paths.upload(self._local.name, self.url)
                self._local.cleanup()
