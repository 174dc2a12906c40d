// cosyvoice-lite web page: plain JavaScript, no build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  info: null,
  apiKey: localStorage.getItem("cosyvoice-lite-key") || "",
  busy: null,          // {controller, player} while a synthesis runs
  recording: null,     // {context, stream, node, chunks, rate, started}
  promptBlob: null,    // the recording or file that will become a voice
  promptName: "",
};

// ------------------------------------------------------------------ API helpers

function headers(extra = {}) {
  return state.apiKey ? { ...extra, Authorization: `Bearer ${state.apiKey}` } : extra;
}

class ApiError extends Error {
  constructor(status, code, message, retryAfter) {
    super(message);
    this.status = status; this.code = code; this.retryAfter = retryAfter;
  }
}

async function apiError(response) {
  let message = response.statusText || "request failed", code = "";
  try {
    const body = await response.json();
    if (body && body.error) { message = body.error.message || message; code = body.error.code || ""; }
  } catch (_) { /* not JSON */ }
  return new ApiError(response.status, code, message, response.headers.get("Retry-After"));
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "network", "the server cannot be reached (is it running?)");
  }
  if (!response.ok) throw await apiError(response);
  return response;
}

// ------------------------------------------------------------------ messages

const TITLES = {
  0: "Connection problem", 400: "Cannot do that", 401: "API key needed", 404: "Not found",
  409: "Name taken", 413: "Too large", 415: "Unsupported file", 422: "Invalid request",
  429: "Server busy", 500: "Server error", 503: "Not ready", 504: "Took too long",
};

function showError(err) {
  if (err && err.name === "AbortError") return;
  const status = err instanceof ApiError ? err.status : 0;
  let message = err instanceof ApiError ? err.message : String(err && err.message || err);
  if (status === 429 && err.retryAfter) message += ` (try again in ${err.retryAfter} s)`;
  $("error-title").textContent = `${TITLES[status] || "Error"}${status ? ` (${status})` : ""}:`;
  $("error-message").textContent = message;
  $("error").hidden = false;
  $("error").scrollIntoView({ block: "nearest", behavior: "smooth" });
  if (status === 401) $("auth").hidden = false;
}

function clearError() { $("error").hidden = true; }

// ------------------------------------------------------------------ model status & voices

async function loadInfo() {
  const info = await (await api("/info")).json();
  state.info = info;
  const pill = $("status");
  pill.textContent = info.status;
  pill.className = `pill pill-${info.status}`;
  if (info.auth_required && !state.apiKey) $("auth").hidden = false;
  const limit = info.limits.max_text_chars;
  $("limits").textContent = `up to ${limit} characters per request · prompts up to ` +
    `${info.limits.max_prompt_seconds} s and ${(info.limits.max_upload_bytes / 1048576).toFixed(0)} MB`;
  if (info.model) {
    const m = info.model;
    $("model-name").textContent = `${m.name} · CosyVoice v${m.version} ${m.variant} · ${(m.sample_rate / 1000).toFixed(2)} kHz`;
    $("instruct-field").hidden = !m.instruct;
    $("instruct-hint").textContent = m.instruct_needs_preset ? "(with preset voices)" : "";
  } else if (info.status === "failed") {
    $("model-name").textContent = "model failed to load";
    showError(new ApiError(503, "model_failed", info.error || "the model failed to load"));
  } else {
    $("model-name").textContent = "loading the model…";
  }
  updateCount();
  return info;
}

