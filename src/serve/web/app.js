// marrow review: the page of `marrow serve`. Plain JavaScript, no build step, no dependencies.
// The server is the source of truth: every change goes to it, is logged durably, and the page
// redraws from its answer (counts included, computed by the counting library, never here).
"use strict";

const $ = (id) => document.getElementById(id);
const S = {
  session: null, caseId: 0, kase: null, idx: -1, image: null, img: null,
  sel: null,            // {image, cell}
  filter: false, draw: false, gallery: false,
  zoom: 1, panX: 0, panY: 0,
  undo: [], redo: [], lastLabel: 1,
  views: {}, imgs: {},  // per image index: last view, loaded <img>
  busy: false,
};

// ---------------------------------------------------------------------------------------------
// Server calls

async function api(method, url, body, raw) {
  const opts = { method, headers: {} };
  if (raw !== undefined) { opts.body = raw; opts.headers["Content-Type"] = "application/octet-stream"; }
  else if (body !== undefined) { opts.body = JSON.stringify(body); opts.headers["Content-Type"] = "application/json"; }
  let r;
  try { r = await fetch(url, opts); } catch (e) { throw new Error("the server does not answer: is marrow serve still running?"); }
  let data = null;
  try { data = await r.json(); } catch (e) { /* not JSON */ }
  if (!r.ok) throw new Error((data && data.error) || `${r.status} ${r.statusText}`);
  return data;
}

let toastTimer = 0;
function toast(msg, ok) {
  const t = $("toast");
  t.textContent = msg; t.hidden = false; t.classList.toggle("ok", !!ok);
  clearTimeout(toastTimer); toastTimer = setTimeout(() => { t.hidden = true; }, ok ? 2500 : 6000);
}

function reviewer() { return $("reviewer").value.trim(); }
function needReviewer() {
  if (reviewer()) return true;
  toast("Enter your name (top right) first: every change is logged with the reviewer's name.");
  $("reviewer").focus();
  return false;
}

const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const rgb = (c) => `rgb(${c[0]},${c[1]},${c[2]})`;
const classOf = (label) => S.session.classes[label - 1] || { name: "class_" + label, colour: [128, 128, 128] };
const fmt1 = (x) => (Math.round(x * 10) / 10).toFixed(1);

// ---------------------------------------------------------------------------------------------
// Cells: what is uncertain, what the filter shows, the reading order

function uncertain(c) {
  // A model cell nobody has looked at yet whose confidence is near the counting threshold.
  return c.score != null && !c.changed && c.score < S.session.threshold + 0.15;
}
function shown(c) {
  if (!S.filter) return true;
  return uncertain(c) || !c.counted || c.deleted;
}
function ordered(view) {
  if (!view || !view.cells) return [];
  const cells = view.cells.filter((c) => shown(c) && !c.deleted);
  const hs = cells.map((c) => c.bbox[3] - c.bbox[1]).sort((a, b) => a - b);
  const row = Math.max(16, hs.length ? hs[Math.floor(hs.length / 2)] : 40);
  const key = (c) => [Math.floor((c.bbox[1] + c.bbox[3]) / 2 / row), (c.bbox[0] + c.bbox[2]) / 2];
  return cells.sort((a, b) => { const ka = key(a), kb = key(b); return ka[0] - kb[0] || ka[1] - kb[1]; });
}
function cellById(view, id) { return view && view.cells ? view.cells.find((c) => c.id === id) : null; }
function selectedCell() {
  if (!S.sel) return null;
  const v = S.sel.image === S.idx ? S.image : S.views[S.sel.image];
  return cellById(v, S.sel.cell);
}

// ---------------------------------------------------------------------------------------------
// Loading

async function loadSession() {
  S.session = await api("GET", "/api/session");
  $("notice").textContent = S.session.notice;
  const sel = $("case-select");
  sel.innerHTML = S.session.cases.map((c) => `<option value="${c.id}">${esc(c.name)}</option>`).join("");
  $("legend").innerHTML = S.session.classes.map((c) =>
    `<span><i style-colour="${c.label}"></i>${c.label} ${esc(c.name)}</span>`).join("") +
    `<span><i class="dash"></i>dashed: not counted</span>`;
  document.querySelectorAll("[style-colour]").forEach((el) => { el.style.background = rgb(classOf(+el.getAttribute("style-colour")).colour); });
  $("help-classes").innerHTML = S.session.classes.map((c) => `<kbd>${c.label}</kbd> ${esc(c.name)}`).join(" ");
  $("upload-limit").textContent = `up to ${Math.round(S.session.max_upload / 1048576)} MiB each`;
  $("reviewer").value = localStorage.getItem("marrow.reviewer") || "";
  $("provenance").textContent = `marrow ${S.session.version} · model ${S.session.model.file} (sha256 ${S.session.model.sha256.slice(0, 12)}…) · counted at score ≥ ${S.session.threshold}`;
}

function targetValue() {
  const v = parseInt($("target").value, 10);
  return Number.isFinite(v) && v > 0 ? v : (S.session.target || 200);
}

