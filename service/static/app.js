// The web page over the v1 API: models, new model (upload + train), training view, try it.
// Plain ES module, no build step, no external files. Every API call carries the key kept in
// sessionStorage as a Bearer header; the job event stream is read with fetch() for that reason
// (EventSource cannot send headers, and keys never go into URLs).

import {historySeries, lineChart} from "./charts.js";

const KEY_STORAGE = "classifier.apiKey";
const JOB_STORAGE = "classifier.job";
const DATASET_STORAGE = "classifier.dataset";
const TABS = ["models", "new", "training", "try"];
const FINAL = new Set(["succeeded", "failed", "cancelled"]);
// A dataset is stored at once and checked by an ingest worker: these statuses mean "not done yet".
const INGESTING = new Set(["queued", "ingesting"]);
const DATASET_POLL_MS = 500;
const PHASES = {ingest: "Ingest", features: "Features", head: "Head training", "fine-tune": "Fine-tuning",
  evaluate: "Evaluate", save: "Save"};
const MAX_IMAGES = 64;

const $ = (selector) => document.querySelector(selector);
const state = {models: [], details: null, datasetId: null, datasetWait: null, jobId: null, follow: null,
  resultShown: null, tryFiles: [], objectUrls: [], trySeq: 0};

// ---------------------------------------------------------------- API access and messages

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function authHeaders(extra = {}) {
  const key = apiKey();
  return key ? {...extra, Authorization: `Bearer ${key}`} : extra;
}

async function errorFrom(response) {
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null; // a proxy's HTML error page: fall back to the status line
  }
  const error = body && body.error;
  return new ApiError(response.status, (error && error.code) || "error",
    (error && error.message) || `${response.status} ${response.statusText || "error"}`);
}

async function api(path, {method = "GET", json, body, signal} = {}) {
  const init = {method, headers: authHeaders(json === undefined ? {} : {"Content-Type": "application/json"}), signal};
  if (json !== undefined) init.body = JSON.stringify(json);
  else if (body !== undefined) init.body = body;
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "network", `could not reach the service (${error.message})`);
  }
  if (!response.ok) throw await errorFrom(response);
  if (response.status === 204) return null;
  return response.json();
}

function hint(error) {
  if (error.status === 401) return " Enter a valid API key at the top of the page.";
  if (error.status === 403) return " Use the training key for this.";
  return "";
}

function showError(error) {
  if (!error || error.name === "AbortError") return;
  const text = error instanceof ApiError
    ? `${error.message}${/[.!?]$/.test(error.message) ? "" : "."}${hint(error)} ` +
      `(${error.status ? `HTTP ${error.status}, ` : ""}${error.code})`
    : String(error.message || error);
  $("#alert-text").textContent = text;
  $("#alert").hidden = false;
}

function clearError() {
  $("#alert").hidden = true;
  $("#alert-text").textContent = "";
}

let noticeTimer = null;

function notice(text) {
  const box = $("#notice");
  box.textContent = text;
  box.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => { box.hidden = true; }, 6000);
}

// Run an event handler; its errors go to the alert region, never to an unhandled rejection.
function run(handler) {
  return (...args) => Promise.resolve().then(() => handler(...args)).catch(showError);
}

// ---------------------------------------------------------------- small DOM helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

const enc = encodeURIComponent;

function pct(value, digits = 1) {
  return typeof value === "number" && Number.isFinite(value) ? `${(value * 100).toFixed(digits)}%` : "–";
}

function num(value, digits = 3) {
  return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "–";
}

function when(text) {
  if (!text) return "–";
  const date = new Date(text);
  return Number.isNaN(date.getTime()) ? text : date.toLocaleString();
}

function bytes(size) {
  if (size < 1024) return `${size} B`;
  if (size < 2 ** 20) return `${(size / 1024).toFixed(1)} KB`;
  return `${(size / 2 ** 20).toFixed(1)} MB`;
}

function option(value, label, selected = false) {
  const node = el("option", {value, text: label});
  node.selected = selected;
  return node;
}

// ---------------------------------------------------------------- tabs

function showTab(name, {focus = false} = {}) {
  if (!TABS.includes(name)) name = "models";
  for (const tab of TABS) {
    const button = $(`#tab-${tab}`);
    button.setAttribute("aria-selected", String(tab === name));
    button.tabIndex = tab === name ? 0 : -1;
    $(`#view-${tab}`).hidden = tab !== name;
  }
  if (focus) $(`#tab-${name}`).focus();
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  if (!canCall()) return;
  if (name === "models") run(loadModels)();
  if (name === "new") run(loadDatasets)();
  if (name === "training") run(loadJobs)();
  if (name === "try") run(loadTryModels)();
}

