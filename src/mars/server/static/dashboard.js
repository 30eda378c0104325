// The mars dashboard (see mars/server/dashboard.py): session timelines from the /v1/events
// stream, gauges polled from /v1/dashboard. Vanilla JS, canvas; no library, no build step.
//
// Phases are placed by each event's `time` (the engine's clock: a tool event reaches the stream
// only once the engine thread handles it, so its `ts`, the wall time it was streamed, can be
// late). The smallest `ts - time` seen maps that clock to the server's wall clock, and the
// gauges' `ts` maps that to this page's, so open phases grow in real time. Every figure the page draws is
// also on <body> as a data-* attribute (and each session is an <li data-session>), for tests
// and for scripts that scrape the page.
"use strict";

const KEY_SLOT = "mars-dashboard-key"; // sessionStorage: gone when the tab closes
const ROW = 20; // px per session row: matches --row in the page's CSS
const AXIS = 24; // px of time axis above the rows
const MAX_ROWS = 300; // ended sessions beyond this are dropped, oldest first
const POLL_MS = 1000;
const HISTORY = 7200; // gauge samples kept (2 h at one a second)

// Phase kinds: colour and legend text. `lane: "kv"` ones are drawn as a strip under the row.
const PHASES = {
  admit: { color: "#9aa0a6", text: "admission wait" },
  wait: { color: "#f4b400", text: "LLM call: waiting for the GPU" },
  prefill: { color: "#db4437", text: "prefill" },
  decode: { color: "#4285f4", text: "decode" },
  upstream: { color: "#4285f4", text: "LLM call at an upstream" },
  toolq: { color: "#ab47bc", text: "tool: queued for a worker" },
  toolrun: { color: "#0f9d58", text: "tool: running" },
  inferred: { color: "#a8dab5", text: "tool phase (client side, inferred)" },
  away: { color: "#e8eaed", text: "between calls" },
  pin: { color: "#ff6d00", text: "KV pinned on the GPU", lane: "kv" },
  host: { color: "#00acc1", text: "KV copy in host memory", lane: "kv" },
};

const $ = (id) => document.getElementById(id);
const body = document.body;

const state = {
  kind: "", // "server" | "gateway", from /v1/dashboard
  sessions: new Map(), // id -> session (see newSession)
  offset: null, // this page's clock - the server's wall clock, seconds
  eoff: null, // the server's wall clock - the engine's clock (events' `time`), seconds
  events: 0,
  calls: 0,
  toolsDone: 0,
  toolWait: 0,
  toolsRunning: 0,
  toolsQueued: 0,
  gauges: null,
  history: [], // {t, kv, pin, active, window, queued}
  kvMax: 0,
  stream: "connecting",
  connected: false, // the stream was started (after the first gauges)
  abort: null,
  retry: null,
  pollTimer: null,
  window: null, // the last admission_window event's

};

// ---- the key -------------------------------------------------------------------------------
function key() {
  return sessionStorage.getItem(KEY_SLOT) || "";
}

function headers() {
  const k = key();
  return k ? { Authorization: "Bearer " + k } : {};
}

$("keyform").addEventListener("submit", (e) => {
  e.preventDefault();
  const k = $("key").value.trim();
  if (k) sessionStorage.setItem(KEY_SLOT, k);
  $("key").value = "";
  restart();
});
$("forget").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_SLOT);
  restart();
});

function setStream(s, text) {
  state.stream = s;
  body.dataset.stream = s;
  $("stream").dataset.state = s;
  $("stream").textContent = text || s;
  $("key").placeholder = key() ? "key set (type to replace)" : "only if the server has keys";
}

// ---- the event stream ----------------------------------------------------------------------
async function connect() {
  clearTimeout(state.retry);
  const ctrl = new AbortController();
  state.abort = ctrl;
  setStream("connecting", "connecting…");
  try {
    const r = await fetch("v1/events", { headers: headers(), signal: ctrl.signal, cache: "no-store" });
    if (r.status === 401) return unauthorized();
    if (!r.ok || !r.body) throw new Error("HTTP " + r.status);
    setStream("live", "live");
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:"));
        if (data.length) onRecord(data.map((l) => l.slice(5).trim()).join("\n"));
      }
    }
    throw new Error("the stream ended");
  } catch (e) {
    if (ctrl.signal.aborted) return;
    setStream("error", "reconnecting (" + (e.message || e) + ")");
    state.retry = setTimeout(connect, 2000);
  }
}