async function loadCase(id, keepImage) {
  S.caseId = id;
  $("case-select").value = String(id);
  const saved = localStorage.getItem(`marrow.target.${id}`);
  if (!keepImage) $("target").value = saved || S.session.target || 200;
  await refreshCase();
  if (!keepImage || S.idx < 0) {
    const first = S.kase.images.findIndex((im) => im.status.state === "done");
    await openImage(first >= 0 ? first : 0);
  }
}

async function refreshCase() {
  const k = await api("GET", `/api/cases/${S.caseId}?target=${targetValue()}`);
  const before = S.kase;
  S.kase = k;
  renderCase();
  // An image that finished counting since the last poll: load it if it is the one on screen.
  if (before && S.idx >= 0 && k.images[S.idx] && before.images[S.idx] &&
      before.images[S.idx].status.state !== "done" && k.images[S.idx].status.state === "done") {
    await openImage(S.idx, true);
  }
  if (S.idx < 0 && k.images.length) await openImage(0);
}

async function fetchView(i) {
  const v = await api("GET", `/api/cases/${S.caseId}/images/${i}`);
  S.views[i] = v;
  return v;
}

function loadImg(i) {
  if (S.imgs[i]) return S.imgs[i];
  S.imgs[i] = new Promise((resolve, reject) => {
    const im = new Image();
    im.onload = () => resolve(im);
    im.onerror = () => reject(new Error("the image could not be loaded"));
    im.src = `/api/cases/${S.caseId}/images/${i}/file`;
  });
  S.imgs[i].catch(() => { delete S.imgs[i]; });
  return S.imgs[i];
}

async function openImage(i, keepView) {
  if (!S.kase || i < 0 || i >= S.kase.images.length) return;
  const changed = i !== S.idx;
  S.idx = i;
  const entry = S.kase.images[i];
  renderList();
  $("image-name").textContent = entry.key;
  if (entry.status.state !== "done") {
    S.image = null; S.img = null;
    $("stage-msg").textContent = entry.status.state === "failed"
      ? `This field could not be counted: ${entry.status.error}`
      : "The model is counting this field…";
    renderImage(); draw();
    return;
  }
  $("stage-msg").textContent = "";
  const [view, img] = await Promise.all([fetchView(i), loadImg(i).catch((e) => { toast(e.message); return null; })]);
  if (i !== S.idx) return;
  S.image = view; S.img = img;
  if (changed && !keepView) { S.sel = null; fit(); }
  if (!keepView && changed) {
    const first = ordered(view)[0];
    if (first) S.sel = { image: i, cell: first.id };
  }
  renderImage(); draw();
  if (S.gallery) renderGallery();
}

// ---------------------------------------------------------------------------------------------
// Panels

function renderCase() {
  const k = S.kase;
  renderList();
  $("image-count").textContent = `${k.images.filter((i) => i.status.state === "done").length}/${k.images.length}`;
  $("refused").textContent = k.refused.length ? "Refused: " + k.refused.join("; ") : "";
  const q = k.queue;
  const pending = q.submitted - q.finished;
  $("queue-fill").style.width = q.submitted ? `${(100 * q.finished) / q.submitted}%` : "100%";
  $("queue-text").textContent = q.error ? `GPU unavailable: ${q.error}`
    : pending > 0 ? `counting ${q.finished + 1} of ${q.submitted}…` : `${q.finished} counted${q.failed ? `, ${q.failed} failed` : ""}`;
  // Tally
  const s = k.summary;
  const target = targetValue();
  $("case-total").textContent = s.total;
  const reached = s.total >= target;
  $("target-fill").style.width = `${Math.min(100, (100 * s.total) / target)}%`;
  $("target-fill").parentElement.classList.toggle("reached", reached);
  const ts = $("target-status");
  ts.textContent = reached ? `✓ Target reached (${s.total} ≥ ${target})` : `${target - s.total} more cells to reach ${target}`;
  ts.classList.toggle("reached", reached);
  let rows = `<tr><th>class</th><th>n</th><th>%</th><th>95 % CI</th></tr>`;
  for (const c of S.session.classes) {
    const n = s.counts[c.name] || 0, d = s.differential[c.name];
    rows += `<tr data-class="${esc(c.name)}"><td><i data-l="${c.label}"></i>${esc(c.name)}</td><td class="n">${n}</td>` +
      `<td>${fmt1(d.percent)}</td><td>${fmt1(d.ci95[0])}–${fmt1(d.ci95[1])}</td></tr>`;
  }
  $("differential").innerHTML = rows;
  paintSwatches($("differential"));
  $("me-ratio").textContent = s.me_ratio != null ? `M:E ratio ${s.me_ratio.toFixed(2)}`
    : (S.session.me_ratio_defined ? "M:E ratio: no erythroid cells counted yet" : "");
  const m = k.model_summary;
  $("model-said").textContent = `The model said ${m.total} cells (` +
    S.session.classes.map((c) => `${c.name} ${m.counts[c.name] || 0}`).join(", ") + `); ${k.audit_events} logged changes.`;
  // Sign-off
  const so = k.signoff;
  $("signoff-status").textContent = so ? `✓ Reviewed by ${so.reviewer}, ${so.time}` : "In review";
  $("signoff-status").classList.toggle("done", !!so);
  $("signoff-btn").hidden = !!so;
  $("reopen-btn").hidden = !so;
}

