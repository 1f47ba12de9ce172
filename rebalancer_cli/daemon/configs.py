"""Config watching: which files are portfolios, loading them, and taking in changes while the daemon runs."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ..config import Config, load_config
from ..errors import ConfigError, InputError
from ..telemetry import log, register_secret
from .cycle import _store_key
from .state import DaemonState, Slot

if TYPE_CHECKING:
    pass

logger = logging.getLogger("rebalance")
T = TypeVar("T")


CONFIG_SUFFIXES = (".yaml", ".yml")
# Config keys that name where the state lives: changing them under a held lease would split the state.
RESTART_KEYS = ("redis_url", "database_url", "state_dir")
# Config files checked for changes per reload call (one a second), at least; with more than RELOAD_SLICE *
# RELOAD_SWEEP portfolios each file is checked once every RELOAD_SWEEP calls.
RELOAD_SLICE = 1000
RELOAD_SWEEP = 5


def _daemon_config(path: Path) -> Config:
    """A config the daemon may trade on: valid, and on an exchange whose profile is proven for execution
    (anything else is refused like an invalid config, with its line, never attempted blind)."""
    from ..errors import Problem, UnprovenExchangeError
    from ..exchange.profiles import require_proven

    config = load_config(path)
    try:
        require_proven(config, "execute")
    except UnprovenExchangeError as exc:
        raise ConfigError([Problem(str(path), 0, 0, "exchange.id", str(exc))]) from None
    return config


def discover(paths: list[Path], known: set[Path] | frozenset[Path] = frozenset()) -> list[Path]:
    """Config files from files and directories (a directory contributes its *.yaml / *.yml, sorted).

    Files in `known` are configs already: they are not read again to tell them from snapshots."""
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            found += sorted(
                (
                    f
                    for f in p.iterdir()
                    if f.suffix in CONFIG_SUFFIXES and (f in known or (f.is_file() and not _is_snapshot(f)))
                ),
                key=str,  # comparing Path objects costs ten times more than their text, for the same order
            )
        else:
            found.append(p)
    if not found:
        raise InputError(f"no config files in {', '.join(map(str, paths))}")
    return found


def _is_snapshot(path: Path) -> bool:
    """Paper snapshots often sit next to the configs that name them; they are not configs."""
    try:
        head = path.read_text(errors="replace")[:4096]
    except OSError:
        return False
    keys = {line.split(":", 1)[0].strip() for line in head.splitlines() if line and not line[0].isspace()}
    return {"taken_at", "markets"} <= keys and "portfolio_id" not in keys


def _register_secrets(config: Config) -> None:
    """Credentials never reach a log line, even inside an exception message nobody scrubbed."""
    for env_name in config.exchange.credentials_env.values():
        value = os.environ.get(env_name)
        if value:
            register_secret(value)


def _problems(exc: ConfigError) -> list[str]:
    return [p.render() for p in exc.problems]


class ConfigWatching(DaemonState):
    """Loads the configs and reloads the ones that change (a changed file is used only if it validates)."""

    def _new_slot(self, path: Path, config: Config) -> Slot:
        _register_secrets(config)
        # rendezvous order: each instance prefers different portfolios, so racing claims rarely collide
        rank = hashlib.sha256(f"{self.instance_id}|{config.portfolio_id}".encode()).hexdigest()
        self.metrics.lock_failures.labels(config.portfolio_id)  # the series exists at 0 before any failure
        return Slot(path, config, path.stat().st_mtime, rank=rank, lease_key=_store_key("leases", config))

    def _load_all(self) -> None:
        problems: list[str] = []
        for path in discover(self.paths):
            try:
                config = _daemon_config(path)
            except ConfigError as exc:
                problems.append(str(exc))
                continue
            if config.portfolio_id in self.slots:
                other = self.slots[config.portfolio_id].path
                problems.append(f"{path}: portfolio_id {config.portfolio_id} is also used by {other}")
                continue
            self.slots[config.portfolio_id] = self._new_slot(path, config)
        if problems:
            raise InputError("\n".join(problems))

    def reload_changed(self) -> None:
        """A changed config replaces the old one only if it validates; an invalid change is logged, not used.

        New files in a config directory are added the same way; a portfolio whose file is gone is dropped
        once its cycle is over, and its lease handed back.
        """
        slots = list(self.slots.values())
        # thousands of files are checked a slice a call, so that each is still seen within a few seconds
        share = min(len(slots), max(RELOAD_SLICE, math.ceil(len(slots) / RELOAD_SWEEP)))
        start = self._reload_cursor % max(len(slots), 1)
        self._reload_cursor = start + share
        for slot in (slots[start:] + slots[:start])[:share]:
            try:
                mtime = os.stat(slot.path).st_mtime
            except OSError:
                self._drop(slot)
                continue
            if mtime != slot.mtime:
                slot.mtime = mtime
                self._reload(slot)
        if not self._listing_changed():
            return
        known = {s.path for s in self.slots.values()}
        try:
            paths = discover(self.paths, known)
        except InputError:
            return
        for path in paths:
            if path in known:
                continue
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue
            if self._rejected.get(path) == mtime:
                continue  # logged already; the next edit is read again
            try:
                config = _daemon_config(path)
            except ConfigError as exc:
                self._rejected[path] = mtime
                log(logger, logging.ERROR, "new config rejected", path=str(path), problems=_problems(exc))
                continue
            if config.portfolio_id in self.slots:
                self._rejected[path] = mtime
                log(
                    logger,
                    logging.ERROR,
                    "new config rejected: portfolio_id already used",
                    portfolio=config.portfolio_id,
                    path=str(path),
                    other=str(self.slots[config.portfolio_id].path),
                )
                continue
            self._rejected.pop(path, None)
            self.slots[config.portfolio_id] = self._new_slot(path, config)
            log(logger, logging.INFO, "config added", portfolio=config.portfolio_id, path=str(path))

    def _listing_changed(self) -> bool:
        """Whether the config directories must be listed again: a directory's mtime moves when a file is added,
        removed or renamed into it, and a rejected file may have been fixed in place. Listing thousands of files
        every second cost more than all the portfolios' cycles together at that scale.

        A change within the last seconds is listed again regardless: a file created in the same clock tick as
        the previous listing leaves the directory's mtime where that listing saw it."""
        marks: list[float | None] = []
        for path in [*self.paths, *self._rejected]:
            try:
                marks.append(os.stat(path).st_mtime)
            except OSError:
                marks.append(None)
        changed = marks != self._listing_marks or time.time() - max((m for m in marks if m), default=0.0) < 3.0
        self._listing_marks = marks
        return changed

    def _reload(self, slot: Slot) -> None:
        try:
            config = _daemon_config(slot.path)
        except ConfigError as exc:
            log(
                logger,
                logging.ERROR,
                "config change rejected; keeping the previous config",
                portfolio=slot.pid,
                path=str(slot.path),
                problems=_problems(exc),
            )
            return
        if config.portfolio_id != slot.pid:
            log(
                logger,
                logging.ERROR,
                "config change rejected: portfolio_id cannot change while running; keeping the previous config",
                portfolio=slot.pid,
                path=str(slot.path),
            )
            return
        moved = [k for k in RESTART_KEYS if getattr(config, k) != getattr(slot.config, k)]
        if moved:
            log(
                logger,
                logging.ERROR,
                "config change rejected: a store cannot change while running (restart the daemon); "
                "keeping the previous config",
                portfolio=slot.pid,
                path=str(slot.path),
                keys=moved,
            )
            return
        _register_secrets(config)
        slot.config = config
        log(logger, logging.INFO, "config reloaded", portfolio=slot.pid, path=str(slot.path))

    def _drop(self, slot: Slot) -> None:
        if slot.running is not None:
            return  # after its cycle: the next reload drops it
        self._let_go(slot, "config removed")
        self.slots.pop(slot.pid, None)
        log(logger, logging.INFO, "config removed", portfolio=slot.pid, path=str(slot.path))
