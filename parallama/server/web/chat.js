// The chat: conversations kept in localStorage, answers streamed from /v1/chat/completions (SSE read
// with fetch + ReadableStream), stop, regenerate, edit, settings and the API key.
// Text from the model or the user reaches the page only through renderMarkdown (escaped) or
// textContent: never as HTML of its own.
"use strict";

const $ = (id) => document.getElementById(id);
const KEYS = { conversations: "parallama.conversations", current: "parallama.current",
               settings: "parallama.settings", apiKey: "parallama.apiKey" };
const MAX_RETRIES = 5; // 503 (busy): tries after the first, each waiting as long as Retry-After asks
const ROLES = ["user", "assistant", "system"];

const state = {
  conversations: [],
  currentId: null,
  settings: { system: "", temperature: "", top_p: "", max_tokens: "", model: "", extra: "" },
  apiKey: localStorage.getItem(KEYS.apiKey) || "",
  models: [],
  streaming: null, // {controller, conv, reply, node} while an answer streams
  afterKey: null, // what to do once a key is given (retry the answer that got 401)
};

// --- small helpers ---------------------------------------------------------------------------------
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(label, title, onClick, className) {
  const b = el("button", className, label);
  b.type = "button";
  if (title) { b.title = title; b.setAttribute("aria-label", title); }
  b.addEventListener("click", onClick);
  return b;
}

function loadJson(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value === null ? fallback : value;
  } catch {
    return fallback;
  }
}

function newId() {
  return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(timer); reject(new DOMException("stopped", "AbortError")); },
                            { once: true });
  });
}

function authHeaders(extra) {
  const headers = { ...extra };
  if (state.apiKey) headers.Authorization = "Bearer " + state.apiKey;
  return headers;
}

// --- conversations -----------------------------------------------------------------------------------
// Anything read from storage or an imported file is rebuilt field by field: only known roles and
// string contents survive.
function cleanConversation(raw) {
  if (!raw || typeof raw !== "object" || !Array.isArray(raw.messages)) return null;
  const messages = raw.messages
    .filter((m) => m && ROLES.includes(m.role) && typeof m.content === "string")
    .map((m) => ({ role: m.role, content: m.content, ...(m.stopped ? { stopped: true } : {}),
                   ...(typeof m.info === "string" ? { info: m.info } : {}) }));
  const title = typeof raw.title === "string" && raw.title.trim() ? raw.title.trim().slice(0, 120) : "Untitled chat";
  return { id: typeof raw.id === "string" && raw.id ? raw.id : newId(), title, messages,
           created: Number(raw.created) || Date.now(), updated: Number(raw.updated) || Date.now(),
           renamed: raw.renamed !== false }; // imported titles are kept; ours say false until renamed
}

function saveConversations() {
  const stored = state.conversations.map((c) => ({ ...c, messages: c.messages.filter((m) => !m.pending) }));
  localStorage.setItem(KEYS.conversations, JSON.stringify(stored));
  localStorage.setItem(KEYS.current, JSON.stringify(state.currentId));
}

function current() {
  let conv = state.conversations.find((c) => c.id === state.currentId);
  if (!conv) {
    conv = state.conversations[0] || newConversation();
    state.currentId = conv.id;
  }
  return conv;
}

function newConversation() {
  const conv = { id: newId(), title: "New chat", messages: [], created: Date.now(), updated: Date.now(), renamed: false };
  state.conversations.unshift(conv);
  state.currentId = conv.id;
  return conv;
}

function selectConversation(id) {
  state.currentId = id;
  saveConversations();
  render();
}

function renderConversationList() {
  const list = $("conversation-list");
  list.replaceChildren();
  for (const conv of state.conversations) {
    const item = el("li", conv.id === state.currentId ? "selected" : "");
    item.dataset.id = conv.id;
    const title = button(conv.title, null, () => selectConversation(conv.id), "title");
    item.append(title,
      button("✎", "Rename", () => startRename(item, conv)),
      button("⤓", "Export as JSON", () => exportConversation(conv)),
      button("✕", "Delete", () => deleteConversation(conv)));
    list.append(item);
  }
}

