// The job page: facts, parameters, stage timings, error and warnings, the recon's report (tables such as
// alignsense's motion per shot), previews, downloads, staff actions, log.
"use strict";

const jobId = decodeURIComponent(location.pathname.split("/").pop());
let previewsShown = "";

function fact(name, value) { return `<tr><th>${name}</th><td>${value}</td></tr>`; }

// The queue choices, once: every queue for a move; a retro-recon goes on the last (lowest) by default.
function fillQueues(v) {
  const move = document.getElementById("queue"), retro = document.getElementById("retro-queue");
  if (move.options.length) return;
  move.innerHTML = ReconQ.options(v.queues);
  retro.innerHTML = ReconQ.options(v.queues);
  retro.value = v.queues[v.queues.length - 1];
}

function render(j, v) {
  document.title = `ReconQ: job ${j.id}`;
  document.getElementById("job-id").textContent = j.id;
  const st = document.getElementById("state");
  st.textContent = j.state;
  st.className = `state state-${j.state}`;
  const pct = Math.round(j.progress * 100);
  document.getElementById("stage").textContent = `${pct} % ${j.stage}`;
  const fill = document.getElementById("bar-fill");
  fill.style.width = `${pct}%`;
  fill.className = `fill state-${j.state}`;
  const err = document.getElementById("error");
  err.hidden = !j.error;
  err.textContent = j.error ? `Error: ${j.error}` : "";
  const e = ReconQ.esc;
  const warns = document.getElementById("warnings");
  warns.hidden = !j.warnings.length;
  warns.innerHTML = j.warnings.map((w) => `<li>Warning: ${e(w)}</li>`).join("");
  document.getElementById("report").innerHTML = Object.entries(j.report || {}).map(([name, r]) =>
    `<h2>${e(r.title || name)}</h2>` + (Array.isArray(r.columns) && Array.isArray(r.rows)
      ? `<table class="facts report"><thead><tr>${r.columns.map((c) => `<th>${e(c)}</th>`).join("")}` +
        `</tr></thead><tbody>${r.rows.map((row) => `<tr>${row.map((c) => `<td>${e(c)}</td>`).join("")}</tr>`).join("")}` +
        "</tbody></table>"
      : `<pre>${e(JSON.stringify(r, null, 2))}</pre>`)).join("");
  document.getElementById("facts").innerHTML = fact("Patient", ReconQ.patientHtml(j)) +
    fact("Protocol", e(j.protocol)) + fact("Pipeline", e(j.pipeline)) + fact("Scan", e(j.scan_id)) +
    fact("Queue", e(j.queue)) + fact("Attempts", j.attempts) + fact("Created", ReconQ.time(j.created_at)) +
    fact("Queued", ReconQ.time(j.queued_at)) + fact("Started", ReconQ.time(j.started_at)) +
    fact("Finished", ReconQ.time(j.finished_at)) + fact("Run time", ReconQ.duration(j.run_time_s)) +
    fact("Expected run time", j.expected_run_time_s == null ? "not known" : ReconQ.duration(j.expected_run_time_s)) +
    fact("GPU memory", j.memory_estimate_gb == null ? "not estimated" : `${j.memory_estimate_gb} GB`) +
    fact("GPU", e(j.gpu)) + fact("Worker", e(j.worker));
  // what the server withholds from viewers who are not signed in (public read): parameters, log, previews
  document.getElementById("params").textContent = j.redacted ? "Sign in as staff to see the parameters."
    : JSON.stringify(j.params, null, 2);
  document.querySelector("#stages tbody").innerHTML = j.stages.map((s) =>
    `<tr><th>${e(s.stage)}</th><td>${ReconQ.time(s.started_at)}</td><td>${ReconQ.duration(s.seconds)}</td></tr>`).join("")
    || "<tr><td>not started</td></tr>";
  const key = `${j.state}:${j.redacted}:${j.previews.join(",")}`;
  if (key !== previewsShown) {
    previewsShown = key;
    document.getElementById("previews").innerHTML = j.previews.length ? j.previews.map((i) =>
      `<img class="preview" alt="image ${i + 1} of ${j.image_count}" src="/api/jobs/${encodeURIComponent(j.id)}/previews/${i}.png">`
    ).join("") : j.redacted && j.image_count ? "Sign in as staff to see the previews." : "none yet";
  }
  const base = `/api/jobs/${encodeURIComponent(j.id)}`;
  document.getElementById("downloads").innerHTML = !j.has_images ? "" : ReconQ.me.staff
    ? `<a id="dl-mrd" href="${base}/images" download>MRD file</a><a id="dl-dicom" href="${base}/dicom" download>DICOM (zip)</a>`
    : "Sign in as staff to download the images.";
  document.querySelector("#audit tbody").innerHTML = j.actions.map((a) =>
    `<tr><td>${ReconQ.time(a.at)}</td><th>${e(a.who)}</th><td>${e(a.action)}</td><td>${e(a.detail)}</td></tr>`).join("")
    || "<tr><td>nothing</td></tr>";
  document.getElementById("queue").value = j.queue;
  // each action where the server allows it (the vocabulary's states per action)
  for (const action of ["retry", "cancel", "priority"]) {
    document.getElementById(action).disabled = !v.actions[action].includes(j.state);
  }
  // the actions (data-needs="technologist") only for a role that may do them; the server checks again
  ReconQ.applyRoles();
  const mayAct = ReconQ.may("technologist");
  const hint = document.getElementById("act-hint");
  hint.hidden = mayAct;
  hint.textContent = mayAct ? "" : ReconQ.me.staff
    ? `Your role (${ReconQ.me.role}) may only view; retry, cancel, move and retro-recon need a technologist.`
    : "Sign in as a technologist to retry, cancel, move or retro-recon this job.";
  document.getElementById("log").textContent = j.redacted ? "Sign in as staff to see the log." : j.log.join("\n");
  window.reconqJob = j;
}

