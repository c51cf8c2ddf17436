"""Logging: the console, plus JSON-lines files under the monitoring folder with size-based
rotation that is safe with several processes writing (concurrent-log-handler):
`quadra.log` for the application, `monitoring.log` for recording, drift and alerts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from concurrent_log_handler import ConcurrentRotatingFileHandler

from utils.config import Settings

CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"
APP_LOGGERS = ("quadra", "app")
MONITORING_LOGGER = "quadra.monitoring"
_installed: list[tuple[logging.Logger, logging.Handler]] = []


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, process, message (and the exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _file_handler(path: Path, settings: Settings) -> logging.Handler:
    handler = ConcurrentRotatingFileHandler(str(path), maxBytes=settings.log_max_bytes, backupCount=settings.log_backups)
    handler.setFormatter(JsonFormatter())
    return handler


def configure_logging(settings: Settings) -> None:
    """Console logging, and this process's file handlers for the settings' monitoring folder
    (replacing any installed for an earlier app in the same process)."""
    logging.basicConfig(level=settings.log_level.upper(), format=CONSOLE_FORMAT)
    for logger, handler in _installed:
        logger.removeHandler(handler)
        handler.close()
    _installed.clear()
    folder = settings.monitoring_dir
    folder.mkdir(parents=True, exist_ok=True)
    app_handler = _file_handler(folder / "quadra.log", settings)
    for name in APP_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(settings.log_level.upper())
        logger.addHandler(app_handler)
        _installed.append((logger, app_handler))
    monitoring = logging.getLogger(MONITORING_LOGGER)
    monitoring_handler = _file_handler(folder / "monitoring.log", settings)
    monitoring.addHandler(monitoring_handler)
    _installed.append((monitoring, monitoring_handler))