function initTabs() {
  for (const tab of TABS) $(`#tab-${tab}`).addEventListener("click", () => showTab(tab));
  $("[role=tablist]").addEventListener("keydown", (event) => {
    const current = TABS.findIndex((tab) => $(`#tab-${tab}`).getAttribute("aria-selected") === "true");
    const step = {ArrowRight: 1, ArrowLeft: -1}[event.key];
    if (step) showTab(TABS[(current + step + TABS.length) % TABS.length], {focus: true});
  });
  window.addEventListener("hashchange", () => showTab(location.hash.slice(1)));
  // Links such as <a href="#new"> inside the page switch tabs through hashchange.
}

// ---------------------------------------------------------------- API key

function canCall() {
  return document.body.dataset.keysRequired !== "true" || Boolean(apiKey());
}

function showKeyState() {
  const key = apiKey();
  const required = document.body.dataset.keysRequired === "true";
  $("#key-state").textContent = key ? "key kept for this tab" : required ? "enter a key to use the service" : "";
}

function initKey() {
  $("#api-key").value = apiKey();
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("#api-key").value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
    clearError();
    showKeyState();
    showTab(location.hash.slice(1));
    const job = sessionStorage.getItem(JOB_STORAGE);
    if (job && canCall() && !state.follow) run(followJob)(job);
  });
  $("#forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    $("#api-key").value = "";
    showKeyState();
  });
  showKeyState();
}

// ---------------------------------------------------------------- scores: per-class table, confusion matrix

function perClassTable(metrics, classes) {
  const rows = classes.map((name) => {
    const score = (metrics.per_class || {})[name] || {};
    return el("tr", {},
      el("th", {scope: "row", text: name}),
      el("td", {class: "num", text: num(score.precision)}),
      el("td", {class: "num", text: num(score.recall)}),
      el("td", {class: "num", text: num(score.f1)}),
      el("td", {class: "num", text: score.support ?? "–"}));
  });
  return el("div", {class: "scroll"}, el("table", {class: "per-class"},
    el("caption", {text: "Per-class precision and recall (validation images)"}),
    el("thead", {}, el("tr", {}, el("th", {scope: "col", text: "Class"}),
      ...["Precision", "Recall", "F1", "Images"].map((h) => el("th", {scope: "col", class: "num", text: h})))),
    el("tbody", {}, ...rows)));
}

function confusionTable(matrix, classes) {
  const max = Math.max(1, ...matrix.flat());
  const rows = matrix.map((row, i) => el("tr", {}, el("th", {scope: "row", text: classes[i]}),
    ...row.map((count, j) => {
      const cell = el("td", {class: "cell", text: count,
        title: `${count} '${classes[i]}' image(s) predicted as '${classes[j]}'`});
      const strength = count / max;
      // Diagonal (right) in blue, off-diagonal (mistakes) in red; shade by count.
      cell.style.backgroundColor = count === 0 ? "" : i === j
        ? `rgba(47, 111, 222, ${0.15 + 0.75 * strength})` : `rgba(179, 38, 30, ${0.15 + 0.6 * strength})`;
      if (strength > 0.55) cell.style.color = "#fff";
      return cell;
    })));
  return el("div", {class: "scroll"}, el("table", {class: "confusion"},
    el("caption", {text: "Confusion matrix (rows: true class, columns: predicted)"}),
    el("thead", {}, el("tr", {}, el("th", {scope: "col", text: "true \\ predicted"}),
      ...classes.map((name) => el("th", {scope: "col", text: name})))),
    el("tbody", {}, ...rows)));
}

function scoresBlock(version) {
  const metrics = version.metrics || {};
  const classes = version.classes || Object.keys(metrics.per_class || {});
  const block = el("div", {class: "scores"});
  block.append(el("p", {text: `Validation accuracy ${pct(metrics.accuracy)} · top-${metrics.top_k ?? "k"} ` +
    `accuracy ${pct(metrics.top_k_accuracy)} · loss ${num(metrics.loss)} · ${metrics.samples ?? "?"} images`}));
  const fineTune = version.fine_tune;
  if (fineTune && typeof fineTune.kept === "boolean") {
    block.append(el("p", {class: "muted", text: fineTune.kept
      ? `Fine-tuned model kept (${pct(fineTune.fine_tuned_accuracy)} vs head ${pct(fineTune.head_accuracy)}).`
      : `Fine-tuned model not kept: head alone validated as well or better (${pct(fineTune.head_accuracy)} vs ` +
        `${pct(fineTune.fine_tuned_accuracy)}).`}));
  }
  block.append(el("div", {class: "grid two"}, perClassTable(metrics, classes),
    confusionTable(metrics.confusion_matrix || [], classes)));
  return block;
}

