// The page at /: pick a model, classify images through /v1, and draw them on the version's
// bottleneck map. Plain JavaScript, no library; everything comes from this server.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
  "#7f7f7f", "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
  "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5"];
const W = 640, H = 520, PAD = 36;

const $ = (id) => document.getElementById(id);
const state = { models: [], map: null, labels: [], results: [] };

function colour(index) { return PALETTE[index % PALETTE.length]; }

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text) node.textContent = text;
  return node;
}

function svg(tag, attrs = {}, text = "") {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text) node.textContent = text;
  return node;
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const token = $("token").value.trim();
  if (token) headers.set("Authorization", "Bearer " + token);
  const response = await fetch(path, { ...options, headers });
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (response.status === 401) $("token-field").hidden = false;
  if (!response.ok) {
    const message = (body && body.error) || response.status + " " + response.statusText;
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return body;
}

// ---- models and versions

async function loadModels() {
  try {
    const answer = await api("/v1/models");
    state.models = answer.models;
  } catch (e) {
    status("Cannot list the models: " + e.message + (e.status === 401 ? " (enter the token)" : ""), true);
    return;
  }
  const select = $("model");
  select.replaceChildren();
  for (const m of state.models) select.append(el("option", { value: m.name }, m.name));
  if (!state.models.length) { status("The server has no model loaded yet.", true); return; }
  fillVersions();
}

function fillVersions() {
  const model = state.models.find((m) => m.name === $("model").value);
  const select = $("version");
  select.replaceChildren();
  for (const v of [...model.versions].reverse()) {
    select.append(el("option", { value: String(v) }, v === model.default_version ? v + " (newest)" : String(v)));
  }
  state.results = [];
  renderResults();
  loadMap();
}

function target() {
  return "/v1/models/" + encodeURIComponent($("model").value) + "/versions/" + $("version").value;
}

async function loadMap() {
  state.map = null;
  state.labels = [];
  try {
    const described = await api(target());
    state.labels = described.labels;
    if (described.map) {
      state.map = await api(described.map);
      const s = state.map.source, n = state.map.points.x.length;
      const which = n === s.size ? `all ${n.toLocaleString()} images` : `${n.toLocaleString()} of the ${s.size.toLocaleString()} images`;
      $("map-note").textContent = `Faint points: ${which} of the ${s.dataset} ${s.split} set, ` +
        "coloured by true class (hover names it); stars: your images, numbered as in the list.";
    } else {
      $("map-note").textContent = "This version has no bottleneck map (" + described.map_absent_reason +
        "); your images are drawn alone.";
    }
  } catch (e) {
    $("map-note").textContent = "No map: " + e.message;
  }
  drawMap();
}

// ---- classifying

async function classify(files) {
  if (!files.length) return;
  const images = [...files].filter((f) => f.size > 0);
  const form = new FormData();
  images.forEach((file, i) => form.append("image", file, file.name || "pasted-" + (i + 1) + ".png"));
  const topK = Math.max(1, Math.min(20, parseInt($("top-k").value, 10) || 3));
  status(`Classifying ${images.length} image${images.length === 1 ? "" : "s"} ...`);
  try {
    const answer = await api(target() + ":classify?top_k=" + topK, { method: "POST", body: form });
    state.results = answer.results.map((r, i) => ({ ...r, file: images[i], url: URL.createObjectURL(images[i]) }));
    const failed = state.results.filter((r) => r.error).length;
    status(`${answer.model} v${answer.version}: ${state.results.length - failed} classified` +
      (failed ? `, ${failed} could not be` : "") + ".", failed === state.results.length);
  } catch (e) {
    status("Classification failed: " + e.message, true);
    return;
  }
  renderResults();
  drawMap();
}

function renderResults() {
  const box = $("results");
  box.replaceChildren();
  state.results.forEach((r, i) => {
    const card = el("article", { class: "result" + (r.error ? " failed" : ""), "data-index": String(i) });
    card.append(el("img", { src: r.url, alt: r.id || "image " + (i + 1) }));
    const body = el("div");
    body.append(el("div", { class: "name" }, `${i + 1}. ${r.id || "image"}`));
    if (r.error) {
      card.dataset.error = r.error.code;
      body.append(el("div", { class: "error" }, r.error.code + ": " + r.error.message));
    } else {
      card.dataset.label = r.label;
      body.append(el("div", { class: "label" }, `${r.label} (${(100 * r.confidence).toFixed(1)}%)`));
      for (const s of r.top_k) {
        const bar = el("div", { class: "bar" });
        bar.append(el("span", {}, s.label));
        const track = el("div", { class: "track" });
        const fill = el("div", { class: "fill" });
        fill.style.width = (100 * s.score).toFixed(1) + "%";
        track.append(fill);
        bar.append(track, el("span", { class: "score" }, s.score.toFixed(3)));
        body.append(bar);
      }
      body.append(el("div", { class: "where" }, `bottleneck (${r.bottleneck.x.toFixed(3)}, ${r.bottleneck.y.toFixed(3)})`));
    }
    card.append(body);
    box.append(card);
  });
}

