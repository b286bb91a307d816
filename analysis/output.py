"""Where `--out` may be, and how a report gets there: whole or not at all.

Every file is written atomically (kdexp.records.atomic_write_bytes: a temp file beside it, then a
rename), into a hidden folder beside `--out`; once the whole report is there it replaces `--out`
in one rename. A full disk, Ctrl-C or a crash leaves `--out` as it was (an earlier report, or
nothing), never a half report or a 0-byte figure. A report carries a manifest of the files it
wrote: only a folder whose every file is in its manifest is replaced, so nothing analysis did not
write is ever deleted.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from kdexp import records

from .collect import run_dir_kind

MANIFEST = ".analysis-report.json"


class Refused(Exception):
    """`--out` names a folder analysis must not write into (the message says why and what to do)."""


def check_out(out: Path) -> None:
    """Raises Refused where `out` is (or is inside) a run dir, is a file, or is a non-empty folder
    other than an earlier report of analysis holding only what that report wrote."""
    out = Path(out).resolve()
    for folder in (out, *out.parents):
        if kind := run_dir_kind(folder):
            what = "canary dir" if kind == "canary" else "run dir"
            where = f"is a {what}" if folder == out else f"is inside the {what} {folder}"
            raise Refused(f"{where}: a report there would mix with its files; choose a folder outside "
                          "every run dir")
    if out.exists() and not out.is_dir():
        raise Refused("exists and is not a folder; choose a new or empty folder")
    found = _entries(out) if out.is_dir() else set()
    if not found:
        return
    written = _manifest(out)
    if written is None:
        raise Refused(f"holds {len(found)} file(s) and no earlier report of analysis (no {MANIFEST}), and "
                      "analysis replaces only its own reports; choose a new or empty folder")
    extra = sorted(found - written - {MANIFEST})
    if extra:
        raise Refused(f"holds {len(extra)} file(s) its earlier report did not write ({', '.join(extra[:3])}"
                      f"{', ...' if len(extra) > 3 else ''}), and analysis replaces the report whole; "
                      "move them out or choose another folder")


def unwritable(out: Path) -> str | None:
    """Why the report cannot be made beside `out` (its hidden staging folder, then the rename), or None."""
    return records.unwritable(Path(out).resolve().parent)


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A new folder to write the report into, which replaces `out` whole once the block succeeds;
    on any error or Ctrl-C it is removed and `out` is left as it was. An OSError names its file by
    its place in `out`."""
    target = Path(out).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Hidden, so that `python -m analysis` of the folder holding it never reads it as a run.
    staging = target.with_name(f".{target.name}.analysis-{uuid.uuid4().hex[:12]}")
    staging.mkdir()
    try:
        try:
            yield staging
        except OSError as err:
            name = Path(err.filename) if err.filename else None
            if name is not None and name.is_relative_to(staging):
                name = Path(out) / name.relative_to(staging)
            raise OSError(err.errno, err.strerror or str(err), None if name is None else str(name)) from err
        records.atomic_write_json(staging / MANIFEST, {"written_by": "python -m analysis",
                                                       "files": sorted(_entries(staging))})
        check_out(target)  # again: nothing analysis did not write has appeared there meanwhile
        _swap(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone after the swap; a partial report otherwise


def write_bytes(path: Path, data: bytes) -> None:
    """records.atomic_write_bytes, naming `path` in its error (a failed write() names no file)."""
    try:
        records.atomic_write_bytes(path, data)
    except OSError as err:
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def _swap(staging: Path, out: Path) -> None:
    """`staging` becomes `out`; an earlier report there is moved aside first, then deleted."""
    if not out.exists():
        os.rename(staging, out)
        return
    old = staging.with_name(f"{staging.name}-old")
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _entries(folder: Path) -> set[str]:
    """Every file and link under `folder`, relative, as a manifest names them."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(folder):
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        found.update(Path(dirpath, name).relative_to(folder).as_posix() for name in filenames + links)
    return found


def _manifest(folder: Path) -> set[str] | None:
    """The files an earlier report in `folder` wrote, or None where it has no readable manifest."""
    try:
        files = json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    return set(files) if isinstance(files, list) and all(isinstance(f, str) for f in files) else None
