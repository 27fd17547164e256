"""The dashboard page: one HTML document with its script inline, nothing to build or fetch.

It opens ``EVENTS_PATH`` as an ``EventSource`` and redraws three tables from each frame
(feed.py): workers (host, models, devices, uptime), models (versions, workers, req/s with a
one-minute chart, batch size, queue and compute time, p50/p99, errors by code, health) and,
on a shared bus, usage per user. Values are set as text (``textContent``), never as HTML:
worker, model and user names come from the workers, and are not trusted.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

EVENTS_PATH: Final = "/dashboard/events"

PAGE: Final = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>inferbus</title>
<style>
  body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
  h1 { font-size: 1.3em; margin: 0 0 .2em; }
  h2 { font-size: 1.05em; margin: 1.4em 0 .4em; }
  table { border-collapse: collapse; }
  th, td { padding: .25em .7em; border-bottom: 1px solid #ddd; text-align: left; }
  td.n { text-align: right; font-variant-numeric: tabular-nums; }
  #state { color: #777; }
  .bad { color: #b00; }
  canvas { vertical-align: middle; }
</style>
</head>
<body>
<h1>inferbus</h1>
<div id="state">connecting...</div>
<h2>Workers</h2>
<table id="workers"><thead><tr><th>host</th><th>pid</th><th>models</th><th>devices</th>
<th>up</th></tr></thead><tbody></tbody></table>
<h2>Models</h2>
<table id="models"><thead><tr><th>model</th><th>workers</th><th>req/s</th><th>last minute</th>
<th>batch</th><th>queue ms</th><th>compute ms</th><th>p50 / p99 compute</th><th>pending</th>
<th>errors</th><th>health</th></tr></thead><tbody></tbody></table>
<h2>Usage by user</h2>
<table id="users"><thead><tr><th>model</th><th>user</th><th>requests</th><th>rows</th>
<th>compute s</th><th>refused</th></tr></thead><tbody></tbody></table>
<script>
"use strict";
const history = new Map();  // "model vN" -> recent req/s, one point a frame
const POINTS = 60;

// a figure with `digits` decimals; anything that is not a number (null from NaN) shows "?"
function fixed(value, digits) {
  return typeof value === "number" ? value.toFixed(digits) : "?";
}

function cell(row, text, numeric) {
  const td = row.insertCell();
  td.textContent = text;
  if (numeric) td.className = "n";
  return td;
}

function fill(id, rows, draw) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren();
  for (const item of rows) draw(body.insertRow(), item);
}

function spark(values) {
  const canvas = document.createElement("canvas");
  canvas.width = 120; canvas.height = 24;
  const g = canvas.getContext("2d");
  const top = Math.max(1, ...values);
  g.strokeStyle = "#2a6"; g.beginPath();
  values.forEach((v, i) => {
    const x = i * (canvas.width - 1) / (POINTS - 1), y = canvas.height - 1 - v / top * 22;
    i ? g.lineTo(x, y) : g.moveTo(x, y);
  });
  g.stroke();
  return canvas;
}

function draw(frame) {
  const when = new Date(frame.taken * 1000).toLocaleTimeString();
  document.getElementById("state").textContent =
    frame.workers.length + " worker(s), updated " + when;
  fill("workers", frame.workers, (row, w) => {
    cell(row, w.host); cell(row, w.pid, true); cell(row, w.models.join(", "));
    cell(row, w.devices.join(", ")); cell(row, Math.round(w.uptime_s) + " s", true);
  });
  fill("models", frame.models, (row, m) => {
    const key = m.name + " v" + m.version;
    const points = history.get(key) || [];
    points.push(m.requests_per_s); if (points.length > POINTS) points.shift();
    history.set(key, points);
    cell(row, key); cell(row, m.workers, true);
    cell(row, fixed(m.requests_per_s, 1), true).dataset.rate = m.requests_per_s;
    row.insertCell().appendChild(spark(points));
    cell(row, fixed(m.mean_batch_size, 1), true); cell(row, fixed(m.queue_ms, 2), true);
    cell(row, fixed(m.compute_ms, 2), true);
    const p50 = fixed(m.compute_p50_ms || 0, 2), p99 = fixed(m.compute_p99_ms || 0, 2);
    cell(row, p50 + " / " + p99, true);
    cell(row, m.pending, true);
    const codes = Object.entries(m.errors_by_code).map(([c, n]) => c + ": " + n).join(", ");
    cell(row, codes || "0").className = codes ? "bad" : "";
    cell(row, m.unhealthy.length ? m.unhealthy.join("; ") : "ready").className =
      m.unhealthy.length ? "bad" : "";
  });
  const usage = [];
  for (const [model, rows] of Object.entries(frame.users))
    for (const u of rows) usage.push([model, u]);
  fill("users", usage, (row, [model, u]) => {
    cell(row, model); cell(row, u.user); cell(row, u.requests, true); cell(row, u.rows, true);
    cell(row, fixed(u.compute_s, 3), true); cell(row, u.refused, true);
  });
}

const FIRST = null;
if (FIRST) draw(FIRST);
const events = new EventSource("EVENTS_PATH");
events.onmessage = (message) => draw(JSON.parse(message.data));
events.onerror = () => {
  document.getElementById("state").textContent = "connection lost; retrying...";
};
</script>
</body>
</html>
""".replace("EVENTS_PATH", EVENTS_PATH)

_FIRST_SLOT: Final = "const FIRST = null;"


def script_json(value: Any) -> str:
    """``value`` as JSON that is safe inside a ``<script>`` element: ``<`` (which could end
    the element or open a comment there, ``</script>``, ``<!--``) and the line separators
    U+2028/U+2029 are escaped; each can only occur inside a JSON string, where the escape means
    the same."""
    text = orjson.dumps(value).decode()
    return text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def page(first: dict[str, Any] | None) -> bytes:
    """The page, showing ``first`` (a frame) until its feed sends the next; none: empty."""
    if first is None:
        return PAGE.encode()
    return PAGE.replace(_FIRST_SLOT, f"const FIRST = {script_json(first)};").encode()
