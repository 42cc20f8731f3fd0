// The cronfleet dashboard: asks for an API key once (kept in sessionStorage, sent as X-API-Key),
// then polls /dashboard/overview every 2 s and draws the fleet and the jobs. Every value from
// the server goes in as text (textContent), never as markup.
"use strict";

const KEY = "cronfleet.apiKey";
const POLL_MS = 2000;
let selected = null;
let readOnly = true;
let timer = null;

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(name, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

class Unauthorized extends Error {}

async function call(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { "X-API-Key": sessionStorage.getItem(KEY) || "", Accept: "application/json" },
    cache: "no-store",
  });
  if (response.status === 401) throw new Unauthorized();
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function when(iso, now) {
  if (!iso) return "—";
  const at = new Date(iso);
  const seconds = Math.round((at - now) / 1000);
  const size = Math.abs(seconds);
  let text;
  if (size < 60) text = `${size}s`;
  else if (size < 3600) text = `${Math.round(size / 60)}m`;
  else if (size < 86400) text = `${Math.round(size / 3600)}h`;
  else text = `${Math.round(size / 86400)}d`;
  return seconds >= 0 ? `in ${text}` : `${text} ago`;
}

function sparkline(history) {
  // One bar per finished run, height by duration (the longest fills the box); green for a
  // success, red for a failure, grey for anything else.
  const ns = "http://www.w3.org/2000/svg";
  const width = 100, height = 22, gap = 1;
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("role", "img");
  const longest = Math.max(0.001, ...history.map((r) => r.duration_seconds || 0));
  const bar = width / 20;
  history.forEach((run, index) => {
    const rect = document.createElementNS(ns, "rect");
    const h = Math.max(2, ((run.duration_seconds || 0) / longest) * (height - 2));
    rect.setAttribute("x", index * bar);
    rect.setAttribute("y", height - h);
    rect.setAttribute("width", bar - gap);
    rect.setAttribute("height", h);
    const kind = run.status === "succeeded" ? "bar-ok" : ["failed", "timed_out", "lost", "expired"].includes(run.status) ? "bar-bad" : "bar-other";
    rect.setAttribute("class", kind);
    const title = document.createElementNS(ns, "title");
    title.textContent = `${run.status}, ${(run.duration_seconds ?? 0).toFixed(2)}s at ${run.started_at}`;
    rect.append(title);
    svg.append(rect);
  });
  svg.setAttribute("aria-label", `${history.length} recent run(s)`);
  return svg;
}

function drawFleet(fleet) {
  const list = $("fleet");
  list.replaceChildren();
  if (fleet.length === 0) list.append(el("li", { class: "muted" }, "no monitor has looked at the fleet yet"));
  for (const part of fleet) {
    list.append(
      el("li", { class: `state-${part.state}`, "data-component": part.component },
        el("strong", {}, part.component), " ",
        el("span", { class: `state state-${part.state}` }, part.state),
        el("span", { class: "detail" }, part.detail))
    );
  }
}

function drawJobs(jobs, now) {
  const body = $("jobs").tBodies[0];
  body.replaceChildren();
  for (const job of jobs) {
    const last = job.last_status ? [el("span", { class: `status-${job.last_status}` }, job.last_status), " ", when(job.last_finished_at || job.last_started_at, now)] : ["—"];
    const button = job.action !== "heartbeat" && job.action !== "invalid" && !readOnly
      ? el("button", { type: "button", class: "run-now", "data-job": job.name }, "Run now")
      : "";
    const schedule = el("span", { title: `${job.schedule} (${job.timezone})` }, job.schedule_words || job.schedule);
    const row = el("tr", { "data-job": job.name, "data-state": job.state, class: job.name === selected ? "selected" : null },
      el("td", {}, el("strong", {}, job.name), job.error ? el("div", { class: "error" }, job.error) : ""),
      el("td", {},
        el("span", { class: `state state-${job.state}`, title: job.since ? `since ${job.since}` : null }, job.state),
        job.reason && job.state !== "up" ? el("div", { class: "reason muted" }, job.reason) : ""),
      el("td", {}, schedule),
      el("td", {}, ...last),
      el("td", {}, job.enabled ? when(job.next_run_at, now) : "paused"),
      el("td", {}, sparkline(job.history)),
      el("td", {}, button));
    row.addEventListener("click", (event) => {
      if (event.target.closest("button")) return;
      selected = job.name;
      refresh();
    });
    if (button) button.addEventListener("click", () => runNow(job.name, button));
    body.append(row);
  }
}