async function load() {
  try {
    const [vocab, job] = await Promise.all([ReconQ.vocabulary(), ReconQ.api(`/api/jobs/${encodeURIComponent(jobId)}`)]);
    fillQueues(vocab);
    render(job, vocab);
    ReconQ.notice("");
    if (!ReconQ.source) ReconQ.listen((ev) => { if (ev.id === jobId) reload(); }, () => reload());
  } catch (e) {
    ReconQ.notice(e.status === 404 ? `There is no job ${jobId}.` : e.message);
  }
}

const reload = ReconQ.debounce(load, 200);

async function act(label, path, body) {
  const msg = document.getElementById("action-msg");
  try {
    const job = await ReconQ.api(path, { method: "POST", body: body || {} });
    msg.className = "action-msg ok";
    msg.textContent = `${label}: done (job ${job.id} is ${job.state}).`;
    if (job.id !== jobId) msg.innerHTML += ` <a href="/jobs/${encodeURIComponent(job.id)}">Open job ${ReconQ.esc(job.id)}</a>`;
    load();
  } catch (e) {
    msg.className = "action-msg bad";
    msg.textContent = `${label} refused: ${e.message}`;
  }
}

const path = (what) => `/api/jobs/${encodeURIComponent(jobId)}/${what}`;
document.getElementById("retry").onclick = () => act("Retry", path("retry"));
// A cancel asks first, naming the job and its protocol; only OK cancels.
document.getElementById("cancel").onclick = () => {
  const j = window.reconqJob || { id: jobId, protocol: "" };
  const what = `job ${j.id} (${j.protocol ? `protocol ${j.protocol}` : "no protocol"})`;
  if (window.confirm(`Cancel ${what}? Its reconstruction stops and its images will not be made.`)) {
    act("Cancel", path("cancel"));
  }
};
document.getElementById("priority").onclick = () =>
  act("Priority", path("priority"), { queue: document.getElementById("queue").value });
document.getElementById("retro").onsubmit = (ev) => {
  ev.preventDefault();
  const f = ev.target, j = window.reconqJob;
  let params = null;
  if (f.params.value.trim()) {
    try { params = JSON.parse(f.params.value); } catch (e) {
      document.getElementById("action-msg").className = "action-msg bad";
      document.getElementById("action-msg").textContent = `Parameters are not JSON: ${e.message}`;
      return;
    }
  }
  act("Retro-recon", `/api/scans/${encodeURIComponent(j.scan_id)}/jobs`,
      { pipeline: f.pipeline.value, queue: f.queue.value, params });
};

(async () => {
  await ReconQ.loadMe(load);
  await load();
  try {
    const names = await ReconQ.api("/api/pipelines");
    document.getElementById("pipeline").innerHTML = names.map((n) => `<option>${ReconQ.esc(n)}</option>`).join("");
  } catch (e) { /* shown by load() */ }
})();
