"""A throw-away three-master Redis Cluster on free loopback ports, for tests that must prove cluster safety.

Import the fixture into a test module (`from redis_cluster_fixture import redis_cluster_url`). It starts
`redis-server` processes of its own (never touching 6379), each in its own temporary directory, waits until
every node reports `cluster_state:ok`, and stops them by process id at the end of the session. Modules that
import it share one cluster.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

NODES = 3
START_TIMEOUT = 30.0


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port(taken: set[int]) -> int:
    """A port whose cluster bus port (+10000) is free as well."""
    for _ in range(500):
        port = random.randrange(20000, 55000)
        if port not in taken and _port_free(port) and _port_free(port + 10000):
            return port
    raise RuntimeError("no free loopback port pair for a Redis Cluster node")


class _Cluster:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        self.users = 0

    def _start_node(self) -> None:
        for _attempt in range(5):
            port = _free_port(set(self.ports))
            d = self.base / f"node-{port}"
            d.mkdir()
            log = (d / "redis.log").open("wb")
            proc = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", str(d / "nodes.conf"), "--cluster-node-timeout", "5000",
                 "--dir", str(d), "--save", "", "--appendonly", "no", "--daemonize", "no"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            log.close()
            client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    client.ping()
                    self.procs.append(proc)
                    self.ports.append(port)
                    return
                except redis.ConnectionError:
                    time.sleep(0.05)
                finally:
                    client.close()
            self._stop(proc)  # lost a race for the port, or it hung: try another port
        raise RuntimeError(f"redis-server would not start in cluster mode; see logs under {self.base}")

    def start(self) -> None:
        for _ in range(NODES):
            self._start_node()
        addresses = [f"127.0.0.1:{p}" for p in self.ports]
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout}{created.stderr}")
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if all(self._node_ok(p) for p in self.ports):
                return
            time.sleep(0.1)
        raise RuntimeError("the test Redis Cluster did not reach cluster_state:ok")

    @staticmethod
    def _node_ok(port: int) -> bool:
        client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
        try:
            info = client.cluster("INFO")
        except redis.RedisError:
            return False
        finally:
            client.close()
        text = info if isinstance(info, str) else "\n".join(f"{k}:{v}" for k, v in dict(info).items())
        return "cluster_state:ok" in text and f"cluster_known_nodes:{NODES}" in text

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()  # by pid: SIGTERM to this very process
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def stop(self) -> None:
        for proc in self.procs:
            self._stop(proc)
        self.procs.clear()

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"


_cluster: _Cluster | None = None


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL (`redis+cluster://127.0.0.1:PORT`) of a fresh three-master cluster, shared by the session."""
    global _cluster
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        reason = "redis-server/redis-cli not on PATH: cannot start a test Redis Cluster"
        if os.environ.get("REBALANCE_REQUIRE_SERVICES") == "1":
            pytest.fail(f"REBALANCE_REQUIRE_SERVICES=1 but {reason}")
        pytest.skip(reason)
    if _cluster is None:
        cluster = _Cluster(tmp_path_factory.mktemp("redis-cluster"))
        try:
            cluster.start()
        except BaseException:
            cluster.stop()
            raise
        _cluster = cluster
    _cluster.users += 1
    try:
        yield _cluster.url
    finally:
        _cluster.users -= 1
        if _cluster.users == 0:
            _cluster.stop()
            _cluster = None