// ---------------------------------------------------------------- curves

const LOSS = [["loss", "train loss"], ["val_loss", "val loss"]];
const ACCURACY = [["accuracy", "train accuracy"], ["val_accuracy", "val accuracy"]];

// histories: [{label, history}] in phase order; later phases continue the epoch axis.
function drawCurves(lossSvg, accuracySvg, histories) {
  const loss = [], accuracy = [];
  let offset = 0;
  for (const {label, history} of histories) {
    if (!history) continue;
    const prefix = label ? `${label} ` : "";
    const shift = (series) => series.map((s) => ({name: prefix + s.name,
      points: s.points.map(([x, y]) => [x + offset, y])}));
    const lossSeries = historySeries(history, LOSS);
    loss.push(...shift(lossSeries));
    accuracy.push(...shift(historySeries(history, ACCURACY)));
    offset += Math.max(0, ...lossSeries.map((s) => s.points.length));
  }
  lineChart(lossSvg, loss, {yMin: 0});
  lineChart(accuracySvg, accuracy, {yMin: 0, yMax: 1});
}

function versionHistories(version) {
  const history = version.history || {};
  const result = [{label: "", history: history.head}];
  if (history.fine_tune && Object.keys(history.fine_tune).length) {
    result.push({label: "fine-tune", history: history.fine_tune});
  }
  return result;
}

function chartSvg(label) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  for (const [key, value] of Object.entries({class: "chart", role: "img", "aria-label": label,
    viewBox: "0 0 480 240"})) node.setAttribute(key, value);
  return node;
}

function curvesBlock(version) {
  const lossSvg = chartSvg("Loss per epoch"), accuracySvg = chartSvg("Accuracy per epoch");
  drawCurves(lossSvg, accuracySvg, versionHistories(version));
  return el("div", {class: "grid two"},
    el("figure", {}, el("figcaption", {text: "Loss per epoch"}), lossSvg),
    el("figure", {}, el("figcaption", {text: "Accuracy per epoch"}), accuracySvg));
}

// ---------------------------------------------------------------- models

async function loadModels() {
  const data = await api("/v1/models");
  state.models = data.models;
  const body = $("#models-table tbody");
  body.replaceChildren(...data.models.map((model) => {
    const select = el("select", {"aria-label": `Version of ${model.name} to publish`},
      ...model.versions.map((v) => option(v, `version ${v}`, v === model.published)));
    const publish = el("button", {type: "button", class: "secondary", text: "Publish",
      "aria-label": `Publish the chosen version of ${model.name}`});
    publish.addEventListener("click", run(() => publishVersion(model.name, Number(select.value))));
    const details = el("button", {type: "button", class: "secondary", text: "Details",
      "aria-label": `Details of ${model.name}`});
    details.addEventListener("click", run(() => showDetails(model.name)));
    return el("tr", {"data-model": model.name},
      el("th", {scope: "row", text: model.name}),
      el("td", {text: model.versions.join(", ")}),
      el("td", {class: "published", text: model.published ?? "none"}),
      el("td", {class: "num", text: pct(model.accuracy)}),
      el("td", {}, el("div", {class: "controls"}, select, publish)),
      el("td", {}, details));
  }));
  $("#models-table").hidden = !data.models.length;
  $("#models-empty").hidden = Boolean(data.models.length);
  if (state.details && data.models.some((m) => m.name === state.details.name)) await showDetails(state.details.name);
}

async function publishVersion(name, version) {
  const answer = await api(`/v1/models/${enc(name)}/published`, {method: "PUT", json: {version}});
  notice(`Published ${answer.name} version ${answer.published}.`);
  await loadModels();
  if ($("#try-model").value === name) await loadTryModels();
}

