"""Settings: every QUADRA_* variable, typed and validated, from the environment and `.env`.

A bad value raises `ConfigError` with one line naming the variable and what it accepts;
`app.py` turns that into a clean exit so start-up fails loudly instead of half-working.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from dotenv import dotenv_values
from limits import parse as parse_limit

T = TypeVar("T")

ENVIRONMENTS = ("development", "production")
MIN_SECRET_KEY_LENGTH = 32
WEAK_SECRET_KEYS = frozenset(
    {"secret", "changeme", "change-me", "dev", "development", "password", "your-secret-key-here"}
)
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class ConfigError(ValueError):
    """A configuration value is missing, malformed or unsafe; the message names the variable."""


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}: expected true or false, got {raw!r}")


def _int_parser(low: int, high: int) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ConfigError(f"{name}: expected an integer from {low} to {high}, got {raw!r}") from None
        if not low <= value <= high:
            raise ConfigError(f"{name}: expected an integer from {low} to {high}, got {value}")
        return value

    return parse


def _float_parser(low: float, high: float) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ConfigError(f"{name}: expected a number from {low} to {high}, got {raw!r}") from None
        if not low <= value <= high:
            raise ConfigError(f"{name}: expected a number from {low} to {high}, got {value}")
        return value

    return parse


def _choice_parser(choices: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {raw!r}")
        return value

    return parse


def _parse_text(name: str, raw: str) -> str:
    return raw.strip()


def _parse_origins(name: str, raw: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())
    for origin in origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ConfigError(
                f"{name}: expected a comma-separated list of http(s):// origins, got {origin!r}"
            )
    return origins


def _parse_modules(name: str, raw: str) -> tuple[str, ...]:
    modules = tuple(m.strip() for m in raw.split(",") if m.strip())
    for module in modules:
        if not all(part.isidentifier() for part in module.split(".")):
            raise ConfigError(f"{name}: expected comma-separated Python module names, got {module!r}")
    return modules


def _parse_prefix(name: str, raw: str) -> str:
    value = raw.strip()
    if not value.replace("-", "").replace("_", "").isalnum() or len(value) > 64:
        raise ConfigError(f"{name}: expected letters, digits, - or _ (at most 64), got {value!r}")
    return value


def _parse_rate_limit(name: str, raw: str) -> str:
    value = raw.strip()
    try:
        parse_limit(value)
    except ValueError:
        raise ConfigError(f"{name}: expected a rate limit such as '10 per minute' or '100/hour', got {value!r}") from None
    return value


def _parse_http_url(name: str, raw: str) -> str:
    value = raw.strip()
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"{name}: expected an http:// or https:// URL, got {value!r}")
    return value


def _parse_database_url(name: str, raw: str) -> str:
    value = raw.strip()
    if not value.startswith(("sqlite:///", "postgresql")):
        raise ConfigError(f"{name}: expected a sqlite:/// or postgresql+psycopg:// URL, got {value!r}")
    return value


def _parse_redis_url(name: str, raw: str) -> str:
    value = raw.strip()
    if not value.startswith(("redis://", "rediss://", "redis+unix://")):
        raise ConfigError(f"{name}: expected a redis://, rediss:// or redis+unix:// URL, got {value!r}")
    return value


def _parse_artifact_uri(name: str, raw: str) -> str:
    value = raw.strip()
    if not value.startswith(("s3://", "file://", "/")):
        raise ConfigError(f"{name}: expected s3://bucket/prefix, file:///path or an absolute path, got {value!r}")
    return value


def _parse_path(name: str, raw: str) -> Path:
    return Path(_parse_text(name, raw))


def setting(variable: str, parse: Callable[[str, str], Any], default: Any) -> Any:
    """A Settings field: read from `variable` by `parse`, `default` when unset; declared once."""
    return field(default=default, metadata={"variable": variable, "parse": parse})


@dataclass(frozen=True)
class Settings:
    """The service's configuration. Build it with `Settings.from_env()`; tests may pass values."""

    env: str = setting("QUADRA_ENV", _choice_parser(ENVIRONMENTS), "development")
    debug: bool = setting("QUADRA_DEBUG", _parse_bool, False)
    state_dir: Path = setting("QUADRA_STATE_DIR", _parse_path, Path("dashboard_state"))
    secret_key: str = setting("QUADRA_SECRET_KEY", _parse_text, "")
    auth_enabled: bool = setting("QUADRA_AUTH_ENABLED", _parse_bool, True)
    rate_limit_enabled: bool = setting("QUADRA_RATE_LIMIT_ENABLED", _parse_bool, True)
    max_requests: int = setting("QUADRA_MAX_REQUESTS", _int_parser(1, 10_000_000), 100)
    rate_window: int = setting("QUADRA_RATE_WINDOW", _int_parser(1, 86_400), 60)
    rate_limit_sync_seconds: float = setting("QUADRA_RATE_LIMIT_SYNC_SECONDS", _float_parser(0.0, 10.0), 0.1)
    models_dir: Path = setting("QUADRA_MODELS_DIR", _parse_path, Path("dashboard_state/models"))
    monitoring_dir: Path = setting("QUADRA_MONITORING_DIR", _parse_path, Path("dashboard_state/monitoring"))
    drift_threshold: float = setting("QUADRA_DRIFT_THRESHOLD", _float_parser(0.01, 1000.0), 2.0)
    monitoring_window: int = setting("QUADRA_MONITORING_WINDOW", _int_parser(10, 10_000_000), 1000)
    verify_integrity: bool = setting("QUADRA_VERIFY_INTEGRITY", _parse_bool, True)
    database_url: str = setting("QUADRA_DATABASE_URL", _parse_database_url, "")
    redis_url: str | None = setting("QUADRA_REDIS_URL", _parse_redis_url, None)
    artifact_uri: str | None = setting("QUADRA_ARTIFACT_URI", _parse_artifact_uri, None)
    cors_origins: tuple[str, ...] = setting("QUADRA_CORS_ORIGINS", _parse_origins, ())
    host: str = setting("QUADRA_HOST", _parse_text, "127.0.0.1")
    port: int = setting("QUADRA_PORT", _int_parser(1, 65535), 5000)
    max_batch_size: int = setting("QUADRA_MAX_BATCH_SIZE", _int_parser(1, 100_000), 1024)
    batch_max_rows: int = setting("QUADRA_BATCH_MAX_SIZE", _int_parser(1, 100_000), 1)
    batch_max_delay_ms: float = setting("QUADRA_BATCH_MAX_DELAY_MS", _float_parser(0.0, 1000.0), 5.0)
    max_body_bytes: int = setting("QUADRA_MAX_BODY_BYTES", _int_parser(1024, 1024**3), 2 * 1024 * 1024)
    max_artifact_bytes: int = setting("QUADRA_MAX_ARTIFACT_BYTES", _int_parser(1024, 64 * 1024**3), 2 * 1024**3)
    torch_threads: int = setting("QUADRA_TORCH_THREADS", _int_parser(1, 256), 1)
    model_poll_seconds: float = setting("QUADRA_MODEL_POLL_SECONDS", _float_parser(0.05, 60.0), 0.5)
    bootstrap_model: bool = setting("QUADRA_BOOTSTRAP_MODEL", _parse_bool, True)
    log_level: str = setting("QUADRA_LOG_LEVEL", _choice_parser(("debug", "info", "warning", "error")), "info")
    architecture_modules: tuple[str, ...] = setting("QUADRA_ARCHITECTURE_MODULES", _parse_modules, ())
    store_wait_seconds: float = setting("QUADRA_STORE_WAIT_SECONDS", _float_parser(0.0, 600.0), 30.0)
    redis_prefix: str = setting("QUADRA_REDIS_PREFIX", _parse_prefix, "quadra")
    trusted_proxies: int = setting("QUADRA_TRUSTED_PROXIES", _int_parser(0, 10), 0)
    jwt_ttl_seconds: int = setting("QUADRA_JWT_TTL_SECONDS", _int_parser(60, 86_400 * 30), 3600)
    jwt_max_ttl_seconds: int = setting("QUADRA_JWT_MAX_TTL_SECONDS", _int_parser(60, 86_400 * 30), 86_400)
    key_expiry_days: int = setting("QUADRA_KEY_EXPIRY_DAYS", _int_parser(1, 3650), 90)
    auth_cache_seconds: float = setting("QUADRA_AUTH_CACHE_SECONDS", _float_parser(0.0, 60.0), 2.0)
    auth_failure_limit: str = setting("QUADRA_AUTH_FAILURE_LIMIT", _parse_rate_limit, "10 per minute")
    monitoring_retention_hours: float = setting("QUADRA_MONITORING_RETENTION_HOURS", _float_parser(0.01, 24 * 3650), 24.0)
    feature_sample_rate: float = setting("QUADRA_FEATURE_SAMPLE_RATE", _float_parser(0.0, 1.0), 1.0)
    monitoring_flush_seconds: float = setting("QUADRA_MONITORING_FLUSH_SECONDS", _float_parser(0.05, 60.0), 1.0)
    baseline_min_samples: int = setting("QUADRA_BASELINE_MIN_SAMPLES", _int_parser(10, 1_000_000), 100)
    drift_check_seconds: float = setting("QUADRA_DRIFT_CHECK_SECONDS", _float_parser(1.0, 86_400.0), 10.0)
    rollout_check_seconds: float = setting("QUADRA_ROLLOUT_CHECK_SECONDS", _float_parser(0.2, 3600.0), 2.0)
    feedback_horizon_days: float = setting("QUADRA_FEEDBACK_HORIZON_DAYS", _float_parser(0.001, 3650.0), 30.0)
    feedback_max_labels: int = setting("QUADRA_FEEDBACK_MAX_LABELS", _int_parser(1, 100_000), 10_000)
    quality_window: str = setting("QUADRA_QUALITY_WINDOW", _choice_parser(("hour", "day", "monitoring", "horizon")), "day")
    quality_min_labels: int = setting("QUADRA_QUALITY_MIN_LABELS", _int_parser(1, 10_000_000), 100)
    quality_min_accuracy: float | None = setting("QUADRA_QUALITY_MIN_ACCURACY", _float_parser(0.0, 1.0), None)
    quality_max_drop: float | None = setting("QUADRA_QUALITY_MAX_DROP", _float_parser(0.0, 1.0), None)
    alert_webhook: str | None = setting("QUADRA_ALERT_WEBHOOK", _parse_http_url, None)
    alert_webhook_allow_private: bool = setting("QUADRA_ALERT_WEBHOOK_ALLOW_PRIVATE", _parse_bool, False)
    alert_cooldown_seconds: float = setting("QUADRA_ALERT_COOLDOWN_SECONDS", _float_parser(0.0, 86_400.0 * 7), 600.0)
    log_max_bytes: int = setting("QUADRA_LOG_MAX_BYTES", _int_parser(1024, 10 * 1024**3), 10 * 1024 * 1024)
    max_training_jobs: int = setting("QUADRA_MAX_TRAINING_JOBS", _int_parser(1, 64), 1)
    training_heartbeat_timeout: float = setting("QUADRA_TRAINING_HEARTBEAT_TIMEOUT", _float_parser(10.0, 86_400.0), 60.0)
    training_max_rows: int = setting("QUADRA_TRAINING_MAX_ROWS", _int_parser(10, 10_000_000), 50_000)
    min_free_disk_mb: int = setting("QUADRA_MIN_FREE_DISK_MB", _int_parser(0, 10_000_000), 100)
    maintenance_retry_after: int = setting("QUADRA_MAINTENANCE_RETRY_AFTER", _int_parser(1, 86_400), 60)
    log_backups: int = setting("QUADRA_LOG_BACKUPS", _int_parser(0, 1000), 5)

    @property
    def is_production(self) -> bool:
        return self.env == "production"

    @property
    def artifact_cache_dir(self) -> Path:
        """This host's cache of verified artifacts downloaded from an object store."""
        return self.state_dir / "artifact-cache"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, dotenv_path: str | Path = ".env") -> Settings:
        """Read settings from `environ` (default: os.environ over the values in `.env`)."""
        if environ is None:
            values = {k: v for k, v in dotenv_values(dotenv_path).items() if v is not None}
            values.update(os.environ)
        else:
            values = dict(environ)
        return _build(values)


