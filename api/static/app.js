// brainscan web page: submit scans, follow jobs, read results. Plain DOM, no framework, no build.
// Everything from the server or the user (file names, errors) goes in via textContent, never HTML.
"use strict";

const CLASSES = ["glioma", "meningioma", "notumor", "pituitary"];
const KEY_STORAGE = "brainscan.apiKey";
const POLL_MS = 1000;
const ITEMS_PER_PAGE = 500;

const $ = (selector, root = document) => root.querySelector(selector);
const jobs = new Map(); // job id -> {element, timer, finished}
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
    follow(accepted.id);
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

async function loadRecentJobs() {
  const response = await api("/v1/jobs?limit=5");
  if (!response.ok) return;
  const list = await response.json();
  for (const job of list.jobs.reverse()) follow(job.id);
}

function follow(jobId) {
  if (jobs.has(jobId)) return;
  const element = $("#job-template").content.firstElementChild.cloneNode(true);
  element.dataset.jobId = jobId;
  $(".job-id", element).textContent = jobId;
  $(".csv", element).addEventListener("click", () => downloadCsv(jobId));
  // Newest on top: recent jobs are loaded oldest first, and a new submission is the newest.
  $("#jobs").prepend(element);
  jobs.set(jobId, { element, timer: null, finished: false });
  poll(jobId);
}

async function poll(jobId) {
  const state = jobs.get(jobId);
  try {
    const response = await api(`/v1/jobs/${encodeURIComponent(jobId)}?limit=${ITEMS_PER_PAGE}`);
    if (response.ok) {
      const job = await response.json();
      render(state.element, job);
      state.finished = job.finished;
    } else if (response.status === 404) {
      $(".counts", state.element).textContent = "not found for this key";
      state.finished = true;
    }
  } catch (error) {
    $(".counts", state.element).textContent = `connection problem (${error.message}); retrying`;
  }
  if (!state.finished) state.timer = setTimeout(() => poll(jobId), POLL_MS);
}

function render(element, job) {
  const status = $(".status", element);
  status.textContent = job.status;
  status.className = `status badge ${job.status}`;
  element.dataset.status = job.status;
  element.dataset.finished = String(job.finished);
  element.dataset.total = String(job.total);
  const model = job.model && job.model.name ? ` · model ${job.model.name} ${job.model.version}` : "";
  $(".counts", element).textContent =
    `${job.done + job.failed}/${job.total} finished · ${job.done} scored · ${job.failed} failed${model}`;
  const progress = $(".progress", element);
  progress.max = Math.max(job.total, 1);
  progress.value = job.done + job.failed;

  const body = $("tbody", element);
  body.replaceChildren(...job.items.map(row));
  $(".more", element).textContent =
    job.total > job.items.length ? `Showing the first ${job.items.length} of ${job.total}: download the CSV for all.` : "";
}

function cell(text, className) {
  const td = document.createElement("td");
  if (className) td.className = className;
  td.textContent = text == null ? "" : String(text);
  return td;
}

function row(item) {
  const tr = document.createElement("tr");
  tr.dataset.itemId = String(item.id);
  tr.append(
    cell(item.position + 1),
    cell(item.filename, "file"),
    cell(item.source_ref || "", "ref"),
    cell(item.status, "item-status"),
    item.error ? cell(item.error, "label error") : cell(item.label || "", "label"),
    cell(item.confidence == null ? "" : `${(100 * item.confidence).toFixed(1)}%`, "confidence"),
  );
  const probs = document.createElement("td");
  if (item.probabilities) probs.append(bars(item.probabilities));
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
    pct.textContent = `${(100 * p).toFixed(1)}%`;
    grid.append(label, track, pct);
  }
  return grid;
}

// -- viewer and CSV --------------------------------------------------------------------------------

async function imageInto(img, path, polls = 30) {
  let response = await api(path);
  // 202: a worker is computing it (Grad-CAM); ask again after the server's Retry-After.
  while (response.status === 202 && polls-- > 0) {
    const wait = Number(response.headers.get("Retry-After")) || 2;
    await new Promise((resolve) => setTimeout(resolve, wait * 1000));
    response = await api(path);
  }
  if (response.status !== 200) return response.status;
  const url = URL.createObjectURL(await response.blob());
  viewerUrls.push(url);
  img.src = url;
  return 200;
}

async function openViewer(item) {
  const dialog = $("#viewer");
  for (const url of viewerUrls) URL.revokeObjectURL(url);
  viewerUrls = [];
  $("#viewer-title").textContent = item.source_ref ? `${item.filename} (${item.source_ref})` : item.filename;
  $("#viewer-result").textContent = item.label
    ? `${item.label}, confidence ${(100 * item.confidence).toFixed(1)}%`
    : item.error || item.status;
  const scan = $("#viewer-scan");
  const cam = $("#viewer-cam");
  scan.removeAttribute("src");
  cam.removeAttribute("src");
  cam.hidden = false;
  $("#viewer-cam-caption").textContent = "Grad-CAM (loading…)";
  if (!dialog.open) dialog.showModal();
  await imageInto(scan, `/v1/items/${item.id}/image.png`);
  const camStatus = await imageInto(cam, `/v1/items/${item.id}/gradcam.png`);
  if (camStatus === 200) {
    $("#viewer-cam-caption").textContent = "Grad-CAM";
  } else {
    cam.hidden = true;
    $("#viewer-cam-caption").textContent = `Grad-CAM not available (HTTP ${camStatus})`;
  }
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
  $("#viewer-close").addEventListener("click", () => $("#viewer").close());
});
