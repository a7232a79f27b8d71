// The front page's 'All jobs' view: the table (paged, filtered, live); the GPU, queue and retrieval panels.
// Started by index.js.
"use strict";

const PAGE = 50;
let offset = 0;
const shown = new Map();  // job id -> table row

function filterParams() {
  const f = document.getElementById("filters");
  const p = new URLSearchParams({ offset, limit: PAGE });
  if (f.state.value) p.set("state", f.state.value);
  if (f.protocol.value.trim()) p.set("protocol", f.protocol.value.trim());
  if (f.since.value) p.set("since", f.since.value);
  if (f.until.value) {  // 'To' is inclusive: jobs created before the next day
    const d = new Date(f.until.value + "T00:00:00Z");
    d.setUTCDate(d.getUTCDate() + 1);
    p.set("until", d.toISOString().slice(0, 10));
  }
  return p;
}

function rowHtml(j) {
  return `<td><a href="/jobs/${encodeURIComponent(j.id)}">${ReconQ.esc(j.id)}</a></td>` +
    `<td class="who">${ReconQ.patientHtml(j)}</td><td>${ReconQ.esc(j.protocol)}</td>` +
    `<td>${ReconQ.esc(j.pipeline)}</td><td class="state state-${j.state}">${j.state}</td>` +
    `<td class="progress">${ReconQ.bar(j)}</td><td>${ReconQ.time(j.queued_at)}</td>` +
    `<td>${ReconQ.time(j.started_at)}</td><td>${ReconQ.time(j.finished_at)}</td>` +
    `<td>${ReconQ.duration(j.run_time_s)}</td><td>${ReconQ.esc(j.gpu)}</td><td>${j.attempts}</td>`;
}

// The state filter's choices, from the server's states (once they could be read: sign-in may be needed).
async function fillFilters() {
  const select = document.getElementById("filters").state;
  if (select.options.length > 1) return;
  try {
    select.innerHTML = `<option value="">any</option>${ReconQ.options((await ReconQ.vocabulary()).states)}`;
  } catch (e) { /* shown by loadJobs() */ }
}

async function loadJobs() {
  let page;
  try {
    page = await ReconQ.api(`/api/jobs?${filterParams()}`);
  } catch (e) {
    ReconQ.notice(e.status === 401 ? `${e.message}.` : `Jobs could not be loaded: ${e.message}`);
    document.querySelector("#jobs tbody").innerHTML = "";
    return false;
  }
  ReconQ.notice("");
  const body = document.querySelector("#jobs tbody");
  body.innerHTML = "";
  shown.clear();
  for (const j of page.jobs) {
    const tr = document.createElement("tr");
    tr.dataset.id = j.id;
    tr.className = `job state-${j.state}`;
    tr.innerHTML = rowHtml(j);
    body.appendChild(tr);
    shown.set(j.id, tr);
  }
  if (!page.jobs.length) body.innerHTML = `<tr><td colspan="12">No jobs${offset ? " on this page" : ""}.</td></tr>`;
  const last = Math.min(offset + page.jobs.length, page.total);
  document.getElementById("range").textContent = page.total ? `${offset + 1}–${last} of ${page.total}` : "";
  document.getElementById("prev").disabled = offset === 0;
  document.getElementById("next").disabled = last >= page.total;
  return true;
}

function gpuNumber(row, ...keys) {
  for (const k of keys) if (typeof row[k] === "number") return row[k];
  return null;
}

function gib(v) { return v == null ? "?" : (v > 1e6 ? (v / 2 ** 30).toFixed(1) : (v / 1024).toFixed(1)); }