def _read(values: Mapping[str, str], name: str, parse: Callable[[str, str], T], default: T) -> T:
    raw = values.get(name)
    if raw is None or raw.strip() == "":
        return default
    return parse(name, raw)


# Defaults that follow other settings when their own variable is unset (fields are read in order).
_DERIVED_DEFAULTS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "models_dir": lambda read: read["state_dir"] / "models",
    "monitoring_dir": lambda read: read["state_dir"] / "monitoring",
    "database_url": lambda read: f"sqlite:///{read['state_dir'] / 'quadra.db'}",
    "jwt_max_ttl_seconds": lambda read: max(86_400, read["jwt_ttl_seconds"]),
}


def _build(values: Mapping[str, str]) -> Settings:
    read: dict[str, Any] = {}
    for spec in fields(Settings):
        derived = _DERIVED_DEFAULTS.get(spec.name)
        default = derived(read) if derived else spec.default
        read[spec.name] = _read(values, spec.metadata["variable"], spec.metadata["parse"], default)
    settings = Settings(**read)
    if settings.jwt_ttl_seconds > settings.jwt_max_ttl_seconds:
        raise ConfigError(f"QUADRA_JWT_TTL_SECONDS: must not exceed QUADRA_JWT_MAX_TTL_SECONDS ({settings.jwt_max_ttl_seconds})")
    check_production_safety(settings)
    return settings


