"""`flask --app app ...` commands for operators and cron scripts."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import click
from flask import Flask, current_app
from flask.cli import AppGroup, with_appcontext

from utils import audit, model_import, registry_archive, registry_backup
from utils.errors import QuadraError, TrainingInProgress, WrongMode
from utils.model_modes import ModelMode
from utils.model_monitoring import ModelMonitor
from utils.model_versioning import ModelVersionManager
from utils.rollout import rollout_view
from utils.schemas import CanaryRequest, ImportMetadata, VersionPath, validate
from utils.security import AuthManager
from utils.store import RolloutRow
from utils.training import Hyperparameters


class OperatorGroup(AppGroup):
    """A command group whose commands end on a `QuadraError` as the API would answer it: its
    message on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except QuadraError as exc:
            raise click.ClickException(exc.message) from None


registry_cli = OperatorGroup("registry", help="Inspect, back up, restore and archive model versions.")


def _registry() -> ModelVersionManager:
    return current_app.extensions["quadra"].registry


@registry_cli.command("list")
@click.option("--tag", "tags", multiple=True, help="Only versions carrying this tag (repeatable).")
def list_command(tags: tuple[str, ...]) -> None:
    """List versions, oldest first."""
    for info in _registry().list_versions(tags=tags or None):
        marks = "".join(m for m, on in (("P", info["is_production"]), ("S", info["is_serving"]), ("A", info["archived"])) if on)
        click.echo(f"{info['version']:<28} {marks:<3} {info['created_at']}  {info['sha256'][:12]}  {json.dumps(info['metrics'])}")


@registry_cli.command("verify")
@click.argument("versions", nargs=-1)
def verify_command(versions: tuple[str, ...]) -> None:
    """Recompute artifact hashes (all versions by default); exit 1 if any mismatches."""
    registry = _registry()
    names = versions or tuple(v["version"] for v in registry.list_versions())
    bad = 0
    for name in names:
        result = registry.verify_version(name)
        bad += not result["ok"]
        click.echo(f"{name}: {'ok' if result['ok'] else 'MISMATCH'}")
    if bad:
        raise click.ClickException(f"{bad} version(s) failed the integrity check")


@registry_cli.command("backup")
@click.argument("destination", type=click.Path(dir_okay=False, writable=True))
def backup_command(destination: str) -> None:
    """Write every version and the deployment state to a .tar.gz."""
    result = registry_backup.backup(_registry(), destination)
    click.echo(f"backed up {result['versions']} version(s) to {result['path']}")


@registry_cli.command("restore")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
def restore_command(source: str) -> None:
    """Restore a backup, verifying every artifact's hash before anything is written."""
    result = registry_backup.restore(_registry(), source)
    click.echo(f"restored {len(result['restored'])} version(s), {result['skipped']} already present")


@registry_cli.command("import")
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False))
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The model's config.json (its architecture, input_dim, num_classes, ...).")
@click.option("--version", help="The new version; default: a timestamp version.")
@click.option("--description", default="", help="What this version is.")
@click.option("--tags", default="", help="Comma-separated tags.")
@click.option("--metrics", "metrics_path", type=click.Path(exists=True, dir_okay=False),
              help="A JSON file of the version's metrics, e.g. {\"accuracy\": 0.97}.")
@click.option("--sha256", help="The artifact's expected SHA-256 (hex); the import fails if it differs.")
def import_command(artifact: str, config_path: str, version: str | None, description: str, tags: str,
                   metrics_path: str | None, sha256: str | None) -> None:
    """Add a safetensors model trained elsewhere as a new version (checked: it must load and run)."""
    metadata = validate(ImportMetadata, {  # the checks of POST /api/model/versions, before the upload is read
        "config": _json_file(config_path), "version": version, "description": description,
        "tags": [t.strip() for t in tags.split(",") if t.strip()], "sha256": sha256,
        "metrics": _json_file(metrics_path) if metrics_path else None})
    svc = current_app.extensions["quadra"]
    with open(artifact, "rb") as source:
        imported = model_import.import_version(
            svc.registry, source, metadata.config, max_bytes=svc.settings.max_artifact_bytes, version=metadata.version,
            description=metadata.description, tags=metadata.tags, metrics=metadata.metrics, sha256=metadata.sha256,
            filename=artifact, created_by="cli")
    audit.record(svc.store, "cli", "registry.import_version", "success", target=imported.version,
                 details={"sha256": imported.sha256})
    click.echo(f"imported {imported.version} (sha256 {imported.sha256})")


