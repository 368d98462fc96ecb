"""Directories that commands write into: one run per workdir, writable up front, full disks
said in one line.

* `WorkdirLock`: an exclusive `flock` on `WORKDIR/.lock`. The kernel drops the lock when its
  process dies (SIGKILL included), so a killed run never leaves it stuck; the file keeps the
  holder's pid, host and start time, which a second process names when it is refused and a
  later run names when it takes over a lock left by a dead one. A URL workdir (`gs://...`,
  see `jaxt2i.paths`) cannot be `flock`ed: it is not locked, and the lock says so once.
* `check_writable(path, flag)`: proves a file can be written in the directory before any
  work starts (creating it for the test and removing what it created), so a read-only or
  unwritable path is one line at once, not a traceback after an hour of sampling.
* `disk_error(exc)`: the one-line form of an OSError from a full disk, a file-size limit, a
  read-only filesystem or a denied permission (None for other errors).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import contextlib
import json
import logging
import os
import socket
import uuid

from jaxt2i import paths
from jaxt2i.config import ConfigError

LOCK_FILE = ".lock"
# errno values that mean "this place cannot take (more) bytes", and what to tell the user.
_DISK_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this filesystem or the process's file-size limit",
    errno.EROFS: "read-only filesystem",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


class WorkdirBusy(ConfigError):
    """Another live process holds the workdir's lock."""


def disk_error(exc: BaseException) -> str | None:
    """'<what> (<path>)' for an OSError caused by the disk or permissions, else None.

    Looks through `__cause__` / `__context__` chains (Orbax and TensorStore wrap the OSError)
    and through the text of errors that carry only a message.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRORS:
            where = f" ({exc.filename})" if exc.filename else ""
            return f"{_DISK_ERRORS[exc.errno]}{where}"
        text = str(exc)
        for code, what in _DISK_ERRORS.items():
            if os.strerror(code) in text and code not in (errno.EPERM,):
                return what
        exc = exc.__cause__ or exc.__context__
    return None


def check_writable(path: str, flag: str, *, urls: bool = False) -> str:
    """Proves a file can be written in directory `path` (made for the test, then removed
    again if it did not exist).

    Args:
      path: the directory a command will write into.
      flag: how the user named it (e.g. '--workdir'), for the error line.
      urls: whether the command writes this output to URLs (`gs://...`) too; if not, a URL
        is refused in one line (it would otherwise become a local folder named 'gs:').

    Returns:
      The absolute path (a URL as it is). Raises ConfigError (one line) when it cannot be
      written.
    """
    if paths.is_url(path):
        if not urls:
            raise ConfigError(f"{flag}={path}: this output is written to local folders only; "
                              "pass a local path")
        return _check_writable_url(path, flag)
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag}={path} is a file, not a directory; choose a directory")
    top = path  # the highest directory this check creates: removed again afterwards
    while not os.path.exists(os.path.dirname(top)) and os.path.dirname(top) != top:
        top = os.path.dirname(top)
    created = not os.path.exists(top)
    probe = os.path.join(path, f".write-test-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)  # a few blocks: a completely full disk fails here
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        why = disk_error(e) or e.strerror or str(e)
        raise ConfigError(f"{flag}={path} cannot be written: {why}; choose a writable "
                          "directory or free space") from None
    finally:
        try:
            os.remove(probe)
        except OSError:
            pass
        if created:  # a command that fails later leaves no empty directory behind
            for d in _upward(path, top):
                try:
                    os.rmdir(d)
                except OSError:
                    break
    return path


def _check_writable_url(url: str, flag: str) -> str:
    """`check_writable` of a URL: an object written below it and removed again (a missing
    filesystem package stays `paths.MissingFilesystem`'s one line)."""
    try:
        if paths.isfile(url):
            raise ConfigError(f"{flag}={url} is a file, not a directory; choose a directory")
        probe = paths.join(url, f".write-test-{uuid.uuid4().hex[:8]}")
        paths.write_bytes(probe, b"0" * 4096)
        paths.remove(probe)
    except (ConfigError, paths.MissingFilesystem):
        raise
    except Exception as e:  # noqa: BLE001 - each store has its own errors (HTTP, auth, ...)
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise ConfigError(f"{flag}={url} cannot be written: {why}; check the URL and your "
                          "credentials for it") from None
    return url


def _upward(path: str, top: str):
    """`path`, its parent, ... up to and including `top`."""
    while True:
        yield path
        if path == top or os.path.dirname(path) == path:
            return
        path = os.path.dirname(path)


class WorkdirLock:
    """Exclusive lock of a run directory for the lifetime of one process.

    Usage: `with WorkdirLock(workdir): ...`. Raises `WorkdirBusy` (one line naming the
    holder) when another live process holds it. A lock file left by a process that died is
    taken over with a warning (`took_over` holds the dead holder's record).
    """

    def __init__(self, workdir: str, *, log=None, flag: str = "--workdir"):
        self.url = workdir if paths.is_url(workdir) else None
        self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE) if not self.url else ""
        self._flag = flag
        self.took_over: dict | None = None
        self._log = log
        self._fd: int | None = None

    def _read(self) -> dict:
        try:
            with open(self.path) as f:
                return json.loads(f.read() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "WorkdirLock":
        if self.url:  # an object store has no flock: nothing is held
            if self._log is not None:
                self._log(f"{self.url} is not locked (a URL cannot be); make sure no other run "
                          "writes to it")
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self._read()
            who = (f"process {holder.get('pid', '?')} on {holder.get('host', '?')} "
                   f"(since {holder.get('started', '?')})") if holder else "another process"
            raise WorkdirBusy(
                f"{os.path.dirname(self.path)} is in use by {who}; wait for it to end (or "
                f"stop it), or pass another {self._flag}") from None
        previous = self._read()
        if previous.get("pid"):  # a clean end empties the file: its holder died holding it
            self.took_over = previous
            if self._log is not None:
                self._log(f"took over the lock of {os.path.dirname(self.path)} left by "
                          f"process {previous.get('pid')} on {previous.get('host')} (started "
                          f"{previous.get('started')}), which no longer holds it (it was "
                          "killed or crashed)")
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # an empty lock file: the run ended cleanly
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class _DropDiskErrors(logging.Filter):
    """Drops log records (with their tracebacks) about a disk error: the caller reports it."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        text = record.getMessage()
        return not ((exc is not None and disk_error(exc)) or disk_error(Exception(text)))


@contextlib.contextmanager
def quiet_disk_errors():
    """Within: libraries' own log records about a full or read-only disk are dropped (Orbax's
    background save threads log one traceback each), because the command says it in one line."""
    f = _DropDiskErrors()
    loggers = [logging.getLogger(), logging.getLogger("absl")]
    for lg in loggers:
        lg.addFilter(f)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(f)
