"""Settings at start and on SIGHUP: checked before any fork, built again as at start."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from kgsupervisor import config
from kgsupervisor.config import Settings, require_db
from kgsupervisor.errors import ConfigError
from kgsupervisor.store.backend import check_writable, describe

log = logging.getLogger("kgsupervisor.supervisor")

# Settings read once at start: a reload that changes them says they wait for a restart.
START_ONLY = ("status_addr", "pidfile", "log_format", "log_file",
              # The shared limits and budgets are made once, before the first fork.
              "adaptive", "min_inflight", "rate_limit_rpm", "token_budget_tpm", "chars_per_token")


def check_startable(settings: Settings) -> None:
    """Everything a worker needs, checked before any fork, at start and on reload alike:
    valid values, a database path, a readable token, a schema-checked writable database."""
    config.validate(settings)
    require_db(settings)
    settings.token()  # a token file gone or unreadable would make every new worker exit 3
    check_writable(settings.db_path)


def reloader(flags: Mapping[str, Any], config_file: str | None = None) -> Callable[[], Settings]:
    """Settings built again as at start: the same flags (or API keyword arguments) over the
    environment, over the config file read anew, over the defaults."""
    flags = dict(flags)
    return lambda: config.load(flags, os.environ, config_file)[0]


def reloaded_settings(running: Settings, reload_settings: Callable[[], Settings] | None) -> Settings:
    """The configuration read anew, checked as a start checks it (ConfigError, DatabaseError)."""
    if reload_settings is None:
        return running
    settings = reload_settings()
    check_startable(settings)
    if settings.db_path != running.db_path:
        # The supervisor's releases and counts stay on the database it started with.
        raise ConfigError("KG_DB_PATH", describe(settings.db_path),
                          f"the running database {describe(running.db_path)} (another one needs a restart)")
    return settings


def worker_count(running: Settings, reloaded: Settings, current: int) -> int:
    """The worker count after a reload: one set by SIGTTIN/SIGTTOU stays unless the
    configuration itself changed it."""
    if reloaded.num_workers != running.num_workers:
        return reloaded.num_workers
    if current != reloaded.num_workers:
        log.info("keeping %d worker(s) set by SIGTTIN/SIGTTOU (configured: %d)",
                 current, reloaded.num_workers)
    return current


def warn_start_only(running: Settings, reloaded: Settings) -> None:
    """Say which changed settings wait for the next start."""
    waiting = [name for name in START_ONLY if getattr(reloaded, name) != getattr(running, name)]
    if waiting:
        log.warning("reload: %s changed; taking effect at the next start", ", ".join(waiting))
    limited = running.adaptive or running.rate_limit_rpm or running.token_budget_tpm
    added = set(reloaded.service_urls()) - set(running.service_urls())
    if limited and added:
        log.warning("reload: %d new KG endpoint(s); until the next start they get no in-flight limit "
                    "and no rate budget (those are made at start)", len(added))
