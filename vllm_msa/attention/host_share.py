"""One host copy of a bank's K̄/V̄ per node, shared by every engine process that serves it.

Data-parallel replicas (and any other vLLM engines on the node) each used to read their own
host tier: a 100M-token MSA-4B bank is ~107 GiB of RAM per copy. Here each tensor (bank,
router layer, K̄ or V̄, KV heads) lives in a shared-memory file under /dev/shm, named by what it
holds (the bank manifest's digest, so a rebuilt bank never meets an old copy), and every
process maps it (and page-locks its mapping for the GPU, `tiers.page_lock`).

Crash safety: the first process creates `<name>.partial` exclusively, holds an exclusive
lock on it while it reads the bank into it, and renames it to `<name>` only once it is
complete and checked: nobody ever maps a partial file. A process that finds a `.partial` waits
for its creator; if the creator died (its lock is gone), it removes the leftover and creates
the file itself. Users hold a shared lock on the complete file while they map it; a user
that drops the tensor while its process goes on removes the file if it was the last
(`_release`). Engine workers end without exit hooks, so a stopped engine leaves its files: a
complete file is valid (its name says exactly what it holds) and the next start maps it
without reading the bank again; `vllm-msa bank shm --clean` removes those nobody uses.

Where /dev/shm is missing or too small (a container's default 64 MiB), the space is reserved
up front (`posix_fallocate`, which fails cleanly where a short tmpfs would otherwise kill the
process with SIGBUS on first touch) and the tier falls back to private memory, with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SHM_DIR = Path(os.environ.get("VLLM_MSA_SHM_DIR", "/dev/shm"))
PREFIX = "vllm-msa-"
WAIT_S = 600.0  # the longest a process waits for another to fill a tier


class SharedTensor:
    """A complete shared file mapped into this process, as a tensor."""

    def __init__(self, path: Path, fd: int, mapped: mmap.mmap, tensor: torch.Tensor,
                 created: bool) -> None:
        self.path, self.fd, self.mapped = path, fd, mapped
        self.tensor, self.created = tensor, created



def _release(path: Path, fd: int, mapped: mmap.mmap) -> None:
    """Unmap; the last user on the node removes the file."""
    with contextlib.suppress(BufferError, ValueError):
        mapped.close()  # (fails while a buffer still views it: it goes with the object)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink(missing_ok=True)  # nobody else holds it
    except OSError:
        pass  # another process still uses it
    finally:
        os.close(fd)


def shared_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype,
                  fill: Callable[[torch.Tensor], None]) -> SharedTensor | None:
    """The shared tensor `name` (created and filled with `fill` by the first process on the
    node, mapped by the others), or None where shared memory cannot hold it."""
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    path = SHM_DIR / f"{PREFIX}{name}"
    if not SHM_DIR.is_dir() or nbytes == 0:
        return None
    deadline = time.monotonic() + WAIT_S
    while True:
        shared = _open_complete(path, shape, dtype, nbytes)
        if shared is not None:
            return shared
        created = _create(path, shape, dtype, nbytes, fill)
        if created is not False:
            return created  # the shared tensor, or None: no room in shared memory
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}.partial: another process has been filling it for "
                               f"{WAIT_S:.0f} s")
        time.sleep(0.2)  # another process is filling it


def _open_complete(path: Path, shape, dtype, nbytes: int) -> SharedTensor | None:
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    fcntl.flock(fd, fcntl.LOCK_SH)
    if os.fstat(fd).st_nlink == 0 or os.fstat(fd).st_size != nbytes:
        os.close(fd)  # removed (or replaced) under us: look again
        if path.exists() and path.stat().st_size != nbytes:
            raise OSError(f"{path} holds {path.stat().st_size} bytes, expected {nbytes}")
        return None
    return _map(path, fd, shape, dtype, nbytes, created=False)


def _create(path: Path, shape, dtype, nbytes: int, fill) -> SharedTensor | bool | None:
    """Create, fill and publish the file: the shared tensor, None without room, or False when
    another live process is creating it."""
    partial = path.with_name(path.name + ".partial")
    try:
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _reap_if_orphaned(partial)
    shared = None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EOPNOTSUPP):
                raise
            logger.warning("MSA host tier: %s has no room for %.1f MiB (%s); this process "
                           "keeps a private copy", SHM_DIR, nbytes / 2**20, e)
            os.close(fd)
            partial.unlink(missing_ok=True)
            return None
        shared = _map(path, fd, shape, dtype, nbytes, created=True)
        fill(shared.tensor)
        os.rename(partial, path)  # complete: others may map it from now on
        fcntl.flock(fd, fcntl.LOCK_SH)  # a user like the others
        return shared
    except BaseException:
        partial.unlink(missing_ok=True)
        if shared is None:  # (once mapped, the mapping's finalizer closes it)
            os.close(fd)
        raise


def _reap_if_orphaned(partial: Path) -> bool:
    """Remove a `.partial` whose creator died (its lock is free, and it is not one created
    this instant, before its creator took the lock); False either way (look again)."""
    with contextlib.suppress(FileNotFoundError):
        if time.time() - partial.stat().st_mtime < 2.0:
            return False
    if partial.exists() and not in_use(partial):
        logger.warning("MSA host tier: removing %s, left by a process that died filling it",
                       partial)
        partial.unlink(missing_ok=True)
    return False


def _map(path: Path, fd: int, shape, dtype, nbytes: int, created: bool) -> SharedTensor:
    mapped = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    tensor = torch.frombuffer(mapped, dtype=dtype, count=torch.Size(shape).numel()).view(shape)
    shared = SharedTensor(path, fd, mapped, tensor, created)
    # The lock goes with the last tensor viewing the mapping (the bank dropped, or the
    # process ends); the finalizer must not hold the tensor itself.
    weakref.finalize(tensor.untyped_storage(), _release, path, fd, mapped)
    return shared


def on_tmpfs(path: Path) -> bool:
    """Whether `path` lies on a memory filesystem (tmpfs, ramfs, hugetlbfs): mappings of such
    files can be page-locked by CUDA; mappings of files on disk cannot."""
    best, fstype = "", ""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                mount = fields[4]
                kind = fields[fields.index("-") + 1]
                target = str(Path(path).resolve())
                if (target == mount or target.startswith(mount.rstrip("/") + "/")) and \
                        len(mount) > len(best):
                    best, fstype = mount, kind
    except (OSError, ValueError, IndexError):
        return False
    return fstype in ("tmpfs", "ramfs", "hugetlbfs")


def in_use(path: Path) -> bool:
    """Whether a process holds this shared file's lock: maps it (complete) or fills it
    (`.partial`)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def clean(dry_run: bool = False) -> list[tuple[Path, int]]:
    """Remove the shared host tiers no process uses (left by engines that were killed):
    [(path, bytes)] removed (or, with `dry_run`, that would be)."""
    removed = []
    if not SHM_DIR.is_dir():
        return removed
    for path in sorted(SHM_DIR.glob(PREFIX + "*")):
        if not in_use(path):
            removed.append((path, path.stat().st_size))
            if not dry_run:
                path.unlink(missing_ok=True)
    return removed

