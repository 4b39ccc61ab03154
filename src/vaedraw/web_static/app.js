// vaedraw explorer: a thin page over the JSON API in web.py (see docs/WEB.md). No build step, no libraries.
"use strict";

const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
const INTERP_STEPS = 10;  // points along each interpolation path
const SLIDER_RANGE = 3;  // sliders span +-3 units: standard deviations of the prior or of a principal direction
const $ = (id) => document.getElementById(id);

const state = {
  info: null, map: null, coords: [], digit: 0, decodeSeq: 0, encodeSeq: 0,
  zMap: null, drawnMap: null, sliders: [],
};

function status(text, isError = false) {
  const s = $("status");
  s.textContent = text;
  s.className = isError ? "error" : "";
}

async function api(path, body) {
  const res = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const data = await res.json().catch(() => ({ detail: res.statusText }));
  if (!res.ok) throw new Error(`${res.status}: ${data.detail}`);
  return data;
}

const png = (b64) => `data:image/png;base64,${b64}`;

function debounce(fn, ms) {
  let t = null;
  return (...args) => { clearTimeout(t); t = setTimeout(() => fn(...args), ms); };
}

// ---------------------------------------------------------------- codes and sliders
function codeFromCoords(c) {
  // z = mean + sum_i c_i * scale_i * directions_i (the basis the server sent)
  const b = state.info.basis;
  const z = b.mean.slice();
  c.forEach((ci, i) => {
    const dir = b.directions[i];
    for (let j = 0; j < z.length; j++) z[j] += ci * b.scale[i] * dir[j];
  });
  return z;
}

function digitOrNull() { return state.info.conditional ? state.digit : null; }

async function decodeNow() {
  const seq = ++state.decodeSeq;
  const z = codeFromCoords(state.coords);
  try {
    const out = await api("/api/decode", { z, digit: digitOrNull() });
    if (seq !== state.decodeSeq) return;  // a newer request is on its way; keep the page in order
    $("decoded").src = png(out.png);
    $("decoded").dataset.seq = String(seq);
    state.zMap = projectToMap(z);
    drawMap();
    status("");
  } catch (e) { status(e.message, true); }
}
const decodeSoon = debounce(decodeNow, 25);

function setCoords(c) {
  state.coords = c.map((v) => Math.max(-SLIDER_RANGE, Math.min(SLIDER_RANGE, v)));
  state.sliders.forEach((s, i) => { s.input.value = state.coords[i]; s.out.value = state.coords[i].toFixed(2); });
}

function buildSliders() {
  const box = $("sliders");
  const b = state.info.basis;
  const k = b.directions.length;
  $("slider-hint").textContent = b.kind === "axes"
    ? `One slider per latent dimension (${k}); values in prior standard deviations.`
    : `The ${k} leading principal directions of the test-set codes (of ${state.info.latent_dim}); values in their standard deviations.`;
  state.coords = new Array(k).fill(0);
  for (let i = 0; i < k; i++) {
    const label = document.createElement("label");
    label.textContent = b.kind === "axes" ? `z${i + 1}` : `pc${i + 1}`;
    const input = document.createElement("input");
    Object.assign(input, { type: "range", min: -SLIDER_RANGE, max: SLIDER_RANGE, step: 0.01, value: 0 });
    input.id = `slider-${i}`;
    label.htmlFor = input.id;
    const out = document.createElement("output");
    out.value = "0.00";
    input.addEventListener("input", () => {
      state.coords[i] = parseFloat(input.value);
      out.value = state.coords[i].toFixed(2);
      decodeSoon();
    });
    box.append(label, input, out);
    state.sliders.push({ input, out });
  }
}

function buildDigitPicker() {
  if (!state.info.conditional) return;
  $("digit-picker").hidden = false;
  const box = $("digit-buttons");
  for (let d = 0; d < state.info.n_classes; d++) {
    const b = document.createElement("button");
    b.textContent = String(d);
    b.setAttribute("role", "radio");
    b.setAttribute("aria-checked", String(d === state.digit));
    b.addEventListener("click", () => {
      state.digit = d;
      [...box.children].forEach((c, i) => c.setAttribute("aria-checked", String(i === d)));
      decodeNow();
      encodeDrawing();
    });
    box.append(b);
  }
}

