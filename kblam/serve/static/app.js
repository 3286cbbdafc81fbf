// The kblam page: ask the KB, import a file, browse, search and edit triples. Plain DOM, no build step.
// KB text is only ever set as textContent, never parsed as HTML.
"use strict";

const state = { key: sessionStorage.getItem("kblam-key") || "", offset: 0, limit: 20, q: "", version: null };
const $ = (id) => document.getElementById(id);

function el(tag, text, attrs = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.key) headers.set("Authorization", "Bearer " + state.key);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (err) {
    throw new Error("the server could not be reached (" + err.message + ")");
  }
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json().catch(() => null) : await response.text();
  if (!response.ok) {
    if (response.status === 401) {
      $("key-panel").hidden = false;
      $("api-key").focus();
    }
    const message = body && body.error && body.error.message ? body.error.message
      : `the server answered ${response.status} ${response.statusText}`;
    const error = new Error(message);
    error.status = response.status;
    error.body = body;
    throw error;
  }
  return body;
}

function showError(what, err) {
  const box = $("error");
  box.textContent = `${what}: ${err.message}`;
  box.hidden = false;
}

function clearMessages() {
  $("error").hidden = true;
  $("error").textContent = "";
  $("notice").textContent = "";
}

function notice(text) {
  $("notice").textContent = text;
}

function tripleLabel(t) {
  return `${t.name} · ${t.property}`;
}

// --- the KB's state -------------------------------------------------------------------------------

async function loadInfo() {
  const info = await api("/v1/kb");
  state.version = info.version;
  $("kb-status").textContent = `${info.size.toLocaleString()} triples · version ${info.version} · ` +
    `encoder ${info.encoder} · model ${info.base_model}`;
}

async function loadTriples() {
  const params = new URLSearchParams({ offset: state.offset, limit: state.limit });
  if (state.q) params.set("q", state.q);
  const page = await api("/v1/kb/triples?" + params);
  state.version = page.version;
  const body = $("triples").querySelector("tbody");
  body.replaceChildren();
  for (const t of page.triples) body.append(tripleRow(t));
  if (!page.triples.length) {
    const row = el("tr");
    row.append(el("td", state.q ? `No triple matches “${state.q}”.` : "The knowledge base is empty: import a file.",
      { colspan: "4" }));
    body.append(row);
  }
  const last = Math.min(page.offset + page.triples.length, page.total);
  $("page-info").textContent = page.total
    ? `${page.offset + 1}–${last} of ${page.total.toLocaleString()}${state.q ? ` matching “${state.q}”` : ""}`
    : "";
  $("prev").disabled = page.offset === 0;
  $("next").disabled = last >= page.total;
}

async function refresh() {
  try {
    await Promise.all([loadInfo(), loadTriples()]);
  } catch (err) {
    showError("Could not read the knowledge base", err);
  }
}

function tripleRow(t) {
  const row = el("tr");
  row.dataset.name = t.name;
  row.dataset.property = t.property;
  const value = el("td", t.value, { class: "value" });
  row.append(el("td", t.name), el("td", t.property), value);
  const actions = el("td", null, { class: "actions" });
  const edit = el("button", "Edit", { type: "button", class: "secondary", "aria-label": `Edit ${tripleLabel(t)}` });
  const remove = el("button", "Delete", { type: "button", class: "danger", "aria-label": `Delete ${tripleLabel(t)}` });
  edit.addEventListener("click", () => startEdit(t, value, edit));
  remove.addEventListener("click", () => removeTriple(t));
  actions.append(edit, remove);
  row.append(actions);
  return row;
}

function startEdit(t, cell, editButton) {
  const form = el("form", null, { class: "edit" });
  const input = el("input", null, { "aria-label": `New value for ${tripleLabel(t)}`, required: "" });
  input.value = t.value;
  const save = el("button", "Save", { type: "submit" });
  const cancel = el("button", "Cancel", { type: "button", class: "secondary" });
  const restore = () => {
    cell.replaceChildren(document.createTextNode(t.value));
    editButton.disabled = false;
    editButton.focus();
  };
  cancel.addEventListener("click", restore);
  input.addEventListener("keydown", (event) => {
    if (event.key === "Escape") restore();
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearMessages();
    save.disabled = true;
    try {
      const done = await api("/v1/kb/triples", {
        method: "PATCH",
        headers: { "Content-Type": "application/json", "If-Match": `"${state.version}"` },
        body: JSON.stringify({ name: t.name, property: t.property, value: input.value }),
      });
      notice(`Saved: ${tripleLabel(t)} is now “${input.value.trim()}” (version ${done.version}).`);
      await refresh();
    } catch (err) {
      save.disabled = false;
      if (err.status === 412) {
        showError("Not saved", new Error("the knowledge base changed since this list was read; the list " +
          "was read again, so make the change once more"));
        await refresh();
      } else {
        showError("Not saved", err);
      }
    }
  });
  form.append(input, save, cancel);
  cell.replaceChildren(form);
  editButton.disabled = true;
  input.focus();
  input.select();
}

async function removeTriple(t) {
  if (!window.confirm(`Delete ${tripleLabel(t)} = “${t.value}”?`)) return;
  clearMessages();
  try {
    const params = new URLSearchParams({ name: t.name, property: t.property });
    const done = await api("/v1/kb/triples?" + params, {
      method: "DELETE", headers: { "If-Match": `"${state.version}"` },
    });
    notice(`Deleted ${tripleLabel(t)} (version ${done.version}).`);
    await refresh();
  } catch (err) {
    showError("Not deleted", err);
  }
}

