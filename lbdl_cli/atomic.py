"""Output paths: checked before any work, written atomically (fill a temporary sibling, then rename it).

Torch-free, so that the tokenizer and `lbdl data prepare` use it without
paying torch's import time. The rules, in one place for every command:

- an output that exists is replaced only with --force, and only by its own kind (a directory by a directory);
- an output is never an input, never inside one, never contains one (--force cannot destroy what it reads);
- the place it goes must be writable: tried before the work starts, so that a bad --out fails in
  milliseconds with the user's path, not after minutes with a temporary one;
- a crash never leaves a half-written output under the final name, and the temporary siblings a killed
  process left behind (`.NAME.tmp-PID`) are removed by the next write to the same target.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from .errors import OutputExistsError

Paths = Iterable["str | os.PathLike | None"]


def check_out(out: str | os.PathLike, force: bool, inputs: Paths = (), kind: str = "directory") -> None:
    """Fail before any work when `out` (a directory, or a file with kind="file") cannot or must not be written.

    `inputs` are the paths the command reads: `out` may not be, contain or be inside any of them."""
    out = Path(out)
    exists = os.path.lexists(out)
    if exists and not force:
        raise OutputExistsError(f"output {kind} {out} already exists; choose another path or pass --force")
    check_not_input(out, inputs)
    if exists and (out.is_symlink() or out.is_dir() != (kind == "directory")):
        what = "a symbolic link" if out.is_symlink() else "a directory" if out.is_dir() else "a file"
        raise OutputExistsError(f"output path {out} is {what}, not a {kind}; remove it or choose another path")
    check_writable(out, kind)


def check_not_input(out: str | os.PathLike, inputs: Paths) -> None:
    """`out` is not an input, does not contain one and is not inside one."""
    target = Path(out).resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if target == source:
            raise OutputExistsError(f"output {out} is the input {given}; write to another path")
        if source.is_relative_to(target):
            raise OutputExistsError(f"output {out} contains the input {given}; write to another path")
        if target.is_relative_to(source) and source.is_dir():
            raise OutputExistsError(f"output {out} is inside the input {given}; write to another path")


def check_writable(out: str | os.PathLike, kind: str = "directory") -> None:
    """The nearest existing ancestor of `out` is a directory in which we can create something."""
    out = Path(out)
    parent = out.absolute().parent
    while not parent.exists():
        if os.path.lexists(parent) or parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise OutputExistsError(f"cannot write {kind} {out}: {parent} is a file, not a directory; "
                                f"choose another path")
    try:
        Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent)).rmdir()
    except OSError as e:
        why = {errno.EROFS: f"{parent} is on a read-only filesystem", errno.EACCES: f"{parent} is not writable",
               errno.EPERM: f"{parent} is not writable", errno.ENOSPC: f"{parent} is on a full disk"}.get(
            e.errno, f"nothing can be created in {parent} ({e.strerror})")
        raise OutputExistsError(f"cannot write {kind} {out}: {why}; choose another path") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale(out: Path) -> list[Path]:
    """Remove the temporary siblings of `out` that dead processes left behind; return them.

    A stale `.NAME.old-PID` is removed only when `out` exists (without `out` it is the last good copy)."""
    removed = []
    for tmp in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = tmp.name[len(out.name) + 2:].rpartition("-")
        if kind not in ("tmp", "old", "probe") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not out.exists():
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, force: bool = False, inputs: Paths = ()):
    """Yield a temporary sibling of `out`; on success it replaces `out` in one rename.

    On any failure the temporary directory is removed and `out` is untouched."""
    out = Path(out)
    check_out(out, force, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(out: str | os.PathLike, force: bool = False, inputs: Paths = ()):
    """Yield a temporary sibling path of the file `out` (without its suffix: name the format when writing);
    on success it replaces `out` in one rename."""
    out = Path(out)
    check_out(out, force, inputs, kind="file")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