function unauthorized() {
  setStream("unauthorized", key() ? "wrong API key" : "API key needed");
  $("key").focus();
}

// The stream starts after the first gauges arrive: they say whether this is a server or a
// gateway, which decides what a `request_emit` opens.
function restart() {
  if (state.abort) state.abort.abort();
  state.abort = null;
  clearTimeout(state.retry);
  state.connected = false;
  poll();
}

function onRecord(text) {
  let ev;
  try {
    ev = JSON.parse(text);
  } catch {
    return;
  }
  if (ev.event === "dropped") {
    $("dropped").textContent = "(the page fell behind: " + ev.count + " events lost)";
    return;
  }
  state.events += 1;
  if (typeof ev.time === "number" && typeof ev.ts === "number") {
    const d = ev.ts - ev.time;
    if (state.eoff === null || d < state.eoff) state.eoff = d;
  }
  apply(ev);
}

// ---- sessions and their phases -------------------------------------------------------------
function newSession(id, t) {
  return { id, first: t, done: null, rejected: false, segs: [], calls: 0, tools: 0,
           pinned: 0, host: 0, li: null };
}

function session(id, t) {
  let s = state.sessions.get(id);
  if (!s) {
    s = newSession(id, t);
    state.sessions.set(id, s);
    trimRows();
  }
  return s;
}

// The open phase of a session's main lane (at most one), or its open KV strip of `kind`.
function open(s, kinds) {
  for (let i = s.segs.length - 1; i >= 0; i--) {
    const g = s.segs[i];
    if (g.t1 === null && kinds.includes(g.kind)) return g;
  }
  return null;
}

const MAIN = ["admit", "wait", "prefill", "decode", "upstream", "toolq", "toolrun", "away"];

function close(s, kinds, t) {
  for (const g of s.segs) if (g.t1 === null && kinds.includes(g.kind)) g.t1 = Math.max(t, g.t0);
}

function begin(s, kind, t, label) {
  close(s, MAIN, t);
  s.segs.push({ kind, t0: t, t1: null, label: label || "" });
}

function apply(ev) {
  const t = ev.time;
  if (ev.event === "admission_window") {
    state.window = ev.window;
    return;
  }
  if (!ev.session_id) return;
  const s = session(ev.session_id, t);
  switch (ev.event) {
    case "session_arrived":
      begin(s, "admit", t);
      break;
    case "session_admitted":
      if (!open(s, ["admit"]) && ev.wait_s > 0) begin(s, "admit", t - ev.wait_s);
      close(s, ["admit"], t);
      break;
    case "request_emit":
      state.calls += 1;
      s.calls += 1;
      begin(s, state.kind === "gateway" ? "upstream" : "wait", t, ev.prompt_tokens + " tokens");
      break;
    case "gpu_submit":
      s.pinned = 0;
      close(s, ["pin"], t);
      begin(s, "prefill", t, ev.cached_tokens ? ev.cached_tokens + " cached" : "");
      break;
    case "gpu_first_token":
      begin(s, "decode", t);
      break;
    case "gpu_preempt":
      begin(s, "wait", t, "preempted");
      break;
    case "gpu_end":
      begin(s, "away", t);
      break;
    case "tool_enqueued":
      state.toolsQueued += 1;
      begin(s, "toolq", t, ev.category);
      break;
    case "tool_start":
      state.toolsQueued = Math.max(0, state.toolsQueued - 1);
      state.toolsRunning += 1;
      begin(s, "toolrun", t, ev.category);
      break;
    case "tool_end":
      toolEnd(s, ev, t);
      break;
    case "kv_retain":
      s.pinned = ev.tokens;
      s.segs.push({ kind: "pin", t0: t, t1: null, label: ev.tokens + " tokens" });
      break;
    case "kv_offload":
      s.pinned = 0;
      s.host = ev.tokens;
      close(s, ["pin", "host"], t);
      s.segs.push({ kind: "host", t0: t, t1: null, label: ev.tokens + " tokens" });
      break;
    case "kv_restore":
      s.host = 0;
      close(s, ["host"], t);
      break;
    case "kv_evict":
      s.pinned = 0;
      close(s, ["pin"], t);
      break;
    case "session_done":
      s.done = t;
      s.rejected = !!ev.rejected;
      s.pinned = s.host = 0;
      close(s, Object.keys(PHASES), t);
      break;
  }
}

