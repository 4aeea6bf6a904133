"""Crash-safe file writing: every file appears whole or not at all, with the user's permissions.

:func:`atomic_write` writes to a temporary file in the target's directory, flushes it to disk,
renames it over the target and flushes the directory entry, so a crash (or a full disk) at any
point leaves either the old file or the new one, never a mixture. Temporary files are named
``.tmp-<name>-<random>``; a process killed mid-write leaves one behind, which
:func:`remove_stale_temporaries` deletes on the next start.

Write failures (disk full, read-only file system, no permission) become one
:class:`~tokentune.errors.TokenTuneError` line naming the file, the reason and the fix: in
:func:`atomic_write`, and for files written in place (appended logs, other libraries' writers)
through :func:`reported_writes`.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
from typing import Any, Callable, List

from .errors import TokenTuneError

TMP_PREFIX = ".tmp-"

_HINTS = {
    errno.ENOSPC: "free some space (or choose an output directory on another disk)",
    errno.EDQUOT: "free some space or raise the disk quota",
    errno.EROFS: "the file system is read-only: choose a writable output directory",
    errno.EACCES: "you may not write there: choose an output directory you own",
    errno.EPERM: "you may not write there: choose an output directory you own",
}
# what torch.save / safetensors raise when the disk fills up under them
_WRITE_FAILURE_MARKERS = ("inline_container", "file write failed", "No space left", "Disk quota", "Read-only")


def _reason(exc: BaseException, directory: str) -> str:
    code = getattr(exc, "errno", None)
    if code is None:
        code = next((c for c, marker in ((errno.ENOSPC, "No space left"), (errno.EDQUOT, "Disk quota"),
                                         (errno.EROFS, "Read-only")) if marker in str(exc)), None)
    if code is None:   # torch's stream writer hides the errno: look at the disk itself
        try:
            if shutil.disk_usage(directory).free < 64 * 1024 ** 2:
                code = errno.ENOSPC
        except OSError:
            pass
    text = os.strerror(code) if code is not None else " ".join(str(exc).split())[:160]
    hint = _HINTS.get(code, "check the disk and the directory's permissions")
    return f"{text}; {hint}"


def write_failure(path: str, exc: BaseException, consequence: str = "") -> TokenTuneError:
    """The one-line error for a failed write of ``path``: the reason, the fix, then ``consequence``."""
    path = os.path.abspath(path)
    return TokenTuneError(f"cannot write {path}: {_reason(exc, os.path.dirname(path))}{consequence}")


@contextlib.contextmanager
def reported_writes(path: str, consequence: str = ""):
    """Writes to ``path`` (a file or a folder) in the body that fail with an ``OSError`` (disk full,
    read-only file system, no permission) become one :func:`write_failure` line."""
    try:
        yield
    except OSError as exc:
        raise write_failure(path, exc, consequence) from None


def _make_directory(directory: str, what: str) -> None:
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise TokenTuneError(f"cannot create the {what} {directory}: {_reason(exc, os.path.dirname(directory))}") from None


def fsync_directory(directory: str) -> None:
    """Flush a directory entry (a rename) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)``, then atomically replace ``path`` by what it wrote.

    The temporary file is created with mode 0o666 filtered by the process umask (as ``open``
    would), so the result has the user's usual permissions.
    """
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    _make_directory(directory, "directory")
    tmp = os.path.join(directory, f"{TMP_PREFIX}{os.path.basename(path)}-{secrets.token_hex(4)}")
    try:
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            mode = os.stat(tmp).st_mode & 0o777          # 0o666 minus the umask, as open() gives
            write(tmp)
            os.chmod(tmp, mode)                          # writers that replace the file (safetensors) use 0o600
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise TokenTuneError(f"cannot write {path}: {_reason(exc, directory)}; the previous version of the "
                                 "file is intact") from None
        except Exception as exc:  # noqa: BLE001 - torch/safetensors report a full disk as RuntimeError & co
            if not any(marker in str(exc) for marker in _WRITE_FAILURE_MARKERS):
                raise
            raise TokenTuneError(f"cannot write {path}: {_reason(exc, directory)}; the previous version of the "
                                 "file is intact") from None
        fsync_directory(directory)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def atomic_write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True)
            fh.write("\n")
    atomic_write(path, write)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` atomically (newlines as given)."""
    def write(tmp):
        with open(tmp, "w", newline="") as fh:
            fh.write(text)
    atomic_write(path, write)


def atomic_torch_save(path: str, obj: Any) -> None:
    """``torch.save(obj)`` atomically."""
    import torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def remove_stale_temporaries(directory: str) -> List[str]:
    """Delete the temporary files a killed writer left in ``directory``; returns their names."""
    try:
        names = [n for n in os.listdir(directory) if n.startswith(TMP_PREFIX)]
    except OSError:
        return []
    removed = []
    for name in names:
        try:
            os.remove(os.path.join(directory, name))
            removed.append(name)
        except OSError:
            pass
    return removed


def check_writable_directory(directory: str, what: str = "output directory") -> str:
    """Create ``directory`` if needed and prove that data can be written in it; returns its path.

    Fails with one line when the path is a file, cannot be created, is not writable, or its disk
    is full (a probe file of 4 KiB is written and flushed to disk), before any work is done that
    would then be lost.
    """
    directory = os.path.abspath(os.path.expanduser(directory))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise TokenTuneError(f"the {what} {directory} is a file, not a directory; choose another path")
    _make_directory(directory, what)
    probe = os.path.join(directory, f"{TMP_PREFIX}probe-{secrets.token_hex(4)}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            os.write(fd, bytes(4096))     # an empty file needs no space: a full disk fails only on data
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise TokenTuneError(f"cannot write to the {what} {directory}: {_reason(exc, directory)}") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)
    return directory