async function runNow(name, button) {
  button.disabled = true;
  try {
    const fired = await call(`/dashboard/jobs/${encodeURIComponent(name)}/trigger`, { method: "POST" });
    $("error").textContent = "";
    button.textContent = "Triggered";
    button.title = fired.trigger_id;
    selected = name;
    refresh();
  } catch (error) {
    $("error").textContent = `run now ${name}: ${error.message}`;
    button.disabled = false;
  }
}

async function drawRuns(now) {
  const panel = $("runs-panel");
  if (!selected) { panel.hidden = true; return; }
  const runs = await call(`/dashboard/jobs/${encodeURIComponent(selected)}/runs?limit=20`);
  $("runs-title").textContent = `Runs of ${selected}`;
  const box = $("runs");
  box.replaceChildren();
  if (runs.length === 0) box.append(el("p", { class: "muted" }, "no run yet"));
  for (const run of runs) {
    const facts = [
      run.duration_seconds != null ? `${run.duration_seconds.toFixed(2)}s` : null,
      run.exit_code != null ? `exit ${run.exit_code}` : null,
      run.http_status != null ? `HTTP ${run.http_status}` : null,
      run.worker ? `on ${run.worker}` : run.source,
    ].filter(Boolean).join(" · ");
    const item = el("div", { class: "run", "data-status": run.status, "data-run": run.run_id },
      el("strong", { class: `status-${run.status}` }, run.status), " ",
      el("span", { title: run.started_at }, when(run.started_at, now)), " ",
      el("span", { class: "muted" }, facts));
    if (run.error) item.append(el("div", { class: "error" }, run.error));
    if (run.output_tail) item.append(el("pre", {}, run.output_tail));
    box.append(item);
  }
  panel.hidden = false;
}

async function refresh() {
  clearTimeout(timer);
  if (document.hidden) {
    // A tab nobody looks at asks nothing; it refreshes as soon as it is shown again.
    timer = setTimeout(refresh, POLL_MS);
    return;
  }
  try {
    const data = await call("/dashboard/overview");
    const now = new Date(data.now);
    drawFleet(data.fleet);
    drawJobs(data.jobs, now);
    $("truncated").hidden = !data.truncated;
    await drawRuns(now);
    $("updated").textContent = `updated ${now.toLocaleTimeString()}`;
    $("error").textContent = "";
  } catch (error) {
    if (error instanceof Unauthorized) { logout("the key was refused (revoked?)"); return; }
    $("error").textContent = `cannot reach the monitor: ${error.message}`;
  }
  timer = setTimeout(refresh, POLL_MS);
}

function logout(message) {
  clearTimeout(timer);
  sessionStorage.removeItem(KEY);
  $("board").hidden = true;
  $("forget").hidden = true;
  $("who").textContent = "";
  $("login").hidden = false;
  $("login-error").textContent = message || "";
}

async function start() {
  try {
    const who = await call("/dashboard/key");
    readOnly = who.read_only;
    $("who").textContent = `key ${who.name}${who.read_only ? " (read-only)" : ""}`;
  } catch (error) {
    logout(error instanceof Unauthorized ? "that key is not valid" : `cannot reach the monitor: ${error.message}`);
    return;
  }
  $("login").hidden = true;
  $("board").hidden = false;
  $("forget").hidden = false;
  refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("key").value.trim());
    $("key").value = "";
    start();
  });
  $("forget").addEventListener("click", () => logout());
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && !$("board").hidden) refresh();
  });
  if (sessionStorage.getItem(KEY)) start(); else logout();
});