async function randomCode() {
  try {
    const out = await api("/api/random", { digit: digitOrNull() });
    setCoords(out.coords);
    ++state.decodeSeq;
    $("decoded").src = png(out.png);
    state.zMap = out.map;
    drawMap();
    status(`random code from the ${out.sampler} sampler`);
  } catch (e) { status(e.message, true); }
}

// ---------------------------------------------------------------- latent map
function mapFrame() {
  const pts = state.map.points;
  let [x0, x1, y0, y1] = [Infinity, -Infinity, Infinity, -Infinity];
  for (const [x, y] of pts) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); }
  const padX = (x1 - x0) * 0.06 || 1, padY = (y1 - y0) * 0.06 || 1;
  return { x0: x0 - padX, x1: x1 + padX, y0: y0 - padY, y1: y1 + padY };
}

function projectToMap(z) {
  const m = state.map;
  if (!m || !m.components) return null;
  return m.components.map((row) => row.reduce((acc, w, j) => acc + w * (z[j] - m.mean[j]), 0));
}

function drawMap() {
  if (!state.map) return;
  const cv = $("map"), ctx = cv.getContext("2d");
  const f = state.frame, W = cv.width, H = cv.height;
  const px = (x) => ((x - f.x0) / (f.x1 - f.x0)) * W;
  const py = (y) => H - ((y - f.y0) / (f.y1 - f.y0)) * H;
  ctx.clearRect(0, 0, W, H);
  ctx.globalAlpha = 0.7;
  state.map.points.forEach(([x, y], i) => {
    ctx.fillStyle = COLORS[state.map.labels[i] % COLORS.length];
    ctx.fillRect(px(x) - 1.5, py(y) - 1.5, 3, 3);
  });
  ctx.globalAlpha = 1;
  if (state.zMap) {
    ctx.strokeStyle = "#fff"; ctx.lineWidth = 2;
    ctx.beginPath(); ctx.arc(px(state.zMap[0]), py(state.zMap[1]), 7, 0, 2 * Math.PI); ctx.stroke();
  }
  if (state.drawnMap) {
    const [x, y] = [px(state.drawnMap[0]), py(state.drawnMap[1])];
    ctx.strokeStyle = "#ffeb3b"; ctx.lineWidth = 3;
    ctx.beginPath(); ctx.moveTo(x - 8, y - 8); ctx.lineTo(x + 8, y + 8);
    ctx.moveTo(x + 8, y - 8); ctx.lineTo(x - 8, y + 8); ctx.stroke();
  }
}

function buildLegend() {
  const seen = [...new Set(state.map.labels)].sort((a, b) => a - b);
  $("legend").innerHTML = seen.map((d) => `<span><i style="background:${COLORS[d % COLORS.length]}"></i>${d}</span>`).join("");
  $("map-method").textContent = state.map.method === "plane" ? "(the latent plane)" : `(${state.map.method})`;
}

// ---------------------------------------------------------------- drawing pad
function setupPad() {
  const cv = $("pad"), ctx = cv.getContext("2d");
  const clear = () => { ctx.fillStyle = "#000"; ctx.fillRect(0, 0, cv.width, cv.height); };
  clear();
  let drawing = false, last = null;
  const pos = (e) => {
    const r = cv.getBoundingClientRect();
    return [(e.clientX - r.left) * (cv.width / r.width), (e.clientY - r.top) * (cv.height / r.height)];
  };
  const line = (a, b) => {
    ctx.strokeStyle = "#fff"; ctx.lineWidth = 22; ctx.lineCap = "round"; ctx.lineJoin = "round";
    ctx.beginPath(); ctx.moveTo(...a); ctx.lineTo(...b); ctx.stroke();
  };
  const encodeSoon = debounce(encodeDrawing, 60);
  cv.addEventListener("pointerdown", (e) => {
    drawing = true; last = pos(e); line(last, last); cv.setPointerCapture(e.pointerId); e.preventDefault();
  });
  cv.addEventListener("pointermove", (e) => {
    if (!drawing) return;
    const p = pos(e); line(last, p); last = p; encodeSoon();
  });
  const stop = () => { if (drawing) { drawing = false; encodeDrawing(); } };
  cv.addEventListener("pointerup", stop);
  cv.addEventListener("pointercancel", stop);
  $("clear").addEventListener("click", () => {
    clear(); state.drawnMap = null; $("drawn-input").removeAttribute("src"); $("drawn-recon").removeAttribute("src");
    drawMap();
  });
  state.padHasInk = () => {
    const d = ctx.getImageData(0, 0, cv.width, cv.height).data;
    for (let i = 0; i < d.length; i += 4) if (d[i] > 0) return true;
    return false;
  };
}