def check_production_safety(settings: Settings) -> None:
    """Refuse configurations that are unsafe in production."""
    if not settings.is_production:
        return
    if settings.debug:
        raise ConfigError("QUADRA_DEBUG: must be false when QUADRA_ENV=production")
    key = settings.secret_key
    if len(key) < MIN_SECRET_KEY_LENGTH or key.lower() in WEAK_SECRET_KEYS or len(set(key)) < 8:
        raise ConfigError(
            f"QUADRA_SECRET_KEY: production needs a random secret of at least {MIN_SECRET_KEY_LENGTH} "
            "characters (python -c 'import secrets; print(secrets.token_urlsafe(48))')"
        )
    if not settings.auth_enabled:
        raise ConfigError("QUADRA_AUTH_ENABLED: must be true when QUADRA_ENV=production")
    if "*" in settings.cors_origins:
        raise ConfigError("QUADRA_CORS_ORIGINS: '*' is not allowed when QUADRA_ENV=production")


def resolve_secret_key(settings: Settings) -> str:
    """The configured secret, or in development one generated once and kept in the state folder.

    Every process of one deployment must share the secret (it keys API-key hashes and JWTs),
    so a development secret is persisted with owner-only permissions rather than made per process.
    """
    if settings.secret_key:
        return settings.secret_key
    path = settings.state_dir / "secret_key"
    if not path.exists():
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        candidate = path.with_name(f".secret_key.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(48))
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(candidate, path)  # atomic and never overwrites: the first process wins
        except FileExistsError:
            pass
        finally:
            candidate.unlink()
    return path.read_text().strip()


def is_service_folder(folder: str | Path | None, service_folder: Path) -> bool:
    """The seed API's folder rule: an object built for no folder, or for the service's own
    (`service_folder`, e.g. QUADRA_MODELS_DIR), is the service's and shares its store; one
    built for any other folder is self-contained there."""
    return folder is None or Path(folder).resolve() == Path(service_folder).resolve()


_current: Settings | None = None


def current_settings() -> Settings:
    """The settings of this process, read once from the environment (for the Python API)."""
    global _current
    if _current is None:
        _current = Settings.from_env()
    return _current