async function showDetails(name) {
  const model = await api(`/v1/models/${enc(name)}`);
  const previous = state.details && state.details.name === name ? Number($("#details-version").value) : null;
  state.details = model;
  $("#model-details").hidden = false;
  $("#model-details-title").textContent = `Model ${model.name}`;
  $("#versions-table tbody").replaceChildren(...model.versions.map((v) => el("tr", {},
    el("th", {scope: "row", text: v.version}),
    el("td", {text: when(v.created)}),
    el("td", {text: v.kind === "full" ? "fine-tuned" : "head"}),
    el("td", {text: v.dataset ? `${v.dataset.train_images ?? "?"} / ${v.dataset.val_images ?? "?"}` : "–"}),
    el("td", {class: "num", text: pct((v.metrics || {}).accuracy)}),
    el("td", {text: v.published ? "published" : ""}))));
  const shown = model.versions.some((v) => v.version === previous) ? previous
    : model.published ?? model.versions[model.versions.length - 1]?.version;
  $("#details-version").replaceChildren(...model.versions.map((v) => option(v.version, `version ${v.version}`,
    v.version === shown)));
  renderDetailsVersion();
}

function renderDetailsVersion() {
  const model = state.details;
  const version = model && model.versions.find((v) => v.version === Number($("#details-version").value));
  $("#details-body").replaceChildren(...(version ? [curvesBlock(version), scoresBlock(version)] : []));
}

// ---------------------------------------------------------------- new model: upload and report

function datasetReport(record) {
  const counts = Object.entries(record.classes || {});
  const max = Math.max(1, ...counts.map(([, n]) => n));
  const parts = [el("p", {}, el("strong", {text: `${record.images} images in ${counts.length} classes`}),
    el("span", {class: "muted", text: ` · dataset ${record.id}${record.existing ? " (uploaded before)" : ""}`}))];
  parts.push(el("div", {class: "scroll"}, el("table", {class: "class-counts"},
    el("caption", {text: "Images per class"}),
    el("thead", {}, el("tr", {}, el("th", {scope: "col", text: "Class"}), el("th", {scope: "col", class: "num",
      text: "Images"}), el("th", {scope: "col", text: ""}))),
    el("tbody", {}, ...counts.map(([name, n]) => {
      const fill = el("div", {class: "bar-fill"});
      fill.style.width = `${(100 * n) / max}%`;
      return el("tr", {}, el("th", {scope: "row", text: name}), el("td", {class: "num", text: n}),
        el("td", {}, el("div", {class: "bar-track", "aria-hidden": "true"}, fill)));
    })))));
  const warnings = record.warnings || [];
  parts.push(warnings.length
    ? el("ul", {class: "warnings", "aria-label": "Warnings"}, ...warnings.map((w) => el("li", {text: w})))
    : el("p", {class: "muted", text: "No warnings."}));
  const skipped = record.skipped || [];
  const duplicates = record.duplicates || [];
  const conflicts = record.conflicts || [];
  parts.push(el("p", {class: "muted", text: `${skipped.length} skipped · ${duplicates.length} duplicates dropped · ` +
    `${conflicts.length} images under two labels`}));
  if (skipped.length) {
    parts.push(el("details", {open: skipped.length <= 10}, el("summary", {text: `Skipped files (${skipped.length})`}),
      el("div", {class: "scroll"}, el("table", {class: "skipped"},
        el("caption", {class: "sr-only", text: "Skipped files"}),
        el("thead", {}, el("tr", {}, el("th", {scope: "col", text: "File"}), el("th", {scope: "col", text: "Reason"}))),
        el("tbody", {}, ...skipped.map((s) => el("tr", {}, el("td", {}, el("code", {text: s.path})),
          el("td", {text: s.reason}))))))));
  }
  if (duplicates.length) {
    parts.push(el("details", {}, el("summary", {text: `Duplicates dropped (${duplicates.length})`}),
      el("ul", {}, ...duplicates.map((d) => el("li", {}, el("code", {text: d.path}), " = ",
        el("code", {text: d.duplicate_of}))))));
  }
  if (conflicts.length) {
    parts.push(el("details", {}, el("summary", {text: `Images under two labels, dropped (${conflicts.length})`}),
      el("ul", {}, ...conflicts.map((c) => el("li", {text: `${c.paths.join(", ")} (labels ${c.labels.join(", ")})`})))));
  }
  return parts;
}

// Show a ready dataset's report and allow training on it; null (or a dataset not ready) hides it.
function useDataset(record) {
  const ready = Boolean(record) && record.status === "ready";
  state.datasetId = ready ? record.id : null;
  if (record) sessionStorage.setItem(DATASET_STORAGE, record.id);
  else sessionStorage.removeItem(DATASET_STORAGE);
  $("#dataset-report").replaceChildren(...(ready ? datasetReport(record) : []));
  $("#dataset-report").hidden = !ready;
  $("#start-training").disabled = !ready;
  $("#dataset-select").value = record ? record.id : "";
}

function datasetName(record) {
  return record.filename || `dataset ${record.id.slice(0, 8)}`;
}

