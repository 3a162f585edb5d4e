// brainscan web page: submit scans, follow jobs, read results. Plain DOM, no framework, no build.
// Everything from the server or the user (file names, errors) goes in via textContent, never HTML.
"use strict";

const CLASSES = ["glioma", "meningioma", "notumor", "pituitary"];
const KEY_STORAGE = "brainscan.apiKey";
const POLL_MS = 1000;
const JOBS_PER_LOAD = 5;
const FLAG_TEXT = { uncertain: "uncertain", out_of_scope: "out of scope" };

const $ = (selector, root = document) => root.querySelector(selector);
// job id -> {element, timer, finished, expanded, offset, limit, filter, sort, job, seq}
const jobs = new Map();
let olderJobsOffset = 0;
let viewerUrls = [];

function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  headers.set("Authorization", `Bearer ${apiKey()}`);
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    setKeyStatus("The API key was refused: paste a valid one.", true);
  }
  return response;
}

async function problem(response) {
  try {
    const body = await response.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch {
    return `HTTP ${response.status}`;
  }
}

function setKeyStatus(text, bad = false) {
  const status = $("#key-status");
  status.textContent = text;
  status.classList.toggle("error", bad);
}

// A flag as a CSS class name: the known ones, anything else from the server as "other".
function flagClass(flag) {
  return Object.hasOwn(FLAG_TEXT, flag) ? flag : "other";
}

function percent(p) {
  return `${(100 * p).toFixed(1)}%`;
}

// -- key -------------------------------------------------------------------------------------------

async function onKeySaved() {
  if (!apiKey()) {
    setKeyStatus("No key saved: paste one to start.");
    return;
  }
  setKeyStatus("Key saved in this browser.");
  const response = await api("/v1/models");
  if (response.ok) {
    const model = await response.json();
    $("#model").textContent = `model: ${model.name} ${model.version}`;
  }
  loadRecentJobs();
}

function setupKey() {
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("#key").value.trim();
    if (value) {
      localStorage.setItem(KEY_STORAGE, value);
      $("#key").value = "";
      onKeySaved();
    }
  });
  $("#forget-key").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORAGE);
    setKeyStatus("Key forgotten.");
  });
  onKeySaved();
}

// -- upload ----------------------------------------------------------------------------------------

async function submit(files) {
  if (!files.length) return;
  const status = $("#upload-status");
  if (!apiKey()) {
    status.textContent = "Save an API key first.";
    return;
  }
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  status.textContent = `Uploading ${files.length} file(s)…`;
  try {
    const response = await api("/v1/jobs", { method: "POST", body: form });
    if (!response.ok) {
      status.textContent = `Upload refused: ${await problem(response)}`;
      return;
    }
    const accepted = await response.json();
    status.textContent = `Job ${accepted.id} accepted: ${accepted.total} scan(s).`;
    follow(accepted.id, { atTop: true, expanded: true });
  } catch (error) {
    status.textContent = `Upload failed: ${error.message}`;
  }
}

function setupUpload() {
  const drop = $("#drop");
  const input = $("#files");
  input.addEventListener("change", () => {
    submit([...input.files]);
    input.value = "";
  });
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") input.click();
  });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    submit([...event.dataTransfer.files]);
  });
}

// -- jobs ------------------------------------------------------------------------------------------
// Opening the page lists the recent jobs as summaries (counts only); only the newest shows its rows,
// one page of them at a time. Other jobs load their rows when opened with "Show results".

async function listJobs(offset) {
  const response = await api(`/v1/jobs?limit=${JOBS_PER_LOAD}&offset=${offset}`);
  if (!response.ok) return null;
  return response.json();
}

function showOlderButton(loadedUpTo, total) {
  olderJobsOffset = Math.max(olderJobsOffset, loadedUpTo);
  $("#older-jobs").hidden = olderJobsOffset >= total;
}

async function loadRecentJobs() {
  const list = await listJobs(0);
  if (!list) return;
  const anyExpanded = [...jobs.values()].some((state) => state.expanded);
  // Newest first from the API; prepended oldest first so that the newest ends on top.
  [...list.jobs].reverse().forEach((job) => {
    const newest = job.id === list.jobs[0].id;
    follow(job.id, { atTop: true, expanded: newest && !anyExpanded });
  });
  showOlderButton(list.jobs.length, list.page.total);
}

async function loadOlderJobs() {
  const list = await listJobs(olderJobsOffset);
  if (!list) return;
  for (const job of list.jobs) follow(job.id, { atTop: false, expanded: false });
  showOlderButton(olderJobsOffset + list.jobs.length, list.page.total);
}

