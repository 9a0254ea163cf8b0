// Heron playground: a chat page for Heron's OpenAI-compatible API. Plain JavaScript, no build
// step, no dependencies, nothing fetched from anywhere but the API.
//
// - The API is this page's origin, or the one `?api=http://host:port` names (that server's CORS
//   must allow this origin; Heron allows every origin by default).
// - Answers stream from POST /v1/chat/completions (SSE read off fetch()'s ReadableStream); Stop
//   aborts the request, which also aborts the generation on the server.
// - Model text is rendered by a small markdown renderer that builds DOM nodes (text always goes in
//   through text nodes / textContent, never innerHTML), so nothing the model writes can run.
// - The conversation, settings and API key stay in this browser's localStorage.
"use strict";

const params = new URLSearchParams(location.search);
const API = (params.get("api") || location.origin).replace(/\/+$/, "");
const CHAT_STORE = "heron.playground.chat";
const SETTINGS_STORE = "heron.playground.settings";
const KEY_STORE = "heron.playground.key:" + API; // one key per API server

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), newChat: $("new-chat"), system: $("system"), temperature: $("temperature"),
  maxTokens: $("max-tokens"), topP: $("top-p"), json: $("json-mode"), apiBase: $("api-base"),
  changeKey: $("change-key"), notice: $("notice"), keyForm: $("key-form"), keyMessage: $("key-message"),
  apiKey: $("api-key"), messages: $("messages"), composer: $("composer"), prompt: $("prompt"),
  send: $("send"), stop: $("stop"),
};

let conversation = load(CHAT_STORE, []); // [{role, content, state?, stats?, error?}]
let apiKey = localStorage.getItem(KEY_STORE) || "";
let controller = null; // the AbortController of the answer being streamed
const cards = new Map(); // model id -> its /v1/models card

// ---------------------------------------------------------------------------------------------
// Storage
// ---------------------------------------------------------------------------------------------

function load(key, fallback) {
  try {
    return JSON.parse(localStorage.getItem(key)) ?? fallback;
  } catch {
    return fallback;
  }
}

function save(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch {
    // storage full or disabled: the page still works, it just forgets
  }
}

const SETTINGS = { system: ui.system, temperature: ui.temperature, maxTokens: ui.maxTokens, topP: ui.topP };

function saveSettings() {
  const settings = { model: ui.model.value || load(SETTINGS_STORE, {}).model, json: ui.json.checked };
  for (const [name, input] of Object.entries(SETTINGS)) settings[name] = input.value;
  save(SETTINGS_STORE, settings);
}

function restoreSettings() {
  const settings = load(SETTINGS_STORE, {});
  for (const [name, input] of Object.entries(SETTINGS)) input.value = settings[name] ?? "";
  ui.json.checked = Boolean(settings.json);
}

// ---------------------------------------------------------------------------------------------
// The API: bearer key on 401, errors in OpenAI's envelope
// ---------------------------------------------------------------------------------------------

class ServerError extends Error {}

let keyWaiters = [];

function askForKey(message, signal) {
  ui.keyMessage.textContent = message;
  ui.keyForm.hidden = false;
  ui.apiKey.value = "";
  ui.apiKey.focus();
  return new Promise((resolve, reject) => {
    keyWaiters.push(resolve);
    signal?.addEventListener("abort", () => reject(new DOMException("Stopped", "AbortError")));
  });
}

ui.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const key = ui.apiKey.value.trim();
  if (!key) return;
  apiKey = key;
  localStorage.setItem(KEY_STORE, key);
  ui.keyForm.hidden = true;
  const waiters = keyWaiters;
  keyWaiters = [];
  waiters.forEach((resolve) => resolve());
});

// fetch(API + path), asking for the key (and retrying) for as long as the server answers 401.
// The returned response carries `sentAt`, when the request that got it was sent.
async function api(path, init = {}) {
  for (;;) {
    const headers = { ...init.headers };
    if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
    const sentAt = performance.now();
    const response = await fetch(API + path, { ...init, headers });
    if (response.status !== 401) {
      response.sentAt = sentAt;
      return response;
    }
    await askForKey(await errorMessage(response), init.signal);
  }
}

