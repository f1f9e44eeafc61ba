// IPD-FER try-it page, continued: the live camera (WebSocket /live) and the video
// view (POST /videos, then GET /videos/{id} polled; each person's expressions
// plotted over time). Uses app.js's helpers ($, els, state, COLORS, EXPRESSIONS).
"use strict";

const LIVE_FPS = 5;          // frames offered per second; one in flight at a time
const LIVE_MAX_SIDE = 640;   // frames are sent at most this large (bandwidth; faces stay > 40 px)
const CLASS_COLORS = {
  neutral: "#868e96", happy: "#f08c00", sad: "#1c7ed6", surprise: "#ae3ec9",
  fear: "#0c8599", disgust: "#2f9e44", anger: "#e03131",
};

const live = {
  panel: $("live-panel"), video: $("live-video"), overlay: $("live-overlay"), faces: $("live-faces"),
  meta: $("live-meta"), start: $("live"), stop: $("live-stop"),
  ws: null, timer: null, busy: false, answered: 0, dropped: 0, size: null,
};

// --- live camera -----------------------------------------------------------------------

function liveUrl() {
  const u = new URL("live", location.href);
  u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
  return u.href;
}

live.start.addEventListener("click", () => {
  if (!state.stream) return;
  clearError();
  live.video.srcObject = state.stream;   // the camera stays open; its preview moves here
  els.camera.hidden = true;
  live.panel.hidden = false;
  live.answered = live.dropped = 0;
  live.busy = false;
  document.body.dataset.live = "on";
  const ws = new WebSocket(liveUrl());
  live.ws = ws;
  ws.binaryType = "arraybuffer";
  // The key goes in the first message, not the URL (servers log URLs).
  ws.onopen = () => {
    if (els.key.value) ws.send(JSON.stringify({ key: els.key.value }));
    live.meta.textContent = "live";
    tick();
  };
  ws.onmessage = (e) => { if (live.ws === ws) showLive(JSON.parse(e.data)); };
  ws.onclose = (e) => {
    if (live.ws === ws && document.body.dataset.live === "on") {  // not a session already stopped
      showError(`The live connection closed${e.reason ? `: ${e.reason}` : ""}.`);
      stopLive();
    }
  };
});

// Offer a frame every 1/LIVE_FPS s; while the last one is unanswered the camera's
// frames are dropped, so a slow server lowers the rate instead of adding delay.
function tick() {
  if (!live.ws || live.ws.readyState !== WebSocket.OPEN) return;
  live.timer = setTimeout(tick, 1000 / LIVE_FPS);
  const v = live.video;
  if (live.busy) { live.dropped++; return; }
  if (!v.videoWidth) return;
  const scale = Math.min(1, LIVE_MAX_SIDE / Math.max(v.videoWidth, v.videoHeight));
  const c = document.createElement("canvas");
  c.width = Math.round(v.videoWidth * scale);
  c.height = Math.round(v.videoHeight * scale);
  c.getContext("2d").drawImage(v, 0, 0, c.width, c.height);
  live.busy = true;
  live.size = [c.width, c.height];
  c.toBlob(async (blob) => {
    if (!blob) { live.busy = false; return; }   // the frame could not be encoded: offer the next one
    if (live.ws && live.ws.readyState === WebSocket.OPEN) live.ws.send(await blob.arrayBuffer());
  }, "image/jpeg", 0.85);
}

function showLive(msg) {
  live.busy = false;
  live.answered++;
  live.meta.dataset.answered = String(live.answered);
  live.meta.dataset.dropped = String(live.dropped);
  if (msg.error) {
    live.meta.textContent = `frame ${msg.frame}: ${msg.error}`;
    drawLiveBoxes([]);   // no stale boxes over a frame that was not analysed
    return;
  }
  const faces = msg.faces || [];
  live.meta.textContent = `${faces.length} face${faces.length === 1 ? "" : "s"} · ${Math.round(msg.ms)} ms a frame` +
    ` · ${live.answered} frames answered, ${live.dropped} dropped while busy`;
  drawLiveBoxes(faces);
  live.faces.replaceChildren(...faces.map(trackCard));
}