function datasetLabel(record) {
  if (record.status !== "ready") return `${datasetName(record)} · ${record.status} · ${when(record.created)}`;
  const classes = Object.keys(record.classes || {});
  return `${record.images} images · ${classes.slice(0, 4).join(", ")}${classes.length > 4 ? ", …" : ""} · ` +
    `${when(record.created)}`;
}

async function loadDatasets() {
  const data = await api("/v1/datasets");
  const wanted = state.datasetId || sessionStorage.getItem(DATASET_STORAGE);
  $("#dataset-select").replaceChildren(option("", data.datasets.length ? "— pick one —" : "— none yet —"),
    ...data.datasets.map((record) => option(record.id, datasetLabel(record), record.id === wanted)));
  const record = data.datasets.find((d) => d.id === wanted);
  if (!record) return;
  if (record.status === "ready" && state.datasetId !== record.id) useDataset(record);
  // A reload while the ingest worker checks it: keep following it.
  if (INGESTING.has(record.status) && !state.datasetWait) run(settleDataset)(record);
}

// Follow a dataset's URL until the ingest worker is done with it; show its report, or its error.
async function settleDataset(record) {
  if (state.datasetWait) state.datasetWait.abort();
  const controller = new AbortController();
  state.datasetWait = controller;
  const name = datasetName(record);
  useDataset(null);
  sessionStorage.setItem(DATASET_STORAGE, record.id);
  try {
    while (INGESTING.has(record.status)) {
      $("#upload-state").textContent = record.status === "queued"
        ? `${name}: stored; waiting for an ingest worker to check it…` : `${name}: checking every image…`;
      await sleep(DATASET_POLL_MS, controller.signal);
      if (controller.signal.aborted) return null;
      record = await api(`/v1/datasets/${enc(record.id)}`, {signal: controller.signal});
    }
  } finally {
    if (state.datasetWait === controller) state.datasetWait = null;
  }
  if (record.status === "failed") {
    sessionStorage.removeItem(DATASET_STORAGE);
    $("#upload-state").textContent = `${name}: not accepted.`;
    await loadDatasets();
    throw new Error(`${name} cannot be trained on: ${record.error}`);
  }
  useDataset(record);
  $("#upload-state").textContent = `${name}: ready to train.`;
  await loadDatasets();
  return record;
}

async function pickDataset(id) {
  if (!id) {
    useDataset(null);
    return;
  }
  const record = await api(`/v1/datasets/${enc(id)}`);
  if (record.status !== "ready") {
    await settleDataset(record);
    return;
  }
  useDataset(record);
  $("#upload-state").textContent = "Uploaded before: ready to train.";
}

async function uploadDataset(file) {
  if (!file) return;
  useDataset(null);
  $("#upload-state").textContent = `Uploading ${file.name} (${bytes(file.size)})…`;
  const form = new FormData();
  form.append("file", file, file.name);
  let record;
  try {
    record = await api("/v1/datasets", {method: "POST", body: form});
  } catch (error) {
    $("#upload-state").textContent = `${file.name}: not accepted.`;
    throw error;
  } finally {
    $("#dataset-file").value = "";
  }
  clearError();
  // 202: stored; an ingest worker unpacks and checks it. 200: the same file was uploaded before.
  if (!(await settleDataset({...record, filename: file.name}))) return;
  if (!$("#model-name").value) {
    $("#model-name").value = file.name.replace(/\.(zip|tar\.gz|tgz)$/i, "").replace(/[^A-Za-z0-9._-]+/g, "-")
      .replace(/^[^A-Za-z0-9]+/, "").slice(0, 64);
  }
}

function trainOptions() {
  const options = {dataset: state.datasetId};
  const epochs = $("#epochs").value.trim();
  const rate = $("#learning-rate").value.trim();
  const size = $("#image-size").value.trim();
  if (epochs) options.epochs = Number(epochs);
  options.optimizer = $("#optimizer").value;
  if (rate) options.learning_rate = Number(rate);
  if (size) options.image_size = Number(size);
  const patience = $("#patience").value.trim();
  if (patience) options.patience = Number(patience);
  options.fine_tune = $("#fine-tune").checked;
  return options;
}

async function startTraining(event) {
  event.preventDefault();
  const name = $("#model-name").value.trim();
  if (!name) {
    $("#model-name").focus();
    throw new Error("Give the model a name (letters, digits, '.', '_' or '-').");
  }
  if (!state.datasetId) throw new Error("Upload a dataset archive first.");
  $("#start-training").disabled = true;
  $("#upload-state").textContent = `Starting training of ${name}…`;
  try {
    const answer = await api(`/v1/models/${enc(name)}/train`, {method: "POST", json: trainOptions()});
    clearError();
    notice(`Training job ${answer.job.id} queued for model ${name}.`);
    showTab("training");
    await followJob(answer.job.id);
  } finally {
    $("#start-training").disabled = !state.datasetId;
  }
}