async function errorMessage(response) {
  const text = await response.text().catch(() => "");
  try {
    const body = JSON.parse(text);
    if (body?.error?.message) return body.error.message;
  } catch {
    // not JSON: fall through
  }
  return `HTTP ${response.status}${text ? `: ${text.slice(0, 300)}` : ""}`;
}

function postJSON(path, body, signal) {
  return api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
    signal,
  });
}

function notice(message) {
  ui.notice.textContent = message || "";
  ui.notice.hidden = !message;
}

// ---------------------------------------------------------------------------------------------
// Models: the chat models of /v1/models
// ---------------------------------------------------------------------------------------------

// /v1/models lists embedding models too. POST /tokenize with `messages` applies the chat template
// without generating anything; it succeeds only for a model that can chat.
async function canChat(id) {
  try {
    return (await postJSON("/tokenize", { model: id, messages: [{ role: "user", content: "hi" }] })).ok;
  } catch {
    return true; // no answer at all: keep it, the chat request will say what is wrong
  }
}

async function loadModels() {
  let listed;
  try {
    const response = await api("/v1/models");
    if (!response.ok) throw new ServerError(await errorMessage(response));
    listed = (await response.json()).data || [];
  } catch (error) {
    notice(`Could not list the models of ${API}: ${error.message}`);
    ui.model.replaceChildren(new Option("no models", ""));
    return;
  }
  const usable = await Promise.all(listed.map((card) => canChat(card.id)));
  const chat = listed.filter((_, i) => usable[i]);
  cards.clear();
  chat.forEach((card) => cards.set(card.id, card));
  ui.model.replaceChildren(...chat.map((card) => new Option(card.id, card.id)));
  if (!chat.length) ui.model.append(new Option("no chat models", ""));
  const saved = load(SETTINGS_STORE, {}).model;
  if (saved && cards.has(saved)) ui.model.value = saved;
  notice("");
  showDefaults();
}

// The placeholders say what the server picks for an empty field, where its card tells.
function showDefaults() {
  const defaults = cards.get(ui.model.value)?.sampling_defaults || {};
  const fields = [[ui.temperature, "temperature"], [ui.maxTokens, "max_tokens"], [ui.topP, "top_p"]];
  for (const [input, name] of fields) {
    input.placeholder = defaults[name] != null ? `server default (${defaults[name]})` : "server default";
  }
}

// ---------------------------------------------------------------------------------------------
// Chat
// ---------------------------------------------------------------------------------------------

function requestBody(model) {
  const messages = [];
  const system = ui.system.value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const message of conversation) {
    if ((message.role === "user" || message.role === "assistant") && message.content) {
      messages.push({ role: message.role, content: message.content });
    }
  }
  const body = { model, messages, stream: true, stream_options: { include_usage: true } };
  const numbers = [[ui.temperature, "temperature"], [ui.maxTokens, "max_tokens"], [ui.topP, "top_p"]];
  for (const [input, name] of numbers) {
    const value = input.value.trim();
    if (value !== "" && Number.isFinite(Number(value))) body[name] = Number(value);
  }
  if (ui.json.checked) body.response_format = { type: "json_object" };
  return body;
}

// The `data:` payloads of an SSE stream (comments such as keep-alives are skipped).
async function* sseData(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, end).replace(/\r$/, "");
        buffer = buffer.slice(end + 1);
        if (line === "") {
          if (data.length) yield data.join("\n");
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(5).replace(/^ /, ""));
        }
      }
    }
    if (data.length) yield data.join("\n");
  } finally {
    reader.cancel().catch(() => {});
  }
}

