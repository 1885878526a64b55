"""Output folders that never lose anything: everything is written into a temporary sibling folder that is renamed
into place at the end, so an interrupted run never leaves a half-written output (and never touches the source
model). No torch here: the recipe checks its output folder with these before anything heavy is imported."""

from __future__ import annotations

import errno
import glob
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import DiskFullError, OutputExistsError

METADATA_FILE = "hfcompress.json"


def check_output_folder(out_dir: str | os.PathLike, overwrite: bool, source: str | None = None) -> None:
    """Refuse an output folder that would destroy something: a file, the source model, the working or home folder,
    or a non-empty folder (only an earlier hfcompress output may be replaced, and only with overwrite)."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {str(out_dir)!r} exists and is a file")
    if source and os.path.exists(os.path.expanduser(source)):
        src = Path(source).expanduser().resolve()
        if out == src or out in src.parents or src in out.parents:
            raise OutputExistsError(f"output folder {str(out_dir)!r} would overlap the source model {source!r}; "
                                    "the source is never written to: pick another --out")
    if out in (Path.cwd(), Path.home(), *Path.cwd().parents):
        raise OutputExistsError(f"output folder {str(out_dir)!r} is the working or home folder (or above them); "
                                "pick a new folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"output folder {str(out_dir)!r} exists and is not empty; pick another --out "
                                    "or pass --overwrite")
        if not (out / METADATA_FILE).is_file():
            raise OutputExistsError(f"--overwrite only replaces an earlier hfcompress output, and {str(out_dir)!r} "
                                    f"has no {METADATA_FILE}; pick another --out")


def _staging_prefix(out: Path, kind: str = "") -> str:
    """The name start of this run's temporary folders beside `out`: the owner's pid is in the name itself, so a
    folder is never without one, even when the run is killed the moment after creating it."""
    return f".{out.name}.hfcompress-{os.getpid()}.{kind}"


def _remove_abandoned(out: Path) -> None:
    """Delete the temporary folders of `out` left by runs that were killed (their owner process is gone); a staging
    folder is never renamed into place by anyone but its own run."""
    ours = re.compile(rf"\.{re.escape(out.name)}\.hfcompress-(\d+)\.(old-)?[a-z0-9_]+")
    for candidate in out.parent.glob(f".{glob.escape(out.name)}.hfcompress-*"):
        match = ours.fullmatch(candidate.name)
        if not match:
            continue  # another output's folder, e.g. of an output named "<out>.hfcompress-1"
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(candidate, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            continue


@contextmanager
def staged_folder(out_dir: str | os.PathLike, overwrite: bool = False, source: str | None = None) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `out_dir`; on success it replaces `out_dir`, on failure it is deleted.
    Without `overwrite`, a folder that another run put in place meanwhile is not replaced: this run fails instead."""
    check_output_folder(out_dir, overwrite, source)
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out)
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(out), dir=out.parent))
    try:  # from the first moment: an interrupt while setting up must not leave the folder behind either
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes it owner-only; the output should get ordinary permissions
        yield staging
        for path in staging.rglob("*"):  # some writers (safetensors) create owner-only files
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        if overwrite and out.exists():
            retired = Path(tempfile.mkdtemp(prefix=_staging_prefix(out, "old-"), dir=out.parent))
            out.rename(retired / "old")
            staging.rename(out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            try:  # atomic: succeeds onto nothing or an empty folder, fails onto a folder another run filled
                staging.rename(out)
            except OSError:
                raise OutputExistsError(f"output folder {str(out_dir)!r} was written by another run meanwhile; "
                                        "this run's result was discarded: pick another --out") from None
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"the disk filled while writing {str(out_dir)!r}; nothing was kept (the partial "
                                "files were deleted): free some space or pick another --out") from None
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def ensure_space(folder: str | os.PathLike, needed_bytes: int) -> None:
    """Refuse to start writing when the disk cannot hold the output (with 5 % headroom)."""
    free = shutil.disk_usage(folder).free
    if free < needed_bytes * 1.05:
        raise DiskFullError(f"not enough disk space in {str(folder)!r}: the output needs about "
                            f"{needed_bytes / 1e9:.2f} GB, {free / 1e9:.2f} GB are free; free some space or pick "
                            "another --out")