function follow(jobId, { atTop, expanded }) {
  if (jobs.has(jobId)) return;
  const element = $("#job-template").content.firstElementChild.cloneNode(true);
  element.dataset.jobId = jobId;
  $(".job-id", element).textContent = jobId;
  const state = {
    element,
    timer: null,
    finished: false,
    expanded,
    offset: 0,
    limit: Number($(".page-size", element).value),
    filter: "all",
    sort: "position",
    job: null,
    seq: 0,
  };
  jobs.set(jobId, state);
  $(".csv", element).addEventListener("click", () => downloadCsv(jobId));
  $(".toggle", element).addEventListener("click", () => {
    state.expanded = !state.expanded;
    refresh(jobId);
  });
  $(".prev", element).addEventListener("click", () => {
    state.offset = Math.max(0, state.offset - state.limit);
    refresh(jobId);
  });
  $(".next", element).addEventListener("click", () => {
    const next = state.job && state.job.page ? state.job.page.next_offset : null;
    if (next != null) {
      state.offset = next;
      refresh(jobId);
    }
  });
  $(".page-size", element).addEventListener("change", (event) => {
    state.limit = Number(event.target.value);
    state.offset = Math.floor(state.offset / state.limit) * state.limit;
    refresh(jobId);
  });
  $(".filter", element).addEventListener("change", (event) => {
    state.filter = event.target.value;
    if (state.job) render(state);
  });
  $(".sort", element).addEventListener("change", (event) => {
    state.sort = event.target.value;
    if (state.job) render(state);
  });
  if (atTop) $("#jobs").prepend(element);
  else $("#jobs").append(element);
  refresh(jobId);
}

// Fetch the job (counts only when collapsed, one page of items when open), render it, and poll again
// while it is not finished. A newer call supersedes an older one still in flight (seq).
async function refresh(jobId) {
  const state = jobs.get(jobId);
  clearTimeout(state.timer);
  state.timer = null;
  const seq = ++state.seq;
  const limit = state.expanded ? state.limit : 0;
  const offset = state.expanded ? state.offset : 0;
  try {
    const response = await api(`/v1/jobs/${encodeURIComponent(jobId)}?offset=${offset}&limit=${limit}`);
    if (seq !== state.seq) return;
    if (response.ok) {
      const job = await response.json();
      if (seq !== state.seq) return;
      state.job = job;
      state.finished = job.finished;
      render(state);
    } else if (response.status === 404) {
      $(".counts", state.element).textContent = "not found for this key";
      state.finished = true;
    }
  } catch (error) {
    if (seq !== state.seq) return;
    $(".counts", state.element).textContent = `connection problem (${error.message}); retrying`;
  }
  if (!state.finished) state.timer = setTimeout(() => refresh(jobId), POLL_MS);
}

function render(state) {
  const { element, job } = state;
  const status = $(".status", element);
  status.textContent = job.status;
  status.className = `status badge ${job.status}`;
  element.dataset.status = job.status;
  element.dataset.finished = String(job.finished);
  element.dataset.total = String(job.total);
  const model = job.model && job.model.name ? ` · model ${job.model.name} ${job.model.version}` : "";
  $(".counts", element).textContent =
    `${job.done + job.failed}/${job.total} finished · ${job.done} scored · ${job.failed} failed${model}`;
  renderFlagCounts($(".flag-counts", element), job.flags);
  const progress = $(".progress", element);
  progress.max = Math.max(job.total, 1);
  progress.value = job.done + job.failed;

  const toggle = $(".toggle", element);
  toggle.textContent = state.expanded ? "Hide results" : "Show results";
  element.dataset.expanded = String(state.expanded);
  const panel = $(".results-panel", element);
  panel.hidden = !state.expanded;
  const body = $("tbody", element);
  if (!state.expanded) {
    body.replaceChildren();
    return;
  }
  const items = job.items || [];
  const page = job.page || { offset: state.offset, returned: items.length, next_offset: null };
  $(".page-info", element).textContent = items.length
    ? `positions ${items[0].position}-${items[items.length - 1].position} of ${job.total} scans`
    : job.total
      ? `no scans from position ${page.offset} (the job has ${job.total})`
      : "no scans";
  $(".prev", element).disabled = page.offset === 0;
  $(".next", element).disabled = page.next_offset == null;

  const shown = arrange(items, state.filter, state.sort);
  body.replaceChildren(...shown.map(row));
  $(".shown", element).textContent =
    shown.length === items.length
      ? ""
      : `Showing ${shown.length} of the ${items.length} rows on this page (filter: ${filterName(state.filter)}).`;
}

function renderFlagCounts(target, flags) {
  // Jobs scored before flags existed carry no "flags" object: show nothing rather than zeros.
  if (!flags) {
    target.replaceChildren();
    return;
  }
  const parts = [];
  for (const [flag, text] of Object.entries(FLAG_TEXT)) {
    const count = Number(flags[flag] || 0);
    const badge = document.createElement("span");
    badge.className = `flag-badge ${flag}${count ? "" : " zero"}`;
    badge.dataset.flag = flag;
    badge.textContent = `${count} ${text}`;
    parts.push(badge);
  }
  target.replaceChildren(...parts);
}