@registry_cli.command("export")
@click.argument("version")
@click.argument("folder", type=click.Path(file_okay=False))
def export_command(version: str, folder: str) -> None:
    """Write a version's verified artifact and config into FOLDER, as `import` takes them."""
    artifact, config = model_import.export_version(_registry(), version, Path(folder))
    click.echo(f"exported {version} to {artifact} and {config}")


def _json_file(path: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"{path} is not a readable JSON file: {exc}") from None


@registry_cli.command("archive")
@click.argument("version")
def archive_command(version: str) -> None:
    """Compress an unused version's artifact (metadata and hash are kept)."""
    registry_archive.archive(_registry(), version)
    click.echo(f"archived {version}")


@registry_cli.command("unarchive")
@click.argument("version")
def unarchive_command(version: str) -> None:
    """Restore an archived version's artifact, checked against its recorded hash."""
    registry_archive.restore_archived(_registry(), version)
    click.echo(f"restored {version}")


@registry_cli.command("delete")
@click.argument("version")
def delete_command(version: str) -> None:
    """Delete a version (refused for the production and serving versions)."""
    _registry().delete_version(version)
    click.echo(f"deleted {version}")


keys_cli = OperatorGroup("keys", help="Create, list, revoke and rotate API keys.")


def _auth() -> AuthManager:
    return current_app.extensions["quadra"].auth


@keys_cli.command("create")
@click.option("--name", required=True, help="Who or what the key is for.")
@click.option("--permissions", default="read", show_default=True, help="Comma-separated: read, write, admin.")
@click.option("--expires-days", type=float, default=None, help="Lifetime in days (default QUADRA_KEY_EXPIRY_DAYS, 0 = never).")
@click.option("--rate-limit", default=None, help="This key's own limit (its tier), e.g. '1000 per minute'.")
def create_key_command(name: str, permissions: str, expires_days: float | None, rate_limit: str | None) -> None:
    """Create a key and print it (the only time it is shown)."""
    api_key, record = _auth().create_api_key(name, permissions.split(","), expires_days, rate_limit, created_by="cli")
    audit.record(_auth().store, "cli", "keys.create", "success", target=record["id"], details={"permissions": record["permissions"]})
    click.echo(f"created {record['id']} ({record['name']}, {','.join(record['permissions'])})", err=True)
    click.echo(api_key)


@keys_cli.command("list")
def list_keys_command() -> None:
    """List keys: id, name, permissions, state; only a prefix and the last four characters."""
    for key in _auth().list_api_keys():
        state = "active" if key["active"] else ("revoked" if key["revoked_at"] else "expired")
        expires = _when(key["expires_at"])
        permissions = ",".join(key["permissions"])
        click.echo(f"{key['id']}  {key['display']:<14} {key['name']:<24} {permissions:<16} {state:<8} "
                   f"expires {expires}  last used {_when(key['last_used_at'])}")


@keys_cli.command("revoke")
@click.argument("key_id")
def revoke_key_command(key_id: str) -> None:
    """Revoke a key; every worker refuses it within QUADRA_AUTH_CACHE_SECONDS."""
    _auth().revoke_api_key(key_id)
    audit.record(_auth().store, "cli", "keys.revoke", "success", target=key_id)
    click.echo(f"revoked {key_id}")


@keys_cli.command("rotate")
@click.argument("key_id")
@click.option("--grace-hours", type=float, default=24.0, show_default=True, help="How long the old key keeps working.")
def rotate_key_command(key_id: str, grace_hours: float) -> None:
    """Issue a replacement key and print it; the old key dies after the grace period."""
    api_key, record = _auth().rotate_api_key(key_id, grace_hours * 3600)
    audit.record(_auth().store, "cli", "keys.rotate", "success", target=key_id, details={"new_key_id": record["id"]})
    click.echo(f"rotated {key_id} -> {record['id']}; the old key works for {grace_hours:g} more hour(s)", err=True)
    click.echo(api_key)


