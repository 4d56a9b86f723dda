"""Writing files so that a crash never leaves half of one, with the permissions a user expects."""
import errno
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc), else by the
    set-and-restore dance (safe here: nothing else creates files at that instant)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _RememberWriteError:
    """File wrapper that keeps the OSError of a failed write. torch.save reports a failed write as
    an opaque RuntimeError from its zip writer; the remembered error says what happened."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def atomic_write(path, write: Callable) -> None:
    """Call write(file) on a temporary file beside `path`, then rename it over `path`.

    A crash at any point leaves either the old file or the new one, never half of one (a killed
    writer leaves a `.<name>.*.tmp` file: see `remove_stale_temporaries`). The file gets the
    permissions an ordinary `open` would give it (0666 minus the umask), not mkstemp's 0600, so a
    team can read a cache or checkpoint one of them wrote. A full disk is reported as such.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    f = None
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as raw:
            f = _RememberWriteError(raw)
            write(f)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        cause = f.error if f is not None and f.error is not None else e
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(cause.errno, f"no space left on the device (or quota) writing {path}; "
                                       "the previous file, if any, is unchanged") from e
        raise


def remove_stale_temporaries(folder, name: str = "*") -> int:
    """Delete the temporaries `atomic_write` left in `folder` for targets matching `name` when
    its process was killed. Only safe while nothing is writing those targets."""
    removed = 0
    for stale in Path(folder).glob(f".{name}.*.tmp"):
        stale.unlink(missing_ok=True)
        removed += 1
    return removed


def sha256(path) -> str:
    """The SHA-256 of a file, read in 1 MiB chunks (a 1.6 GB reference batch never sits in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def nearest_existing(path) -> Path:
    """`path` if it exists, else its nearest existing ancestor: where it would be created."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path, flag: str, folder: bool = False) -> Path:
    """Refuse, before any work, an output that cannot be written, creating nothing: a folder
    where a file is to go (or a file where a folder, with `folder`), or a nearest existing
    folder that is a file or that this user cannot write to. Returns `path` as a Path."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: a file is there (expected a folder to write into)")
    if not folder and path.is_dir():
        raise ValueError(f"{flag} {path}: a folder is there (expected the name of a file to write)")
    existing = nearest_existing(path if folder and path.is_dir() else path.parent)
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file (expected a folder there)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: cannot write in {existing} (expected a folder this "
                         "user can write to)")
    return path