function paintSwatches(root) {
  root.querySelectorAll("i[data-l]").forEach((el) => { el.style.background = rgb(classOf(+el.dataset.l).colour); });
}

function renderList() {
  const k = S.kase;
  if (!k) return;
  const ol = $("image-list");
  ol.innerHTML = k.images.map((im) => {
    const st = im.status.state === "done" ? `${im.total}` : im.status.state === "failed" ? "failed" : im.status.state === "counting" ? "counting…" : "queued";
    const cls = [im.index === S.idx ? "current" : "", im.status.state === "failed" ? "failed" : "", im.changed ? "changed" : ""].join(" ");
    return `<li class="${cls}" data-i="${im.index}" title="${esc(im.key)}${im.status.error ? ": " + esc(im.status.error) : ""}"><span class="name">${esc(im.key.split("/").pop())}</span><span class="st">${st}</span></li>`;
  }).join("");
}

function renderImage() {
  const v = S.image;
  let rows = `<tr><th>class</th><th>key</th><th>n</th><th>model</th></tr>`;
  const counts = v && v.count ? v.count.counts : {};
  const model = {};
  if (v) for (const c of v.cells) if (c.model && c.model.counted) model[c.model.class] = (model[c.model.class] || 0) + 1;
  for (const c of S.session.classes) {
    rows += `<tr data-class="${esc(c.name)}"><td><i data-l="${c.label}"></i>${esc(c.name)}</td><td><kbd>${c.label}</kbd></td>` +
      `<td class="n">${counts[c.name] || 0}</td><td class="muted">${model[c.name] || 0}</td></tr>`;
  }
  rows += `<tr class="total"><td>total</td><td></td><td id="img-total">${v && v.count ? v.count.total : 0}</td><td></td></tr>`;
  $("image-counts").innerHTML = rows;
  paintSwatches($("image-counts"));
  renderCellInfo();
  $("filter-btn").classList.toggle("active", S.filter);
  $("draw-btn").classList.toggle("active", S.draw);
  $("gallery-btn").classList.toggle("active", S.gallery);
  $("view").classList.toggle("drawing", S.draw);
}

function renderCellInfo() {
  const c = selectedCell();
  if (!c) { $("cell-info").textContent = S.draw ? "Draw: drag a box around the missed cell (Esc to cancel)" : ""; return; }
  const bits = [`cell ${c.id}`, c.class, c.score != null ? `score ${c.score.toFixed(3)}` : "drawn by reviewer"];
  if (c.deleted) bits.push("DELETED (r restores)");
  else if (!c.counted) bits.push("not counted (a or a class key counts it)");
  if (uncertain(c)) bits.push("uncertain");
  if (c.changed && c.model) bits.push(`model said ${c.model.class}${c.model.counted ? "" : " (uncounted)"}`);
  $("cell-info").textContent = bits.join(" · ");
}

// ---------------------------------------------------------------------------------------------
// The field view: canvas, zoom and pan

const canvas = $("view");
const ctx = canvas.getContext("2d");

function size() {
  const r = canvas.getBoundingClientRect();
  const dpr = window.devicePixelRatio || 1;
  const w = Math.max(1, Math.round(r.width * dpr)), h = Math.max(1, Math.round(r.height * dpr));
  if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
  return { w: r.width, h: r.height, dpr };
}

function fit() {
  const { w, h } = size();
  const iw = S.image ? S.image.width : 1, ih = S.image ? S.image.height : 1;
  S.zoom = Math.min(w / iw, h / ih) * 0.98;
  S.panX = (w - iw * S.zoom) / 2; S.panY = (h - ih * S.zoom) / 2;
}
function zoomAt(f, sx, sy) {
  const z = Math.min(16, Math.max(0.05, S.zoom * f));
  S.panX = sx - ((sx - S.panX) * z) / S.zoom; S.panY = sy - ((sy - S.panY) * z) / S.zoom;
  S.zoom = z; draw();
}
function native() {
  const { w, h } = size();
  const c = selectedCell();
  const cx = c ? (c.bbox[0] + c.bbox[2]) / 2 : S.image ? S.image.width / 2 : 0;
  const cy = c ? (c.bbox[1] + c.bbox[3]) / 2 : S.image ? S.image.height / 2 : 0;
  S.zoom = 1 / (window.devicePixelRatio || 1);
  S.panX = w / 2 - cx * S.zoom; S.panY = h / 2 - cy * S.zoom; draw();
}
const toScreen = (x, y) => [x * S.zoom + S.panX, y * S.zoom + S.panY];
const toImage = (sx, sy) => [(sx - S.panX) / S.zoom, (sy - S.panY) / S.zoom];

