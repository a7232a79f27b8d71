// Shared by the dashboard pages: API calls, sign-in, the live event stream, formatting.
"use strict";

const ReconQ = {
  me: { name: "", staff: false, role: null, public_read: false },
  roles: ["viewer", "technologist", "admin"],  // each may what the one before it may, and more

  // Whether the signed-in viewer has this role or a higher one (anonymous viewers have none).
  may(role) {
    return ReconQ.me.staff && ReconQ.roles.indexOf(ReconQ.me.role) >= ReconQ.roles.indexOf(role);
  },

  // Every element marked data-needs="<role>" (an action, a staff-only panel) is shown only to a viewer with
  // that role or a higher one: hidden, not merely disabled, for others and for anonymous (public) readers.
  // The pages mark them hidden to begin with, so nothing shows before the role is known; the server checks
  // every action again.
  applyRoles(root = document) {
    for (const el of root.querySelectorAll("[data-needs]")) el.hidden = !ReconQ.may(el.dataset.needs);
  },
  vocab: null,  // GET /api/vocabulary: the job states, their transitions, the queues, the actions' states

  async api(path, options = {}) {
    const opts = { credentials: "same-origin", ...options, headers: { ...(options.headers || {}) } };
    if (opts.method && opts.method !== "GET") opts.headers["X-ReconQ-Action"] = "1";
    if (opts.body !== undefined && typeof opts.body !== "string") {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(opts.body);
    }
    const reply = await fetch(path, opts);
    let data = null;
    try { data = await reply.json(); } catch (e) { data = null; }
    if (!reply.ok) {
      const err = new Error((data && data.detail) || `${reply.status} ${reply.statusText}`);
      err.status = reply.status;
      throw err;
    }
    return data;
  },

  // The server's job states and queues, fetched once (again after a refusal, e.g. before sign-in).
  async vocabulary() {
    if (!ReconQ.vocab) ReconQ.vocab = await ReconQ.api("/api/vocabulary");
    return ReconQ.vocab;
  },

  options(values) {
    return values.map((v) => `<option>${ReconQ.esc(v)}</option>`).join("");
  },

  notice(text) {
    const el = document.getElementById("notice");
    el.textContent = text || "";
    el.hidden = !text;
  },

  esc(text) {
    const d = document.createElement("div");
    d.textContent = text == null ? "" : String(text);
    return d.innerHTML;
  },

  // The one way the dashboard shows a time: YYYY-MM-DD HH:MM:SS, the browser's local time, 24-hour clock
  // (never the locale's format: no AM/PM, no day-month order to guess). Empty for a time not known.
  time(epoch) {
    if (epoch == null) return "";
    const d = new Date(epoch * 1000), two = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())} ` +
      `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
  },

  // Bytes in decimal units (as disks are sold): 120 GB, 1.5 TB.
  bytes(n) {
    if (n == null) return "";
    const units = [[1e12, "TB"], [1e9, "GB"], [1e6, "MB"], [1e3, "kB"]];
    for (const [size, unit] of units) if (n >= size) return `${(n / size).toFixed(n < 10 * size ? 1 : 0)} ${unit}`;
    return `${n} B`;
  },

  // A patient as staff see them: the name (DICOM "Family^Given^Middle" as "Family, Given Middle") and the ID;
  // public readers get the masked ID alone (the server sends them no name).
  patientHtml(x) {
    const e = ReconQ.esc, parts = (x.patient_name || "").split("^").map((p) => p.trim());
    const given = parts.slice(1, 3).filter((p) => p).join(" ");
    const name = parts[0] && given ? `${parts[0]}, ${given}` : parts[0] || given;
    return (name ? `<span class="patient-name">${e(name)}</span> ` : "") + `<span class="patient">${e(x.patient)}</span>`;
  },

  duration(seconds) {
    if (seconds == null) return "";
    const s = Math.round(seconds);
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  },

  // A progress bar as HTML; its width is set by paintBars (the Content-Security-Policy allows no inline styles).
  bar(job) {
    const pct = Math.round((job.progress || 0) * 100);
    return `<div class="bar" title="${pct} %"><div class="fill state-${job.state}" data-pct="${pct}"></div></div>` +
      `<span class="stage">${pct} % ${ReconQ.esc(job.stage)}</span>`;
  },

  paintBars(root) {
    const fills = root.matches && root.matches(".fill[data-pct]") ? [root] : [];
    if (root.querySelectorAll) fills.push(...root.querySelectorAll(".fill[data-pct]"));
    for (const f of fills) f.style.width = `${f.dataset.pct}%`;
  },

  async loadMe(onChange) {
    try { ReconQ.me = await ReconQ.api("/api/auth/me"); } catch (e) { ReconQ.me = { name: "", staff: false, role: null }; }
    ReconQ.renderAuth(onChange);
  },

  renderAuth(onChange) {
    const el = document.getElementById("auth");
    ReconQ.applyRoles();
    if (ReconQ.me.staff) {
      el.innerHTML = `<span>Signed in as <b id="who">${ReconQ.esc(ReconQ.me.name)}</b>` +
        ` <span id="role" class="role">(${ReconQ.esc(ReconQ.me.role || "")})</span></span>` +
        `<button id="signout" type="button">Sign out</button>`;
      document.getElementById("signout").onclick = async () => {
        await ReconQ.api("/api/auth/signout", { method: "POST" });
        await ReconQ.loadMe(onChange);
        onChange();
      };
      return;
    }
    el.innerHTML = `<form id="signin"><input name="name" placeholder="name" autocomplete="username">` +
      `<input name="password" type="password" placeholder="password or token" autocomplete="current-password">` +
      `<button type="submit">Sign in</button></form>`;
    document.getElementById("signin").onsubmit = async (ev) => {
      ev.preventDefault();
      const f = ev.target, name = f.name.value.trim(), secret = f.password.value;
      const body = name ? { name, password: secret } : { token: secret };
      try {
        ReconQ.me = await ReconQ.api("/api/auth/signin", { method: "POST", body });
        ReconQ.notice("");
      } catch (e) {
        ReconQ.notice(`Sign-in refused: ${e.message}`);
        return;
      }
      ReconQ.renderAuth(onChange);
      onChange();
    };
  },

  // Live job changes, for every view that listens on the page: one stream, opened by the first
  // listener; shows the 'connection lost' sign while it is down (the browser retries).
  listeners: [],

  listen(onEvent, onReconnect) {
    ReconQ.listeners.push({ onEvent, onReconnect });
    if (!ReconQ.source) ReconQ.openStream();
  },

  openStream() {
    const conn = document.getElementById("conn");
    let lost = false;
    const source = new EventSource("/api/events");
    source.addEventListener("hello", () => {
      conn.hidden = true;
      if (lost) for (const l of ReconQ.listeners) if (l.onReconnect) l.onReconnect();
      lost = false;
    });
    source.onmessage = (ev) => {
      let data;
      try { data = JSON.parse(ev.data); } catch (e) { return; /* a malformed event is ignored */ }
      for (const l of ReconQ.listeners) {
        try { l.onEvent(data); } catch (e) { console.error(e); /* one view's failure does not stop the others */ }
      }
    };
    source.onerror = () => {
      lost = true;
      conn.hidden = false;
      if (source.readyState === EventSource.CLOSED) setTimeout(ReconQ.openStream, 3000);
    };
    ReconQ.source = source;
  },

  debounce(fn, ms) {
    let timer = null;
    return () => { clearTimeout(timer); timer = setTimeout(fn, ms); };
  },
};

// Every progress bar put into the page gets its width, whichever view drew it.
new MutationObserver((records) => {
  for (const r of records) for (const n of r.addedNodes) if (n.nodeType === Node.ELEMENT_NODE) ReconQ.paintBars(n);
}).observe(document.documentElement, { childList: true, subtree: true });
