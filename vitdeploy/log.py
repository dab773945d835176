"""Loggers and progress bars. Library code only asks for them; the CLI decides how loud to be."""
from __future__ import annotations

import logging
import sys
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")
_PROGRESS = {"enabled": True}


def get_logger(name: str = "vitdeploy") -> logging.Logger:
    return logging.getLogger(name if name.startswith("vitdeploy") else f"vitdeploy.{name}")


def configure(verbose: bool = False, progress: bool = True) -> None:
    """Called once by the CLI: messages and bars go to stderr, results to stdout."""
    root = logging.getLogger("vitdeploy")
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    _PROGRESS["enabled"] = progress


def progress(iterable: Iterable[T], desc: str, total: Optional[int] = None, unit: str = "batch") -> Iterator[T]:
    """A tqdm bar on stderr for long loops (calibration, export, evaluation)."""
    if not _PROGRESS["enabled"]:
        yield from iterable
        return
    from tqdm import tqdm

    yield from tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)
