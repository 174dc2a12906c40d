// cosyvoice-lite web page: plain JavaScript, no build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);

// localStorage, or memory for this visit: where the browser blocks site data, merely reading
// localStorage throws (a page that never started), and a write can fail (over the quota)
const storage = {
  memory: new Map(),  // what could not be stored
  get(key) {
    if (this.memory.has(key)) return this.memory.get(key);
    try { return localStorage.getItem(key); } catch (_) { return null; }
  },
  set(key, value) {
    try { localStorage.setItem(key, value); this.memory.delete(key); } catch (_) { this.memory.set(key, value); }
  },
  remove(key) {
    this.memory.delete(key);
    try { localStorage.removeItem(key); } catch (_) { /* nothing stored */ }
  },
};

// An API key as pasted, without what copying adds (spaces around it, zero-width and other
// invisible format characters); "" unless the rest is printable ASCII, as the server requires
// (fetch() cannot even send a header with other characters).
function cleanKey(text) {
  const key = String(text || "").replace(/\p{Cf}/gu, "").trim();
  return /^[\x20-\x7e]+$/.test(key) ? key : "";
}

const KEY_KEY = "cosyvoice-lite-key";
const state = {
  info: null,
  apiKey: cleanKey(storage.get(KEY_KEY)),  // a stored key that cannot be sent is dropped (main)
  busy: null,          // {controller, player} while a synthesis runs
  playing: null,       // the StreamPlayer still playing a finished stream (Stop stops it)
  voicePickedAt: 0,    // when a voice was last picked by hand (against a recording: the later wins)
  mode: storage.get("cosyvoice-lite-mode") || "",
  speakers: [],        // from GET /speakers
  locked: false,       // the server wants an API key the page lacks (none given, or refused)
  away: false,         // a request found the server gone (it is asked again: checkServer)
  listed: false,       // the voice picker lists voices (not a placeholder: locked, none yet)
  lastVoice: "",       // the voice it showed last when it did (picked again once unlocked)
};

// Page modes -> the engine mode each needs (a mode the model lacks is not offered).
const MODES = {
  voice: { needs: null, help: "Speak with a preset voice of the model or a voice you saved." },
  clone: { needs: "zero_shot", help: "Clone a recording without saving it: the recording plus " +
           "exactly what it says. The same recording again costs nothing (the server caches it)." },
  cross: { needs: "cross_lingual", help: "Clone a recording's voice to speak another language: " +
           "no transcript needed." },
  instruct: { needs: "instruct", help: "Tell the model how to speak: a dialect, an emotion, a " +
              "speaking style. Pick a preset or write your own." },
  vc: { needs: "vc", help: "Re-speak a recording in another voice: its words and timing stay, " +
        "the voice changes." },
};

// ------------------------------------------------------------------ API helpers

// Every URL the page uses is relative to the page itself ("info", not "/info"): under a route
// prefix (Ray Serve's route_prefix, a proxy's root_path) the page is /prefix/ and its API is
// /prefix/info, /prefix/tts, ... (the server sends /prefix to /prefix/).

// the routes that need no key: asked without one, a key that is refused (or cannot be sent)
// does not keep the page from starting
const PUBLIC = new Set(["info", "health", "ready"]);

function headers(path, extra = {}) {
  return state.apiKey && !PUBLIC.has(path) ? { ...extra, Authorization: `Bearer ${state.apiKey}` } : extra;
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
  let response, init;
  try {  // a header fetch() cannot send throws here, before the network: not "server gone"
    init = { ...options, headers: new Headers(headers(path, options.headers || {})) };
  } catch (err) {
    throw new ApiError(401, "invalid_key", `the API key cannot be sent (${err.message}): ` +
      "enter it again, printable ASCII characters only");
  }
  try {
    response = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    serverGone();
    throw new ApiError(0, "network", "the server cannot be reached (is it running?)");
  }
  if (!response.ok) throw await apiError(response);
  return response;
}

// ------------------------------------------------------------------ messages

const TITLES = {
  0: "Connection problem", 400: "Cannot do that", 401: "API key needed", 404: "Not found",
  409: "Name taken", 413: "Too large", 415: "Unsupported file", 422: "Invalid request",
  429: "Server busy", 500: "Server error", 502: "Stream cut short", 503: "Not ready",
  504: "Took too long",
};

// A problem of the page itself (no microphone, a key that cannot be used): its own title, no
// status (status 0 is the network's: cleared once the server answers again).
class PageError extends Error {
  constructor(title, message) { super(message); this.title = title; }
}

// ------------------------------------------------------------------ keyboard focus

// A focused control that is hidden, disabled or removed drops the keyboard focus to <body>: the
// next Tab starts again at the top of the page and a screen reader loses its place. What hides
// or disables the control it was used from hands the focus on, on purpose.
function canFocus(el) {
  return !!el && el.isConnected && !el.disabled && !el.hidden && el.getClientRects().length > 0;
}

// the first of ``els`` that can take the focus, else the text box (or, where there is none:
// voice conversion, Speak or the mode's tab)
function moveFocus(...els) {
  const to = [...els, $("text"), $("speak"), $(`mode-${state.mode}`)].find(canFocus);
  if (to) to.focus();
}

function focusLost() {
  return !document.activeElement || document.activeElement === document.body;
}

let errorFrom = null;  // where the focus was before it went to the error (× gives it back)

function showError(err) {
  if (err && err.name === "AbortError") return;
  const focused = document.activeElement;
  if ($("error").hidden && focused && focused !== document.body && !$("error").contains(focused)) {
    errorFrom = focused;
  }
  const status = err instanceof ApiError ? err.status : null;
  let message = err instanceof ApiError ? err.message : String(err && err.message || err);
  if (status === 429 && err.retryAfter && !/retry|again/i.test(message)) message += ` (try again in ${err.retryAfter} s)`;
  const title = err instanceof PageError ? err.title : status === null ? "Something went wrong" : TITLES[status] || "Error";
  $("error-title").textContent = `${title}${status ? ` (${status})` : ""}:`;
  $("error-message").textContent = message;
  $("error").dataset.status = status === null ? "" : String(status);
  $("error").hidden = false;
  $("error").scrollIntoView({ block: "nearest", behavior: "smooth" });
  if (status === 401) {  // the key is missing or refused (a server restarted with another)
    $("api-key").value = "";
    askForKey();
  }
}

function clearError() {
  const inside = $("error").contains(document.activeElement);  // dismissed with ×
  $("error").hidden = true;
  if (inside) moveFocus(errorFrom);
}

const missing = (message) => new ApiError(400, "missing_field", message);

// ------------------------------------------------------------------ model status & voices

function model() { return state.info && state.info.model; }

// a byte count for people: "20 MB", "200 KB" (a limit under a megabyte is not "0 MB")
function size(bytes) {
  return bytes >= 1048576 ? `${(bytes / 1048576).toFixed(0)} MB` : `${Math.max(1, Math.round(bytes / 1024))} KB`;
}

