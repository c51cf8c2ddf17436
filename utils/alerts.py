"""Alerts: one record per episode (hysteresis and a cooldown, no storms), optionally POSTed to
a webhook. Targets on loopback, link-local, private or reserved addresses are refused unless
QUADRA_ALERT_WEBHOOK_ALLOW_PRIVATE is set, so a webhook cannot be aimed at internal services.
The host is resolved once and the request goes to the address that was checked (TLS still
verifies the certificate against the host name), so a DNS answer that changes between the
check and the connection (DNS rebinding) cannot reach an internal address."""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
import time
from dataclasses import asdict
from typing import Any
from urllib.parse import SplitResult, urlsplit

import certifi
import urllib3

from utils.store import AlertEpisode, Store
from utils.timestamps import iso_utc

CLEAR_AFTER_CHECKS = 3
WEBHOOK_TIMEOUT_SECONDS = 5.0
log = logging.getLogger("quadra.monitoring")


class WebhookRefused(ValueError):
    """The webhook URL resolves to an address alerts may not be sent to."""


def check_webhook_target(url: str, allow_private: bool = False) -> str:
    """Resolve the webhook's host once; returns the address to connect to. Refuses URLs that
    are not http(s), and (unless `allow_private`) hosts with any internal address."""
    parsed = urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise WebhookRefused("the webhook must be an http:// or https:// URL")
    try:
        infos = socket.getaddrinfo(parsed.hostname, _port(parsed), type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise WebhookRefused(f"cannot resolve {parsed.hostname}: {exc}") from None
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    for address in addresses if not allow_private else ():
        if (address.is_loopback or address.is_link_local or address.is_private or address.is_reserved
                or address.is_multicast or address.is_unspecified):
            raise WebhookRefused(f"{parsed.hostname} resolves to {address}, an internal address")
    return str(addresses[0])


def send_webhook(url: str, payload: dict[str, Any], allow_private: bool = False,
                 timeout: float = WEBHOOK_TIMEOUT_SECONDS) -> int:
    """POST `payload` as JSON to `url` at the address `check_webhook_target` approved, with
    the URL's host in the Host header and, for https, in SNI and the certificate check.
    Redirects are not followed. Returns the HTTP status."""
    parsed = urlsplit(url)
    address = check_webhook_target(url, allow_private)
    pool_options: dict[str, Any] = {"timeout": urllib3.Timeout(total=timeout), "retries": False}
    if parsed.scheme == "https":
        pool: urllib3.HTTPConnectionPool = urllib3.HTTPSConnectionPool(
            address, _port(parsed), server_hostname=parsed.hostname, assert_hostname=parsed.hostname,
            cert_reqs="CERT_REQUIRED", ca_certs=certifi.where(), **pool_options)
    else:
        pool = urllib3.HTTPConnectionPool(address, _port(parsed), **pool_options)
    headers = {"Host": parsed.netloc.rpartition("@")[2], "Content-Type": "application/json"}
    if parsed.username is not None:
        headers.update(urllib3.util.make_headers(basic_auth=f"{parsed.username}:{parsed.password or ''}"))
    target = (parsed.path or "/") + (f"?{parsed.query}" if parsed.query else "")
    with pool:
        response = pool.urlopen("POST", target, body=json.dumps(payload), headers=headers, redirect=False)
    return response.status


def _port(parsed: SplitResult) -> int:
    return parsed.port or (443 if parsed.scheme == "https" else 80)


class AlertManager:
    """Records alerts in the store; episode state lives there too, so every process agrees
    (each change of it is one locked read-modify-write, so two processes never both start
    an episode or both send an alert the cooldown should have held back)."""

    def __init__(self, store: Store, webhook_url: str | None = None, allow_private: bool = False,
                 cooldown_seconds: float = 600.0, clear_after: int = CLEAR_AFTER_CHECKS) -> None:
        self.store = store
        self.webhook_url = webhook_url
        self.allow_private = allow_private
        self.cooldown_seconds = cooldown_seconds
        self.clear_after = clear_after

    def observe(self, kind: str, active: bool, message: str, details: dict[str, Any], severity: str = "warning") -> int | None:
        """Feed one check's verdict. An alert is recorded when an episode starts (and the
        cooldown since the last one has passed); the episode ends after `clear_after`
        consecutive clear checks. Returns the new alert's id, if one was recorded."""
        now = time.time()
        outcome = {"record": False, "resolve": False}

        def change(episode: AlertEpisode) -> None:
            if active:
                episode.clear_checks = 0
                if not episode.active:
                    episode.active, episode.since = True, now
                    episode.episodes += 1
                    if now - episode.last_alert_at >= self.cooldown_seconds:
                        episode.last_alert_at = now
                        outcome["record"] = True
            elif episode.active:
                episode.clear_checks += 1
                if episode.clear_checks >= self.clear_after:
                    episode.active, episode.since, episode.clear_checks = False, None, 0
                    outcome["resolve"] = True

        self.store.alerts.update_episode(kind, change)
        if outcome["resolve"]:
            self.store.alerts.resolve(kind)
            log.info("%s episode resolved", kind)
        return self._record(kind, severity, message, details) if outcome["record"] else None

    def raise_alert(self, kind: str, message: str, details: dict[str, Any], severity: str = "critical") -> int | None:
        """A one-off alert, subject to the same cooldown per kind."""
        now = time.time()
        outcome = {"record": False}

        def change(episode: AlertEpisode) -> None:
            if now - episode.last_alert_at >= self.cooldown_seconds:
                episode.last_alert_at = now
                outcome["record"] = True

        self.store.alerts.update_episode(kind, change)
        return self._record(kind, severity, message, details) if outcome["record"] else None

    def notify(self, kind: str, message: str, details: dict[str, Any], severity: str = "info") -> int:
        """A notice of an event (a mode change, a rollout's start or end): recorded and sent,
        no cooldown, since each event happens once."""
        return self._record(kind, severity, message, details)

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest alerts first; `at` and `resolved_at` in ISO 8601 UTC."""
        return [{**asdict(alert), "at": iso_utc(alert.at), "resolved_at": iso_utc(alert.resolved_at)}
                for alert in self.store.alerts.list(limit)]

    def _record(self, kind: str, severity: str, message: str, details: dict[str, Any]) -> int:
        alert_id = self.store.alerts.insert(kind, severity, message, details)
        is_notice = severity == "info"
        log.log(logging.INFO if is_notice else logging.WARNING, "%s %s: %s", "notice" if is_notice else "ALERT", kind, message)
        if self.webhook_url:
            payload = {"id": alert_id, "kind": kind, "severity": severity, "message": message, "details": details,
                       "at": iso_utc(time.time())}
            threading.Thread(target=self._post, args=(self.webhook_url, payload), name="quadra-alert-webhook",
                             daemon=True).start()
        return alert_id

    def _post(self, url: str, payload: dict[str, Any]) -> None:
        try:
            status = send_webhook(url, payload, self.allow_private)
            log.info("alert %s sent to the webhook: HTTP %s", payload["id"], status)
        except (WebhookRefused, urllib3.exceptions.HTTPError, OSError) as exc:
            log.error("alert %s not sent to the webhook: %s", payload["id"], exc)
