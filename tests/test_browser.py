"""The operator dashboard in a real browser: Playwright's Chromium against four gunicorn workers.

Every test starts its own server on a private state folder and opens the page in a fresh
browser context; screenshots of the main states go to ARTIFACTS."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from playwright.sync_api import Page, expect

from tests.conftest import ARTIFACTS, GUNICORN_COMMAND, epoch
from tests.test_e2e_monitoring import IRIS, send, wait_until_recorded
from tests.test_events import websocket_handshake

pytestmark = pytest.mark.e2e
DRIFT_ENV = {"QUADRA_DRIFT_CHECK_SECONDS": "1", "QUADRA_MONITORING_WINDOW": "300"}
DESKTOP = {"width": 1400, "height": 1000}
PHONE = {"width": 390, "height": 844}
LIVE_MS = 15_000  # first Socket.IO connection, on a server that just started
KEYS_PANEL = "section[aria-labelledby=keys-title]"


def screenshot(page: Page, name: str, part: str | None = None) -> None:
    """The whole page, or only the element `part` selects."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = str(ARTIFACTS / f"{name}.png")
    if part:
        page.locator(part).screenshot(path=path)
        return
    page.evaluate("() => window.scrollTo(0, 0)")  # the sticky header would be drawn mid-page otherwise
    page.screenshot(path=path, full_page=True)


def use_key(page: Page, key: str) -> None:
    """Paste `key` and wait for the page to have asked whom it belongs to."""
    page.fill("#api-key", key)
    page.click("#key-save")
    expect(page.locator("#key-state")).to_have_attribute("data-state", re.compile(r"^(known|unknown)$"), timeout=5_000)


def stored(page: Page) -> str:
    """Everything the page keeps in sessionStorage and localStorage, as one string."""
    return page.evaluate("() => JSON.stringify([Object.entries(sessionStorage), Object.entries(localStorage)])")


def whoami(server, key: str) -> requests.Response:
    return server.get("/api/auth/whoami", headers={"X-API-Key": key})


def chart_points(page: Page, chart_id: str, dataset: int = 0) -> list[dict]:
    return page.evaluate("([id, i]) => Chart.getChart(id).data.datasets[i].data", [chart_id, dataset])


def accept_dialogs(page: Page) -> list[str]:
    """Accept every confirm() on `page`; returns the list their messages are appended to."""
    messages: list[str] = []

    def accept(dialog) -> None:
        messages.append(dialog.message)
        dialog.accept()

    page.on("dialog", accept)
    return messages