function startRename(item, conv) {
  const input = el("input", "rename");
  input.value = conv.title;
  input.setAttribute("aria-label", "New name");
  let done = false;
  const finish = (keep) => {
    if (done) return;
    done = true;
    if (keep && input.value.trim() && input.value.trim() !== conv.title) {
      conv.title = input.value.trim().slice(0, 120);
      conv.renamed = true;
    }
    saveConversations();
    renderConversationList();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") finish(true);
    if (e.key === "Escape") { e.stopPropagation(); finish(false); }
  });
  input.addEventListener("blur", () => finish(true));
  item.replaceChildren(input);
  input.focus();
  input.select();
}

function deleteConversation(conv) {
  if (!confirm(`Delete "${conv.title}"?`)) return;
  if (state.streaming && state.streaming.conv === conv) stop();
  state.conversations = state.conversations.filter((c) => c !== conv);
  if (state.currentId === conv.id) state.currentId = null;
  current();
  saveConversations();
  render();
}

function exportConversation(conv) {
  const data = { format: "parallama.conversation", version: 1, title: conv.title, created: conv.created,
                 messages: conv.messages.filter((m) => !m.pending).map((m) => ({ role: m.role, content: m.content })) };
  const url = URL.createObjectURL(new Blob([JSON.stringify(data, null, 2)], { type: "application/json" }));
  const link = el("a");
  link.href = url;
  link.download = (conv.title.replace(/[^\w-]+/g, "-").replace(/^-+|-+$/g, "") || "conversation") + ".json";
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

async function importConversations(file) {
  let parsed;
  try {
    parsed = JSON.parse(await file.text());
  } catch {
    notice(`${file.name} is not JSON.`, "error");
    return;
  }
  const items = Array.isArray(parsed) ? parsed : Array.isArray(parsed.conversations) ? parsed.conversations : [parsed];
  const imported = items.map(cleanConversation).filter(Boolean);
  if (!imported.length) {
    notice(`${file.name} holds no conversation (expected {"title", "messages": [{"role", "content"}]}).`, "error");
    return;
  }
  for (const conv of imported) {
    conv.id = newId(); // never overwrite a conversation already here
    state.conversations.unshift(conv);
  }
  state.currentId = imported[imported.length - 1].id;
  saveConversations();
  render();
  notice(`Imported ${imported.length} conversation${imported.length > 1 ? "s" : ""}.`, "info");
}

// --- messages ---------------------------------------------------------------------------------------
function messageNode(conv, message, index) {
  const node = el("article", "msg " + message.role);
  node.dataset.role = message.role;
  const who = { user: "You", assistant: "Model", system: "System" }[message.role];
  const content = el("div", "content");
  content.innerHTML = renderMarkdown(message.content); // escaped first: see markdown.js
  node.append(el("div", "who", who), content);
  const meta = el("div", "meta");
  if (message.pending) meta.append(el("span", "status", message.status || "writing…"));
  if (message.stopped) meta.append(el("span", "stopped", "stopped"));
  if (message.info) meta.append(el("span", "info", message.info));
  const last = index === conv.messages.length - 1;
  if (!state.streaming && last && message.role === "assistant") {
    meta.append(button("Regenerate", "Generate this answer again", regenerate, "link regenerate"));
  }
  if (!state.streaming && message.role === "user" && index === lastUserIndex(conv)) {
    meta.append(button("Edit", "Edit this message and send it again", () => editLastUser(conv), "link edit"));
  }
  node.append(meta);
  return node;
}

function lastUserIndex(conv) {
  for (let i = conv.messages.length - 1; i >= 0; i--) if (conv.messages[i].role === "user") return i;
  return -1;
}

function renderMessages() {
  const conv = current();
  const box = $("messages");
  box.replaceChildren();
  if (!conv.messages.length) box.append(el("p", "empty muted", "Ask anything: the answer streams in as the model writes it."));
  conv.messages.forEach((m, i) => box.append(messageNode(conv, m, i)));
  if (state.streaming && state.streaming.conv === conv) state.streaming.node = box.lastElementChild;
  box.scrollTop = box.scrollHeight;
}

let redrawQueued = false;
function redrawReply() { // at most once a frame, however fast the tokens come
  if (redrawQueued) return;
  redrawQueued = true;
  requestAnimationFrame(() => {
    redrawQueued = false;
    const s = state.streaming;
    if (!s || !s.node || s.conv !== current()) return;
    const box = $("messages");
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    s.node.replaceWith((s.node = messageNode(s.conv, s.reply, s.conv.messages.length - 1)));
    if (atBottom) box.scrollTop = box.scrollHeight;
  });
}

function render() {
  current();
  renderConversationList();
  renderMessages();
}

// --- sending ----------------------------------------------------------------------------------------
function send() {
  const text = $("input").value;
  if (!text.trim() || state.streaming) return;
  const conv = current();
  if (!conv.messages.length && !conv.renamed) conv.title = text.trim().replace(/\s+/g, " ").slice(0, 40); // not a name given
  conv.messages.push({ role: "user", content: text });
  $("input").value = "";
  renderConversationList();
  generate(conv);
}

function regenerate() {
  const conv = current();
  if (state.streaming || conv.messages[conv.messages.length - 1]?.role !== "assistant") return;
  conv.messages.pop();
  generate(conv);
}

function editLastUser(conv) {
  const index = lastUserIndex(conv);
  if (state.streaming || index < 0) return;
  $("input").value = conv.messages[index].content;
  conv.messages.splice(index); // the message and the answers after it: sending makes new ones
  saveConversations();
  renderMessages();
  $("input").focus();
}

function stop() {
  if (state.streaming) state.streaming.controller.abort();
}

async function generate(conv) {
  clearNotice();
  const reply = { role: "assistant", content: "", pending: true };
  const controller = new AbortController();
  const body = requestBody(conv); // before the empty reply joins the conversation
  if (!body) return;
  conv.messages.push(reply);
  state.streaming = { controller, conv, reply, node: null };
  setStreaming(true);
  renderMessages();
  let failure = null;
  try {
    await streamAnswer(body, reply, controller.signal);
  } catch (error) {
    failure = error;
  }
  state.streaming = null;
  delete reply.pending;
  delete reply.status;
  if (failure && failure.name === "AbortError") {
    reply.stopped = true;
  } else if (failure) {
    if (!reply.content) conv.messages.pop(); // no empty bubble for an answer that never started
    else reply.stopped = true;
    explain(failure, () => generate(conv));
  }
  conv.updated = Date.now();
  saveConversations();
  setStreaming(false);
  render();
}

function setStreaming(on) {
  document.body.dataset.streaming = String(on);
  $("send").disabled = on;
  $("stop").hidden = !on;
}

function number(value) {
  return value === "" || value === null || value === undefined ? undefined : Number(value);
}

function requestBody(conv) {
  const s = state.settings;
  let extra = {};
  try {
    extra = s.extra.trim() ? JSON.parse(s.extra) : {};
  } catch {
    notice("The settings' extra request fields are not valid JSON; fix them in Settings.", "error");
    return null;
  }
  const messages = [];
  if (s.system.trim()) messages.push({ role: "system", content: s.system });
  for (const m of conv.messages) messages.push({ role: m.role, content: m.content });
  const body = { ...extra, messages, stream: true, stream_options: { include_usage: true } };
  const model = s.model || state.models[0];
  if (model) body.model = model;
  for (const [field, value] of [["temperature", s.temperature], ["top_p", s.top_p], ["max_tokens", s.max_tokens]]) {
    if (number(value) !== undefined) body[field] = number(value);
  }
  return body;
}

class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function apiError(response) {
  let message = response.statusText || "request failed";
  let code = null;
  try {
    const body = await response.json();
    message = body.error?.message || message;
    code = body.error?.code || null;
  } catch { /* not JSON: keep the status text */ }
  return new ApiError(response.status, message, code);
}

// 503 means busy: wait as long as Retry-After says (at least an exponential backoff) and try again.
async function post(path, body, signal, onWait) {
  for (let attempt = 0; ; attempt++) {
    const response = await fetch(path, { method: "POST", body: JSON.stringify(body), signal,
                                         headers: authHeaders({ "Content-Type": "application/json" }) });
    if (response.ok) return response;
    const error = await apiError(response);
    if (response.status !== 503 || attempt >= MAX_RETRIES) throw error;
    const asked = Number(response.headers.get("Retry-After")) || 0;
    const wait = Math.min(Math.max(asked, 2 ** attempt), 60);
    onWait(`The server is busy; trying again in ${wait} s (try ${attempt + 2} of ${MAX_RETRIES + 1})…`);
    await sleep(wait * 1000, signal);
    onWait("writing…");
  }
}

async function streamAnswer(body, reply, signal) {
  const started = performance.now();
  const response = await post("/v1/chat/completions", body, signal, (status) => {
    reply.status = status;
    redrawReply();
  });
  let finish = null;
  let usage = null;
  let firstToken = null;
  await readEvents(response, (chunk) => {
    if (chunk.error) throw new ApiError(500, chunk.error.message || "the server stopped the answer", chunk.error.code);
    const choice = chunk.choices && chunk.choices[0];
    const delta = choice?.delta?.content;
    if (delta) {
      firstToken ??= performance.now();
      reply.content += delta;
      redrawReply();
    }
    if (choice?.finish_reason) finish = choice.finish_reason;
    if (chunk.usage) usage = chunk.usage;
  });
  if (usage) {
    const seconds = (performance.now() - (firstToken ?? started)) / 1000;
    const rate = seconds > 0 && usage.completion_tokens > 1 ? ` · ${(usage.completion_tokens / seconds).toFixed(1)} tokens/s` : "";
    reply.info = `${usage.completion_tokens} tokens${rate}` + (finish === "length" ? " · cut at max_tokens" : "");
  }
}

// Server-sent events: blocks separated by a blank line, each with "data: ..." lines.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data === "[DONE]") { reader.cancel(); return; }
      if (data) onData(JSON.parse(data));
    }
  }
}

