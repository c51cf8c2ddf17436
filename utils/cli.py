"""`flask --app app ...` commands for operators and cron scripts."""

from __future__ import annotations

import json

import click
from flask import Flask, current_app
from flask.cli import AppGroup

from utils.model_versioning import ModelVersionManager

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


def register_cli(app: Flask) -> None:
    app.cli.add_command(registry_cli)
