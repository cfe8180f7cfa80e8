// A small, safe Markdown renderer for chat messages.
//
// Safety rule: every piece of text is HTML-escaped FIRST; the only markup in the result is the
// fixed set of tags added below (p, br, pre, code, strong, em, h3-h5, ul, ol, li, a). Links are
// kept only for http(s) URLs, so "javascript:" and "data:" never become clickable, and no
// attribute ever holds an unescaped character. Model output and user text go through here only.
"use strict";

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

// Placeholders keep finished pieces (code spans, links) out of later replacements. \u0000 cannot
// come from the input: it is stripped before anything else.
function stash(store, html) {
  store.push(html);
  return "\u0000" + (store.length - 1) + "\u0000";
}

function unstash(store, text) {
  return text.replace(/\u0000(\d+)\u0000/g, (_, i) => store[Number(i)]);
}

function renderInline(raw) {
  const store = [];
  // Code spans first: nothing inside them is formatted.
  let text = raw.replace(/`([^`\n]+)`/g, (_, code) => stash(store, "<code>" + escapeHtml(code) + "</code>"));
  text = escapeHtml(text);
  // [label](http://...) on already-escaped text; a URL holding a quote, "<" or ">" is no link at all.
  text = text.replace(/\[([^\]\n]+)\]\((https?:\/\/(?:(?!&quot;|&#39;|&lt;|&gt;)[^\s()])+)\)/gi, (_, label, url) =>
    stash(store, '<a href="' + url + '" target="_blank" rel="noopener noreferrer">' + label + "</a>"));
  text = text.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>");
  text = text.replace(/__([^_\n]+)__/g, "<strong>$1</strong>");
  text = text.replace(/(^|[^*\w])\*([^*\s][^*\n]*?)\*(?![*\w])/g, "$1<em>$2</em>");
  text = text.replace(/(^|[^_\w])_([^_\s][^_\n]*?)_(?![_\w])/g, "$1<em>$2</em>");
  return unstash(store, text);
}

// Lines of one non-code block -> paragraphs, headings and lists.
function renderBlocks(lines) {
  const out = [];
  let para = [];
  let list = null; // {tag: "ul"|"ol", items: []}
  const flushPara = () => {
    if (para.length) out.push("<p>" + para.map(renderInline).join("<br>") + "</p>");
    para = [];
  };
  const flushList = () => {
    if (list) out.push("<" + list.tag + ">" + list.items.map((i) => "<li>" + renderInline(i) + "</li>").join("") +
                       "</" + list.tag + ">");
    list = null;
  };
  for (const line of lines) {
    const heading = /^(#{1,6})\s+(.*)$/.exec(line);
    const bullet = /^\s*[-*+]\s+(.*)$/.exec(line);
    const numbered = /^\s*\d+[.)]\s+(.*)$/.exec(line);
    if (!line.trim()) {
      flushPara();
      flushList();
    } else if (heading) {
      flushPara();
      flushList();
      const level = Math.min(heading[1].length + 2, 5); // h3..h5: smaller than the page's own titles
      out.push("<h" + level + ">" + renderInline(heading[2]) + "</h" + level + ">");
    } else if (bullet || numbered) {
      flushPara();
      const tag = bullet ? "ul" : "ol";
      if (list && list.tag !== tag) flushList();
      if (!list) list = { tag, items: [] };
      list.items.push((bullet || numbered)[1]);
    } else if (list && /^\s{2,}\S/.test(line)) {
      list.items[list.items.length - 1] += " " + line.trim(); // a wrapped list item
    } else {
      flushList();
      para.push(line);
    }
  }
  flushPara();
  flushList();
  return out.join("");
}

// The whole message. An unclosed ``` fence (while an answer is still streaming) runs to the end.
function renderMarkdown(source) {
  const lines = String(source).replace(/\u0000/g, "").replace(/\r\n?/g, "\n").split("\n");
  const out = [];
  let text = [];
  let code = null; // {lang, lines} while inside a fence
  for (const line of lines) {
    const fence = /^\s*```\s*([\w+#.-]*)\s*$/.exec(line) || /^\s*```/.exec(line);
    if (code) {
      if (/^\s*```\s*$/.test(line)) {
        out.push(codeBlock(code));
        code = null;
      } else {
        code.lines.push(line);
      }
    } else if (fence) {
      out.push(renderBlocks(text));
      text = [];
      code = { lang: fence[1] || "", lines: [] };
    } else {
      text.push(line);
    }
  }
  if (code) out.push(codeBlock(code));
  out.push(renderBlocks(text));
  return out.join("");
}

function codeBlock(code) {
  const lang = code.lang ? ' data-lang="' + escapeHtml(code.lang) + '"' : "";
  return "<pre" + lang + "><code>" + escapeHtml(code.lines.join("\n")) + "</code></pre>";
}

window.renderMarkdown = renderMarkdown;
window.escapeHtml = escapeHtml;
