"""Settings: defaults, parsing, clear one-line errors, production safety, the secret file."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from utils.config import ConfigError, Settings, resolve_secret_key

STRONG_KEY = "k3Y-9vQ2xL7pR4tZ8wB1nM6cF0hJ5sD2aE9gU4iO"


def test_defaults_are_the_embedded_setup(tmp_path: Path) -> None:
    settings = Settings.from_env({"QUADRA_STATE_DIR": str(tmp_path)})
    assert settings.env == "development"
    assert settings.auth_enabled and settings.rate_limit_enabled and settings.verify_integrity
    assert settings.database_url == f"sqlite:///{tmp_path / 'quadra.db'}"
    assert settings.models_dir == tmp_path / "models"
    assert settings.monitoring_dir == tmp_path / "monitoring"
    assert (settings.host, settings.port) == ("127.0.0.1", 5000)
    assert (settings.max_requests, settings.rate_window, settings.drift_threshold) == (100, 60, 2.0)


def test_values_are_typed() -> None:
    settings = Settings.from_env(
        {
            "QUADRA_PORT": "8080",
            "QUADRA_AUTH_ENABLED": "no",
            "QUADRA_DRIFT_THRESHOLD": "3.5",
            "QUADRA_CORS_ORIGINS": "https://a.example, http://localhost:3000/",
            "QUADRA_DATABASE_URL": "postgresql+psycopg://u@h/db",
            "QUADRA_REDIS_URL": "redis://127.0.0.1:6379/0",
            "QUADRA_ARTIFACT_URI": "s3://bucket/prefix",
            "QUADRA_ARCHITECTURE_MODULES": "my_models.cnn, other",
            "QUADRA_BATCH_MAX_SIZE": "32",
            "QUADRA_BATCH_MAX_DELAY_MS": "2.5",
        }
    )
    assert settings.batch_max_rows == 32 and settings.batch_max_delay_ms == 2.5
    assert settings.port == 8080 and settings.auth_enabled is False and settings.drift_threshold == 3.5
    assert settings.cors_origins == ("https://a.example", "http://localhost:3000")
    assert settings.architecture_modules == ("my_models.cnn", "other")
    assert settings.redis_url == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    "name, value",
    [
        ("QUADRA_PORT", "abc"),
        ("QUADRA_PORT", "70000"),
        ("QUADRA_ENV", "staging"),
        ("QUADRA_AUTH_ENABLED", "maybe"),
        ("QUADRA_DRIFT_THRESHOLD", "high"),
        ("QUADRA_MAX_REQUESTS", "0"),
        ("QUADRA_DATABASE_URL", "mysql://x"),
        ("QUADRA_REDIS_URL", "http://x"),
        ("QUADRA_ARTIFACT_URI", "ftp://x"),
        ("QUADRA_CORS_ORIGINS", "example.com"),
        ("QUADRA_ARCHITECTURE_MODULES", "bad-name"),
        ("QUADRA_LOG_LEVEL", "loud"),
        ("QUADRA_ALERT_WEBHOOK", "hooks.example.com/x"),
        ("QUADRA_FEATURE_SAMPLE_RATE", "1.5"),
        ("QUADRA_AUTH_FAILURE_LIMIT", "lots"),
        ("QUADRA_REDIS_PREFIX", "a b"),
        ("QUADRA_TRUSTED_PROXIES", "-1"),
        ("QUADRA_MAX_TRAINING_JOBS", "0"),
        ("QUADRA_RATE_LIMIT_SYNC_SECONDS", "-0.1"),
        ("QUADRA_RATE_LIMIT_SYNC_SECONDS", "soon"),
        ("QUADRA_BATCH_MAX_SIZE", "0"),
        ("QUADRA_BATCH_MAX_SIZE", "many"),
        ("QUADRA_BATCH_MAX_DELAY_MS", "-1"),
        ("QUADRA_BATCH_MAX_DELAY_MS", "5000"),
    ],
)
def test_bad_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({name: value})
    message = str(err.value)
    assert message.startswith(f"{name}:") and "expected" in message and "\n" not in message


def test_jwt_lifetimes() -> None:
    assert Settings.from_env({}).jwt_max_ttl_seconds == 86_400
    assert Settings.from_env({"QUADRA_JWT_TTL_SECONDS": str(7 * 86_400)}).jwt_max_ttl_seconds == 7 * 86_400
    with pytest.raises(ConfigError, match="^QUADRA_JWT_TTL_SECONDS: must not exceed QUADRA_JWT_MAX_TTL_SECONDS"):
        Settings.from_env({"QUADRA_JWT_TTL_SECONDS": "7200", "QUADRA_JWT_MAX_TTL_SECONDS": "3600"})


def test_dotenv_file_is_read_and_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("QUADRA_PORT=6001\nQUADRA_DRIFT_THRESHOLD=4\n")
    for key in list(os.environ):
        if key.startswith("QUADRA_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("QUADRA_PORT", "6002")
    settings = Settings.from_env(dotenv_path=dotenv)
    assert settings.port == 6002 and settings.drift_threshold == 4.0


@pytest.mark.parametrize(
    "overrides, variable",
    [
        ({}, "QUADRA_SECRET_KEY"),
        ({"QUADRA_SECRET_KEY": "short"}, "QUADRA_SECRET_KEY"),
        ({"QUADRA_SECRET_KEY": "a" * 40}, "QUADRA_SECRET_KEY"),
        ({"QUADRA_SECRET_KEY": STRONG_KEY, "QUADRA_DEBUG": "true"}, "QUADRA_DEBUG"),
        ({"QUADRA_SECRET_KEY": STRONG_KEY, "QUADRA_AUTH_ENABLED": "false"}, "QUADRA_AUTH_ENABLED"),
        ({"QUADRA_SECRET_KEY": STRONG_KEY, "QUADRA_CORS_ORIGINS": "*"}, "QUADRA_CORS_ORIGINS"),
    ],
)
def test_production_refuses_unsafe_configuration(overrides: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=f"^{variable}:"):
        Settings.from_env({"QUADRA_ENV": "production", **overrides})


def test_production_accepts_a_strong_key() -> None:
    settings = Settings.from_env({"QUADRA_ENV": "production", "QUADRA_SECRET_KEY": STRONG_KEY})
    assert settings.is_production


def test_development_secret_is_generated_once_and_private(tmp_path: Path) -> None:
    settings = Settings.from_env({"QUADRA_STATE_DIR": str(tmp_path)})
    first = resolve_secret_key(settings)
    assert len(first) >= 32 and resolve_secret_key(settings) == first
    assert (tmp_path / "secret_key").stat().st_mode & 0o777 == 0o600
    configured = Settings.from_env({"QUADRA_STATE_DIR": str(tmp_path), "QUADRA_SECRET_KEY": STRONG_KEY})
    assert resolve_secret_key(configured) == STRONG_KEY


def test_env_example_documents_every_variable_and_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    root = Path(__file__).resolve().parent.parent
    source = (root / "utils" / "config.py").read_text()
    example = (root / ".env.example").read_text()
    variables = set(re.findall(r'"(QUADRA_[A-Z_]+)"', source))
    assert len(variables) > 40
    assert not [v for v in sorted(variables) if f"{v}=" not in example]
    for key in list(os.environ):
        if key.startswith("QUADRA_"):
            monkeypatch.delenv(key)
    settings = Settings.from_env(dotenv_path=root / ".env.example")
    assert settings.auth_failure_limit == "10 per minute" and settings.port == 5000


def test_each_setting_is_declared_once_with_its_variable_parser_and_default() -> None:
    """Every field names its own variable; unset, a setting is its field's default (or, for the
    folders, the database and the longest token lifetime, follows the settings it derives from)."""
    from dataclasses import fields

    specs = fields(Settings)
    variables = [spec.metadata["variable"] for spec in specs]
    assert len(set(variables)) == len(specs) and all(variable.startswith("QUADRA_") for variable in variables)
    from_env = Settings.from_env({})
    derived = {"models_dir", "monitoring_dir", "database_url", "jwt_max_ttl_seconds"}
    assert all(getattr(from_env, spec.name) == spec.default for spec in specs if spec.name not in derived)
    moved = Settings.from_env({"QUADRA_STATE_DIR": "/srv/quadra", "QUADRA_JWT_TTL_SECONDS": str(2 * 86_400)})
    assert (moved.models_dir, moved.monitoring_dir) == (Path("/srv/quadra/models"), Path("/srv/quadra/monitoring"))
    assert moved.database_url == "sqlite:////srv/quadra/quadra.db" and moved.jwt_max_ttl_seconds == 2 * 86_400