@click.command("audit")
@with_appcontext
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@click.option("--action", default=None, help="Only actions starting with this (e.g. auth., registry.).")
def audit_command(limit: int, action: str | None) -> None:
    """Show the newest audit records."""
    for entry in audit.recent(current_app.extensions["quadra"].store, limit, action):
        click.echo(f"{_when(entry['at'])}  {entry['outcome']:<8} {entry['action']:<32} {entry['actor']:<40} "
                   f"{entry['target'] or '-':<20} {entry['ip'] or '-'}")


monitoring_cli = OperatorGroup("monitoring", help="Monitoring statistics, drift, the drift baseline, labels and quality.")
baseline_cli = OperatorGroup("baseline", help="Set, show or reset the drift baseline.")
monitoring_cli.add_command(baseline_cli)


def _monitor() -> ModelMonitor:
    return current_app.extensions["quadra"].monitor


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


@monitoring_cli.command("stats")
def stats_command() -> None:
    """Totals and rolling-window statistics, as JSON."""
    _echo_json(_monitor().get_statistics())


@monitoring_cli.command("drift")
def drift_command() -> None:
    """The drift verdict against the baseline, as JSON; exit 1 when drift is detected."""
    result = _monitor().detect_drift()
    _echo_json(result)
    if result["drift_detected"]:
        raise SystemExit(1)


@monitoring_cli.command("feedback")
@click.argument("labels_file", type=click.File("r", encoding="utf-8"))
def feedback_command(labels_file: TextIO) -> None:
    """Back-fill true classes from a CSV file with the columns id and label (a class name, or
    an index when it is all digits), in requests of QUADRA_FEEDBACK_MAX_LABELS; prints the
    counts and every item not recorded; exit 1 when any was rejected."""
    monitor = _monitor()
    reader = csv.DictReader(labels_file)
    if reader.fieldnames is None or not {"id", "label"} <= set(reader.fieldnames):
        raise click.ClickException("the CSV file needs a header row with the columns id and label")
    totals = {"recorded": 0, "relabelled": 0, "rejected": 0}
    for first_line, batch in _csv_batches(reader, monitor.feedback.policy.max_labels):
        result = monitor.record_feedback(batch)
        for key in totals:
            totals[key] += result[key]
        for item in result["results"]:
            if item["status"] not in ("recorded", "relabelled"):
                click.echo(f"line {first_line + item['index']}: {item['id']}: {item['status']}: {item['message']}", err=True)
    audit.record(current_app.extensions["quadra"].store, "cli", "monitoring.feedback", "success",
                 target=labels_file.name, details=totals)
    click.echo(" ".join(f"{key}={value}" for key, value in totals.items()))
    if totals["rejected"]:
        raise SystemExit(1)


def _csv_batches(reader: csv.DictReader[str], size: int) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """(file line of the batch's first row, its items) per `size` rows; a label of digits is an index."""
    batch: list[dict[str, Any]] = []
    first_line = 2
    for row in reader:
        label = (row.get("label") or "").strip()
        batch.append({"id": (row.get("id") or "").strip(), "label": int(label) if label.isdigit() else label})
        if len(batch) == size:
            yield first_line, batch
            first_line, batch = first_line + size, []
    if batch:
        yield first_line, batch


@monitoring_cli.command("quality")
@click.option("--version", default=None, help="One version (default: every version with predictions in the window).")
@click.option("--window", type=click.Choice(["hour", "day", "monitoring", "horizon"]), default="day", show_default=True)
def quality_command(version: str | None, window: str) -> None:
    """Quality from labelled predictions, as JSON; exit 1 when production's accuracy is below
    the configured floor (QUADRA_QUALITY_MIN_ACCURACY / QUADRA_QUALITY_MAX_DROP)."""
    report = _monitor().quality(version, window)
    _echo_json(report)
    if report["check"]["below_floor"]:
        raise SystemExit(1)


@monitoring_cli.command("recount")
def recount_command() -> None:
    """Count the per-minute label coverage again from the stored predictions.

    Run it once every process runs this release, whenever a process of a release before
    schema 8 wrote to the store after its upgrade (the old workers of a reload until their
    last flush, the old master of a rolling restart, a host not yet upgraded, a rollback):
    such a process stores predictions and labels without counting them."""
    store = current_app.extensions["quadra"].store
    minutes = store.outcomes.recount()
    audit.record(store, "cli", "monitoring.recount", "success", details={"minutes": minutes})
    click.echo(f"counted {minutes} minute(s)")


