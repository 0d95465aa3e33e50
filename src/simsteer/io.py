"""Crash-safe writes, the run-directory lock, and JSON/JSONL helpers.

Every file and folder an artefact is made of is *committed* by one rename:

- :func:`atomic_write_bytes` writes a file to a unique hidden sibling
  (``.<name>.<pid>.<random>.tmp``), fsyncs it and moves it over the target with ``os.replace``;
- :func:`staged_dir` yields an empty hidden sibling folder to fill and then renames it into
  place (an existing folder there is renamed aside first and deleted after), so a reader
  sees the old folder, no folder, or the new one, never half of one.

After each rename the parent folder is fsynced, so the commit survives a power cut too. A
killed process leaves at most hidden temporaries behind, which :func:`sweep_temporaries`
removes once the writer holds the folder's lock (:func:`exclusive_lock`). Tests observe
every commit through :func:`commit_hook` (count them, or raise to simulate a crash).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import SimsError

try:  # POSIX; elsewhere a run directory is not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

#: Suffixes of the hidden temporaries a writer leaves behind when it is killed.
TEMPORARY_SUFFIXES = (".tmp", ".old")

#: ``hook(phase, target)`` with phase ``"before"`` or ``"after"`` the rename that commits target.
CommitHook = Callable[[str, Path], None]
_commit_hooks: list[CommitHook] = []


def new_file_mode() -> int:
    """The permissions ``open()`` would give a new file: ``0o666`` minus the umask.

    (``mkstemp`` creates its files ``0o600``, which would hide a shared run directory
    from everybody else.) Read from ``/proc`` where it exists, so the process-wide umask
    is never changed, not even for a moment.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def temporary_sibling(path: str | Path, suffix: str = ".tmp") -> Path:
    """A fresh hidden sibling name of ``path``: ``.<name>.<pid>.<random><suffix>``.

    The pid and the random part keep two writers (or two attempts) from ever sharing a
    temporary, so nobody can commit another process's half-written file.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}{suffix}")


def is_temporary(name: str) -> bool:
    """Whether a file or folder name is one of the hidden temporaries written here."""
    return name.startswith(".") and name.endswith(TEMPORARY_SUFFIXES)


@contextmanager
def commit_hook(hook: CommitHook) -> Iterator[None]:
    """Call ``hook(phase, target)`` right before and right after every commit in the block.

    A commit is the rename that puts a finished file or folder in place; writes inside a
    folder being staged are not commits (the folder's own rename is). Tests use this to
    count a run's commit points and to raise at one of them, simulating a crash.

    Args:
        hook: called with ``"before"`` or ``"after"`` and the committed path.
    """
    _commit_hooks.append(hook)
    try:
        yield
    finally:
        _commit_hooks.remove(hook)


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (the renames in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder; the rename still happened
        pass
    finally:
        os.close(fd)


def _inside_staged_folder(path: Path) -> bool:
    return any(is_temporary(part) for part in path.parent.parts)


def _commit(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` (one step), fsync the parent, tell the hooks."""
    staged = _inside_staged_folder(dst)
    if not staged:
        for hook in list(_commit_hooks):
            hook("before", dst)
    os.replace(src, dst)
    if not staged:  # a staged folder is fsynced as a whole before its own commit
        fsync_dir(dst.parent)
        for hook in list(_commit_hooks):
            hook("after", dst)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` in one step: a unique temporary sibling, fsync, rename.

    Args:
        path: the target file (its folder is created if needed).
        data: the whole content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        # 0o666 minus the umask, like open(); O_EXCL: the name is ours alone.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        _commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def staged_dir(path: str | Path, replace: bool = True) -> Iterator[Path]:
    """Write the folder ``path`` in one step: fill the yielded empty temporary sibling.

    On a clean exit the files are fsynced and the sibling is renamed to ``path``; a folder
    already there is first renamed aside and deleted after, so ``path`` is always either
    the old folder, absent for an instant, or the new one. On an exception the sibling is
    deleted and ``path`` is untouched.

    Args:
        path: the folder to write.
        replace: replace a folder already at ``path``; if False, only an empty one is
            replaced and a non-empty one makes the commit fail with ``OSError`` (two
            processes creating one folder: exactly one wins).

    Example:
        >>> with staged_dir("out/steering") as tmp:
        ...     atomic_write_bytes(tmp / "a.json", b"{}")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    tmp.mkdir()  # 0o777 minus the umask, like every other folder
    try:
        yield tmp
        _fsync_tree(tmp)
        if replace and path.is_dir() and not path.is_symlink():
            old = temporary_sibling(path, ".old")
            _commit(path, old)
            _commit(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            _commit(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(root: Path) -> None:
    """fsync every folder under ``root`` (its files were fsynced when written)."""
    for folder, _, _ in os.walk(root):
        fsync_dir(folder)


def sweep_temporaries(root: str | Path) -> list[Path]:
    """Delete the hidden temporaries a killed writer left anywhere under ``root``.

    Only call this while holding the folder's :func:`exclusive_lock`: a live writer's
    temporaries look the same.

    Returns:
        the deleted paths.
    """
    swept = []
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            if is_temporary(name):
                target = Path(folder) / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    target.unlink(missing_ok=True)
                swept.append(target)
        dirs[:] = [d for d in dirs if not is_temporary(d)]
    return swept


def _open_lock_file(path: Path, what: str) -> int:
    """Open (or create) the lock file ``path`` for writing, never through a link: a run
    directory may be edited by others, and a symbolic link (or a hard link) planted at
    the lock's name must not make the lock truncate the file it points to.

    Raises:
        SimsError: ``path`` is a symbolic link, not a regular file, or a hard link.
    """
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        # O_NONBLOCK: a FIFO planted there must not hang the open (refused just below).
        fd = os.open(path, flags | getattr(os, "O_NONBLOCK", 0), 0o666)
    except OSError:
        if path.is_symlink():
            raise SimsError(
                f"the lock file of {what} ({path}) is a symbolic link; remove it (it is never followed)"
            ) from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        kind = "a hard link" if stat.S_ISREG(info.st_mode) else "not a regular file"
        raise SimsError(f"the lock file of {what} ({path}) is {kind}; remove it")
    return fd


@contextmanager
def exclusive_lock(path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``path`` inside the block (not waiting).

    The file keeps the holder's pid, so that a second writer is told who it is.

    Args:
        path: the lock file (created if needed, never deleted: deleting it would let two
            processes lock two different files of the same name).
        what: how the message names the locked thing (``"run directory runs/x"``).

    Raises:
        SimsError: another process holds the lock (one line naming its pid).
    """
    path = Path(path)
    fd = _open_lock_file(path, what)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
                raise SimsError(
                    f"{what} is being written by another process (pid {holder}); "
                    "wait for it to finish or stop it"
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_json(path: str | Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False)  # JSON has no NaN
    atomic_write_bytes(path, (text + "\n").encode())


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows)
    atomic_write_bytes(path, text.encode())


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SimsError(f"file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SimsError(f"{path} is not valid JSON ({exc})") from None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    rows = []
    try:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SimsError(f"{path}:{lineno} is not valid JSON ({exc.msg})") from None
    except FileNotFoundError:
        raise SimsError(f"file not found: {path}") from None
    except UnicodeDecodeError:
        raise SimsError(f"{path} is not UTF-8 text") from None
    return rows


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (one owned by another user counts):
    how a stale temporary folder or lock left by a killed process is told apart."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's process
        return True
    return True