function ensureVisible(c) {
  const { w, h } = size();
  const [x1, y1] = toScreen(c.bbox[0], c.bbox[1]);
  const [x2, y2] = toScreen(c.bbox[2], c.bbox[3]);
  const m = 40;
  if (x1 < m || y1 < m || x2 > w - m || y2 > h - m) {
    S.panX += w / 2 - (x1 + x2) / 2; S.panY += h / 2 - (y1 + y2) / 2;
  }
}

let drag = null; // {mode: "pan"|"draw", x0, y0, x, y, px, py}

function draw() {
  const { w, h, dpr } = size();
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  $("zoom-info").textContent = S.image ? `${Math.round(S.zoom * (window.devicePixelRatio || 1) * 100)} %` : "";
  if (!S.image || !S.img) return;
  ctx.imageSmoothingEnabled = S.zoom < 1;
  ctx.drawImage(S.img, S.panX, S.panY, S.image.width * S.zoom, S.image.height * S.zoom);
  const sel = selectedCell();
  for (const c of S.image.cells) {
    if (!shown(c)) continue;
    const [x1, y1] = toScreen(c.bbox[0], c.bbox[1]);
    const [x2, y2] = toScreen(c.bbox[2], c.bbox[3]);
    const col = rgb(classOf(c.label).colour);
    ctx.save();
    ctx.lineWidth = 2;
    if (c.deleted) {
      ctx.strokeStyle = "rgba(160,160,160,.7)"; ctx.setLineDash([3, 4]);
      ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
      ctx.beginPath(); ctx.moveTo(x1, y1); ctx.lineTo(x2, y2); ctx.moveTo(x2, y1); ctx.lineTo(x1, y2); ctx.stroke();
    } else {
      ctx.strokeStyle = col;
      if (!c.counted) ctx.setLineDash([6, 4]);
      ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
      if (uncertain(c)) {
        // Attention marker: a yellow corner flag with a question mark.
        ctx.setLineDash([]); ctx.fillStyle = "#f0e442";
        ctx.beginPath(); ctx.moveTo(x2, y1); ctx.lineTo(x2 - 12, y1); ctx.lineTo(x2, y1 + 12); ctx.closePath(); ctx.fill();
      }
      if (c.changed) {
        ctx.setLineDash([]); ctx.fillStyle = "#fff";
        ctx.beginPath(); ctx.arc(x1 + 4, y1 + 4, 3, 0, 7); ctx.fill();
      }
    }
    ctx.restore();
    if (sel && sel.id === c.id) {
      ctx.save(); ctx.lineWidth = 3; ctx.strokeStyle = "#fff"; ctx.shadowColor = "#000"; ctx.shadowBlur = 6;
      ctx.strokeRect(x1 - 4, y1 - 4, x2 - x1 + 8, y2 - y1 + 8); ctx.restore();
    }
  }
  if (drag && drag.mode === "draw") {
    ctx.save(); ctx.strokeStyle = "#fff"; ctx.setLineDash([5, 3]); ctx.lineWidth = 2;
    ctx.strokeRect(drag.x0, drag.y0, drag.x - drag.x0, drag.y - drag.y0); ctx.restore();
  }
}

function cellAt(sx, sy) {
  if (!S.image) return null;
  const [x, y] = toImage(sx, sy);
  let best = null, area = Infinity;
  for (const c of S.image.cells) {
    if (!shown(c)) continue;
    const [x1, y1, x2, y2] = c.bbox;
    if (x >= x1 && x <= x2 && y >= y1 && y <= y2) {
      const a = (x2 - x1) * (y2 - y1);
      if (a < area) { area = a; best = c; }
    }
  }
  return best;
}

// The mouse user's way to correct: a click on a cell offers its classes (the keys do the same).
function showPicker(c) {
  const p = $("picker");
  p.innerHTML = "";
  const add = (label, html, fn) => {
    const b = document.createElement("button");
    b.innerHTML = html; b.title = label;
    b.addEventListener("mousedown", (e) => e.stopPropagation());
    b.addEventListener("click", (e) => { e.stopPropagation(); hidePicker(); fn(); });
    p.appendChild(b);
    return b;
  };
  for (const cl of S.session.classes) {
    const b = add(`${cl.name} (${cl.label})`, `<i></i>${esc(cl.name)}`, () => editSelected({ op: "reclassify", label: cl.label }, false));
    b.querySelector("i").style.background = rgb(cl.colour);
  }
  if (c.deleted) add("restore (r)", "restore", () => editSelected({ op: "restore" }, false));
  else add("delete (x)", "delete", () => editSelected({ op: "delete" }, false));
  const [, y2] = toScreen(c.bbox[2], c.bbox[3]);
  const [x1] = toScreen(c.bbox[0], c.bbox[1]);
  p.style.left = `${Math.max(4, x1)}px`; p.style.top = `${y2 + 6}px`;
  p.hidden = false;
}
function hidePicker() { $("picker").hidden = true; }
document.addEventListener("keydown", hidePicker, true);