function initDrop(zone, onFiles) {
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    run(onFiles)([...event.dataTransfer.files]);
  });
}

// ---------------------------------------------------------------- training view

async function loadJobs() {
  const data = await api("/v1/jobs?limit=30");
  const select = $("#job-select");
  const current = state.jobId || sessionStorage.getItem(JOB_STORAGE);
  select.replaceChildren(option("", data.jobs.length ? "— pick a job —" : "— no jobs —"),
    ...data.jobs.map((job) => option(job.id, jobLabel(job), job.id === current)));
  if (current && !state.follow && data.jobs.some((job) => job.id === current)) await followJob(current);
}

function phaseText(job) {
  const progress = job.progress;
  if (job.status === "queued") return "Waiting for a training worker…";
  if (job.status === "succeeded") return `Done: version ${job.result?.version} of ${job.model}` +
    `${job.result?.published ? " (published)" : " (not published: not more accurate than the published one)"}.`;
  if (job.status === "cancelled") return "Cancelled.";
  if (job.status === "failed") return "Failed.";
  if (!progress) return "Starting…";
  const name = PHASES[progress.phase] || progress.phase;
  if (progress.epoch) {
    const m = progress.metrics || {};
    const scores = [["loss", m.loss, num], ["val loss", m.val_loss, num], ["val accuracy", m.val_accuracy, pct]]
      .filter(([, v]) => typeof v === "number").map(([label, v, f]) => `${label} ${f(v)}`).join(", ");
    return `${name}: epoch ${progress.epoch} of ${progress.total}${scores ? ` — ${scores}` : ""}`;
  }
  return `${name}: ${progress.current} of ${progress.total}`;
}

function renderPhases(job) {
  const names = ["ingest", "features", "head", ...(job.params?.fine_tune ? ["fine-tune"] : []), "evaluate", "save"];
  const at = job.status === "succeeded" ? names.length : names.indexOf(job.progress?.phase ?? "");
  $("#phases").replaceChildren(...names.map((name, i) => {
    const item = el("li", {text: PHASES[name]});
    if (i < at) {
      item.className = "done";
    } else if (i === at && !FINAL.has(job.status)) {
      item.className = "current";
      item.setAttribute("aria-current", "step");
    }
    return item;
  }));
}

function jobLabel(job) {
  return `${job.model} · ${job.status} · ${when(job.created_at)}`;
}

function jobHistories(job) {
  const history = job.progress?.history || {};
  return [{label: "", history: history.head}, {label: "fine-tune", history: history["fine-tune"]}];
}

async function renderJob(job) {
  if (job.id !== state.jobId) return;
  $("#no-job").hidden = true;
  $("#job-view").hidden = false;
  $("#job-title").textContent = `Job ${job.id.slice(0, 8)} · model ${job.model}`;
  const listed = [...$("#job-select").options].find((o) => o.value === job.id);
  if (listed) listed.textContent = jobLabel(job);
  const status = $("#job-status");
  status.textContent = job.status;
  status.className = `pill ${job.status}`;
  $("#job-phase").textContent = phaseText(job);
  const bar = $("#job-progress");
  const progress = job.progress;
  bar.value = job.status === "succeeded" ? 1 : progress && progress.total ? progress.current / progress.total : 0;
  bar.setAttribute("aria-valuetext", $("#job-phase").textContent);
  renderPhases(job);
  $("#cancel-job").disabled = FINAL.has(job.status) || Boolean(job.cancel_requested);
  $("#cancel-job").textContent = job.cancel_requested && !FINAL.has(job.status) ? "Cancelling…" : "Cancel";
  $("#job-error").hidden = !job.error;
  $("#job-error").textContent = job.error ? `Error: ${job.error}` : "";
  if (job.status !== "succeeded") {
    drawCurves($("#loss-chart"), $("#accuracy-chart"), jobHistories(job));
    $("#job-result").hidden = true;
    return;
  }
  const key = `${job.id}:${job.result?.version}`;
  if (state.resultShown === key) return;
  state.resultShown = key;
  // The stored version is the record of what was kept (early stopping restores the best epoch).
  const model = await api(`/v1/models/${enc(job.model)}`);
  const version = model.versions.find((v) => v.version === job.result.version);
  if (!version || job.id !== state.jobId) return;
  drawCurves($("#loss-chart"), $("#accuracy-chart"), versionHistories(version));
  $("#job-result").replaceChildren(el("h4", {text: `Version ${version.version} of ${job.model}`}),
    scoresBlock(version));
  $("#job-result").hidden = false;
}

