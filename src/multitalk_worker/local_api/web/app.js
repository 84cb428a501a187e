// The try-it page of the local API: builds a v1 job from the form (an image to animate or a video to dub, the
// model), previews it (validate_only), runs it (/run, then /status/{id} every half second) and shows the video
// (/jobs/{id}/video). Regions are drawn with pointer events (mouse, pen or finger). No framework.
"use strict";

const $ = (id) => document.getElementById(id);
const COLOURS = ["rgb(255,140,0)", "rgb(40,120,255)"]; // speaker 1, 2: as preview.py draws them
const state = { image: null, video: null, picture: null, audio: [null, null], regions: [null, null], drawing: null,
  job: null, models: [], partSeconds: null, swap: null };

function readAsDataURI(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function api(method, path, body) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const token = $("token").value.trim();
  if (token) headers["Authorization"] = "Bearer " + token;
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (response.status === 401) $("token-row").hidden = false;
  const data = await response.json();
  return { status: response.status, data };
}

// A failed job's `error` is a JSON string, as on RunPod; a refused request's is an object.
function parseError(error) {
  if (typeof error !== "string") return error;
  try { return JSON.parse(error); } catch { return { code: "ERROR", message: error }; }
}

function showStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function errorText(error) {
  const parsed = parseError(error);
  return parsed ? `${parsed.code}: ${parsed.message}` : "unknown error";
}

// After a failed check or job nothing of an earlier one stays on screen: no old preview, plan or bar.
function clearPreview() {
  $("preview").removeAttribute("src");
  $("plan").textContent = "";
}

function clearRun() {
  $("bar").hidden = true;
  $("bar").value = 0;
  $("result").hidden = true;
  $("result").removeAttribute("src");
  state.swap = null;
  $("download").hidden = true;
  $("cancel").hidden = true;
}

function fail(text) {
  clearPreview();
  clearRun();
  showStatus(text, true);
}

// ------------------------------------------------------------------ form and job

async function init() {
  const schema = (await api("GET", "/openapi.json")).data.components.schemas.GenerateInput.properties;
  for (const value of schema.resolution.enum) $("resolution").add(new Option(value, value));
  $("resolution").value = schema.resolution.default;
  const health = (await api("GET", "/health")).data;
  showModels(health.models || []);
  if (health.settings && health.settings.MULTITALK_WEIGHTS === "tiny") {
    $("model-note").hidden = false;
    $("model-note").textContent = "This server runs the built-in tiny model (random weights): its video is noise, " +
      "it proves the plumbing. Resolution 'tiny' is preselected.";
    $("resolution").value = "tiny";
  }
}

// The models the server holds (from /health): the model choice, and a line naming each one's adapters.
function showModels(models) {
  state.models = models;
  for (const m of models) {
    const takes = m.sources.join(" or ");
    $("model").add(new Option(`${m.model} (${takes})`, m.model));
    if (m.default) $("model").value = m.model;
  }
  $("models").textContent = "This server holds: " + models.map((m) =>
    `${m.model} (adapters ${m.adapters.join(", ")}; takes ${m.sources.join(" or ")})`).join("; ") +
    (models.length ? "." : " no model (see /health).");
  $("video").disabled = !models.some((m) => m.sources.includes("video"));
  showPresets();
}

// The chosen model's presets (each model has its own), its default preselected.
function showPresets() {
  const chosen = state.models.find((m) => m.model === $("model").value);
  $("preset").replaceChildren(...(chosen ? chosen.presets : []).map((name) => new Option(name, name)));
  if (chosen) $("preset").value = chosen.default_preset;
}

function modelTakes(source) {
  const chosen = state.models.find((m) => m.model === $("model").value);
  return chosen !== undefined && chosen.sources.includes(source);
}

function buildJob(validateOnly) {
  if (!state.image && !state.video) throw new Error("choose an image or a video");
  const source = state.video ? "video" : "image";
  if (!modelTakes(source)) throw new Error(`model ${$("model").value} does not take a ${source}`);
  if (!state.audio[0]) throw new Error("choose the audio of speaker 1");
  const two = state.audio[1] !== null;
  const speakers = [{ audio: state.audio[0] }];
  if (two) speakers.push({ audio: state.audio[1] });
  if (two && (state.regions[0] || state.regions[1])) {
    if (!state.regions[0] || !state.regions[1]) throw new Error("draw a box for both speakers, or for neither");
    speakers.forEach((speaker, i) => { speaker.region = state.regions[i].map((v) => Math.round(v * 1000) / 1000); });
  }
  const job = { model: $("model").value, speakers, prompt: $("prompt").value, preset: $("preset").value,
    resolution: $("resolution").value, validate_only: validateOnly };
  if (state.video) job.video = state.video; else job.image = state.image;
  if (two) job.audio_mode = $("audio_mode").value;
  if ($("max_duration_s").value) job.max_duration_s = Number($("max_duration_s").value);
  const advanced = {};
  if ($("steps").value) advanced.steps = Number($("steps").value);
  if ($("seed").value) advanced.seed = Number($("seed").value);
  if (Object.keys(advanced).length) job.advanced = advanced;
  return job;
}

