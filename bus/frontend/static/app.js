// lcbus demo page: start a run, stream its answer over EventSource (resuming by
// last event id after a dropped connection), draw the live trace waterfall and
// list webhook deliveries. Plain JS, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const run = {
  traceId: params.get("trace"), token: params.get("token"), source: null, lastEventId: "",
  seen: new Set(), text: "", events: 0, reconnects: 0, duplicates: 0, done: false, doneAt: 0,
  poll: null,
};
window.lcbus = run; // for tests and curious people

function setStatus(text) { $("status").textContent = text; }

function streamUrl() {
  const query = new URLSearchParams({ token: run.token });
  if (run.lastEventId) query.set("lastEventID", run.lastEventId);
  return `/traces/${encodeURIComponent(run.traceId)}/stream?${query}`;
}

function onEnvelope(message) {
  const envelope = JSON.parse(message.data);
  if (run.seen.has(envelope.seq)) { run.duplicates += 1; return; }
  run.seen.add(envelope.seq);
  run.lastEventId = message.lastEventId || envelope.event_id;
  run.events += 1;
  const data = envelope.params.data || {};
  if (envelope.method === "messages" && data.event === "content-block-delta"
      && data.delta && data.delta.type === "text-delta") {
    run.text += data.delta.text;
    $("answer").textContent = run.text;
  }
  $("event-count").textContent = run.events;
  $("duplicates").textContent = run.duplicates;
}

function connect() {
  const source = new EventSource(streamUrl());
  run.source = source;
  source.onmessage = onEnvelope;
  source.addEventListener("end", () => { source.close(); finish("complete"); });
  source.addEventListener("error", (event) => {
    if (event.data) { // a server error frame
      const body = JSON.parse(event.data);
      if (body.retryable) return; // Redis was unavailable: the browser reconnects after retry: ms
      source.close(); // the stream cannot go on
      finish("stream error: " + body.code);
    } // otherwise the browser reconnects by itself, sending Last-Event-ID
  });
  $("reconnect").disabled = false;
}

function dropConnection() {
  if (!run.source || run.done) return;
  run.source.close();
  run.reconnects += 1;
  $("reconnects").textContent = run.reconnects;
  connect(); // resumes after run.lastEventId
}

function finish(status) {
  run.done = true;
  run.doneAt = Date.now();
  $("reconnect").disabled = true;
  setStatus(status);
}

async function getJson(url) {
  const response = await fetch(url, { headers: { Authorization: `Bearer ${run.token}` } });
  return response.ok ? response.json() : null;
}

function flatten(node, depth, rows) {
  rows.push({ node, depth });
  for (const child of node.children || []) flatten(child, depth + 1, rows);
  return rows;
}

function drawWaterfall(trace) {
  const box = $("waterfall");
  if (!trace || !(trace.root || trace.orphans.length)) return;
  // Runs whose parent has not reached the bus yet are drawn after the root's tree.
  const tops = (trace.root ? [trace.root] : []).concat(trace.orphans);
  const rows = tops.flatMap((top) => flatten(top, 0, []));
  const now = Date.now() / 1000;
  const start = Math.min(...tops.map((top) => top.start_time ?? now));
  const end = Math.max(...rows.map((r) => r.node.end_time || now), start + 0.001);
  box.replaceChildren(...rows.map(({ node, depth }) => {
    const row = document.createElement("div");
    row.className = "row" + (node.status === "error" ? " error" : "");
    row.dataset.runId = node.id;
    const label = document.createElement("div");
    label.className = "label";
    label.style.paddingLeft = `${depth * 14}px`;
    label.textContent = node.name + (node.error ? ` — ${node.error}` : "");
    const track = document.createElement("div");
    track.className = "track";
    const bar = document.createElement("div");
    bar.className = `bar ${node.run_type}`;
    const left = ((node.start_time || start) - start) / (end - start);
    const right = ((node.end_time || now) - start) / (end - start);
    bar.style.left = `${(left * 100).toFixed(2)}%`;
    bar.style.width = `${Math.max((right - left) * 100, 0.3).toFixed(2)}%`;
    const note = document.createElement("span");
    // null: the provider did not report usage (unknown, which is not 0).
    const unknown = node.model_type && node.end_time != null ? " · tokens unknown" : "";
    const tokens = node.usage ? ` · ${node.usage.total_tokens ?? "?"} tok` : unknown;
    const ms = node.duration_ms == null ? "running" : `${node.duration_ms.toFixed(1)} ms`;
    note.textContent = ms + tokens;
    bar.append(note);
    track.append(bar);
    row.append(label, track);
    return row;
  }));
}

function drawDeliveries(rows) {
  const body = $("deliveries").querySelector("tbody");
  body.replaceChildren(...(rows || []).map((d) => {
    const tr = document.createElement("tr");
    const ok = d.status >= 200 && d.status < 300;
    for (const [text, cls] of [[d.type, ""], [d.attempt, ""], [d.status || d.error || "…", ok ? "ok" : "failed"],
                               [d.latency_ms == null ? "" : `${Math.round(d.latency_ms)} ms`, ""]]) {
      const td = document.createElement("td");
      td.textContent = text;
      if (cls) td.className = cls;
      tr.append(td);
    }
    return tr;
  }));
}

// The tree and the deliveries settle after the stream ends (the trace worker and
// the webhook worker run on their own): keep polling a while after the end.
const SETTLE_MS = 10000;

async function refresh() {
  const trace = await getJson(`/traces/${encodeURIComponent(run.traceId)}`);
  drawWaterfall(trace);
  drawDeliveries(await getJson(`/demo/deliveries?trace=${encodeURIComponent(run.traceId)}`));
  if (run.done && Date.now() - run.doneAt > SETTLE_MS) { clearInterval(run.poll); run.poll = null; }
}

function follow(traceId, token) {
  Object.assign(run, { traceId, token, lastEventId: "", seen: new Set(), text: "", events: 0,
                       reconnects: 0, duplicates: 0, done: false });
  $("answer").textContent = "";
  setStatus(`streaming trace ${traceId}`);
  connect();
  clearInterval(run.poll);
  run.poll = setInterval(refresh, 300);
}

$("prompt-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const response = await fetch("/demo/runs", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ prompt: $("prompt").value }),
  });
  if (!response.ok) {
    setStatus(response.status === 404
      ? "runs start only in demo mode; open this page with ?trace=ID&token=TOKEN to watch a trace"
      : `could not start the run (${response.status})`);
    return;
  }
  const started = await response.json();
  follow(started.trace_id, started.token);
});
$("reconnect").addEventListener("click", dropConnection);

if (run.traceId && run.token) follow(run.traceId, run.token);
