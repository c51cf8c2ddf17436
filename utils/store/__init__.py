"""The shared, durable store: one `Database` and a small store per domain on it.

Nothing outside this package writes SQL. Each domain module owns its statements and
returns typed rows (frozen dataclasses), the way MLflow's registry store maps rows to
entities: `store.versions.get("v1").sha256`, `store.keys.find(hash)`, `store.jobs.list()`.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from utils.store.alerts import AlertEpisode, AlertRow, AlertStore
from utils.store.counters import CounterStore
from utils.store.database import Database, StoreConflict
from utils.store.drift_records import BaselineRow, BaselineStore, DriftCheck, DriftCheckStore, DriftHistoryEntry
from utils.store.jobs import JobRow, JobStore
from utils.store.keys import ApiKeyRow, AuditRow, AuditStore, KeyStore
from utils.store.outcomes import Coverage, OutcomeStore, StoredOutcome
from utils.store.predictions import PredictionRecord, PredictionRow, PredictionStore, PredictionTotals, VersionSummary
from utils.store.rollouts import RolloutRow, RolloutStore
from utils.store.rollups import RollupRow, RollupStore
from utils.store.service_state import LeaseStore, ModeRecord, ModeStore
from utils.store.shadow_tallies import ShadowTally, ShadowTallyStore
from utils.store.tables import SCHEMA_VERSION
from utils.store.versions import Deployment, PromotionRow, VersionRow, VersionStore

if TYPE_CHECKING:
    from utils.config import Settings

__all__ = [
    "SCHEMA_VERSION", "AlertEpisode", "AlertRow", "ApiKeyRow", "AuditRow", "BaselineRow", "Coverage", "Database", "Deployment",
    "DriftCheck", "StoredOutcome",
    "DriftHistoryEntry", "JobRow", "ModeRecord", "PredictionRecord", "PredictionRow", "PredictionTotals", "PromotionRow",
    "RolloutRow", "RollupRow", "ShadowTally", "Store", "StoreConflict", "UsesConfiguredStore", "VersionRow",
    "VersionSummary", "folder_store", "get_store", "store_for",
]


class Store:
    """A database and its domain stores."""

    def __init__(self, url: str, wait_seconds: float = 0.0) -> None:
        self.database = Database(url, wait_seconds)
        self.versions = VersionStore(self.database)
        self.keys = KeyStore(self.database)
        self.audit = AuditStore(self.database)
        self.counters = CounterStore(self.database)
        self.predictions = PredictionStore(self.database)
        self.rollups = RollupStore(self.database)
        self.baselines = BaselineStore(self.database)
        self.drift_checks = DriftCheckStore(self.database)
        self.alerts = AlertStore(self.database)
        self.jobs = JobStore(self.database)
        self.modes = ModeStore(self.database)
        self.leases = LeaseStore(self.database)
        self.rollouts = RolloutStore(self.database)
        self.shadow_tallies = ShadowTallyStore(self.database)
        self.outcomes = OutcomeStore(self.database)


_stores: dict[str, Store] = {}
_stores_lock = threading.Lock()


class UsesConfiguredStore:
    """For the seed API's classes, which may be built without a store: the store of the
    QUADRA_* configuration, opened on first use."""

    _store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            from utils.config import current_settings

            self._store = store_for(current_settings())
        return self._store


def store_for(settings: Settings) -> Store:
    """The process-wide Store of a configuration."""
    return get_store(settings.database_url, settings.store_wait_seconds)


FOLDER_DATABASE = "quadra.db"


def folder_store(folder: str | Path) -> Store:
    """The self-contained store of a folder that is not the service's (the seed API's folder
    rule): an SQLite file inside it."""
    return get_store(f"sqlite:///{Path(folder).resolve() / FOLDER_DATABASE}")


def get_store(url: str, wait_seconds: float = 0.0) -> Store:
    """The process-wide Store for `url` (one engine and pool per database per process)."""
    with _stores_lock:
        store = _stores.get(url)
        if store is None:
            store = _stores[url] = Store(url, wait_seconds)
        return store
