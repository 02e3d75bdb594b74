// procbridge dashboard: one server-sent event stream of snapshots (GET /v1/dashboard/events), read
// with fetch() so that the API key travels in the Authorization header (EventSource cannot send one);
// the key lives in this tab's sessionStorage only and never in a URL. Plain script, no build step;
// the charts are uPlot (uPlot.iife.min.js, see VENDORED.md). Every value from the service is written with textContent.
(function () {
  "use strict";

  const STREAM_URL = "/v1/dashboard/events";
  const KEY_STORE = "procbridge.dashboard.key";
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 15000;
  const SILENCE_MS = 45000; // no byte for this long: the connection is taken for dead and reopened
  const HIDDEN_CLOSE_MS = 30000; // a tab hidden this long stops watching (the stream costs only while watched)
  const MAX_BUFFER = 8 * 1024 * 1024;

  const $ = (id) => document.getElementById(id);

  // ---- the key: this tab's sessionStorage, the Authorization header, nowhere else ----------------
  function getKey() {
    try { return sessionStorage.getItem(KEY_STORE) || ""; } catch (_) { return ""; }
  }
  function setKey(key) {
    try {
      if (key) sessionStorage.setItem(KEY_STORE, key); else sessionStorage.removeItem(KEY_STORE);
    } catch (_) { /* storage refused: the key lasts as long as this page */ }
  }
  function authHeaders() {
    const key = getKey();
    return key ? { Authorization: "Bearer " + key } : {};
  }

  // ---- status line --------------------------------------------------------------------------
  function setStatus(kind, text) {
    const el = $("status");
    el.className = "status status-" + kind;
    el.textContent = text;
    el.dataset.state = kind;
    document.body.dataset.stream = kind; // the CSS dims the last data while it is not live
  }

  // ---- formatting ----------------------------------------------------------------------------
  const dash = "—";
  function fmtNum(v, digits) {
    return v === null || v === undefined || !isFinite(v) ? dash : Number(v).toFixed(digits);
  }
  function fmtMs(v) {
    if (v === null || v === undefined || !isFinite(v)) return dash;
    if (v >= 10000) return (v / 1000).toFixed(1) + " s";
    if (v >= 100) return v.toFixed(0) + " ms";
    if (v >= 10) return v.toFixed(1) + " ms";
    return v.toFixed(2) + " ms";
  }
  function fmtBytes(v) {
    if (v === null || v === undefined || !isFinite(v)) return dash;
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i === 0 ? v.toFixed(0) : v.toFixed(v >= 100 ? 0 : 1)) + " " + units[i];
  }
  function fmtAge(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return dash;
    seconds = Math.max(0, seconds);
    if (seconds < 60) return Math.floor(seconds) + " s ago";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min ago";
    if (seconds < 86400) return Math.floor(seconds / 3600) + " h ago";
    return Math.floor(seconds / 86400) + " d ago";
  }
  function fmtClock(epoch) {
    return epoch ? new Date(epoch * 1000).toLocaleTimeString() : dash;
  }
  function fmtLatency(l) {
    // "p50 · p95 · p99" with one unit: "21.3 · 40.1 · 61.0 ms"
    if (!l) return dash;
    const vals = [l.p50, l.p95, l.p99];
    const max = Math.max(...vals.filter((v) => v !== null && v !== undefined && isFinite(v)));
    if (!isFinite(max)) return dash;
    const seconds = max >= 10000;
    const digits = seconds ? 1 : max >= 100 ? 0 : max >= 10 ? 1 : 2;
    return vals.map((v) => (v === null || v === undefined || !isFinite(v) ? dash
      : (seconds ? v / 1000 : v).toFixed(digits))).join(" · ") + (seconds ? " s" : " ms");
  }
  function setText(el, text) {
    text = String(text);
    if (el.textContent !== text) el.textContent = text;
  }
  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // ---- charts (uPlot) -------------------------------------------------------------------------
  let window_s = 300;
  let lastAt = 0;
  const charts = { calls: null, latency: null };

  let firstT = null;
  function xRange() {
    // The last window_s seconds; while the service has less history than that, what it has (≥ 30 s).
    const hi = lastAt || Date.now() / 1000;
    const lo = firstT === null ? hi - 30 : Math.min(firstT, hi - 30);
    return [Math.max(hi - window_s, lo), hi];
  }
  function chartOpts(box, series, yLabel) {
    return {
      width: Math.max(200, box.clientWidth),
      height: 180,
      legend: { show: true, live: true },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true, range: () => xRange() }, y: { range: (u, min, max) => [0, Math.max(1, max || 0) * 1.1] } },
      axes: [{ stroke: "#8b949e", grid: { stroke: "rgba(139,148,158,0.15)" } },
             { stroke: "#8b949e", grid: { stroke: "rgba(139,148,158,0.15)" }, label: yLabel, size: 60 }],
      series: [{}].concat(series),
    };
  }
  function ensureCharts() {
    if (charts.calls || typeof window.uPlot !== "function") return;
    const callsBox = $("chart-calls");
    const latencyBox = $("chart-latency");
    charts.calls = new window.uPlot(chartOpts(callsBox, [
      { label: "calls/s", stroke: "#1f6feb", fill: "rgba(31,111,235,0.15)", width: 1.5, points: { show: false }, value: (u, v) => fmtNum(v, 0) },
    ], "calls/s"), [[], []], callsBox);
    charts.latency = new window.uPlot(chartOpts(latencyBox, [
      { label: "p50", stroke: "#2da44e", width: 1.5, points: { show: false }, value: (u, v) => fmtMs(v) },
      { label: "p99", stroke: "#d4a72c", width: 1.5, points: { show: false }, value: (u, v) => fmtMs(v) },
    ], "ms"), [[], [], []], latencyBox);
    if (typeof ResizeObserver === "function") {
      const ro = new ResizeObserver(() => {
        if (charts.calls) charts.calls.setSize({ width: Math.max(200, callsBox.clientWidth), height: 180 });
        if (charts.latency) charts.latency.setSize({ width: Math.max(200, latencyBox.clientWidth), height: 180 });
      });
      ro.observe(callsBox);
      ro.observe(latencyBox);
    }
  }
  function renderCharts(calls) {
    ensureCharts();
    if (!charts.calls) return;
    const rows = Array.isArray(calls.series) ? calls.series : []; // finished seconds only, oldest first
    const first = rows.find((row) => row[1] > 0); // a zero-filled window: zoom to where the calls are
    firstT = first ? first[0] : null;
    const xs = [], n = [], p50 = [], p99 = [];
    for (const row of rows) {
      xs.push(row[0]); n.push(row[1]); p50.push(row[2]); p99.push(row[3]);
    }
    charts.calls.setData([xs, n]);
    charts.latency.setData([xs, p50, p99]);
  }

  // ---- workers --------------------------------------------------------------------------------
  const workerRows = new Map(); // slot -> {tr, cells}
  const WORKER_COLS = ["slot", "pid", "state", "task", "cpu", "cpu-s", "rss", "done", "restarts"];

  function workerRow(slot) {
    let row = workerRows.get(slot);
    if (row) return row;
    const tr = el("tr");
    tr.dataset.slot = String(slot);
    const cells = {};
    for (const col of WORKER_COLS) {
      const td = el("td", "c-" + col + (col === "state" || col === "task" ? "" : " num"));
      if (col === "state") {
        cells.badge = el("span", "badge");
        td.appendChild(cells.badge);
      }
      cells[col] = td;
      tr.appendChild(td);
    }
    row = { tr, cells };
    workerRows.set(slot, row);
    return row;
  }
  function renderWorkers(workers) {
    const body = $("workers-body");
    const seen = new Set();
    let busy = 0;
    workers.slice().sort((a, b) => a.slot - b.slot).forEach((w, i) => {
      seen.add(w.slot);
      if (w.state === "busy") busy++;
      const { tr, cells } = workerRow(w.slot);
      tr.dataset.pid = w.pid === null || w.pid === undefined ? "" : String(w.pid);
      setText(cells.slot, w.slot);
      setText(cells.pid, w.pid === null || w.pid === undefined ? dash : w.pid);
      setText(cells.badge, w.state || dash);
      cells.badge.className = "badge state-" + String(w.state || "unknown").replace(/[^a-z_-]/gi, "");
      setText(cells.task, w.task || "");
      setText(cells.cpu, fmtNum(w.cpu_percent, 0));
      setText(cells["cpu-s"], fmtNum(w.cpu_seconds, 1));
      setText(cells.rss, fmtBytes(w.rss_bytes));
      setText(cells.done, w.tasks_done === undefined ? dash : w.tasks_done);
      setText(cells.restarts, w.restarts === undefined ? dash : w.restarts);
      if (body.children[i] !== tr) body.insertBefore(tr, body.children[i] || null);
    });
    for (const [slot, row] of workerRows) {
      if (!seen.has(slot)) { row.tr.remove(); workerRows.delete(slot); }
    }
    setText($("workers-busy"), busy + " / " + workers.length);
  }

  // ---- jobs -----------------------------------------------------------------------------------
  const jobRows = new Map(); // id -> {tr, cells, bar, fill, label, button}
  const CANCELLABLE = new Set(["queued", "running"]);

  function jobRow(id) {
    let row = jobRows.get(id);
    if (row) return row;
    const tr = el("tr");
    tr.dataset.jobId = id;
    const cells = {};
    for (const col of ["id", "task", "status", "progress", "priority", "attempts", "created", "action"]) {
      cells[col] = el("td", "c-" + col + (col === "priority" || col === "attempts" ? " num" : ""));
      tr.appendChild(cells[col]);
    }
    cells.id.appendChild(el("code", "", id)); // whole: time-ordered ids share their first characters
    const badge = el("span", "badge");
    cells.status.appendChild(badge);
    const bar = el("div", "bar");
    bar.setAttribute("role", "progressbar");
    bar.setAttribute("aria-valuemin", "0");
    bar.setAttribute("aria-valuemax", "100");
    const fill = el("div", "bar-fill");
    bar.appendChild(fill);
    const label = el("span", "bar-label");
    const wrap = el("div", "progress");
    wrap.appendChild(bar);
    wrap.appendChild(label);
    cells.progress.appendChild(wrap);
    const button = el("button", "cancel", "Cancel");
    button.type = "button";
    button.setAttribute("aria-label", "Cancel job " + id);
    button.addEventListener("click", () => cancelJob(id, button));
    row = { tr, cells, badge, bar, fill, label, button };
    jobRows.set(id, row);
    return row;
  }
  function jobPercent(job) {
    const p = job.progress;
    if (p && p.total > 0) return Math.max(0, Math.min(100, (100 * p.done) / p.total));
    return job.status === "succeeded" ? 100 : 0;
  }
  function updateJob(job, at) {
    const row = jobRow(job.id);
    const status = String(job.status || "");
    setText(row.cells.task, job.task || "");
    setText(row.badge, status || dash);
    row.badge.className = "badge status-" + status.replace(/[^a-z_-]/gi, "");
    const pct = jobPercent(job);
    const width = pct.toFixed(1) + "%";
    if (row.fill.style.width !== width) row.fill.style.width = width; // CSSOM: allowed by style-src 'self'
    row.fill.className = "bar-fill status-" + status.replace(/[^a-z_-]/gi, "");
    row.bar.setAttribute("aria-valuenow", pct.toFixed(0));
    const p = job.progress;
    let label = p ? (p.message || (p.done + "/" + p.total)) : (status === "succeeded" ? "done" : "");
    if (p && p.message && p.total > 0 && !/%/.test(p.message)) label = p.done + "/" + p.total + " " + p.message;
    setText(row.label, label);
    setText(row.cells.priority, job.priority === undefined || job.priority === null ? 0 : job.priority);
    setText(row.cells.attempts, job.attempts === undefined || job.attempts === null ? dash : job.attempts);
    setText(row.cells.created, fmtAge((at || Date.now() / 1000) - job.created_at));
    row.cells.created.title = job.created_at ? new Date(job.created_at * 1000).toLocaleString() : "";
    const cancellable = CANCELLABLE.has(status);
    if (cancellable && row.button.parentNode !== row.cells.action) {
      row.button.disabled = false;
      row.cells.action.appendChild(row.button);
    } else if (!cancellable && row.button.parentNode) {
      row.button.remove();
    }
    return row;
  }
  function renderJobs(jobs, counts, at) {
    const body = $("jobs-body");
    const seen = new Set();
    jobs.forEach((job, i) => {
      seen.add(job.id);
      const { tr } = updateJob(job, at);
      if (body.children[i] !== tr) body.insertBefore(tr, body.children[i] || null);
    });
    for (const [id, row] of jobRows) {
      if (!seen.has(id)) { row.tr.remove(); jobRows.delete(id); }
    }
    $("jobs-empty").hidden = jobs.length > 0;
    const parts = [];
    for (const [name, n] of Object.entries(counts || {})) if (n) parts.push(name + " " + n);
    setText($("job-counts"), parts.length ? "(" + parts.join(" · ") + ")" : "");
  }

  let flashTimer = null;
  function flash(text, kind) {
    const p = $("job-message");
    p.textContent = text;
    p.className = "flash " + (kind || "");
    p.hidden = false;
    clearTimeout(flashTimer);
    flashTimer = setTimeout(() => { p.hidden = true; }, 6000);
  }
  async function problemDetail(resp) {
    try {
      const body = await resp.json();
      return body.detail || body.title || "";
    } catch (_) { return ""; }
  }
  async function cancelJob(id, button) {
    button.disabled = true;
    let resp;
    try {
      resp = await fetch("/v1/jobs/" + encodeURIComponent(id), {
        method: "DELETE", headers: authHeaders(), cache: "no-store", credentials: "same-origin",
      });
    } catch (_) {
      button.disabled = false;
      flash("Could not reach the service to cancel job " + id + ".", "error");
      return;
    }
    if (resp.ok) {
      try { updateJob(await resp.json(), lastAt); } catch (_) { /* the next snapshot shows it */ }
      flash("Job " + id + " cancelled.", "ok");
    } else if (resp.status === 401) {
      unauthorized(await problemDetail(resp));
    } else {
      button.disabled = false;
      const detail = await problemDetail(resp);
      flash("Job " + id + " not cancelled (HTTP " + resp.status + (detail ? ": " + detail : "") + ").", "error");
    }
  }

  // ---- the whole snapshot ---------------------------------------------------------------------
  function render(snap) {
    lastAt = snap.at || Date.now() / 1000;
    const calls = snap.calls || {};
    window_s = calls.window_s || 300;
    $("data").hidden = false;
    $("meta").hidden = false;
    setText($("executor"), "executor: " + (snap.executor || dash));
    const ready = $("readiness");
    const readiness = snap.draining ? "draining" : snap.ready ? "ready" : "not ready";
    setText(ready, readiness);
    ready.className = "badge readiness-" + readiness.replace(" ", "-");
    setText($("updated"), "updated " + fmtClock(snap.at));
    setText($("pending"), snap.pending === undefined ? dash : snap.pending);
    setText($("calls-rate"), fmtNum(calls.rate_1m, calls.rate_1m >= 100 ? 0 : 1));
    setText($("latency-1m"), fmtLatency(calls.latency_ms_1m));
    setText($("latency-5m"), fmtLatency(calls.latency_ms_5m));
    const reasons = Object.entries(snap.restarts || {}).filter(([, n]) => n);
    setText($("restarts-total"), reasons.reduce((sum, [, n]) => sum + n, 0));
    setText($("restarts-detail"), reasons.map(([r, n]) => r + " " + n).join(" · "));
    const series = Array.isArray(calls.series) ? calls.series : [];
    const busy = series.find((row) => row[1] > 0);
    const span = busy ? Math.min(window_s, lastAt - busy[0]) : 0;
    const shown = span < 90 ? Math.max(30, Math.round(span)) + " s" : Math.round(span / 60) + " min";
    setText($("window-calls"), "(last " + shown + ")");
    setText($("window-latency"), "(last " + shown + ")");
    renderWorkers(Array.isArray(snap.workers) ? snap.workers : []);
    renderJobs(Array.isArray(snap.jobs) ? snap.jobs : [], snap.job_counts, snap.at);
    renderCharts(calls);
  }

  function clearData() {
    $("data").hidden = true;
    $("meta").hidden = true;
    for (const row of workerRows.values()) row.tr.remove();
    workerRows.clear();
    for (const row of jobRows.values()) row.tr.remove();
    jobRows.clear();
    for (const id of ["workers-busy", "pending", "calls-rate", "latency-1m", "latency-5m", "restarts-total",
                      "executor", "readiness", "updated"]) setText($(id), dash);
    for (const id of ["restarts-detail", "job-counts", "window-calls", "window-latency"]) setText($(id), "");
    if (charts.calls) { charts.calls.setData([[], []]); charts.latency.setData([[], [], []]); }
  }

  // ---- the stream -----------------------------------------------------------------------------
  let generation = 0;   // bumped by every connect/disconnect; a stale read loop sees it and stops
  let controller = null;
  let retryTimer = null;
  let backoff = BACKOFF_MIN_MS;
  let state = "idle";   // idle | connecting | connected | reconnecting | unauthorized

  function disconnect() {
    generation++;
    clearTimeout(retryTimer);
    retryTimer = null;
    if (controller) controller.abort();
    controller = null;
  }

  function scheduleReconnect(reason) {
    const delay = backoff * (0.75 + Math.random() * 0.5);
    backoff = Math.min(BACKOFF_MAX_MS, backoff * 2);
    state = "reconnecting";
    setStatus("reconnecting", "reconnecting in " + Math.max(1, Math.round(delay / 1000)) + " s (" + reason + ")");
    clearTimeout(retryTimer);
    retryTimer = setTimeout(connect, delay);
  }

  function askForKey(message) {
    $("key-message").textContent = message;
    $("key-panel").hidden = false;
    const input = $("key-input");
    input.value = "";
    input.focus();
  }

  function unauthorized(detail) {
    disconnect();
    clearData();
    state = "unauthorized";
    const hadKey = !!getKey();
    setKey("");
    setStatus("unauthorized", hadKey ? "401: the key was refused" : "401: an API key is needed");
    askForKey((hadKey ? "That key was refused (401 Unauthorized" : "This service needs an API key (401 Unauthorized")
      + (detail ? ": " + detail : "") + "). Enter a key; it is kept in this tab only (sessionStorage) and sent in "
      + "the Authorization header, never in a URL.");
  }

  async function connect() {
    disconnect();
    const gen = generation;
    const ctl = new AbortController();
    controller = ctl;
    state = "connecting";
    if ($("status").dataset.state !== "reconnecting") setStatus("connecting", "connecting…");
    let resp;
    try {
      resp = await fetch(STREAM_URL, {
        headers: Object.assign({ Accept: "text/event-stream" }, authHeaders()),
        cache: "no-store", credentials: "same-origin", signal: ctl.signal,
      });
    } catch (_) {
      if (gen === generation) scheduleReconnect("cannot reach the service");
      return;
    }
    if (gen !== generation) return;
    if (resp.status === 401) {
      const detail = await problemDetail(resp);
      if (gen === generation) unauthorized(detail);
      return;
    }
    if (!resp.ok || !resp.body) {
      const detail = await problemDetail(resp);
      if (gen === generation) scheduleReconnect("HTTP " + resp.status + (detail ? ": " + detail : ""));
      return;
    }
    $("key-panel").hidden = true;
    state = "connected";
    setStatus("connected", "connected");
    let reason = "stream ended";
    try {
      await readEvents(resp.body, ctl, gen, onEvent);
    } catch (err) {
      reason = err && err.name === "AbortError" ? "no data for " + SILENCE_MS / 1000 + " s" : "connection lost";
    }
    if (gen === generation) scheduleReconnect(reason);
  }

  function onEvent(type, data) {
    if (type !== "snapshot") return;
    let snap;
    try { snap = JSON.parse(data); } catch (_) { return; }
    backoff = BACKOFF_MIN_MS;
    if (state !== "connected") { state = "connected"; setStatus("connected", "connected"); }
    render(snap);
  }

  // Server-sent events (the WHATWG format) from a fetch body: lines ending in CR, LF or CRLF; a blank
  // line dispatches the event gathered so far; "field: value"; lines starting with ":" are comments.
  async function readEvents(body, ctl, gen, dispatch) {
    const reader = body.getReader();
    const decoder = new TextDecoder("utf-8");
    let buf = "";
    let type = "";
    let data = [];
    let watchdog = setTimeout(() => ctl.abort(), SILENCE_MS);
    const line = (text) => {
      if (text === "") {
        if (data.length) dispatch(type || "message", data.join("\n"));
        type = "";
        data = [];
        return;
      }
      if (text[0] === ":") return;
      const colon = text.indexOf(":");
      const field = colon < 0 ? text : text.slice(0, colon);
      let value = colon < 0 ? "" : text.slice(colon + 1);
      if (value[0] === " ") value = value.slice(1);
      if (field === "event") type = value;
      else if (field === "data") data.push(value);
    };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done || gen !== generation) return;
        clearTimeout(watchdog);
        watchdog = setTimeout(() => ctl.abort(), SILENCE_MS);
        buf += decoder.decode(value, { stream: true });
        let m;
        while ((m = /\r\n|\n|\r/.exec(buf)) !== null) {
          if (m[0] === "\r" && m.index === buf.length - 1) break; // a CRLF may be split across chunks
          const text = buf.slice(0, m.index);
          buf = buf.slice(m.index + m[0].length);
          line(text);
          if (gen !== generation) return;
        }
        if (buf.length > MAX_BUFFER) throw new Error("event too large");
      }
    } finally {
      clearTimeout(watchdog);
      reader.cancel().catch(() => { /* already closed or aborted */ });
    }
  }

  // ---- start ----------------------------------------------------------------------------------
  let hiddenTimer = null;
  document.addEventListener("visibilitychange", () => {
    clearTimeout(hiddenTimer);
    if (document.hidden) {
      hiddenTimer = setTimeout(() => {
        if (state === "connected" || state === "connecting" || state === "reconnecting") {
          disconnect();
          state = "idle";
          setStatus("paused", "paused while the tab is hidden");
        }
      }, HIDDEN_CLOSE_MS);
    } else if (state === "idle") {
      backoff = BACKOFF_MIN_MS;
      connect();
    }
  });

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("key-input");
    const key = input.value.trim();
    input.value = "";
    if (!key) return;
    setKey(key);
    $("key-panel").hidden = true;
    backoff = BACKOFF_MIN_MS;
    connect();
  });

  connect();
})();