async function encodeDrawing() {
  if (!state.info || !state.info.drawable || !state.padHasInk || !state.padHasInk()) return;
  // twice the model's image width, within the sizes the server takes; the server centres and scales
  // the ink as the training digits were (latent.mnist_like)
  const [lo, hi] = state.info.draw_size;
  const side = Math.max(lo, Math.min(hi, 2 * state.info.image_shape[2]));
  const small = document.createElement("canvas");
  small.width = small.height = side;
  const sctx = small.getContext("2d");
  sctx.imageSmoothingEnabled = true;
  sctx.drawImage($("pad"), 0, 0, side, side);
  const d = sctx.getImageData(0, 0, side, side).data;
  const pixels = new Array(side * side);
  for (let i = 0; i < pixels.length; i++) pixels[i] = Math.round((d[4 * i] / 255) * 1000) / 1000;
  const seq = ++state.encodeSeq;
  try {
    const out = await api("/api/encode", { pixels, digit: digitOrNull() });
    if (seq !== state.encodeSeq) return;
    $("drawn-input").src = png(out.input_png);
    $("drawn-recon").src = png(out.png);
    state.drawnMap = out.map;
    drawMap();
  } catch (e) { status(e.message, true); }
}

// ---------------------------------------------------------------- interpolation
function setupInterpolation() {
  const n = state.info.label_classes;  // classes in the test labels; none for unlabelled data
  if (!n) { $("interp-card").hidden = true; return; }
  for (const id of ["interp-from", "interp-to"]) {
    const sel = $(id);
    for (let d = 0; d < n; d++) sel.append(new Option(String(d), String(d)));
  }
  $("interp-from").value = String(Math.min(3, n - 1)); $("interp-to").value = String(Math.min(8, n - 1));
  $("interp-go").addEventListener("click", interpolate);
}

async function interpolate() {
  try {
    const out = await api("/api/interpolate", {
      from_digit: Number($("interp-from").value), to_digit: Number($("interp-to").value), steps: INTERP_STEPS,
    });
    for (const row of ["linear", "spherical"]) {
      $(`strip-${row}`).replaceChildren(...out[row].map((b64) => Object.assign(new Image(), { src: png(b64) })));
    }
  } catch (e) { status(e.message, true); }
}

// ---------------------------------------------------------------- start
async function main() {
  try {
    state.info = await api("/api/info");
    const i = state.info;
    $("run-info").textContent = `${i.preset} preset, step ${i.step}, ${i.latent_dim}-d latent` +
      (i.conditional ? ", conditional" : "") + `, ${i.image_shape.join("x")} images`;
    $("draw").hidden = !i.drawable;  // drawing with the mouse makes grey images only
    buildSliders();
    buildDigitPicker();
    setupPad();
    setupInterpolation();
    $("random").addEventListener("click", randomCode);
    $("zero").addEventListener("click", () => { setCoords(state.coords.map(() => 0)); decodeNow(); });
    state.map = await api("/api/map");
    state.frame = mapFrame();
    buildLegend();
    await decodeNow();
    document.body.dataset.ready = "1";
  } catch (e) { status(e.message, true); }
}

main();
