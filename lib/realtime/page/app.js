// The realtime page: settings and pictures go out over one WebSocket, frames come back as binary images.
// The server numbers every message it receives 1, 2, 3, ...; counting our own sends the same way tells which
// input each frame answers, hence its latency. The controls' limits come from the server's `hello` (the mode table).
"use strict";

const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const ctx = canvas.getContext("2d");
const state = {
  ws: null,
  hello: null,
  sent: 0,
  sentAt: new Map(), // message number -> when it was sent
  meta: null, // the `frame` message whose image comes next
  arrivals: [], // when recent frames came (for frames per second)
  latencies: [], // ms, recent frames
  frames: 0,
  frameUrl: null,
  painting: null,
  pictureQueued: false,
  webcam: null,
  webcamTimer: null,
};
window.realtime = state; // for the browser console

// -- the socket ----------------------------------------------------------------------------------------------------
function connect() {
  const token = new URLSearchParams(location.search).get("token");
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const query = token ? `?token=${encodeURIComponent(token)}` : "";
  const ws = new WebSocket(`${scheme}//${location.host}/ws${query}`);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => {
    state.sent = 0; // a new session numbers from 1 again
    state.sentAt.clear();
    setStatus("connected");
  };
  ws.onclose = (event) => {
    setStatus(`disconnected (${event.code}${event.reason ? ": " + event.reason : ""}); reconnecting…`);
    setTimeout(connect, 1000);
  };
  ws.onmessage = (event) => {
    if (typeof event.data === "string") onMessage(JSON.parse(event.data));
    else onFrame(event.data);
  };
  state.ws = ws;
}

state.send = function send(data) {
  const ws = state.ws;
  if (!ws || ws.readyState !== WebSocket.OPEN) return;
  ws.send(data);
  state.sent += 1;
  state.sentAt.set(state.sent, performance.now());
  state.sentAt.delete(state.sent - 2000);
};

function onMessage(message) {
  if (message.type === "hello") {
    state.hello = message;
    setUpControls(message);
  } else if (message.type === "frame") {
    state.meta = message;
  } else if (message.type === "error" || message.type === "flagged") {
    showMessage(message.message, message.type);
    if (state.webcam) scheduleWebcam(200);
  }
}

function onFrame(buffer) {
  const meta = state.meta;
  state.meta = null;
  if (!meta) return;
  const url = URL.createObjectURL(new Blob([buffer], { type: state.hello.frame_type }));
  const output = $("output");
  output.src = url;
  if (state.frameUrl) URL.revokeObjectURL(state.frameUrl);
  state.frameUrl = url;

  const now = performance.now();
  const sentAt = state.sentAt.get(meta.input);
  state.frames += 1;
  state.arrivals.push(now);
  while (state.arrivals.length && now - state.arrivals[0] > 1000) state.arrivals.shift();
  if (sentAt !== undefined) {
    state.latencies.push(now - sentAt);
    if (state.latencies.length > 200) state.latencies.shift();
  }
  showStats();
  showFrameInfo(meta);
  showMessage("");
  if (state.webcam) scheduleWebcam(0); // one webcam picture per frame: the camera never outruns the GPU
}

// -- what the page shows -------------------------------------------------------------------------------------------
function setStatus(text) {
  $("status").textContent = text;
}

function showMessage(text, kind) {
  const el = $("message");
  el.textContent = text;
  el.className = kind || "";
}

function percentile(values, q) {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))];
}

function showStats() {
  const lat = state.latencies;
  const last = lat.length ? lat[lat.length - 1] : NaN;
  const fps = state.arrivals.length; // frames in the last second
  const parts = [`${fps.toFixed(1)} fps`, `${Math.round(last)} ms latency`];
  if (lat.length) parts.push(`p50 ${Math.round(percentile(lat, 0.5))} ms`, `p95 ${Math.round(percentile(lat, 0.95))} ms`);
  parts.push(`${state.frames} frames`);
  $("stats").textContent = parts.join(" · ");
}

// What the page's control choices are called (the server's `controls` per mode decides which are offered).
const CONTROL_LABELS = {
  none: "the start (img2img)",
  scribble: "a layout: its lines (scribble ControlNet)",
  canny: "a layout: its edges (canny ControlNet)",
  depth: "a layout: its depth (depth ControlNet)",
};

function showFrameInfo(meta) {
  const how = meta.control
    ? `guided by ${meta.control}`
    : meta.img2img
      ? `img2img, strength ${meta.strength}`
      : "from the prompt";
  const steps = `${meta.num_inference_steps} step${meta.num_inference_steps === 1 ? "" : "s"}`;
  $("frame-info").textContent =
    `${meta.mode} · ${how} · ${steps} · seed ${meta.seed} · ${meta.width}×${meta.height} · “${meta.prompt}”`;
}

// -- the controls ----------------------------------------------------------------------------------------------------
function mode() {
  return state.hello.modes.find((m) => m.name === $("mode").value);
}

function source() {
  return document.querySelector("input[name=source]:checked").value;
}

function setUpControls(hello) {
  const select = $("mode");
  select.replaceChildren(
    ...hello.modes.map((m) => new Option(`${m.title} (${m.name})`, m.name, false, m.name === hello.defaults.mode)),
  );
  const strength = $("strength");
  strength.min = hello.strength.min;
  strength.max = hello.strength.max;
  strength.value = hello.defaults.strength;
  const seed = $("seed");
  seed.min = hello.seed.min;
  seed.max = hello.seed.max;
  if (seed.value === "") seed.value = randomSeed();
  applyMode();
  settingsChanged();
}

function randomSeed() {
  return Math.floor(Math.random() * 2 ** 31);
}

