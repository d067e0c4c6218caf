// The chat page: settings, conversations in localStorage, streaming answers with stats.
(function (SD) {
  "use strict";

  const STORE_KEY = "specdec.chat.v1";
  const SETTINGS_KEY = "specdec.settings.v1";
  const $ = (id) => document.getElementById(id);
  const el = {
    sidebar: $("sidebar"), toggleSidebar: $("toggle-sidebar"), newChat: $("new-chat"),
    conversations: $("conversations"), status: $("server-status"), model: $("model"),
    apiKeyRow: $("api-key-row"), apiKey: $("api-key"), apiKeyNotice: $("api-key-notice"),
    temperature: $("temperature"), maxTokens: $("max-tokens"), speculation: $("speculation"),
    systemPrompt: $("system-prompt"), extraJson: $("extra-json"), messages: $("messages"),
    composer: $("composer"), input: $("input"), send: $("send"), stop: $("stop"),
  };

  function loadJSON(key, fallback) {
    try {
      const value = JSON.parse(localStorage.getItem(key));
      return value && typeof value === "object" ? value : fallback;
    } catch (_) {
      return fallback;
    }
  }

  const store = loadJSON(STORE_KEY, {});
  if (!Array.isArray(store.conversations)) store.conversations = [];
  const saveStore = () => localStorage.setItem(STORE_KEY, JSON.stringify(store));
  let active = null; // {controller} while an answer streams

  // ------------------------------------------------------------------ settings
  const SETTING_FIELDS = {
    temperature: "value", maxTokens: "value", speculation: "checked", systemPrompt: "value",
    extraJson: "value", apiKey: "value",
  };
  const savedSettings = loadJSON(SETTINGS_KEY, {});
  for (const [name, prop] of Object.entries(SETTING_FIELDS)) {
    if (name in savedSettings) el[name][prop] = savedSettings[name];
    el[name].addEventListener("change", saveSettings);
  }
  function saveSettings() {
    const out = { model: el.model.value };
    for (const [name, prop] of Object.entries(SETTING_FIELDS)) out[name] = el[name][prop];
    localStorage.setItem(SETTINGS_KEY, JSON.stringify(out));
  }
  el.model.addEventListener("change", saveSettings);

  function authHeaders() {
    const key = el.apiKey.value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  function setStatus(text) { el.status.textContent = text; }

  async function loadModels() {
    let response;
    try {
      response = await fetch("v1/models", { headers: authHeaders() });
    } catch (err) {
      setStatus(`server unreachable: ${err.message}`);
      return;
    }
    if (!response.ok) {
      setStatus(response.status === 401 ? "API key rejected" : `models: HTTP ${response.status}`);
      el.apiKeyNotice.hidden = response.status !== 401;
      return;
    }
    el.apiKeyNotice.hidden = true;
    const models = (await response.json()).data || [];
    const wanted = savedSettings.model;
    el.model.replaceChildren();
    for (const m of models) {
      const option = document.createElement("option");
      option.value = m.id;
      option.textContent = m.parent && m.parent !== m.id ? `${m.id} (adapter of ${m.parent})`
        : m.id;
      el.model.append(option);
    }
    if (models.some((m) => m.id === wanted)) el.model.value = wanted;
    const current = models.find((m) => m.id === el.model.value);
    setStatus(current ? `${current.id} · context ${current.max_model_len ?? "?"}` : "no models");
  }

  async function loadServerConfig() {
    try {
      const response = await fetch("ui/config.json");
      const config = response.ok ? await response.json() : {};
      const required = Boolean(config.api_key_required);
      el.apiKeyRow.hidden = !required && !el.apiKey.value;
      if (required && !el.apiKey.value) {
        el.apiKeyNotice.hidden = false;
        document.getElementById("settings").open = true;
        setStatus("API key needed");
        return;
      }
    } catch (_) { /* an older server: just try */ }
    await loadModels();
  }
  el.apiKey.addEventListener("change", loadModels);

  function requestBody(messages) {
    const body = {
      model: el.model.value || undefined, stream: true,
      stream_options: { include_usage: true }, messages,
    };
    const temperature = parseFloat(el.temperature.value);
    if (Number.isFinite(temperature)) body.temperature = temperature;
    const maxTokens = parseInt(el.maxTokens.value, 10);
    if (Number.isFinite(maxTokens)) body.max_tokens = maxTokens;
    // null: the server's adaptive k; 0: no speculation for this request.
    body.num_speculative_tokens = el.speculation.checked ? null : 0;
    const extra = el.extraJson.value.trim();
    if (extra) {
      let parsed;
      try {
        parsed = JSON.parse(extra);
      } catch (err) {
        throw new Error(`Extra request JSON is not valid JSON: ${err.message}`);
      }
      if (!parsed || typeof parsed !== "object" || Array.isArray(parsed)) {
        throw new Error("Extra request JSON must be an object");
      }
      Object.assign(body, parsed);
    }
    return body;
  }

  // ------------------------------------------------------------------ conversations
  const newId = () => `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;

  function current() {
    return store.conversations.find((c) => c.id === store.currentId) || null;
  }

  function ensureConversation() {
    let conv = current();
    if (!conv) {
      conv = { id: newId(), title: "New chat", messages: [], updated: Date.now() };
      store.conversations.unshift(conv);
      store.currentId = conv.id;
    }
    return conv;
  }

  function renderList() {
    el.conversations.replaceChildren();
    for (const conv of store.conversations) {
      const li = document.createElement("li");
      li.classList.toggle("active", conv.id === store.currentId);
      const open = document.createElement("button");
      open.type = "button";
      open.className = "open";
      open.textContent = conv.title;
      open.title = conv.title;
      open.disabled = Boolean(active);
      open.addEventListener("click", () => {
        store.currentId = conv.id;
        saveStore();
        el.sidebar.classList.remove("open");
        render();
      });
      const del = document.createElement("button");
      del.type = "button";
      del.className = "delete";
      del.textContent = "\u00d7";
      del.setAttribute("aria-label", `Delete ${conv.title}`);
      del.disabled = Boolean(active);
      del.addEventListener("click", () => {
        store.conversations = store.conversations.filter((c) => c.id !== conv.id);
        if (store.currentId === conv.id) store.currentId = store.conversations[0]?.id ?? null;
        saveStore();
        render();
      });
      li.append(open, del);
      el.conversations.append(li);
    }
  }

  const fmt = (x, digits) => (x === null || x === undefined ? "n/a" : x.toFixed(digits));

  function statsLine(message) {
    const s = message.stats;
    const line = document.createElement("span");
    line.className = "stats";
    if (!s) return line;
    const parts = [
      ["ttft", `TTFT ${s.ttft_s === null ? "n/a" : `${fmt(s.ttft_s, 2)} s`}`],
      ["tps", `${fmt(s.tokens_per_s, 1)} tok/s`],
      ["tokens", `${s.completion_tokens ?? "n/a"} tokens`],
      ["acceptance", s.acceptance_length === null ? "acceptance n/a"
        : `acceptance ${fmt(s.acceptance_length, 2)} tok/step` +
          (s.num_drafts !== null ? ` (${s.num_drafts} drafts)` : "")],
    ];
    for (const [name, text] of parts) {
      const span = document.createElement("span");
      span.dataset.stat = name;
      span.textContent = text;
      line.append(span, " \u00b7 ");
    }
    line.lastChild.remove();
    if (message.stopped) {
      const span = document.createElement("span");
      span.className = "stopped";
      span.textContent = " · stopped";
      line.append(span);
    }
    return line;
  }

  // One message's DOM; returns {update(final)} for assistant messages.
  function messageView(message, isLast) {
    const wrap = document.createElement("div");
    wrap.className = `msg ${message.role}`;
    const body = document.createElement("div");
    body.className = "body";
    wrap.append(body);
    const meta = document.createElement("div");
    meta.className = "meta";
    wrap.append(meta);
    const update = (final) => {
      if (message.role === "user") {
        body.textContent = message.content; // text, never HTML
      } else if (message.error && !message.content) {
        body.classList.add("error");
        body.textContent = message.error;
      } else {
        body.replaceChildren(SD.renderMarkdown(message.content, final));
        if (message.error) {
          const err = document.createElement("p");
          err.className = "error";
          err.textContent = message.error;
          body.append(err);
        }
      }
      meta.replaceChildren();
      if (message.role !== "assistant" || !final) return;
      meta.append(statsLine(message), SD.copyButton(() => message.content));
      if (isLast) {
        const regen = document.createElement("button");
        regen.type = "button";
        regen.className = "regenerate";
        regen.textContent = "Regenerate";
        regen.addEventListener("click", regenerate);
        meta.append(regen);
      }
    };
    update(!(isLast && active));
    el.messages.append(wrap);
    return { wrap, update };
  }

  function render() {
    renderList();
    el.messages.replaceChildren();
    const conv = current();
    const messages = conv ? conv.messages : [];
    let last = null;
    messages.forEach((m, i) => { last = messageView(m, i === messages.length - 1); });
    el.messages.scrollTop = el.messages.scrollHeight;
    return last;
  }

  // ------------------------------------------------------------------ generation
  function setStreaming(on) {
    el.send.hidden = on;
    el.stop.hidden = !on;
    el.newChat.disabled = on;
  }

  async function generate(conv) {
    const history = conv.messages
      .filter((m) => m.content) // failed or stopped-before-any-text answers are left out
      .map((m) => ({ role: m.role, content: m.content }));
    const system = el.systemPrompt.value.trim();
    if (system) history.unshift({ role: "system", content: system });
    const answer = { role: "assistant", content: "" };
    conv.messages.push(answer);
    conv.updated = Date.now();
    active = { controller: new AbortController() };
    setStreaming(true);
    const view = render();
    let frame = 0;
    const schedule = () => {
      if (frame) return;
      frame = requestAnimationFrame(() => {
        frame = 0;
        view.update(false);
        el.messages.scrollTop = el.messages.scrollHeight;
      });
    };
    const t0 = performance.now();
    let tFirst = null;
    let usage = null;
    try {
      const body = requestBody(history);
      for await (const chunk of SD.streamChat("v1/chat/completions", body, authHeaders(),
        active.controller.signal)) {
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const text = choice.delta && choice.delta.content;
          if (text) {
            if (tFirst === null) tFirst = performance.now();
            answer.content += text;
            schedule();
          }
          if (choice.finish_reason) answer.finish_reason = choice.finish_reason;
        }
      }
    } catch (err) {
      if (err.name === "AbortError") answer.stopped = true;
      else answer.error = err.message;
    }
    if (frame) cancelAnimationFrame(frame);
    answer.stats = SD.answerStats({ t0, tFirst, tEnd: performance.now(), usage });
    active = null;
    setStreaming(false);
    saveStore();
    render();
  }

  function sendMessage() {
    const text = el.input.value;
    if (!text.trim() || active) return;
    el.input.value = "";
    const conv = ensureConversation();
    if (conv.title === "New chat") conv.title = text.trim().slice(0, 48);
    conv.messages.push({ role: "user", content: text });
    generate(conv);
  }

  function regenerate() {
    const conv = current();
    if (!conv || active) return;
    while (conv.messages.length && conv.messages[conv.messages.length - 1].role === "assistant") {
      conv.messages.pop();
    }
    if (conv.messages.length) generate(conv);
  }

  // ------------------------------------------------------------------ events
  el.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    sendMessage();
  });
  el.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      sendMessage();
    }
  });
  el.stop.addEventListener("click", () => { if (active) active.controller.abort(); });
  el.newChat.addEventListener("click", () => {
    store.currentId = null;
    saveStore();
    el.sidebar.classList.remove("open");
    render();
    el.input.focus();
  });
  const setSidebar = (open) => {
    el.sidebar.classList.toggle("open", open);
    el.toggleSidebar.setAttribute("aria-expanded", String(open));
  };
  el.toggleSidebar.addEventListener("click", (event) => {
    event.stopPropagation();
    setSidebar(!el.sidebar.classList.contains("open"));
  });
  // On a small screen the sidebar covers the page: a tap beside it or Escape closes it.
  document.querySelector("main").addEventListener("click", () => setSidebar(false));
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") setSidebar(false);
  });

  render();
  loadServerConfig();
})(window.SD = window.SD || {});