async function send(text) {
  const model = ui.model.value;
  if (!model) {
    notice("There is no chat model to talk to.");
    return;
  }
  conversation.push({ role: "user", content: text });
  const body = requestBody(model);
  const answer = { role: "assistant", content: "", state: "streaming" };
  conversation.push(answer);
  save(CHAT_STORE, conversation);
  render();
  let node = ui.messages.lastElementChild;
  let pending = false;
  const redraw = () => {
    const fresh = messageNode(answer);
    node.replaceWith(fresh);
    node = fresh;
    scrollDown();
  };
  const schedule = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      redraw();
    });
  };

  controller = new AbortController();
  setBusy(true);
  let sentAt = performance.now();
  let first = null;
  let usage = null;
  let finish = null;
  try {
    const response = await postJSON("/v1/chat/completions", body, controller.signal);
    sentAt = response.sentAt;
    if (!response.ok) throw new ServerError(await errorMessage(response));
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") break;
      let chunk;
      try {
        chunk = JSON.parse(data);
      } catch {
        continue;
      }
      if (chunk.error) throw new ServerError(chunk.error.message || JSON.stringify(chunk.error));
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const piece = choice.delta?.content;
        if (piece) {
          first ??= performance.now();
          answer.content += piece;
          schedule();
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    answer.state = "done";
  } catch (error) {
    if (error.name === "AbortError") {
      answer.state = "stopped";
    } else {
      answer.state = "error";
      answer.error = error instanceof ServerError ? error.message : `Request failed: ${error.message}`;
    }
  }
  answer.stats = statsLine(sentAt, first, performance.now(), usage, finish, answer.state);
  controller = null;
  setBusy(false);
  save(CHAT_STORE, conversation);
  redraw();
}

// TTFT: from sending the request to the first content delta. Tokens/s: the completion tokens
// after the first (usage.completion_tokens - 1) over the decode time, first delta to the end.
function statsLine(sentAt, first, end, usage, finish, state) {
  const parts = [];
  if (state === "stopped") parts.push("stopped");
  if (first !== null) parts.push(`TTFT ${Math.round(first - sentAt)} ms`);
  const tokens = usage?.completion_tokens;
  if (tokens != null) {
    const seconds = first === null ? 0 : (end - first) / 1000;
    if (tokens > 1 && seconds > 0) parts.push(`${((tokens - 1) / seconds).toFixed(1)} tokens/s`);
    parts.push(`${tokens} tokens`);
  }
  if (finish === "length") parts.push("hit max tokens");
  return parts.join(" · ");
}

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
}

function stop() {
  controller?.abort();
}

function newChat() {
  stop();
  conversation = [];
  save(CHAT_STORE, conversation);
  render();
  ui.prompt.focus();
}

// ---------------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------------

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text != null) node.textContent = text;
  return node;
}

function messageNode(message) {
  const node = element("div", `msg ${message.role}`);
  node.dataset.role = message.role;
  node.dataset.state = message.state || "done";
  node.append(element("div", "who", message.role === "user" ? "You" : "Assistant"));
  const content = element("div", "content");
  if (message.role === "assistant") content.append(renderMarkdown(message.content));
  else content.textContent = message.content;
  node.append(content);
  if (message.error) node.append(element("div", "error", message.error));
  if (message.stats) node.append(element("div", "stats", message.stats));
  return node;
}

function render() {
  ui.messages.replaceChildren(...conversation.map(messageNode));
  scrollDown();
}

function scrollDown() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

// Markdown, the common subset: headings, paragraphs, bold / italic, inline code, fenced code
// blocks with a language label, lists, block quotes, rules and links (http, https and mailto
// only). Every piece of text goes in as a text node.

const LIST_ITEM = /^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/;
const FENCE = /^\s*(`{3,}|~{3,})\s*([^\s`]*)/;