function parseEvent(block) {
  const event = {event: "message", data: []};
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const cut = line.indexOf(":");
    const field = cut < 0 ? line : line.slice(0, cut);
    const value = cut < 0 ? "" : line.slice(cut + 1).replace(/^ /, "");
    if (field === "event") event.event = value;
    else if (field === "data") event.data.push(value);
  }
  return {event: event.event, data: event.data.join("\n")};
}

const sleep = (ms, signal) => new Promise((resolve) => {
  const timer = setTimeout(resolve, ms);
  signal?.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, {once: true});
});

// Read the job's text/event-stream with fetch (auth header), reconnecting when a stream ends early.
async function streamJob(id, signal) {
  let failures = 0;
  while (!signal.aborted) {
    let final = false;
    try {
      const response = await fetch(`/v1/jobs/${enc(id)}/events`,
        {headers: authHeaders({Accept: "text/event-stream"}), signal, cache: "no-store"});
      if (response.status === 503) {
        await response.body?.cancel();
        return pollJob(id, signal); // every event stream of the server is taken: poll instead
      }
      if (!response.ok) throw await errorFrom(response);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        failures = 0;
        buffer = (buffer + value).replace(/\r\n?/g, "\n");
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = parseEvent(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
          if (event.event === "job") {
            const job = JSON.parse(event.data);
            final = FINAL.has(job.status);
            await renderJob(job);
          } else if (event.event === "error") {
            const error = JSON.parse(event.data);
            throw new ApiError(404, error.code, error.message);
          }
        }
      }
    } catch (error) {
      if (signal.aborted || error instanceof ApiError) throw error;
      failures += 1; // the connection dropped (server restart): retry a few times, then say so
      if (failures > 5) throw new ApiError(0, "network", `lost the job's event stream (${error.message})`);
    }
    if (final) return;
    await sleep(1000 * Math.max(1, failures), signal);
  }
}

// Follow a job by reading its record every 2 s, when the server has no event stream to spare.
async function pollJob(id, signal) {
  while (!signal.aborted) {
    const job = await api(`/v1/jobs/${enc(id)}`, {signal});
    await renderJob(job);
    if (FINAL.has(job.status)) return;
    await sleep(2000, signal);
  }
}

async function followJob(id) {
  if (state.follow) state.follow.abort();
  const controller = new AbortController();
  state.follow = controller;
  state.jobId = id;
  state.resultShown = null;
  sessionStorage.setItem(JOB_STORAGE, id);
  const select = $("#job-select");
  if (![...select.options].some((o) => o.value === id)) select.append(option(id, `job ${id.slice(0, 8)}`));
  select.value = id;
  try {
    const job = await api(`/v1/jobs/${enc(id)}`, {signal: controller.signal});
    await renderJob(job);
    if (!FINAL.has(job.status)) await streamJob(id, controller.signal);
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) sessionStorage.removeItem(JOB_STORAGE);
    if (!controller.signal.aborted) throw error;
  } finally {
    if (state.follow === controller) state.follow = null;
  }
  if (!controller.signal.aborted && state.jobId === id) await loadModels();
}

async function cancelJob() {
  if (!state.jobId) return;
  const job = await api(`/v1/jobs/${enc(state.jobId)}/cancel`, {method: "POST"});
  await renderJob(job);
  notice(job.status === "cancelled" ? "Job cancelled." : "Cancel requested: the job stops within one epoch.");
}

// ---------------------------------------------------------------- try it

async function loadTryModels() {
  const data = await api("/v1/models");
  state.models = data.models;
  const select = $("#try-model");
  const current = select.value;
  select.replaceChildren(...(data.models.length ? data.models.map((m) => option(m.name, m.name, m.name === current))
    : [option("", "— no models —")]));
  fillTryVersions();
}

function fillTryVersions() {
  const model = state.models.find((m) => m.name === $("#try-model").value);
  const versions = model ? model.versions : [];
  const a = $("#try-version"), b = $("#try-compare");
  const keepA = a.value, keepB = b.value;
  a.replaceChildren(option("", model && model.published ? `published (version ${model.published})` : "published"),
    ...versions.map((v) => option(v, `version ${v}`, String(v) === keepA)));
  b.replaceChildren(option("", "— nothing —"), ...versions.map((v) => option(v, `version ${v}`, String(v) === keepB)));
}