async function waitUntilReady() {
  for (;;) {
    try {
      const info = await loadInfo();
      if (info.status !== "loading") return info;
    } catch (err) { showError(err); }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

async function loadVoices(select) {
  const { speakers } = await (await api("/speakers")).json();
  const voice = $("voice");
  const previous = select || voice.value;
  voice.replaceChildren();
  const groups = { preset: "Preset voices", saved: "Saved voices" };
  for (const kind of ["saved", "preset"]) {
    const items = speakers.filter((s) => s.kind === kind);
    if (!items.length) continue;
    const group = document.createElement("optgroup");
    group.label = groups[kind];
    for (const s of items) group.append(new Option(s.name, s.name));
    voice.append(group);
  }
  if (!speakers.length) voice.append(new Option("No voices yet — create one →", ""));
  if ([...voice.options].some((o) => o.value === previous)) voice.value = previous;
  renderVoiceList(speakers.filter((s) => s.kind === "saved"));
  updateCount();
}

function renderVoiceList(saved) {
  const list = $("voice-list");
  list.replaceChildren();
  if (!saved.length) {
    const empty = document.createElement("li");
    empty.className = "muted small";
    empty.textContent = "No saved voices yet.";
    list.append(empty);
  }
  for (const v of saved) {
    const li = document.createElement("li");
    li.dataset.voice = v.name;
    const who = document.createElement("div");
    who.className = "who";
    const name = document.createElement("b");
    name.textContent = v.name;
    const detail = document.createElement("span");
    detail.textContent = `${v.duration.toFixed(1)} s · ${v.prompt_text || "no transcript (cross-lingual)"}`;
    detail.title = v.prompt_text;
    who.append(name, detail);
    const play = button("▶", "btn small", "Play the recording", () => playPrompt(v.name));
    const use = button("Use", "btn small", "Speak with this voice", () => { $("voice").value = v.name; $("text").focus(); });
    const del = button("Delete", "btn small danger", "Delete this voice", () => deleteVoice(v.name));
    li.append(who, play, use, del);
    list.append(li);
  }
}

function button(label, cls, title, onClick) {
  const b = document.createElement("button");
  b.type = "button"; b.className = cls; b.textContent = label; b.title = title;
  b.addEventListener("click", onClick);
  return b;
}

async function playPrompt(name) {
  try {
    const blob = await (await api(`/voices/${encodeURIComponent(name)}/audio`)).blob();
    const audio = new Audio(URL.createObjectURL(blob));
    await audio.play();
  } catch (err) { showError(err); }
}

async function deleteVoice(name) {
  if (!confirm(`Delete the voice "${name}"?`)) return;
  try {
    await api(`/voices/${encodeURIComponent(name)}`, { method: "DELETE" });
    await loadVoices();
  } catch (err) { showError(err); }
}

// ------------------------------------------------------------------ text box

function updateCount() {
  const limit = state.info ? state.info.limits.max_text_chars : 200;
  const length = [...$("text").value].length;
  const count = $("count");
  count.textContent = `${length} / ${limit}`;
  count.classList.toggle("over", length > limit);
  count.title = length > limit ? "Too long for one request: split the text or shorten it" : "";
  const ready = state.info && state.info.status === "ready";
  $("speak").disabled = !ready || !!state.busy || length === 0 || length > limit || !$("voice").value;
}

// ------------------------------------------------------------------ audio helpers

function wavBlob(samples, rate) {
  const buffer = new ArrayBuffer(44 + samples.length * 2);
  const view = new DataView(buffer);
  const text = (offset, s) => { for (let i = 0; i < s.length; i++) view.setUint8(offset + i, s.charCodeAt(i)); };
  text(0, "RIFF"); view.setUint32(4, 36 + samples.length * 2, true); text(8, "WAVE");
  text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, rate * 2, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, samples.length * 2, true);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    view.setInt16(44 + i * 2, s < 0 ? s * 32768 : s * 32767, true);
  }
  return new Blob([buffer], { type: "audio/wav" });
}

// Plays 16-bit PCM as it arrives: each piece is scheduled right after the previous one.
class StreamPlayer {
  constructor(rate) {
    this.rate = rate;
    this.context = new AudioContext({ sampleRate: rate });
    this.next = 0;
    this.pieces = [];
    this.leftover = null;
    this.sources = [];
  }
  push(bytes) {
    if (this.leftover) { const joined = new Uint8Array(this.leftover.length + bytes.length); joined.set(this.leftover); joined.set(bytes, this.leftover.length); bytes = joined; this.leftover = null; }
    if (bytes.length % 2) { this.leftover = bytes.slice(bytes.length - 1); bytes = bytes.slice(0, bytes.length - 1); }
    if (!bytes.length) return;
    const ints = new Int16Array(bytes.buffer, bytes.byteOffset, bytes.length / 2);
    const floats = Float32Array.from(ints, (v) => v / 32768);
    this.pieces.push(floats);
    const buffer = this.context.createBuffer(1, floats.length, this.rate);
    buffer.copyToChannel(floats, 0);
    const source = this.context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.context.destination);
    const start = Math.max(this.context.currentTime + 0.05, this.next);
    source.start(start);
    this.next = start + buffer.duration;
    this.sources.push(source);
  }
  samples() {
    const total = this.pieces.reduce((n, p) => n + p.length, 0);
    const all = new Float32Array(total);
    let offset = 0;
    for (const p of this.pieces) { all.set(p, offset); offset += p.length; }
    return all;
  }
  stop() { for (const s of this.sources) { try { s.stop(); } catch (_) { /* not started */ } } this.context.close(); }
}

