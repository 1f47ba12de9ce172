"""Nothing waits forever: a PostgreSQL that stops answering mid-run (a black-holed host: the connection stays
open, nothing comes back) ends the run within its store deadline, with the exit code that says an order left."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from exec_helpers import write_config, write_snapshot

from rebalancer_cli.errors import ExecutionIncompleteError, ExitCode
from rebalancer_cli.executor import OrderOutcome
from rebalancer_cli.runtime import execute, migrate

pytestmark = pytest.mark.services


class BlackHole:
    """A TCP proxy to PostgreSQL that can stop passing bytes while keeping every connection open."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.dark = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                while self.dark.is_set():
                    time.sleep(0.05)  # swallowed: held, never answered
                dst.sendall(data)
        except OSError:
            return

    def close(self) -> None:
        self.server.close()
        for s in self.sockets:
            s.close()


@pytest.fixture()
def hole(database_url: str) -> Iterator[BlackHole]:
    proxy = BlackHole(("127.0.0.1", 5432))
    yield proxy
    proxy.close()


def test_a_postgres_that_stops_answering_mid_run_ends_it_within_the_deadline_with_exit_4(
    tmp_path: Path, unique_id: str, database_url: str, hole: BlackHole, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REBALANCE_STORE_TIMEOUT", "2")
    via_hole = database_url.replace("127.0.0.1:5432", f"127.0.0.1:{hole.port}")
    assert via_hole != database_url
    write_snapshot(tmp_path / "market.yaml")
    config = write_config(tmp_path, unique_id, {"id": "paper", "snapshot": "market.yaml"}, database_url=via_hole)
    migrate(config)

    def listener(o: OrderOutcome) -> None:
        if o.status == "filled":
            hole.dark.set()  # the first order filled; from now on the audit store answers nothing

    started = time.monotonic()
    with pytest.raises(ExecutionIncompleteError, match="after orders of this run had left") as info:
        execute(config, listener=listener)
    elapsed = time.monotonic() - started
    assert info.value.exit_code == ExitCode.INCOMPLETE  # not 3: an order did trade
    assert "filled" in str(info.value)
    assert elapsed < 30, elapsed  # bounded by the store deadline, not by the server ever answering
