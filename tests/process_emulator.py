"""Fixtures of the tests that kill or freeze `rebalance` processes: the Binance emulator in its own process
(module-scoped: it outlives the processes it serves), the emulator's credentials for the checks made in the
test's own process, and the PostgreSQL audit schema migrated once. Registered as a plugin in conftest."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from exec_helpers import CREDENTIALS_ENV, cli, remote_emulator, write_snapshot

from rebalancer_cli.testing.emulator import RemoteEmulator


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteEmulator]:
    with remote_emulator(write_snapshot(tmp_path_factory.mktemp("emulator") / "market.yaml")) as emulator:
        yield emulator


@pytest.fixture()
def emulator_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """The emulator's keys, named by the configs' credentials_env, for the checks made in this process."""
    for name, value in CREDENTIALS_ENV.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def migrated(database_url: str) -> str:
    result = cli("db", "migrate", "--database-url", database_url)
    assert result.returncode == 0, result.stderr
    return database_url