@baseline_cli.command("set")
def baseline_set_command() -> None:
    """Make the current monitoring window the drift reference."""
    registry = current_app.extensions["quadra"].registry
    serving = registry.get_serving_version()
    names = registry.get_version_info(serving)["config"].get("feature_names") if serving else None
    baseline = _monitor().set_baseline(names, created_by="cli")
    click.echo(f"baseline {baseline['id']} set from {baseline['sample_count']} predictions")


@baseline_cli.command("show")
def baseline_show_command() -> None:
    """The current baseline's statistics, as JSON."""
    _echo_json(_monitor().baseline_metrics)


@baseline_cli.command("reset")
def baseline_reset_command() -> None:
    """Remove the baseline; drift is not evaluated until a new one is set."""
    click.echo(f"removed {_monitor().reset_baseline()} baseline(s)")


mode_cli = OperatorGroup("mode", help="Show or switch the deployment's mode.")


@mode_cli.command("show")
def mode_show_command() -> None:
    state = current_app.extensions["quadra"].modes.state()
    click.echo(f"{state['mode']} (by {state['changed_by']}: {state['reason'] or '-'})")


@mode_cli.command("set")
@click.argument("mode", type=click.Choice([m.value for m in ModelMode]))
@click.option("--reason", default="", help="Why; kept in the audit log and sent with the notification.")
def mode_set_command(mode: str, reason: str) -> None:
    """Switch every worker to MODE within a second (refused while a job trains, for inference)."""
    services = current_app.extensions["quadra"]
    if mode == ModelMode.INFERENCE.value and services.jobs.active():
        raise TrainingInProgress("a training job is running; cancel it first (flask --app app train cancel JOB)")
    state = services.modes.set_mode(mode, reason, changed_by="cli")
    audit.record(services.store, "cli", "modes.set_mode", "success", target=mode,
                 details={"reason": reason, "from": state["previous_mode"]})
    if state["previous_mode"] == mode:
        click.echo(f"already in {mode} mode")
        return
    services.alerts.notify("mode", f"mode {state['previous_mode']} -> {mode} by cli: {reason or 'no reason given'}",
                           {"from": state["previous_mode"], "to": mode, "reason": reason})
    click.echo(f"mode {state['previous_mode']} -> {mode}")


train_cli = OperatorGroup("train", help="Start, follow and cancel training jobs.")


@train_cli.command("start")
@click.option("--epochs", type=click.IntRange(1, 10_000), default=Hyperparameters.epochs, show_default=True)
@click.option("--learning-rate", type=click.FloatRange(1e-7, 10.0), default=Hyperparameters.learning_rate, show_default=True)
@click.option("--batch-size", type=click.IntRange(1, 100_000), default=Hyperparameters.batch_size, show_default=True)
@click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=Hyperparameters.seed, show_default=True)
@click.option("--wait/--no-wait", default=False, help="Follow the job until it ends.")
def train_start_command(epochs: int, learning_rate: float, batch_size: int, seed: int, wait: bool) -> None:
    """Train on the bundled dataset (needs TRAINING or MAINTENANCE mode); saves, never promotes."""
    services = current_app.extensions["quadra"]
    if not services.modes.allows_training():
        raise WrongMode(f"training is refused in {services.modes.mode.value} mode; switch to training or maintenance first")
    job = services.jobs.start(Hyperparameters(epochs, learning_rate, batch_size, seed), None, created_by="cli")
    audit.record(services.store, "cli", "training.start_training", "success", target=job["id"])
    click.echo(job["id"])
    while wait and job["status"] in ("queued", "running"):
        time.sleep(1)
        services.jobs.reap()
        job = services.jobs.get(job["id"])
        click.echo(f"{job['status']} epoch {job['epoch']}/{job['total_epochs']}", err=True)
    if wait:
        click.echo(f"{job['status']} {job['result_version'] or job['error'] or ''}".strip())
        if job["status"] != "succeeded":
            raise SystemExit(1)


@train_cli.command("status")
@click.argument("job_id")
def train_status_command(job_id: str) -> None:
    _echo_json(current_app.extensions["quadra"].jobs.get(job_id))


@train_cli.command("list")
def train_list_command() -> None:
    for job in current_app.extensions["quadra"].jobs.list():
        click.echo(f"{job['id']}  {job['status']:<10} {job['epoch']}/{job['total_epochs']}  {job['result_version'] or job['error'] or ''}")