let renderedModel = null;  // the model (as JSON) the name, modes, tags and presets show

async function loadInfo() {
  const info = await (await api("info")).json();
  state.info = info;
  const pill = $("status");
  pill.textContent = info.status;
  pill.className = `pill pill-${info.status}`;
  // a key refused before stays refused until another is given; none needed (any more): unlocked
  state.locked = info.auth_required && (!state.apiKey || state.locked);
  const l = info.limits;
  const mb = size(l.max_upload_bytes);
  $("limits").textContent = `up to ${l.max_text_chars} characters per request (longer text is ` +
    `spoken sentence by sentence) · prompts ${l.min_prompt_seconds}–${l.max_prompt_seconds} s, ` +
    `up to ${mb}`;
  const range = `${l.min_prompt_seconds}–${l.max_prompt_seconds} s; 3–10 s of clear speech work best`;
  $("voice-hint").textContent = range;
  $("prompt-hint").textContent = `Recordings of ${range}. wav, flac, mp3 or ogg at 16 kHz or ` +
    `more, up to ${mb}.`;
  const shown = renderedModel;
  renderedModel = info.model ? JSON.stringify(info.model) : null;
  if (info.model) {
    if (renderedModel !== shown) {  // built again only for another model (see checkServer)
      const m = info.model;
      $("model-name").textContent = `${m.name} · CosyVoice v${m.version} ${m.variant} · ${(m.sample_rate / 1000).toFixed(2)} kHz`;
      $("instruct-hint").textContent = m.instruct_needs_preset ? "(with preset voices)" : "";
      renderMarkupHelp(m.markup);
      renderInstructionPresets();
      renderModes();
    }
  } else if (info.status === "failed") {
    $("model-name").textContent = "model failed to load";
    showError(new ApiError(503, "model_failed", info.error || "the model failed to load"));
  } else {
    $("model-name").textContent = "loading the model…";
  }
  if (state.locked) askForKey();
  else if (!info.auth_required) $("auth").hidden = true;  // (a server restarted without a key)
  updateCount();
  return info;
}

