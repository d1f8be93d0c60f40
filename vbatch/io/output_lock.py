"""`OutputLock`: one job at a time per output directory.

Two jobs writing one directory interleave their parts under one manifest and both report
success; two resumes race on the manifest's temporary file. So the job's driver (the only
writer) holds an exclusive lock on its output directory for its whole life: the file
`.vbatch.lock` inside the directory, locked with `flock(LOCK_EX | LOCK_NB)`. A second job is
refused at once with the holder's pid, host and start time, which the holder writes into the
file. `--dry-run` takes no lock.

Stale locks need no special case: the kernel drops an flock when its holder's last descriptor
closes, which includes the process dying (SIGKILL, OOM kill, crash). A lock file left by a dead
process is therefore unlocked, and the next job locks it and overwrites the holder line. On
release the holder unlinks the file while still holding the lock; a job that opened the old
file just before then gets its flock on an unlinked inode, so after locking it checks that the
name still refers to the inode it locked and otherwise tries again.

flock is local to a host's kernel (NFS maps it to byte-range locks, which needs a working lock
manager). Object stores have no locks at all: a later issue adds a lock *object* created
conditionally (S3 `PutObject` with `If-None-Match: *`, GCS `ifGenerationMatch=0`) holding the
same holder line plus a lease expiry, renewed by a heartbeat while the job runs; a second job
is refused while the lease is live and may take over (conditional overwrite on the object's
ETag/generation) once it has expired. The holder line and the refusal message stay the same.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from datetime import datetime, timezone

from vbatch.errors import VBatchUsageError
from vbatch.io.directory import OutputDirectory

#: The lock file inside the output directory (hidden: Parquet readers skip it).
LOCK_FILE = ".vbatch.lock"
_MAX_ATTEMPTS = 20


def holder_info() -> dict:
    """What the lock file says about its holder: this process's pid, host, start time."""
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _describe_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return (f"pid {info['pid']} on host {info['host']}, started {info['started_at']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown: it has not written its pid yet"


class OutputLock:
    """The exclusive lock of one output directory, held until `release()` (or process exit)."""

    def __init__(self, directory: OutputDirectory, fd: int) -> None:
        self.directory = directory
        self._fd = fd

    @classmethod
    def acquire(cls, directory: OutputDirectory) -> OutputLock:
        """Lock `directory` for this process, without waiting. Raises VBatchUsageError (one
        line, naming the directory and the holder's pid, host and start time) when another
        process holds it, or naming the directory when the lock file cannot be created."""
        for _ in range(_MAX_ATTEMPTS):
            try:
                fd = directory.open_file(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW)
            except OSError as error:
                raise VBatchUsageError(f"output directory {directory.path} is not writable: "
                                       f"{error.strerror or type(error).__name__}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = _describe_holder(fd)
                os.close(fd)
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise VBatchUsageError(
                    f"output directory {directory.path} is in use by another vbatch job "
                    f"({holder}); wait for it to finish or choose another --output") from None
            if cls._is_current(directory, fd):
                lock = cls(directory, fd)
                lock._write_holder()
                return lock
            os.close(fd)     # locked a file its holder had just unlinked: try the new one
        raise VBatchUsageError(f"output directory {directory.path}: could not take its lock "
                               f"file {LOCK_FILE} (it keeps being replaced)")

    @staticmethod
    def _is_current(directory: OutputDirectory, fd: int) -> bool:
        try:
            named = os.stat(LOCK_FILE, dir_fd=directory.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return os.path.samestat(named, os.fstat(fd))

    def _write_holder(self) -> None:
        line = (json.dumps(holder_info()) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, line, 0)
        os.fsync(self._fd)

    @property
    def is_held(self) -> bool:
        """True until `release()`."""
        return self._fd >= 0

    def release(self) -> None:
        """Remove the lock file and drop the lock. Idempotent."""
        if self._fd < 0:
            return
        try:
            self.directory.remove(LOCK_FILE)
        finally:
            os.close(self._fd)
            self._fd = -1