// ------------------------------------------------------------------ synthesis

function requestBody(stream) {
  const body = { text: $("text").value, speaker: $("voice").value, speed: Number($("speed").value) };
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = Number(seed);
  const instruct = $("instruct").value.trim();
  if (!$("instruct-field").hidden && instruct) body.instruct = instruct;
  if (stream) { body.stream = true; body.format = "pcm"; } else { body.format = $("format").value; }
  return body;
}

async function speak() {
  if ($("speak").disabled) return;
  clearError();
  const stream = $("stream").checked && Number($("speed").value) === 1;
  const body = requestBody(stream);
  const controller = new AbortController();
  state.busy = { controller, player: null };
  setBusy(true, "Synthesizing…");
  const started = performance.now();
  try {
    const response = await api("/tts", {
      method: "POST", body: JSON.stringify(body), signal: controller.signal,
      headers: { "Content-Type": "application/json" },
    });
    let blob, format = body.format, firstAudio = null, streamedSeconds = null;
    if (stream) {
      const rate = Number(response.headers.get("X-Sample-Rate"));
      const player = new StreamPlayer(rate);
      state.busy.player = player;
      const reader = response.body.getReader();
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        if (firstAudio === null && value.length) {
          firstAudio = (performance.now() - started) / 1000;
          setBusy(true, `Playing · first audio after ${firstAudio.toFixed(2)} s`);
        }
        player.push(value);
      }
      const samples = player.samples();
      if (!samples.length) throw new ApiError(500, "no_audio", "the server sent no audio");
      blob = wavBlob(samples, rate);
      format = "wav";
      streamedSeconds = samples.length / rate;
    } else {
      blob = await response.blob();
    }
    const seconds = (performance.now() - started) / 1000;
    addResult({ body, blob, format, seconds, firstAudio, autoplay: !stream,
                duration: streamedSeconds || Number(response.headers.get("X-Audio-Duration")) || null,
                id: response.headers.get("X-Request-Id") || String(Date.now()) });
  } catch (err) {
    showError(err);
  } finally {
    state.busy = null;
    setBusy(false);
  }
}

function stop() {
  if (!state.busy) return;
  state.busy.controller.abort();
  if (state.busy.player) state.busy.player.stop();
}

function setBusy(busy, text) {
  $("progress").hidden = !busy;
  if (text) $("progress-text").textContent = text;
  $("stop").hidden = !busy;
  updateCount();
}

function addResult({ body, blob, format, seconds, firstAudio, duration, id, autoplay }) {
  const url = URL.createObjectURL(blob);
  const item = document.createElement("li");
  item.className = "result";
  const said = document.createElement("div");
  said.className = "said";
  said.textContent = body.text;
  const meta = document.createElement("div");
  meta.className = "meta";
  const time = new Date().toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  const parts = [time, body.speaker];
  if (duration) parts.push(`${duration.toFixed(2)} s of audio`);
  parts.push(`made in ${seconds.toFixed(2)} s`);
  if (firstAudio !== null && firstAudio !== undefined) parts.push(`first audio after ${firstAudio.toFixed(2)} s`);
  if (body.speed !== 1) parts.push(`speed ${body.speed}×`);
  if (body.seed !== undefined) parts.push(`seed ${body.seed}`);
  if (body.instruct) parts.push(`“${body.instruct}”`);
  meta.textContent = parts.join(" · ");
  const audio = document.createElement("audio");
  audio.controls = true;
  audio.preload = "auto";
  audio.src = url;
  const ext = format === "opus" ? "ogg" : format;
  const link = document.createElement("a");
  link.className = "btn small dl";
  link.href = url;
  link.download = `cosyvoice-${id}.${ext}`;
  link.textContent = `Download ${ext.toUpperCase()}`;
  item.append(said, link, meta, audio);
  $("results").prepend(item);
  $("results-empty").hidden = true;
  if (autoplay) audio.play().catch(() => { /* autoplay blocked: the controls are there */ });
}

// ------------------------------------------------------------------ voices: file or microphone

function setPrompt(blob, label) {
  state.promptBlob = blob;
  state.promptName = label;
  $("voice-source").textContent = blob ? `${label} · ${(blob.size / 1024).toFixed(0)} KB` : "No recording chosen";
  const preview = $("voice-preview");
  preview.hidden = !blob;
  if (blob) preview.src = URL.createObjectURL(blob);
}

