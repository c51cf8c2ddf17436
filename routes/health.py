"""Liveness."""

from __future__ import annotations

import time

from flask import Blueprint

from routes.common import services
from routes.operations import operation
from utils.schemas import Health, Readiness
from utils.timestamps import iso_utc

bp = Blueprint("health", __name__)
_STARTED = time.time()


@bp.get("/api/health")
@operation("Liveness", response=Health)
def health() -> Health:
    """Liveness: cheap, no store access, 200 while the process runs."""
    served = services().model_server.current
    return Health(status="healthy", model_loaded=served is not None, model_version=served.version if served else None,
                  uptime_seconds=round(time.time() - _STARTED, 3), timestamp=iso_utc(time.time()))


@bp.get("/api/health/detailed")
@operation("Readiness", response=Readiness,
           errors={503: ("Not ready: `reasons` says why (with Retry-After)", Readiness)})
def readiness() -> Readiness | tuple[Readiness, int, dict[str, str]]:
    """Readiness: 200 when this process can serve correctly, else 503 with the reasons."""
    report = Readiness.model_validate(services().readiness.report())
    return report if report.ready else (report, 503, {"Retry-After": "5"})
