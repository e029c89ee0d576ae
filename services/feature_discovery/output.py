"""Where the labels go: an NFD features.d file, replaced whole, or standard output.

The NFD worker reads every file in features.d whenever it looks: a file written in place could
be read half-written, and the node would lose the labels past the cut until the next pass. So
the labels are written to a temporary file in the same directory (a rename stays on one file
system) and renamed over the old one, as NVIDIA's (renameio). The temporary file's name starts
with a dot: the worker skips hidden files, so it never reads one as a feature file either.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

FILE_MODE = 0o644  # NVIDIA's: the worker may run as another user


def render(labels: Mapping[str, str]) -> bytes:
    """NFD's feature file format: one `name=value` per line."""
    return "".join(f"{k}={v}\n" for k, v in labels.items()).encode()


def write(path: str, labels: Mapping[str, str]) -> None:
    """The labels to `path` ("" = standard output), atomically; OSError when they cannot be."""
    data = render(labels)
    if not path:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    target = Path(path).absolute()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), FILE_MODE)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove(path: str) -> None:
    """Takes the labels off the node (NVIDIA's GFD does at exit unless --oneshot): a missing file is fine."""
    if path:
        Path(path).unlink(missing_ok=True)