async function loadGpus() {
  const el = document.getElementById("gpus");
  let rows;
  try {
    const data = await ReconQ.api("/api/gpus");
    rows = Array.isArray(data) ? data : (data && data.gpus) || [];
  } catch (e) {
    el.textContent = e.status === 404 ? "No GPU information on this server." : `Unavailable: ${e.message}`;
    return;
  }
  if (!rows.length) { el.textContent = "No GPUs reported (CPU workers only)."; return; }
  const rowOf = (g) => `<tr class="gpu">`;
  el.innerHTML = "<table>" + rows.map((g) => {
    const used = gpuNumber(g, "used_bytes", "memory_used_bytes"), total = gpuNumber(g, "total_bytes", "memory_total_bytes");
    const util = gpuNumber(g, "utilization_pct", "utilization");
    const temp = gpuNumber(g, "temperature_c", "temperature");
    const jobs = (g.workers || []).map((w) => w.job_id).filter((j) => j);
    const job = jobs.length ? jobs.join(", ") : (g.alive === false ? "no live worker" : "idle");
    const name = `${g.name || g.id || ""}${g.simulated ? " (simulated)" : ""}`;
    return `${rowOf(g)}<td><b>${ReconQ.esc(g.host || "")} ${ReconQ.esc(name)}</b></td>` +
      `<td>${gib(used)}/${gib(total)} GiB</td><td>${util == null ? "" : util + " %"}</td>` +
      `<td>${temp == null ? "" : temp + " °C"}</td><td>${ReconQ.esc(job)}</td></tr>`;
  }).join("") + "</table>";
}

// Disk use (staff only: the panel is data-needs="viewer"): free space, raw scans and results; red below the
// free space new scans need (the setting min_free_bytes).
async function loadDisk() {
  const el = document.getElementById("disk");
  if (!ReconQ.may("viewer")) { el.textContent = ""; return; }
  let d;
  try { d = await ReconQ.api("/api/disk"); } catch (e) { el.textContent = `Unavailable: ${e.message}`; return; }
  const b = ReconQ.bytes;
  el.className = d.low ? "disk low" : "disk";
  el.innerHTML = `Disk: ${b(d.free_bytes)} free of ${b(d.total_bytes)}; raw scans ${b(d.raw.bytes)} (${d.raw.count}), ` +
    `results ${b(d.results.bytes)} (${d.results.count})` + (d.low
      ? `<span class="warn">Low: below the ${b(d.min_free_bytes)} new scans need; the gateway refuses new scans.</span>`
      : "");
}

async function loadPanels() {
  loadGpus();
  loadDisk();
  try {
    const qs = await ReconQ.api("/api/queues");
    document.getElementById("queues").innerHTML = "<table>" +
      qs.map((q) => `<tr><td>${q.name}</td><td class="depth" data-queue="${q.name}">${q.depth}</td></tr>`).join("") + "</table>";
    const r = await ReconQ.api("/api/retrievals");
    const fmt = (x) => x.rate == null ? "none yet" : `${Math.round(x.rate * 100)} % found (${x.found} of ${x.found + x.not_found})`;
    document.getElementById("retrievals").innerHTML =
      `<table><tr><td>last day</td><td>${fmt(r.day)}</td></tr><tr><td>last week</td><td>${fmt(r.week)}</td></tr></table>`;
  } catch (e) {
    document.getElementById("queues").textContent = e.message;
    document.getElementById("retrievals").textContent = e.message;
  }
}

const reload = ReconQ.debounce(async () => { if (await loadJobs()) startListening(); }, 250);
const reloadPanels = ReconQ.debounce(loadPanels, 1000);

function onEvent(ev) {
  const tr = shown.get(ev.id);
  if (tr && ev.progress !== undefined && ev.state === undefined) {
    const j = { progress: ev.progress, stage: ev.stage || "", state: tr.querySelector(".state").textContent };
    tr.querySelector(".progress").innerHTML = ReconQ.bar(j);  // progress only: no round trip
    return;
  }
  if (tr || offset === 0) reload();  // a new job, or a change of state
  reloadPanels();
}

let listening = false;
function startListening() {
  if (listening) return;
  listening = true;
  ReconQ.listen(onEvent, () => { reload(); reloadPanels(); });
}

document.getElementById("filters").onsubmit = (ev) => { ev.preventDefault(); offset = 0; reload(); };
document.getElementById("filters").onreset = () => { offset = 0; setTimeout(reload, 0); };
document.getElementById("prev").onclick = () => { offset = Math.max(0, offset - PAGE); reload(); };
document.getElementById("next").onclick = () => { offset += PAGE; reload(); };
