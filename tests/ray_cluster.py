"""A real Ray cluster on this machine for tests: a head and more nodes, each a ``ray start
--block`` process whose whole tree is ours, stopped by killing that tree (never ``ray stop``,
which would stop every Ray on the machine)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        return True
    except OSError:
        return False


@dataclass
class RayCluster:
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    nodes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_head(self, cpus: int) -> None:
        self._start(["--head", f"--port={self.port}", "--include-dashboard=false"], cpus)
        deadline = time.monotonic() + 90
        while not _answers(self.port):
            assert time.monotonic() < deadline and self.nodes[0].poll() is None, "the Ray head did not come up"
            time.sleep(0.5)

    def add_node(self, cpus: int) -> subprocess.Popen:
        before = self.alive_nodes()
        node = self._start([f"--address={self.address}"], cpus)
        deadline = time.monotonic() + 90
        while self.alive_nodes() <= before:
            assert time.monotonic() < deadline and node.poll() is None, "the second Ray node did not join"
            time.sleep(0.5)
        return node

    def _start(self, args: list[str], cpus: int) -> subprocess.Popen:
        proc = subprocess.Popen([RAY, "start", "--block", f"--num-cpus={cpus}", "--node-ip-address=127.0.0.1",
                                 "--disable-usage-stats", *args], env=self.env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        self.nodes.append(proc)
        return proc

    def alive_nodes(self) -> int:
        """Nodes the head counts alive (a throwaway driver asks it)."""
        code = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
                "print(sum(n['Alive'] for n in ray.nodes()))")
        out = subprocess.run([sys.executable, "-c", code, self.address], env=self.env, capture_output=True,
                             text=True, timeout=60)
        return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0

    @staticmethod
    def raylet(node: subprocess.Popen) -> psutil.Process:
        """The node's raylet; processes of its tree that exit while we look are passed over."""
        for proc in psutil.Process(node.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                if proc.name() == "raylet":
                    return proc
        raise LookupError(f"no raylet under the Ray node with pid {node.pid}")

    @staticmethod
    def lose(node: subprocess.Popen) -> None:
        """The node is lost as a machine is: every process of its tree (raylet, workers, the actors
        it holds) killed at once, none left to go on serving calls on its own."""
        with contextlib.suppress(psutil.Error):
            tree = [node.pid, *(c.pid for c in psutil.Process(node.pid).children(recursive=True))]
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        node.wait()

    def stop(self) -> None:
        for node in reversed(self.nodes):
            self.lose(node)