async function waitUntilReady() {
  let unreachable = false;
  for (;;) {
    try {
      const info = await loadInfo();  // shows a model that failed to load itself
      // the server answers: an earlier "cannot be reached" no longer holds
      if (unreachable && info.status !== "failed") clearError();
      unreachable = false;
      if (info.status !== "loading") return info;
    } catch (err) {
      // gone again once the page is up: serverGone()'s backoff asks, and only while visible
      if (err.status === 0 && document.body.dataset.ready) throw err;
      unreachable = true;
      showError(err);
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

// The key form, and voice lists that say what they wait for (not "No voices yet"): until a key
// is given the server lists nothing (401), and the page does not ask it.
function askForKey() {
  state.locked = true;
  state.speakers = [];
  $("auth").hidden = false;
  if (!typing()) $("api-key").focus();  // not away from what the user is writing
  fillVoiceSelect();
  renderVoiceList([]);
  syncInstructField();
  updateCount();
}

function typing() {
  const el = document.activeElement;
  return !!el && el !== document.body && el.id !== "api-key" &&
    (el.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(el.tagName));
}

// A server restarted meanwhile, perhaps with another model: the page reads /info again when a
// request finds the server gone and when the page is shown again (another tab, a window brought
// back), and builds its modes and voice lists again if the model changed (or the server was
// away). While the server cannot be reached it asks again 1, 2, 4, ... up to 30 s apart, and
// only while the page is visible: no polling otherwise.
const recheck = { running: null, timer: null, delay: 0 };

function serverGone() {
  if (!document.body.dataset.ready) return;  // still starting: waitUntilReady asks again itself
  state.away = true;
  $("status").textContent = "unreachable";
  $("status").className = "pill pill-failed";
  if (recheck.timer || document.visibilityState !== "visible") return;
  recheck.delay = Math.min(30000, recheck.delay * 2 || 1000);
  recheck.timer = setTimeout(() => { recheck.timer = null; checkServer(); }, recheck.delay);
}

function checkServer() {
  if (!document.body.dataset.ready || recheck.running) return recheck.running;
  recheck.running = (async () => {
    const wasAway = state.away;
    try {
      let info = await loadInfo();
      state.away = false;
      clearTimeout(recheck.timer);
      recheck.timer = null;
      recheck.delay = 0;
      // the server answers: "cannot be reached" no longer holds
      if (wasAway && $("error").dataset.status === "0") clearError();
      if (info.status === "loading") info = await waitUntilReady();
      document.body.dataset.ready = info.status;
      // the lists again every time: a server restarted with the same model may hold other saved
      // voices, need another key or none (one /speakers call, on focus or when shown)
      if (info.status === "ready") await loadVoices();
    } catch (err) {
      if (err.status !== 0) showError(err);  // still gone: serverGone() asks again later
    } finally {
      recheck.running = null;
    }
  })();
  return recheck.running;
}

async function loadVoices(select) {
  if (state.locked) { askForKey(); return; }
  let speakers;
  try {
    ({ speakers } = await (await api("speakers")).json());
  } catch (err) {
    if (err.status === 401) askForKey();  // no key, or not this one: shown as such too
    throw err;
  }
  state.speakers = speakers;
  fillVoiceSelect(select);
  renderVoiceList(speakers.filter((s) => s.kind === "saved"));
  syncInstructField();
  updateCount();
}

// The voice picker offers what the mode can use: presets and cloned voices (saved ones and
// those stored with the model) to speak with; for instructions on CosyVoice2/3 and for voice
// conversion, cloned voices next to a recording.
function fillVoiceSelect(select) {
  const voice = $("voice");
  // while locked the picker lists nothing: the voice it showed before is picked again after
  if (state.listed) state.lastVoice = voice.value;
  const previous = select || state.lastVoice;
  const m = model();
  const mode = state.mode;
  let kinds = ["saved", "cloned", "preset"], blank = null;
  if (mode === "instruct" && m && m.instruct_needs_preset) kinds = ["preset"];
  else if (mode === "instruct" || mode === "vc") { kinds = ["saved", "cloned"]; blank = "— the recording above —"; }
  voice.replaceChildren();
  if (blank) voice.append(new Option(blank, ""));
  const groups = { preset: "Preset voices", cloned: "Cloned voices of the model", saved: "Saved voices" };
  let count = 0;
  for (const kind of kinds) {
    const items = state.speakers.filter((s) => s.kind === kind);
    if (!items.length) continue;
    const group = document.createElement("optgroup");
    group.label = groups[kind];
    for (const s of items) group.append(new Option(s.name, s.name));
    voice.append(group);
    count += items.length;
  }
  if (!count && !blank) {
    voice.append(new Option(state.locked ? "Enter the API key above to list the voices" : "No voices yet — create one →", ""));
  }
  if ([...voice.options].some((o) => o.value === previous)) voice.value = previous;
  state.listed = count > 0;
}

function renderVoiceList(saved) {
  const list = $("voice-list");
  list.replaceChildren();
  if (!saved.length) {
    const empty = document.createElement("li");
    empty.className = "muted small";
    empty.textContent = state.locked ? "Enter the API key above to see the saved voices." : "No saved voices yet.";
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
    play.setAttribute("aria-label", `Play the recording of ${v.name}`);  // (not "▶")
    const use = button("Use", "btn small use", "Speak with this voice", () => {
      setMode("voice"); $("voice").value = v.name; state.voicePickedAt = Date.now();
      syncInstructField(); $("text").focus(); updateCount();
    });
    use.setAttribute("aria-label", `Use the voice ${v.name}`);  // which voice, to a screen reader
    const del = button("Delete", "btn small danger", "Delete this voice", () => deleteVoice(v.name));
    del.setAttribute("aria-label", `Delete the voice ${v.name}`);
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
    const blob = await (await api(`voices/${encodeURIComponent(name)}/audio`)).blob();
    silence();
    const audio = new Audio(URL.createObjectURL(blob));
    const done = () => {  // its blob goes with it
      URL.revokeObjectURL(audio.src);
      if (state.promptAudio === audio) state.promptAudio = null;
    };
    audio.addEventListener("ended", done);
    audio.addEventListener("pause", done);
    state.promptAudio = audio;
    await audio.play();
  } catch (err) { showError(err); }
}

async function deleteVoice(name) {
  if (!confirm(`Delete the voice "${name}"?`)) return;
  const rows = () => [...$("voice-list").querySelectorAll("li[data-voice]")];
  const at = rows().findIndex((li) => li.dataset.voice === name);
  try {
    await api(`voices/${encodeURIComponent(name)}`, { method: "DELETE" });
  } catch (err) { showError(err); }
  // deleted, or gone already (404): either way the list shows what the server has now
  try { await loadVoices(); } catch (err) { showError(err); }
  // the focus went with the row (to <body>): to the row now in its place, or the form
  if (!document.activeElement || document.activeElement === document.body) {
    const left = rows();
    const next = left[Math.min(at, left.length - 1)];
    (next ? next.querySelector(".danger") : $("voice-name")).focus();
  }
}

// ------------------------------------------------------------------ modes

function supportedModes() {
  const m = model();
  if (!m) return ["voice"];
  return Object.keys(MODES).filter((k) => !MODES[k].needs || m.modes.includes(MODES[k].needs));
}

function renderModes() {
  const available = supportedModes();
  for (const b of document.querySelectorAll(".mode-btn")) b.hidden = !available.includes(b.dataset.mode);
  const hasVoices = model() && (model().presets.length > 0);
  const fallback = hasVoices || !available.includes("clone") ? "voice" : "clone";
  setMode(available.includes(state.mode) ? state.mode : fallback);
}

function setMode(mode) {
  // a recording under way belongs to the tab it was started in: it ends (and is kept) there,
  // so that the microphone never stays on behind a hidden panel
  if (mode !== state.mode) { prompt.finish(); source.finish(); }
  state.mode = mode;
  storage.set("cosyvoice-lite-mode", mode);
  for (const b of document.querySelectorAll(".mode-btn")) {
    b.classList.toggle("active", b.dataset.mode === mode);
    b.setAttribute("aria-selected", String(b.dataset.mode === mode));
    b.tabIndex = b.dataset.mode === mode ? 0 : -1;  // one Tab stop; arrow keys move within
  }
  $("mode-panel").setAttribute("aria-labelledby", `mode-${mode}`);
  const m = model() || {};
  const v1Instruct = mode === "instruct" && m.instruct_needs_preset;
  $("mode-help").textContent = MODES[mode].help;
  $("text-box").hidden = mode === "vc";
  $("markup-help").hidden = mode === "vc";
  $("source-panel").hidden = mode !== "vc";
  $("prompt-panel").hidden = !["clone", "cross", "vc"].includes(mode) && !(mode === "instruct" && !v1Instruct);
  $("prompt-text-field").hidden = mode !== "clone";
  $("prompt-title").textContent = {
    clone: "Voice to clone", cross: "Voice to clone (any language)",
    instruct: "Voice: a recording, or a saved voice below", vc: "Target voice: a recording, or a saved voice below",
  }[mode] || "";
  $("voice-field").hidden = mode === "clone" || mode === "cross";
  $("voice-label").textContent = mode === "instruct" && !v1Instruct || mode === "vc" ? "or a saved voice" : "Voice";
  $("instruct-presets").hidden = mode !== "instruct" || !$("instruct-presets").childElementCount;
  fillVoiceSelect();
  // a recording and a saved voice are alternatives here: the one chosen last is used, the other
  // is dropped (both were shown as chosen after one was picked in another tab)
  if (alternatives() && prompt.blob && $("voice").value) {
    if (prompt.setAt > state.voicePickedAt) $("voice").value = ""; else prompt.clear();
  }
  syncInstructField();
  updateCount();
}

// The ARIA tabs pattern: arrow keys, Home and End pick the mode beside, first or last.
function modeKey(event) {
  const tabs = [...document.querySelectorAll(".mode-btn")].filter((b) => !b.hidden);
  const at = tabs.indexOf(document.activeElement);
  const to = { ArrowLeft: at - 1, ArrowRight: at + 1, Home: 0, End: tabs.length - 1 }[event.key];
  if (at < 0 || to === undefined) return;
  event.preventDefault();
  const tab = tabs[(to + tabs.length) % tabs.length];
  setMode(tab.dataset.mode);
  tab.focus();
}

function alternatives() {
  const m = model() || {};
  return (state.mode === "instruct" && !m.instruct_needs_preset) || state.mode === "vc";
}

// In Voice mode, instructions only where presets take them (v1-Instruct) and a preset is chosen:
// its saved and cloned voices take none. CosyVoice2/3 presets speak as themselves, instructions
// belong to the Instruction tab.
function syncInstructField() {
  const m = model() || {};
  const preset = state.speakers.some((s) => s.kind === "preset" && s.name === $("voice").value);
  $("instruct-field").hidden = !(state.mode === "instruct" ||
    (state.mode === "voice" && m.instruct && m.instruct_needs_preset && preset));
}

// ------------------------------------------------------------------ markup help & instructions

function insertText(text, wrap) {
  const area = $("text");
  const start = area.selectionStart, end = area.selectionEnd;
  const selected = area.value.slice(start, end);
  const piece = wrap ? `<${wrap}>${selected}</${wrap}>` : text;
  area.setRangeText(piece, start, end, "end");
  if (wrap && !selected) area.selectionStart = area.selectionEnd = start + wrap.length + 2;
  area.focus();
  updateCount();
}

function insertButton(label, title, onClick) {
  const b = button(label, "btn small insert", title, onClick);
  b.dataset.insert = label;
  return b;
}

function renderMarkupHelp(markup) {
  const body = $("markup-body");
  body.replaceChildren();
  const section = (title, text, buttons) => {
    const div = document.createElement("div");
    div.className = "markup-row";
    const head = document.createElement("p");
    head.innerHTML = `<b></b> <span class="muted"></span>`;
    head.querySelector("b").textContent = title;
    head.querySelector("span").textContent = text;
    const chips = document.createElement("div");
    chips.className = "chips";
    chips.append(...buttons);
    div.append(head, chips);
    body.append(div);
  };
  if (!markup) return;
  if (markup.pinyin) {
    section("Chinese pronunciation:", "pinyin with tone marks, one bracket for the initial and one for the final, in place of the character: 对报道[j][ǐ]予好评",
            [insertButton("[h][ào]", "insert pinyin for 好 (hào)", () => insertText("[h][ào]"))]);
  }
  if (markup.cmu) {
    section("English pronunciation:", "CMU phones with stress digits, one bracket per phone, in place of the word: [M][AY0] [N][UW1]",
            [insertButton("[M][AY0]", "insert CMU phones", () => insertText("[M][AY0]"))]);
  }
  if (markup.sounds.length) {
    section("Sounds:", "put them where they happen",
            markup.sounds.map((t) => insertButton(t, `insert ${t}`, () => insertText(t))));
  }
  if (markup.pairs.length) {
    section("Emphasis:", "select words, then wrap them",
            markup.pairs.map((p) => insertButton(`<${p}>…</${p}>`, `wrap the selection in <${p}>`, () => insertText("", p))));
  }
  if (markup.languages.length) {
    section("Language:", "put a language tag before text in another language",
            markup.languages.map((t) => insertButton(t, `insert ${t}`, () => insertText(t))));
  }
  if (!body.childElementCount) body.textContent = "This model knows no inline tags.";
}

const CUSTOM_KEY = "cosyvoice-lite-instructions";
// (a value another version or a hand wrote may not be a list of strings)
function customInstructions() {
  try {
    const list = JSON.parse(storage.get(CUSTOM_KEY) || "[]");
    return Array.isArray(list) ? list.filter((t) => typeof t === "string") : [];
  } catch (_) { return []; }
}

function renderInstructionPresets() {
  const box = $("instruct-presets");
  box.replaceChildren();
  const m = model();
  const groups = (m && m.instruction_presets) || {};
  const chip = (text) => {
    const b = button(text, "btn small chip-btn", "use this instruction (you can edit it)", () => {
      $("instruct").value = text; $("instruct").focus();
    });
    b.dataset.instruction = text;
    return b;
  };
  for (const [group, items] of Object.entries(groups)) {
    const label = document.createElement("span");
    label.className = "chips-label";
    label.textContent = group;
    box.append(label, ...items.map((t) => chip(t)));
  }
  if (Object.keys(groups).length) {
    const mine = customInstructions();
    const label = document.createElement("span");
    label.className = "chips-label";
    label.textContent = "yours";
    box.append(label);
    for (const text of mine) {
      // its own button (a control inside another one is out of reach of the keyboard)
      const remove = button("×", "btn small remove", "remove this preset", () => {
        storage.set(CUSTOM_KEY, JSON.stringify(customInstructions().filter((t) => t !== text)));
        renderInstructionPresets();
      });
      remove.setAttribute("aria-label", `Remove the preset “${text}”`);
      const pair = document.createElement("span");
      pair.className = "chip-pair";
      pair.append(chip(text), remove);
      box.append(pair);
    }
    box.append(button("+ save current", "btn small", "keep the instruction above as a preset", () => {
      const text = $("instruct").value.trim();
      if (!text || customInstructions().includes(text)) return;
      storage.set(CUSTOM_KEY, JSON.stringify([...customInstructions(), text]));
      renderInstructionPresets();
    }));
  }
  $("instruct-presets").hidden = state.mode !== "instruct" || !box.childElementCount;
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
  const needsText = state.mode !== "vc";
  const needsVoice = state.mode === "voice" || (state.mode === "instruct" && model() && model().instruct_needs_preset);
  $("speak").disabled = !ready || state.locked || !!state.busy || (needsText && (length === 0 || length > limit)) ||
    (needsVoice && !$("voice").value);
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

// Microphone recordings are kept at 24 kHz, mono, 16-bit: enough for every model (they hear
// prompts at 16 kHz and 22.05 or 24 kHz; the server takes 16 kHz or more), and 48 KB a second
// whatever the device's rate (44.1 or 48 kHz, some interfaces 96 or 192 kHz: 2-8 times that).
const RECORDING_RATE = 24000;

// ``samples`` at the rate ``from`` as they sound at the rate ``to``: band-limited interpolation
// with a Blackman-windowed sinc whose cutoff is below both Nyquist frequencies (what is too high
// for the new rate is filtered out, not folded back into the speech). The weights for each
// offset of an output sample between input samples are computed once: there are to / gcd(from,
// to) offsets (one from 48 kHz, 80 from 44.1 kHz).
function resample(samples, from, to) {
  from = Math.round(from);
  if (from === to || !samples.length) return samples;
  const gcd = (a, b) => (b ? gcd(b, a % b) : a);
  const g = gcd(from, to), up = to / g, down = from / g;  // output i: input position i * down / up
  const cutoff = 0.45 * Math.min(1, to / from);  // cycles per input sample (0.5: its Nyquist)
  const half = Math.ceil(16 / (2 * cutoff));  // input samples each side: 16 zero crossings
  const kernels = new Map();
  const kernel = (phase) => {  // weights of the inputs c - half + 1 ... c + half at c + phase / up
    let k = kernels.get(phase);
    if (k) return k;
    k = new Float64Array(2 * half);
    let sum = 0;
    for (let n = 0; n < k.length; n++) {
      const d = phase / up - (n - half + 1);  // from that input to the output, in input samples
      const x = Math.PI * 2 * cutoff * d;
      const taper = 0.42 + 0.5 * Math.cos(Math.PI * d / half) + 0.08 * Math.cos(2 * Math.PI * d / half);
      k[n] = (x === 0 ? 1 : Math.sin(x) / x) * taper;
      sum += k[n];
    }
    for (let n = 0; n < k.length; n++) k[n] /= sum;  // a steady level stays that level
    kernels.set(phase, k);
    return k;
  };
  const out = new Float32Array(Math.floor(samples.length * up / down));
  for (let i = 0; i < out.length; i++) {
    const k = kernel((i * down) % up);
    const first = Math.floor(i * down / up) - half + 1;
    const end = Math.min(k.length, samples.length - first);
    let sum = 0;
    for (let n = Math.max(0, -first); n < end; n++) sum += k[n] * samples[first + n];
    out[i] = sum;
  }
  return out;
}

// The longest recording the server takes, in samples at RECORDING_RATE, and what sets it: its
// longest prompt (less a margin: the clock stops a recording a little late) or its largest
// upload (a 44-byte WAV header, 2 bytes a sample).
function recordingLimit() {
  if (!state.info) return { samples: Infinity, why: "" };
  const l = state.info.limits;
  const bySeconds = Math.floor((l.max_prompt_seconds - 0.05) * RECORDING_RATE);
  const byBytes = Math.max(0, Math.floor((l.max_upload_bytes - 44) / 2));
  return bySeconds <= byBytes
    ? { samples: bySeconds, why: `the ${l.max_prompt_seconds} s limit` }
    : { samples: byBytes, why: `the ${size(l.max_upload_bytes)} upload limit` };
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
  // once what was scheduled has played: close the audio context, then call back
  whenDone(callback) {  // (a margin for output latency, e.g. Bluetooth)
    const wait = Math.max(0, this.next - this.context.currentTime) * 1000 + 750;
    this.timer = setTimeout(() => { this.close(); callback(); }, wait);
  }
  stop() {
    clearTimeout(this.timer);
    for (const s of this.sources) { try { s.stop(); } catch (_) { /* not started */ } }
    this.close();
  }
  close() {
    if (this.closed) return;
    this.closed = true;
    this.context.close().catch(() => { /* already closing */ });
  }
}

// A waveform of a result: min/max per pixel column of the decoded audio.
let decoder = null;
async function drawWave(canvas, blob) {
  try {
    decoder = decoder || new OfflineAudioContext(1, 1, 44100);
    const audio = await decoder.decodeAudioData(await blob.arrayBuffer());
    const data = audio.getChannelData(0);
    const width = canvas.width = canvas.clientWidth * devicePixelRatio || 600;
    const height = canvas.height = canvas.clientHeight * devicePixelRatio || 48;
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = getComputedStyle(canvas).color;
    const step = Math.max(1, Math.floor(data.length / width));
    let peak = 0;
    for (let i = 0; i < data.length; i++) peak = Math.max(peak, Math.abs(data[i]));
    const scale = peak > 0 ? (height / 2 - 1) / peak : 0;
    for (let x = 0; x < width; x++) {
      let lo = 0, hi = 0;
      for (let i = x * step; i < Math.min((x + 1) * step, data.length); i++) {
        if (data[i] < lo) lo = data[i];
        if (data[i] > hi) hi = data[i];
      }
      ctx.fillRect(x, height / 2 - hi * scale, 1, Math.max(1, (hi - lo) * scale));
    }
    canvas.dataset.drawn = String(audio.duration.toFixed(3));
  } catch (err) {
    canvas.dataset.drawn = "error";
  }
}

// ------------------------------------------------------------------ results, kept in IndexedDB

// What is kept (in IndexedDB, and listed on the page): the newest 30 results, and at most 200 MB
// of audio in all (a minute of 22.05 kHz WAV is about 2.6 MB, so long results fit too); the
// oldest go first, their audio let go. The newest result always stays, whatever its size.
const KEEP = { results: 30, bytes: 200 * 1024 * 1024 };

// Of results newest first, those beyond KEEP (sizeOf: an item's bytes).
function beyondKeep(items, sizeOf) {
  let bytes = 0;
  return items.filter((item, i) => {
    bytes += sizeOf(item) || 0;
    return i > 0 && (i >= KEEP.results || bytes > KEEP.bytes);
  });
}

const store = {
  db: null,
  async open() {
    if (this.db || !window.indexedDB) return this.db;
    this.db = await new Promise((resolve) => {
      let request;
      try { request = indexedDB.open("cosyvoice-lite", 1); } catch (_) { resolve(null); return; }  // site data blocked
      request.onupgradeneeded = () => request.result.createObjectStore("results", { keyPath: "id" });
      request.onsuccess = () => resolve(request.result);
      request.onerror = () => resolve(null);  // private mode etc.: results stay for this visit
    });
    return this.db;
  },
  async run(mode, action) {
    const db = await this.open();
    if (!db) return null;
    return new Promise((resolve, reject) => {
      const tx = db.transaction("results", mode);
      const request = action(tx.objectStore("results"));
      tx.oncomplete = () => resolve(request && request.result);
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error);  // e.g. over the quota
    });
  },
  put(item) { return this.run("readwrite", (s) => s.put(item)); },
  all() { return this.run("readonly", (s) => s.getAll()); },
  clear() { return this.run("readwrite", (s) => s.clear()); },
  delete(ids) { return this.run("readwrite", (s) => { for (const id of ids) s.delete(id); }); },
  // deletes the stored results beyond KEEP (also other tabs'), in one transaction: their ids
  async prune() {
    const dropped = [];
    await this.run("readwrite", (s) => {
      const request = s.getAll();
      request.onsuccess = () => {
        const items = request.result.sort((a, b) => b.created - a.created);
        for (const item of beyondKeep(items, (x) => x.blob && x.blob.size)) {
          s.delete(item.id);
          dropped.push(item.id);
        }
      };
    });
    return dropped;
  },
};

async function restoreResults() {
  try {
    await store.prune();  // kept before there was a cap, or by other tabs
    const items = (await store.all()) || [];
    items.sort((a, b) => a.created - b.created);
    for (const item of items) renderResult(item, false);
  } catch (err) { /* storage unavailable: start empty */ }
}

async function clearResults() {
  if (!confirm("Remove every result kept in this browser?")) return;
  try { await store.clear(); } catch (_) { /* storage unavailable: the page alone */ }
  for (const audio of document.querySelectorAll(".result audio")) URL.revokeObjectURL(audio.src);
  $("results").replaceChildren();
  $("results-empty").hidden = false;
  const focused = document.activeElement === $("results-clear");
  $("results-clear").hidden = true;
  if (focused) moveFocus();  // (not to <body>) the text box
}

// Keeps the page's results and the stored ones within KEEP: the oldest on the page go from both
// (also those the store could not take), and so do stored ones the page shows that the store let
// go (another tab's newer results counted).
async function trimResults() {
  const items = [...$("results").children];  // newest first
  const gone = new Set(beyondKeep(items, (li) => Number(li.dataset.bytes)).map((li) => li.dataset.id));
  try {
    if (gone.size) await store.delete([...gone]);
    for (const id of await store.prune()) gone.add(id);
  } catch (_) { /* storage unavailable: the page alone */ }
  for (const li of items) {
    if (!gone.has(li.dataset.id)) continue;
    const audio = li.querySelector("audio");
    audio.pause();
    URL.revokeObjectURL(audio.src);  // the download link's too
    li.remove();
  }
  if (!$("results").childElementCount) {
    $("results-empty").hidden = false;
    $("results-clear").hidden = true;
  }
}

// ------------------------------------------------------------------ synthesis

function baseFields(stream) {
  const fields = { speed: Number($("speed").value) };
  const seed = $("seed").value.trim();
  if (seed !== "") {
    fields.seed = Number(seed);
    if (!Number.isSafeInteger(fields.seed) || fields.seed < 0) {
      throw missing(`the seed must be a whole number from 0 to ${Number.MAX_SAFE_INTEGER}`);
    }
  }
  if (stream) { fields.stream = true; fields.format = "pcm"; } else { fields.format = $("format").value; }
  return fields;
}

// What to send for the current mode: JSON to /tts for named voices, multipart to /tts/upload
// when a recording goes with the request. Returns {path, init, summary}.
function buildRequest(stream) {
  const mode = state.mode;
  const m = model();
  const text = $("text").value;
  const instruct = $("instruct").value.trim();
  const voice = $("voice").value;
  const fields = baseFields(stream);
  const summary = { text, mode, speed: fields.speed, seed: fields.seed };
  const json = (body) => ({ path: "tts", init: { method: "POST", body: JSON.stringify(body),
    headers: { "Content-Type": "application/json" } } });
  const upload = (extra, files) => {
    const form = new FormData();
    for (const [k, v] of Object.entries({ ...fields, ...extra })) if (v !== undefined && v !== "") form.append(k, String(v));
    for (const [k, capture] of Object.entries(files)) form.append(k, capture.blob, capture.filename());
    return { path: "tts/upload", init: { method: "POST", body: form } };
  };
  let request;
  if (mode === "voice") {
    const body = { text, speaker: voice, ...fields };
    if (!$("instruct-field").hidden && instruct) { body.instruct = instruct; summary.instruct = instruct; }
    summary.voice = voice;
    request = json(body);
  } else if (mode === "clone" || mode === "cross") {
    if (!prompt.blob) throw missing("choose or record the voice to clone first");
    const transcript = $("prompt-text").value.trim();
    if (mode === "clone" && !transcript) throw missing("write the transcript of the recording (or use Cross-lingual, which needs none)");
    summary.voice = prompt.label;
    request = upload({ text, prompt_text: mode === "clone" ? transcript : "" }, { prompt_wav: prompt });
  } else if (mode === "instruct") {
    if (!instruct) throw missing("write an instruction or pick a preset");
    summary.instruct = instruct;
    if (m.instruct_needs_preset || (!prompt.blob && voice)) {
      summary.voice = voice;
      request = json({ text, speaker: voice, instruct, ...fields });
    } else {
      if (!prompt.blob) throw missing("choose or record a voice, or pick a saved voice");
      summary.voice = prompt.label;
      request = upload({ text, instruct }, { prompt_wav: prompt });
    }
  } else {  // vc
    if (!source.blob) throw missing("choose or record the speech to convert");
    summary.text = `(voice conversion of ${source.label})`;
    if (prompt.blob) {
      summary.voice = prompt.label;
      request = upload({}, { source_wav: source, prompt_wav: prompt });
    } else if (voice) {
      summary.voice = voice;
      request = upload({ speaker: voice }, { source_wav: source });
    } else {
      throw missing("choose or record the target voice, or pick a saved voice");
    }
  }
  return { ...request, summary };
}

async function speak() {
  if ($("speak").disabled) return;
  clearError();
  prompt.finish();  // a recording still under way is the one meant (and the microphone stops)
  source.finish();
  const stream = $("stream").checked && Number($("speed").value) === 1;
  let request;
  try { request = buildRequest(stream); } catch (err) { showError(err); return; }
  silence();  // never two at once
  const controller = new AbortController();
  state.busy = { controller, player: null };
  setBusy(true, "Synthesizing…");
  const started = performance.now();
  try {
    const response = await api(request.path, { ...request.init, signal: controller.signal });
    let blob, format = stream ? "wav" : $("format").value, firstAudio = null, duration = null;
    let partial = null;
    if (stream) {
      const rate = Number(response.headers.get("X-Sample-Rate"));
      const player = new StreamPlayer(rate);
      state.busy.player = player;
      const reader = response.body.getReader();
      let cut = null;  // a stream the server ended early (its time limit, a failure)
      for (;;) {
        let part;
        try { part = await reader.read(); } catch (err) {
          if (err && err.name === "AbortError") throw err;
          cut = err;
          break;
        }
        const { done, value } = part;
        if (done) break;
        if (firstAudio === null && value.length) {
          firstAudio = (performance.now() - started) / 1000;
          setBusy(true, `Playing · first audio after ${firstAudio.toFixed(2)} s`);
        }
        player.push(value);
      }
      const samples = player.samples();
      if (cut) cut = await whyCut();
      if (cut && !samples.length) throw cut;
      if (!samples.length) throw new ApiError(500, "no_audio", "the server sent no audio");
      if (cut) {
        partial = cut;
        partial.message += "; the part received is kept below";
      }
      state.playing = player;
      player.whenDone(() => {
        if (state.playing !== player) return;
        state.playing = null;
        if (!state.busy) showStop(false);
      });
      blob = wavBlob(samples, rate);
      duration = samples.length / rate;
    } else {
      try { blob = await response.blob(); } catch (err) {
        if (err && err.name === "AbortError") throw err;
        throw await whyCut();
      }
      duration = Number(response.headers.get("X-Audio-Duration")) || null;
    }
    const seconds = (performance.now() - started) / 1000;
    const meta = describe(request.summary, { seconds, firstAudio, duration });
    const item = { id: response.headers.get("X-Request-Id") || String(Date.now()), created: Date.now(),
                   text: request.summary.text, meta: partial ? `${meta} · incomplete` : meta,
                   format, blob };
    renderResult(item, !stream);
    store.put(item).catch(() => { /* quota or private mode: kept for this visit only */ }).then(trimResults);
    if (partial) showError(partial);
  } catch (err) {
    const player = state.busy && state.busy.player;
    if (player && player !== state.playing) player.stop();  // its audio context with it
    showError(err);
    // deleted meanwhile (another tab, another client): the lists as the server has them now,
    // the picker on a voice that exists; the 404 stays shown
    if (err.code === "voice_not_found") loadVoices().catch(() => { /* the 404 stays shown */ });
  } finally {
    state.busy = null;
    setBusy(false);
    if (state.playing) showStop(true);  // a finished stream still playing can be stopped
  }
}

// A response cut off while it arrived: the server gone (killed, restarted: the pill says so and
// it is asked again later) or ending it itself (its time limit, a failure).
async function whyCut() {
  let answers = false;
  try {
    await fetch("health", { cache: "no-store", signal: AbortSignal.timeout(5000) });
    answers = true;
  } catch (_) { /* gone, or not answering */ }
  if (!answers) {
    serverGone();
    return new ApiError(0, "network", "the connection to the server was lost (is it running?)");
  }
  checkServer();  // (restarted meanwhile: perhaps another model, other voices)
  return new ApiError(502, "stream_cut", "the audio stopped before its end (the server's time " +
    "limit or a failure: see its log)");
}

function describe(summary, { seconds, firstAudio, duration }) {
  const time = new Date().toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  const parts = [time];
  if (summary.voice) parts.push(summary.voice);
  if (summary.mode !== "voice") parts.push({ clone: "cloned", cross: "cross-lingual", instruct: "instruction", vc: "voice conversion" }[summary.mode]);
  if (duration) parts.push(`${duration.toFixed(2)} s of audio`);
  parts.push(`made in ${seconds.toFixed(2)} s`);
  if (firstAudio !== null && firstAudio !== undefined) parts.push(`first audio after ${firstAudio.toFixed(2)} s`);
  if (summary.speed !== 1) parts.push(`speed ${summary.speed}×`);
  if (summary.seed !== undefined) parts.push(`seed ${summary.seed}`);
  if (summary.instruct) parts.push(`“${summary.instruct}”`);
  return parts.join(" · ");
}

// Stops whatever plays: a finished stream, a result, a voice's recording (one plays at a time).
function silence(except = null) {
  if (state.playing) { state.playing.stop(); state.playing = null; }
  for (const audio of document.querySelectorAll(".result audio")) if (audio !== except) audio.pause();
  if (state.promptAudio) state.promptAudio.pause();
}

function resultPlaying() {
  return [...document.querySelectorAll(".result audio")].some((a) => !a.paused && !a.ended);
}

function stop() {
  silence();
  if (!state.busy) { showStop(false); return; }
  state.busy.controller.abort();
  if (state.busy.player) state.busy.player.stop();
}

function setBusy(busy, text) {
  $("progress").hidden = !busy;
  if (text) $("progress-text").textContent = text;
  const speakFocused = document.activeElement === $("speak");
  showStop(busy || !!state.playing || resultPlaying());
  updateCount();
  if (busy && speakFocused) $("stop").focus();  // Speak is disabled meanwhile (focus: <body>)
}

// A focused button that is hidden or disabled drops the keyboard focus to <body> (the next Tab
// starts at the top): Speak and Stop hand it to each other.
function showStop(show) {
  const focused = document.activeElement === $("stop");
  $("stop").hidden = !show;
  if (!show && focused) ($("speak").disabled ? $("text") : $("speak")).focus();
}

function renderResult(item, autoplay) {
  const url = URL.createObjectURL(item.blob);
  const li = document.createElement("li");
  li.className = "result";
  li.dataset.id = item.id;
  li.dataset.bytes = String(item.blob.size);
  const said = document.createElement("div");
  said.className = "said";
  said.textContent = item.text;
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = item.meta;
  const wave = document.createElement("canvas");
  wave.className = "wave";
  const audio = document.createElement("audio");
  audio.controls = true;
  audio.preload = "auto";
  audio.src = url;
  // one plays at a time, and Stop stops a result playing too
  audio.addEventListener("play", () => { silence(audio); showStop(true); });
  const quiet = () => { if (!state.busy && !state.playing && !resultPlaying()) showStop(false); };
  audio.addEventListener("pause", quiet);
  audio.addEventListener("ended", quiet);
  const ext = item.format === "opus" ? "ogg" : item.format;
  const link = document.createElement("a");
  link.className = "btn small dl";
  link.href = url;
  link.download = `cosyvoice-${item.id}.${ext}`;
  link.textContent = `Download ${ext.toUpperCase()}`;
  li.append(said, link, meta, wave, audio);
  $("results").prepend(li);
  $("results-empty").hidden = true;
  $("results-clear").hidden = false;
  requestAnimationFrame(() => drawWave(wave, item.blob));
  if (autoplay) audio.play().catch(() => { /* autoplay blocked: the controls are there */ });
}

// ------------------------------------------------------------------ recordings: file or microphone

// One recording source: a file input and a record button (mono float32 from an AudioWorklet,
// kept as a 16-bit WAV), with a label and a preview player.
class Capture {
  constructor(ids, onSet = () => {}) {
    this.ids = ids;
    this.onSet = onSet;  // called when a recording is chosen or made
    this.blob = null;
    this.label = "";
    this.recording = null;
    this.starting = false;  // the microphone is being opened (a second click waits for it)
    this.setAt = 0;         // when the recording was chosen or made
    $(ids.file).addEventListener("change", (e) => {
      const file = e.target.files[0];
      if (file) this.set(file, file.name);
    });
    $(ids.record).addEventListener("click", () => this.toggle());
    if (ids.clear) $(ids.clear).addEventListener("click", () => this.clear());
  }
  filename() { return /\.(wav|flac|mp3|ogg|opus)$/i.test(this.label) ? this.label : "prompt.wav"; }
  set(blob, label) {
    this.blob = blob;
    this.label = label;
    $(this.ids.label).textContent = blob ? `${label} · ${(blob.size / 1024).toFixed(0)} KB` : "No recording chosen";
    this.setAt = blob ? Date.now() : 0;
    const preview = $(this.ids.preview);
    preview.hidden = !blob;
    if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
    if (blob) preview.src = URL.createObjectURL(blob); else preview.removeAttribute("src");
    if (this.ids.clear) $(this.ids.clear).hidden = !blob;
    if (blob) this.onSet();
  }
  clear() {
    const removing = document.activeElement === $(this.ids.clear);  // its ✕ Remove, now hidden
    this.set(null, "");
    $(this.ids.file).value = "";
    if (removing) moveFocus($(this.ids.record));
  }
  async toggle() {
    if (this.starting) return;  // a double click: one recording
    if (this.recording) { this.finish(); return; }
    clearError();
    // browsers offer the microphone to https pages and localhost only (navigator.mediaDevices
    // is undefined on plain http from another name, e.g. a server on the LAN)
    if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      showError(new PageError("Microphone unavailable", "recording needs the page opened over " +
        "https or as localhost; choose a file instead"));
      return;
    }
    this.starting = true;
    this.abandoned = false;
    let stream = null, context = null;
    const release = () => {
      if (stream) stream.getTracks().forEach((t) => t.stop());
      if (context) context.close().catch(() => { /* closing already */ });
    };
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false } });
      context = new AudioContext();
      await context.audioWorklet.addModule("static/recorder-worklet.js");
      this.starting = false;
      if (this.abandoned) { release(); return; }  // finished (e.g. its tab left) while opening
      const source = context.createMediaStreamSource(stream);
      const node = new AudioWorkletNode(context, "recorder");
      const rec = { context, stream, node, chunks: [], rate: context.sampleRate, started: performance.now() };
      node.port.onmessage = (e) => rec.chunks.push(e.data);
      source.connect(node);
      this.recording = rec;
      $(this.ids.record).textContent = "■ Stop";
      $(this.ids.record).classList.add("recording");
      $(this.ids.time).hidden = false;
      rec.timer = setInterval(() => {
        const s = (performance.now() - rec.started) / 1000;
        $(this.ids.time).textContent = `${s.toFixed(1)} s`;
        // stopped where the server's limits are: its longest prompt, its largest upload
        if (s * RECORDING_RATE >= recordingLimit().samples) this.finish(true);
      }, 100);
    } catch (err) {
      this.starting = false;
      release();
      const why = {
        NotAllowedError: "access to the microphone was refused (see the browser's site settings)",
        NotFoundError: "no microphone was found",
        NotReadableError: "the microphone is in use or failed to start",
      }[err && err.name] || `the microphone could not be opened: ${err && err.message || err}`;
      showError(new PageError("Microphone unavailable", `${why}; or choose a file instead`));
    }
  }
  // atLimit: stopped by the clock at the server's limit (said so in the recording's label)
  finish(atLimit = false) {
    if (this.starting) this.abandoned = true;
    const rec = this.recording;
    if (!rec) return;
    this.recording = null;
    clearInterval(rec.timer);
    rec.stream.getTracks().forEach((t) => t.stop());
    rec.node.disconnect();
    rec.context.close();
    // stopped at the limit by the clock, the samples run a little past it: keep them within it,
    // or the server refuses the recording as too long or too large
    const limit = recordingLimit();
    const recorded = rec.chunks.reduce((n, c) => n + c.length, 0);
    const total = Math.min(recorded, Math.ceil((limit.samples + 1) * rec.rate / RECORDING_RATE));
    const samples = new Float32Array(total);
    let offset = 0;
    for (const c of rec.chunks) {
      if (offset >= total) break;
      const piece = c.subarray(0, total - offset);
      samples.set(piece, offset);
      offset += piece.length;
    }
    let kept = resample(samples, rec.rate, RECORDING_RATE);  // the device's rate: 2-8 times larger
    if (kept.length > limit.samples) kept = kept.subarray(0, limit.samples);
    $(this.ids.record).textContent = "● Record";
    $(this.ids.record).classList.remove("recording");
    $(this.ids.time).hidden = true;
    const seconds = (kept.length / RECORDING_RATE).toFixed(1);
    this.set(wavBlob(kept, RECORDING_RATE),
             atLimit ? `recording (${seconds} s, stopped at ${limit.why})` : `recording (${seconds} s)`);
  }
}

