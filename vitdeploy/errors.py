"""One family of exceptions for everything that can go wrong, and the stage it went wrong in.

The CLI turns a VitDeployError into one line on stderr: exit code 2 for the user's input, 1 for a
failure inside a stage (`StageFailure`: any other exception, such as a full disk, wrapped with
the stage's name). ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional


class VitDeployError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2
    stage: Optional[str] = None   # set by `stage()`: load, calibrate, export, verify, write, ...


class InputError(VitDeployError):
    """A file, folder or value the user passed is missing or unusable."""


class UnsupportedModelError(VitDeployError):
    """The model cannot be loaded or handled (unknown arch, wrong state_dict, NaN weights...)."""


class ExportError(VitDeployError):
    """The ONNX export or its verification failed."""


class BuildError(VitDeployError):
    """An engine could not be built for the requested target."""


def first_line(exc: BaseException, limit: int = 0) -> str:
    """An exception's message as one line (its first), cut at ``limit`` characters if given; the
    exception's type name when it has no message."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line[:limit] if limit else line


class StageFailure(VitDeployError):
    """Something other than the input failed inside a stage (a bug, a full disk, ...)."""

    exit_code = 1

    def __init__(self, stage_name: str, exc: BaseException):
        first = first_line(exc) if str(exc).strip() else ""
        super().__init__(f"{type(exc).__name__}{': ' + first if first else ''} (--debug shows the traceback)")
        self.stage = stage_name


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, CI, ``docker stop``), handled like Ctrl-C: cleaned up, one line, exit 143."""


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Name the stage of whatever fails inside: the CLI prints it (``vitdeploy: error: calibrate: ...``)."""
    try:
        yield
    except VitDeployError as exc:
        if exc.stage is None:
            exc.stage = name
        raise
    except KeyboardInterrupt as exc:
        if getattr(exc, "stage", None) is None:
            exc.stage = name
        raise
    except Exception as exc:
        raise StageFailure(name, exc) from exc