canvas.addEventListener("mousedown", (e) => {
  canvas.focus();
  hidePicker();
  const r = canvas.getBoundingClientRect();
  const sx = e.clientX - r.left, sy = e.clientY - r.top;
  drag = { mode: S.draw ? "draw" : "pan", x0: sx, y0: sy, x: sx, y: sy, px: S.panX, py: S.panY, moved: false };
});
window.addEventListener("mousemove", (e) => {
  const r = canvas.getBoundingClientRect();
  const sx = e.clientX - r.left, sy = e.clientY - r.top;
  if (drag) {
    drag.x = sx; drag.y = sy;
    if (Math.abs(sx - drag.x0) + Math.abs(sy - drag.y0) > 3) drag.moved = true;
    if (drag.mode === "pan") { S.panX = drag.px + sx - drag.x0; S.panY = drag.py + sy - drag.y0; }
    draw();
    return;
  }
  const tip = $("tip");
  if (e.target !== canvas) { tip.hidden = true; return; }
  const c = cellAt(sx, sy);
  if (!c) { tip.hidden = true; return; }
  tip.hidden = false;
  tip.textContent = `${c.class} · ${c.score != null ? "score " + c.score.toFixed(3) : "drawn"}${c.counted ? "" : " · not counted"}${c.deleted ? " · deleted" : ""}${uncertain(c) ? " · uncertain" : ""}`;
  tip.style.left = `${sx + 14}px`; tip.style.top = `${sy + 12}px`;
});
window.addEventListener("mouseup", async (e) => {
  if (!drag) return;
  const d = drag; drag = null;
  if (d.mode === "draw") {
    draw();
    const [ax, ay] = toImage(Math.min(d.x0, d.x), Math.min(d.y0, d.y));
    const [bx, by] = toImage(Math.max(d.x0, d.x), Math.max(d.y0, d.y));
    if (bx - ax >= 3 && by - ay >= 3) await addCell([ax, ay, bx, by]);
    return;
  }
  if (!d.moved) {
    const c = cellAt(d.x0, d.y0);
    S.sel = c ? { image: S.idx, cell: c.id } : null;
    renderCellInfo(); draw();
    if (c) showPicker(c);
  }
});
canvas.addEventListener("wheel", (e) => {
  e.preventDefault();
  const r = canvas.getBoundingClientRect();
  zoomAt(Math.exp(-e.deltaY * 0.0015), e.clientX - r.left, e.clientY - r.top);
}, { passive: false });
window.addEventListener("resize", () => draw());

// ---------------------------------------------------------------------------------------------
// Edits

function snap(c) { return { bbox: c.bbox, label: c.label, class: c.class, counted: c.counted, deleted: c.deleted }; }

async function send(imageIdx, body) {
  if (!needReviewer()) return null;
  if (S.kase && S.kase.signoff) { toast("The case is signed off: reopen it to make changes."); return null; }
  body.reviewer = reviewer();
  const v = await api("POST", `/api/cases/${S.caseId}/images/${imageIdx}/edit`, body);
  S.views[imageIdx] = v;
  if (imageIdx === S.idx) S.image = v;
  return v;
}

// One edit of the selected cell; records it for undo and moves on when `advance`.
async function editSelected(body, advance) {
  const c = selectedCell();
  if (!c || S.busy) return;
  const imageIdx = S.sel.image;
  // The next cell in the order as it was before the edit: a deleted or no longer uncertain
  // cell leaves the order, and the reviewer's place in it must not be lost.
  const before = S.gallery ? null : ordered(imageIdx === S.idx ? S.image : S.views[imageIdx]);
  const nextCell = before ? before[before.findIndex((x) => x.id === c.id) + 1] : null;
  S.busy = true;
  try {
    const v = await send(imageIdx, { ...body, cell: c.id, expect: snap(c) });
    if (!v) return;
    const after = cellById(v, c.id);
    if (after && JSON.stringify(snap(after)) !== JSON.stringify(snap(c))) {
      S.undo.push({ image: imageIdx, cell: c.id, before: snap(c), after: snap(after) });
      S.redo = [];
    }
    if (advance && S.gallery) galleryStep(1);
    else if (advance && nextCell) {
      S.sel = { image: imageIdx, cell: nextCell.id };
      ensureVisible(nextCell); renderImage(); draw();
    } else if (advance) await nextField(1);
    else { renderImage(); draw(); }
    afterEdit();
  } catch (e) {
    toast(e.message);
    // Refused (another tab changed the cell, the case was signed off…): show the server's state.
    if (imageIdx === S.idx) openImage(S.idx, true).catch(() => {});
  } finally { S.busy = false; }
}

async function addCell(bbox) {
  if (S.busy || !S.image) return;
  S.busy = true;
  try {
    const v = await send(S.idx, { op: "add", bbox, label: S.lastLabel });
    if (!v) return;
    const c = cellById(v, v.edited);
    S.undo.push({ image: S.idx, cell: v.edited, before: null, after: snap(c) });
    S.redo = [];
    S.sel = { image: S.idx, cell: v.edited };
    setDraw(false);
    renderImage(); draw(); afterEdit();
    toast(`Added a ${c.class} (press a number to change its class)`, true);
  } catch (e) { toast(e.message); } finally { S.busy = false; }
}