let voiceCapture, prompt, source;

async function saveVoice(event) {
  event.preventDefault();
  clearError();
  voiceCapture.finish();
  const name = $("voice-name").value.trim();
  if (!voiceCapture.blob) { showError(missing("choose a file or record the prompt first")); return; }
  const form = new FormData();
  form.append("name", name);
  form.append("prompt_text", $("voice-text").value.trim());
  form.append("audio", voiceCapture.blob, voiceCapture.filename());
  const save = $("voice-save");
  const focused = document.activeElement === save;  // disabled meanwhile: the focus goes
  save.disabled = true;
  save.textContent = "Saving…";
  let saved = null;
  try {
    const voice = await (await api("voices", { method: "POST", body: form })).json();
    $("voice-form").reset();
    voiceCapture.clear();
    if (state.mode !== "voice") setMode("voice");
    state.voicePickedAt = Date.now();  // the new voice is the one picked
    saved = voice.name;
    await loadVoices(voice.name);
  } catch (err) {
    showError(err);
    // taken meanwhile (another tab, another client): the list shows the voice it is taken by
    if (err.code === "voice_exists") loadVoices().catch(() => { /* the 409 stays shown */ });
  } finally {
    save.disabled = false;
    save.textContent = "Save voice";
  }
  if (focused && focusLost()) {  // to the new voice's Use button, or back to Save on a failure
    const row = [...$("voice-list").querySelectorAll("li[data-voice]")].find((li) => li.dataset.voice === saved);
    moveFocus(...(saved === null ? [save] : [row && row.querySelector(".use"), $("voice-name")]));
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
  voiceCapture = new Capture({ file: "voice-file", record: "record", time: "record-time",
                               label: "voice-source", preview: "voice-preview" });
  // in Instruction and Voice conversion a saved voice and a recording are alternatives: the one
  // chosen last is the one used (a recording chosen once used to win over any later pick)
  prompt = new Capture({ file: "prompt-file", record: "prompt-record", time: "prompt-record-time",
                         label: "prompt-source", preview: "prompt-preview", clear: "prompt-clear" },
                       () => { if (alternatives() && $("voice").querySelector("option[value='']")) $("voice").value = ""; });
  source = new Capture({ file: "source-file", record: "source-record", time: "source-record-time",
                         label: "source-source", preview: "source-preview", clear: "source-clear" });
  $("voice").addEventListener("change", () => {
    state.voicePickedAt = Date.now();
    if (alternatives() && $("voice").value) prompt.clear();
    syncInstructField();
  });
  for (const b of document.querySelectorAll(".mode-btn")) b.addEventListener("click", () => setMode(b.dataset.mode));
  $("modes").addEventListener("keydown", modeKey);
  $("text").addEventListener("input", updateCount);
  $("voice").addEventListener("change", updateCount);
  $("text").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) speak(); });
  $("speed").addEventListener("input", syncControls);
  $("stream").addEventListener("change", syncControls);
  syncControls();
  $("speak").addEventListener("click", speak);
  $("stop").addEventListener("click", stop);
  $("error-close").addEventListener("click", clearError);
  // the focus the error's × gives back: where it came from (where it was when the error came
  // may be gone since, e.g. Stop)
  $("error").addEventListener("focusin", (e) => {
    if (canFocus(e.relatedTarget) && !$("error").contains(e.relatedTarget)) errorFrom = e.relatedTarget;
  });
  $("results-clear").addEventListener("click", clearResults);
  $("voice-form").addEventListener("submit", saveVoice);
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") checkServer();
    else { clearTimeout(recheck.timer); recheck.timer = null; }  // asked again once shown
  });
  window.addEventListener("focus", () => checkServer());
  $("auth").addEventListener("submit", async (event) => {
    event.preventDefault();
    const typed = $("api-key").value;
    const key = cleanKey(typed);
    if (!key) {  // kept out of storage: sent, it failed every request and, reloaded, the page
      showError(new PageError("API key not usable", typed.trim()
        ? "an API key is printable ASCII characters (letters, digits, punctuation): " +
          "check what was pasted, or paste it again"
        : "enter the server's API key"));
      $("api-key").focus();
      return;
    }
    state.apiKey = key;
    storage.set(KEY_KEY, key);
    state.locked = false;  // tried with loadVoices: a refused key asks again
    const focused = $("auth").contains(document.activeElement);
    $("auth").hidden = true;
    clearError();
    if (focused) moveFocus();  // on to the text box (the form is gone)
    try { await loadVoices(); } catch (err) {
      showError(err);
      if (focused && !$("auth").hidden) $("api-key").focus();  // refused: the key again
    }
  });
}

async function main() {
  // a stored key that cannot be sent (saved before keys were checked) goes, cleaned or all
  const stored = storage.get(KEY_KEY);
  if (stored !== null && stored !== state.apiKey) {
    if (state.apiKey) storage.set(KEY_KEY, state.apiKey); else storage.remove(KEY_KEY);
  }
  wire();
  await restoreResults();
  const info = await waitUntilReady();
  if (info.status === "ready") {
    try { await loadVoices(); } catch (err) { showError(err); }
  }
  document.body.dataset.ready = info.status;
}

main();