// --- errors a person understands ------------------------------------------------------------------
function explain(error, retry) {
  if (error.status === 401) {
    askForKey(retry);
    notice("The server needs an API key.", "error");
  } else if (error.code === "context_length_exceeded") {
    notice("Too long for the model's context: " + error.message +
           " Start a new chat, shorten the message, or lower max_tokens in Settings.", "error");
  } else if (error.status === 503) {
    notice("The server stayed busy after several tries: " + error.message, "error");
  } else if (error instanceof TypeError) {
    notice("Cannot reach the server. Is parallama still running?", "error");
  } else {
    notice((error.status ? `Error ${error.status}: ` : "") + error.message, "error");
  }
}

function notice(text, kind) {
  const box = $("notice");
  box.className = kind;
  box.replaceChildren(el("span", "", text), button("×", "Dismiss", clearNotice, "link"));
  box.hidden = false;
}

function clearNotice() {
  $("notice").hidden = true;
}

// --- API key ----------------------------------------------------------------------------------------
function askForKey(then, reason) {
  if (then) state.afterKey = then; // a prompt opened by another 401 meanwhile must not drop the retry
  $("key-reason").textContent = reason || (state.apiKey ? "The server refused this API key. Enter the right one." :
                                           "This server was started with an API key. Enter it to chat.");
  $("key-input").value = state.apiKey;
  if (!$("key-dialog").open) $("key-dialog").showModal();
}

