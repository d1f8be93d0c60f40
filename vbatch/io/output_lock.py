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
manager). On an object store (`ObjectStoreLock`) the lock is the object `.vbatch.lock` itself,
created only if absent: a conditional write (S3 `If-None-Match: *`; fsspec's `mode="create"`),
then read back and checked to hold this job's random token. It holds the same holder line (plus
the token and the holder's machine identity), and a second job gets the same refusal. Nothing
drops it when its holder dies, so a lock whose holder ran on this machine (same host name, boot
id and pid namespace) and no longer runs (its pid is gone, or is another process now) is stale
and taken over (on S3 by an overwrite conditional on the stale object's ETag, so two jobs
taking it over at once cannot both win). A lock left by a job that died on another machine
stays until deleted by hand (the refusal says which object). On stores that ignore conditional
writes the lock is advisory: the object is looked for first and read back after writing, which
refuses any job that starts while another runs, but two jobs starting in the same instant may
both proceed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import socket
from datetime import datetime, timezone

from vbatch.errors import VBatchUsageError
from vbatch.io.directory import OutputDirectory
from vbatch.io.object_store_dir import ObjectStoreDirectory, ObjectStoreError

#: The lock file inside the output directory (hidden: Parquet readers skip it).
LOCK_FILE = ".vbatch.lock"
_MAX_ATTEMPTS = 20


def holder_info() -> dict:
    """What the lock file says about its holder: this process's pid, host, start time."""
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _describe_holder(fd: int) -> str:
    try:
        return _describe(os.pread(fd, 4096, 0))
    except OSError:
        return _describe(b"")


def _describe(content: bytes) -> str:
    try:
        info = json.loads(content.decode() or "{}")
        return (f"pid {info['pid']} on host {info['host']}, started {info['started_at']}")
    except (ValueError, KeyError, TypeError):
        return "holder unknown: it has not written its pid yet"


def _in_use(directory, holder: str, hint: str = "") -> VBatchUsageError:
    return VBatchUsageError(
        f"output directory {directory.path} is in use by another vbatch job ({holder}); wait "
        f"for it to finish or choose another --output{hint}")


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
                raise _in_use(directory, holder) from None
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


def _read_file(path: str) -> str | None:
    try:
        with open(path) as file:
            return file.read().strip()
    except OSError:
        return None


def _machine() -> dict:
    """What tells this machine and pid namespace apart from others with the same host name
    (containers): the kernel's boot id and the pid namespace (Linux; None elsewhere)."""
    try:
        pid_namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_namespace = None
    return {"host": socket.gethostname(),
            "boot_id": _read_file("/proc/sys/kernel/random/boot_id"),
            "pid_namespace": pid_namespace}


def _process_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None."""
    stat = _read_file(f"/proc/{pid}/stat")
    return None if stat is None else stat.rsplit(")", 1)[-1].split()


def _process_start(pid: int) -> str | None:
    """Process `pid`'s start time in clock ticks since boot (Linux), which a reused pid does
    not share; None when unknown."""
    fields = _process_stat(pid)
    return None if fields is None else fields[19]


def _holder_is_gone(info: dict) -> bool:
    """True when the lock's holder ran on this machine and has ended (see module docstring)."""
    machine = _machine()
    if any(info.get(key) != value for key, value in machine.items()) or None in machine.values():
        return False
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False                    # another user's live process
    fields = _process_stat(pid)
    if fields is None:
        return False
    # a zombie (killed, not yet reaped) writes nothing; a reused pid started at another time
    return fields[0] == "Z" or info.get("process_start") not in (None, fields[19])


class ObjectStoreLock:
    """The lock object of an output prefix on an object store, held until `release()` (see
    module docstring: created only if absent, read back; a dead local holder's lock taken
    over)."""

    def __init__(self, directory: ObjectStoreDirectory, token: str) -> None:
        self.directory = directory
        self._token = token
        self._is_held = True

    @classmethod
    def acquire(cls, directory: ObjectStoreDirectory) -> ObjectStoreLock:
        """Lock the prefix `directory` for this process, without waiting. Raises
        VBatchUsageError (one line: the same refusal as `OutputLock`, naming the lock object)
        while another job holds it, or when the lock object cannot be written."""
        token = secrets.token_hex(16)
        content = (json.dumps({**holder_info(), **_machine(), "token": token,
                               "process_start": _process_start(os.getpid())}) + "\n").encode()
        try:
            for _ in range(_MAX_ATTEMPTS):
                found = directory.info(LOCK_FILE)
                if found is None:
                    taken = directory.create_exclusive(LOCK_FILE, content)
                else:
                    taken = cls._take_over_if_stale(directory, found, content)
                if taken and cls._holds(directory, token):
                    return cls(directory, token)
        except ObjectStoreError as error:
            raise VBatchUsageError(f"output directory {directory.path} is not writable: "
                                   f"{error.reason}") from None
        raise VBatchUsageError(f"output directory {directory.path}: could not take its lock "
                               f"object {LOCK_FILE} (it keeps being replaced)")

    @staticmethod
    def _take_over_if_stale(directory: ObjectStoreDirectory, found: dict,
                            content: bytes) -> bool:
        try:
            held = directory.read_bytes(LOCK_FILE)
        except FileNotFoundError:
            return False                            # released meanwhile: try again
        try:
            info = json.loads(held.decode())
        except ValueError:
            info = {}
        if not isinstance(info, dict) or not _holder_is_gone(info):
            raise _in_use(directory, _describe(held),
                          f" (a job that died on another machine leaves its lock: delete "
                          f"{directory.path / LOCK_FILE} if none runs)")
        return directory.replace_if_unchanged(LOCK_FILE, content, found)

    @staticmethod
    def _holds(directory: ObjectStoreDirectory, token: str) -> bool:
        try:
            info = json.loads(directory.read_bytes(LOCK_FILE).decode())
        except (FileNotFoundError, ValueError):
            return False
        return isinstance(info, dict) and info.get("token") == token

    @property
    def is_held(self) -> bool:
        """True until `release()`."""
        return self._is_held

    def release(self) -> None:
        """Delete the lock object if it is still this job's. Idempotent."""
        if not self._is_held:
            return
        self._is_held = False
        try:
            if self._holds(self.directory, self._token):
                self.directory.remove(LOCK_FILE)
        except ObjectStoreError:
            pass    # store unreachable: the lock stays, stale (taken over) once we have ended