function toolEnd(s, ev, t) {
  const run = open(s, ["toolrun"]);
  if (run) {
    // a tool run through the tools API
    state.toolsRunning = Math.max(0, state.toolsRunning - 1);
    state.toolsDone += 1;
    state.toolWait += ev.queue_wait_s;
    s.tools += 1;
    begin(s, "away", t);
    return;
  }
  // A phase inferred when the session's next call arrived: the agent ran its tool elsewhere.
  const t0 = t - ev.duration_s;
  const prev = open(s, ["away", "upstream"]);
  if (prev) prev.t1 = Math.max(prev.t0, t0);
  close(s, MAIN, t0);
  s.segs.push({ kind: "inferred", t0, t1: t, label: ev.category });
  s.tools += 1;
}

function trimRows() {
  if (state.sessions.size <= MAX_ROWS) return;
  for (const [id, s] of state.sessions) {
    if (state.sessions.size <= MAX_ROWS) break;
    if (s.done !== null) {
      if (s.li) s.li.remove();
      state.sessions.delete(id);
    }
  }
}

// ---- gauges --------------------------------------------------------------------------------
async function poll() {
  clearTimeout(state.pollTimer);
  try {
    const r = await fetch("v1/dashboard", { headers: headers(), cache: "no-store" });
    if (r.status === 401) return unauthorized(); // polled again once a key is given
    if (r.ok) applyGauges(await r.json());
    else if (!state.connected) setStream("error", "waiting for the server (HTTP " + r.status + ")");
  } catch {
    if (!state.connected) setStream("error", "waiting for the server");
  }
  state.pollTimer = setTimeout(poll, POLL_MS);
}

const fmt = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en"));
const pct = (x) => (x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%");

function bytes(n) {
  if (!n) return "0 B";
  const u = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) (n /= 1024), i++;
  return n.toFixed(i ? 1 : 0) + " " + u[i];
}

function applyGauges(g) {
  state.offset = Date.now() / 1000 - g.ts;
  body.dataset.polls = String(Number(body.dataset.polls) + 1);
  if (state.kind !== g.kind) setKind(g.kind);
  if (!state.connected) {
    state.connected = true;
    connect();
  }
  state.gauges = g;
  $("policy").textContent = "policy: " + g.policy;
  const pinned = [...state.sessions.values()].reduce((a, s) => a + s.pinned, 0);
  const host = [...state.sessions.values()].reduce((a, s) => a + s.host, 0);
  const kv = g.kv_usage;
  const pinFrac = g.kv_tokens ? Math.min(1, pinned / g.kv_tokens) : 0;
  state.kvMax = Math.max(state.kvMax, kv || 0);
  $("kv-pct").textContent = pct(kv);
  $("kv-of").textContent = g.kv_tokens ? "of " + fmt(g.kv_tokens) + " tokens" : "";
  $("kv-bar").style.width = 100 * (kv || 0) + "%";
  $("kv-pin-bar").style.width = 100 * pinFrac + "%";
  $("kv-pinned").textContent = fmt(pinned) + " tokens";
  $("kv-host").textContent =
    fmt(host) + " tokens" + (g.host_kv_bytes !== undefined ? " · " + bytes(g.host_kv_bytes) : "");
  $("kv-moves").textContent = [g.evictions, g.offloads, g.restores].map(fmt).join(" / ");
  $("kv-hits").textContent = fmt(g.prefix_hit_tokens) + " / " + fmt(g.recomputed_tokens);
  const win = g.window ?? state.window ?? null;
  $("adm-active").textContent = fmt(g.active);
  $("adm-window").textContent = win === null ? "∞" : fmt(win);
  $("adm-bar").style.width = win ? Math.min(100, (100 * g.active) / win) + "%" : "0";
  $("adm-queued").textContent = fmt(g.queued);
  $("eng-rw").textContent = fmt(g.running) + " / " + fmt(g.waiting);
  $("eng-gen").textContent = fmt(g.generated_tokens);
  if (g.tools) workers(g.tools);
  if (g.upstreams) upstreams(g.upstreams);
  const d = body.dataset;
  d.kv = String(kv ?? "");
  d.kvMax = String(state.kvMax);
  d.pinned = String(pinned);
  d.host = String(host);
  d.window = String(win ?? "");
  d.active = String(g.active ?? "");
  d.queued = String(g.queued ?? "");
  state.history.push({ t: g.ts, kv: kv || 0, pin: pinFrac, active: g.active || 0,
                       window: win, queued: g.queued || 0 });
  if (state.history.length > HISTORY) state.history.shift();
}