function keyDialogClosed() {
  const dialog = $("key-dialog");
  const then = state.afterKey;
  state.afterKey = null;
  if (dialog.returnValue !== "save") return;
  state.apiKey = $("key-input").value.trim();
  if (state.apiKey) localStorage.setItem(KEYS.apiKey, state.apiKey);
  else localStorage.removeItem(KEYS.apiKey);
  clearNotice();
  loadModels();
  Live.restart();
  if (then) then();
}

// --- settings and the model list -------------------------------------------------------------------
async function loadModels() {
  try {
    const response = await fetch("/v1/models", { headers: authHeaders() });
    if (response.status === 401) {
      askForKey();
      return;
    }
    if (!response.ok) throw await apiError(response);
    state.models = (await response.json()).data.map((m) => m.id);
    $("model-id").textContent = state.settings.model || state.models[0] || "";
  } catch (error) {
    explain(error);
  }
}

function openSettings() {
  const s = state.settings;
  const select = $("set-model");
  const ids = [...new Set([...state.models, ...(s.model ? [s.model] : [])])];
  select.replaceChildren(...ids.map((id) => { const o = el("option", "", id); o.value = id; return o; }));
  select.value = s.model || state.models[0] || "";
  $("set-system").value = s.system;
  $("set-temperature").value = s.temperature;
  $("set-top-p").value = s.top_p;
  $("set-max-tokens").value = s.max_tokens;
  $("set-extra").value = s.extra;
  $("settings-error").hidden = true;
  $("settings-dialog").showModal();
}

