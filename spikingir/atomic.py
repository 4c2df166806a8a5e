"""Atomic file writes: every file the library writes (weights, checkpoints, reports,
restored images, figures) goes through :func:`atomic_paths`, so a reader sees the
old file or the new one, never a partial one, and a failure leaves nothing behind."""
import contextlib
import os
import tempfile

__all__ = ["atomic_paths", "write_atomic"]


def _umask_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file (mkstemp makes 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_paths(*paths):
    """Yields one path to write per path in ``paths``: a temporary file in the
    final folder (created if missing). When the block succeeds each is renamed
    over its path, with the usual file mode; if the block (or a rename) fails,
    the temporary files are removed and the old files stay.

    A symlink is followed (its target is replaced, the link stays), and a path
    that exists but is not a regular file (a device such as ``/dev/null``, a
    FIFO) is yielded as it is and written directly. Temporary names are short
    (``.tmp-XXXXXXXX`` + the file's extension), so any legal file name works.
    An ``OSError`` names the file the caller asked for, not a temporary one."""
    targets = [os.path.realpath(os.fspath(p)) for p in paths]
    temps = {}  # index -> temporary path not yet renamed
    current = os.fspath(paths[0]) if paths else ""
    try:
        for i, (path, target) in enumerate(zip(paths, targets)):
            current = os.fspath(path)
            if os.path.exists(target) and not os.path.isfile(target):
                continue  # a device, a FIFO, or a folder (then the write says so)
            folder = os.path.dirname(target)
            os.makedirs(folder, exist_ok=True)
            fd, temps[i] = tempfile.mkstemp(dir=folder, prefix=".tmp-",
                                            suffix=os.path.splitext(target)[1])
            os.close(fd)
        yield [temps.get(i, target) for i, target in enumerate(targets)]
        mode = _umask_mode()
        for i in sorted(temps):
            current = os.fspath(paths[i])
            os.chmod(temps[i], mode)
            os.replace(temps[i], targets[i])
            del temps[i]
    except OSError as err:
        raise OSError(err.errno, f"cannot write {current}: {err.strerror or err}") from None
    finally:
        for tmp in temps.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def write_atomic(path, text_or_bytes):
    """Writes ``text_or_bytes`` (``str`` or ``bytes``) to ``path`` atomically
    (:func:`atomic_paths`)."""
    mode = "wb" if isinstance(text_or_bytes, bytes) else "w"
    with atomic_paths(path) as (tmp,):
        with open(tmp, mode) as f:
            f.write(text_or_bytes)
