// The playground page: plain JavaScript over diffrwkv serve's JSON API, an SVG bar chart, nothing loaded from outside.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg"; // the SVG namespace name (an identifier, not fetched)
let pending = 0;
let walk = null; // the last interpolation: {alphas, texts}

function busy(delta) {
  pending += delta;
  document.body.dataset.busy = String(pending); // tests wait for "0"
  for (const b of document.querySelectorAll("button")) b.disabled = pending > 0;
}

function showError(msg) {
  const el = $("error");
  el.textContent = msg || "";
  el.hidden = !msg;
}

async function call(path, body) {
  busy(+1);
  try {
    const res = await fetch(path, body === undefined ? {} : {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
    });
    const data = await res.json().catch(() => ({error: `${path}: HTTP ${res.status}`}));
    if (!res.ok || data.error) throw new Error(data.error || `${path}: HTTP ${res.status}`);
    showError("");
    return data;
  } catch (err) {
    showError(err.message);
    throw err;
  } finally {
    busy(-1);
  }
}

function el(tag, attrs, parent) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}

// Grouped bars: one group per latent dimension, the model's latent beside the encoder's.
function drawChart(series) {
  const svg = $("chart");
  svg.replaceChildren();
  const W = svg.clientWidth || 600, H = svg.clientHeight || 210, pad = 18;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const shown = series.filter((s) => s.values);
  if (!shown.length) return;
  const D = shown[0].values.length;
  const top = Math.max(1e-6, ...shown.flatMap((s) => s.values.map(Math.abs)));
  const mid = H / 2, scale = (H / 2 - pad) / top, group = (W - 2 * pad) / D, bar = group * 0.8 / shown.length;
  el("line", {x1: pad, x2: W - pad, y1: mid, y2: mid, stroke: "#9aa3b2", "stroke-width": 1}, svg);
  shown.forEach((s, k) => {
    s.values.forEach((v, i) => {
      const h = Math.abs(v) * scale;
      const r = el("rect", {x: pad + i * group + group * 0.1 + k * bar, y: v >= 0 ? mid - h : mid,
                            width: Math.max(bar - 0.5, 0.5), height: Math.max(h, 0.5), class: s.cls}, svg);
      el("title", {}, r).textContent = `${s.name} dim ${i}: ${v.toFixed(3)}`;
    });
  });
  for (let i = 0; i < D; i += 4) {
    const t = el("text", {x: pad + i * group + group / 2, y: H - 4, "font-size": 9, fill: "#7a8394",
                          "text-anchor": "middle"}, svg);
    t.textContent = String(i);
  }
}

function showNeighbours(list) {
  const ol = $("neighbours");
  ol.replaceChildren();
  if (!list) {
    ol.innerHTML = "<li>the training data is not on this machine</li>";
    return;
  }
  for (const n of list) {
    const li = document.createElement("li");
    li.textContent = n.text;
    const c = document.createElement("span");
    c.textContent = n.cosine.toFixed(3);
    li.appendChild(c);
    ol.appendChild(li);
  }
}

async function encode() {
  const r = await call("/api/encode", {text: $("text").value});
  drawChart([{name: "model", cls: "model", values: r.latent},
             {name: "encoder", cls: "encoder", values: r.encoder_latent}]);
  $("cosine").textContent = r.cosine === null ? "no encoder" : r.cosine.toFixed(3);
  showNeighbours(r.neighbours);
  return r;
}

async function decode() {
  const out = $("decoded");
  out.textContent = "";
  $("back").textContent = "";
  delete out.dataset.done;
  const [, r] = await Promise.all([encode(), call("/api/decode", {text: $("text").value, source: $("source").value})]);
  out.textContent = r.text || "(empty)";
  $("back").textContent = r.roundtrip_cosine === null ? "" :
    `(re-encoded: cosine ${r.roundtrip_cosine.toFixed(3)} to the latent decoded)`;
  out.dataset.done = "1";
}

function showStep(i) {
  if (!walk) return;
  $("alpha").textContent = `step ${i} of ${walk.texts.length - 1} (${(walk.alphas[i] * 100).toFixed(0)}% of the way):`;
  $("walked").textContent = walk.texts[i] || "(empty)";
  [...$("path").children].forEach((li, k) => li.classList.toggle("current", k === i));
}

async function interpolate() {
  const n = parseInt($("points").value, 10) || 9;
  walk = await call("/api/interpolate", {a: $("a").value, b: $("b").value, n});
  const ol = $("path");
  ol.replaceChildren();
  for (const t of walk.texts) {
    const li = document.createElement("li");
    li.textContent = t || "(empty)";
    ol.appendChild(li);
  }
  const s = $("slider");
  s.max = String(walk.texts.length - 1);
  s.value = "0";
  s.disabled = false;
  showStep(0);
}

async function init() {
  busy(0);
  const info = await call("/api/info");
  $("info").textContent = `${info.source} (step ${info.step}), ${info.latent_dim}-d latents` +
    (info.has_encoder ? ", the data's encoder available" : ", no data encoder found (model latents only)");
  if (!info.has_encoder) $("source").value = "model";
  $("source").disabled = !info.has_encoder;
}

const quiet = (fn) => () => fn().catch(() => {}); // errors are shown in #error
$("encode").addEventListener("click", quiet(encode));
$("decode").addEventListener("click", quiet(decode));
$("interpolate").addEventListener("click", quiet(interpolate));
$("slider").addEventListener("input", (e) => showStep(parseInt(e.target.value, 10)));
$("text").addEventListener("keydown", (e) => { if (e.key === "Enter") quiet(decode)(); });
init().catch(() => {});