async function undoRedo(isUndo) {
  const from = isUndo ? S.undo : S.redo;
  const e = from[from.length - 1];
  if (!e || S.busy) return;
  S.busy = true;
  try {
    let body;
    if (e.before === null) body = isUndo ? { op: "delete", expect: e.after } : { op: "restore", expect: { ...e.after, deleted: true, counted: false } };
    else body = isUndo ? { op: "undo", to: e.before, expect: e.after } : { op: "redo", to: e.after, expect: e.before };
    const v = await send(e.image, { ...body, cell: e.cell });
    if (!v) return;
    from.pop();
    (isUndo ? S.redo : S.undo).push(e);
    if (e.image !== S.idx) await openImage(e.image, true);
    S.sel = { image: e.image, cell: e.cell };
    const c = selectedCell(); if (c) ensureVisible(c);
    renderImage(); draw(); afterEdit();
  } catch (err) { toast(err.message); } finally { S.busy = false; }
}

function afterEdit() {
  refreshCase().catch((e) => toast(e.message));
  if (S.gallery) renderGallery();
}

// ---------------------------------------------------------------------------------------------
// Navigation

async function step(dir) {
  if (S.gallery) return galleryStep(dir);
  const cells = ordered(S.image);
  const cur = S.sel && S.sel.image === S.idx ? cells.findIndex((c) => c.id === S.sel.cell) : -1;
  const next = cur < 0 ? (dir > 0 ? 0 : cells.length - 1) : cur + dir;
  if (next >= 0 && next < cells.length) {
    S.sel = { image: S.idx, cell: cells[next].id };
    ensureVisible(cells[next]);
    renderImage(); draw();
    return;
  }
  await nextField(dir);
}

// Past the last cell: on to the next counted field (the reviewer's flow through the case).
async function nextField(dir) {
  const done = S.kase.images.filter((im) => im.status.state === "done").map((im) => im.index);
  const pos = done.indexOf(S.idx);
  const to = done[pos + dir];
  if (to === undefined) { toast(dir > 0 ? "Last cell of the case." : "First cell of the case.", true); renderImage(); draw(); return; }
  await openImage(to);
  const cs = ordered(S.image);
  const c = dir > 0 ? cs[0] : cs[cs.length - 1];
  S.sel = c ? { image: to, cell: c.id } : null;
  if (c) ensureVisible(c);
  renderImage(); draw();
}

async function stepImage(dir) {
  if (!S.kase) return;
  const n = S.kase.images.length;
  const to = S.idx + dir;
  if (to >= 0 && to < n) await openImage(to);
}

function setDraw(on) { S.draw = on; if (on) S.sel = null; renderImage(); draw(); }

// ---------------------------------------------------------------------------------------------
// The gallery: every cell of the case, per class, side by side

