"""The model registry over HTTP: versions, save, load, promote, rollback, compare, delete."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request

from routes.common import ApiError, actor, json_body, services
from utils.model_versioning import compare_model_versions
from utils.security import require_permission
from utils.serving import is_float32

bp = Blueprint("registry", __name__)

_SAVE_FIELDS = {"version", "description", "tags", "metrics"}


@bp.get("/api/model/versions")
@require_permission("read")
def list_versions() -> Any:
    registry = services().registry
    tags = request.args.getlist("tag")
    versions = registry.list_versions(tags=tags or None)
    return jsonify(
        {
            "versions": versions,
            "count": len(versions),
            "production_version": registry.get_production_version(),
            "serving_version": registry.get_serving_version(),
        }
    )


@bp.get("/api/model/versions/<path:version>")
@require_permission("read")
def get_version(version: str) -> Any:
    registry = services().registry
    info = registry.get_version_info(version)
    if request.args.get("verify", "").lower() in ("1", "true", "yes"):
        info["integrity"] = registry.verify_version(version)
    return jsonify(info)


@bp.delete("/api/model/versions/<path:version>")
@require_permission("admin")
def delete_version(version: str) -> Any:
    services().registry.delete_version(version)
    return jsonify({"deleted": version})


@bp.get("/api/model/history")
@require_permission("read")
def promotion_history() -> Any:
    limit = request.args.get("limit", "100")
    if not limit.isdigit() or not 1 <= int(limit) <= 1000:
        raise ApiError(400, "invalid_parameter", "limit must be an integer from 1 to 1000")
    return jsonify({"history": services().registry.promotion_history(int(limit))})


@bp.post("/api/model/save")
@require_permission("write")
def save_model() -> Any:
    """Save the model this process serves as a new version (a snapshot with new metadata)."""
    body = json_body(required=False)
    _check_save_body(body)
    svc = services()
    served = svc.model_server.require_current()
    source = svc.registry.get_version_info(served.version)
    info = svc.registry.save_model(
        served.model,
        body.get("version"),
        metrics=body.get("metrics", source["metrics"]),
        config=served.config,
        training_info={"source_version": served.version, **source["training_info"]},
        description=body.get("description", f"Saved from serving version {served.version}"),
        tags=body.get("tags", []),
        created_by=actor(),
    )
    return jsonify(info), 201


def _check_save_body(body: dict[str, Any]) -> None:
    unknown = set(body) - _SAVE_FIELDS
    if unknown:
        raise ApiError(400, "invalid_body", f"unknown field(s): {', '.join(sorted(unknown))}")
    if "version" in body and not isinstance(body["version"], str):
        raise ApiError(400, "invalid_body", "'version' must be a string")
    if "description" in body and (not isinstance(body["description"], str) or len(body["description"]) > 2000):
        raise ApiError(400, "invalid_body", "'description' must be a string of at most 2000 characters")
    tags = body.get("tags", [])
    if not isinstance(tags, list) or len(tags) > 32 or not all(isinstance(t, str) and 0 < len(t) <= 64 for t in tags):
        raise ApiError(400, "invalid_body", "'tags' must be a list of at most 32 strings of 1-64 characters")
    metrics = body.get("metrics", {})
    if not isinstance(metrics, dict) or len(metrics) > 64 or not all(
        isinstance(k, str) and is_float32(v) for k, v in metrics.items()
    ):
        raise ApiError(400, "invalid_body", "'metrics' must be an object of at most 64 finite numbers")


@bp.post("/api/model/load/<path:version>")
@require_permission("admin")
def load_version(version: str) -> Any:
    """Serve `version` on every process without changing production."""
    svc = services()
    result = svc.registry.set_serving_version(version, actor=actor())
    svc.model_server.sync()
    return jsonify(result)


@bp.post("/api/model/promote/<path:version>")
@require_permission("admin")
def promote_version(version: str) -> Any:
    svc = services()
    result = svc.registry.promote_to_production(version, actor=actor())
    svc.model_server.sync()
    return jsonify(result)


@bp.post("/api/model/rollback")
@require_permission("admin")
def rollback() -> Any:
    svc = services()
    result = svc.registry.rollback(actor=actor())
    svc.model_server.sync()
    return jsonify(result)


@bp.get("/api/model/compare")
@require_permission("read")
def compare() -> Any:
    a, b = request.args.get("a"), request.args.get("b")
    if not a or not b:
        raise ApiError(400, "invalid_parameter", "give the two versions as ?a=VERSION&b=VERSION")
    return jsonify(compare_model_versions(services().registry, a, b))
