"""A real Triton Inference Server serving ``model_repo/``.

On CPU hosts it is the ``tritonserver`` binary that ships inside nvidia-pytriton (Python
backend only). On GPU hosts run NVIDIA's Triton container instead (README: "GPU hosts")
and set ``M3T_TRITON__LAUNCHER=external``: ``up`` then only checks that it answers.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

from m3t.clients import triton_client
from m3t.services.process import Health, ManagedService, ServiceError
from m3t.settings import PROJECT_ROOT


def _pytriton_home() -> Path:
    try:
        import pytriton
    except ImportError as exc:
        raise ServiceError("nvidia-pytriton is not installed: run `make setup`") from exc
    return Path(pytriton.__file__).parent


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
        ]
        return command, env

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
            models = client.get_model_repository_index(as_json=True).get("models", [])
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
