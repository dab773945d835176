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


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str = "batch", initial: int = 0, enabled: bool = True):
    """A tqdm bar driven by hand (``update``, ``set_postfix`` for a running loss, ``close``), or one
    that does nothing when bars are off or ``enabled`` is False (ranks other than 0)."""
    if not (_PROGRESS["enabled"] and enabled):
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=False, file=sys.stderr, dynamic_ncols=True)