@train_cli.command("cancel")
@click.argument("job_id")
def train_cancel_command(job_id: str) -> None:
    job = current_app.extensions["quadra"].jobs.cancel(job_id)
    click.echo(f"{job_id}: {job['status']}{' (stopping at the next epoch)' if job['cancel_requested'] else ''}")


rollout_cli = OperatorGroup("rollout", help="Start, follow, promote and abort a canary.")


@rollout_cli.command("start")
@click.argument("version")
@click.option("--mode", type=click.Choice(["canary", "shadow"]), default="canary", show_default=True,
              help="canary: the candidate answers its share; shadow: it runs beside production on a copy.")
@click.option("--percent", type=float, default=10.0, show_default=True,
              help="Share of predictions (1-50 for a canary, up to 100 for a shadow).")
@click.option("--min-predictions", type=int, default=1000, show_default=True,
              help="Predictions on the candidate before the service decides.")
@click.option("--criteria", "criteria_json", default="{}",
              help='JSON limits, e.g. \'{"max_latency_p95_ratio": 2.0, "max_confidence_drop": null}\'.')
@click.option("--on-success", type=click.Choice(["promote", "hold"]), default="promote", show_default=True)
@click.option("--on-failure", type=click.Choice(["abort", "hold"]), default="abort", show_default=True)
def rollout_start_command(version: str, mode: str, percent: float, min_predictions: int, criteria_json: str,
                          on_success: str, on_failure: str) -> None:
    """Send a share of predictions to VERSION (or shadow them); promote or abort by its numbers."""
    try:
        criteria = json.loads(criteria_json)
    except ValueError:
        raise click.BadParameter("not valid JSON", param_hint="--criteria") from None
    request = validate(CanaryRequest, {"mode": mode, "percent": percent, "min_predictions": min_predictions,
                                       "criteria": criteria,
                                       "on_success": on_success, "on_failure": on_failure})
    services = current_app.extensions["quadra"]
    row = services.rollouts.start(validate(VersionPath, {"version": version}).version, request, "cli")
    audit.record(services.store, "cli", "rollouts.start_canary", "success", target=version,
                 details=request.model_dump())
    share = "shadows" if mode == "shadow" else "serves"
    click.echo(f"{mode} {row.id}: {version} {share} {percent:g}% beside production {row.baseline_version}")


@rollout_cli.command("status")
def rollout_status_command() -> None:
    """The canary (active, else the last one) with both arms, as JSON; exit 1 if there is none."""
    rollouts = current_app.extensions["quadra"].rollouts
    current = rollouts.current()
    if current is None:
        click.echo("no canary has run", err=True)
        raise SystemExit(1)
    row, comparison = current
    _echo_json(rollout_view(row, comparison, rollouts.paused))


@rollout_cli.command("promote")
@click.option("--reason", default="", help="Why; kept with the rollout and sent with the notice.")
def rollout_promote_command(reason: str) -> None:
    """Promote the candidate now (through the normal promote path)."""
    row = _decide_rollout("promote", reason)
    click.echo(f"promoted {row.version}; it is production on every worker within a poll")


@rollout_cli.command("abort")
@click.option("--reason", default="", help="Why; kept with the rollout and sent with the notice.")
def rollout_abort_command(reason: str) -> None:
    """End the rollout; production serves every request again."""
    row = _decide_rollout("abort", reason)
    click.echo(f"aborted the {row.mode} of {row.version}; production {row.baseline_version} serves every request")


def _decide_rollout(decision: str, reason: str) -> RolloutRow:
    services = current_app.extensions["quadra"]
    decide = services.rollouts.promote if decision == "promote" else services.rollouts.abort
    row: RolloutRow = decide("cli", reason)
    audit.record(services.store, "cli", f"rollouts.{decision}_canary", "success", target=row.version,
                 details={"reason": reason})
    return row


def _when(timestamp: str | None) -> str:
    """An API timestamp (ISO 8601 UTC) to the second, or "never"."""
    if timestamp is None:
        return "never"
    return timestamp.partition(".")[0].removesuffix("Z") + "Z"


def register_cli(app: Flask) -> None:
    app.cli.add_command(registry_cli)
    app.cli.add_command(keys_cli)
    app.cli.add_command(audit_command)
    app.cli.add_command(monitoring_cli)
    app.cli.add_command(mode_cli)
    app.cli.add_command(train_cli)
    app.cli.add_command(rollout_cli)