function setKind(kind) {
  state.kind = kind;
  body.dataset.kind = kind;
  const gw = kind === "gateway";
  $("kind").textContent = gw ? "gateway dashboard" : "server dashboard";
  $("kv-title").textContent = gw ? "KV cache (all upstreams)" : "KV cache";
  $("card-tools").hidden = gw;
  $("kv-detail").hidden = gw; // pins and host copies are the upstreams' own
  $("card-up").hidden = !gw;
  $("note").hidden = !gw;
  $("note").textContent = gw
    ? "The gateway's own events: admission, each call sent upstream, and the tool phases " +
      "between calls (inferred when the next call arrives). GPU phases and KV pins are the " +
      "upstreams' (open each one's /dashboard); KV here is the upstreams' reported usage."
    : "";
  legend();
}

function workers(t) {
  const box = $("workers");
  while (box.children.length < t.workers) {
    const w = document.createElement("span");
    w.className = "worker";
    box.appendChild(w);
  }
  while (box.children.length > t.workers) box.lastChild.remove();
  [...box.children].forEach((w, i) => (w.dataset.busy = i < t.busy ? "1" : "0"));
  $("tools-busy").textContent = fmt(t.busy) + "/" + fmt(t.workers);
  $("tools-queued").textContent = fmt(t.queued);
  body.dataset.busy = String(t.busy);
  body.dataset.toolQueued = String(t.queued);
}

function upstreams(rows) {
  const tb = $("up-rows");
  tb.replaceChildren(
    ...rows.map((r) => {
      const tr = document.createElement("tr");
      const cells = [r.url, r.up ? "up" : "down" + (r.error ? ": " + r.error : ""),
        pct(r.kv_usage), fmt(r.running) + " / " + fmt(r.waiting), fmt(r.sessions),
        fmt(r.failures)];
      cells.forEach((c, i) => {
        const td = document.createElement("td");
        td.textContent = c;
        if (i >= 2) td.className = "num";
        tr.appendChild(td);
      });
      return tr;
    }),
  );
}

function legend() {
  const gw = state.kind === "gateway";
  const shown = Object.entries(PHASES).filter(([k]) =>
    gw ? ["admit", "upstream", "inferred", "away"].includes(k) : k !== "upstream");
  $("legend").replaceChildren(
    ...shown.map(([, p]) => swatch(p.color, p.text)),
    swatch("#1f2328", "session ended"),
  );
}

function swatch(color, text) {
  const span = document.createElement("span");
  const i = document.createElement("i");
  i.style.background = color;
  span.append(i, text);
  return span;
}

// ---- drawing -------------------------------------------------------------------------------
// Now on the engine's clock, the one every phase is placed on.
function now() {
  return Date.now() / 1000 - (state.offset ?? 0) - (state.eoff ?? 0);
}

function view() {
  const t1 = now();
  const span = Number($("span").value);
  if (span) return [t1 - span, t1];
  let t0 = t1 - 10;
  for (const s of state.sessions.values()) t0 = Math.min(t0, s.first);
  return [t0, t1];
}

function step(span) {
  for (const s of [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600])
    if (span / s <= 8) return s;
  return 7200;
}

function clock(t) {
  return new Date(t * 1000).toTimeString().slice(0, 8);
}

