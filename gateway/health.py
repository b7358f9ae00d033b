"""Readiness checks for `/readyz`: is this gateway able to take and process work now?

Each check returns a `Check` naming itself and, when it fails, what is wrong. The
database and the spool are checked by every process that serves the dashboard; the
model and the scheduler only by `radgate serve`, which runs them (`radgate web` alone
reports them as not run here).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from db.models import Study
from gateway.spool import TEMP_PREFIX

_MEBIBYTE = 1024 * 1024


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def check_database(sessions: sessionmaker[Session]) -> Check:
    """The database answers a query on the studies table (schema present, file readable)."""
    try:
        with sessions() as session:
            count = session.scalar(select(func.count()).select_from(Study))
    except SQLAlchemyError as error:
        problem = str(getattr(error, "orig", None) or error).splitlines()[0]
        return Check("database", False, f"database unreachable: {problem}")
    return Check("database", True, f"reachable, {count} studies")


def check_spool(spool_dir: Path, min_free_mb: int) -> Check:
    """The spool folder takes a new file and has more free space than the watermark."""
    if not spool_dir.is_dir():
        return Check("spool", False, f"spool {spool_dir} is not a folder (missing, or a file)")
    try:
        descriptor, probe = tempfile.mkstemp(prefix=TEMP_PREFIX + "readyz-", dir=spool_dir)
    except OSError as error:
        return Check("spool", False, f"spool {spool_dir} is not writable: {error}")
    try:
        os.write(descriptor, b"radgate")
    except OSError as error:
        return Check("spool", False, f"spool {spool_dir} is not writable: {error}")
    finally:
        os.close(descriptor)
        Path(probe).unlink(missing_ok=True)
    stats = os.statvfs(spool_dir)
    free_mb = stats.f_bavail * stats.f_frsize / _MEBIBYTE
    if free_mb < min_free_mb:
        return Check(
            "spool",
            False,
            f"spool {spool_dir} has {free_mb:.0f} MB free, below the watermark"
            f" storage.min_free_mb = {min_free_mb}",
        )
    return Check("spool", True, f"writable, {free_mb:.0f} MB free")


def check_flag(name: str, ok: Callable[[], bool], good: str, bad: str) -> Check:
    return Check(name, True, good) if ok() else Check(name, False, bad)


def summary(checks: Sequence[Check]) -> tuple[bool, str]:
    """Whether all checks passed, and one line per check."""
    ready = all(check.ok for check in checks)
    lines = [f"{check.name}: {'ok' if check.ok else 'FAILED'}: {check.detail}" for check in checks]
    return ready, "\n".join([("ready" if ready else "not ready"), *lines]) + "\n"
