"""Getting a Ray runtime: a local one, or joining a cluster, failing fast and clearly.

``ray.init(address=...)`` towards an address where nothing answers waits for minutes, and
towards a token-auth cluster without the token it fails after about 20 s with a bare
``ConnectionError``. So an address is first probed: a TCP connect (nothing listening fails in
milliseconds), then a join from a throwaway process within ``run.ray_connect_timeout_s``,
whose log says why a join failed (``Unauthenticated`` means the token is missing or wrong).
Only then does this process join, before the run writes anything into its output.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from urllib.parse import urlparse

import ray

from schemas.config import ConfigError, RunConfig

_ENV = {"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}}

TOKEN_HINT = ("the cluster uses token authentication: set RAY_AUTH_MODE=token and the cluster's token "
              "(RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH, or the file ~/.ray/auth_token) where t2i runs")


class RayUnavailable(ConfigError):
    """The Ray cluster named by RAY_ADDRESS / run.ray_address cannot be joined."""


def cluster_address(run: RunConfig) -> str | None:
    """The cluster to join, or None for a local runtime."""
    address = run.ray_address or os.environ.get("RAY_ADDRESS")
    return None if not address or address == "local" else address


def ensure_ray(run: RunConfig, extra_cpus: float = 0.0) -> bool:
    """Join the configured cluster, else start a local runtime with ``run.workers`` CPUs for
    shard tasks plus what the model actor pools reserve. ``address="local"`` never attaches to
    a stale cluster file. Returns True when this call started a local runtime."""
    if ray.is_initialized():
        return False
    address = cluster_address(run)
    if address:
        probe(address, run.ray_connect_timeout_s)
        ray.init(address=address, runtime_env=_ENV, log_to_driver=False)
        return False
    ray.init(address="local", num_cpus=run.workers + math.ceil(extra_cpus), include_dashboard=False,
             runtime_env=_ENV, log_to_driver=False)
    return True


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of ``host:port`` or ``ray://host:port``; None for ``auto``."""
    if address == "auto":
        return None
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    if not parsed.hostname:
        raise RayUnavailable(f"RAY_ADDRESS {address!r} is not host:port")
    return parsed.hostname, parsed.port or (10001 if address.startswith("ray://") else 6379)


def probe(address: str, timeout_s: float) -> None:
    """Raise ``RayUnavailable`` with the reason unless a join to ``address`` works within ``timeout_s``."""
    where = f"the Ray cluster at {address} (RAY_ADDRESS / run.ray_address)"
    target = _host_port(address)
    if target is not None:
        try:
            socket.create_connection(target, timeout=min(timeout_s, 10.0)).close()
        except OSError as exc:
            raise RayUnavailable(f"nothing answers at {where}: {exc}; start the cluster, fix the address, "
                                 "or unset RAY_ADDRESS to run on a local Ray") from None
    code = "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); ray.shutdown()"
    try:
        joined = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True,
                                timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RayUnavailable(f"could not join {where} within {timeout_s:g} s (run.ray_connect_timeout_s)") from None
    if joined.returncode == 0:
        return
    log = joined.stderr + joined.stdout
    if "Unauthenticated" in log or "InvalidAuthToken" in log:
        raise RayUnavailable(f"could not join {where}: {TOKEN_HINT}")
    last = next((line for line in reversed(log.strip().splitlines()) if line.strip()), "no output")
    raise RayUnavailable(f"could not join {where}: {last.strip()}")
