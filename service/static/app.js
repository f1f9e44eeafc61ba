// IPD-FER try-it page: pick, drop or capture a photo, POST it to /predict, draw
// what comes back. Plain JavaScript, no build step, nothing loaded from elsewhere.
// URLs are relative, so the page also works behind a proxy under a sub-path.
"use strict";

const EXPRESSIONS = ["neutral", "happy", "sad", "surprise", "fear", "disgust", "anger"];
const COLORS = ["#e8590c", "#1c7ed6", "#2f9e44", "#ae3ec9", "#f08c00", "#0c8599", "#e03131", "#5f3dc4"];

const $ = (id) => document.getElementById(id);
const els = {
  drop: $("drop"), file: $("file"), webcam: $("webcam"), camera: $("camera"), video: $("video"),
  capture: $("capture"), cameraCancel: $("camera-cancel"), error: $("error"), stage: $("stage"),
  photo: $("photo"), overlay: $("overlay"), spinner: $("spinner"), summary: $("summary"),
  faces: $("faces"), meta: $("meta"), status: $("status"), tpl: $("face-tpl"),
  neutral: $("opt-neutral"), aligned: $("opt-aligned"), key: $("opt-key"),
};

const state = { result: null, highlight: -1, photoUrl: null, stream: null, seq: 0 };

// --- page state ----------------------------------------------------------------------

function setState(name) {
  document.body.dataset.state = name; // idle | loading | done | error (the browser test reads it)
  els.spinner.hidden = name !== "loading";
}

function showError(message) {
  els.error.textContent = message;
  els.error.hidden = false;
  setState("error");
}

function clearError() {
  els.error.hidden = true;
  els.error.textContent = "";
}

// --- readiness pill ------------------------------------------------------------------

async function checkReady() {
  let ready = false;
  try {
    const r = await fetch("readyz", { cache: "no-store" });
    const body = await r.json();
    ready = r.ok && body.ready;
    const n = (body.workers || []).length;
    const where = body.mode === "redis" ? `${n} worker${n === 1 ? "" : "s"}` : "in-process";
    els.status.textContent = ready ? `ready · ${where}` : `not ready: ${body.detail || r.status}`;
  } catch (e) {
    els.status.textContent = "server unreachable";
  }
  els.status.dataset.ready = String(ready);
  if (!ready) setTimeout(checkReady, 3000);
}

// --- input: file picker, drag and drop, webcam ---------------------------------------

els.file.addEventListener("change", () => {
  if (els.file.files.length) analyse(els.file.files[0]);
  els.file.value = ""; // picking the same file again fires change again
});

els.drop.addEventListener("keydown", (e) => {
  if (e.key === "Enter" || e.key === " ") { e.preventDefault(); els.file.click(); }
});
for (const type of ["dragenter", "dragover"]) {
  els.drop.addEventListener(type, (e) => { e.preventDefault(); els.drop.classList.add("over"); });
}
for (const type of ["dragleave", "drop"]) {
  els.drop.addEventListener(type, (e) => { e.preventDefault(); els.drop.classList.remove("over"); });
}
els.drop.addEventListener("drop", (e) => {
  const file = [...(e.dataTransfer?.files || [])][0];
  if (file) analyse(file);
  else showError("Nothing to analyse: drop an image file (JPEG, PNG, WebP, BMP or TIFF).");
});
// A photo dropped anywhere else on the page is analysed too, instead of the browser opening it.
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => {
  e.preventDefault();
  const file = [...(e.dataTransfer?.files || [])][0];
  if (file) analyse(file);
});

els.webcam.addEventListener("click", async () => {
  clearError();
  if (!navigator.mediaDevices?.getUserMedia) {
    showError("The webcam needs a secure page: open it over https, or as http://localhost on this machine.");
    return;
  }
  try {
    state.stream = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 1280 } }, audio: false });
  } catch (e) {
    showError(`Could not open the webcam: ${e.message || e.name}.`);
    return;
  }
  els.video.srcObject = state.stream;
  els.camera.hidden = false;
  els.drop.hidden = true;
});

function stopCamera() {
  if (state.stream) state.stream.getTracks().forEach((t) => t.stop());
  state.stream = null;
  els.video.srcObject = null;
  els.camera.hidden = true;
  els.drop.hidden = false;
}

els.cameraCancel.addEventListener("click", stopCamera);
els.capture.addEventListener("click", () => {
  const v = els.video;
  if (!v.videoWidth) return;
  const c = document.createElement("canvas");
  c.width = v.videoWidth;
  c.height = v.videoHeight;
  c.getContext("2d").drawImage(v, 0, 0);
  stopCamera();
  c.toBlob((blob) => analyse(new File([blob], "webcam.jpg", { type: "image/jpeg" })), "image/jpeg", 0.92);
});

// --- the request -----------------------------------------------------------------------

