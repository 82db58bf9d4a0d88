"""Where a run's files live: a local folder or a bucket (gs://, s3://), one API.

TFDS and orbax read and write `gs://` paths themselves; everything else that
touches a workdir, results folder or export goes through `etils.epath` via these
helpers, so a TPU pod's workdir can be a bucket every worker shares. Local paths
are made absolute (orbax wants them so); remote ones are left as given.
"""
from __future__ import annotations

import os

from etils import epath


def is_local(path) -> bool:
    """False for a URL-like path (gs://bucket/dir), True for a file system path."""
    return "://" not in os.fspath(path)


def path(p) -> epath.Path:
    """p as an epath.Path: absolute if local, as given if remote."""
    return epath.Path(os.path.abspath(p) if is_local(p) else os.fspath(p))


def append_text(p, text: str) -> None:
    """Appends text to the file p (creating it). Object stores have no append: there
    the file is read and written whole, fine for the small logs this is used for."""
    p = path(p)
    if is_local(p):
        with open(p, "a") as f:
            f.write(text)
    else:
        p.write_text((p.read_text() if p.exists() else "") + text)


def replace(src, dest) -> None:
    """Moves the file or folder src to dest (os.replace locally; the store's own
    move, a copy and delete, in a bucket)."""
    src, dest = path(src), path(dest)
    if is_local(src) and is_local(dest):
        os.replace(src, dest)
    else:
        src.rename(dest)
