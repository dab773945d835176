"""Output folders: checked before any work, written whole or not at all, never over a user's files.

``OutputFolder(final, inputs)``:

- ``check()`` runs before anything is loaded. ``--out`` may be a missing path, an empty folder, or
  a previous vitdeploy output holding only what vitdeploy writes; not the current folder or one
  above it, and no input (checkpoint, images, plan) may lie inside it. The nearest existing parent
  must accept a new folder and the name must leave room for the temporary's suffix, so a read-only
  folder or a 250-character name fails in one line now, not after minutes of calibration.
  Temporaries that a killed run (SIGKILL, power loss) left next to ``final`` are removed.
- ``write()`` yields a hidden sibling ``.<name>.tmp-<pid>-XXXXXXXX``; on success it replaces
  ``final`` in two renames with SIGINT/SIGTERM held back, on any error or signal it vanishes, and
  so do the parent folders it had to create.

Files and folders honour the umask (``tempfile`` creates them 0600/0700, which would keep a bundle
from another user or a container).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Callable, IO, Iterable, Iterator, List, Optional

from .errors import InputError

# What vitdeploy writes, besides the files a build lists in build.json: the device side adds
# engines, their metadata, timing caches and benchmark reports to a bundle.
_ANALYSIS_FILES = {"sensitivity.json", "sensitivity.png", "plan.json"}
_LATER_FILES = {"build.json", "report.md", "model.engine", "model.dla.engine", "model.engine.json",
                "timing.cache", "entropy.cache", "benchmark.json", "bench.png"}
_LATER_SUFFIXES = (".engine", ".engine.json")
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:-.*)?$")
_TEMP_SUFFIX_LEN = len(".") + len(".tmp-") + 7 + 1 + 8  # pid (pid_max 4194304) and mkdtemp's 8 characters
_MAX_DEFAULT_NAME = 64


def folder_name(name: str) -> str:
    """A folder name for a model name: ASCII letters, digits, ``_.-``; stable and distinct.

    Names that lose characters no ASCII can stand for (``猫``, ``модель``) get a short hash of the
    original, so two such models never share ``engines/model``; very long names are cut, hashed.
    """
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    if not name.isascii():
        base = f"{base or 'model'}-{digest}"
    if len(base) > _MAX_DEFAULT_NAME:
        base = f"{base[:_MAX_DEFAULT_NAME - 9].rstrip('-.')}-{digest}"
    return base or "model"


class OutputFolder:
    """``--out``: checked up front (`check`), then written atomically (`write`)."""

    def __init__(self, final: Path, inputs: Iterable[Optional[Path]] = (), option: str = "--out"):
        self.final = Path(final)
        self.inputs = [Path(p) for p in inputs if p is not None]
        self.option = option

    # ------------------------------------------------------------------ checks, before any work

    def check(self) -> "OutputFolder":
        final = self.final.absolute()
        where = f"{self.option} {self.final}"
        resolved = Path(os.path.realpath(final))
        if not resolved.name:
            raise InputError(f"{where}: the output cannot be the file-system root")
        cwd = Path.cwd().resolve()
        if resolved == cwd or resolved in cwd.parents:
            raise InputError(f"{where} is the current folder or contains it: the build would replace it; "
                             f"choose a new folder, e.g. {self.option} engines/<name>")
        for path in self.inputs:
            inside = Path(os.path.realpath(path.absolute()))
            if inside == resolved or resolved in inside.parents:
                raise InputError(f"{where} holds the input {path}: replacing it would delete it; choose another folder")
        if final.is_symlink() or (final.exists() and not final.is_dir()):
            raise InputError(f"{where} exists and is not a folder: vitdeploy will not replace it")
        if final.is_dir():
            self._check_replaceable(final, where)
        parent = _existing_ancestor(final.parent)
        if not parent.is_dir():
            raise InputError(f"{where}: {parent} is a file, not a folder")
        name_max = _name_max(parent)
        if len(os.fsencode(final.name)) + _TEMP_SUFFIX_LEN > name_max:
            raise InputError(f"{where}: the folder name is {len(os.fsencode(final.name))} bytes, too long for this "
                             f"file system ({name_max - _TEMP_SUFFIX_LEN} at most here); pass a shorter "
                             f"{self.option}" + (" or --name" if self.option == "--out" else ""))
        try:  # the real test of "writable": root passes os.access everywhere, a read-only mount does not
            os.rmdir(tempfile.mkdtemp(prefix=".vitdeploy-probe-", dir=parent))
        except OSError as exc:
            raise InputError(f"{where}: cannot create a folder in {parent}: {exc.strerror or exc}") from exc
        if final.parent.is_dir():
            self._remove_stale_temporaries(final)
        return self

    def _check_replaceable(self, folder: Path, where: str) -> None:
        """Empty, or a previous vitdeploy output with nothing in it that vitdeploy did not write."""
        entries = sorted(os.listdir(folder))
        if not entries:
            return
        ours = _files_written_by_vitdeploy(folder)
        if ours is None:
            shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
            raise InputError(f"{where} is a folder that vitdeploy did not write (it holds {shown}): "
                             "pass a new or empty folder, or a previous vitdeploy output")
        foreign = [e for e in entries
                   if (folder / e).is_dir() or (e not in ours and not e.endswith(_LATER_SUFFIXES))]
        if foreign:
            raise InputError(f"{where} is a previous vitdeploy output, but it also holds {foreign[0]}"
                             f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}, which vitdeploy did "
                             "not write: move it away or choose another folder")

    def _remove_stale_temporaries(self, final: Path) -> None:
        """Temporaries of this output whose process is gone; a previous build that a killed run had
        moved aside (``.old``) is put back when nothing replaced it."""
        for entry in sorted(final.parent.iterdir()):
            match = _TEMP.match(entry.name)
            if not match or match["name"] != final.name or _alive(int(match["pid"])):
                continue
            if match["kind"] == "old" and not final.exists():
                entry.rename(final)
            else:
                shutil.rmtree(entry, ignore_errors=True)

    # ------------------------------------------------------------------ writing

    @contextlib.contextmanager
    def write(self) -> Iterator[Path]:
        final = self.final
        created = _make_parents(final.parent)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
        except BaseException:
            _remove_empty(created)
            raise
        try:
            tmp.chmod(0o777 & ~_umask())
            yield tmp
            with _signals_held():
                if final.exists():
                    self._check_replaceable(final, f"{self.option} {final}")  # it may have changed meanwhile
                    old = final.with_name(f".{final.name}.old-{os.getpid()}")
                    final.rename(old)
                    tmp.rename(final)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            _remove_empty(created)
            raise


def atomic_write(path: Path, write: Callable[[IO], None], mode: str = "wb") -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it over ``path``.

    Readers (and a build interrupted half way) never see a partial file; on error the temporary
    file is removed. ``mode`` is "wb" or "w" (text, UTF-8, "\\n" line ends). The file gets the
    permissions the umask allows, as ``open`` would give it.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        kwargs = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
        with os.fdopen(fd, mode, **kwargs) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# --------------------------------------------------------------------------- helpers

def _files_written_by_vitdeploy(folder: Path) -> Optional[set]:
    """The names vitdeploy wrote in ``folder`` (a build or an analysis), or None if it is not ours."""
    try:
        record = json.loads((folder / "build.json").read_text(encoding="utf-8"))
        if isinstance(record, dict) and {"target", "versions", "files"} <= set(record) \
                and isinstance(record["files"], dict):
            return set(record["files"]) | _LATER_FILES
    except (OSError, ValueError):
        pass
    try:
        report = json.loads((folder / "sensitivity.json").read_text(encoding="utf-8"))
        if isinstance(report, dict) and {"model", "layers", "loss"} <= set(report):
            return set(_ANALYSIS_FILES)
    except (OSError, ValueError):
        pass
    return None


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _make_parents(folder: Path) -> List[Path]:
    """mkdir -p, returning the folders it created (deepest last)."""
    missing = []
    folder = folder.absolute()
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return list(reversed(missing))


def _remove_empty(created: List[Path]) -> None:
    for path in reversed(created):
        with contextlib.suppress(OSError):
            path.rmdir()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT/SIGTERM back across the renames that swap the new output in (main thread only)."""
    held = {signal.SIGINT, signal.SIGTERM}
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (AttributeError, ValueError, OSError):  # not the main thread, or no pthread_sigmask
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