async function analyse(file) {
  const seq = ++state.seq; // a newer photo wins over a slower older answer
  clearError();
  state.result = null;
  state.highlight = -1;
  els.faces.replaceChildren();
  els.meta.textContent = "";
  els.summary.textContent = `Analysing ${file.name || "photo"}…`;
  showPhoto(file);
  setState("loading");

  const params = new URLSearchParams();
  if (els.neutral.checked) params.set("neutral", "true");
  if (els.aligned.checked) params.set("aligned", "true");
  const headers = {};
  if (els.key.value) headers["X-API-Key"] = els.key.value;
  const form = new FormData();
  form.append("file", file, file.name || "photo");

  let response, body;
  try {
    response = await fetch(`predict?${params}`, { method: "POST", body: form, headers });
  } catch (e) {
    if (seq === state.seq) showError(`The server did not answer (${e.message}). Is it running?`);
    return;
  }
  try {
    body = await response.json();
  } catch (e) {
    body = null;
  }
  if (seq !== state.seq) return;
  if (!response.ok) {
    showError(explain(response, body));
    els.summary.textContent = "";
    return;
  }
  state.result = body;
  await photoReady();
  if (seq !== state.seq) return;
  render(body);
  setState("done");
}

function explain(response, body) {
  const detail = body && typeof body.detail === "string" ? body.detail : response.statusText;
  const retry = response.headers.get("Retry-After");
  const hints = {
    401: "Set the API key under Options.",
    413: "Try a smaller photo.",
    503: retry ? `Try again in ${retry} s.` : "Try again shortly.",
    504: "The server is overloaded; try again.",
  };
  return `Error ${response.status}: ${detail}` + (hints[response.status] ? ` ${hints[response.status]}` : "");
}

// --- drawing ---------------------------------------------------------------------------

function showPhoto(file) {
  if (state.photoUrl) URL.revokeObjectURL(state.photoUrl);
  state.photoUrl = URL.createObjectURL(file);
  els.photo.classList.remove("broken");
  els.photo.src = state.photoUrl;
  els.stage.hidden = false;
  const ctx = els.overlay.getContext("2d");
  ctx.clearRect(0, 0, els.overlay.width, els.overlay.height);
  els.overlay.dataset.boxes = "[]";
}

function photoReady() {
  const img = els.photo;
  if (img.complete) return Promise.resolve();
  return new Promise((resolve) => {
    img.addEventListener("load", resolve, { once: true });
    img.addEventListener("error", () => { img.classList.add("broken"); resolve(); }, { once: true });
  });
}

function render(result) {
  const faces = result.faces || [];
  const n = faces.length;
  els.summary.textContent = n === 0
    ? "No face found in this photo. Small faces in a large photo are easy to miss: try a closer shot or a crop."
    : `${n} face${n === 1 ? "" : "s"} found.`;
  drawOverlay();
  faces.forEach((face, i) => els.faces.append(faceCard(face, i)));
  const m = result.model || {};
  const t = result.timings || {};
  els.meta.textContent =
    `${m.name || "model"} ${m.version || ""} (${(m.sha256 || "").slice(0, 12)}) on ${m.device || "?"}` +
    ` · worker ${result.worker} · batch of ${result.batch_size}` +
    ` · ${Math.round(t.total_ms || 0)} ms (detect ${Math.round(t.detect_ms || 0)}, model ${Math.round(t.model_ms || 0)})` +
    (m.trained === false ? " · untrained weights: the numbers are not meaningful yet" : "");
}

// Boxes and landmarks on a canvas laid over the photo, in the image's own pixels
// (the canvas is scaled with the photo by CSS).
function drawOverlay() {
  const result = state.result;
  if (!result) return;
  const c = els.overlay;
  const { width, height } = result.image;
  c.width = width;
  c.height = height;
  const ctx = c.getContext("2d");
  ctx.clearRect(0, 0, width, height);
  if (els.photo.classList.contains("broken")) { // the browser cannot show this format (TIFF)
    ctx.fillStyle = "#dee2e6";
    ctx.fillRect(0, 0, width, height);
  }
  const line = Math.max(2, Math.round(Math.max(width, height) / 250));
  const drawn = [];
  result.faces.forEach((face, i) => {
    if (!face.box) return; // aligned input: no box to draw
    const [x1, y1, x2, y2] = face.box;
    const color = COLORS[i % COLORS.length];
    const on = state.highlight === -1 || state.highlight === i;
    ctx.globalAlpha = on ? 1 : 0.35;
    ctx.lineWidth = state.highlight === i ? line * 2 : line;
    ctx.strokeStyle = color;
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    ctx.fillStyle = color;
    for (const [x, y] of face.landmarks || []) {
      ctx.beginPath();
      ctx.arc(x, y, line * 1.2, 0, 2 * Math.PI);
      ctx.fill();
    }
    const tag = `${i + 1} ${face.expression.label}`;
    ctx.font = `600 ${Math.max(12, line * 7)}px system-ui, sans-serif`;
    const tw = ctx.measureText(tag).width + line * 4;
    const th = Math.max(12, line * 7) + line * 2;
    const ty = y1 - th >= 0 ? y1 - th : y2;
    ctx.fillRect(x1 - line / 2, ty, tw, th);
    ctx.fillStyle = "#fff";
    ctx.textBaseline = "top";
    ctx.fillText(tag, x1 + line * 1.5, ty + line);
    drawn.push({ face: i, box: face.box, color });
  });
  ctx.globalAlpha = 1;
  c.dataset.boxes = JSON.stringify(drawn);
}