function filterName(filter) {
  return { flagged: "any flag", uncertain: "uncertain", out_of_scope: "out of scope", unflagged: "no flag" }[filter];
}

// The confidence a row shows: none for an out-of-scope scan (its label is withheld).
function shownConfidence(item) {
  if (item.flag === "out_of_scope" || item.confidence == null) return null;
  return Number(item.confidence);
}

function arrange(items, filter, sort) {
  const keep = {
    all: () => true,
    flagged: (item) => Boolean(item.flag),
    uncertain: (item) => item.flag === "uncertain",
    out_of_scope: (item) => item.flag === "out_of_scope",
    unflagged: (item) => !item.flag,
  }[filter];
  const rows = items.filter(keep);
  if (sort === "position") return rows;
  const sign = sort === "confidence-asc" ? 1 : -1;
  // Rows without a confidence (failed, pending, out of scope) go last either way.
  return rows.sort((a, b) => {
    const ca = shownConfidence(a);
    const cb = shownConfidence(b);
    if (ca == null || cb == null) return (ca == null) - (cb == null) || a.position - b.position;
    return sign * (ca - cb) || a.position - b.position;
  });
}

function cell(text, className) {
  const td = document.createElement("td");
  if (className) td.className = className;
  td.textContent = text == null ? "" : String(text);
  return td;
}

function labelCell(item) {
  if (item.error) return cell(item.error, "label error");
  if (item.flag === "out_of_scope") {
    const td = cell("no label", "label withheld");
    td.title = "Out of scope: the model gives no label for this image.";
    return td;
  }
  return cell(item.label || "", "label");
}

function flagCell(item) {
  const td = cell("", "flag");
  if (!item.flag) return td;
  const badge = document.createElement("span");
  badge.className = `flag-badge ${flagClass(item.flag)}`;
  badge.textContent = FLAG_TEXT[flagClass(item.flag)] || String(item.flag);
  td.append(badge);
  if (item.flag_reason) {
    // The reason texts start with the flag ("out of scope: ..."): the badge already says that.
    const prefix = `${badge.textContent}: `;
    const reason = document.createElement("span");
    reason.className = "reason";
    reason.textContent = item.flag_reason.startsWith(prefix) ? item.flag_reason.slice(prefix.length) : item.flag_reason;
    td.append(reason);
  }
  return td;
}

function scopeCell(item) {
  if (item.scope_score == null) return cell("", "scope");
  const td = cell(Number(item.scope_score).toFixed(2), "scope");
  if (item.scope_score > 1) td.classList.add("beyond");
  return td;
}

function row(item) {
  const tr = document.createElement("tr");
  tr.dataset.itemId = String(item.id);
  tr.dataset.position = String(item.position);
  tr.dataset.flag = item.flag || "";
  if (item.flag) tr.classList.add(`flag-${flagClass(item.flag)}`);
  const confidence = shownConfidence(item);
  tr.append(
    cell(item.position, "position"),
    cell(item.filename, "file"),
    cell(item.source_ref || "", "ref"),
    cell(item.status, "item-status"),
    labelCell(item),
    cell(confidence == null ? "" : percent(confidence), "confidence"),
    flagCell(item),
    scopeCell(item),
  );
  const probs = document.createElement("td");
  probs.className = "probabilities";
  if (item.probabilities) {
    probs.append(bars(item.probabilities));
    if (item.flag === "out_of_scope") probs.title = "Kept for audit only: not a result.";
  }
  tr.append(probs);
  const actions = document.createElement("td");
  if (item.sha256) {
    const view = document.createElement("button");
    view.type = "button";
    view.className = "view secondary small";
    view.textContent = "View";
    view.addEventListener("click", () => openViewer(item));
    actions.append(view);
  }
  tr.append(actions);
  return tr;
}

function bars(probabilities) {
  const grid = document.createElement("div");
  grid.className = "bars";
  for (const name of CLASSES) {
    const p = Number(probabilities[name] || 0);
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = name;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = `fill ${name}`;
    fill.style.display = "block";
    fill.style.width = `${Math.max(0, Math.min(1, p)) * 100}%`;
    track.append(fill);
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = percent(p);
    grid.append(label, track, pct);
  }
  return grid;
}

// -- viewer and CSV --------------------------------------------------------------------------------

