"""A local server process owned by the project: pid file, log file, readiness, clean stop.

Each service lives under ``<state_dir>/<name>/`` with its config, data, ``pid`` and
``<name>.log``. Processes start in their own session so ``down`` can signal the whole
group (Triton's Python-backend stubs, for instance) and leave nothing behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from m3t.settings import Settings


class ServiceError(RuntimeError):
    """A service could not be started or checked; the message says what to do."""


@dataclass
class Health:
    name: str
    address: str
    healthy: bool
    pid: int | None
    detail: str = ""

    def as_dict(self) -> dict:
        return {
            "address": self.address,
            "healthy": self.healthy,
            "pid": self.pid,
            "detail": self.detail,
        }


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports that nothing listens on now (held together while picked)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def in_parallel(items, step: Callable) -> list:
    """``step(item)`` for every item at once (services, or a cluster's nodes, start and stop
    together); their results in order, or one ServiceError naming every failure."""
    with ThreadPoolExecutor(len(items)) as pool:
        futures = [pool.submit(step, item) for item in items]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise ServiceError("\n".join(str(e) for e in errors))
    return [f.result() for f in futures]


def wait_until(check: Callable[[], bool], timeout_s: float, interval_s: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval_s)
    return check()


class ManagedService(ABC):
    name: str
    start_timeout_s: float = 60.0

    def __init__(self, settings: Settings):
        self.settings = settings
        self.home = settings.state_dir / self.name
        self.pid_file = self.home / "pid"
        self.log_file = settings.logs_dir / f"{self.name}.log"

    # --- what each service defines -------------------------------------------------
    @property
    @abstractmethod
    def address(self) -> str: ...

    @abstractmethod
    def ports(self) -> list[tuple[str, int]]: ...

    @abstractmethod
    def prepare(self) -> tuple[list[str], dict[str, str]]:
        """Write config, check prerequisites; return the command line and extra env."""

    @abstractmethod
    def ready(self) -> tuple[bool, str]:
        """Whether the server answers its own protocol, and a short detail."""

    def after_start(self) -> None:  # noqa: B027 (an optional hook)
        """Work that needs the running server (topics, users...)."""

    # --- lifecycle ------------------------------------------------------------------
    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def pids(self) -> list[int]:
        """Its running process, as a list (a cluster's has one per node)."""
        return [pid] if (pid := self.pid()) else []

    def probe(self) -> tuple[bool, str]:
        try:
            return self.ready()
        except Exception as exc:  # any client error means "not healthy", with its reason
            return False, f"{type(exc).__name__}: {exc}"[:300]

    def health(self) -> Health:
        pid = self.pid()
        if pid is None:
            return Health(self.name, self.address, False, None, "not running")
        ok, detail = self.probe()
        return Health(self.name, self.address, ok, pid, detail)

    def up(self) -> Health:
        if self.pid() is not None:
            if wait_until(lambda: self.probe()[0], self.start_timeout_s, 0.5):
                return self.health()
            raise ServiceError(
                f"{self.name} is running (pid {self.pid()}) but not healthy; "
                f"see {self.log_file} or run `m3t services down` first"
            )
        for host, port in self.ports():
            if port_open(host, port):
                raise ServiceError(
                    f"{self.name}: port {host}:{port} is taken by another process; "
                    f"stop it or choose another port (see m3t/settings.py)"
                )
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        command, extra_env = self.prepare()
        env = {**os.environ, **extra_env}
        with open(self.log_file, "ab") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.home,
                env=env,
                start_new_session=True,
            )
        self.pid_file.write_text(str(process.pid))
        if not wait_until(
            lambda: process.poll() is None and self.probe()[0], self.start_timeout_s, 0.5
        ):
            code = process.poll()
            self.down()
            tail = self._log_tail()
            why = f"exited with code {code}" if code is not None else "did not become ready"
            raise ServiceError(
                f"{self.name} {why} within {self.start_timeout_s:.0f}s; "
                f"log {self.log_file}:\n{tail}"
            )
        self.after_start()
        return self.health()

    def down(self, timeout_s: float = 30.0) -> bool:
        """Stop the process group; True if something was running."""
        pid = self.pid()
        self.pid_file.unlink(missing_ok=True)
        if pid is None:
            return False
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            if wait_until(lambda: not self._group_alive(pid), wait, 0.1):
                break
        try:  # reap it if it is our child (tests start services in-process)
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return True

    def _group_alive(self, pgid: int) -> bool:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().split(")")[-1].split()
            except OSError:
                continue
            state, pgrp = fields[0], int(fields[2])
            if pgrp == pgid and state != "Z":
                return True
        return False

    def _log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class NodeGroup:
    """Nodes (``ManagedService``s) run as one service: a cluster. Subclasses set ``nodes``
    and start and check them their own way; they stop together."""

    nodes: list[ManagedService]

    def down(self) -> bool:
        return any(in_parallel(self.nodes, lambda node: node.down()))

    def pids(self) -> list[int]:
        return [pid for node in self.nodes for pid in node.pids()]