function faceCard(face, i) {
  const node = els.tpl.content.firstElementChild.cloneNode(true);
  const color = COLORS[i % COLORS.length];
  node.dataset.face = String(i);
  node.style.setProperty("--face", color);
  node.querySelector(".face-title").textContent = `Face ${i + 1}`;
  const e = face.expression;
  node.querySelector(".label").textContent = `${e.label} ${pct(e.confidence)}`;

  drawCrop(node.querySelector(".crop"), face);
  const neutral = node.querySelector(".neutral");
  if (face.neutral_png) neutral.src = `data:image/png;base64,${face.neutral_png}`;
  else neutral.closest("figure").hidden = true;

  const bars = node.querySelector(".bars");
  const names = EXPRESSIONS.filter((k) => k in e.probabilities)
    .concat(Object.keys(e.probabilities).filter((k) => !EXPRESSIONS.includes(k)));
  for (const name of names) bars.append(bar(name, e.probabilities[name], name === e.label));

  const { yaw, pitch, roll } = face.pose;
  for (const [k, v] of Object.entries({ yaw, pitch, roll })) {
    node.querySelector(`[data-angle=${k}]`).textContent = `${v >= 0 ? "+" : "−"}${Math.abs(v).toFixed(1)}°`;
  }
  // Head glyph: the nose moves with yaw (right = the face turns to the image's right)
  // and pitch (up = looks up); the line tilts with roll.
  const r = 14;
  const nose = node.querySelector(".nose");
  nose.setAttribute("cx", (r * Math.sin(rad(clamp(yaw, -90, 90)))).toFixed(2));
  nose.setAttribute("cy", (-r * Math.sin(rad(clamp(pitch, -90, 90)))).toFixed(2));
  node.querySelector(".roll-line").setAttribute("transform", `rotate(${roll.toFixed(1)})`);

  node.querySelector(".score").textContent = face.score == null ? "aligned input" : `detection ${pct(face.score)}`;
  node.querySelector(".residue-btn").addEventListener("click", (ev) => showResidue(face, node, ev.currentTarget));
  node.addEventListener("mouseenter", () => { state.highlight = i; drawOverlay(); });
  node.addEventListener("mouseleave", () => { state.highlight = -1; drawOverlay(); });
  return node;
}

// One expression's probability as a labelled bar (also live.js's).
function bar(name, p, best) {
  const li = document.createElement("li");
  li.className = "bar" + (best ? " best" : "");
  li.dataset.label = name;
  li.dataset.p = String(p);
  li.innerHTML = `<span class="name"></span><span class="track"><span class="fill"></span></span><span class="value"></span>`;
  li.querySelector(".name").textContent = name;
  li.querySelector(".fill").style.width = `${(100 * p).toFixed(1)}%`;
  li.querySelector(".value").textContent = pct(p);
  return li;
}

// The face as it is in the photo, cut out square around its box.
function drawCrop(canvas, face) {
  const ctx = canvas.getContext("2d");
  const img = els.photo;
  if (img.classList.contains("broken") || !img.naturalWidth) {
    canvas.closest("figure").hidden = true;
    return;
  }
  const sx = img.naturalWidth / state.result.image.width;
  const sy = img.naturalHeight / state.result.image.height;
  let [x1, y1, x2, y2] = face.box || [0, 0, state.result.image.width, state.result.image.height];
  const side = Math.max(x2 - x1, y2 - y1);
  const cx = (x1 + x2) / 2, cy = (y1 + y2) / 2;
  ctx.fillStyle = "#f1f3f5";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(img, (cx - side / 2) * sx, (cy - side / 2) * sy, side * sx, side * sy, 0, 0, canvas.width, canvas.height);
}

// GET /neutralize?kind=residue: where the face differs from its neutral render.
async function showResidue(face, node, button) {
  button.disabled = true;
  const headers = els.key.value ? { "X-API-Key": els.key.value } : {};
  try {
    const r = await fetch(`neutralize?face_id=${encodeURIComponent(face.face_id)}&kind=residue`, { headers });
    if (!r.ok) {
      let detail = r.statusText;
      try { detail = (await r.json()).detail || detail; } catch (e) { /* not JSON */ }
      throw new Error(`Error ${r.status}: ${detail}`);
    }
    const img = node.querySelector(".residue");
    img.src = URL.createObjectURL(await r.blob());
    node.querySelector(".residue-fig").hidden = false;
    button.hidden = true;
  } catch (e) {
    button.disabled = false;
    showError(e.message);
    setState("done");
  }
}

const pct = (p) => `${(100 * p).toFixed(1)}%`;
const rad = (deg) => (deg * Math.PI) / 180;
const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));

checkReady();