// ---- the map

function extent() {
  const xs = [], ys = [];
  if (state.map) {
    const e = state.map.extent;
    xs.push(e.x_min, e.x_max); ys.push(e.y_min, e.y_max);
  }
  for (const r of state.results) if (!r.error) { xs.push(r.bottleneck.x); ys.push(r.bottleneck.y); }
  if (!xs.length) return null;
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x1 - x0 < 1e-9) { x0 -= 1; x1 += 1; }
  if (y1 - y0 < 1e-9) { y0 -= 1; y1 += 1; }
  const mx = (x1 - x0) * 0.04, my = (y1 - y0) * 0.04;
  return [x0 - mx, x1 + mx, y0 - my, y1 + my];
}

function star(cx, cy, r) {
  let d = "";
  for (let i = 0; i < 10; i++) {
    const radius = i % 2 ? r * 0.45 : r, angle = Math.PI / 5 * i - Math.PI / 2;
    d += (i ? "L" : "M") + (cx + radius * Math.cos(angle)).toFixed(1) + " " + (cy + radius * Math.sin(angle)).toFixed(1);
  }
  return d + "Z";
}

function drawMap() {
  const map = $("map");
  map.replaceChildren();
  const box = extent();
  const legend = $("legend");
  legend.replaceChildren();
  if (!box) {
    map.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "tick" }, "nothing to draw yet"));
    return;
  }
  const [x0, x1, y0, y1] = box;
  const sx = (x) => PAD + (x - x0) / (x1 - x0) * (W - 2 * PAD);
  const sy = (y) => H - PAD - (y - y0) / (y1 - y0) * (H - 2 * PAD);
  map.append(svg("line", { x1: PAD, y1: H - PAD, x2: W - PAD, y2: H - PAD, class: "axis" }));
  map.append(svg("line", { x1: PAD, y1: PAD, x2: PAD, y2: H - PAD, class: "axis" }));
  for (let i = 0; i <= 4; i++) {
    const x = x0 + (x1 - x0) * i / 4, y = y0 + (y1 - y0) * i / 4;
    map.append(svg("text", { x: sx(x), y: H - PAD + 14, "text-anchor": "middle", class: "tick" }, x.toFixed(2)));
    map.append(svg("text", { x: PAD - 4, y: sy(y) + 3, "text-anchor": "end", class: "tick" }, y.toFixed(2)));
  }
  map.append(svg("text", { x: W / 2, y: H - 6, "text-anchor": "middle", class: "tick" }, "bottleneck x"));
  map.append(svg("text", { x: 10, y: H / 2, transform: `rotate(-90 10 ${H / 2})`, "text-anchor": "middle", class: "tick" }, "bottleneck y"));
  const labels = state.map ? state.map.labels : state.labels;
  if (state.map) {
    const p = state.map.points, cloud = svg("g", { class: "cloud" });
    for (let i = 0; i < p.x.length; i++) {
      const dot = svg("circle", { cx: sx(p.x[i]).toFixed(1), cy: sy(p.y[i]).toFixed(1), r: 2.2,
        fill: colour(p.label[i]), "fill-opacity": 0.35, class: "map-point" });
      dot.append(svg("title", {}, labels[p.label[i]]));
      cloud.append(dot);
    }
    map.append(cloud);
    for (const c of state.map.centroids) {
      map.append(svg("text", { x: sx(c.x), y: sy(c.y), "text-anchor": "middle", fill: colour(c.label_index), class: "centroid" }, c.label));
    }
  }
  state.results.forEach((r, i) => {
    if (r.error) return;
    const x = sx(r.bottleneck.x), y = sy(r.bottleneck.y);
    const shape = svg("path", { d: star(x, y, 9), fill: colour(r.label_index), class: "image-point", "data-index": String(i) });
    shape.append(svg("title", {}, `${i + 1}. ${r.id || "image"}: ${r.label} (${(100 * r.confidence).toFixed(1)}%)`));
    map.append(shape, svg("text", { x: x + 10, y: y - 8, class: "image-label" }, String(i + 1)));
  });
  labels.forEach((name, i) => {
    const item = el("span", {}, name);
    item.style.setProperty("--swatch", colour(i));
    legend.append(item);
  });
}

// ---- input: choose, drop, paste

function wire() {
  $("model").addEventListener("change", fillVersions);
  $("version").addEventListener("change", () => { state.results = []; renderResults(); loadMap(); });
  $("files").addEventListener("change", (e) => { classify(e.target.files); e.target.value = ""; });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); classify(e.dataTransfer.files); });
  document.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData ? e.clipboardData.files : [])];
    if (files.length) { e.preventDefault(); classify(files); }
  });
  $("token").addEventListener("change", loadModels);
  const metrics = document.body.dataset.metricsPort;
  if (metrics && metrics !== "-1") {
    $("metrics-link").href = `${location.protocol}//${location.hostname}:${metrics}/metrics`;
  } else {
    $("metrics-link").removeAttribute("href");
    $("metrics-link").title = "metrics are off (--metrics-port -1)";
  }
}

wire();
loadModels();