let galleryOrder = [];
async function renderGallery() {
  const g = $("gallery");
  const done = S.kase.images.filter((im) => im.status.state === "done").map((im) => im.index);
  await Promise.all(done.map((i) => (S.views[i] && i !== S.idx ? S.views[i] : fetchView(i))));
  if (S.image) S.views[S.idx] = S.image;
  const byClass = S.session.classes.map(() => []);
  for (const i of done) {
    for (const c of S.views[i].cells) {
      if (c.deleted || !shown(c)) continue;
      (byClass[c.label - 1] || (byClass[c.label - 1] = [])).push({ image: i, c });
    }
  }
  galleryOrder = [];
  g.innerHTML = "";
  S.session.classes.forEach((cl, k) => {
    const items = byClass[k] || [];
    const h = document.createElement("h3");
    h.innerHTML = `<i></i>${cl.label} ${esc(cl.name)} <span class="muted">${items.filter((x) => x.c.counted).length} counted${items.some((x) => !x.c.counted) ? `, ${items.filter((x) => !x.c.counted).length} not counted` : ""}</span>`;
    h.querySelector("i").style.background = rgb(cl.colour);
    g.appendChild(h);
    const box = document.createElement("div");
    box.className = "crops";
    // Least confident first: the misclassified ones are most often there.
    items.sort((a, b) => (a.c.score ?? 1) - (b.c.score ?? 1));
    for (const it of items) {
      galleryOrder.push(it);
      const d = document.createElement("div");
      d.className = "crop" + (uncertain(it.c) ? " uncertain" : "") + (it.c.counted ? "" : " uncounted");
      if (S.sel && S.sel.image === it.image && S.sel.cell === it.c.id) d.classList.add("sel");
      d.title = `${S.kase.images[it.image].key} · ${it.c.id} · ${it.c.score != null ? "score " + it.c.score.toFixed(3) : "drawn"}`;
      d.dataset.image = it.image; d.dataset.cell = it.c.id;
      const cv = document.createElement("canvas");
      cv.width = 84; cv.height = 84;
      d.appendChild(cv);
      const sc = document.createElement("span"); sc.className = "sc";
      sc.textContent = it.c.score != null ? it.c.score.toFixed(2) : "drawn";
      d.appendChild(sc);
      d.addEventListener("click", () => { S.sel = { image: it.image, cell: it.c.id }; markGallerySel(); renderCellInfo(); });
      box.appendChild(d);
      loadImg(it.image).then((img) => {
        const [x1, y1, x2, y2] = it.c.bbox;
        const side = Math.max(x2 - x1, y2 - y1) * 1.25;
        const cx = (x1 + x2) / 2, cy = (y1 + y2) / 2;
        const c2 = cv.getContext("2d");
        c2.fillStyle = "#000"; c2.fillRect(0, 0, 84, 84);
        c2.drawImage(img, cx - side / 2, cy - side / 2, side, side, 0, 0, 84, 84);
      }).catch(() => {});
    }
    g.appendChild(box);
  });
  markGallerySel();
}
function markGallerySel() {
  document.querySelectorAll(".crop.sel").forEach((el) => el.classList.remove("sel"));
  if (!S.sel) return;
  const el = document.querySelector(`.crop[data-image="${S.sel.image}"][data-cell="${S.sel.cell}"]`);
  if (el) { el.classList.add("sel"); el.scrollIntoView({ block: "nearest" }); }
}
function galleryStep(dir) {
  if (!galleryOrder.length) return;
  const cur = S.sel ? galleryOrder.findIndex((x) => x.image === S.sel.image && x.c.id === S.sel.cell) : -1;
  const next = Math.min(galleryOrder.length - 1, Math.max(0, cur < 0 ? 0 : cur + dir));
  S.sel = { image: galleryOrder[next].image, cell: galleryOrder[next].c.id };
  markGallerySel(); renderCellInfo();
}
async function toggleGallery(on) {
  S.gallery = on;
  $("gallery").hidden = !on;
  renderImage();
  if (on) await renderGallery(); else draw();
}

// ---------------------------------------------------------------------------------------------
// Keyboard: a reviewer of 500 cells should rarely need the mouse

document.addEventListener("keydown", async (e) => {
  const inField = e.target instanceof HTMLInputElement || e.target instanceof HTMLSelectElement;
  if (inField) {
    if (e.key === "Enter" || e.key === "Escape") { e.target.blur(); canvas.focus(); }
    return;
  }
  if (!$("help").hidden) { if (e.key === "Escape" || e.key === "?") $("help").hidden = true; return; }
  const k = e.key;
  const ctrl = e.ctrlKey || e.metaKey;
  if (ctrl && (k === "z" || k === "Z")) { e.preventDefault(); return undoRedo(!e.shiftKey); }
  if (ctrl && (k === "y" || k === "Y")) { e.preventDefault(); return undoRedo(false); }
  if (ctrl || e.altKey) return;
  const n = parseInt(k, 10);
  if (n >= 1 && n <= S.session.classes.length) {
    e.preventDefault();
    S.lastLabel = n;
    return editSelected({ op: "reclassify", label: n }, true);
  }
  switch (k) {
    case "Tab": e.preventDefault(); return step(e.shiftKey ? -1 : 1);
    case "ArrowRight": case "n": e.preventDefault(); return step(1);
    case "ArrowLeft": case "p": e.preventDefault(); return step(-1);
    case "]": case "PageDown": e.preventDefault(); return stepImage(1);
    case "[": case "PageUp": e.preventDefault(); return stepImage(-1);
    case "a": case "Enter": e.preventDefault(); return editSelected({ op: "accept" }, true);
    case "x": case "Delete": case "Backspace": e.preventDefault(); return editSelected({ op: "delete" }, true);
    case "r": return editSelected({ op: "restore" }, false);
    case "u": return undoRedo(true);
    case "U": return undoRedo(false);
    case "b": return setDraw(!S.draw);
    case "f": S.filter = !S.filter; renderImage(); draw(); if (S.gallery) renderGallery(); return;
    case "g": return toggleGallery(!S.gallery);
    case "0": fit(); return draw();
    case "z": return native();
    case "+": case "=": { const { w, h } = size(); return zoomAt(1.25, w / 2, h / 2); }
    case "-": { const { w, h } = size(); return zoomAt(0.8, w / 2, h / 2); }
    case "?": $("help").hidden = false; return;
    case "Escape":
      if (S.draw) return setDraw(false);
      if (S.gallery) return toggleGallery(false);
      S.sel = null; renderCellInfo(); return draw();
    default:
  }
});

// ---------------------------------------------------------------------------------------------
// Uploads

