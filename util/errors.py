"""How the entry points report what a user got wrong: one line, `error: ...`, and no traceback.

The checks of flags, files and folders raise ValueError or an OSError (FileNotFoundError,
PermissionError ...) whose message starts with the flag or the file and says what was expected.
`one_line_errors()` around an entry point's set-up turns those into `SystemExit("error: ...")`,
which Python prints as that one line with exit status 1. Anything else (a bug) keeps its
traceback. Set-up runs the same checks on every rank, so every rank stops with the same line.
"""
import contextlib

INPUT_ERRORS = (ValueError, OSError)


def one_line(error: BaseException) -> str:
    """The message of an input error as one line. An OSError Python raised itself reads
    `[Errno 2] No such file or directory: 'x'`: shown as `x: No such file or directory`."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


def with_kind(error: BaseException) -> str:
    """`Kind: message` on one line, for a file that could not be read (e.g. `OSError: image
    file is truncated`), listed or named beside the file."""
    return " ".join(f"{type(error).__name__}: {error}".split())


@contextlib.contextmanager
def one_line_errors(prefix: str = "error: "):
    """Inside the block, a ValueError or OSError ends the process with `<prefix><message>`."""
    try:
        yield
    except INPUT_ERRORS as e:
        raise SystemExit(prefix + one_line(e)) from None