// Fetch an image with the key; returns the response (200: its blob is shown in `img`).
async function imageInto(img, path, polls = 30) {
  let response = await api(path);
  // 202: a worker is computing it (Grad-CAM); ask again after the server's Retry-After.
  while (response.status === 202 && polls-- > 0) {
    const wait = Number(response.headers.get("Retry-After")) || 2;
    await new Promise((resolve) => setTimeout(resolve, wait * 1000));
    response = await api(path);
  }
  if (response.status !== 200) return response;
  const url = URL.createObjectURL(await response.blob());
  viewerUrls.push(url);
  img.src = url;
  return response;
}

function viewerResult(item) {
  if (item.error) return item.error;
  if (item.flag === "out_of_scope") return `No label - ${item.flag_reason || "out of scope"}`;
  if (!item.label) return item.status;
  const text = `${item.label}, confidence ${percent(item.confidence)}`;
  return item.flag === "uncertain" ? `${text} - ${item.flag_reason || "uncertain"}` : text;
}

function setOpacity(value) {
  $("#viewer-cam").style.opacity = String(value / 100);
  $("#viewer-opacity-value").textContent = `${value}%`;
}

async function openViewer(item) {
  const dialog = $("#viewer");
  for (const url of viewerUrls) URL.revokeObjectURL(url);
  viewerUrls = [];
  $("#viewer-title").textContent = item.source_ref ? `${item.filename} (${item.source_ref})` : item.filename;
  const result = $("#viewer-result");
  result.textContent = viewerResult(item);
  result.className = item.flag ? `flag-${flagClass(item.flag)}` : "";
  const scan = $("#viewer-scan");
  const base = $("#viewer-base");
  const cam = $("#viewer-cam");
  for (const img of [scan, base, cam]) img.removeAttribute("src");
  base.hidden = true;
  cam.hidden = false;
  $("#viewer-controls").hidden = true;
  $("#viewer-opacity").value = "100";
  setOpacity(100);
  $("#viewer-scan-caption").textContent = "Scan";
  $("#viewer-cam-caption").textContent = "Grad-CAM (loading…)";
  if (!dialog.open) dialog.showModal();

  // Side by side in the same frame: the scan as the model saw it (cropped, resized) | the overlay.
  let frame = await imageInto(scan, `/v1/items/${item.id}/image.png?view=model`);
  const frameModel = frame.status === 200 ? frame.headers.get("X-Brainscan-Model") : null;
  if (frame.status === 200) {
    $("#viewer-scan-caption").textContent = `Scan as ${frameModel || "the model"} sees it (cropped, resized)`;
  } else {
    frame = await imageInto(scan, `/v1/items/${item.id}/image.png`);
    $("#viewer-scan-caption").textContent = frame.status === 200 ? "Scan (as stored)" : "Scan not available";
  }
  const overlay = await imageInto(cam, `/v1/items/${item.id}/gradcam.png`);
  if (overlay.status !== 200) {
    cam.hidden = true;
    $("#viewer-cam-caption").textContent = `Grad-CAM not available (HTTP ${overlay.status})`;
    return;
  }
  const explainer = overlay.headers.get("X-Brainscan-Explainer") || "gradcam";
  const madeBy = overlay.headers.get("X-Brainscan-Model") || "";
  const explained = overlay.headers.get("X-Brainscan-Class") || "";
  $("#viewer-cam-caption").textContent = `${explainer === "saliency" ? "Saliency" : "Grad-CAM"} for ${
    explained || "the top class"
  }${madeBy ? ` (${madeBy})` : ""}`;
  $("#viewer-explains").textContent = explained
    ? `The heatmap shows the evidence for "${explained}", the model's top class for this image${
        item.flag === "out_of_scope" ? " (shown although the scan is out of scope and has no label)" : ""
      }.`
    : "The heatmap shows the evidence for the model's top class (not recorded for this overlay).";
  // The opacity slider lays the overlay over the same frame; only when both come from one model.
  const aligned = frameModel && madeBy && frameModel === madeBy;
  if (aligned) {
    base.src = scan.src;
    base.hidden = false;
  }
  $("#viewer-opacity").disabled = !aligned;
  $(".opacity", $("#viewer-controls")).title = aligned
    ? ""
    : "Opacity needs the scan in the overlay's frame (made by another model, or not available).";
  $("#viewer-controls").hidden = false;
}

async function downloadCsv(jobId) {
  const response = await api(`/v1/jobs/${encodeURIComponent(jobId)}/results.csv`);
  if (!response.ok) {
    $("#upload-status").textContent = `CSV not available: ${await problem(response)}`;
    return;
  }
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = `${jobId}.csv`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

document.addEventListener("DOMContentLoaded", () => {
  setupKey();
  setupUpload();
  $("#refresh-jobs").addEventListener("click", loadRecentJobs);
  $("#older-jobs").addEventListener("click", loadOlderJobs);
  $("#viewer-close").addEventListener("click", () => $("#viewer").close());
  $("#viewer-opacity").addEventListener("input", (event) => setOpacity(Number(event.target.value)));
});