// ------------------------------------------------------------------ regions on the image

function drawCanvas() {
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (state.picture) ctx.drawImage(state.picture, 0, 0, canvas.width, canvas.height);
  state.regions.forEach((box, i) => {
    if (!box) return;
    ctx.strokeStyle = COLOURS[i];
    ctx.lineWidth = 3;
    ctx.strokeRect(box[0] * canvas.width, box[1] * canvas.height,
      (box[2] - box[0]) * canvas.width, (box[3] - box[1]) * canvas.height);
    ctx.fillStyle = COLOURS[i];
    ctx.font = "bold 16px sans-serif";
    ctx.fillText(String(i + 1), box[0] * canvas.width + 4, box[1] * canvas.height + 16);
  });
  $("region-text").textContent = state.regions
    .map((box, i) => box ? `speaker ${i + 1}: [${box.map((v) => v.toFixed(2)).join(", ")}]` : "")
    .filter(Boolean).join("  ");
}

function pointer(event) {
  const rect = $("canvas").getBoundingClientRect();
  const clamp = (v) => Math.min(1, Math.max(0, v));
  return [clamp((event.clientX - rect.left) / rect.width), clamp((event.clientY - rect.top) / rect.height)];
}

// Pointer events: a mouse drag, a pen or a finger (the canvas has `touch-action: none`, so a finger draws
// instead of scrolling the page; the pointer is captured, so a drag that leaves the canvas still ends).
function setUpCanvas() {
  const canvas = $("canvas");
  let start = null;
  canvas.addEventListener("pointerdown", (event) => {
    if (state.drawing === null || !event.isPrimary) return;
    start = pointer(event);
    canvas.setPointerCapture(event.pointerId);
    event.preventDefault();
  });
  canvas.addEventListener("pointermove", (event) => {
    if (start === null || !event.isPrimary) return;
    const [x, y] = pointer(event);
    state.regions[state.drawing] = [Math.min(start[0], x), Math.min(start[1], y), Math.max(start[0], x), Math.max(start[1], y)];
    drawCanvas();
  });
  const end = () => {
    if (start === null) return;
    const box = state.regions[state.drawing];
    if (box && (box[2] - box[0] < 0.01 || box[3] - box[1] < 0.01)) state.regions[state.drawing] = null;
    start = null;
    selectDrawing(null);
    drawCanvas();
  };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
}

function showPicture(picture, width, height) {
  state.picture = picture;
  const canvas = $("canvas");
  canvas.width = 480;
  canvas.height = picture ? Math.round(480 * height / width) : 360;
  drawCanvas();
}

function selectDrawing(index) {
  state.drawing = index;
  $("draw1").classList.toggle("active", index === 0);
  $("draw2").classList.toggle("active", index === 1);
}

// ------------------------------------------------------------------ actions

async function check() {
  let job;
  try { job = buildJob(true); } catch (error) { fail(error.message); return; }
  showStatus("checking the inputs ...");
  const { data } = await api("POST", "/runsync", { input: job });
  if (data.status !== "COMPLETED") { fail(errorText(data.error)); return; }
  const plan = data.output.plan;
  $("preview").src = plan.preview_png;
  $("preview").classList.toggle("small", plan.bucket[1] < 480); // tiny buckets: show the pixels, not a blur
  const estimate = plan.estimate.gpu_s !== null ? `about ${plan.estimate.gpu_s} s of GPU (${plan.estimate.source})`
    : `no estimate: ${plan.estimate.reason}`;
  $("plan").textContent = `bucket ${plan.bucket[1]}x${plan.bucket[0]} (width x height), ${plan.clips} clip(s), ` +
    `${plan.frames} frames (${plan.duration_s.toFixed(2)} s), ${plan.resolved.steps} steps x ` +
    `${plan.passes_per_step} passes = ${plan.passes} DiT passes; ${estimate}`;
  showStatus("inputs OK");
}

async function submit() {
  let job;
  try { job = buildJob(false); } catch (error) { fail(error.message); return; }
  clearRun();
  const { data } = await api("POST", "/run", { input: job });
  if (!data.id) { fail(errorText(data.error)); return; }
  state.job = data.id;
  $("cancel").hidden = false;
  $("bar").hidden = false;
  $("bar").value = 0;
  poll(data.id);
}

function describe(body) {
  const p = body.progress;
  if (body.status === "IN_QUEUE") return `queued (position ${body.position})`;
  let text = p.stage;
  if (p.chunks) text += ` - clip ${p.chunk}/${p.chunks}, step ${p.step}/${p.steps}`;
  if (p.percent !== null) text += ` - ${p.percent}%`;
  if (p.eta_s !== null) text += ` - about ${Math.round(p.eta_s)} s left`;
  if (body.ready_s) text += ` - ${body.ready_s.toFixed(1)} s ready`;
  return text;
}