function fit(canvas, height) {
  const box = canvas.parentElement;
  const pad = getComputedStyle(box);
  const w = box.clientWidth - parseFloat(pad.paddingLeft) - parseFloat(pad.paddingRight);
  const dpr = window.devicePixelRatio || 1;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(height * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(height * dpr);
    canvas.style.width = w + "px";
    canvas.style.height = height + "px";
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  return [ctx, w];
}

function grid(ctx, w, h, t0, t1, labels) {
  const x = (t) => ((t - t0) / (t1 - t0)) * w;
  const st = step(t1 - t0);
  ctx.strokeStyle = "#eaeef2";
  ctx.fillStyle = "#656d76";
  ctx.font = "11px system-ui, sans-serif";
  for (let t = Math.ceil(t0 / st) * st; t <= t1; t += st) {
    ctx.beginPath();
    ctx.moveTo(x(t) + 0.5, labels ? AXIS - 6 : 0);
    ctx.lineTo(x(t) + 0.5, h);
    ctx.stroke();
    if (labels) ctx.fillText(clock(t + (state.eoff ?? 0)), x(t) + 3, 12);
  }
  return x;
}

function drawLanes() {
  const list = [...state.sessions.values()].sort((a, b) => a.first - b.first);
  syncRows(list);
  const h = AXIS + list.length * ROW;
  const [ctx, w] = fit($("lanes"), h);
  const [t0, t1] = view();
  ctx.clearRect(0, 0, w, h);
  const x = grid(ctx, w, h, t0, t1, true);
  const tn = now();
  list.forEach((s, i) => {
    const y = AXIS + i * ROW;
    for (const g of s.segs) {
      const a = Math.max(x(g.t0), 0);
      const b = Math.min(x(g.t1 ?? tn), w);
      if (b <= 0 || a >= w) continue;
      const p = PHASES[g.kind];
      ctx.fillStyle = p.color;
      if (p.lane === "kv") ctx.fillRect(a, y + ROW - 5, Math.max(1, b - a), 3);
      else ctx.fillRect(a, y + 3, Math.max(1, b - a), ROW - 9);
    }
    if (s.done !== null && x(s.done) >= 0 && x(s.done) <= w) {
      ctx.fillStyle = s.rejected ? "#d93025" : "#1f2328";
      ctx.fillRect(x(s.done) - 1, y + 1, 2, ROW - 4);
    }
  });
  $("empty").hidden = list.length > 0;
}

// One <li> per session, in the timeline's order: id, and what it does now.
function syncRows(list) {
  const ol = $("rows");
  list.forEach((s, i) => {
    if (!s.li) {
      s.li = document.createElement("li");
      s.li.dataset.session = s.id;
      s.li.title = s.id;
    }
    const cur = open(s, MAIN);
    const phase = s.done !== null ? (s.rejected ? "rejected" : "done") : cur ? cur.kind : "";
    s.li.textContent = s.id;
    s.li.dataset.phase = phase;
    s.li.dataset.calls = String(s.calls);
    s.li.dataset.tools = String(s.tools);
    s.li.dataset.done = s.done !== null ? "1" : "0";
    s.li.title = s.id + " · " + s.calls + " calls, " + s.tools + " tools" +
      (phase ? " · " + (PHASES[phase] ? PHASES[phase].text : phase) : "");
    if (ol.children[i] !== s.li) ol.insertBefore(s.li, ol.children[i] || null);
  });
  while (ol.children.length > list.length) ol.lastChild.remove();
  const d = body.dataset;
  d.sessions = String(list.length);
  d.events = String(state.events);
  d.calls = String(state.calls);
  d.toolsDone = String(state.toolsDone);
  $("tools-done").textContent = fmt(state.toolsDone);
  $("tools-wait").textContent = state.toolsDone
    ? (state.toolWait / state.toolsDone).toFixed(2) + " s" : "–";
}

function drawHistory() {
  const h = 110;
  const [ctx, w] = fit($("history"), h);
  const [t0, t1] = view();
  ctx.clearRect(0, 0, w, h);
  const x = grid(ctx, w, h, t0, t1, false);
  const eoff = state.eoff ?? 0; // gauge samples carry wall time
  const pts = state.history.filter((p) => p.t - eoff >= t0 - 2);
  const top = Math.max(1, ...pts.map((p) => Math.max(p.active, p.window || 0, p.queued)));
  const series = [
    ["KV used", "#4285f4", (p) => p.kv, 1],
    ["KV pinned", "#ff6d00", (p) => p.pin, 1],
    ["active sessions", "#0f9d58", (p) => p.active, top],
    ["window", "#5f6368", (p) => p.window, top],
    ["queued", "#ab47bc", (p) => p.queued, top],
  ];
  for (const [, color, get, scale] of series) {
    ctx.strokeStyle = color;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    let started = false;
    for (const p of pts) {
      const v = get(p);
      if (v === null || v === undefined) continue;
      const px = x(p.t - eoff);
      const py = h - 4 - (v / scale) * (h - 12);
      if (started) ctx.lineTo(px, py);
      else ctx.moveTo(px, py), (started = true);
    }
    ctx.stroke();
  }
  const scale = document.createElement("span");
  scale.textContent = "(KV: 0–100%; sessions: 0–" + top + ")";
  $("history-legend").replaceChildren(
    ...series.map(([name, color]) => swatch(color, name)),
    scale,
  );
}

function draw() {
  try {
    drawLanes();
    drawHistory();
  } finally {
    setTimeout(() => requestAnimationFrame(draw), 250);
  }
}

legend();
restart();
draw();
