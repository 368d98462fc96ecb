"""A local Google Cloud Storage stand-in for tests: `gcp-storage-emulator` (a pure-Python
server of the GCS JSON API, from PyPI) run as a subprocess, and the environment that points
gcsfs (hence fsspec, etils.epath, TFDS) and TensorStore (Orbax's array writer) at it instead
of the network. Real `gs://bucket/...` URLs then go through the very code paths a user's
bucket would, with no credentials and nothing leaving the machine.

* `STORAGE_EMULATOR_HOST`: gcsfs (and google-cloud-storage) send requests there.
* `TENSORSTORE_GCS_HTTP_URL` + `GOOGLE_AUTH_TOKEN_FOR_TESTING`: TensorStore's gcs kvstore
  does, with a fixed token.
* `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`: gcsfs would otherwise first ask the gRPC
  storage-control API for the bucket's type, which the emulator does not serve (a minute of
  retries per bucket).

The server runs from this file (`python gcs_emulator.py PORT`) to add one thing the
emulator (2026.7) lacks and real GCS sends: the `x-goog-generation` header of a media
download, which TensorStore reads (without it, an Orbax save that re-reads its OCDBT
manifest fails with "Malformed StorageGeneration").
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

BUCKET = "jaxt2i-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    """`with Emulator(log_path) as emu:` runs the server; `emu.env` is what a process
    needs to use it (also set in this process's `os.environ` while it runs)."""

    def __init__(self, log_path: str):
        self.log_path = log_path
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
                    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
        self._proc = None
        self._saved = {}
        self._registered = None

    def __enter__(self) -> "Emulator":
        self._log = open(self.log_path, "wb")
        self._proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(self.port)],
                                      stdout=self._log, stderr=self._log)
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b/{BUCKET}", timeout=1).read()
                break
            except OSError:
                if self._proc.poll() is not None or time.time() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"gcp-storage-emulator did not start (log: "
                                       f"{self.log_path})") from None
                time.sleep(0.1)
        try:
            from fsspec.registry import _registry  # pylint: disable=import-private-name

            self._registered = _registry.get("gs")
            for k, v in self.env.items():
                self._saved[k] = os.environ.get(k)
                os.environ[k] = v
            _use_plain_gcsfs()
        except BaseException:  # never leave the server running
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=30)
        self._log.close()
        if not self._saved:  # it never got as far as changing this process
            return
        import fsspec
        import gcsfs
        from fsspec.registry import _registry  # pylint: disable=import-private-name

        gcsfs.GCSFileSystem.clear_instance_cache()
        # gs:// as it was registered before (or not at all: fsspec imports gcsfs on first use,
        # which a test of a missing gcsfs relies on)
        _registry.pop("gs", None)
        if self._registered is not None:
            fsspec.register_implementation("gs", self._registered, clobber=True)


def _use_plain_gcsfs() -> None:
    """This process's gs:// filesystem: gcsfs's plain one, no cached instance (an instance
    remembers the endpoint it was made for; gcsfs imported before the environment was set
    would have registered its bucket-type-probing subclass)."""
    import fsspec
    import gcsfs

    fsspec.register_implementation("gs", gcsfs.GCSFileSystem, clobber=True)
    gcsfs.GCSFileSystem.clear_instance_cache()


def _serve(port: int) -> None:
    """Runs the emulator (in memory, bucket `BUCKET`) with generation headers on downloads."""
    import threading

    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    original = objects.download

    def download(request, response, storage, *args, **kwargs):
        original(request, response, storage, *args, **kwargs)
        if response.status.value in (200, 206):
            obj = storage.get_file_obj(request.params["bucket_name"],
                                       request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration") or 1)

    objects.download = download  # `objects.get` (?alt=media) calls it by name
    for _, handlers in server.HANDLERS:
        for method, fn in list(handlers.items()):
            if fn is original:
                handlers[method] = download
    s = server.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    s.start()
    threading.Event().wait()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
