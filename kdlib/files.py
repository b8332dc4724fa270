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
import errno
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, IO


def atomic_write_bytes(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], *,
                       previous: str | os.PathLike | None = None) -> None:
    """Call ``write(handle)`` on a temporary file in ``path``'s folder, fsync, rename over ``path``.

    An interrupted save leaves the previous file intact, and no temporary file behind (a kill -9
    leaves one, which `exclusive` removes). ``previous``: once the new file is complete, the old
    ``path`` is first renamed to this name (the last two versions are kept)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException as err:
        full = disk_full(err, path.parent)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if full:
            raise NotEnoughSpace(f"{path}: the disk is full ({gb(shutil.disk_usage(path.parent).free)} free after "
                                 f"removing the partial file); nothing was replaced, the previous {path.name} "
                                 "(if any) is intact. Free space and rerun the same command.") from err
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` as UTF-8, atomically (see `atomic_write_bytes`)."""
    atomic_write_bytes(path, lambda h: h.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike, value: Any, **dumps: Any) -> None:
    """``value`` as indented JSON plus a newline, atomically; ``dumps`` go to `json.dumps`."""
    atomic_write_text(path, json.dumps(value, **{"indent": 2, **dumps}) + "\n")


def replace_dir(tmp: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the fully written folder ``tmp`` to ``target``, replacing an older ``target``.

    The old folder is first renamed aside, the new one renamed into place, then the old deleted:
    a reader sees the old folder or the new one, and a kill between the two renames leaves both
    complete (the old one at ``.<name>.stale-...``, which `exclusive` removes later)."""
    tmp, target = Path(tmp), Path(target)
    stale = None
    if target.exists():
        stale = target.with_name(f".{target.name}.stale-{os.getpid()}-{time.time_ns()}")
        os.replace(target, stale)
    os.replace(tmp, target)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)
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
def exclusive(folder: str | os.PathLike, what: str = "run folder", *, lock: str = ".lock",
              leftovers: tuple[str, ...] = (".*.tmp-*", ".*.stale-*")):
    """Hold ``folder`` for this process: an advisory lock (``flock``) on ``<folder>/.lock``, which
    names the holder (PID and host). A second process stops at once with `FolderBusy` naming the
    holder. The kernel drops the lock when its process ends however it ends (kill -9 included), so
    a lock left by a dead process is simply taken over. Temporary files of killed writes
    (``.<name>.tmp-<pid>``, see `atomic_write_bytes` and `fresh_tmp_dir`) and old folders a killed
    `replace_dir` had set aside (``.<name>.stale-...``) are removed once held: no other writer can
    be using them.

    One thing inside a shared folder (a cache being built next to others) is held with its own
    ``lock`` file name and removes only its own ``leftovers`` (glob patterns in ``folder``)."""
    import socket

    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, nothing else changes
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise FolderBusy(f"{folder}: this {what} is in use by {holder}; wait for it to finish, stop it, "
                         "or use another folder") from None
    try:
        for leftover in (found for pattern in leftovers for found in folder.glob(pattern)):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def disk_full(err: BaseException, folder: Path) -> bool:
    """Did ``err`` come from a full filesystem? ``ENOSPC``/``EDQUOT`` anywhere in its chain, or a
    writer that hides the errno (torch's zip writer says ``unexpected pos``) with under 1 MB free."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    if isinstance(err, (OSError, RuntimeError)):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(folder).free < 1_000_000
    return False


# --------------------------------------------------------------------------------------------
# Files that check themselves: a digest written with the bytes, verified on every read
# --------------------------------------------------------------------------------------------

DIGEST_TAG = b"\nkdlib-sha256 "
DIGESTS_FILE = "digests.json"


class DamagedFile(RuntimeError):
    """A file (or a folder's file) does not match the digest written with it: flipped bytes, a
    truncated copy, a hand edit. It is never loaded."""


def write_checked(path: str | os.PathLike, data: bytes, *, previous: str | os.PathLike | None = None,
                  advice: str = "") -> None:
    """``data`` followed by a trailer line (``kdlib-sha256 <hex>``), atomically (``previous``: see
    `atomic_write_bytes`); the space it needs is checked first (`require_free_space`), so a full
    disk is refused before the first byte, with ``advice``."""
    path = Path(path)
    trailer = DIGEST_TAG + hashlib.sha256(data).hexdigest().encode() + b"\n"
    require_free_space(path.parent, len(data) + len(trailer), str(path), advice=advice)
    atomic_write_bytes(path, lambda h: (h.write(data), h.write(trailer)), previous=previous)


def read_checked(path: str | os.PathLike) -> bytes:
    """The bytes `write_checked` wrote, or `DamagedFile` naming the file and what is wrong."""
    path = Path(path)
    raw = path.read_bytes()
    body, tag, tail = raw.rpartition(DIGEST_TAG)
    if not tag or len(tail) != 65:
        raise DamagedFile(f"{path}: no digest at its end ({len(raw):,} bytes): the file is truncated, or it was "
                          "written by a kdlib without digests; it is not loaded")
    if hashlib.sha256(body).hexdigest().encode() != tail[:64]:
        raise DamagedFile(f"{path}: its content does not match the digest written with it (bytes changed on "
                          "disk or in a copy); it is not loaded")
    return body


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_folder_digests(folder: str | os.PathLike) -> None:
    """``digests.json`` in ``folder``: the sha256 of every other file in it (call it on the
    temporary folder before `replace_dir`, so the digests arrive with the files)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != DIGESTS_FILE)
    atomic_write_json(folder / DIGESTS_FILE, {str(p.relative_to(folder)): file_digest(p) for p in files})


def check_folder_digests(folder: str | os.PathLike) -> bool:
    """Verify ``folder`` against its ``digests.json``: `DamagedFile` naming every changed or missing
    file; False when the folder has no digests (written by hand or by another tool), True when
    every file matches."""
    folder = Path(folder)
    listing = folder / DIGESTS_FILE
    if not listing.is_file():
        return False
    try:
        expected = json.loads(listing.read_text())
    except ValueError as err:
        raise DamagedFile(f"{listing}: unreadable ({err}); the folder cannot be checked") from err
    bad = []
    for name, digest in expected.items():
        file = folder / name
        if not file.is_file():
            bad.append(f"{name} is missing")
        elif file_digest(file) != digest:
            bad.append(f"{name} does not match its digest")
    if bad:
        raise DamagedFile(f"{folder}: " + "; ".join(bad) + ". It is not loaded: copy it again or retrain the run")
    return True


class NotEnoughSpace(OSError):
    """What a run is about to write (or hold in memory) does not fit: raised before the first byte."""


def gb(n_bytes: float) -> str:
    """A size as people read it: GB from 1 GB up, else MB (a checkpoint of a small student)."""
    return f"{n_bytes / 1e9:,.1f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:,.1f} MB"


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
