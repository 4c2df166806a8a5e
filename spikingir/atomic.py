"""Atomic file writes: every file the library writes (weights, checkpoints, reports,
restored images, figures) goes through :func:`atomic_paths`, so a reader sees the
old file or the new one, never a partial one, and a failure leaves nothing behind."""
import contextlib
import errno
import os
import stat
import tempfile

__all__ = ["atomic_paths", "write_atomic", "is_special", "sync"]


def _umask_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file (mkstemp makes 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def is_special(path) -> bool:
    """Whether ``path`` exists and is neither a regular file nor a folder: a device
    (``/dev/null``), a FIFO, or what ``/dev/stdout`` / ``/dev/fd/N`` point at.
    ``os.stat`` follows those links (``realpath`` cannot: a pipe's target is no path)."""
    try:
        mode = os.stat(os.fspath(path)).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def sync(f):
    """``flush`` and ``fsync`` an open file, when it is a regular file (``fsync``
    of a pipe or a device raises EINVAL)."""
    f.flush()
    if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        os.fsync(f.fileno())


def _cannot_write(path, err):
    """``err`` as an OSError of the same kind that names ``path``."""
    if err.errno is None:  # e.g. PIL / matplotlib raise OSError("...") without one
        return OSError(f"cannot write {path}: {err}")
    return OSError(err.errno, f"cannot write {path}: {err.strerror or err}")


@contextlib.contextmanager
def atomic_paths(*paths):
    """Yields one path to write per path in ``paths``: a temporary file in the
    final folder (created if missing). When the block succeeds each is renamed
    over its path, with the usual file mode; if the block fails, the temporary
    files are removed and the old files stay (a rename that fails after an
    earlier one succeeded leaves the earlier file new).

    A symlink is followed (its target is replaced, the link stays), and a path
    that is not a regular file (a device such as ``/dev/null``, a FIFO,
    ``/dev/stdout``) is yielded as it is and written directly. Temporary names
    are short (``.tmp-XXXXXXXX`` + the file's extension), so any legal file name
    works. Errors of creating or renaming the files are OSErrors naming the file
    the caller asked for; the block's own exceptions pass unchanged."""
    yielded, temps = [], {}  # temps: index -> temporary path not yet renamed
    try:
        for i, path in enumerate(paths):
            if is_special(path):
                yielded.append(os.fspath(path))
                continue
            target = os.path.realpath(os.fspath(path))
            folder = os.path.dirname(target)
            try:
                if os.path.isdir(target):  # before any rename: no file replaces a folder
                    raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
                os.makedirs(folder, exist_ok=True)
                fd, temps[i] = tempfile.mkstemp(dir=folder, prefix=".tmp-",
                                                suffix=os.path.splitext(target)[1])
            except OSError as err:
                raise _cannot_write(path, err) from None
            os.close(fd)
            yielded.append(temps[i])
        yield yielded
        mode = _umask_mode()
        for i in sorted(temps):
            try:
                os.chmod(temps[i], mode)
                os.replace(temps[i], os.path.realpath(os.fspath(paths[i])))
            except OSError as err:
                raise _cannot_write(paths[i], err) from None
            del temps[i]
    finally:
        for tmp in temps.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def write_atomic(path, text_or_bytes):
    """Writes ``text_or_bytes`` (``str`` or ``bytes``) to ``path`` atomically
    (:func:`atomic_paths`)."""
    mode = "wb" if isinstance(text_or_bytes, bytes) else "w"
    with atomic_paths(path) as (tmp,):
        try:
            with open(tmp, mode) as f:
                f.write(text_or_bytes)
        except OSError as err:
            raise _cannot_write(path, err) from None
