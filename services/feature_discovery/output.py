"""Where the labels go: an NFD features.d file, replaced whole, or standard output.

The NFD worker reads every file in features.d whenever it looks: a file written in place could
be read half-written, and the node would lose the labels past the cut until the next pass. So
the labels are written to a temporary file in the same directory (a rename stays on one file
system) and renamed over the old one, as NVIDIA's (renameio). The temporary file's name starts
with a dot: the worker skips hidden files, so it never reads one as a feature file either.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

from common.files import replace_file

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
    replace_file(Path(path).absolute(), data, FILE_MODE)


def remove(path: str) -> None:
    """Takes the labels off the node (NVIDIA's GFD does at exit unless --oneshot): a missing file is fine."""
    if path:
        Path(path).unlink(missing_ok=True)
