"""The model registry over HTTP: versions, save, load, promote, rollback, compare, delete."""

from __future__ import annotations

import base64

from flask import Blueprint, Response, g, stream_with_context
from werkzeug.datastructures import FileStorage

from routes.common import actor, services
from routes.operations import operation
from utils import model_import
from utils.model_versioning import compare_model_versions
from utils.openapi import Link
from utils.schemas import (
    CompareQuery,
    Comparison,
    Deleted,
    History,
    HistoryQuery,
    ImportMetadata,
    ProductionChange,
    SaveRequest,
    ServingChange,
    VersionInfo,
    VersionList,
    VersionPath,
    VersionQuery,
    VersionsQuery,
)
from utils.security import require_permission

bp = Blueprint("registry", __name__)
VERSION = {"version": "$response.body#/version"}
NOT_FOUND = {404: "No such version"}
INTEGRITY = {422: "The artifact's SHA-256 does not match the recorded one: the version is not served"}
UNAVAILABLE = {503: "The artifact store is unreachable (with Retry-After)"}
DEPLOYABLE = {**NOT_FOUND, **INTEGRITY, **UNAVAILABLE, 409: "The version is archived (restore it first)"}


@bp.get("/api/model/versions")
@require_permission("read")
@operation("List versions", query=VersionsQuery, response=VersionList)
def list_versions(query: VersionsQuery) -> VersionList:
    """Every version with its metrics, config, tags and SHA-256, and which one is production and serving."""
    registry = services().registry
    versions = registry.list_versions(tags=query.tag or None)
    return VersionList.model_validate({"versions": versions, "count": len(versions),
                                       "production_version": registry.get_production_version(),
                                       "serving_version": registry.get_serving_version()})


@bp.post("/api/model/versions")
@require_permission("write")
@operation("Import a model trained elsewhere", upload=ImportMetadata, response=VersionInfo, status=201,
           errors={409: "The version exists",
                   413: "The artifact is larger than QUADRA_MAX_ARTIFACT_BYTES",
                   422: "The artifact is no safetensors file (a pickle or TorchScript is refused), its weights do not "
                        "fit the config's architecture, its outputs are not finite, or its SHA-256 is not the one given",
                   503: "The artifact store is unreachable (with Retry-After)"},
           links={"GetVersion": Link("registry.get_version", VERSION),
                  "ExportVersion": Link("registry.export_artifact", VERSION),
                  "PromoteVersion": Link("registry.promote_version", VERSION)})
def import_version(body: ImportMetadata, artifact: FileStorage) -> VersionInfo:
    """Multipart: an `artifact` part (the weights as safetensors) and a JSON `metadata` part (the
    config naming a registered architecture, and optionally version, description, tags,
    metrics, sha256). The upload is hashed while it is staged, the model is built, the weights
    loaded strictly and one forward pass made before the version exists; any failure leaves
    nothing behind."""
    svc = services()
    imported = model_import.import_version(
        svc.registry, artifact.stream, body.config, max_bytes=svc.settings.max_artifact_bytes, version=body.version,
        description=body.description, tags=body.tags, metrics=body.metrics, sha256=body.sha256,
        filename=artifact.filename, created_by=actor())
    g.audit_details = {"version": imported.version, "sha256": imported.sha256}
    return VersionInfo.model_validate(svc.registry.get_version_info(imported.version))


@bp.get("/api/model/versions/<version>/artifact")
@require_permission("read")
@operation("Export a version's artifact", path=VersionPath, media_type="application/octet-stream",
           errors={**NOT_FOUND, **INTEGRITY, **UNAVAILABLE, 409: "The version is archived (restore it first)"})
def export_artifact(version: str) -> Response:
    """The verified safetensors file, with its SHA-256 in `Repr-Digest` (RFC 9530); the config
    is the version's `config` in `GET /api/model/versions/{version}`."""
    row, chunks = model_import.verified_artifact(services().registry, version)
    digest = base64.b64encode(bytes.fromhex(row.sha256)).decode()
    headers = {"Repr-Digest": f"sha-256=:{digest}:", "Content-Length": str(row.size_bytes),
               "Content-Disposition": f'attachment; filename="{version}.safetensors"'}
    return Response(stream_with_context(chunks), mimetype="application/octet-stream", headers=headers)