function saveSettings(event) {
  if (event.submitter?.value !== "save") return;
  const extra = $("set-extra").value.trim();
  try {
    if (extra) {
      const parsed = JSON.parse(extra);
      if (typeof parsed !== "object" || Array.isArray(parsed) || parsed === null) throw new Error();
    }
  } catch {
    event.preventDefault(); // keep the dialog open
    $("settings-error").textContent = 'More request fields must be a JSON object, like {"seed": 1}.';
    $("settings-error").hidden = false;
    return;
  }
  state.settings = { system: $("set-system").value, temperature: $("set-temperature").value,
                     top_p: $("set-top-p").value, max_tokens: $("set-max-tokens").value,
                     model: $("set-model").value, extra };
  localStorage.setItem(KEYS.settings, JSON.stringify(state.settings));
  $("model-id").textContent = state.settings.model || state.models[0] || "";
}

// --- start ------------------------------------------------------------------------------------------
function start() {
  state.conversations = (loadJson(KEYS.conversations, []) || []).map(cleanConversation).filter(Boolean);
  state.currentId = loadJson(KEYS.current, null);
  const saved = loadJson(KEYS.settings, {});
  for (const field of Object.keys(state.settings)) {
    if (typeof saved[field] === "string") state.settings[field] = saved[field];
  }
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && state.streaming) stop(); });
  $("stop").addEventListener("click", stop);
  $("new-conversation").addEventListener("click", () => {
    const empty = state.conversations.find((c) => !c.messages.length);
    if (empty) state.currentId = empty.id; else newConversation();
    saveConversations();
    render();
    $("input").focus();
  });
  $("import-file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    e.target.value = "";
    if (file) importConversations(file);
  });
  $("open-settings").addEventListener("click", openSettings);
  $("settings-form").addEventListener("submit", saveSettings);
  $("open-key").addEventListener("click", () => askForKey(null, "The key this server was started with (--api-key)."));
  $("key-dialog").addEventListener("close", keyDialogClosed);
  render();
  setStreaming(false);
  loadModels();
  Live.start({
    fetchStatus: () => fetch("/status", { headers: authHeaders() }),
    onUnauthorized: () => askForKey(),
  });
  $("input").focus();
}

start();