function drawLiveBoxes(faces) {
  const c = live.overlay;
  [c.width, c.height] = live.size || [1, 1];
  const ctx = c.getContext("2d");
  ctx.clearRect(0, 0, c.width, c.height);
  const line = Math.max(1, Math.round(c.width / 300));
  ctx.font = `600 ${Math.max(9, line * 6)}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  for (const f of faces) {
    const [x1, y1, x2, y2] = f.box;
    const color = COLORS[(f.track - 1) % COLORS.length];
    ctx.strokeStyle = ctx.fillStyle = color;
    ctx.lineWidth = line;
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    const tag = `${f.track} ${f.smoothed_label}`;
    const th = Math.max(9, line * 6) + line * 3;
    const ty = y1 - th >= 0 ? y1 - th : y2;
    ctx.fillRect(x1 - line / 2, ty, ctx.measureText(tag).width + line * 4, th);
    ctx.fillStyle = "#fff";
    ctx.fillText(tag, x1 + line * 1.5, ty + line);
  }
  c.dataset.boxes = JSON.stringify(faces.map((f) => ({ track: f.track, box: f.box })));
}

// One person: the smoothed probabilities as bars.
function trackCard(f) {
  const li = document.createElement("li");
  li.className = "face";
  li.dataset.track = String(f.track);
  li.style.setProperty("--face", COLORS[(f.track - 1) % COLORS.length]);
  li.innerHTML = `<header><span class="swatch"></span><h2 class="face-title"></h2><span class="label"></span></header>` +
    `<ul class="bars"></ul>`;
  li.querySelector(".face-title").textContent = `Person ${f.track}`;
  li.querySelector(".label").textContent = `${f.smoothed_label} ${pct(f.smoothed[f.smoothed_label])}`;
  const bars = li.querySelector(".bars");
  for (const name of EXPRESSIONS) bars.append(bar(name, f.smoothed[name], name === f.smoothed_label));
  return li;
}

function stopLive() {
  document.body.dataset.live = "off";
  clearTimeout(live.timer);
  const ws = live.ws;
  live.ws = null;   // its late events are ignored (they check live.ws)
  if (ws) ws.close();
  live.video.srcObject = null;
  live.panel.hidden = true;
  stopCamera();
}

live.stop.addEventListener("click", stopLive);

// --- video upload: progress, then each person's expressions over time ------------------

const video = { file: $("video-file"), panel: $("video-panel"), status: $("video-status"),
                progress: $("video-progress"), tracks: $("video-tracks") };

video.file.addEventListener("change", () => {
  if (video.file.files.length) analyseVideo(video.file.files[0]);
  video.file.value = "";
});

async function analyseVideo(file) {
  clearError();
  document.body.dataset.video = "running";
  video.panel.hidden = false;
  video.tracks.replaceChildren();
  video.progress.value = 0;
  video.status.textContent = `Uploading ${file.name}…`;
  const headers = els.key.value ? { "X-API-Key": els.key.value } : {};
  const form = new FormData();
  form.append("file", file, file.name);
  let body;
  try {
    const r = await fetch("videos", { method: "POST", body: form, headers });
    body = await r.json().catch(() => null);
    if (r.status !== 202) throw new Error(explain(r, body));
    while (body.status === "queued" || body.status === "running") {
      const p = body.progress;
      video.progress.value = p.frames_expected ? p.frames_done / p.frames_expected : 0;
      video.status.textContent = `${file.name}: ${body.status}, ${p.frames_done}` +
        (p.frames_expected ? ` of ${p.frames_expected}` : "") + " frames analysed";
      await new Promise((resolve) => setTimeout(resolve, 500));
      const s = await fetch(`videos/${body.video_id}`, { headers, cache: "no-store" });
      const next = await s.json().catch(() => null);
      if (!s.ok) throw new Error(explain(s, next));
      body = next;
    }
  } catch (e) {
    document.body.dataset.video = "failed";
    video.status.textContent = "";
    showError(e.message);
    return;
  }
  if (body.status === "failed") {
    document.body.dataset.video = "failed";
    video.status.textContent = "";
    showError(`The video could not be analysed: ${body.error.detail}`);
    return;
  }
  video.progress.value = 1;
  const { frames, tracks } = body.result;
  video.status.textContent = `${file.name}: ${frames.length} frames analysed, ${tracks.length} ` +
    `${tracks.length === 1 ? "person" : "people"}.`;
  for (const t of tracks) video.tracks.append(trackPlot(t, frames, body.video.duration_s));
  document.body.dataset.video = "done";
}

// The person's smoothed probabilities over time, one line per expression.
function trackPlot(track, frames, duration) {
  const div = document.createElement("div");
  div.className = "video-track";
  div.dataset.track = String(track.track);
  div.style.setProperty("--face", COLORS[(track.track - 1) % COLORS.length]);
  const title = document.createElement("h2");
  title.textContent = `Person ${track.track}: mostly ${track.dominant} ` +
    `(${track.first_s.toFixed(1)}–${track.last_s.toFixed(1)} s, ${track.frames} frames)`;
  const canvas = document.createElement("canvas");
  canvas.width = 900;
  canvas.height = 160;
  const points = [];
  for (const fr of frames) {
    for (const f of fr.faces) if (f.track === track.track) points.push([fr.t, f.smoothed]);
  }
  const end = Math.max(duration || 0, ...points.map((p) => p[0]), 0.001);
  const ctx = canvas.getContext("2d");
  const pad = 22;
  const x = (t) => pad + (t / end) * (canvas.width - 2 * pad);
  const y = (p) => canvas.height - pad - p * (canvas.height - 2 * pad);
  ctx.strokeStyle = "#dee2e6";
  ctx.fillStyle = "#868e96";
  ctx.font = "11px system-ui, sans-serif";
  for (const p of [0, 0.5, 1]) {
    ctx.beginPath(); ctx.moveTo(pad, y(p)); ctx.lineTo(canvas.width - pad, y(p)); ctx.stroke();
    ctx.fillText(p.toFixed(1), 0, y(p) + 4);
  }
  ctx.fillText(`${end.toFixed(1)} s`, canvas.width - pad - 24, canvas.height - 4);
  ctx.lineWidth = 2;
  for (const name of EXPRESSIONS) {
    ctx.strokeStyle = CLASS_COLORS[name];
    ctx.beginPath();
    points.forEach(([t, s], i) => (i ? ctx.lineTo(x(t), y(s[name])) : ctx.moveTo(x(t), y(s[name]))));
    ctx.stroke();
  }
  canvas.dataset.points = String(points.length);
  const legend = document.createElement("div");
  legend.className = "legend";
  for (const name of EXPRESSIONS) {
    const s = document.createElement("span");
    s.style.setProperty("--c", CLASS_COLORS[name]);
    s.textContent = `${name} ${pct(track.share[name])}`;
    legend.append(s);
  }
  div.append(title, canvas, legend);
  return div;
}
