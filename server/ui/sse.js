// Streaming chat over fetch: EventSource cannot POST, so the page reads the SSE body itself.
// Exposes SD.SSEParser, SD.streamChat, SD.ApiError and SD.answerStats on window.SD.
(function (SD) {
  "use strict";

  // Incremental SSE parser: push() decoded text, get back the data of every complete event.
  class SSEParser {
    constructor() { this.buffer = ""; }

    push(text) {
      this.buffer += text;
      // A "\r\n" may be split across chunks: hold a trailing "\r" until the next push.
      let held = "";
      if (this.buffer.endsWith("\r")) { held = "\r"; this.buffer = this.buffer.slice(0, -1); }
      this.buffer = this.buffer.replace(/\r\n?/g, "\n");
      const events = [];
      let end;
      while ((end = this.buffer.indexOf("\n\n")) >= 0) {
        const block = this.buffer.slice(0, end);
        this.buffer = this.buffer.slice(end + 2);
        const data = block.split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (data) events.push(data);
      }
      this.buffer += held;
      return events;
    }
  }

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.name = "ApiError";
      this.status = status;
    }
  }

  async function errorFrom(response) {
    let message = `HTTP ${response.status}`;
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message += `: ${body.error.message}`;
    } catch (_) { /* not JSON: keep the status line */ }
    return new ApiError(response.status, message);
  }

  // Yields each JSON chunk of a streamed chat completion; returns at "data: [DONE]".
  // Throws ApiError for an HTTP error or an in-stream {"error": ...} frame, and the fetch's
  // AbortError when `signal` aborts (which closes the connection, so the server aborts too).
  async function* streamChat(url, body, headers, signal) {
    const response = await fetch(url, {
      method: "POST", signal, body: JSON.stringify(body),
      headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...headers },
    });
    if (!response.ok) throw await errorFrom(response);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    const parser = new SSEParser();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        for (const data of parser.push(decoder.decode(value, { stream: true }))) {
          if (data === "[DONE]") return;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new ApiError(500, chunk.error.message || "stream error");
          yield chunk;
        }
      }
    } finally {
      reader.releaseLock();
    }
    throw new ApiError(0, "the stream ended without [DONE]");
  }

  const isNum = (x) => typeof x === "number" && Number.isFinite(x);

  // Per-answer numbers. TTFT and tokens/s are measured here; token counts come from the final
  // usage chunk; speculation stats come from usage.spec_decode_stats (vLLM's shape) when the
  // server sends it, and stay null otherwise.
  function answerStats({ t0, tFirst, tEnd, usage }) {
    const stats = {
      ttft_s: tFirst === null ? null : (tFirst - t0) / 1000,
      completion_tokens: null, tokens_per_s: null,
      acceptance_length: null, num_drafts: null, num_accepted_tokens: null,
    };
    if (usage && isNum(usage.completion_tokens)) {
      stats.completion_tokens = usage.completion_tokens;
      const seconds = (tEnd - (tFirst === null ? t0 : tFirst)) / 1000;
      // Decode rate: the tokens after the first, over the time after the first.
      if (usage.completion_tokens > 1 && seconds > 0) {
        stats.tokens_per_s = (usage.completion_tokens - 1) / seconds;
      }
    }
    const spec = usage && usage.spec_decode_stats;
    if (spec && typeof spec === "object") {
      if (isNum(spec.num_drafts)) stats.num_drafts = spec.num_drafts;
      if (isNum(spec.num_accepted_tokens)) stats.num_accepted_tokens = spec.num_accepted_tokens;
      if (isNum(spec.mean_acceptance_length)) {
        stats.acceptance_length = spec.mean_acceptance_length;
      } else if (stats.num_drafts > 0 && stats.num_accepted_tokens !== null) {
        stats.acceptance_length = 1 + stats.num_accepted_tokens / stats.num_drafts;
      }
    }
    return stats;
  }

  SD.SSEParser = SSEParser;
  SD.ApiError = ApiError;
  SD.streamChat = streamChat;
  SD.answerStats = answerStats;
})(typeof window !== "undefined" ? (window.SD = window.SD || {}) : module.exports);
