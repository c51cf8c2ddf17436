"""`flask --app app ...` commands for operators and cron scripts."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import click
from flask import Flask, current_app
from flask.cli import AppGroup, with_appcontext

from utils import audit
from utils.model_monitoring import InsufficientData, ModelMonitor
from utils.model_versioning import ModelVersionManager
from utils.security import AuthManager

registry_cli = AppGroup("registry", help="Inspect, back up, restore and archive model versions.")


def _registry() -> ModelVersionManager:
    return current_app.extensions["quadra"].registry


def _fail(exc: Exception) -> None:
    raise click.ClickException(str(exc))


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
        try:
            result = registry.verify_version(name)
        except (LookupError, ValueError) as exc:
            _fail(exc)
        bad += not result["ok"]
        click.echo(f"{name}: {'ok' if result['ok'] else 'MISMATCH'}")
    if bad:
        raise click.ClickException(f"{bad} version(s) failed the integrity check")


@registry_cli.command("backup")
@click.argument("destination", type=click.Path(dir_okay=False, writable=True))
def backup_command(destination: str) -> None:
    """Write every version and the deployment state to a .tar.gz."""
    result = _registry().backup(destination)
    click.echo(f"backed up {result['versions']} version(s) to {result['path']}")


@registry_cli.command("restore")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
def restore_command(source: str) -> None:
    """Restore a backup, verifying every artifact's hash before anything is written."""
    try:
        result = _registry().restore(source)
    except (LookupError, ValueError, RuntimeError) as exc:
        _fail(exc)
    click.echo(f"restored {len(result['restored'])} version(s), {result['skipped']} already present")


@registry_cli.command("archive")
@click.argument("version")
def archive_command(version: str) -> None:
    """Compress an unused version's artifact (metadata and hash are kept)."""
    try:
        _registry().archive_version(version)
    except (LookupError, ValueError, RuntimeError) as exc:
        _fail(exc)
    click.echo(f"archived {version}")


@registry_cli.command("unarchive")
@click.argument("version")
def unarchive_command(version: str) -> None:
    """Restore an archived version's artifact, checked against its recorded hash."""
    try:
        _registry().restore_archived_version(version)
    except (LookupError, ValueError, RuntimeError) as exc:
        _fail(exc)
    click.echo(f"restored {version}")


@registry_cli.command("delete")
@click.argument("version")
def delete_command(version: str) -> None:
    """Delete a version (refused for the production and serving versions)."""
    try:
        _registry().delete_version(version)
    except (LookupError, ValueError, RuntimeError) as exc:
        _fail(exc)
    click.echo(f"deleted {version}")


keys_cli = AppGroup("keys", help="Create, list, revoke and rotate API keys.")


def _auth() -> AuthManager:
    return current_app.extensions["quadra"].auth


@keys_cli.command("create")
@click.option("--name", required=True, help="Who or what the key is for.")
@click.option("--permissions", default="read", show_default=True, help="Comma-separated: read, write, admin.")
@click.option("--expires-days", type=float, default=None, help="Lifetime in days (default QUADRA_KEY_EXPIRY_DAYS, 0 = never).")
@click.option("--rate-limit", default=None, help="This key's own limit (its tier), e.g. '1000 per minute'.")
def create_key_command(name: str, permissions: str, expires_days: float | None, rate_limit: str | None) -> None:
    """Create a key and print it (the only time it is shown)."""
    try:
        api_key, record = _auth().create_api_key(name, permissions.split(","), expires_days, rate_limit, created_by="cli")
    except ValueError as exc:
        _fail(exc)
    audit.record(_auth().store, "cli", "keys.create", "success", target=record["id"], details={"permissions": record["permissions"]})
    click.echo(f"created {record['id']} ({record['name']}, {','.join(record['permissions'])})", err=True)
    click.echo(api_key)


@keys_cli.command("list")
def list_keys_command() -> None:
    """List keys: id, name, permissions, state; only a prefix and the last four characters."""
    for key in _auth().list_api_keys():
        state = "active" if key["active"] else ("revoked" if key["revoked_at"] else "expired")
        expires = _when(key["expires_at"])
        click.echo(f"{key['id']}  {key['display']:<14} {key['name']:<24} {','.join(key['permissions']):<16} {state:<8} expires {expires}  last used {_when(key['last_used_at'])}")


@keys_cli.command("revoke")
@click.argument("key_id")
def revoke_key_command(key_id: str) -> None:
    """Revoke a key; every worker refuses it within QUADRA_AUTH_CACHE_SECONDS."""
    try:
        _auth().revoke_api_key(key_id)
    except LookupError as exc:
        _fail(exc)
    audit.record(_auth().store, "cli", "keys.revoke", "success", target=key_id)
    click.echo(f"revoked {key_id}")


@keys_cli.command("rotate")
@click.argument("key_id")
@click.option("--grace-hours", type=float, default=24.0, show_default=True, help="How long the old key keeps working.")
def rotate_key_command(key_id: str, grace_hours: float) -> None:
    """Issue a replacement key and print it; the old key dies after the grace period."""
    try:
        api_key, record = _auth().rotate_api_key(key_id, grace_hours * 3600)
    except (LookupError, ValueError) as exc:
        _fail(exc)
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
        click.echo(f"{_when(entry['at'])}  {entry['outcome']:<8} {entry['action']:<32} {entry['actor']:<40} {entry['target'] or '-':<20} {entry['ip'] or '-'}")


monitoring_cli = AppGroup("monitoring", help="Monitoring statistics, drift and the drift baseline.")
baseline_cli = AppGroup("baseline", help="Set, show or reset the drift baseline.")
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


@baseline_cli.command("set")
def baseline_set_command() -> None:
    """Make the current monitoring window the drift reference."""
    registry = current_app.extensions["quadra"].registry
    serving = registry.get_serving_version()
    names = registry.get_version_info(serving)["config"].get("feature_names") if serving else None
    try:
        baseline = _monitor().set_baseline(names, created_by="cli")
    except InsufficientData as exc:
        _fail(exc)
    click.echo(f"baseline {baseline['id']} set from {baseline['sample_count']} predictions")


@baseline_cli.command("show")
def baseline_show_command() -> None:
    """The current baseline's statistics, as JSON."""
    _echo_json(_monitor().baseline_metrics)


@baseline_cli.command("reset")
def baseline_reset_command() -> None:
    """Remove the baseline; drift is not evaluated until a new one is set."""
    click.echo(f"removed {_monitor().reset_baseline()} baseline(s)")


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def register_cli(app: Flask) -> None:
    app.cli.add_command(registry_cli)
    app.cli.add_command(keys_cli)
    app.cli.add_command(audit_command)
    app.cli.add_command(monitoring_cli)