async function toggleRecording() {
  if (state.recording) { finishRecording(); return; }
  clearError();
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false } });
    const context = new AudioContext();
    await context.audioWorklet.addModule("/static/recorder-worklet.js");
    const source = context.createMediaStreamSource(stream);
    const node = new AudioWorkletNode(context, "recorder");
    const rec = { context, stream, node, chunks: [], rate: context.sampleRate, started: performance.now() };
    node.port.onmessage = (e) => rec.chunks.push(e.data);
    source.connect(node);
    state.recording = rec;
    $("record").textContent = "■ Stop";
    $("record").classList.add("recording");
    $("record-time").hidden = false;
    rec.timer = setInterval(() => {
      const s = (performance.now() - rec.started) / 1000;
      $("record-time").textContent = `${s.toFixed(1)} s`;
      if (state.info && s >= state.info.limits.max_prompt_seconds) finishRecording();
    }, 100);
  } catch (err) {
    showError(new Error(`the microphone is not available: ${err.message || err}`));
  }
}

function finishRecording() {
  const rec = state.recording;
  if (!rec) return;
  state.recording = null;
  clearInterval(rec.timer);
  rec.stream.getTracks().forEach((t) => t.stop());
  rec.node.disconnect();
  rec.context.close();
  const total = rec.chunks.reduce((n, c) => n + c.length, 0);
  const samples = new Float32Array(total);
  let offset = 0;
  for (const c of rec.chunks) { samples.set(c, offset); offset += c.length; }
  $("record").textContent = "● Record";
  $("record").classList.remove("recording");
  $("record-time").hidden = true;
  setPrompt(wavBlob(samples, rec.rate), `recording (${(total / rec.rate).toFixed(1)} s)`);
}

async function saveVoice(event) {
  event.preventDefault();
  clearError();
  if (state.recording) finishRecording();
  const name = $("voice-name").value.trim();
  if (!state.promptBlob) { showError(new ApiError(400, "missing_field", "choose a file or record the prompt first")); return; }
  const form = new FormData();
  form.append("name", name);
  form.append("prompt_text", $("voice-text").value.trim());
  form.append("audio", state.promptBlob, state.promptName.endsWith(".wav") ? state.promptName : "prompt.wav");
  const save = $("voice-save");
  save.disabled = true;
  save.textContent = "Saving…";
  try {
    const voice = await (await api("/voices", { method: "POST", body: form })).json();
    $("voice-form").reset();
    setPrompt(null, "");
    await loadVoices(voice.name);
  } catch (err) {
    showError(err);
  } finally {
    save.disabled = false;
    save.textContent = "Save voice";
  }
}

// ------------------------------------------------------------------ wiring

// Streaming plays raw PCM as it comes; speed changes need whole sentences (no streaming), and the
// file format applies to non-streamed results.
function syncControls() {
  const speed = Number($("speed").value);
  $("speed-value").textContent = `${speed.toFixed(2).replace(/0$/, "")}×`;
  $("stream").disabled = speed !== 1;
  $("stream").parentElement.title = speed !== 1 ? "Speed changes need the whole sentence: no streaming" : "";
  $("format").disabled = $("stream").checked && speed === 1;
}

function wire() {
  $("text").addEventListener("input", updateCount);
  $("voice").addEventListener("change", updateCount);
  $("text").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) speak(); });
  $("speed").addEventListener("input", syncControls);
  $("stream").addEventListener("change", syncControls);
  syncControls();
  $("speak").addEventListener("click", speak);
  $("stop").addEventListener("click", stop);
  $("error-close").addEventListener("click", clearError);
  $("voice-file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) setPrompt(file, file.name);
  });
  $("record").addEventListener("click", toggleRecording);
  $("voice-form").addEventListener("submit", saveVoice);
  $("auth").addEventListener("submit", async (event) => {
    event.preventDefault();
    state.apiKey = $("api-key").value.trim();
    localStorage.setItem("cosyvoice-lite-key", state.apiKey);
    $("auth").hidden = true;
    clearError();
    try { await loadVoices(); } catch (err) { showError(err); }
  });
}

async function main() {
  wire();
  const info = await waitUntilReady();
  if (info.status === "ready") {
    try { await loadVoices(); } catch (err) { showError(err); }
  }
  document.body.dataset.ready = info.status;
}

main();