function renderMarkdown(text) {
  const out = document.createDocumentFragment();
  const lines = text.split("\n");
  let paragraph = [];
  const flush = () => {
    if (!paragraph.length) return;
    const p = element("p");
    paragraph.forEach((line, i) => {
      if (i) p.append(element("br"));
      p.append(inline(line));
    });
    out.append(p);
    paragraph = [];
  };
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if ((m = line.match(FENCE))) {
      flush();
      const code = [];
      i++;
      while (i < lines.length && !lines[i].trim().startsWith(m[1])) code.push(lines[i++]);
      i++; // the closing fence (still missing while the block streams in)
      out.append(codeBlock(code.join("\n"), m[2]));
    } else if ((m = line.match(/^\s*(#{1,6})\s+(.*?)[\s#]*$/))) {
      flush();
      const heading = element(`h${m[1].length}`);
      heading.append(inline(m[2]));
      out.append(heading);
      i++;
    } else if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) {
      flush();
      out.append(element("hr"));
      i++;
    } else if ((m = line.match(LIST_ITEM))) {
      flush();
      const ordered = /\d/.test(m[1]);
      const list = element(ordered ? "ol" : "ul");
      if (ordered && parseInt(m[1], 10) !== 1) list.start = parseInt(m[1], 10);
      while (i < lines.length && (m = lines[i].match(LIST_ITEM)) && /\d/.test(m[1]) === ordered) {
        const item = element("li");
        item.append(inline(m[2]));
        i++;
        while (i < lines.length && /^\s{2,}\S/.test(lines[i]) && !LIST_ITEM.test(lines[i])) {
          item.append(element("br"), inline(lines[i++].trim()));
        }
        list.append(item);
      }
      out.append(list);
    } else if (/^\s*>/.test(line)) {
      flush();
      const quoted = [];
      while (i < lines.length && /^\s*>/.test(lines[i])) quoted.push(lines[i++].replace(/^\s*>\s?/, ""));
      const quote = element("blockquote");
      quote.append(renderMarkdown(quoted.join("\n")));
      out.append(quote);
    } else if (line.trim() === "") {
      flush();
      i++;
    } else {
      paragraph.push(line);
      i++;
    }
  }
  flush();
  return out;
}

function codeBlock(code, language) {
  const block = element("div", "codeblock");
  block.append(element("div", "lang", language || "text"));
  const pre = element("pre");
  const inner = element("code", language ? `language-${language}` : "", code);
  pre.append(inner);
  block.append(pre);
  return block;
}

// One alternative per inline form; the first match wins, the text before it stays plain.
const INLINE = new RegExp(
  [
    /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source, // 1, 2: `code`
    /\*\*(?=\S)([\s\S]*?\S)\*\*/.source, // 3: **bold**
    /(?<!\w)__(?=\S)([\s\S]*?\S)__(?!\w)/.source, // 4: __bold__
    /\*(?=[^\s*])([\s\S]*?[^\s*])\*/.source, // 5: *italic*
    /(?<!\w)_(?=[^\s_])([\s\S]*?[^\s_])_(?!\w)/.source, // 6: _italic_
    /\[([^\]]+)\]\(\s*((?:[^\s()]|\([^\s()]*\))+)\s*\)/.source, // 7, 8: [label](url), url(with)parens
    /(https?:\/\/[^\s<>"']*[^\s<>"'.,;:!?)\]])/.source, // 9: a bare URL
  ].join("|"),
);

function inline(text) {
  const out = document.createDocumentFragment();
  while (text) {
    const m = INLINE.exec(text);
    if (!m) {
      out.append(text);
      break;
    }
    if (m.index) out.append(text.slice(0, m.index));
    if (m[1] !== undefined) {
      out.append(element("code", "", m[2]));
    } else if (m[3] !== undefined || m[4] !== undefined) {
      const strong = element("strong");
      strong.append(inline(m[3] ?? m[4]));
      out.append(strong);
    } else if (m[5] !== undefined || m[6] !== undefined) {
      const em = element("em");
      em.append(inline(m[5] ?? m[6]));
      out.append(em);
    } else if (m[7] !== undefined) {
      out.append(link(m[7], m[8]));
    } else {
      out.append(link(m[9], m[9]));
    }
    text = text.slice(m.index + m[0].length);
  }
  return out;
}

function link(label, target) {
  let url = null;
  try {
    url = new URL(target, location.href);
  } catch {
    // not a URL: shown as text
  }
  if (!url || !["http:", "https:", "mailto:"].includes(url.protocol)) {
    return document.createTextNode(label === target ? target : `${label} (${target})`);
  }
  const a = element("a", "", label);
  a.href = url.href;
  a.target = "_blank";
  a.rel = "noopener noreferrer";
  return a;
}

// ---------------------------------------------------------------------------------------------
// Wiring
// ---------------------------------------------------------------------------------------------

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text || controller) return;
  ui.prompt.value = "";
  send(text);
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});
ui.stop.addEventListener("click", stop);
ui.newChat.addEventListener("click", newChat);
ui.changeKey.addEventListener("click", () => askForKey("Enter the API key for this server.").then(loadModels));
ui.model.addEventListener("change", () => {
  saveSettings();
  showDefaults();
});
for (const input of Object.values(SETTINGS)) input.addEventListener("input", saveSettings);
ui.json.addEventListener("change", saveSettings);

ui.apiBase.textContent = API;
restoreSettings();
for (const message of conversation) {
  if (message.state === "streaming") message.state = "stopped"; // the page closed mid-answer
}
render();
loadModels();