function applyMode() {
  const m = mode();
  const steps = $("steps");
  steps.min = m.steps.min;
  steps.max = m.steps.max;
  steps.value = m.steps.default;
  const fast = $("fast-decode");
  fast.disabled = !m.fast_decode;
  fast.checked = m.fast_decode;
  $("licence").textContent = m.non_commercial ? `${m.title}: ${m.licence}.` : "";
  const control = $("control");
  const kept = control.value;
  const kinds = ["none", ...m.controls];
  control.replaceChildren(...kinds.map((k) => new Option(CONTROL_LABELS[k], k, false, k === kept)));
  control.disabled = m.controls.length === 0;
  resizeCanvas(m.size);
}

function settings() {
  return {
    prompt: $("prompt").value,
    mode: $("mode").value,
    num_inference_steps: Number($("steps").value),
    strength: Number($("strength").value),
    seed: Number($("seed").value),
    fast_decode: $("fast-decode").checked && !$("fast-decode").disabled,
    img2img: source() !== "text",
    control: $("control").value || "none",
  };
}

function settingsChanged() {
  if (!state.hello) return;
  $("steps-value").textContent = $("steps").value;
  $("strength-value").textContent = Number($("strength").value).toFixed(2);
  state.send(JSON.stringify(settings()));
}

$("prompt").addEventListener("input", settingsChanged);
$("steps").addEventListener("input", settingsChanged);
$("strength").addEventListener("input", settingsChanged);
$("seed").addEventListener("input", settingsChanged);
$("fast-decode").addEventListener("change", settingsChanged);
$("control").addEventListener("change", () => {
  settingsChanged();
  queuePicture();
});
$("mode").addEventListener("change", () => {
  applyMode();
  settingsChanged();
  queuePicture();
});
$("new-seed").addEventListener("click", () => {
  $("seed").value = randomSeed();
  settingsChanged();
});
for (const radio of document.querySelectorAll("input[name=source]")) {
  radio.addEventListener("change", () => {
    if (source() === "webcam") startWebcam();
    else stopWebcam();
    settingsChanged();
    queuePicture();
  });
}

// -- painting --------------------------------------------------------------------------------------------------------
function resizeCanvas(size) {
  if (canvas.width === size && canvas.dataset.ready) return;
  const old = document.createElement("canvas");
  old.width = canvas.width;
  old.height = canvas.height;
  old.getContext("2d").drawImage(canvas, 0, 0);
  canvas.width = canvas.height = size;
  ctx.fillStyle = "#ffffff";
  ctx.fillRect(0, 0, size, size);
  if (canvas.dataset.ready) ctx.drawImage(old, 0, 0, size, size); // the painting, scaled to the new size
  canvas.dataset.ready = "1";
}

function canvasPoint(event) {
  const box = canvas.getBoundingClientRect();
  return [((event.clientX - box.left) * canvas.width) / box.width, ((event.clientY - box.top) * canvas.height) / box.height];
}

canvas.addEventListener("pointerdown", (event) => {
  canvas.setPointerCapture(event.pointerId);
  if (source() !== "canvas") {
    // Painting makes the painting the source at once: a new user's first strokes give frames.
    document.querySelector("input[name=source][value=canvas]").checked = true;
    stopWebcam();
    settingsChanged();
  }
  state.painting = canvasPoint(event);
  stroke(state.painting);
});
canvas.addEventListener("pointermove", (event) => {
  if (state.painting) stroke(canvasPoint(event));
});
for (const end of ["pointerup", "pointercancel"]) {
  canvas.addEventListener(end, () => {
    state.painting = null;
  });
}

function stroke(to) {
  const from = state.painting;
  ctx.strokeStyle = $("colour").value;
  ctx.lineWidth = Number($("brush-size").value);
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(from[0], from[1]);
  ctx.lineTo(to[0], to[1]);
  ctx.stroke();
  state.painting = to;
  queuePicture();
}

$("clear").addEventListener("click", () => {
  ctx.fillStyle = "#ffffff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  queuePicture();
});

// At most one picture per animation frame; the server keeps only the latest anyway.
function queuePicture() {
  if (source() !== "canvas" || state.pictureQueued) return;
  state.pictureQueued = true;
  requestAnimationFrame(() => {
    state.pictureQueued = false;
    sendCanvas(canvas);
  });
}

function sendCanvas(from) {
  from.toBlob((blob) => blob && blob.arrayBuffer().then(state.send), "image/jpeg", 0.9);
}

// -- the webcam ----------------------------------------------------------------------------------------------------
async function startWebcam() {
  const video = $("webcam");
  try {
    state.webcam = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 } });
  } catch (error) {
    showMessage(`webcam: ${error.message}`, "error");
    return;
  }
  video.srcObject = state.webcam;
  await video.play();
  scheduleWebcam(0);
}

function stopWebcam() {
  if (!state.webcam) return;
  for (const track of state.webcam.getTracks()) track.stop();
  state.webcam = null;
  clearTimeout(state.webcamTimer);
}

// The next webcam picture: after each frame, or after `delay` ms (an error, or the first one).
function scheduleWebcam(delay) {
  clearTimeout(state.webcamTimer);
  state.webcamTimer = setTimeout(sendWebcam, delay);
}

function sendWebcam() {
  const video = $("webcam");
  if (!state.webcam || !video.videoWidth) return scheduleWebcam(100);
  const size = mode().size;
  const side = Math.min(video.videoWidth, video.videoHeight); // centre square, as the server would crop
  const grab = document.createElement("canvas");
  grab.width = grab.height = size;
  grab.getContext("2d").drawImage(video, (video.videoWidth - side) / 2, (video.videoHeight - side) / 2, side, side, 0, 0, size, size);
  sendCanvas(grab);
  scheduleWebcam(1000); // in case no frame comes back (the server refused the input)
}

connect();
