"""The audit trail of score reads: one JSON line per read, in ``<logs>/audit.log``.

A line says who read (the token's name and role), where (the endpoint), which admissions,
the answer's status and when (UTC); never a score, a token or anything else about a patient.
The file is owner-only. Its logger is its own (not in the logging tree), so nothing of it
reaches the root logger's handlers.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path


class AuditLog:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Made owner-only before the handler opens it for appending.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        path.chmod(0o600)
        self._handler = logging.FileHandler(path, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._logger = logging.Logger("m3t.audit", logging.INFO)
        self._logger.propagate = False
        self._logger.addHandler(self._handler)

    def read(
        self, token: str, role: str, endpoint: str, admissions: Iterable[int], status: int
    ) -> None:
        """Record that ``token`` read ``admissions``' scores at ``endpoint``."""
        line = {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            "token": token,
            "role": role,
            "endpoint": endpoint,
            "admissions": [int(a) for a in admissions],
            "status": status,
        }
        self._logger.info(json.dumps(line))

    def close(self) -> None:
        self._handler.close()