// While the job runs, /jobs/{id}/video is the part so far (its finished clips). The first part starts by itself,
// muted (what browsers allow without a click); a newer part (more seconds ready) and at the end the finished
// video replace it at the same position, playing on unless the user paused it (a part that played to its end
// goes on with the new seconds).
function swapVideo(url) {
  const video = $("result");
  const pending = state.swap; // a swap still loading: its position and playing state carry over
  const at = pending ? pending.at : video.hidden ? 0 : video.currentTime;
  const play = pending ? pending.play : video.hidden || !video.paused || video.ended;
  const swap = { at, play };
  state.swap = swap;
  if (video.hidden) video.muted = true;
  video.addEventListener("loadedmetadata", () => {
    if (state.swap !== swap) return; // a newer swap's listener takes over
    state.swap = null;
    video.classList.toggle("small", video.videoWidth < 480); // tiny videos: show the pixels, not a blur
    if (at) video.currentTime = Math.min(at, video.duration || at);
    if (play) video.play().catch(() => {}); // a refused autoplay leaves the controls to the user
  }, { once: true });
  video.src = url;
  video.hidden = false;
}

function showPart(id, readySeconds) {
  if (!readySeconds || readySeconds === state.partSeconds) return;
  state.partSeconds = readySeconds;
  swapVideo(`/jobs/${id}/video?ready=${readySeconds}`);
}

async function poll(id) {
  const { data } = await api("GET", `/status/${id}`);
  if (state.job !== id) return;
  if (data.progress && data.progress.percent !== null) $("bar").value = data.progress.percent;
  if (data.status === "COMPLETED") {
    state.job = null;
    $("cancel").hidden = true;
    $("bar").value = 100;
    const url = data.output.video.url;
    state.partSeconds = null;
    swapVideo(url);
    $("download").href = url;
    $("download").hidden = false;
    const out = data.output;
    showStatus(`done: ${out.frames} frames, ${out.width}x${out.height}, ${out.duration_s.toFixed(2)} s, seed ${out.seed}`);
    return;
  }
  if (data.status === "FAILED" || data.status === "TIMED_OUT" || data.status === "CANCELLED") {
    state.job = null;
    clearPreview();
    clearRun();
    showStatus(`${data.status.toLowerCase()}: ${errorText(data.error)}`, data.status !== "CANCELLED");
    return;
  }
  showStatus(describe(data));
  if (data.status === "IN_PROGRESS") showPart(id, data.ready_s);
  setTimeout(() => poll(id), 500);
}

function setUpInputs() {
  // One source: choosing an image drops the video and the other way round; a video picks a model that dubs.
  $("image").addEventListener("change", async () => {
    const file = $("image").files[0];
    state.image = file ? await readAsDataURI(file) : null;
    if (file) { state.video = null; $("video").value = ""; }
    state.regions = [null, null];
    if (!state.image) { showPicture(null); return; }
    const picture = new Image();
    picture.onload = () => showPicture(picture, picture.naturalWidth, picture.naturalHeight);
    picture.src = state.image;
  });
  $("video").addEventListener("change", async () => {
    const file = $("video").files[0];
    state.video = file ? await readAsDataURI(file) : null;
    if (file) { state.image = null; $("image").value = ""; }
    state.regions = [null, null];
    if (!state.video) { showPicture(null); return; }
    if (!modelTakes("video")) {
      const dubber = state.models.find((m) => m.sources.includes("video"));
      if (dubber) { $("model").value = dubber.model; showPresets(); }
    }
    const first = document.createElement("video"); // its first frame is the picture the regions are drawn on
    first.muted = true;
    first.preload = "auto";
    first.addEventListener("loadeddata", () => showPicture(first, first.videoWidth, first.videoHeight), { once: true });
    first.src = state.video;
  });
  [1, 2].forEach((n) => $(`audio${n}`).addEventListener("change", async () => {
    const file = $(`audio${n}`).files[0];
    state.audio[n - 1] = file ? await readAsDataURI(file) : null;
    $("mode-row").hidden = state.audio[1] === null;
  }));
  $("model").addEventListener("change", showPresets);
  $("draw1").addEventListener("click", () => selectDrawing(0));
  $("draw2").addEventListener("click", () => selectDrawing(1));
  $("clear").addEventListener("click", () => { state.regions = [null, null]; drawCanvas(); });
  $("check").addEventListener("click", check);
  $("submit").addEventListener("click", submit);
  $("cancel").addEventListener("click", () => { if (state.job) api("POST", `/cancel/${state.job}`); });
}

setUpInputs();
setUpCanvas();
drawCanvas();
init().catch((error) => showStatus(`could not reach the server: ${error}`, true));
