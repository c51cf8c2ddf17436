/* Quadra operator dashboard: live state over Socket.IO, actions over REST.
   Plain JS, no framework. Served under a strict CSP: no inline script or style, so every
   node is built with the DOM API (server text always goes through textContent). */
"use strict";

(() => {
  const TOPICS = ["mode", "versions", "health", "stats", "drift", "training", "alerts", "rollout", "quality", "resources"];
  const KEY_STORAGE = "quadra.apiKey";
  const MAX_POINTS = 120;
  const MIN_SPAN_MS = 30_000;
  const ACTIVE_JOB_STATES = new Set(["queued", "running"]);
  const RANK = { read: 1, write: 2, admin: 3 }; // each permission implies those below it
  const MAX_GRACE_HOURS = 720; // the server's 30 days
  const KEYS_ADMIN_NOTE = "An admin key is needed to manage API keys.";
  const COLORS = {
    blue: "#2563eb", teal: "#0d9488", amber: "#d97706", red: "#dc2626",
    violet: "#7c3aed", slate: "#64748b", grid: "#e5e7eb", text: "#475569",
  };

  const $ = (id) => document.getElementById(id);

  /* What the page remembers between events. */
  const state = {
    versions: {},
    versionList: [],
    verified: new Map(), // version -> true/false, from the "verify" button
    resultVersions: "",
    selectedJobId: null,
    jobs: [],
    identity: "none", // none (no key) | checking | known (whoami answered) | unknown (whoami failed)
    principal: null, // whoami's answer: {id, name, permissions, via, rate_limit}
    keys: [],
    topics: new Set(), // the topics the live channel sends this page (its key's permission decides)
    channelKey: null, // the key the channel last authenticated with
    refusedKey: null, // a key the server refused: the channel carries on without it (public view)
  };
  const charts = {};

  // ---------------------------------------------------------------- DOM and formatting

  /** el("td", {class: "x", "data-version": v}, "text", childNode): attributes are set with
      setAttribute (true means present, null/false means absent); children are appended as text or nodes. */
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      node.setAttribute(name, value === true ? "" : String(value));
    }
    node.append(...children.filter((child) => child !== null && child !== undefined && child !== false));
    return node;
  }

  function setText(id, text) {
    $(id).textContent = text;
  }

  /** A status pill: text plus a tone class (ok, warn, bad, info, wait). */
  function setPill(id, text, tone) {
    const node = $(id);
    node.textContent = text;
    node.className = `pill pill-${tone}`;
  }

  const isNumber = (value) => typeof value === "number" && Number.isFinite(value);
  const fixed = (value, digits = 2) => (isNumber(value) ? value.toFixed(digits) : "–");
  const percent = (value, digits = 1) => (isNumber(value) ? `${(value * 100).toFixed(digits)}%` : "–");
  const count = (value) => (isNumber(value) ? value.toLocaleString("en-US") : "–");
  /** Milliseconds of an API timestamp (ISO 8601 UTC), NaN when there is none. */
  const epochMs = (iso) => (typeof iso === "string" ? Date.parse(iso) : NaN);
  const clock = (iso) => {
    const ms = epochMs(iso);
    return Number.isNaN(ms) ? "–" : new Date(ms).toLocaleTimeString("en-GB", { hour12: false });
  };

  function dateTime(iso) {
    const ms = epochMs(iso);
    return Number.isNaN(ms) ? "–" : new Date(ms).toLocaleString("en-GB", { dateStyle: "short", timeStyle: "short" });
  }

  function pValue(value) {
    if (!isNumber(value)) return "–";
    return value !== 0 && value < 0.001 ? value.toExponential(1) : value.toFixed(3);
  }

  // ---------------------------------------------------------------- messages

  let messageTimer = null;

  /** The status area (role=status): errors stay until the next message, others fade after a while. */
  function showMessage(text, kind = "info") {
    const box = $("message");
    box.textContent = text;
    box.className = `message message-${kind}`;
    box.hidden = false;
    clearTimeout(messageTimer);
    if (kind !== "error") messageTimer = setTimeout(() => { box.hidden = true; }, 10000);
  }

  // ---------------------------------------------------------------- API key (sessionStorage only)

  const apiKey = {
    get: () => sessionStorage.getItem(KEY_STORAGE),
    set: (key) => sessionStorage.setItem(KEY_STORAGE, key),
    clear: () => sessionStorage.removeItem(KEY_STORAGE),
  };

  /** Whether the key may do what needs `permission`. With permissions unknown (whoami failed)
      the server decides, and its 401/403 are explained in the status area. */
  function allows(permission) {
    if (state.identity === "known") return state.principal.permissions.some((p) => RANK[p] >= RANK[permission]);
    return state.identity === "unknown";
  }

  /** A control is enabled when the key allows its `data-needs` and its action applies (no `data-moot`). */
  function syncControl(control) {
    const needed = control.dataset.needs;
    const allowed = allows(needed);
    control.disabled = !allowed || control.hasAttribute("data-moot");
    control.title = allowed ? "" : state.identity === "known" ? `needs a key with the ${needed} permission` : "paste an API key first";
  }

  /** A button that needs `permission` (see syncControl). */
  function actionButton(permission, attrs, label) {
    const button = el("button", { type: "button", "data-needs": permission, ...attrs }, label);
    syncControl(button);
    return button;
  }

  function renderKeyState() {
    const { identity, principal } = state;
    const text = {
      none: "no key (public view)",
      checking: "checking the key…",
      known: principal && `signed in as ${principal.name} (${principal.permissions.join(", ")})`,
      unknown: "key set · permissions unknown",
    }[identity];
    setText("key-state", text);
    $("key-state").dataset.state = identity;
  }

  function setIdentity(identity, principal = null) {
    state.identity = identity;
    state.principal = principal;
    if (!allows("admin")) {
      state.keys = [];
      hideNewKey();
    }
    renderKeyState();
    document.querySelectorAll("[data-needs]").forEach(syncControl);
    renderKeys();
  }

  /** Ask the server whom the key belongs to, enable what it allows, (re)open the live channel
      with it and load what it may see. */
  async function signIn() {
    if (!apiKey.get()) {
      setIdentity("none");
      openChannel();
      return;
    }
    setIdentity("checking");
    try {
      setIdentity("known", await api("GET", "/api/auth/whoami"));
    } catch (error) {
      setIdentity("unknown");
      showMessage(error.message, "error");
      if (error.status === 401) { // a refused key: more calls would only count more failed authentications
        state.refusedKey = apiKey.get();
        openChannel();
        renderVersionList(error.message);
        renderKeys(error.message);
        return;
      }
    }
    openChannel();
    await Promise.all([loadVersions(), loadKeys()]);
  }

  function saveKey(event) {
    event.preventDefault();
    const input = $("api-key");
    const key = input.value.trim();
    input.value = "";
    if (!key) {
      showMessage("Paste an API key first.", "error");
      return;
    }
    apiKey.set(key);
    state.refusedKey = null;
    showMessage("Key kept for this browser tab only.", "success");
    signIn();
  }

  function forgetKey() {
    apiKey.clear();
    $("api-key").value = "";
    setIdentity("none");
    state.versionList = [];
    state.verified.clear();
    renderVersionList("An API key (read) is needed to list versions.");
    showMessage("Key forgotten.", "info");
    openChannel();
  }

  // ---------------------------------------------------------------- REST

  class ApiError extends Error {
    constructor(status, code, message, serverMessage) {
      super(message);
      this.status = status;
      this.code = code;
      this.serverMessage = serverMessage;
    }
  }

  function describeFailure(status, serverMessage, retryAfter) {
    const retry = retryAfter ? `retry in ${retryAfter} s` : "retry shortly";
    switch (status) {
      case 401: return "Key missing or invalid (401): paste a valid API key.";
      case 403: return "This key lacks the permission for this action (403).";
      case 429: return `Rate limited (429): ${retry}.`;
      case 503: return `Service unavailable (503): ${serverMessage}; ${retry}.`;
      case 409: return `Refused (409): ${serverMessage}`;
      default: return `Error ${status}: ${serverMessage}`;
    }
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    const key = apiKey.get();
    if (key) headers["X-API-Key"] = key;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: "no-store" });
    } catch {
      throw new ApiError(0, "network", "Network error: the server could not be reached.", "");
    }
    const payload = await response.json().catch(() => ({}));
    if (!response.ok) {
      const error = payload.error || {};
      const serverMessage = error.message || response.statusText || "request failed";
      throw new ApiError(response.status, error.code, describeFailure(response.status, serverMessage, response.headers.get("Retry-After")), serverMessage);
    }
    return payload;
  }

  /** Run `work` with `button` disabled; any failure goes to the status area. */
  async function withButton(button, work) {
    if (button) button.disabled = true;
    try {
      await work();
    } catch (error) {
      showMessage(error.message, "error");
    } finally {
      if (button) syncControl(button);
    }
  }

  /** A REST action: confirm (when asked), call, report success, then `after`. */
  function act(button, { confirmText, method = "POST", path, body, success, after }) {
    if (confirmText && !window.confirm(confirmText)) return Promise.resolve();
    return withButton(button, async () => {
      const result = await api(method, path, body);
      showMessage(success(result), "success");
      if (after) await after(result);
    });
  }

  // ---------------------------------------------------------------- charts

  function lineChart(canvasId, datasets, { xTicks, xTitle, yMax, y1 } = {}) {
    const scales = {
      x: {
        type: "linear", grid: { color: COLORS.grid }, ticks: { maxTicksLimit: 5, maxRotation: 0, callback: xTicks },
        title: { display: Boolean(xTitle), text: xTitle },
      },
      y: { max: yMax, beginAtZero: true, grid: { color: COLORS.grid }, ticks: { maxTicksLimit: 5 } },
    };
    if (y1) scales.y1 = { position: "right", min: 0, max: 1, grid: { drawOnChartArea: false }, ticks: { maxTicksLimit: 5 } };
    charts[canvasId] = new Chart($(canvasId), {
      type: "line",
      data: {
        datasets: datasets.map(({ label, color, yAxisID = "y", dashed = false, points = false }) => ({
          label, yAxisID, data: [], borderColor: color, backgroundColor: color,
          borderWidth: 2, borderDash: dashed ? [6, 4] : [], pointRadius: points ? 3 : 0, tension: 0.25, spanGaps: false,
        })),
      },
      options: {
        animation: false,
        responsive: true,
        maintainAspectRatio: false,
        interaction: { mode: "index", intersect: false },
        plugins: {
          legend: { display: datasets.length > 1, labels: { boxWidth: 12, boxHeight: 2 } },
          tooltip: { callbacks: { title: (items) => (items.length ? `${xTitle || ""} ${xTicks(items[0].parsed.x, 0)}`.trim() : "") } },
        },
        scales,
      },
    });
  }

  /** Tick labels for a time axis: blank on an empty chart's default 0..1 axis and where a label
      would repeat the previous one (ticks closer than a second). */
  function timeTicks(ms, index, ticks) {
    const label = (value) => (value > 1e12 ? new Date(value).toLocaleTimeString("en-GB", { hour12: false }) : "");
    return index > 0 && ticks && label(ticks[index - 1].value) === label(ms) ? "" : label(ms);
  }

  function createCharts() {
    Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
    Chart.defaults.color = COLORS.text;
    lineChart("chart-throughput", [{ label: "predictions/s", color: COLORS.blue }], { xTicks: timeTicks });
    lineChart("chart-latency", [
      { label: "p50", color: COLORS.teal },
      { label: "p95", color: COLORS.amber },
      { label: "p99", color: COLORS.red },
    ], { xTicks: timeTicks });
    lineChart("chart-errors", [{ label: "error rate", color: COLORS.red }], { xTicks: timeTicks });
    lineChart("chart-confidence", [
      { label: "mean", color: COLORS.violet },
      { label: "min", color: COLORS.slate, dashed: true },
    ], { xTicks: timeTicks, yMax: 1 });
    lineChart("chart-rollout", [
      { label: "production confidence", color: COLORS.blue },
      { label: "candidate confidence", color: COLORS.amber },
      { label: "production error rate", color: COLORS.slate, dashed: true },
      { label: "candidate error rate", color: COLORS.red, dashed: true },
    ], { xTicks: timeTicks, yMax: 1 });
    lineChart("chart-quality", [
      { label: "production accuracy", color: COLORS.blue, points: true },
      { label: "production validation", color: COLORS.blue, dashed: true },
      { label: "other version accuracy", color: COLORS.amber, points: true },
      { label: "other version validation", color: COLORS.amber, dashed: true },
    ], { xTicks: timeTicks, yMax: 1 });
    lineChart("chart-calibration", [
      { label: "observed accuracy", color: COLORS.violet, points: true },
      { label: "perfectly calibrated", color: COLORS.slate, dashed: true },
    ], { xTicks: (value) => fixed(value, 1), xTitle: "confidence", yMax: 1 });
    lineChart("chart-drift", [
      { label: "drift score", color: COLORS.blue },
      { label: "threshold", color: COLORS.red, dashed: true },
    ], { xTicks: timeTicks });
    lineChart("chart-training", [
      { label: "train loss", color: COLORS.blue },
      { label: "val loss", color: COLORS.amber },
      { label: "val accuracy", color: COLORS.teal, yAxisID: "y1" },
      { label: "train accuracy", color: COLORS.violet, yAxisID: "y1", dashed: true },
    ], { xTicks: String, xTitle: "epoch", y1: true });
  }

  /** Append one point per dataset (values in dataset order) and keep the last MAX_POINTS; the
      x axis spans the points kept, and at least MIN_SPAN_MS so that a fresh page reads as time. */
  function appendPoint(chartId, x, values) {
    const chart = charts[chartId];
    chart.data.datasets.forEach((dataset, index) => {
      dataset.data.push({ x, y: isNumber(values[index]) ? values[index] : null });
      if (dataset.data.length > MAX_POINTS) dataset.data.shift();
    });
    Object.assign(chart.options.scales.x, { min: Math.min(chart.data.datasets[0].data[0].x, x - MIN_SPAN_MS), max: x });
    chart.update("none");
  }

  /** Replace every dataset's points: `series[i]` is dataset i's [{x, y}]. */
  function replacePoints(chartId, series) {
    const chart = charts[chartId];
    chart.data.datasets.forEach((dataset, index) => { dataset.data = series[index]; });
    chart.update("none");
  }

  // ---------------------------------------------------------------- topics

  function renderMode(mode) {
    const tone = { inference: "ok", training: "info", maintenance: "warn" }[mode.mode] || "wait";
    setPill("mode", mode.mode, tone);
    setPill("mode-badge", mode.mode, tone);
    const since = mode.changed_at ? `since ${dateTime(mode.changed_at)} ` : "";
    setText("mode-detail", `${since}by ${mode.changed_by || "system"}: ${mode.reason || "no reason given"}. `
      + `Predictions ${mode.serves_predictions ? "served" : "paused"}; training ${mode.allows_training ? "allowed" : "refused"}.`);
    for (const button of document.querySelectorAll("[data-mode]")) {
      button.setAttribute("aria-pressed", String(button.dataset.mode === mode.mode));
    }
  }

  function renderVersions(versions) {
    const known = "production_version" in state.versions;
    const changed = versions.production_version !== state.versions.production_version
      || versions.serving_version !== state.versions.serving_version;
    state.versions = versions;
    setText("serving-version", versions.serving_version || "–");
    setText("production-version", versions.production_version || "–");
    if (known && changed && allows("read")) loadVersions(); // the first one is loaded at start
  }

  /** A check is a boolean, or an object whose `ok` (or every boolean field) says whether it passed. */
  function checkPassed(value) {
    if (typeof value === "boolean") return value;
    if (value && typeof value === "object") return "ok" in value ? Boolean(value.ok) : Object.values(value).every((v) => v !== false);
    return true;
  }

  function renderHealth(health) {
    const tone = health.ready ? "ok" : "bad";
    const label = health.ready ? "ready" : "not ready";
    setPill("health-status", label, tone);
    setPill("health-badge", label, tone);
    $("health-reasons").replaceChildren(...(health.reasons || []).map((reason) => el("li", {}, reason)));
    $("health-checks").replaceChildren(...Object.entries(health.checks || {}).map(([name, value]) => {
      const passed = checkPassed(value);
      return el("li", { class: passed ? "check-ok" : "check-bad", "data-check": name },
        el("span", { "aria-hidden": "true" }, passed ? "✓ " : "✗ "), name.replaceAll("_", " "),
        el("span", { class: "sr-only" }, passed ? " passed" : " failed"));
    }));
  }

  function renderResources(r) {
    const hours = Math.floor(r.uptime_minutes / 60);
    setText("resource-uptime", hours ? `${hours} h ${r.uptime_minutes % 60} min` : `${r.uptime_minutes} min`);
    setText("resource-memory", `${count(r.worker_memory_mb)} MB`);
    setText("resource-database", `${fixed(r.database_mb, 1)} MB`);
    setText("resource-artifacts", `${fixed(r.artifacts_mb, 1)} MB`);
    setText("resource-disk", `${fixed(r.disk_free_gb, 1)} GB`);
    setText("resource-versions", `${count(r.versions)} (${fixed(r.average_model_kb, 1)} kB)`);
    setText("resource-batching", batchingText(r.batching));
  }

  function batchingText(batching) {
    if (!batching) return "off";
    const limits = `≤ ${count(batching.max_rows)} rows, ${fixed(batching.max_delay_ms, 1)} ms`;
    return isNumber(batching.requests_per_pass) ? `${limits} · ${fixed(batching.requests_per_pass, 1)} requests per pass` : limits;
  }

  function renderStats(stats) {
    setText("total-predictions", count(stats.total_predictions));
    setText("error-rate", percent(stats.error_rate, 2));
    setText("error-count", `${count(stats.error_count)} errors in total`);
    setText("throughput", `${fixed(stats.throughput_per_second)} /s`);
    setText("latency-p95", isNumber(stats.latency_ms?.p95) ? `${fixed(stats.latency_ms.p95)} ms` : "–");
    const classes = Object.entries(stats.class_distribution || {});
    setText("class-distribution", classes.length ? `Classes in window: ${classes.map(([name, n]) => `${name} ${n}`).join(" · ")}` : "");
    const at = epochMs(stats.timestamp) || Date.now();
    const latency = stats.latency_ms || {};
    const confidence = stats.confidence || {};
    appendPoint("chart-throughput", at, [stats.throughput_per_second]);
    appendPoint("chart-latency", at, [latency.p50, latency.p95, latency.p99]);
    appendPoint("chart-errors", at, [stats.window?.error_rate]);
    appendPoint("chart-confidence", at, [confidence.mean, confidence.min]);
  }

  function renderDrift(drift) {
    if (!drift.evaluated) setPill("drift-verdict", "not evaluated", "wait");
    else if (drift.drift_detected) setPill("drift-verdict", "drift detected", "bad");
    else setPill("drift-verdict", "no drift", "ok");
    const parts = [`score ${fixed(drift.drift_score)} / threshold ${fixed(drift.threshold)}`];
    if (drift.fired?.length) parts.push(`fired: ${drift.fired.join(", ")}`);
    if (isNumber(drift.dataset_drift_share)) parts.push(`features drifted: ${percent(drift.dataset_drift_share, 0)}`);
    if (!drift.evaluated) parts.push(drift.reason || "waiting for the first drift check");
    if (drift.checked_at) parts.push(`checked ${clock(drift.checked_at)}`);
    setText("drift-detail", parts.join(" · "));
    const features = Object.entries(drift.features || {});
    $("drift-features").hidden = !features.length;
    $("drift-features").querySelector("tbody").replaceChildren(...features.map(([name, f]) =>
      el("tr", { class: f.drift_detected ? "row-bad" : null, "data-feature": name },
        el("th", { scope: "row" }, name), el("td", {}, f.test), el("td", {}, fixed(f.statistic, 3)),
        el("td", {}, pValue(f.p_value)), el("td", {}, f.drift_detected ? "yes" : "no"))));
    const history = drift.history || [];
    replacePoints("chart-drift", [
      history.map((h) => ({ x: epochMs(h.at), y: h.drift_score })),
      history.map((h) => ({ x: epochMs(h.at), y: drift.threshold })),
    ]);
  }

  function jobSummary(job) {
    const parts = [`by ${job.created_by || "unknown"}`];
    const last = job.progress?.[job.progress.length - 1];
    if (last) parts.push(`val loss ${fixed(last.val_loss, 3)}`, `accuracy ${percent(last.accuracy)}`);
    if (job.result_version) parts.push(`saved as ${job.result_version}`);
    if (job.cancel_requested && ACTIVE_JOB_STATES.has(job.status)) parts.push("cancel requested");
    if (job.error) parts.push(job.error);
    return parts.join(" · ");
  }

  function jobItem(job) {
    const tone = { succeeded: "ok", failed: "bad", cancelled: "warn", running: "info" }[job.status] || "wait";
    const active = ACTIVE_JOB_STATES.has(job.status);
    const selected = job.id === state.selectedJobId;
    return el("li", { class: selected ? "job job-selected" : "job", "data-job-id": job.id, "data-status": job.status },
      el("div", { class: "job-head" },
        el("code", {}, job.id),
        el("span", { class: `pill pill-${tone} job-status` }, job.status),
        el("span", { class: "job-epochs" }, `epoch ${job.epoch} / ${job.total_epochs}`)),
      el("progress", { max: 100, value: job.percent, "aria-label": `${job.id} progress` }, `${job.percent}%`),
      el("p", { class: "muted small" }, jobSummary(job)),
      el("div", { class: "button-row" },
        el("button", { type: "button", class: "secondary small-button", "data-job-action": "curves", "data-job": job.id,
          "aria-pressed": String(selected) }, "Show curves"),
        active ? actionButton("write", { class: "danger small-button", "data-job-action": "cancel", "data-job": job.id }, "Cancel")
          : null));
  }

  function renderTrainingChart() {
    const job = state.jobs.find((j) => j.id === state.selectedJobId);
    const progress = job?.progress || [];
    const series = (field) => progress.map((p) => ({ x: p.epoch, y: p[field] ?? null }));
    replacePoints("chart-training", ["train_loss", "val_loss", "accuracy", "train_accuracy"].map(series));
    setText("training-chart-caption", job ? `Loss and accuracy per epoch · ${job.id}` : "Loss and accuracy per epoch");
  }

  function renderTraining(training) {
    state.jobs = training.jobs || [];
    if (!state.jobs.some((j) => j.id === state.selectedJobId)) state.selectedJobId = state.jobs[0]?.id ?? null;
    const list = $("jobs");
    if (!state.jobs.length) list.replaceChildren(el("li", { class: "muted" }, "no training jobs yet"));
    else list.replaceChildren(...state.jobs.map(jobItem));
    renderTrainingChart();
    // A finished job saves a new version: refresh the list when one appears.
    const resultVersions = state.jobs.map((j) => j.result_version || "").join(",");
    if (resultVersions !== state.resultVersions) {
      state.resultVersions = resultVersions;
      if (allows("read")) loadVersions();
    }
  }

  function renderAlerts(payload) {
    const alerts = payload.alerts || [];
    const tone = { critical: "bad", error: "bad", warning: "warn", info: "info" };
    $("alerts").replaceChildren(...(alerts.length ? alerts.map((alert) =>
      el("li", { class: alert.resolved_at ? "alert resolved" : "alert", "data-kind": alert.kind, "data-severity": alert.severity },
        el("div", { class: "alert-head" },
          el("span", { class: `pill pill-${tone[alert.severity] || "wait"}` }, alert.severity),
          el("strong", {}, alert.kind),
          el("time", { datetime: alert.at }, dateTime(alert.at)),
          alert.resolved_at ? el("span", { class: "muted small" }, `resolved ${clock(alert.resolved_at)}`) : null),
        el("p", {}, alert.message)))
      : [el("li", { class: "muted" }, "no alerts")]));
  }

  const CRITERIA = {
    max_error_rate_increase: "error rate increase", max_latency_p95_ratio: "p95 latency ratio",
    max_confidence_drop: "confidence drop", max_prediction_distance: "prediction distance",
    max_disagreement_rate: "disagreement rate", max_accuracy_drop: "accuracy drop (labels)",
  };

  function renderRollout(payload) {
    const rollout = payload.rollout;
    const active = Boolean(rollout && ["running", "held"].includes(rollout.status));
    for (const id of ["canary-promote", "canary-abort"]) {
      $(id).toggleAttribute("data-moot", !active);
      syncControl($(id));
    }
    if (!rollout) {
      setPill("rollout-status", "no canary yet", "wait");
      setText("rollout-detail", "Start one with POST /api/model/canary/{version} or flask rollout start.");
      setText("rollout-reason", "");
      $("rollout-arms").hidden = true;
      $("rollout-checks").replaceChildren();
      replacePoints("chart-rollout", [[], [], [], []]);
      return;
    }
    const tone = { running: "info", held: "warn", promoted: "ok", aborted: "bad" }[rollout.status] || "wait";
    setPill("rollout-status", rollout.paused ? `${rollout.status} (paused: maintenance)` : rollout.status, tone);
    const share = rollout.mode === "shadow" ? `shadows ${rollout.percent}% of` : `answers ${rollout.percent}% of`;
    setText("rollout-detail", `${rollout.mode}: ${rollout.version} ${share} predictions beside production ${rollout.production_version}`
      + ` · decides after ${rollout.min_predictions} predictions (${rollout.on_success} / ${rollout.on_failure})`
      + ` · started ${dateTime(rollout.started_at)} by ${rollout.started_by}`);
    setText("rollout-reason", rollout.reason ? `${rollout.verdict || "decided by hand"}: ${rollout.reason}` : "");
    const shadow = rollout.shadow;
    setText("rollout-shadow", shadow ? `on the same inputs: ${percent(shadow.agreement_rate)} agreement over ${shadow.rows} rows`
      + ` · ${shadow.errors} failed · ${shadow.dropped} copies dropped` : "");
    const confusion = shadow ? Object.entries(shadow.confusion) : [];
    const classes = [...new Set(confusion.flatMap(([, row]) => Object.keys(row)).concat(confusion.map(([name]) => name)))].sort();
    $("rollout-confusion").hidden = !confusion.length;
    $("rollout-confusion").querySelector("thead").replaceChildren(el("tr", {},
      el("th", { scope: "col" }, "production ↓ / candidate →"), ...classes.map((name) => el("th", { scope: "col" }, name))));
    $("rollout-confusion").querySelector("tbody").replaceChildren(...confusion.map(([name, row]) =>
      el("tr", { "data-class": name }, el("th", { scope: "row" }, name),
        ...classes.map((other) => el("td", { class: other === name ? "" : (row[other] ? "row-bad" : "") }, String(row[other] || 0))))));
    const arms = rollout.arms ? [["production", rollout.arms.production], ["candidate", rollout.arms.candidate]] : [];
    $("rollout-arms").hidden = !arms.length;
    $("rollout-arms").querySelector("tbody").replaceChildren(...arms.map(([arm, a]) =>
      el("tr", { "data-arm": arm },
        el("th", { scope: "row" }, arm), el("td", {}, a.version), el("td", {}, String(a.predictions)),
        el("td", {}, percent(a.error_rate)), el("td", {}, isNumber(a.latency_p95_ms) ? `${fixed(a.latency_p95_ms)} ms` : "–"),
        el("td", {}, fixed(a.confidence_mean, 3)))));
    $("rollout-checks").replaceChildren(...rollout.checks.map((c) =>
      el("li", { class: c.passed === false ? "check-bad" : c.passed ? "check-ok" : "check-wait", "data-criterion": c.name },
        `${CRITERIA[c.name] || c.name}: ${isNumber(c.observed) ? fixed(c.observed, 3) : "–"} (limit ${c.limit})`)));
    const points = rollout.history || [];
    const series = (arm, field) => points.map((p) => ({ x: epochMs(p.at), y: p[arm][field] ?? null }));
    replacePoints("chart-rollout", [series("production", "confidence_mean"), series("candidate", "confidence_mean"),
      series("production", "error_rate"), series("candidate", "error_rate")]);
  }

  /** Production's accuracy against the alert's floor, every version's numbers, production's
      confusion matrix, accuracy over the window (production and the newest other version,
      each with its validation accuracy as a dashed line) and production's calibration. */
  function renderQuality(payload) {
    const report = payload.quality;
    const check = report ? report.check : null;
    if (!report) {
      setPill("quality-verdict", "no quality check yet", "wait");
      setText("quality-detail", "Send true classes to POST /api/feedback by the ids of the predictions.");
    } else {
      const tone = check.below_floor ? "bad" : check.evaluated ? "ok" : "wait";
      setPill("quality-verdict", check.below_floor ? "below the floor" : check.evaluated ? "at or above the floor" : "not enough labels", tone);
      setText("quality-detail", `${check.version || "–"} over the last ${report.window}: accuracy ${fixed(check.accuracy, 3)}`
        + ` on ${count(check.labelled)} labels (${check.min_labels} needed) · floor ${fixed(check.floor, 3)}`
        + ` · checked ${clock(report.until)}`);
    }
    const versions = report ? report.versions : [];
    $("quality-versions").hidden = !versions.length;
    $("quality-versions").querySelector("tbody").replaceChildren(...versions.map((v) =>
      el("tr", { "data-version": v.version },
        el("th", { scope: "row" }, v.version), el("td", {}, count(v.labelled)), el("td", {}, percent(v.coverage)),
        el("td", {}, fixed(v.accuracy, 3)), el("td", {}, fixed(v.validation_accuracy, 3)), el("td", {}, fixed(v.macro_f1, 3)),
        el("td", {}, fixed(v.log_loss, 3)), el("td", {}, fixed(v.expected_calibration_error, 3)))));
    const production = versions.find((v) => v.version === report.production_version) || null;
    const other = versions.find((v) => v !== production && v.labelled > 0) || null;
    renderConfusion(production);
    const chart = charts["chart-quality"];
    [production ? production.version : "production", other ? other.version : "other version"].forEach((name, i) => {
      chart.data.datasets[2 * i].label = `${name} accuracy`;
      chart.data.datasets[2 * i + 1].label = `${name} validation`;
    });
    const timeline = (v) => (v ? v.timeline.map((p) => ({ x: epochMs(p.start), y: p.accuracy })) : []);
    const reference = (v) => (v && isNumber(v.validation_accuracy) && report
      ? [{ x: epochMs(report.since), y: v.validation_accuracy }, { x: epochMs(report.until), y: v.validation_accuracy }] : []);
    replacePoints("chart-quality", [timeline(production), reference(production), timeline(other), reference(other)]);
    const bins = production ? production.calibration.filter((b) => b.count > 0) : [];
    replacePoints("chart-calibration", [bins.map((b) => ({ x: b.confidence_mean, y: b.accuracy })),
      [{ x: 0, y: 0 }, { x: 1, y: 1 }]]);
  }

  function renderConfusion(version) {
    const table = $("quality-confusion");
    table.hidden = !version || !version.labelled;
    if (table.hidden) return;
    table.querySelector("thead").replaceChildren(el("tr", {}, el("th", { scope: "col" }, `${version.version}: true ↓ / predicted →`),
      ...version.classes.map((name) => el("th", { scope: "col" }, name))));
    table.querySelector("tbody").replaceChildren(...version.confusion_matrix.map((row, i) =>
      el("tr", { "data-class": version.classes[i] }, el("th", { scope: "row" }, version.classes[i]),
        ...row.map((n, j) => el("td", { class: i !== j && n ? "row-bad" : "" }, String(n))))));
  }

  function decideCanary(decision) {
    return (event) => act(event.currentTarget, {
      confirmText: decision === "promote" ? "Promote the canary's candidate to production now?" : "Abort the canary?",
      path: `/api/model/canary/${decision}`,
      body: { reason: `${decision === "promote" ? "promoted" : "aborted"} from the dashboard` },
      success: (r) => (decision === "promote" ? `Promoted ${r.version} to production.` : `Aborted the canary of ${r.version}.`),
    });
  }

  const RENDER = {
    mode: renderMode, versions: renderVersions, health: renderHealth, stats: renderStats,
    drift: renderDrift, training: renderTraining, alerts: renderAlerts, rollout: renderRollout, quality: renderQuality,
    resources: renderResources,
  };

  /** Show what needs a permission only while the channel sends it (a snapshot holds exactly
      the topics this page may receive; an "access" event says when that changes). */
  function setChannelTopics(topics) {
    state.topics = new Set(topics);
    const rollout = state.topics.has("rollout");
    $("rollout-note").hidden = rollout;
    $("rollout-body").hidden = !rollout;
    const quality = state.topics.has("quality");
    $("quality-note").hidden = quality;
    $("quality-body").hidden = !quality;
    const training = state.topics.has("training");
    $("training-note").hidden = training;
    $("jobs").hidden = !training;
    $("training-figure").hidden = !training;
    if (!training) {
      state.jobs = [];
      state.selectedJobId = null;
      state.resultVersions = "";
      $("jobs").replaceChildren(el("li", { class: "muted" }, "no training jobs yet"));
      renderTrainingChart();
    }
  }

  function applySnapshot(snapshot) {
    setChannelTopics(Object.keys(snapshot));
    for (const topic of TOPICS) if (snapshot[topic]) RENDER[topic](snapshot[topic]);
  }

  /** The server re-checks the channel's key: once revoked or expired, the page is public only
      (as after a refused sign-in, without asking the server again). */
  function applyAccess(access) {
    setChannelTopics(access.topics);
    if (!access.permissions.length && state.channelKey) {
      state.refusedKey = state.channelKey; // a reconnection goes on without it
      const note = "This key is no longer valid (revoked or expired): paste a valid key.";
      setIdentity("unknown");
      state.versionList = [];
      state.verified.clear();
      renderVersionList(note);
      renderKeys(note);
      showMessage(`${note} The live view is public only.`, "error");
    }
  }

  // ---------------------------------------------------------------- version list (needs a key)

  function metricsText(metrics) {
    const preferred = ["accuracy", "val_loss"].filter((name) => name in metrics);
    const names = preferred.length ? preferred : Object.keys(metrics).slice(0, 3);
    return names.map((name) => `${name} ${fixed(metrics[name], 3)}`).join(" · ") || "–";
  }

  function verifyMark(version) {
    if (!state.verified.has(version)) return null;
    const ok = state.verified.get(version);
    return el("span", { class: ok ? "verify-ok" : "verify-bad", "data-verify-result": version, title: ok ? "hash matches" : "hash mismatch" },
      ok ? "✓" : "✗");
  }

  function versionRow(info) {
    const { version } = info;
    const isProduction = version === state.versions.production_version;
    const isServing = version === state.versions.serving_version;
    const button = (action, label, permission, extra = {}) =>
      actionButton(permission, { class: "small-button", "data-action": action, "data-version": version, ...extra }, label);
    return el("tr", { "data-version": version },
      el("th", { scope: "row" }, el("span", { class: "mono" }, version),
        isProduction ? el("span", { class: "pill pill-ok tag-pill" }, "production") : null,
        isServing ? el("span", { class: "pill pill-info tag-pill" }, "serving") : null,
        info.archived ? el("span", { class: "pill pill-wait tag-pill" }, "archived") : null),
      el("td", {}, dateTime(info.created_at), el("div", { class: "muted small" }, info.created_by || "")),
      el("td", {}, metricsText(info.metrics || {})),
      el("td", {}, ...(info.tags || []).map((tag) => el("span", { class: "tag" }, tag))),
      el("td", { class: "nowrap" }, el("code", { title: info.sha256 }, (info.sha256 || "").slice(0, 12)), " ",
        button("verify", "Verify", "read", { class: "secondary small-button", "aria-label": `verify the hash of ${version}` }), " ",
        verifyMark(version)),
      el("td", { class: "nowrap" },
        button("load", "Load", "admin", { "data-moot": isServing, "aria-label": `serve ${version} without promoting` }), " ",
        button("promote", "Promote", "admin", { "data-moot": isProduction, "aria-label": `promote ${version} to production` })));
  }

  function renderVersionList(note) {
    const table = $("versions");
    table.querySelector("tbody").replaceChildren(...[...state.versionList].reverse().map(versionRow));
    table.hidden = Boolean(note);
    $("versions-note").hidden = !note;
    if (note) setText("versions-note", note);
  }

  async function loadVersions() {
    if (!allows("read")) return;
    try {
      const body = await api("GET", "/api/model/versions");
      state.versionList = body.versions;
      state.versions = { ...state.versions, production_version: body.production_version, serving_version: body.serving_version };
      setText("serving-version", body.serving_version || "–");
      setText("production-version", body.production_version || "–");
      renderVersionList(body.versions.length ? null : "No versions saved yet.");
    } catch (error) {
      state.versionList = [];
      renderVersionList(error.message);
      showMessage(error.message, "error");
    }
  }

  // ---------------------------------------------------------------- actions

  const quote = encodeURIComponent;

  function versionAction(button) {
    const { action, version } = button.dataset;
    if (action === "verify") return verifyVersion(button, version);
    const verbs = {
      load: { confirmText: `Serve version ${version} on every worker (production stays as it is)?`, path: `/api/model/load/${quote(version)}`,
        success: () => `Version ${version} is now being served.` },
      promote: { confirmText: `Promote version ${version} to production? Every worker will serve it.`, path: `/api/model/promote/${quote(version)}`,
        success: (r) => (r.changed ? `Version ${version} promoted to production (was ${r.previous_version || "none"}).` : r.message) },
    };
    return act(button, { ...verbs[action], after: loadVersions });
  }

  function verifyVersion(button, version) {
    return withButton(button, async () => {
      const info = await api("GET", `/api/model/versions/${quote(version)}?verify=true`);
      const ok = Boolean(info.integrity?.ok);
      state.verified.set(version, ok);
      renderVersionList(null);
      showMessage(ok ? `Version ${version}: hash verified ✓` : `Version ${version}: hash mismatch ✗`, ok ? "success" : "error");
    });
  }

  function rollback(event) {
    return act(event.currentTarget, {
      confirmText: "Roll production back to the version before it?",
      path: "/api/model/rollback",
      success: (r) => `Rolled back: production is ${r.production_version} (was ${r.previous_version}).`,
      after: loadVersions,
    });
  }

  async function switchMode(button) {
    const mode = button.dataset.mode;
    if (!window.confirm(`Switch the service to ${mode} mode?`)) return;
    const reason = $("mode-reason").value.trim() || "changed from the dashboard";
    await withButton(button, async () => {
      try {
        await api("POST", `/api/mode/${mode}`, { reason });
      } catch (error) {
        const force = error.code === "training_in_progress"
          && window.confirm(`${error.serverMessage}\n\nCancel the running job and switch to ${mode} anyway?`);
        if (!force) throw error;
        await api("POST", `/api/mode/${mode}`, { reason, force: true });
      }
      showMessage(`Mode switched to ${mode}.`, "success");
    });
  }

  function setBaseline(event) {
    return act(event.currentTarget, {
      confirmText: "Make the current monitoring window the drift baseline?",
      path: "/api/monitoring/baseline",
      success: (r) => `Baseline set from ${r.sample_count} predictions.`,
    });
  }

  function startTraining(event) {
    event.preventDefault();
    const epochs = Number($("epochs").value);
    if (!Number.isInteger(epochs) || epochs < 1 || epochs > 10000) {
      showMessage("Epochs must be a whole number from 1 to 10000.", "error");
      return;
    }
    act($("start-training"), {
      path: "/api/train",
      body: { epochs },
      success: (job) => `Training job ${job.id} started (${epochs} epochs).`,
      after: (job) => { state.selectedJobId = job.id; },
    });
  }

  function jobAction(button) {
    const jobId = button.dataset.job;
    if (button.dataset.jobAction === "curves") {
      state.selectedJobId = jobId;
      renderTraining({ jobs: state.jobs });
      return;
    }
    act(button, {
      confirmText: `Cancel training job ${jobId}? It stops at its next epoch.`,
      path: `/api/train/${quote(jobId)}/cancel`,
      success: () => `Cancel requested for ${jobId}.`,
    });
  }

  // ---------------------------------------------------------------- API keys (admin)

  function keyState(key) {
    if (key.revoked_at) return ["revoked", "bad"];
    return key.active ? ["active", "ok"] : ["expired", "wait"];
  }

  function keyRow(key) {
    const [label, tone] = keyState(key);
    const button = (action, text) => actionButton("admin", { class: `${action === "revoke" ? "danger" : "secondary"} small-button`,
      "data-key-action": action, "data-key-id": key.id, "aria-label": `${action} key ${key.name} (${key.id})` }, text);
    return el("tr", { "data-key-id": key.id, class: key.active ? null : "row-inactive" },
      el("th", { scope: "row" }, key.name,
        key.id === state.principal?.id ? el("span", { class: "pill pill-info tag-pill" }, "this page") : null),
      el("td", { "data-label": "ID" }, el("code", {}, key.id)),
      el("td", { "data-label": "Key" }, el("code", {}, key.display)),
      el("td", { "data-label": "Permissions" }, key.permissions.join(", "),
        key.rate_limit ? el("div", { class: "muted small" }, key.rate_limit) : null),
      el("td", { "data-label": "State" }, el("span", { class: `pill pill-${tone}`, "data-key-state": label }, label),
        key.rotated_to ? el("div", { class: "muted small" }, `replaced by ${key.rotated_to}`) : null),
      el("td", { "data-label": "Expires" }, key.expires_at ? dateTime(key.expires_at) : "never"),
      el("td", { "data-label": "Last used" }, key.last_used_at ? dateTime(key.last_used_at) : "never"),
      el("td", { class: "nowrap" }, ...(key.active ? [button("rotate", "Rotate"), " ", button("revoke", "Revoke")] : ["–"])));
  }

  /** The panel: the admin-needed note without the admin permission; else the keys (or `note`). */
  function renderKeys(note = null) {
    const admin = allows("admin");
    const text = admin ? note : KEYS_ADMIN_NOTE;
    $("keys-admin").hidden = !admin;
    $("keys").hidden = Boolean(text);
    $("keys-note").hidden = !text;
    if (text) setText("keys-note", text);
    const newestFirst = [...state.keys].sort((a, b) => epochMs(b.created_at) - epochMs(a.created_at));
    $("keys").querySelector("tbody").replaceChildren(...newestFirst.map(keyRow));
  }

  async function loadKeys() {
    if (!allows("admin")) return;
    try {
      state.keys = (await api("GET", "/api/auth/keys")).keys;
      renderKeys();
    } catch (error) {
      state.keys = [];
      renderKeys(error.message);
    }
  }

  /** The only time a key is shown: in a read-only field (never in any storage) until hidden. */
  function showNewKey(created) {
    setText("new-key-title", `New key for ${created.name} (${created.id})`);
    const field = $("new-key-value");
    field.value = created.api_key;
    $("new-key").hidden = false;
    field.focus();
    field.select();
  }

  function hideNewKey() {
    $("new-key-value").value = "";
    $("new-key").hidden = true;
  }

  async function copyNewKey() {
    const field = $("new-key-value");
    field.select();
    let copied;
    try {
      await navigator.clipboard.writeText(field.value);
      copied = true;
    } catch { // no clipboard API (plain HTTP) or no permission: the older way
      copied = document.execCommand("copy");
    }
    showMessage(copied ? "Key copied to the clipboard." : "Copying failed: the key is selected, copy it with Ctrl+C.",
      copied ? "success" : "error");
  }

  function createKey(event) {
    event.preventDefault();
    const form = event.currentTarget;
    const name = $("new-key-name").value.trim();
    const permissions = [...form.querySelectorAll("input[name=new-key-permission]:checked")].map((box) => box.value);
    const rateLimit = $("new-key-limit").value.trim();
    if (!name || !permissions.length) {
      showMessage("A new key needs a name and at least one permission.", "error");
      return;
    }
    act($("create-key"), {
      path: "/api/auth/keys",
      body: rateLimit ? { name, permissions, rate_limit: rateLimit } : { name, permissions },
      success: (created) => `Key ${created.name} (${created.id}) created: copy it now.`,
      after: (created) => {
        form.reset();
        showNewKey(created);
        return loadKeys();
      },
    });
  }

  /** The grace period in hours, or null (after saying why) when it is not 0 to MAX_GRACE_HOURS. */
  function graceHours() {
    const text = $("rotate-grace").value.trim();
    const hours = Number(text);
    if (text === "" || !Number.isFinite(hours) || hours < 0 || hours > MAX_GRACE_HOURS) {
      showMessage(`The rotation grace period must be 0 to ${MAX_GRACE_HOURS} hours.`, "error");
      return null;
    }
    return hours;
  }

  function keyAction(button) {
    const key = state.keys.find((k) => k.id === button.dataset.keyId);
    const label = `${key.name} (${key.id})`;
    const ownKey = key.id === state.principal?.id;
    if (button.dataset.keyAction === "revoke") {
      return act(button, {
        confirmText: `Revoke key ${label}? Every client using it is refused within seconds.`
          + (ownKey ? "\n\nThis page is signed in with this key and will lose access." : ""),
        method: "DELETE",
        path: `/api/auth/keys/${quote(key.id)}`,
        success: () => `Key ${label} revoked.`,
        after: loadKeys,
      });
    }
    const hours = graceHours();
    if (hours === null) return undefined;
    return act(button, {
      confirmText: `Rotate key ${label}? A replacement is issued; the old key keeps working for ${hours} h.`
        + (ownKey ? "\n\nThis page is signed in with this key: paste the replacement above before then." : ""),
      path: `/api/auth/keys/${quote(key.id)}/rotate`,
      body: { grace_seconds: Math.round(hours * 3600) },
      success: (created) => `Key ${label} rotated: the replacement is ${created.id}; copy it now.`,
      after: (created) => {
        showNewKey(created);
        return loadKeys();
      },
    });
  }

  /** Delegated clicks: `selector` inside `container` calls `handler(button)`. */
  function onClick(container, selector, handler) {
    container.addEventListener("click", (event) => {
      const button = event.target.closest(selector);
      if (button && container.contains(button) && !button.disabled) handler(button);
    });
  }

  function bindControls() {
    $("key-form").addEventListener("submit", saveKey);
    $("key-forget").addEventListener("click", forgetKey);
    $("rollback").addEventListener("click", rollback);
    $("refresh-versions").addEventListener("click", loadVersions);
    $("set-baseline").addEventListener("click", setBaseline);
    $("canary-promote").addEventListener("click", decideCanary("promote"));
    $("canary-abort").addEventListener("click", decideCanary("abort"));
    $("train-form").addEventListener("submit", startTraining);
    onClick(document.querySelector(".admin-block"), "button[data-mode]", switchMode);
    onClick($("versions"), "button[data-action]", versionAction);
    onClick($("jobs"), "button[data-job-action]", jobAction);
    $("key-create-form").addEventListener("submit", createKey);
    $("copy-key").addEventListener("click", copyNewKey);
    $("hide-key").addEventListener("click", hideNewKey);
    $("refresh-keys").addEventListener("click", loadKeys);
    onClick($("keys"), "button[data-key-action]", keyAction);
  }

  // ---------------------------------------------------------------- live channel

  function setConnection(status) {
    const labels = { live: ["live", "ok"], reconnecting: ["reconnecting…", "warn"], connecting: ["connecting…", "wait"] };
    const [text, tone] = labels[status];
    setPill("connection", text, tone);
    $("connection").dataset.state = status;
    document.body.dataset.connection = status;
  }

  let socket = null;

  /** The Socket.IO auth payload, asked for at every (re)connection: the current key, unless the
      server refused it (never in the URL, where it would reach logs). */
  function channelAuth(callback) {
    const key = apiKey.get();
    state.channelKey = key && key !== state.refusedKey ? key : null;
    callback(state.channelKey ? { apiKey: state.channelKey } : {});
  }

  function connect() {
    // WebSocket only: the workers have no sticky sessions, so long-polling would break.
    socket = io({ transports: ["websocket"], auth: channelAuth });
    socket.on("connect", () => setConnection("live"));
    socket.on("disconnect", (reason) => {
      setConnection("reconnecting");
      if (reason === "io server disconnect") socket.connect(); // the only case socket.io does not retry itself
    });
    socket.on("connect_error", (error) => {
      setConnection("reconnecting");
      if (socket.active || !state.channelKey) return; // a network failure: socket.io retries by itself
      state.refusedKey = state.channelKey; // the server refused the key: say why, go on with the public view
      showMessage(`The live channel refused the key (${error.message}); showing the public view.`, "error");
      socket.connect();
    });
    socket.io.on("reconnect", () => socket.emit("resync"));
    socket.on("snapshot", applySnapshot);
    socket.on("access", applyAccess);
    for (const topic of TOPICS) socket.on(topic, RENDER[topic]);
  }

  /** Connect, or reconnect so that the server sees the key the page now holds. */
  function openChannel() {
    if (!socket) {
      connect();
      return;
    }
    socket.disconnect();
    socket.connect();
  }

  function start() {
    createCharts();
    bindControls();
    setConnection("connecting");
    signIn(); // opens the channel once it knows which key to send
  }

  start();
})();
