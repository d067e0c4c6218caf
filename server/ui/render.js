// Markdown to sanitized DOM. Model output is untrusted: raw HTML in it is shown as text,
// images are not loaded, and the result passes DOMPurify with a short allowlist before it
// reaches the page. User messages never come here (the page sets them as textContent).
(function (SD) {
  "use strict";

  const ALLOWED_TAGS = ["p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "strong", "em",
    "del", "code", "pre", "blockquote", "ul", "ol", "li", "a", "table", "thead", "tbody", "tr",
    "th", "td", "span"];
  const ALLOWED_ATTR = ["href", "title", "class", "start", "align"];
  const SAFE_URI = /^(?:https?:|mailto:|#)/i;

  const escapeHtml = (s) => String(s).replace(/[&<>"']/g, (c) => (
    { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

  const md = new window.marked.Marked({ gfm: true, breaks: true });
  md.use({
    renderer: {
      // Raw HTML (block or inline) becomes visible text, never markup.
      html(token) {
        const text = escapeHtml(token.text);
        return token.block ? `<p>${text}</p>` : text;
      },
      // No remote loads: an image is shown as its Markdown source.
      image(token) { return escapeHtml(`![${token.text}](${token.href})`); },
    },
  });

  function sanitize(html, tags, attrs) {
    return window.DOMPurify.sanitize(html, {
      ALLOWED_TAGS: tags, ALLOWED_ATTR: attrs, ALLOWED_URI_REGEXP: SAFE_URI,
      ALLOW_DATA_ATTR: false, RETURN_DOM_FRAGMENT: true,
    });
  }

  function highlight(code, auto) {
    const match = /(?:^|\s)language-([\w+#.-]+)/.exec(code.className);
    const lang = match && window.hljs.getLanguage(match[1]) ? match[1] : null;
    if (!lang && !auto) return;
    const source = code.textContent;
    let result;
    try {
      result = lang ? window.hljs.highlight(source, { language: lang, ignoreIllegals: true })
        : window.hljs.highlightAuto(source);
    } catch (_) {
      return; // leave the plain text
    }
    // highlight.js escapes its input; its spans are sanitized again all the same.
    code.replaceChildren(sanitize(result.value, ["span"], ["class"]));
    code.classList.add("hljs");
  }

  async function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return;
    }
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    if (!ok) throw new Error("copy failed");
  }

  function copyButton(getText, label = "Copy") {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = label;
    button.addEventListener("click", async () => {
      try {
        await copyText(getText());
        button.textContent = "Copied";
      } catch (_) {
        button.textContent = "Copy failed";
      }
      setTimeout(() => { button.textContent = label; }, 1500);
    });
    return button;
  }

  // Markdown text -> a sanitized DocumentFragment. `final` also auto-detects the language of
  // unlabelled code blocks (too slow to redo on every streamed frame).
  function renderMarkdown(text, final) {
    const fragment = sanitize(md.parse(text), ALLOWED_TAGS, ALLOWED_ATTR);
    for (const a of fragment.querySelectorAll("a")) {
      a.target = "_blank";
      a.rel = "noopener noreferrer";
    }
    for (const code of fragment.querySelectorAll("pre > code")) {
      highlight(code, final);
      const button = copyButton(() => code.textContent);
      button.className = "copy-code";
      code.parentElement.append(button);
    }
    return fragment;
  }

  SD.renderMarkdown = renderMarkdown;
  SD.copyButton = copyButton;
})(window.SD = window.SD || {});
