"""Running an entry point on bad input and checking how it refuses.

`refused(script, argv, watch)` runs `script` as `python script argv...` would, but inside the
test process (the imports are paid once for the whole suite, not once per case): its
`if __name__ == "__main__":` block runs through runpy, an uncaught exception is what Python
would print as a traceback, and a SystemExit is what the interpreter would turn into an exit
status and a message. It then asserts what a user is owed:

- a non-zero exit;
- exactly one line of standard error that says `error:` (`[rank N] error:` in a distributed
  run), and no traceback;
- nothing under `watch` created, changed or removed (every file's size, mtime and bytes);
- within `seconds` of the start.

It returns the error line, for the caller to check that it names the file or flag.
"""
import contextlib
import hashlib
import io
import os
import runpy
import signal
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ERROR_PREFIXES = ("error:", "[rank")


def snapshot(*roots) -> dict:
    """{path: (kind, size, mtime, sha256)} of everything under `roots` (links not followed)."""
    seen = {}
    for root in map(Path, roots):
        if not root.exists() and not root.is_symlink():
            continue
        paths = [root] if not root.is_dir() else [root, *root.rglob("*")]
        for path in paths:
            if path.is_symlink():
                seen[str(path)] = ("link", os.readlink(path))
            elif path.is_dir():
                seen[str(path)] = ("dir",)
            else:
                stat = path.stat()
                seen[str(path)] = ("file", stat.st_size, stat.st_mtime_ns,
                                   hashlib.sha256(path.read_bytes()).hexdigest())
    return seen


def run_in_process(script: str, argv) -> tuple:
    """(exit status, stdout, stderr) of `python script argv...`, run in this process. The
    signal handlers and the working directory are restored afterwards."""
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [str(REPO / script), *map(str, argv)]
    status = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(sys.argv[0], run_name="__main__")
            except SystemExit as e:  # as the interpreter turns it into a status
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                    status = 1
                else:
                    status = e.code or 0
            except BaseException:  # noqa: BLE001 - what Python would print and exit 1 on
                traceback.print_exc()
                status = 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return status, out.getvalue(), err.getvalue()


def error_lines(text: str) -> list:
    return [line for line in text.splitlines()
            if line.startswith("error:") or (line.startswith("[rank") and "] error:" in line)]


def refused(script: str, argv, watch=(), seconds: float = 30.0) -> str:
    """Run `script argv` and assert it refuses as described above; returns the error line."""
    before = snapshot(*watch)
    start = time.monotonic()
    status, out, err = run_in_process(script, argv)
    elapsed = time.monotonic() - start
    shown = f"{script} {' '.join(map(str, argv))}\n--- stdout\n{out[-2000:]}\n--- stderr\n{err[-4000:]}"
    assert "Traceback" not in err and "Traceback" not in out, f"a traceback:\n{shown}"
    assert status != 0, f"exit status 0:\n{shown}"
    lines = error_lines(err)
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{shown}"
    after = snapshot(*watch)
    changed = sorted(set(before.items()) ^ set(after.items()))
    assert not changed, f"files written or changed: {[p for p, *_ in changed][:10]}\n{shown}"
    assert elapsed < seconds, f"took {elapsed:.1f} s to refuse:\n{shown}"
    return lines[0]