class Dashboard:
    """An open dashboard page and the console errors and page errors seen on it."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("console", lambda message: self.errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: self.errors.append(str(error)))


@pytest.fixture
def open_dashboard(browser) -> Iterator[Callable[..., Dashboard]]:
    """open_dashboard(server, viewport=DESKTOP, key=None, before_load=None): a new context on
    the page, live on the socket (and with `key` pasted)."""
    contexts = []

    def open_(server, viewport: dict = DESKTOP, key: str | None = None,
              before_load: Callable[[Page], None] | None = None) -> Dashboard:
        context = browser.new_context(viewport=viewport)
        contexts.append(context)
        dashboard = Dashboard(context.new_page())
        if before_load:
            before_load(dashboard.page)
        dashboard.page.goto(f"{server.url}/")
        expect(dashboard.page.locator("#connection")).to_have_text("live", timeout=LIVE_MS)
        if key:
            use_key(dashboard.page, key)
        return dashboard

    yield open_
    for context in contexts:
        context.close()


def test_the_page_loads_live_with_no_console_errors(start_server, state_dir: Path, open_dashboard) -> None:
    server = start_server(state_dir, command=GUNICORN_COMMAND)
    assert "default-src 'self'" in requests.get(f"{server.url}/", timeout=10).headers["Content-Security-Policy"]
    dashboard = open_dashboard(server)
    page = dashboard.page
    expect(page.locator("#health-status")).to_have_text("ready", timeout=5_000)
    expect(page.locator("#mode")).to_have_text("inference", timeout=5_000)
    expect(page.locator("#serving-version")).to_have_text("1.0.0", timeout=5_000)
    expect(page.locator("#production-version")).to_have_text("1.0.0", timeout=5_000)
    expect(page.locator("#drift-verdict")).to_have_text("not evaluated", timeout=5_000)
    expect(page.locator("#resource-versions")).to_have_text(re.compile(r"^1 \(\d+\.\d kB\)$"), timeout=5_000)
    expect(page.locator("#resource-memory")).to_have_text(re.compile(r"^[\d,]+ MB$"))
    expect(page.locator("#resource-uptime")).to_have_text(re.compile(r"^\d+ min$"))
    expect(page.locator("#resource-batching")).to_have_text("off")
    expect(page.locator("#versions-note")).to_contain_text("API key", timeout=5_000)
    expect(page.locator("#versions")).to_be_hidden()
    expect(page.locator("button[data-mode=training]")).to_be_disabled()
    page.wait_for_function("() => Chart.getChart('chart-throughput').data.datasets[0].data.length >= 3", timeout=10_000)
    screenshot(page, "dashboard-public")
    assert dashboard.errors == []


def test_a_prediction_load_moves_the_counters_and_charts(start_server, state_dir: Path, open_dashboard) -> None:
    server = start_server(state_dir, command=GUNICORN_COMMAND)
    dashboard = open_dashboard(server)
    page = dashboard.page
    expect(page.locator("#total-predictions")).to_have_text("0", timeout=5_000)
    assert send(server, [[IRIS[i]] for i in range(60)]) == 60
    expect(page.locator("#total-predictions")).to_have_text("60", timeout=10_000)
    page.wait_for_function("() => Chart.getChart('chart-throughput').data.datasets[0].data.at(-1).y > 0", timeout=10_000)
    expect(page.locator("#latency-p95")).to_have_text(re.compile(r"^\d+\.\d\d ms$"), timeout=5_000)
    latency_p95 = chart_points(page, "chart-latency", 1)
    confidence = chart_points(page, "chart-confidence")
    assert latency_p95[-1]["y"] > 0 and 0.5 < confidence[-1]["y"] <= 1.0
    assert len(chart_points(page, "chart-throughput")) <= 120
    screenshot(page, "dashboard-traffic")
    assert dashboard.errors == []


def test_the_resources_panel_shows_this_workers_batching(start_server, state_dir: Path, open_dashboard) -> None:
    server = start_server(state_dir, {"QUADRA_BATCH_MAX_SIZE": "16"}, command=GUNICORN_COMMAND)
    assert send(server, [[IRIS[i]] for i in range(20)]) == 20
    page = open_dashboard(server).page
    expect(page.locator("#resource-batching")).to_have_text(
        re.compile(r"^≤ 16 rows, 5\.0 ms( · \d+\.\d requests per pass)?$"), timeout=5_000)


def test_a_mode_switch_shows_within_two_seconds_and_the_buttons_switch(start_server, state_dir: Path, open_dashboard,
                                                                       api_keys: dict[str, str]) -> None:
    server = start_server(state_dir, command=GUNICORN_COMMAND)
    page = open_dashboard(server).page
    expect(page.locator("#mode")).to_have_text("inference", timeout=5_000)
    for mode in ("training", "maintenance", "inference", "maintenance"):  # each POST lands on any of the 4 workers
        assert server.post(f"/api/mode/{mode}", json={"reason": f"browser test: {mode}"}).status_code == 200
        expect(page.locator("#mode")).to_have_text(mode, timeout=2_000)
    expect(page.locator("#mode-detail")).to_contain_text("browser test: maintenance", timeout=2_000)
    screenshot(page, "dashboard-maintenance")

    use_key(page, api_keys["admin"])
    dialogs = accept_dialogs(page)
    page.fill("#mode-reason", "retrain from the dashboard")
    page.click("button[data-mode=training]")
    expect(page.locator("#mode")).to_have_text("training", timeout=5_000)
    expect(page.locator("#message")).to_contain_text("Mode switched to training", timeout=5_000)
    assert dialogs == ["Switch the service to training mode?"]
    mode = server.get("/api/mode").json()
    assert mode["mode"] == "training" and mode["reason"] == "retrain from the dashboard"


def test_a_drift_episode_shows_the_verdict_and_the_alert(start_server, state_dir: Path, open_dashboard) -> None:
    server = start_server(state_dir, DRIFT_ENV, GUNICORN_COMMAND)
    page = open_dashboard(server).page
    calm = [IRIS[i:i + 10] for i in range(0, 150, 10)] * 2
    assert send(server, calm) == 300
    wait_until_recorded(server, 300)
    assert server.post("/api/monitoring/baseline").status_code == 201
    expect(page.locator("#drift-verdict")).to_have_text("not evaluated", timeout=10_000)  # nothing since the baseline
    assert send(server, calm) == 300
    wait_until_recorded(server, 600)
    expect(page.locator("#drift-verdict")).to_have_text("no drift", timeout=10_000)
    shifted = [[row[0], row[1], row[2] + 2.5, row[3]] for row in IRIS]
    assert send(server, [shifted[i:i + 10] for i in range(0, 150, 10)] * 2) == 300
    wait_until_recorded(server, 900)
    expect(page.locator("#drift-verdict")).to_have_text("drift detected", timeout=15_000)
    expect(page.locator("#drift-features tr[data-feature=petal_length_cm] td").last).to_have_text("yes", timeout=5_000)
    alert = page.locator("#alerts li[data-kind=drift]")
    expect(alert).to_have_count(1, timeout=10_000)
    expect(alert).to_contain_text("drift detected by", timeout=5_000)
    assert any(point["y"] > 0 for point in chart_points(page, "chart-drift"))
    screenshot(page, "dashboard-drift")


def test_a_training_job_shows_progress_to_completion(start_server, state_dir: Path, open_dashboard,
                                                     api_keys: dict[str, str]) -> None:
    server = start_server(state_dir, command=GUNICORN_COMMAND)
    page = open_dashboard(server, key=api_keys["write"]).page
    expect(page.locator("#key-state")).to_have_text("signed in as test-write (write)")
    expect(page.locator("button[data-mode=training]")).to_be_disabled()  # admin only
    page.fill("#epochs", "5")
    page.click("#start-training")  # inference mode: refused with the server's reason
    expect(page.locator("#message")).to_contain_text("training is refused in inference mode", timeout=5_000)
    assert server.post("/api/mode/training", json={"reason": "browser test"}).status_code == 200
    response = server.post("/api/train", json={"epochs": 40})
    assert response.status_code == 202
    job_id = response.json()["id"]
    job = page.locator(f'#jobs li[data-job-id="{job_id}"]')
    expect(job.locator(".job-status")).to_have_text("succeeded", timeout=120_000)
    expect(job.locator(".job-epochs")).to_have_text("epoch 40 / 40", timeout=2_000)
    expect(job.locator("progress")).to_have_attribute("value", "100")
    result_version = server.get(f"/api/train/{job_id}").json()["result_version"]
    expect(job).to_contain_text(f"saved as {result_version}")
    assert [point["x"] for point in chart_points(page, "chart-training")] == list(range(1, 41))
    expect(page.locator(f'#versions tr[data-version="{result_version}"]')).to_be_visible(timeout=5_000)
    screenshot(page, "dashboard-training")


def test_promote_from_the_page_needs_an_admin_key(start_server, state_dir: Path, open_dashboard,
                                                  api_keys: dict[str, str]) -> None:
    server = start_server(state_dir, command=GUNICORN_COMMAND)
    saved = server.post("/api/model/save", json={"version": "1.1.0", "description": "candidate", "tags": ["candidate"]})
    assert saved.status_code == 201
    admin_key, read_key = api_keys["admin"], api_keys["read"]

    page = open_dashboard(server, key=admin_key).page
    assert page.evaluate("[sessionStorage.getItem('quadra.apiKey'), localStorage.length]") == [admin_key, 0]
    assert admin_key not in page.url
    row = page.locator('#versions tr[data-version="1.1.0"]')
    expect(row).to_contain_text("candidate", timeout=5_000)
    row.locator("button[data-action=verify]").click()
    expect(row.locator("[data-verify-result]")).to_have_text("✓", timeout=5_000)
    dialogs = accept_dialogs(page)
    row.locator("button[data-action=promote]").click()
    expect(page.locator("#production-version")).to_have_text("1.1.0", timeout=5_000)
    expect(row).to_contain_text("production", timeout=5_000)
    assert dialogs and "Promote version 1.1.0" in dialogs[0]
    assert server.get("/api/model/versions").json()["production_version"] == "1.1.0"
    screenshot(page, "dashboard-promoted")
    page.click("#key-forget")
    expect(page.locator("#versions-note")).to_contain_text("API key", timeout=2_000)
    assert page.evaluate("sessionStorage.getItem('quadra.apiKey')") is None

    reader = open_dashboard(server, key=read_key).page
    expect(reader.locator("#key-state")).to_have_text("signed in as test-read (read)")
    row = reader.locator('#versions tr[data-version="1.0.0"]')
    expect(row.locator("button[data-action=verify]")).to_be_enabled(timeout=5_000)
    promote = row.locator("button[data-action=promote]")
    for control in (promote, row.locator("button[data-action=load]"), reader.locator("#rollback"),
                    reader.locator("#set-baseline"), reader.locator("button[data-mode=maintenance]"),
                    reader.locator("#start-training")):
        expect(control).to_be_disabled()
    expect(promote).to_have_attribute("title", "needs a key with the admin permission")
    expect(reader.locator("#keys-note")).to_have_text("An admin key is needed to manage API keys.")
    expect(reader.locator("#keys-admin")).to_be_hidden()
    screenshot(reader, "dashboard-read-key")
    screenshot(reader, "keys-panel-read-key", KEYS_PANEL)


def test_the_canary_panel_follows_a_rollout_and_promotes_by_hand(start_server, state_dir: Path, open_dashboard,
                                                                 api_keys: dict[str, str]) -> None:
    server = start_server(state_dir, {"QUADRA_ROLLOUT_CHECK_SECONDS": "1"}, GUNICORN_COMMAND)
    assert server.post("/api/model/save", json={"version": "1.1.0"}).status_code == 201
    public = open_dashboard(server).page
    expect(public.locator("#rollout-note")).to_have_text("An API key (read) is needed to follow a canary.")
    page = open_dashboard(server, key=api_keys["admin"]).page
    expect(page.locator("#rollout-status")).to_have_text("no canary yet", timeout=5_000)
    expect(page.locator("#canary-promote")).to_be_disabled()
    started = server.post("/api/model/canary/1.1.0", json={
        "percent": 50, "min_predictions": 100, "on_success": "hold",
        "criteria": {"max_prediction_distance": None, "max_latency_p95_ratio": None}})
    assert started.status_code == 201
    expect(page.locator("#rollout-status")).to_have_text("running", timeout=5_000)
    assert send(server, [[IRIS[i % len(IRIS)]] for i in range(300)]) == 300
    expect(page.locator("#rollout-status")).to_have_text("held", timeout=15_000)
    expect(page.locator('#rollout-arms tr[data-arm="candidate"]')).to_contain_text("1.1.0")
    expect(page.locator('#rollout-checks li[data-criterion="max_confidence_drop"]')).to_have_class("check-ok")
    expect(page.locator("#rollout-reason")).to_contain_text("passed: every criterion met")
    assert len(chart_points(page, "chart-rollout", 1)) >= 1
    expect(page.locator("#canary-promote")).to_be_enabled()
    dialogs = accept_dialogs(page)
    page.click("#canary-promote")
    expect(page.locator("#rollout-status")).to_have_text("promoted", timeout=5_000)
    expect(page.locator("#production-version")).to_have_text("1.1.0", timeout=5_000)
    expect(page.locator("#canary-abort")).to_be_disabled()
    assert dialogs and "Promote the canary" in dialogs[0]
    screenshot(page, "dashboard-canary", "section[aria-labelledby=rollout-title]")


def test_the_quality_panel_shows_an_accuracy_drop_and_its_recovery(start_server, state_dir: Path, open_dashboard,
                                                                   api_keys: dict[str, str]) -> None:
    env = {"QUADRA_DRIFT_CHECK_SECONDS": "1", "QUADRA_QUALITY_MIN_LABELS": "20", "QUADRA_QUALITY_MAX_DROP": "0.1",
           "QUADRA_QUALITY_WINDOW": "hour"}
    server = start_server(state_dir, env, GUNICORN_COMMAND)
    public = open_dashboard(server).page
    expect(public.locator("#quality-note")).to_have_text("An API key (read) is needed to see quality from labels.")
    page = open_dashboard(server, key=api_keys["read"]).page
    answers = [p for start in range(0, 150, 5) for p in server.post(
        "/api/predict", json={"inputs": IRIS[start:start + 5]}).json()["predictions"]]
    wrong = [{"id": a["id"], "label": (a["class_index"] + 1) % 3} for a in answers]
    assert server.post("/api/feedback", json={"labels": wrong}).json()["recorded"] == 150
    expect(page.locator("#quality-verdict")).to_have_text("below the floor", timeout=15_000)
    expect(page.locator('#quality-versions tr[data-version="1.0.0"]')).to_contain_text("150")
    expect(page.locator('#quality-confusion tr[data-class="setosa"] td.row-bad')).to_have_count(1)
    assert len(chart_points(page, "chart-quality", 0)) >= 1 and len(chart_points(page, "chart-quality", 1)) == 2
    assert chart_points(page, "chart-calibration", 0)[0]["y"] == 0.0
    right = [{"id": a["id"], "label": a["class"]} for a in answers]
    assert server.post("/api/feedback", json={"labels": right}).json()["relabelled"] == 150
    expect(page.locator("#quality-verdict")).to_have_text("at or above the floor", timeout=15_000)
    expect(page.locator("#quality-detail")).to_contain_text("accuracy 1.000 on 150 labels")
    screenshot(page, "dashboard-quality", "section[aria-labelledby=quality-title]")


def test_without_whoami_the_servers_403_still_explains(start_server, state_dir: Path, open_dashboard,
                                                      api_keys: dict[str, str]) -> None:
    """When whoami cannot answer (here the page's request is cut), the key's permissions are
    unknown: the controls stay on and the server's refusal is what the operator sees."""
    server = start_server(state_dir, command=GUNICORN_COMMAND)
    cut_whoami = lambda page: page.route("**/api/auth/whoami", lambda route: route.abort())  # noqa: E731
    page = open_dashboard(server, key=api_keys["read"], before_load=cut_whoami).page
    expect(page.locator("#key-state")).to_have_text("key set · permissions unknown")
    expect(page.locator("#keys-note")).to_contain_text("lacks the permission", timeout=5_000)
    accept_dialogs(page)
    page.click("#rollback")
    expect(page.locator("#message")).to_contain_text("lacks the permission", timeout=5_000)
    assert server.get("/api/model/versions").json()["production_version"] == "1.0.0"
    screenshot(page, "dashboard-forbidden")


def test_an_admin_creates_and_revokes_a_key_from_the_page(start_server, state_dir: Path, open_dashboard,
                                                         api_keys: dict[str, str]) -> None:
    server = start_server(state_dir, command=GUNICORN_COMMAND)
    dashboard = open_dashboard(server, key=api_keys["admin"])
    page = dashboard.page
    expect(page.locator("#key-state")).to_have_text("signed in as test-admin (admin)")
    expect(page.locator("#keys tbody tr")).to_have_count(3, timeout=5_000)  # the seeded read, write and admin keys
    page.fill("#new-key-name", "incident-bot")
    page.check("input[name=new-key-permission][value=write]")
    page.fill("#new-key-limit", "100 per minute")
    page.press("#new-key-limit", "Enter")  # the keyboard submits the form
    field = page.locator("#new-key-value")
    expect(field).to_have_value(re.compile(r"^qk_[\w-]{40,}$"), timeout=5_000)
    new_key = field.input_value()
    expect(field).to_be_focused()
    expect(field).to_have_js_property("readOnly", True)
    expect(page.locator("#new-key")).to_contain_text("This is the only time it is shown")
    me = whoami(server, new_key).json()
    assert (me["name"], me["permissions"], me["rate_limit"]) == ("incident-bot", ["read", "write"], "100 per minute")
    row = page.locator(f'#keys tr[data-key-id="{me["id"]}"]')
    expect(row.locator("[data-key-state]")).to_have_text("active", timeout=5_000)
    expect(row).to_contain_text(f"{new_key[:7]}…{new_key[-4:]}")
    expect(row).to_contain_text("read, write")
    expect(page.locator("#new-key-name")).to_have_value("")
    assert new_key not in stored(page)
    screenshot(page, "keys-panel-created", KEYS_PANEL)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    page.click("#copy-key")
    expect(page.locator("#message")).to_have_text("Key copied to the clipboard.", timeout=2_000)
    assert page.evaluate("navigator.clipboard.readText()") == new_key
    page.click("#hide-key")
    expect(page.locator("#new-key")).to_be_hidden()
    assert field.input_value() == ""

    dialogs = accept_dialogs(page)
    row.locator("button[data-key-action=revoke]").focus()
    page.keyboard.press("Enter")
    expect(row.locator("[data-key-state]")).to_have_text("revoked", timeout=5_000)
    expect(row.locator("button")).to_have_count(0)
    assert dialogs == [f"Revoke key incident-bot ({me['id']})? Every client using it is refused within seconds."]
    time.sleep(2.5)  # QUADRA_AUTH_CACHE_SECONDS: every worker has let go of the key by now
    for _ in range(4):  # most likely more than one of the four workers
        assert whoami(server, new_key).status_code == 401
    assert new_key not in stored(page)
    screenshot(page, "keys-panel-revoked", KEYS_PANEL)
    assert dashboard.errors == []


def test_rotating_a_key_keeps_both_keys_working_for_the_grace_period(start_server, state_dir: Path, open_dashboard,
                                                                    api_keys: dict[str, str]) -> None:
    server = start_server(state_dir, command=GUNICORN_COMMAND)
    page = open_dashboard(server, key=api_keys["admin"]).page
    old_key = api_keys["write"]
    old_id = whoami(server, old_key).json()["id"]
    dialogs = accept_dialogs(page)
    page.fill("#rotate-grace", "1")
    page.locator(f'#keys tr[data-key-id="{old_id}"] button[data-key-action=rotate]').click()
    field = page.locator("#new-key-value")
    expect(field).to_have_value(re.compile(r"^qk_"), timeout=5_000)
    new_key = field.input_value()
    assert dialogs == [f"Rotate key test-write ({old_id})? A replacement is issued; the old key keeps working for 1 h."]
    new = whoami(server, new_key).json()
    assert new["name"] == "test-write" and new["permissions"] == ["write"] and new["id"] != old_id
    expect(page.locator("#new-key-title")).to_have_text(f"New key for test-write ({new['id']})")
    for key in (old_key, new_key):
        for _ in range(4):
            assert server.get("/api/model/versions", headers={"X-API-Key": key}).status_code == 200
    old = next(k for k in server.get("/api/auth/keys").json()["keys"] if k["id"] == old_id)
    assert old["rotated_to"] == new["id"] and epoch(old["expires_at"]) == pytest.approx(time.time() + 3600, abs=60)
    expect(page.locator(f'#keys tr[data-key-id="{old_id}"]')).to_contain_text(f"replaced by {new['id']}", timeout=5_000)
    expect(page.locator(f'#keys tr[data-key-id="{new["id"]}"] [data-key-state]')).to_have_text("active")
    assert new_key not in stored(page)
    screenshot(page, "keys-panel-rotated", KEYS_PANEL)


def test_refusals_are_explained_in_the_status_area(start_server, state_dir: Path, open_dashboard) -> None:
    server = start_server(state_dir, {"QUADRA_AUTH_FAILURE_LIMIT": "1 per minute"}, GUNICORN_COMMAND)
    page = open_dashboard(server, key="qk_" + "not_a_key_of_this_deployment").page
    expect(page.locator("#message")).to_contain_text("Key missing or invalid (401)", timeout=5_000)
    expect(page.locator("#versions-note")).to_contain_text("Key missing or invalid", timeout=5_000)
    page.click("#refresh-versions")  # a second failure from this address within the minute
    expect(page.locator("#message")).to_have_text(re.compile(r"^Rate limited \(429\): retry in \d+ s\.$"), timeout=5_000)
    screenshot(page, "dashboard-rate-limited")


def test_a_dropped_socket_shows_reconnecting_then_resyncs(start_server, state_dir: Path, open_dashboard) -> None:
    """The page's WebSocket goes through a Playwright route that can cut it and refuse new ones."""
    server = start_server(state_dir, command=GUNICORN_COMMAND)
    sockets, sent, offline = [], [], threading.Event()

    def route(ws) -> None:
        if offline.is_set():
            ws.close()
            return
        to_server = ws.connect_to_server()
        ws.on_message(lambda message: (sent.append(message), to_server.send(message)))
        sockets.append(ws)

    page = open_dashboard(server, before_load=lambda p: p.route_web_socket(re.compile(r"/socket\.io/"), route)).page
    offline.set()
    sockets[-1].close()
    expect(page.locator("#connection")).to_have_text("reconnecting…", timeout=5_000)
    assert server.post("/api/mode/maintenance", json={"reason": "while the page was away"}).status_code == 200
    offline.clear()
    expect(page.locator("#connection")).to_have_text("live", timeout=15_000)
    expect(page.locator("#mode")).to_have_text("maintenance", timeout=5_000)
    assert '42["resync"]' in sent


def test_the_page_goes_live_with_a_cors_allow_list_that_does_not_name_it(start_server, state_dir: Path,
                                                                        open_dashboard) -> None:
    """QUADRA_CORS_ORIGINS lists other origins (as in production): the page's own origin still
    opens the channel; a foreign origin's handshake is still refused."""
    server = start_server(state_dir, {"QUADRA_CORS_ORIGINS": "https://ops.example.com"}, GUNICORN_COMMAND)
    dashboard = open_dashboard(server)  # waits for "live"
    page = dashboard.page
    expect(page.locator("#mode")).to_have_text("inference", timeout=5_000)
    expect(page.locator("#health-status")).to_have_text("ready", timeout=5_000)
    assert server.post("/api/mode/maintenance", json={"reason": "allow-list test"}).status_code == 200
    expect(page.locator("#mode")).to_have_text("maintenance", timeout=10_000)
    page.wait_for_function("() => Chart.getChart('chart-throughput').data.datasets[0].data.length >= 2", timeout=10_000)
    assert dashboard.errors == []
    assert not websocket_handshake(server.url, "https://evil.example.com")
    assert websocket_handshake(server.url, "https://ops.example.com")


def test_the_socket_sends_the_key_in_its_auth_payload_and_follows_its_access(start_server, state_dir: Path,
                                                                            open_dashboard) -> None:
    """The channel authenticates with the key in the Socket.IO auth payload (never the URL),
    reconnects on sign-in and sign-out, and drops the training jobs once the key is revoked."""
    server = start_server(state_dir, command=GUNICORN_COMMAND)
    created = server.post("/api/auth/keys", json={"name": "page-reader", "permissions": ["read"]}).json()
    key = created["api_key"]
    urls, sent = [], []

    def route(ws) -> None:
        urls.append(ws.url)
        to_server = ws.connect_to_server()
        ws.on_message(lambda message: (sent.append(message), to_server.send(message)))

    def follow_the_channel(page: Page) -> None:
        page.route_web_socket(re.compile(r"/socket\.io/"), route)
        keep_every_message(page)

    dashboard = open_dashboard(server, before_load=follow_the_channel)
    page = dashboard.page
    expect(page.locator("#training-note")).to_be_visible(timeout=5_000)
    expect(page.locator("#jobs")).to_be_hidden()
    assert server.post("/api/mode/training", json={"reason": "browser test"}).status_code == 200
    job_id = server.post("/api/train", json={"epochs": 2}).json()["id"]

    use_key(page, key)
    job = page.locator(f'#jobs li[data-job-id="{job_id}"]')
    expect(job).to_be_visible(timeout=10_000)
    expect(page.locator("#training-note")).to_be_hidden()
    expect(page.locator("#connection")).to_have_text("live")
    assert json.dumps({"apiKey": key}, separators=(",", ":")) in "".join(sent)  # the connect packet's auth
    assert len(urls) >= 2 and not any(key in url for url in urls)
    screenshot(page, "dashboard-channel-read-key")

    assert server.delete(f"/api/auth/keys/{created['id']}").status_code == 200
    expect(page.locator("#training-note")).to_be_visible(timeout=30_000)
    expect(page.locator("#jobs")).to_be_hidden()
    page.wait_for_function("() => window.shownMessages.some(m => m.includes('revoked or expired'))", timeout=10_000)
    # Whichever told the page first, the channel or a REST 401, the versions say the key is invalid.
    expect(page.locator("#versions-note")).to_contain_text(re.compile("no longer valid|Key missing or invalid"))
    expect(page.locator("#versions")).to_be_hidden()
    expect(page.locator("#connection")).to_have_text("live")
    assert job_id not in page.locator("main").inner_text()
    screenshot(page, "dashboard-channel-key-revoked")
    # A REST call the page made with the key between its revocation and the channel's notice is
    # answered 401, which Chromium logs as a failed resource load: the network's word, not the page's.
    assert [error for error in dashboard.errors if "status of 401" not in error] == []


def keep_every_message(page: Page) -> None:
    """REST calls with a refused key say "401" in the same status area as the channel, in a race
    with the channel's own message: keep every message the area shows (window.shownMessages),
    not only the last one."""
    page.add_init_script("""addEventListener("DOMContentLoaded", () => {
        window.shownMessages = [];
        const area = document.getElementById("message");
        new MutationObserver(() => window.shownMessages.push(area.textContent))
            .observe(area, {childList: true, characterData: true, subtree: true});
    });""")


def test_a_key_the_channel_refuses_leaves_the_page_live_and_public(start_server, state_dir: Path,
                                                                   open_dashboard) -> None:
    """Whoami cannot answer (cut), so the page offers the key to the channel, which refuses it:
    the page says why and carries on with the public topics."""
    server = start_server(state_dir, command=GUNICORN_COMMAND)

    def cut_whoami_and_keep_every_message(page: Page) -> None:
        page.route("**/api/auth/whoami", lambda route: route.abort())
        keep_every_message(page)

    page = open_dashboard(server, key="qk_" + "not_a_key_of_this_deployment",
                          before_load=cut_whoami_and_keep_every_message).page
    page.wait_for_function("() => window.shownMessages.some(m => m.includes('The live channel refused the key')"
                           " && m.includes('not valid'))", timeout=10_000)
    expect(page.locator("#connection")).to_have_text("live", timeout=10_000)
    expect(page.locator("#training-note")).to_be_visible()
    assert server.post("/api/mode/maintenance", json={"reason": "still live"}).status_code == 200
    expect(page.locator("#mode")).to_have_text("maintenance", timeout=10_000)
    failures = server.get("/api/audit", params={"action": "auth.failure"}).json()["entries"]
    assert [entry["target"] for entry in failures].count("/socket.io/") == 1  # offered once, then not again


def test_the_page_fits_a_phone_screen(start_server, state_dir: Path, open_dashboard,
                                      api_keys: dict[str, str]) -> None:
    server = start_server(state_dir, command=GUNICORN_COMMAND)
    page = open_dashboard(server, viewport=PHONE, key=api_keys["admin"]).page
    expect(page.locator('#versions tr[data-version="1.0.0"]')).to_be_visible(timeout=5_000)
    page.wait_for_function("() => Chart.getChart('chart-throughput').data.datasets[0].data.length >= 2", timeout=10_000)
    expect(page.locator("#keys tbody tr")).to_have_count(3, timeout=5_000)
    page.fill("#new-key-name", "phone-bot")
    page.click("#create-key")
    expect(page.locator("#new-key-value")).to_have_value(re.compile(r"^qk_"), timeout=5_000)
    expect(page.locator("#keys tbody tr")).to_have_count(4, timeout=5_000)
    assert page.evaluate("document.scrollingElement.scrollWidth") <= PHONE["width"] + 1
    boxes = [page.locator(f"section[aria-labelledby={name}]").bounding_box() for name in ("health-title", "mode-title")]
    assert boxes[0]["x"] == boxes[1]["x"] and boxes[1]["y"] >= boxes[0]["y"] + boxes[0]["height"]  # stacked
    screenshot(page, "dashboard-phone")
    screenshot(page, "keys-panel-phone", KEYS_PANEL)
