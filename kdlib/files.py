"""Files that are never seen half written: the one implementation of atomic writes in kdlib.

A long run is killed at any moment (a pre-empted GPU, a Ctrl-C, a full disk). Whatever it was
writing then must leave the previous version readable: a checkpoint, a summary, a cache index,
an exported model folder. Every writer in kdlib goes through these three functions:

* `atomic_write_bytes` / `atomic_write_json` / `atomic_write_text`: a file is written into a
  temporary sibling, flushed and fsynced, then renamed over its name (``os.replace`` is atomic on
  POSIX and Windows within one filesystem);
* `replace_dir`: a folder written whole under a temporary name is moved into place, replacing
  an older one (peft adapters, merged models, caches).

This module sits at the bottom of the house with `kdlib.config`: it imports nothing of kdlib.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, IO


def atomic_write_bytes(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(handle)`` on a temporary file in ``path``'s folder, fsync, rename over ``path``.

    An interrupted save leaves the previous file intact, and no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` as UTF-8, atomically (see `atomic_write_bytes`)."""
    atomic_write_bytes(path, lambda h: h.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike, value: Any, **dumps: Any) -> None:
    """``value`` as indented JSON plus a newline, atomically; ``dumps`` go to `json.dumps`."""
    atomic_write_text(path, json.dumps(value, **{"indent": 2, **dumps}) + "\n")


def replace_dir(tmp: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the fully written folder ``tmp`` to ``target``, replacing an older ``target``.

    The old folder is first renamed aside and then deleted, so a reader sees the old folder or the
    new one, and a kill in between leaves a complete folder at ``tmp`` or at ``target``."""
    tmp, target = Path(tmp), Path(target)
    if target.exists():
        stale = target.with_name(f".{target.name}.stale-{os.getpid()}-{time.time_ns()}")
        os.replace(target, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(tmp, target)
    return target


def fresh_tmp_dir(target: str | os.PathLike) -> Path:
    """An empty temporary sibling folder of ``target`` (a leftover of a killed writer is removed)."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    return tmp


class FolderBusy(RuntimeError):
    """Another process holds the folder (`exclusive`): two writers would leave weights that match
    neither config."""


@contextlib.contextmanager
def exclusive(folder: str | os.PathLike, what: str = "run folder"):
    """Hold ``folder`` for this process: an advisory lock (``flock``) on ``<folder>/.lock``, which
    names the holder (PID and host). A second process stops at once with `FolderBusy` naming the
    holder. The kernel drops the lock when its process ends however it ends (kill -9 included), so
    a lock left by a dead process is simply taken over. Temporary files of killed writes
    (``.<name>.tmp-<pid>``, see `atomic_write_bytes` and `fresh_tmp_dir`) are removed once held:
    no other writer can be using them."""
    import socket

    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, nothing else changes
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise FolderBusy(f"{folder}: this {what} is in use by {holder}; wait for it to finish, stop it, "
                         "or use another folder") from None
    try:
        for leftover in folder.glob(".*.tmp-*"):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


class NotEnoughSpace(OSError):
    """What a run is about to write (or hold in memory) does not fit: raised before the first byte."""


def gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:,.1f} GB"


def require_free_space(folder: str | os.PathLike, needed_bytes: float, what: str, *, advice: str = "") -> None:
    """Refuse up front, with the numbers, when ``needed_bytes`` exceed the free space of the
    filesystem that holds ``folder`` (its nearest existing parent)."""
    probe = Path(folder).absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed_bytes > free:
        raise NotEnoughSpace(f"{what} needs about {gb(needed_bytes)} on disk and {probe} has {gb(free)} free"
                             + (f": {advice}" if advice else ""))


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (what a process can still take without swapping); None off Linux."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def shown(path: str | os.PathLike) -> str:
    """``path`` as a chapter prints it: relative to the working directory when it lies inside the
    working directory's parent (a chapter runs in ``notebooks/``, so a run under the repository
    reads ``../runs/05_stage1_kd``), else absolute. The printed text is then true for the reader
    and holds no path of the machine that built the book."""
    path = Path(path).expanduser().resolve()
    here = Path.cwd().resolve()
    return os.path.relpath(path, here) if path.is_relative_to(here.parent) else str(path)
