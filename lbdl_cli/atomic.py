"""Atomic directory writes: fill a temporary sibling, then rename it into place.

Torch-free, so that the tokenizer and `lbdl data prepare` use it without
paying torch's import time. A crash never leaves a half-written directory
under the final name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from .errors import OutputExistsError


def check_out(out: str | os.PathLike, force: bool) -> None:
    """Fail before any work when `out` exists and --force was not given."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"output directory {out} already exists; choose another path or pass --force")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {out} exists and is not a directory; remove it or choose another path")


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, force: bool = False):
    """Yield a temporary sibling of `out`; on success it replaces `out` in one rename.

    On any failure the temporary directory is removed and `out` is untouched.
    """
    out = Path(out)
    check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
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
