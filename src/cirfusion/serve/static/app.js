// cirfusion search page: plain DOM and fetch, no framework. Every text from the server is set with textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { ref: null, turns: [], galleryOffset: 0, galleryFilter: "" };
const PAGE = 48;

function el(tag, props = {}, children = []) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "text") e.textContent = v;
    else if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function setStatus(msg, isError = false) {
  $("status").textContent = msg;
  $("status").className = isError ? "error" : "";
}

async function api(path, options) {
  const r = await fetch(path, options);
  let body = null;
  try { body = await r.json(); } catch (_) { body = null; }
  if (!r.ok) throw new Error((body && body.detail) || `${r.status} ${r.statusText}`);
  return body;
}

function thumbUrl(id) { return "/api/images/" + id.split("/").map(encodeURIComponent).join("/") + "?size=thumb"; }

function setReference(ref) {
  state.ref = ref;
  const box = $("reference");
  box.replaceChildren();
  const src = ref.kind === "upload" ? ref.url : thumbUrl(ref.id);
  const label = ref.kind === "upload" ? `uploaded: ${ref.file.name}` : `gallery image ${ref.id}`;
  box.append(el("img", { src, alt: "current reference: " + label, id: "reference-img" }),
             el("p", { id: "reference-label", text: label }));
  if (ref.kind !== "upload") $("upload").value = "";
}

function galleryItem(item) {
  return el("li", {}, [el("button", {
    type: "button", "data-id": item.id, title: "use " + item.id + " as the reference",
    onclick: () => { setReference({ kind: "gallery", id: item.id }); $("text").focus(); },
  }, [el("img", { src: item.thumbnail, alt: item.id, loading: "lazy" }), el("span", { class: "id", text: item.id })])]);
}

async function loadGallery(reset) {
  if (reset) { state.galleryOffset = 0; $("gallery").replaceChildren(); }
  const q = new URLSearchParams({ offset: state.galleryOffset, limit: PAGE, q: state.galleryFilter });
  try {
    const page = await api("/api/gallery?" + q);
    page.items.forEach((it) => $("gallery").append(galleryItem(it)));
    state.galleryOffset += page.items.length;
    $("more").hidden = state.galleryOffset >= page.total;
  } catch (e) { setStatus(e.message, true); }
}

function renderResults(res) {
  const list = $("results");
  list.replaceChildren();
  res.results.forEach((r, i) => {
    list.append(el("li", {}, [el("button", {
      type: "button", class: "result", "data-id": r.id, title: "refine from " + r.id,
      onclick: () => { setReference({ kind: "gallery", id: r.id }); search(); },
    }, [el("img", { src: r.thumbnail, alt: `result ${i + 1}: ${r.id}` }),
        el("span", { class: "score", text: `#${i + 1}  ${r.score.toFixed(4)}` }), el("br"),
        el("span", { class: "id", text: r.id })])]));
  });
}

function fmt(x) { return (x >= 0 ? "+" : "") + x.toFixed(4); }

function renderExplanation(ex) {
  const body = $("explanation-body");
  body.replaceChildren();
  if (!ex || !ex.kind) return;
  body.append(el("p", { class: "hint", id: "explanation-label", text: `${ex.method}: ${ex.label || ex.kind}` }));
  if (ex.kind === "shapley") {
    const models = ex.models;
    if (ex.gate_weights) {
      body.append(el("p", { text: "Gate weight of each model for this query: " +
        models.map((m) => `${m} ${ex.gate_weights[m].toFixed(3)}`).join(", ") }));
    }
    const head = el("tr", {}, [el("th", { text: "result" }), el("th", { text: "fused score" }),
      el("th", { text: "baseline" }), ...models.map((m) => el("th", { scope: "col", text: m }))]);
    const rows = ex.results.map((r) => el("tr", {}, [el("td", { text: r.id }), el("td", { text: r.score.toFixed(4) }),
      el("td", { text: ex.baseline.toFixed(4) }),
      ...models.map((m) => el("td", { class: r.contributions[m] >= 0 ? "pos" : "neg", text: fmt(r.contributions[m]) }))]));
    body.append(el("table", { id: "shapley-table" }, [el("caption", { text:
      "Each model's exact Shapley contribution: baseline + contributions = fused score" }), el("thead", {}, [head]),
      el("tbody", {}, rows)]));
  } else {
    const rest = Object.entries(ex).filter(([k]) => !["kind", "method", "label"].includes(k));
    if (rest.length) {
      body.append(el("dl", {}, rest.flatMap(([k, v]) => [el("dt", { text: k }),
        el("dd", { text: typeof v === "string" ? v : JSON.stringify(v) })])));
    }
  }
}

function addTurn(ref, text, res) {
  const src = ref.kind === "upload" ? ref.url : thumbUrl(ref.id);
  const name = ref.kind === "upload" ? ref.file.name : ref.id;
  const top = res.results.length ? res.results[0].id : "nothing";
  state.turns.push({ name, text });
  $("history").append(el("li", {}, [el("img", { src, alt: "" }),
    el("span", { text: `${name} + “${text}” → top: ${top}` })]));
}

async function search() {
  const ref = state.ref;
  const text = $("text").value.trim();
  if (!ref) { setStatus("Pick a reference from the gallery or upload a photo first.", true); return; }
  if (!text) { setStatus("Type what should change.", true); $("text").focus(); return; }
  const form = new FormData();
  if (ref.kind === "upload") form.append("image", ref.file); else form.append("reference", ref.id);
  form.append("text", text);
  form.append("k", $("k").value);
  form.append("keep_reference", $("keep").checked ? "true" : "false");
  setStatus("Searching…");
  $("go").disabled = true;
  try {
    const res = await api("/api/search", { method: "POST", body: form });
    renderResults(res);
    renderExplanation(res.explanation);
    addTurn(ref, text, res);
    const note = res.reference.id && res.reference.excluded ? ` (the reference, ${res.reference.id}, is left out)` : "";
    setStatus(`${res.results.length} results in ${res.took_ms} ms${note}.`);
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    $("go").disabled = false;
  }
}

$("search-form").addEventListener("submit", (ev) => { ev.preventDefault(); search(); });
$("upload").addEventListener("change", () => {
  const f = $("upload").files[0];
  if (f) setReference({ kind: "upload", file: f, url: URL.createObjectURL(f) });
});
$("browse-form").addEventListener("submit", (ev) => { ev.preventDefault(); state.galleryFilter = $("filter").value; loadGallery(true); });
$("more").addEventListener("click", () => loadGallery(false));

api("/api/info").then((info) => {
  $("info").textContent = `${info.model} on ${info.backbone} · ${info.gallery_size} images · ` +
    `explanations: ${info.explanation === "shapley" ? "exact Shapley contributions" : "similarity"}`;
}).catch((e) => { $("info").textContent = e.message; });
loadGallery(true);