async function upload(files) {
  const ul = $("upload-messages");
  for (const f of files) {
    const li = document.createElement("li");
    li.textContent = `${f.name}: uploading…`;
    ul.prepend(li);
    if (f.size > S.session.max_upload) {
      li.className = "error";
      li.textContent = `${f.name}: ${(f.size / 1048576).toFixed(1)} MiB is larger than the upload limit of ${Math.round(S.session.max_upload / 1048576)} MiB`;
      continue;
    }
    try {
      const r = await api("POST", `/api/cases/${S.caseId}/upload?name=${encodeURIComponent(f.name)}&reviewer=${encodeURIComponent(reviewer())}`, undefined, f);
      li.className = "ok";
      li.textContent = `${f.name}: ${r.duplicate ? "already in the case" : "added, queued for counting"}`;
    } catch (e) {
      li.className = "error";
      li.textContent = e.message;
    }
  }
  await refreshCase();
}

const drop = $("drop");
window.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
window.addEventListener("dragleave", (e) => { if (!e.relatedTarget) drop.classList.remove("over"); });
window.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer && e.dataTransfer.files.length) upload([...e.dataTransfer.files]);
});
$("file-input").addEventListener("change", (e) => { upload([...e.target.files]); e.target.value = ""; });
// A folder chosen in the browser: its images, in name order (other files are skipped).
$("folder-input").addEventListener("change", (e) => {
  const files = [...e.target.files]
    .filter((f) => /\.(png|jpe?g|tiff?|bmp)$/i.test(f.name) && !/(^|\/)\./.test(f.webkitRelativePath || f.name))
    .sort((a, b) => (a.webkitRelativePath || a.name).localeCompare(b.webkitRelativePath || b.name));
  if (!files.length) toast("No images (PNG, JPEG, TIFF, BMP) in that folder.");
  upload(files);
  e.target.value = "";
});
// After a click on a button the keys belong to the review again (Enter must not re-press it).
document.addEventListener("click", (e) => { if (e.target.closest("button")) canvas.focus(); });

// ---------------------------------------------------------------------------------------------
// Buttons, sign-off, export

$("image-list").addEventListener("click", (e) => {
  const li = e.target.closest("li[data-i]");
  if (li) openImage(+li.dataset.i);
});
$("case-select").addEventListener("change", (e) => {
  S.idx = -1; S.views = {}; S.imgs = {}; S.undo = []; S.redo = [];
  loadCase(+e.target.value).catch((err) => toast(err.message));
});
$("reviewer").addEventListener("input", (e) => localStorage.setItem("marrow.reviewer", e.target.value.trim()));
$("target").addEventListener("change", () => { localStorage.setItem(`marrow.target.${S.caseId}`, String(targetValue())); refreshCase(); });
$("fit-btn").onclick = () => { fit(); draw(); };
$("native-btn").onclick = () => native();
$("filter-btn").onclick = () => { S.filter = !S.filter; renderImage(); draw(); if (S.gallery) renderGallery(); };
$("draw-btn").onclick = () => setDraw(!S.draw);
$("gallery-btn").onclick = () => toggleGallery(!S.gallery);
$("undo-btn").onclick = () => undoRedo(true);
$("redo-btn").onclick = () => undoRedo(false);
$("help-btn").onclick = () => { $("help").hidden = false; };
$("help-close").onclick = () => { $("help").hidden = true; };
$("signoff-btn").onclick = async () => {
  if (!needReviewer()) return;
  try {
    await api("POST", `/api/cases/${S.caseId}/signoff`, { reviewer: reviewer() });
    await refreshCase();
    toast(`Case marked reviewed by ${reviewer()}`, true);
  } catch (e) { toast(e.message); }
};
$("reopen-btn").onclick = async () => {
  try { await api("POST", `/api/cases/${S.caseId}/reopen`, { reviewer: reviewer() }); await refreshCase(); } catch (e) { toast(e.message); }
};
document.querySelectorAll("[data-export]").forEach((b) => {
  b.onclick = async () => {
    const ul = $("export-messages");
    const li = document.createElement("li");
    try {
      const r = await api("POST", `/api/cases/${S.caseId}/export`, { format: b.dataset.export, target: targetValue() });
      li.className = "ok";
      li.textContent = `Wrote ${r.files.length > 3 ? r.files.length + " files under exports/" : r.files.join(", ")} in ${r.folder.replace(/\/exports$/, "")}`;
      if (r.download) {
        const a = document.createElement("a");
        a.href = r.download; a.download = r.download.split("/").pop();
        document.body.appendChild(a); a.click(); a.remove();
      }
    } catch (e) { li.className = "error"; li.textContent = e.message; }
    ul.prepend(li);
  };
});

// ---------------------------------------------------------------------------------------------
// Start, and poll the queue

async function poll() {
  try { if (S.kase) await refreshCase(); } catch (e) { /* the toast would nag; the queue text says it */ $("queue-text").textContent = "server not answering"; }
  setTimeout(poll, 1500);
}

async function start() {
  try {
    await loadSession();
    await loadCase(0);
    canvas.focus();
    window.marrow.ready = true;
  } catch (e) {
    $("stage-msg").textContent = e.message;
  }
  setTimeout(poll, 1500);
}

// For the browser test and for the curious: read-only access to the page's state.
window.marrow = { S, toScreen, toImage, ordered, ready: false };
start();
