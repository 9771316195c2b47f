"""Output files of `plan` and `sweep`: which existing files they may replace."""

from __future__ import annotations

from pathlib import Path

from ..planner.planfile import PLAN_FILE_MARK
from ._common import CliError, claim_output

__all__ = ["check_output_file"]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _replaceable(path: Path, suffix: str) -> bool:
    """An existing output file we may replace: a plan file `hydraopt plan` wrote, a PNG."""
    try:
        with open(path, "rb") as f:
            head = f.read(200)
    except OSError:
        return False
    if suffix == ".png":
        return head.startswith(_PNG_MAGIC)
    return PLAN_FILE_MARK.encode() in head


def check_output_file(path: Path, flag: str, suffixes: tuple[str, ...]) -> None:
    """Refuse, before any work, an output file name with the wrong suffix, an existing file
    that is not of the kind written here (a plan file `hydraopt plan` wrote; any PNG image),
    or a location that cannot be written."""
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        raise CliError(flag, f"{path}: expected a {' or '.join(suffixes)} file name")
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise CliError(path, f"exists and is not a file; refusing to overwrite it ({flag})")
        if not _replaceable(path, suffix):
            what = "a PNG image" if suffix == ".png" else "a plan file written by hydraopt plan"
            raise CliError(path, f"exists and is not {what}; refusing to overwrite it ({flag})")
    claim_output(path)