// --- asking ---------------------------------------------------------------------------------------

function renderAnswer(answer) {
  const box = $("answer");
  box.hidden = false;
  box.classList.toggle("refused", answer.refused);
  $("answer-text").textContent = answer.text;
  const meta = [];
  if (answer.confidence !== null) meta.push(`confidence ${answer.confidence.toFixed(2)}`);
  if (answer.refused) meta.push("the knowledge base does not hold this (refused)");
  if (answer.quoted.length) meta.push("quotes " + answer.quoted.map((t) => `${tripleLabel(t)} = ${t.value}`).join("; "));
  meta.push(`read version ${answer.kb_version}`);
  $("answer-meta").textContent = meta.join(" · ");

  const body = $("sources").querySelector("tbody");
  body.replaceChildren();
  for (const s of answer.sources) {
    const row = el("tr");
    const share = s.score === null ? "–" : (100 * s.score).toFixed(1) + "%";
    row.append(el("td", s.name), el("td", s.property), el("td", s.value), el("td", share, { class: "num" }));
    body.append(row);
  }
  drawChart(answer.sources);
}

function drawChart(sources) {
  const svg = $("chart");
  const ns = "http://www.w3.org/2000/svg";
  const rowHeight = 26, labelWidth = 300, barWidth = 260, width = 640;
  svg.replaceChildren();
  const height = Math.max(rowHeight, rowHeight * sources.length);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const top = Math.max(...sources.map((s) => s.score || 0), 1e-9);
  sources.forEach((s, i) => {
    const y = i * rowHeight;
    const node = (tag, attrs, text) => {
      const n = document.createElementNS(ns, tag);
      for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
      if (text !== undefined) n.textContent = text;
      svg.append(n);
      return n;
    };
    let label = `${s.name} · ${s.property} = ${s.value}`;
    if (label.length > 42) label = label.slice(0, 41) + "…";
    node("text", { x: 0, y: y + 17 }, label);
    node("rect", { class: "track", x: labelWidth, y: y + 5, width: barWidth, height: 16, rx: 3 });
    node("rect", { class: "bar", x: labelWidth, y: y + 5, width: (barWidth * (s.score || 0)) / top, height: 16, rx: 3 });
    node("text", { x: labelWidth + barWidth + 8, y: y + 17 }, s.score === null ? "–" : (100 * s.score).toFixed(1) + "%");
  });
  svg.setAttribute("aria-label", "KB attention by triple: " +
    sources.map((s) => `${tripleLabel(s)} ${(100 * (s.score || 0)).toFixed(1)}%`).join(", "));
}

$("ask-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  clearMessages();
  const question = $("question").value.trim();
  if (!question) return;
  const button = $("ask-button");
  button.disabled = true;
  button.textContent = "Asking…";
  try {
    const result = await api("/v1/ask", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ question, max_sources: 5 }),
    });
    renderAnswer(result.answers[0]);
  } catch (err) {
    showError("No answer", err);
  } finally {
    button.disabled = false;
    button.textContent = "Ask";
  }
});

// --- editing the KB -------------------------------------------------------------------------------

$("upload-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  clearMessages();
  const file = $("kb-file").files[0];
  if (!file) return;
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const done = await api("/v1/kb/import", { method: "POST", body: form });
    notice(`Imported ${file.name}: ${done.triples_in_file.toLocaleString()} triples in the file, ` +
      `${done.changed.toLocaleString()} new or changed; the knowledge base holds ${done.size.toLocaleString()} ` +
      `(version ${done.version}).`);
    state.offset = 0;
    await refresh();
  } catch (err) {
    showError(`${file.name} was not imported`, err);
  }
});

$("search-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  clearMessages();
  state.q = $("search").value.trim();
  state.offset = 0;
  try {
    await loadTriples();
  } catch (err) {
    showError("Search failed", err);
  }
});

$("add-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  clearMessages();
  const form = event.target;
  const triple = { name: form.name.value, property: form.property.value, value: form.value.value };
  try {
    const done = await api("/v1/kb/triples", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(triple),
    });
    notice(done.added ? `Added ${tripleLabel(triple)} (version ${done.version}).`
      : `${tripleLabel(triple)} was already there with that value.`);
    form.reset();
    await refresh();
  } catch (err) {
    showError("Not added", err);
  }
});

$("prev").addEventListener("click", () => {
  state.offset = Math.max(0, state.offset - state.limit);
  loadTriples().catch((err) => showError("Could not read the knowledge base", err));
});
$("next").addEventListener("click", () => {
  state.offset += state.limit;
  loadTriples().catch((err) => showError("Could not read the knowledge base", err));
});

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = $("api-key").value.trim();
  sessionStorage.setItem("kblam-key", state.key);
  $("key-panel").hidden = true;
  clearMessages();
  refresh();
});

$("export").addEventListener("click", async (event) => {
  if (!state.key) return; // a plain link works without a key
  event.preventDefault(); // with a key the download goes through fetch, which sends it
  try {
    const response = await fetch("/v1/kb/export?format=csv", { headers: { Authorization: "Bearer " + state.key } });
    if (!response.ok) throw new Error(`the server answered ${response.status}`);
    const link = el("a", null, { href: URL.createObjectURL(await response.blob()), download: "kb.csv" });
    link.click();
    URL.revokeObjectURL(link.href);
  } catch (err) {
    showError("Could not download the triples", err);
  }
});

refresh();