@bp.get("/api/model/versions/<version>")
@require_permission("read")
@operation("One version", path=VersionPath, query=VersionQuery, response=VersionInfo,
           errors={**NOT_FOUND, **UNAVAILABLE})
def get_version(version: str, query: VersionQuery) -> VersionInfo:
    """With `?verify=true` the artifact's hash is recomputed and reported under `integrity`."""
    registry = services().registry
    info = registry.get_version_info(version)
    if query.verify:
        info["integrity"] = registry.verify_version(version)
    return VersionInfo.model_validate(info)


@bp.delete("/api/model/versions/<version>")
@require_permission("admin")
@operation("Delete a version", path=VersionPath, response=Deleted,
           errors={**NOT_FOUND, **UNAVAILABLE, 409: "The version is production or serving"})
def delete_version(version: str) -> Deleted:
    services().registry.delete_version(version)
    return Deleted(deleted=version)


@bp.get("/api/model/history")
@require_permission("read")
@operation("Deployment history", query=HistoryQuery, response=History)
def promotion_history(query: HistoryQuery) -> History:
    """Who loaded, promoted or rolled back what, when, from and to; newest first."""
    return History.model_validate({"history": services().registry.promotion_history(query.limit)})


@bp.post("/api/model/save")
@require_permission("write")
@operation("Save the serving model as a new version", body=SaveRequest, response=VersionInfo, status=201,
           errors={409: "The version exists",
                   503: "The serving model is not loaded yet, or the artifact store is unreachable (with Retry-After)"},
           links={"GetVersion": Link("registry.get_version", VERSION), "LoadVersion": Link("registry.load_version", VERSION),
                  "PromoteVersion": Link("registry.promote_version", VERSION)})
def save_model(body: SaveRequest) -> VersionInfo:
    """Save the model this process serves as a new version (a snapshot with new metadata)."""
    svc = services()
    served = svc.model_server.require_current()
    source = svc.registry.get_version_info(served.version)
    saved = svc.registry.save_model(
        served.model,
        body.version,
        metrics=source["metrics"] if body.metrics is None else body.metrics,
        config=served.config,
        training_info={"source_version": served.version, **source["training_info"]},
        description=f"Saved from serving version {served.version}" if body.description is None else body.description,
        tags=body.tags,
        created_by=actor(),
    )
    return VersionInfo.model_validate(svc.registry.get_version_info(saved.version))


@bp.post("/api/model/load/<path:version>")
@require_permission("admin")
@operation("Serve a version", path=VersionPath, response=ServingChange, errors=DEPLOYABLE)
def load_version(version: str) -> ServingChange:
    """Serve `version` on every process without changing production (an active rollout ends first)."""
    svc = services()
    svc.rollouts.end_for_deployment("load", actor(), version)
    result = svc.registry.set_serving_version(version, actor=actor())
    svc.model_server.sync()
    return ServingChange.model_validate(result)


@bp.post("/api/model/promote/<path:version>")
@require_permission("admin")
@operation("Promote a version to production", path=VersionPath, response=ProductionChange,
           errors=DEPLOYABLE)
def promote_version(version: str) -> ProductionChange:
    """Verify the artifact, then make the version production and serving on every process (an
    active rollout ends first: as promoted when this promotes its candidate)."""
    svc = services()
    svc.rollouts.end_for_deployment("promote", actor(), version)
    result = svc.registry.promote_to_production(version, actor=actor())
    svc.model_server.sync()
    return ProductionChange.model_validate(result)


@bp.post("/api/model/rollback")
@require_permission("admin")
@operation("Roll production back", response=ProductionChange,
           errors={**INTEGRITY, **UNAVAILABLE, 409: "No earlier production version to return to"})
def rollback() -> ProductionChange:
    """Make the production version before the current one production again (an active rollout ends first)."""
    svc = services()
    svc.rollouts.end_for_deployment("rollback", actor())
    result = svc.registry.rollback(actor=actor())
    svc.model_server.sync()
    return ProductionChange.model_validate(result)


@bp.get("/api/model/compare")
@require_permission("read")
@operation("Compare two versions' metrics", query=CompareQuery, response=Comparison, errors=NOT_FOUND)
def compare(query: CompareQuery) -> Comparison:
    """`improvement` > 0 means `b` is better (lower is better for loss and error metrics)."""
    return Comparison.model_validate(compare_model_versions(services().registry, query.a, query.b))
