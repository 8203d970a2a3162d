"""The admission control of a supervisor's workers, built from the settings before the fork."""
from __future__ import annotations

from collections.abc import Callable

from kgsupervisor.config import Settings
from kgsupervisor.kg.admission import AdmissionControl, BudgetLedger, budget_key, endpoint_key
from kgsupervisor.kg.budgets import WINDOW_S, Budget, RateBudgets
from kgsupervisor.kg.permits import SharedAdaptiveLimits
from kgsupervisor.store.postgres import is_postgres_url

# A spend is counted this much longer than the budget's minute: on a loaded host a burst of requests
# spent together reaches the service over up to ~2 s (measured: 1.85 s for a window's worth with 16
# workers on 2 cores), and a provider counts them when they arrive. Costs 60/62 of the budget.
SEND_MARGIN_S = 2.0
# Permit cells: one per worker process alive at once, new and retiring (a reload runs both).
MIN_PERMIT_CELLS = 64


def permit_cells(num_workers: int) -> int:
    """Cells enough for the worker processes of a pool that may grow by SIGTTIN and reload."""
    return max(MIN_PERMIT_CELLS, 4 * num_workers)


def admission_control(settings: Settings, cells: int, shared: bool = True,
                      keeper_init: Callable[[], None] | None = None) -> AdmissionControl | None:
    """Adaptive limits (KG_ADAPTIVE, under a supervisor: `shared`) and rate budgets (KG_RATE_LIMIT_RPM,
    KG_TOKEN_BUDGET_TPM) of every endpoint; None when neither applies. `keeper_init` starts the
    process that keeps a host's shared budgets."""
    endpoints = [endpoint_key(url) for url in settings.service_urls()]
    limits = None
    if settings.adaptive and shared:
        limits = SharedAdaptiveLimits(endpoints, settings.min_inflight,
                                      max(settings.num_workers, settings.min_inflight), cells)
    budgets = rate_budgets(settings, endpoints, shared, keeper_init)
    if limits is None and budgets is None:
        return None
    return AdmissionControl(endpoints, limits, budgets)


def rate_budgets(settings: Settings, endpoints: list[str], shared: bool,
                 keeper_init: Callable[[], None] | None = None) -> BudgetLedger | None:
    """The endpoints' budgets: in the database on PostgreSQL (every host's), else this host's."""
    budget = Budget(settings.rate_limit_rpm or None, settings.token_budget_tpm or None)
    if not budget.limits():
        return None
    each = {budget_key(endpoint): budget for endpoint in endpoints}
    if is_postgres_url(settings.db_path):
        from kgsupervisor.queue.hostbudgets import PostgresRateBudgets
        return PostgresRateBudgets(settings.db_path, each, chars_per_token=settings.chars_per_token,
                                   window_s=WINDOW_S + SEND_MARGIN_S)
    return RateBudgets(each, chars_per_token=settings.chars_per_token, window_s=WINDOW_S + SEND_MARGIN_S,
                       shared=shared, keeper_init=keeper_init)