function topKList(prediction, version, second) {
  return el("ol", {class: "topk", "aria-label": `Top labels, version ${version}`},
    ...prediction.top_k.map((item) => {
      const fill = el("div", {class: second ? "bar-fill b" : "bar-fill"});
      fill.style.width = `${Math.max(0, Math.min(1, item.probability)) * 100}%`;
      return el("li", {"data-label": item.label, "data-probability": item.probability},
        el("span", {class: "label", text: item.label}),
        el("div", {class: "bar-track", role: "meter", "aria-valuemin": 0, "aria-valuemax": 1,
          "aria-valuenow": item.probability, "aria-label": `${item.label} probability`}, fill),
        el("span", {class: "pct", text: pct(item.probability)}));
    }));
}

async function predictFiles() {
  const files = state.tryFiles;
  const name = $("#try-model").value;
  if (!files.length) return;
  if (!name) throw new Error("No model to try: train one under New model first.");
  const seq = ++state.trySeq;
  const topK = Number($("#try-top-k").value) || 3;
  const versions = [$("#try-version").value, $("#try-compare").value];
  const wanted = versions[1] ? versions : [versions[0]];
  $("#try-state").textContent = `Classifying ${files.length} image(s)…`;
  const answers = await Promise.all(wanted.map((version) => {
    const form = new FormData();
    for (const file of files) form.append("image", file, file.name);
    const query = new URLSearchParams({top_k: String(topK)});
    if (version) query.set("version", version);
    return api(`/v1/models/${enc(name)}/predict?${query}`, {method: "POST", body: form});
  }));
  if (seq !== state.trySeq) return; // a newer request replaced this one
  clearError();
  state.objectUrls.forEach((url) => URL.revokeObjectURL(url));
  state.objectUrls = files.map((file) => URL.createObjectURL(file));
  $("#try-results").classList.toggle("compare", answers.length > 1);
  $("#try-results").replaceChildren(...files.map((file, i) => el("section", {class: "result card",
    "aria-label": `Predictions for ${file.name}`},
    el("img", {src: state.objectUrls[i], alt: file.name}),
    el("div", {}, el("div", {class: "name", text: file.name}),
      el("div", {class: "versions"}, ...answers.map((answer, j) => el("div", {role: "group",
        "aria-label": `Version ${answer.version}`, "data-version": answer.version},
        el("h4", {text: `Version ${answer.version}`}), topKList(answer.predictions[i], answer.version, j > 0))))))));
  const compared = answers.length > 1 ? `, versions ${answers[0].version} and ${answers[1].version}` :
    `, version ${answers[0].version}`;
  $("#try-state").textContent = `${files.length} image(s) classified by ${name}${compared}.`;
}

async function setTryFiles(files) {
  const images = files.filter((file) => !file.type || file.type.startsWith("image/"));
  if (files.length && !images.length) throw new Error("Those files are not images.");
  if (images.length > MAX_IMAGES) throw new Error(`At most ${MAX_IMAGES} images at once; ${images.length} given.`);
  state.tryFiles = images;
  await predictFiles();
}

// ---------------------------------------------------------------- start

function init() {
  initTabs();
  initKey();
  $("#alert-close").addEventListener("click", clearError);
  $("#refresh-models").addEventListener("click", run(loadModels));
  $("#details-version").addEventListener("change", renderDetailsVersion);
  $("#dataset-file").addEventListener("change", run((event) => uploadDataset(event.target.files[0])));
  initDrop($("#dataset-drop"), (files) => uploadDataset(files[0]));
  $("#dataset-select").addEventListener("change", run((event) => pickDataset(event.target.value)));
  $("#train-form").addEventListener("submit", run(startTraining));
  $("#refresh-jobs").addEventListener("click", run(loadJobs));
  $("#job-select").addEventListener("change", run((event) => event.target.value && followJob(event.target.value)));
  $("#cancel-job").addEventListener("click", run(cancelJob));
  $("#try-model").addEventListener("change", run(() => { fillTryVersions(); return predictFiles(); }));
  for (const id of ["#try-version", "#try-compare", "#try-top-k"]) $(id).addEventListener("change", run(predictFiles));
  $("#try-files").addEventListener("change", run((event) => setTryFiles([...event.target.files])));
  initDrop($("#images-drop"), setTryFiles);
  showTab(location.hash.slice(1) || "models");
  const job = sessionStorage.getItem(JOB_STORAGE);
  if (job && canCall()) run(followJob)(job);
}

init();
