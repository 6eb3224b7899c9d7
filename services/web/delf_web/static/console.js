// The DELF web console: plain JavaScript over the HTTP API (/api/v1), no dependencies.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { file: null, box: null, natural: null, results: null, pageToken: "", tokens: [] };

function headers() {
  const token = $("token").value.trim();
  return token ? { Authorization: "Bearer " + token } : {};
}

function notice(text) {
  const el = $("notice");
  el.textContent = text || "";
  el.hidden = !text;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json() : await response.blob();
  if (!response.ok) {
    const err = body && body.error ? body.error : { code: String(response.status), message: response.statusText };
    throw new Error(`${err.code}: ${err.message}`);
  }
  return body;
}

async function blobUrl(path) {
  const blob = await api(path);
  return URL.createObjectURL(blob);
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function parsePairs(text) {
  const out = {};
  for (const part of text.split(",").map((s) => s.trim()).filter(Boolean)) {
    const i = part.indexOf("=");
    if (i < 1) throw new Error(`expected key=value, not "${part}"`);
    out[part.slice(0, i).trim()] = part.slice(i + 1).trim();
  }
  return out;
}

// ------------------------------------------------------------------ views

function show(view) {
  for (const b of document.querySelectorAll("nav button")) {
    if (b.dataset.view === view) b.setAttribute("aria-current", "page"); else b.removeAttribute("aria-current");
  }
  for (const s of document.querySelectorAll("main > section")) s.hidden = s.id !== "view-" + view;
  notice("");
  if (view === "collection" && !$("collection").children.length) loadPage("");
  if (view === "stats") loadStats();
  $("h-" + view).focus({ preventScroll: true });
}

// ------------------------------------------------------------------ search

function choose(file) {
  if (!file) return;
  state.file = file;
  state.box = null;
  $("box").hidden = true;
  $("search-box").value = "";
  const img = $("query-img");
  img.onload = () => { state.natural = [img.naturalWidth, img.naturalHeight]; };
  img.src = URL.createObjectURL(file);
  img.alt = "The query photo: " + file.name;
  $("query-wrap").hidden = false;
}

function setupBox() {
  const wrap = $("query-wrap"), box = $("box");
  let start = null;
  const at = (e) => { const r = wrap.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; };
  wrap.addEventListener("mousedown", (e) => { start = at(e); e.preventDefault(); });
  window.addEventListener("mousemove", (e) => {
    if (!start) return;
    const [x, y] = at(e);
    Object.assign(box.style, { left: Math.min(x, start[0]) + "px", top: Math.min(y, start[1]) + "px",
      width: Math.abs(x - start[0]) + "px", height: Math.abs(y - start[1]) + "px" });
    box.hidden = false;
  });
  window.addEventListener("mouseup", (e) => {
    if (!start) return;
    const [x, y] = at(e), img = $("query-img");
    const sx = state.natural[0] / img.clientWidth, sy = state.natural[1] / img.clientHeight;
    const b = [Math.min(x, start[0]) * sx, Math.min(y, start[1]) * sy, Math.max(x, start[0]) * sx,
      Math.max(y, start[1]) * sy].map((v) => Math.round(v));
    start = null;
    if (b[2] - b[0] < 8 || b[3] - b[1] < 8) { box.hidden = true; state.box = null; $("search-box").value = ""; return; }
    state.box = b;
    $("search-box").value = b.join(",");
  });
}

async function search(correspondences) {
  if (!state.file) { notice("Choose a photo first."); return null; }
  const form = new FormData();
  form.append("photo", state.file);
  form.append("top_k", $("top-k").value || "10");
  const region = $("search-box").value.trim();  // drawn on the photo, or typed
  state.box = region ? region.split(",").map(Number) : null;
  if (region) form.append("box", region);
  for (const [k, v] of Object.entries(parsePairs($("search-filter").value))) form.append("filter", `${k}=${v}`);
  form.append("correspondences", correspondences ? "true" : "false");
  return api("/api/v1/search", { method: "POST", body: form });
}

async function runSearch(event) {
  event.preventDefault();
  notice("");
  $("search-status").textContent = "Searching…";
  $("results").replaceChildren();
  try {
    const reply = await search($("search-corr").checked);
    if (!reply) return;
    state.results = reply;
    $("search-status").textContent = `${reply.matches.length} matches (${reply.query_features} query features, ` +
      `${reply.elapsed_s.toFixed(2)} s)` + (state.box ? ", region " + state.box.join(",") : "");
    reply.matches.forEach((m, i) => $("results").append(matchCard(m, i)));
  } catch (err) {
    $("search-status").textContent = "";
    notice(err.message);
  }
}

function matchCard(m, rank) {
  const img = el("img", { alt: `Thumbnail of ${m.image_id}` });
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("aria-hidden", "true");
  const thumb = el("div", { class: "thumb" }, img, svg);
  const mark = m.verified ? el("span", { class: "verified", text: "✔ verified" })
    : el("span", { class: "unverified", text: "not verified" });
  const button = el("button", { type: "button", text: "Show correspondences" });
  button.addEventListener("click", () => showEvidence(m.image_id, img));
  const meta = Object.entries(m.metadata).map(([k, v]) => `${k}: ${v}`).join(", ");
  const li = el("li", { "data-image-id": m.image_id, "data-verified": String(m.verified) },
    el("div", { class: "id", text: `${rank + 1}. ${m.image_id}` }), thumb,
    el("div", { text: `score ${m.score.toFixed(3)} · ${m.inliers} inliers · ` }, mark),
    el("div", { class: "meta", text: meta }), el("div", { class: "row" }, button));
  li.lastChild.append(deleteButton(m.image_id, li, $("search-status")));
  blobUrl(m.thumbnail).then((url) => { img.src = url; }).catch(() => { img.alt = `No thumbnail for ${m.image_id}`; });
  if (m.corners.length === 4) outline(svg, img, m);
  return li;
}

async function outline(svg, img, m) {
  // corners are pixels of the indexed photo as submitted; the thumbnail is that photo scaled down
  const info = await api("/api/v1/images/" + encodeURIComponent(m.image_id)).catch(() => null);
  if (!info || !info.width) return;
  svg.setAttribute("viewBox", `0 0 ${info.width} ${info.height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const polygon = document.createElementNS("http://www.w3.org/2000/svg", "polygon");
  polygon.setAttribute("points", m.corners.map((p) => `${p.x},${p.y}`).join(" "));
  polygon.setAttribute("class", "outline");
  svg.append(polygon);
  svg.dataset.outlined = "true";
  svg.closest("li").dataset.outlined = "true";
}

async function showEvidence(imageId, thumbImg) {
  try {
    let reply = state.results;
    let m = reply && reply.matches.find((x) => x.image_id === imageId);
    if (!m || !m.correspondences) {
      $("search-status").textContent = "Asking for the correspondences…";
      reply = await search(true);
      state.results = reply;
      m = reply.matches.find((x) => x.image_id === imageId);
      $("search-status").textContent = "";
    }
    const info = await api("/api/v1/images/" + encodeURIComponent(imageId));
    drawEvidence(m, info, thumbImg);
  } catch (err) {
    notice(err.message);
  }
}

function drawEvidence(m, info, thumbImg) {
  const q = $("query-img"), canvas = $("evidence-canvas"), h = 320;
  const qs = h / state.natural[1], ts = h / info.height;
  const qw = state.natural[0] * qs, tw = info.width * ts;
  canvas.width = qw + 20 + tw;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(q, 0, 0, qw, h);
  ctx.drawImage(thumbImg, qw + 20, 0, tw, h);
  const pairs = (m && m.correspondences) || [];
  let inliers = 0;
  for (const c of pairs) {
    if (c.inlier) inliers += 1;
    ctx.strokeStyle = c.inlier ? "rgba(26,255,90,.9)" : "rgba(255,60,60,.25)";
    ctx.lineWidth = c.inlier ? 1.5 : 1;
    ctx.beginPath();
    ctx.moveTo(c.query.x * qs, c.query.y * qs);
    ctx.lineTo(qw + 20 + c.indexed.x * ts, c.indexed.y * ts);
    ctx.stroke();
  }
  $("evidence-title").textContent = `Correspondences with ${m ? m.image_id : "?"}: ${inliers} inliers (green) ` +
    `of ${pairs.length}`;
  $("evidence").hidden = false;
  $("evidence-close").focus();
}

// ------------------------------------------------------------------ collection

async function loadPage(token) {
  $("collection-status").textContent = "Loading…";
  const params = new URLSearchParams({ page_size: $("collection-size").value || "24" });
  if (token) params.set("page_token", token);
  try {
    for (const [k, v] of Object.entries(parsePairs($("collection-filter").value))) params.append("filter", `${k}=${v}`);
    const page = await api("/api/v1/images?" + params);
    $("collection").replaceChildren(...page.images.map(imageCard));
    state.pageToken = page.next_page_token;
    $("page-next").disabled = !page.next_page_token;
    $("collection-status").textContent = `${page.images.length} images` + (token ? ` after ${token}` : "");
  } catch (err) {
    $("collection-status").textContent = "";
    notice(err.message);
  }
}

function imageCard(info) {
  const img = el("img", { alt: `Thumbnail of ${info.image_id}` });
  blobUrl(info.thumbnail).then((url) => { img.src = url; }).catch(() => { img.alt = `No thumbnail for ${info.image_id}`; });
  const li = el("li", { "data-image-id": info.image_id }, el("div", { class: "thumb" }, img),
    el("div", { class: "id", text: info.image_id }),
    el("div", { class: "meta", text: `${info.width}×${info.height}, ${info.num_features} features` }),
    el("div", { class: "meta", text: Object.entries(info.metadata).map(([k, v]) => `${k}: ${v}`).join(", ") }));
  li.append(deleteButton(info.image_id, li, $("collection-status")));
  return li;
}

function deleteButton(imageId, li, status) {
  const del = el("button", { type: "button", text: "Delete", "aria-label": `Delete ${imageId}` });
  del.addEventListener("click", async () => {
    if (!window.confirm(`Delete ${imageId} from the index?`)) return;
    try {
      await api("/api/v1/images/" + encodeURIComponent(imageId), { method: "DELETE" });
      li.remove();
      status.textContent = `Deleted ${imageId}`;
    } catch (err) { notice(err.message); }
  });
  return del;
}

// ------------------------------------------------------------------ ingest

async function startJob(event) {
  event.preventDefault();
  notice("");
  const form = new FormData();
  for (const f of $("ingest-photos").files) form.append("photos", f);
  if ($("ingest-manifest").files[0]) form.append("manifest", $("ingest-manifest").files[0]);
  form.append("urls", $("ingest-urls").value);
  $("ingest-errors").replaceChildren();
  $("ingest-status").textContent = "Sending…";
  try {
    const extra = parsePairs($("ingest-metadata").value);
    if (Object.keys(extra).length) form.append("metadata", JSON.stringify(extra));
    const job = await api("/api/v1/jobs", { method: "POST", body: form });
    $("ingest-cancel").disabled = false;
    $("ingest-cancel").onclick = () => api(`/api/v1/jobs/${job.job_id}/cancel`, { method: "POST" }).catch((e) => notice(e.message));
    follow(job.job_id);
  } catch (err) {
    $("ingest-status").textContent = "";
    notice(err.message);
  }
}

async function follow(jobId) {
  for (;;) {
    let job;
    try { job = await api("/api/v1/jobs/" + jobId); } catch (err) { notice(err.message); return; }
    const finished = job.done + job.failed;
    $("ingest-progress").max = Math.max(job.total, 1);
    $("ingest-progress").value = finished;
    $("ingest-status").textContent = `Job ${jobId}: ${job.state.toLowerCase()}, ${job.done} indexed, ` +
      `${job.failed} failed of ${job.total}` + (job.stalled ? ` (stalled: ${job.hint})` : "");
    $("ingest-errors").replaceChildren(...job.errors.map((e) => el("li", { text: `${e.image_id}: ${e.reason}` })));
    if (job.state === "COMPLETED" || job.state === "CANCELLED") {
      $("ingest-cancel").disabled = true;
      $("ingest-status").dataset.state = job.state;
      return;
    }
    await new Promise((r) => setTimeout(r, 700));
  }
}

// ------------------------------------------------------------------ stats

async function loadStats() {
  try {
    const [stats, health] = await Promise.all([api("/api/v1/stats"), fetch("/api/v1/health").then((r) => r.json())]);
    const rows = [["Images", stats.images], ["Descriptors", stats.descriptors], ["Model", stats.model],
      ["PCA", stats.pca_id || "none"], ["Gateway", health.gateway],
      ...Object.entries(stats.queue_depths).map(([q, n]) => [`Queue ${q}`, n])];
    $("stats").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: String(v) })]));
  } catch (err) { notice(err.message); }
}

// ------------------------------------------------------------------ wiring

function wire() {
  for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => show(b.dataset.view));
  for (const id of ["h-search", "h-collection", "h-ingest", "h-stats"]) $(id).tabIndex = -1;
  $("token").value = sessionStorage.getItem("delf-token") || "";
  $("token").addEventListener("change", () => sessionStorage.setItem("delf-token", $("token").value.trim()));
  $("photo").addEventListener("change", () => choose($("photo").files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); choose(e.dataTransfer.files[0]); });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("photo").click(); } });
  setupBox();
  $("clear-box").addEventListener("click", () => { state.box = null; $("box").hidden = true; $("search-box").value = ""; });
  $("search-form").addEventListener("submit", runSearch);
  $("evidence-close").addEventListener("click", () => { $("evidence").hidden = true; });
  $("collection-form").addEventListener("submit", (e) => { e.preventDefault(); loadPage(""); });
  $("page-first").addEventListener("click", () => loadPage(""));
  $("page-next").addEventListener("click", () => loadPage(state.pageToken));
  $("ingest-form").addEventListener("submit", startJob);
  $("stats-refresh").addEventListener("click", loadStats);
}

document.addEventListener("DOMContentLoaded", wire);
