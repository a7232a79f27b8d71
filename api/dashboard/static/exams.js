// The front page's first view, the exams of the day (GET /api/exams): one card per patient and study,
// its series, and for each series when its images can be retrieved. Started by index.js; kept live by
// the event stream, and re-read now and then because expected finishes move with the clock and the queue.
"use strict";

const Exams = {
  REFRESH_MS: 30000,
  rows: new Map(),  // job id -> the series' table row (progress events are drawn without a round trip)
  active: [],       // the server's states in which a job is still on its way (from the vocabulary)

  query() {
    const input = document.getElementById("exam-day"), day = input.value.trim();
    return day && input.validity.valid ? `?${new URLSearchParams({ day })}` : "";
  },

  async load() {
    const list = document.getElementById("exams"), msg = document.getElementById("exams-msg");
    let data;
    try {
      const [vocab, exams] = await Promise.all([ReconQ.vocabulary(), ReconQ.api(`/api/exams${Exams.query()}`)]);
      Exams.active = vocab.active;
      data = exams;
    } catch (e) {
      msg.textContent = e.status === 401 ? `${e.message}.` : `Exams could not be loaded: ${e.message}`;
      msg.hidden = false;
      list.innerHTML = "";
      Exams.rows.clear();
      return;
    }
    msg.hidden = true;
    document.getElementById("exams-title").textContent = `Exams of ${data.day}`;
    list.innerHTML = data.exams.map(Exams.card).join("") ||
      `<p class="empty">No exams on ${ReconQ.esc(data.day)}.</p>`;
    Exams.rows.clear();
    for (const tr of list.querySelectorAll("tr[data-job]")) Exams.rows.set(tr.dataset.job, tr);
  },

  card(x) {
    const e = ReconQ.esc;
    const who = x.identified
      ? `${ReconQ.patientHtml(x)} <span class="study">study ${e(x.study_uid)}</span>`
      : `<span class="unidentified">no patient ID / study UID: retrieve by job id</span>` +
        (x.patient ? ` ${ReconQ.patientHtml(x)}` : "");
    const [kind, verdict] = Exams.verdict(x);
    return `<article class="exam${x.identified ? "" : " anonymous"}">` +
      `<div class="exam-head"><h3>${who}</h3><span class="since">first series ${ReconQ.time(x.first_at)}</span>` +
      `<span class="verdict ${kind}">${verdict}</span></div>` +
      `<table class="jobs series"><thead><tr><th class="c-protocol">Protocol</th><th class="c-state">State</th>` +
      `<th class="c-progress">Progress</th><th class="c-finish">Expected finish</th>` +
      `<th class="c-retrieval">Retrieval</th><th class="c-job">Job</th></tr></thead>` +
      `<tbody>${x.series.map(Exams.seriesRow).join("")}</tbody></table></article>`;
  },

  // The exam as a whole: when to run its retrieval scan.
  verdict(x) {
    const busy = x.series.filter((s) => Exams.active.includes(s.state));
    const ready = x.series.filter((s) => s.ready).length, failed = x.series.filter((s) => s.state === "failed").length;
    const failures = failed ? `; ${failed} failed` : "";
    if (busy.length) {
      const ends = busy.map((s) => s.expected_finish);
      return ["wait", (ends.some((t) => t == null) ? "retrieve when done (finish not known yet)"
        : `retrieve after ${ReconQ.time(Math.max(...ends))}`) + failures];
    }
    if (ready === x.series.length) return ["ready", "ready to retrieve"];
    return [failed ? "bad" : "wait", `${ready} of ${x.series.length} ready to retrieve${failures}`];
  },

  seriesRow(s) {
    const e = ReconQ.esc, busy = Exams.active.includes(s.state);
    return `<tr data-job="${e(s.job_id)}" data-state="${e(s.state)}">` +
      `<td class="protocol">${e(s.protocol) || "<i>no protocol</i>"}</td>` +
      `<td class="state state-${e(s.state)}">${e(s.state)}</td>` +
      `<td class="progress">${ReconQ.bar({ progress: s.progress, state: s.state, stage: Exams.place(s) })}</td>` +
      `<td class="finish">${busy ? Exams.finish(s.expected_finish) : ""}</td>` +
      `<td class="retrieval">${Exams.retrieval(s, busy)}</td>` +
      `<td class="job"><a href="/jobs/${encodeURIComponent(s.job_id)}">${e(s.job_id)}</a></td></tr>`;
  },

  place(s) {
    if (s.state !== "queued" || s.queue_position == null) return "";
    return s.queue_position > 0 ? `${s.queue_position} ahead in the queue` : "next in the queue";
  },

  finish(epoch) {
    if (epoch == null) return `<span class="unknown">not known</span>`;
    const at = `<time datetime="${new Date(epoch * 1000).toISOString()}">${ReconQ.time(epoch)}</time>`;
    return epoch * 1000 < Date.now() ? `${at} <span class="late">late</span>` : at;
  },

  retrieval(s, busy) {
    if (s.ready) return `<span class="ready">ready to retrieve</span>`;
    if (s.state === "failed") return `<span class="failed">${ReconQ.esc(s.error || "failed")}</span>`;
    if (s.state === "cancelled") return "cancelled: nothing to retrieve";
    return busy ? "not yet" : ReconQ.esc(s.state);
  },

  onEvent(ev) {
    const tr = Exams.rows.get(ev.id);
    if (ev.progress !== undefined && ev.state === undefined) {  // progress only: no round trip
      if (tr) tr.querySelector(".progress").innerHTML =
        ReconQ.bar({ progress: ev.progress, state: tr.dataset.state, stage: ev.stage || "" });
      return;
    }
    Exams.reload();  // a new job, a change of state, a staff action (a move changes the queue)
  },

  start() {
    // the day as YYYY-MM-DD (a text field: a date picker would show the browser's locale's order)
    document.getElementById("exam-day").onchange = (ev) => { if (ev.target.reportValidity()) Exams.reload(); };
    document.getElementById("exam-today").onclick = () => { document.getElementById("exam-day").value = ""; Exams.reload(); };
    ReconQ.listen(Exams.onEvent, Exams.reload);
    setInterval(Exams.load, Exams.REFRESH_MS);
    return Exams.load();
  },
};

Exams.reload = ReconQ.debounce(() => Exams.load(), 300);
