"""A real Triton Inference Server serving ``model_repo/``.

On CPU hosts it is the ``tritonserver`` binary that ships inside nvidia-pytriton (Python
backend only). On GPU hosts run NVIDIA's Triton container instead (README: "GPU hosts")
and set ``M3T_TRITON__LAUNCHER=external``: ``up`` then only checks that it answers.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import sysconfig
from pathlib import Path

from m3t.clients import TRITON_ADMIN_HEADER, triton_admin_headers, triton_client
from m3t.credentials import triton_admin_key
from m3t.services.process import Health, ManagedService, ServiceError
from m3t.settings import PROJECT_ROOT

# What Triton's option parser and a header value can carry (it splits the option at ':',
# ',' and '='), long enough not to be guessed.
_ADMIN_KEY = re.compile(r"[A-Za-z0-9_-]{16,}")


def _pytriton_home() -> Path:
    try:
        import pytriton
    except ImportError as exc:
        raise ServiceError("nvidia-pytriton is not installed: run `make setup`") from exc
    return Path(pytriton.__file__).parent


# The APIs only the project's publish step (and its checks) may call, behind the admin key:
# loading or unloading a model runs code from the repository, shared memory maps a region
# of the host into the server, trace and log settings choose files the server writes to.
RESTRICTED_APIS = ("model-repository", "shared-memory", "trace", "logging")


class TritonServer(ManagedService):
    name = "triton"
    start_timeout_s = 120.0

    @property
    def address(self) -> str:
        return self.settings.triton.grpc_url

    def ports(self):
        cfg = self.settings.triton
        return [(cfg.host, cfg.http_port), (cfg.host, cfg.grpc_port), (cfg.host, cfg.metrics_port)]

    def prepare(self):
        home = _pytriton_home()
        server = home / "tritonserver" / "bin" / "tritonserver"
        if not server.exists():
            raise ServiceError(f"no tritonserver binary in {home}; reinstall nvidia-pytriton")
        backends = self._backends(home)
        cfg = self.settings.triton
        libdir = sysconfig.get_config_var("LIBDIR")
        site = Path(sysconfig.get_paths()["purelib"])
        # The Python-backend stub must load *this* interpreter's libpython (PLATFORM.md),
        # and model.py files must import this venv's packages.
        env = {
            "LD_LIBRARY_PATH": os.pathsep.join(
                [libdir, str(site / "nvidia_pytriton.libs"), os.environ.get("LD_LIBRARY_PATH", "")]
            ),
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            "PYTHONPATH": os.pathsep.join([str(site), str(PROJECT_ROOT)]),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        }
        command = [
            str(server),
            f"--model-repository={self.settings.model_repo}",
            f"--backend-directory={backends}",
            f"--http-address={cfg.host}",
            f"--http-port={cfg.http_port}",
            f"--grpc-address={cfg.host}",
            f"--grpc-port={cfg.grpc_port}",
            f"--metrics-address={cfg.host}",
            f"--metrics-port={cfg.metrics_port}",
            # Models are (re)loaded by name after each publish; a repository with a model
            # that has no version yet must not stop the server.
            "--model-control-mode=explicit",
            "--load-model=*",
            "--exit-on-error=false",
            "--strict-readiness=false",
            "--log-verbose=0",
            *self._restricted(),
        ]
        return command, env

    def _restricted(self) -> list[str]:
        """The options that put ``RESTRICTED_APIS`` behind the admin key, on both protocols.

        Triton takes the key only on its command line (2.51 reads it from no file or
        environment variable), where another local user can read it while the server
        runs unless /proc is mounted with ``hidepid``.
        """
        key = triton_admin_key(self.settings)
        if not _ADMIN_KEY.fullmatch(key):
            raise ServiceError(
                "M3T_TRITON__ADMIN_KEY must be 16 or more letters, digits, '-' or '_'"
            )
        rule = f"{','.join(RESTRICTED_APIS)}:{TRITON_ADMIN_HEADER}={key}"
        return [f"--grpc-restricted-protocol={rule}", f"--http-restricted-api={rule}"]

    def _backends(self, home: Path) -> Path:
        """A backend directory with the stub for this Python version (PLATFORM.md)."""
        target = self.home / "backends"
        stub = (
            home
            / "tritonserver"
            / "python_backend_stubs"
            / (f"{sys.version_info.major}.{sys.version_info.minor}")
            / "triton_python_backend_stub"
        )
        if not stub.exists():
            raise ServiceError(
                f"nvidia-pytriton has no Python-backend stub for Python {sys.version}"
            )
        if not (target / "python" / "triton_python_backend_stub").exists():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(home / "tritonserver" / "backends", target)
            shutil.copy2(stub, target / "python" / "triton_python_backend_stub")
        return target

    def ready(self):
        client = triton_client(self.settings)
        try:
            if not client.is_server_ready(client_timeout=3):
                return False, "not ready"
            index = client.get_model_repository_index(
                headers=triton_admin_headers(self.settings), as_json=True
            )
            models = index.get("models", [])
            loaded = sorted(m["name"] for m in models if m.get("state") == "READY")
            return True, f"models ready: {', '.join(loaded) or 'none'}"
        finally:
            client.close()

    # An external server (GPU container) is not ours to start or stop.
    def up(self) -> Health:
        if self.settings.triton.launcher == "external":
            health = self.health()
            if not health.healthy:
                raise ServiceError(
                    f"external Triton at {self.address} is not ready: {health.detail}"
                )
            return health
        return super().up()

    def down(self, timeout_s: float = 30.0) -> bool:
        if self.settings.triton.launcher == "external":
            return False
        return super().down(timeout_s)

    def health(self) -> Health:
        if self.settings.triton.launcher != "external":
            return super().health()
        ok, detail = self.probe()
        return Health(self.name, self.address, ok, None, detail)
