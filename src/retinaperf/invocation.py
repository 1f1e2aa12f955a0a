"""How the user started retinaperf, for every message that tells them a command to type: the
script as they ran it (`.venv/bin/retinaperf`: after `make run` it is not on PATH), or
`python -m retinaperf` with this interpreter. A base module: it needs nothing of the package."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

COMMAND_ENV = "RETINAPERF_COMMAND"
"""How the command that started this process was typed, for the processes it starts (torchrun's
workers, `--repeat`'s rounds): their own argv[0] is `python -m retinaperf`'s."""

SCRIPT = "retinaperf"


def command(*args: str | os.PathLike[str]) -> str:
    """`retinaperf ARGS` as the user can type it here, e.g. `.venv/bin/retinaperf run --resume
    runs/int` (arguments quoted for a POSIX shell where they need it)."""
    return " ".join([prefix(), *map(shlex.quote, map(str, args))])


def prefix(
    argv0: str | None = None, cwd: Path | None = None, environ: Mapping[str, str] | None = None
) -> str:
    """What starts retinaperf the way this process was started: the launching command's (handed
    down in COMMAND_ENV), the `retinaperf` script of argv[0], else this interpreter with
    `-m retinaperf` (python -m, torchrun's workers, a program embedding the CLI)."""
    environ = os.environ if environ is None else environ
    if environ.get(COMMAND_ENV):
        return environ[COMMAND_ENV]
    argv0 = sys.argv[0] if argv0 is None else argv0
    cwd = Path.cwd() if cwd is None else cwd
    if argv0 and Path(argv0).name == SCRIPT:
        return _shown(argv0, cwd)
    return f"{_shown(sys.executable, cwd)} -m retinaperf"


def _shown(program: str, cwd: Path) -> str:
    """`program` as a shell here reaches it: its bare name where PATH finds this very file, its
    path relative to `cwd` when inside it, else its absolute path. Paths are compared without
    resolving links: a venv's python is a link to one that lacks the venv's packages."""
    path = os.path.abspath(os.path.join(cwd, program))
    found = shutil.which(Path(path).name)
    if found is not None and os.path.abspath(found) == path:
        return Path(path).name
    relative = os.path.relpath(path, cwd)
    if not relative.startswith(os.pardir):
        return shlex.quote(relative if os.sep in relative else f".{os.sep}{relative}")
    return shlex.quote(path)


@contextlib.contextmanager
def handed_down() -> Iterator[None]:
    """This command's prefix in the environment of the processes started inside the block, so
    that their messages name the command the user typed, not theirs."""
    saved = os.environ.get(COMMAND_ENV)
    os.environ[COMMAND_ENV] = prefix()
    try:
        yield
    finally:
        if saved is None:
            del os.environ[COMMAND_ENV]
        else:
            os.environ[COMMAND_ENV] = saved
