// Web page of the chest X-ray inference service: upload one radiograph, show the verdict (refer or cleared,
// and why) first, then the model's findings with their Monte-Carlo range, the referral rule's own thresholds
// and Grad-CAM heatmaps. Plain JS modules, no build step, no external assets; talks only to this origin's
// /v1 API.
import { FilmViewer } from "./viewer.js";

const API = {
  model: "/v1/model",
  predict: "/v1/predict",
  preview: "/v1/preview",
};
const API_KEY_STORAGE = "cxr-api-key";

// Plain-words advice per problem status (RFC 9457 bodies carry the specific `detail`).
const SUGGESTIONS = {
  400: "The request was not understood. Reload the page and choose the file again.",
  401: "This service requires an API key. Enter it under “API key” at the top of the page, then try again.",
  403: "This API key is not allowed to use the service. Check the key with the service's administrator.",
  404: "The service did not recognise this request. The page may be out of date: reload it.",
  413: "The file is larger than the service accepts. Export a smaller image (for example a downsampled PNG or JPEG) and try again.",
  415: "Upload a PNG, JPEG or DICOM (Part 10) file of a chest radiograph. Other formats such as TIFF, PDF or text files cannot be read.",
  422: "The file was recognised but cannot be used: it may be damaged, truncated, multi-frame, or not a projection radiograph. Re-export the image from the source system and try again.",
  429: "Too many requests were sent. Wait a moment, then try again.",
  500: "The service hit an internal error. Try again; if it keeps happening, report the request ID below.",
  503: "The service is busy or still loading the model.",
  504: "The service took too long to answer. Try again in a moment.",
};
const TITLES = {
  401: "API key required",
  403: "Access denied",
  413: "File too large",
  415: "Not an image format the service reads",
  422: "The image could not be used",
  429: "Too many requests",
  503: "Service busy or not ready",
};
const DECISION_TEXT = { positive: "Positive", negative: "Negative", uncertain: "Uncertain" };
// Referral reason codes (the API's referral.reasons) in plain words.
const REASON_TEXT = {
  possible_finding: "a finding was decided positive",
  uncertain_finding: "a finding could be neither cleared nor called positive",
  not_cleared_as_normal: "the film as a whole is not confidently normal",
  out_of_distribution: "the image does not look like the radiographs the model was trained on",
  outside_intended_population: "the image is outside the model's intended use",
  no_referral_rule: "this model has no fitted referral rule",
  shadow_mode: "the site runs the rule in shadow mode: every film is read",
  guarantee_suspended: "the rule's guarantee is suspended on this site: every film is read",
};
const POPULATION_TEXT = {
  paediatric: "a child",
  lateral_or_oblique_view: "a lateral or oblique view",
  non_chest_body_part: "not a chest",
};
const FINDING_LEVEL_REASONS = new Set(["possible_finding", "uncertain_finding", "not_cleared_as_normal"]);
const MISSING_TEXT = { age: "the patient's age", view: "the view" };
// Why the rule decided each finding as it did (predictions[label].reason).
const FINDING_REASON_TEXT = {
  cleared: "below the clearing mark: ruled out",
  above_positive_threshold: "reached the positive mark",
  between_thresholds: "between the marks: neither ruled out nor called positive",
  cannot_be_cleared_by_this_model: "cannot be ruled out by this model",
  both_thresholds_met: "meets both marks: referred",
  no_rule_mc_disagreement: "no referral rule; the samples disagree",
};
// decisions_withheld codes: why no finding is shown.
const WITHHELD_TEXT = {
  out_of_distribution: "the image does not look like the frontal chest radiographs the model was made for",
  outside_intended_population: "the image is outside the model's intended use",
};
// A 5th-95th percentile range this wide (in probability) is called unsure whatever the marks.
const WIDE_RANGE = 0.25;

const $ = (testid) => document.querySelector(`[data-testid="${testid}"]`);
const el = {
  apiKey: $("api-key"),
  access: $("access"),
  modelNote: $("model-note"),
  modelLoading: $("model-note-loading"),
  modelBody: document.querySelector(".model-note__body"),
  noClearing: $("no-clearing"),
  patientAge: $("patient-age"),
  view: $("view"),
  modelName: $("model-name"),
  modelVersion: $("model-version"),
  modelUse: $("model-intended-use"),
  untrainedWarning: $("untrained-warning"),
  untrainedLabels: $("untrained-labels"),
  dropzone: $("dropzone"),
  fileInput: $("file-input"),
  status: $("status"),
  error: $("error"),
  errorTitle: document.querySelector(".error__title"),
  errorDetail: $("error-detail"),
  errorSuggestion: $("error-suggestion"),
  errorRetry: $("error-retry"),
  errorRequestId: $("error-request-id"),
  viewer: $("viewer"),
  viewerWindow: $("viewer-window"),
  frame: $("viewer-frame"),
  radiograph: $("radiograph"),
  camScale: $("cam-scale"),
  overlay: $("cam-overlay"),
  placeholder: $("viewer-placeholder"),
  imageInfo: $("image-info"),
  camControls: $("cam-controls"),
  camSelect: $("cam-select"),
  camOpacity: $("cam-opacity"),
  camOpacityValue: $("cam-opacity-value"),
  camEmpty: $("cam-empty"),
  results: $("results"),
  resultsEmpty: $("results-empty"),
  resultsBody: document.querySelector(".results__body"),
  runMeta: $("run-meta"),
  refer: $("refer-banner"),
  referReasons: $("refer-reasons"),
  cleared: $("cleared-banner"),
  population: $("population-banner"),
  populationDetail: $("population-detail"),
  modelReferral: $("model-referral"),
  modelReferralSummary: $("model-referral-summary"),
  modelNoReferral: $("model-no-referral"),
  guaranteeStatus: $("guarantee-status"),
  guaranteeState: $("guarantee-state"),
  guaranteeCoverage: $("guarantee-coverage"),
  guaranteeTable: $("guarantee-table"),
  guaranteeChecked: $("guarantee-checked"),
  guaranteeSuspended: $("guarantee-suspended"),
  guaranteeSuspendedWhy: $("guarantee-suspended-why"),
  guaranteeShadow: $("guarantee-shadow"),
  ood: $("ood-banner"),
  oodDetail: $("ood-detail"),
  verdict: $("verdict"),
  withheld: $("withheld-message"),
  findingsBlock: $("findings-block"),
  legendClear: $("legend-clear"),
  legendPositive: $("legend-positive"),
  legendRule: $("legend-rule"),
  findingsBody: $("findings-body"),
  resultsUntrained: $("results-untrained"),
  imageWarnings: $("image-warnings"),
  requestId: $("request-id"),
  rowTemplate: document.getElementById("finding-row-template"),
};

const viewer = new FilmViewer({
  window: el.viewerWindow,
  frame: el.frame,
  film: el.radiograph,
  zoomIn: $("zoom-in"),
  zoomOut: $("zoom-out"),
  zoomValue: $("zoom-level"),
  reset: $("view-reset"),
  windowInput: $("wl-window"),
  levelInput: $("wl-level"),
  windowValue: $("wl-window-value"),
  levelValue: $("wl-level-value"),
  transfer: [...document.querySelectorAll("#window-level feComponentTransfer > *")],
});

const state = {
  card: null, // GET /v1/model body, or null
  cardClearsNothing: false, // the model card's rule has no negative threshold for any trained finding
  resultClearsNothing: false, // the last result had clear_below null for every finding
  file: null, // the File being analysed
  generation: 0, // bumps on every upload so late answers of an older one are ignored
  controller: null, // AbortController of the in-flight requests
  objectUrl: null, // object URL of the uploaded PNG/JPEG, revoked on the next upload
  imageSize: null, // {width, height} of the original radiograph, from the predict answer
  previewShown: false, // the radiograph shown is the server-rendered preview
  previewRequested: false,
};

// --- small helpers --------------------------------------------------------------------------------

function apiHeaders() {
  const key = el.apiKey.value.trim();
  return key ? { "X-API-Key": key } : {};
}

function setStatus(text) {
  el.status.textContent = text;
}

function percent(p, digits = 1) {
  const value = Math.min(1, Math.max(0, Number(p) || 0)) * 100;
  return `${value.toFixed(digits)}%`;
}

// A 5th-95th percentile range in whole percent ("12–30%"); below 1% says so rather than "0".
function percentRange(lo, hi) {
  const whole = (p) => (p > 0 && p < 0.01 ? "<1" : String(Math.round(p * 100)));
  return `${whole(lo)}–${whole(hi)}%`;
}

function nullableProbability(x) {
  return x === null || x === undefined || !Number.isFinite(Number(x)) ? null : clamp01(x);
}

function formatMs(ms) {
  const n = Number(ms) || 0;
  return n >= 1000 ? `${(n / 1000).toFixed(2)} s` : `${Math.round(n)} ms`;
}

function clamp01(x) {
  return Math.min(1, Math.max(0, Number(x) || 0));
}

class ApiError extends Error {
  constructor({ status, title, detail, requestId, retryAfter, network }) {
    super(detail || title || "Request failed");
    this.status = status;
    this.title = title;
    this.detail = detail;
    this.requestId = requestId;
    this.retryAfter = retryAfter;
    this.network = Boolean(network);
  }
}

// fetch wrapper: network failures and non-2xx answers both become ApiError (problem+json read if present).
async function request(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (err) {
    if (err && err.name === "AbortError") throw err;
    throw new ApiError({
      network: true,
      title: "Could not reach the service",
      detail: "The request did not get an answer: the network is down or the service is not running.",
    });
  }
  if (response.ok) return response;
  let problem = {};
  const type = response.headers.get("Content-Type") || "";
  if (type.includes("json")) {
    try {
      problem = await response.json();
    } catch (_err) {
      problem = {};
    }
  }
  throw new ApiError({
    status: response.status,
    title: problem.title || response.statusText || `HTTP ${response.status}`,
    detail: typeof problem.detail === "string" ? problem.detail : "",
    requestId: problem.request_id || response.headers.get("X-Request-ID") || "",
    retryAfter: response.headers.get("Retry-After"),
  });
}

// --- model card -----------------------------------------------------------------------------------

const MAX_CARD_RETRIES = 12;
let cardRetries = 0;

async function loadModelCard() {
  el.modelNote.setAttribute("aria-busy", "true");
  try {
    const response = await request(API.model, { headers: apiHeaders() });
    state.card = await response.json();
    renderModelCard(state.card);
  } catch (err) {
    const reason = err.detail || err.title || err.message;
    const advice = err.status === 401 ? " Enter the API key (top right)." : "";
    el.modelLoading.textContent = `Model information is unavailable: ${reason}${advice}`;
    el.modelLoading.classList.add("model-note__loading--failed");
    if (err.status === 401) el.access.open = true;
    if (err.status === 503 && cardRetries < MAX_CARD_RETRIES) {
      // Still loading the model: ask again when the service says to.
      cardRetries += 1;
      const seconds = Number.parseInt(err.retryAfter || "", 10);
      window.setTimeout(loadModelCard, (Number.isFinite(seconds) && seconds > 0 ? seconds : 5) * 1000);
    }
  } finally {
    el.modelNote.setAttribute("aria-busy", "false");
  }
}

function renderModelCard(card) {
  el.modelName.textContent = card.name || "Unnamed model";
  el.modelVersion.textContent = card.version ? `v${card.version}` : "";
  el.modelUse.textContent = card.intended_use || "Not stated.";
  el.untrainedWarning.hidden = card.trained !== false;
  const untrained = Array.isArray(card.untrained_labels) ? card.untrained_labels : [];
  el.untrainedLabels.hidden = untrained.length === 0;
  el.untrainedLabels.querySelector(".model-note__list").textContent = untrained.join(", ");
  const referral = card.referral;
  el.modelReferral.hidden = !referral;
  el.modelReferralSummary.textContent = referral ? referral.summary : "";
  el.modelNoReferral.hidden = Boolean(referral) || card.trained === false;
  const trained = Array.isArray(card.trained_labels) ? card.trained_labels : [];
  const negative = (referral && referral.negative_threshold) || {};
  state.cardClearsNothing =
    Boolean(referral) && trained.length > 0 && trained.every((label) => negative[label] == null);
  updateNoClearing();
  renderGuarantee(card.guarantee);
  el.modelLoading.hidden = true;
  el.modelBody.hidden = false;
}

// Why the rule's state last changed, in words (the API's guarantee.change_reason).
const CHANGE_TEXT = {
  first_start: "started",
  mode_set: "mode set by a person or a setting",
  miss_rate_exceeded: "the radiologists' verdicts showed the rule missing more than it promised",
  coverage_below: "too few of the films it cleared got a radiologist's verdict",
  drift_alert: "the films coming in no longer look like those the model has been seeing (input drift)",
  suspended_by_person: "suspended by a person",
  resumed: "re-enabled by a person",
};
const MODE_TEXT = {
  shadow: "shadow mode (every film read; the rule's clearances checked against verdicts)",
  supervised: "supervised (films the rule clears are still read)",
  autonomous: "autonomous (films the rule clears are not read)",
};
const asPercent = (value) => `${(100 * value).toFixed(1)}%`;

// The rule's live status on this site (GET /v1/model's guarantee): mode, state, every promise's bounds against
// its alpha, coverage and the last change. Hidden when the model has no rule or the watch has not run yet.
function renderGuarantee(status) {
  el.guaranteeStatus.hidden = !status;
  el.guaranteeSuspended.hidden = !status || status.state !== "suspended";
  el.guaranteeShadow.hidden = !status || status.mode !== "shadow" || status.state === "suspended";
  if (!status) return;
  const since = new Date(status.changed_at).toLocaleString();
  const why = CHANGE_TEXT[status.change_reason] || status.change_reason;
  el.guaranteeState.textContent =
    status.state === "suspended"
      ? `rule suspended since ${since}: ${why}. Every film goes to a radiologist.`
      : `${MODE_TEXT[status.mode] || status.mode}; last change ${since} (${why}).`;
  el.guaranteeSuspendedWhy.textContent = `Since ${since}: ${why}.`;
  el.guaranteeCoverage.textContent =
    status.cleared === 0
      ? `${status.films} films scored; the rule has cleared none yet.`
      : `${status.films} films scored; radiologists' verdicts for ${status.cleared_with_verdict} of the ` +
        `${status.cleared} films the rule cleared (${asPercent(status.coverage)}).`;
  const body = el.guaranteeTable.querySelector("tbody");
  body.replaceChildren();
  const promises = Object.entries(status.findings || {}).filter(([, p]) => p.judged_films > 0);
  if (status.study && status.study.judged_films > 0) promises.push(["Abnormal films cleared", status.study]);
  for (const [name, promise] of promises) {
    const row = document.createElement("tr");
    row.dataset.testid = "guarantee-row";
    if (promise.broken) row.classList.add("guarantee-table__broken");
    const cells = [
      name,
      `${promise.misses} of ${promise.judged_films}`,
      `${asPercent(promise.lower)} to ${asPercent(promise.upper)}`,
      `${asPercent(promise.limit)}${promise.broken ? " (broken)" : ""}`,
    ];
    for (const text of cells) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    body.append(row);
  }
  el.guaranteeTable.hidden = promises.length === 0;
  el.guaranteeChecked.textContent =
    (promises.length === 0 ? "No radiologists' verdicts yet. " : "") +
    `Bounds hold at ${asPercent(status.confidence)} confidence however often they are read; ` +
    `checked ${new Date(status.checked_at).toLocaleString()}.`;
}

// One plain sentence at the top when the referral rule can rule out nothing: from the model card (every
// negative threshold null) or from a result (every finding's clear_below null).
function updateNoClearing() {
  el.noClearing.hidden = !(state.cardClearsNothing || state.resultClearsNothing);
}

// --- errors ---------------------------------------------------------------------------------------

function showError(err) {
  const status = err.status;
  el.errorTitle.textContent = err.network ? err.title : TITLES[status] || err.title || "The request failed";
  el.errorDetail.textContent = err.detail || (status ? `The service answered ${status} ${err.title || ""}.` : err.message);
  let suggestion = err.network
    ? "Check your connection and that the service is running, then try again."
    : SUGGESTIONS[status] || (status >= 500 ? SUGGESTIONS[500] : "Check the file and try again.");
  if (status === 503) {
    const seconds = Number.parseInt(err.retryAfter || "", 10);
    suggestion += Number.isFinite(seconds) && seconds > 0 ? ` Try again in ${seconds} s.` : " Try again in a moment.";
  }
  el.errorSuggestion.textContent = suggestion;
  el.errorRequestId.textContent = err.requestId ? `Request ID: ${err.requestId}` : "";
  el.errorRetry.hidden = !(state.file && (err.network || status === 503 || status === 401 || status >= 500));
  el.error.hidden = false;
  if (status === 401) {
    el.access.open = true;
    el.apiKey.focus();
  }
}

function hideError() {
  el.error.hidden = true;
}

// --- radiograph display ---------------------------------------------------------------------------

async function sniff(file) {
  const head = new Uint8Array(await file.slice(0, 132).arrayBuffer());
  if (head[0] === 0x89 && head[1] === 0x50 && head[2] === 0x4e && head[3] === 0x47) return "png";
  if (head[0] === 0xff && head[1] === 0xd8 && head[2] === 0xff) return "jpeg";
  if (String.fromCharCode(...head.slice(128, 132)) === "DICM") return "dicom";
  return "unknown";
}

function resetViewer() {
  if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
  state.objectUrl = null;
  state.previewShown = false;
  state.previewRequested = false;
  state.imageSize = null;
  el.radiograph.removeAttribute("src");
  el.radiograph.hidden = true;
  el.overlay.hidden = true;
  el.overlay.removeAttribute("src");
  el.placeholder.hidden = true;
  el.viewerWindow.style.removeProperty("--ar");
  el.imageInfo.textContent = "";
  el.viewer.hidden = true;
  el.camControls.hidden = true;
  el.camEmpty.hidden = true;
  el.camScale.hidden = true;
  viewer.reset();
}

// The display box takes the original radiograph's aspect ratio; both the radiograph (or its square preview)
// and the heatmap (computed on the image squashed to the model's square input) are stretched over it.
function updateAspect() {
  let ratio = null;
  if (state.imageSize && state.imageSize.width > 0 && state.imageSize.height > 0) {
    ratio = state.imageSize.width / state.imageSize.height;
  } else if (el.radiograph.naturalWidth > 0 && el.radiograph.naturalHeight > 0) {
    ratio = el.radiograph.naturalWidth / el.radiograph.naturalHeight;
  }
  if (ratio) el.viewerWindow.style.setProperty("--ar", String(ratio));
}

function showPlaceholder(text) {
  el.viewer.hidden = false;
  el.radiograph.hidden = true;
  el.placeholder.textContent = text;
  el.placeholder.hidden = false;
}

function showImage(src, altText) {
  el.viewer.hidden = false;
  el.placeholder.hidden = true;
  el.radiograph.alt = altText;
  el.radiograph.src = src;
}

async function requestPreview(generation, file) {
  if (state.previewRequested) return;
  state.previewRequested = true;
  showPlaceholder("Rendering preview…");
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const response = await request(API.preview, {
      method: "POST",
      body: form,
      headers: apiHeaders(),
      signal: state.controller.signal,
    });
    const blob = await response.blob();
    if (generation !== state.generation) return;
    if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
    state.objectUrl = URL.createObjectURL(blob);
    state.previewShown = true;
    showImage(state.objectUrl, `Radiograph ${file.name} (server-rendered preview)`);
  } catch (err) {
    if (err.name === "AbortError" || generation !== state.generation) return;
    showPlaceholder(`No preview: ${err.detail || err.title || err.message}`);
  }
}

el.radiograph.addEventListener("load", () => {
  el.radiograph.hidden = false;
  updateAspect();
});

el.radiograph.addEventListener("error", () => {
  // The browser cannot display this file (a PNG/JPEG variant it does not decode): ask the server.
  if (!el.radiograph.getAttribute("src") || state.previewShown || !state.file) return;
  requestPreview(state.generation, state.file);
});

// --- results --------------------------------------------------------------------------------------

// Why every finding is withheld: the API's decisions_withheld, or (older answers) the gates it reports.
function withheldCodes(result, referral) {
  const codes = new Set(Array.isArray(result.decisions_withheld) ? result.decisions_withheld : []);
  if (result.ood && result.ood.in_distribution === false) codes.add("out_of_distribution");
  for (const code of Object.keys(WITHHELD_TEXT)) if (referral.reasons.includes(code)) codes.add(code);
  return [...codes];
}

function referralReasonText(code, referral) {
  if (code === "population_unverified") {
    const missing = (referral.population_missing || ["age", "view"]).map((item) => MISSING_TEXT[item] || item);
    const what = missing.length ? missing.join(" and ") : "the patient's age and the view";
    return `nothing establishes ${what} (declare them with the upload), so the film cannot be cleared`;
  }
  return REASON_TEXT[code] || code;
}

function renderResults(result) {
  const predictions = Object.entries(result.predictions || {}).sort(
    ([aName, a], [bName, b]) => b.conf - a.conf || aName.localeCompare(bName),
  );
  const cams = result.gradcam || {};
  const ood = result.ood;
  const offTarget = Boolean(ood) && ood.in_distribution === false;
  const referral = result.referral || { refer: true, reasons: [], population: [] };
  const outside = referral.reasons.includes("outside_intended_population");
  // An image the model was not made for gets no probability, bar or heatmap: numbers about it would read as
  // findings. The banners say why, and one sentence says that nothing is shown.
  const withheld = withheldCodes(result, referral);

  el.ood.hidden = !offTarget;
  el.oodDetail.textContent = offTarget
    ? ` Its out-of-distribution score ${ood.score.toPrecision(3)} is above the model's threshold ` +
      `${ood.threshold.toPrecision(3)}.`
    : "";
  el.population.hidden = !outside;
  el.populationDetail.textContent = outside
    ? ` The header describes ${(referral.population || []).map((code) => POPULATION_TEXT[code] || code).join(", ")}; ` +
      "the model was made for adult frontal chest radiographs."
    : "";
  el.refer.hidden = !referral.refer;
  // With every finding withheld, reasons about single findings would point at findings not shown.
  const reasons = withheld.length
    ? referral.reasons.filter((code) => !FINDING_LEVEL_REASONS.has(code))
    : referral.reasons;
  el.referReasons.textContent = referral.refer
    ? ` Why: ${reasons.map((code) => referralReasonText(code, referral)).join("; ")}.`
    : "";
  el.cleared.hidden = referral.refer;

  el.withheld.hidden = withheld.length === 0;
  el.withheld.textContent = withheld.length
    ? `No findings are shown because ${withheld.map((code) => WITHHELD_TEXT[code] || code).join(", and ")}. ` +
      "A radiologist should read this film."
    : "";
  el.findingsBlock.hidden = withheld.length > 0;
  const rows = withheld.length ? [] : predictions.map(([label, p]) => renderRow(label, p, label in cams, result));
  el.findingsBody.replaceChildren(...rows);
  renderLegend(withheld.length ? [] : predictions.map(([label, p]) => ruleFor(label, p)));

  const clearBelows = predictions.map(([, p]) => p.clear_below);
  state.resultClearsNothing =
    predictions.length > 0 && predictions.every(([, p]) => "clear_below" in p) && clearBelows.every((x) => x == null);
  updateNoClearing();

  const untrained = state.card && Array.isArray(state.card.untrained_labels) ? state.card.untrained_labels : [];
  const missing = untrained.filter((label) => !(label in (result.predictions || {})));
  el.resultsUntrained.hidden = missing.length === 0;
  el.resultsUntrained.textContent = missing.length ? `Not assessed: ${missing.join(", ")}.` : "";

  const warnings = (result.image && result.image.warnings) || [];
  el.imageWarnings.replaceChildren(
    ...warnings.map((w) => {
      const li = document.createElement("li");
      li.textContent = w;
      return li;
    }),
  );
  el.imageWarnings.hidden = warnings.length === 0;

  const samples = Number(result.mc_samples) || 0;
  const total = result.timing_ms ? formatMs(result.timing_ms.total) : "";
  el.runMeta.textContent = `${samples} Monte-Carlo sample${samples === 1 ? "" : "s"}${total ? `, ${total}` : ""}`;
  const model = result.model || {};
  const sha = model.sha256 ? ` · weights ${String(model.sha256).slice(0, 12)}` : "";
  const seed = result.mc_seed ? ` · MC seed ${result.mc_seed}` : "";
  el.requestId.textContent =
    `Request ID: ${result.request_id || "—"} · ${model.name || "model"} v${model.version || "?"}${sha}${seed}`;

  if (result.image) {
    const img = result.image;
    el.imageInfo.textContent = `${String(img.format).toUpperCase()} · ${img.width} × ${img.height} px · ${img.photometric}`;
  }

  if (withheld.length) {
    renderCams({}, []);
    el.camEmpty.hidden = true;
  } else {
    renderCams(cams, predictions.map(([label]) => label));
  }
  el.resultsEmpty.hidden = true;
  el.resultsBody.hidden = false;
}

// The rule that decided this finding, as the answer states it (predictions[label].clear_below, positive_at,
// decided_on, reason). An older service without those fields: the model card's referral thresholds, which
// its rule used. The legacy `threshold` (Youden's J) decides nothing and is never drawn.
function ruleFor(label, p) {
  if ("clear_below" in p || "positive_at" in p) {
    return {
      clearBelow: nullableProbability(p.clear_below),
      positiveAt: nullableProbability(p.positive_at),
      decidedOn: p.decided_on === "interval" ? "interval" : "conf",
      reason: typeof p.reason === "string" ? p.reason : null,
      known: true,
    };
  }
  const referral = state.card && state.card.referral;
  if (!referral) return { clearBelow: null, positiveAt: null, decidedOn: "conf", reason: null, known: false };
  return {
    clearBelow: nullableProbability((referral.negative_threshold || {})[label]),
    positiveAt: nullableProbability((referral.positive_threshold || {})[label]),
    decidedOn: referral.score === "interval" ? "interval" : "conf",
    reason: null,
    known: true,
  };
}

function renderLegend(rules) {
  el.legendClear.hidden = !rules.some((rule) => rule.clearBelow !== null);
  el.legendPositive.hidden = !rules.some((rule) => rule.positiveAt !== null);
  const kinds = new Set(rules.filter((rule) => rule.known).map((rule) => rule.decidedOn));
  const parts = [];
  if (kinds.has("conf")) parts.push("The rule compares the mean (the end of the bar) with the marks.");
  if (kinds.has("interval")) {
    parts.push(
      "The rule compares the whole range: ruled out when all of it lies below the clearing mark, " +
        "positive when all of it lies at or above the positive mark.",
    );
  }
  el.legendRule.textContent = parts.join(" ");
  el.legendRule.hidden = parts.length === 0;
}

function markTitle(kind, value, decidedOn) {
  let what = "the mean";
  if (decidedOn === "interval") what = kind === "clear" ? "the 95th percentile" : "the 5th percentile";
  return kind === "clear"
    ? `Ruled out when ${what} is below ${percent(value)}`
    : `Called positive when ${what} reaches ${percent(value)}`;
}

function renderEvidence(node, label) {
  const evidence = state.card && state.card.evidence ? state.card.evidence[label] : null;
  if (!evidence) return;
  const two = (x) => Number(x).toFixed(2);
  let text = evidence.auroc == null ? "AUROC not measured" : `AUROC ${two(evidence.auroc)}`;
  if (evidence.auroc != null && evidence.ci_low != null && evidence.ci_high != null) {
    text += ` (95% CI ${two(evidence.ci_low)}–${two(evidence.ci_high)})`;
  }
  if (evidence.n_films != null) text += `, ${evidence.n_films} films`;
  node.textContent = text;
  node.title = evidence.source ? `Measured on ${evidence.source}` : "";
  if (evidence.better_than_chance === false) {
    const badge = document.createElement("span");
    badge.className = "finding__chance";
    badge.dataset.testid = "not-better-than-chance";
    badge.textContent = "not better than chance";
    badge.title = "The 95% confidence interval of the AUROC includes 0.5";
    node.append(" ", badge);
  }
  node.hidden = false;
}

function renderRow(label, p, hasCam, result) {
  const row = el.rowTemplate.content.firstElementChild.cloneNode(true);
  const conf = clamp01(p.conf);
  const [lo, hi] = Array.isArray(p.interval) ? p.interval.map(clamp01) : [conf, conf];
  const decision = DECISION_TEXT[p.decision] ? p.decision : "uncertain";
  const rule = ruleFor(label, p);

  row.dataset.label = label;
  row.dataset.decision = decision;
  row.dataset.conf = String(conf);
  row.querySelector(".finding__name").textContent = label;
  renderEvidence(row.querySelector(".finding__evidence"), label);

  const bar = row.querySelector(".bar");
  bar.style.setProperty("--conf", String(conf));
  bar.style.setProperty("--lo", String(lo));
  bar.style.setProperty("--hi", String(hi));
  bar.classList.add(`bar--${decision}`);
  const marks = [];
  for (const [kind, value] of [
    ["clear", rule.clearBelow],
    ["positive", rule.positiveAt],
  ]) {
    const mark = row.querySelector(`.bar__mark--${kind}`);
    if (value === null) continue;
    mark.hidden = false;
    mark.style.setProperty("--at", String(value));
    mark.dataset.value = String(value);
    mark.title = markTitle(kind, value, rule.decidedOn);
    marks.push(mark.title);
  }
  const cannotClear = rule.known && rule.clearBelow === null;
  if (cannotClear) marks.push("cannot be ruled out by this model");
  const rangeText = percentRange(lo, hi);
  bar.setAttribute("aria-label", [`mean ${percent(conf)}`, `range ${rangeText}`, ...marks].join("; "));
  bar.title = [`Mean ${percent(conf)} · range (5th–95th percentile) ${rangeText}`, ...marks].join("\n");

  const samples = Number(result.mc_samples) || 0;
  const se = p.mc_standard_error == null ? Number.NaN : Number(p.mc_standard_error);
  const estimate = row.querySelector(".finding__estimate");
  estimate.title =
    `Mean of ${samples} Monte-Carlo samples` +
    (Number.isFinite(se) ? `; Monte-Carlo standard error ±${(se * 100).toFixed(1)} percentage points` : "");
  row.querySelector(".finding__conf").textContent = percent(conf);
  const interval = row.querySelector(".finding__interval");
  interval.textContent = rangeText;
  interval.title = "5th–95th percentile of the Monte-Carlo samples: 90% of them fell in this range";
  const straddles = [rule.clearBelow, rule.positiveAt].some((mark) => mark !== null && lo < mark && mark <= hi);
  const unsure =
    straddles ||
    hi - lo >= WIDE_RANGE ||
    rule.reason === "between_thresholds" ||
    rule.reason === "no_rule_mc_disagreement" ||
    (!rule.known && decision === "uncertain");
  const sureness = row.querySelector(".finding__sureness");
  sureness.textContent = unsure ? "the model is unsure" : "samples agree";
  sureness.classList.add(unsure ? "finding__sureness--unsure" : "finding__sureness--sure");
  row.dataset.unsure = String(unsure);

  const chip = row.querySelector(".chip");
  chip.textContent = DECISION_TEXT[decision];
  chip.dataset.decision = decision;
  chip.classList.add(`chip--${decision}`);
  const reason = row.querySelector(".finding__reason");
  const reasonText =
    cannotClear && decision !== "positive"
      ? FINDING_REASON_TEXT.cannot_be_cleared_by_this_model
      : FINDING_REASON_TEXT[rule.reason];
  if (reasonText) {
    reason.textContent = reasonText;
    reason.hidden = false;
  }

  const camButton = row.querySelector(".finding__cam");
  if (hasCam) {
    camButton.hidden = false;
    camButton.setAttribute("aria-label", `Show the Grad-CAM heatmap for ${label}`);
    camButton.addEventListener("click", () => {
      el.camSelect.value = label;
      applyCam();
      el.viewer.scrollIntoView({ behavior: "smooth", block: "nearest" });
    });
  }
  return row;
}

// After an upload the verdict is what is read first: it takes the focus (without a jump), and is scrolled
// into view where it is not already wholly on screen (a phone, where it sits below the film).
function revealVerdict() {
  const active = document.activeElement;
  const typing = active && active !== el.fileInput && active.matches("input, select, textarea");
  if (!typing) el.verdict.focus({ preventScroll: true });
  const box = el.verdict.getBoundingClientRect();
  if (box.top < 0 || box.bottom > window.innerHeight) {
    const smooth = !window.matchMedia("(prefers-reduced-motion: reduce)").matches;
    el.verdict.scrollIntoView({ block: "start", behavior: smooth ? "smooth" : "auto" });
  }
}

// --- Grad-CAM -------------------------------------------------------------------------------------

let camSources = {};

function renderCams(cams, orderedLabels) {
  camSources = {};
  const labels = orderedLabels.filter((label) => cams[label] && cams[label].png_base64);
  for (const label of Object.keys(cams)) if (!labels.includes(label) && cams[label].png_base64) labels.push(label);
  for (const label of labels) camSources[label] = `data:image/png;base64,${cams[label].png_base64}`;

  const none = new Option("None", "none");
  el.camSelect.replaceChildren(none, ...labels.map((label) => new Option(label, label)));
  el.camControls.hidden = labels.length === 0;
  el.camEmpty.hidden = labels.length !== 0;
  el.camSelect.value = labels.length ? labels[0] : "none";
  applyCam();
}

function applyCam() {
  const label = el.camSelect.value;
  const opacity = Number(el.camOpacity.value) / 100;
  el.camOpacityValue.textContent = `${el.camOpacity.value}%`;
  el.camOpacity.setAttribute("aria-valuetext", `${el.camOpacity.value}%`);
  el.overlay.style.opacity = String(opacity);
  if (!label || label === "none" || !camSources[label]) {
    markCamRow(null);
    el.overlay.hidden = true;
    el.overlay.removeAttribute("src");
    el.overlay.alt = "";
    el.camScale.hidden = true;
    return;
  }
  markCamRow(label);
  el.overlay.alt = `Grad-CAM heatmap for ${label}`;
  if (el.overlay.getAttribute("src") !== camSources[label]) el.overlay.src = camSources[label];
  el.overlay.hidden = false;
  el.camScale.hidden = false;
}

// The finding whose heatmap is on screen is highlighted in the table, and its button says so.
function markCamRow(label) {
  for (const row of el.findingsBody.querySelectorAll("tr.finding")) {
    const active = row.dataset.label === label;
    row.classList.toggle("finding--cam-active", active);
    const button = row.querySelector(".finding__cam");
    if (!button.hidden) button.setAttribute("aria-pressed", String(active));
  }
}

el.camSelect.addEventListener("change", applyCam);
el.camOpacity.addEventListener("input", applyCam);

// --- upload flow ----------------------------------------------------------------------------------

function setBusy(busy) {
  el.results.setAttribute("aria-busy", String(busy));
  document.body.classList.toggle("is-busy", busy);
  el.dropzone.classList.toggle("dropzone--busy", busy);
}

// POST /v1/predict's query: heatmaps chosen by the service, and the patient's age and view where the user
// declared them (a PNG or JPEG carries neither; without both such a film is never cleared).
function predictUrl() {
  const query = new URLSearchParams({ cams: "auto" });
  const age = el.patientAge.value.trim();
  if (age !== "") query.set("patient_age", String(Number(age)));
  if (el.view.value) query.set("view", el.view.value);
  return `${API.predict}?${query}`;
}

async function analyse(file) {
  if (!file) return;
  if (!el.patientAge.checkValidity()) {
    el.patientAge.reportValidity();
    el.patientAge.focus();
    setStatus("Enter the age in years, from 0 to 150, or leave it empty.");
    return;
  }
  if (state.controller) state.controller.abort();
  state.controller = new AbortController();
  const generation = ++state.generation;
  state.file = file;

  hideError();
  resetViewer();
  el.resultsBody.hidden = true;
  el.resultsEmpty.hidden = false;
  el.resultsEmpty.textContent = "Analysing…";
  el.runMeta.textContent = "";
  setBusy(true);
  setStatus(`Analysing ${file.name}…`);

  const kind = await sniff(file);
  if (generation !== state.generation) return;
  if (kind === "png" || kind === "jpeg") {
    state.objectUrl = URL.createObjectURL(file);
    showImage(state.objectUrl, `Radiograph ${file.name}`);
  } else if (kind === "dicom") {
    requestPreview(generation, file); // browsers cannot render DICOM
  } else {
    showPlaceholder("Waiting for the service to read the file…");
  }

  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const response = await request(predictUrl(), {
      method: "POST",
      body: form,
      headers: apiHeaders(),
      signal: state.controller.signal,
    });
    const result = await response.json();
    if (generation !== state.generation) return;
    state.imageSize = result.image ? { width: result.image.width, height: result.image.height } : null;
    updateAspect();
    if (kind === "unknown") requestPreview(generation, file); // the server read it: show its rendering
    renderResults(result);
    const refer = !result.referral || result.referral.refer;
    const withheld = !el.withheld.hidden;
    setStatus(
      `${refer ? "Refer: a radiologist should review" : "Cleared as normal:"} ${file.name}.` +
        (withheld ? " No findings are shown." : ` ${Object.keys(result.predictions || {}).length} findings.`),
    );
    revealVerdict();
  } catch (err) {
    if (err.name === "AbortError" || generation !== state.generation) return;
    el.resultsEmpty.textContent = "No findings: the image was not analysed.";
    if (kind === "unknown") resetViewer();
    showError(err);
    setStatus(`Analysis of ${file.name} failed: ${el.errorTitle.textContent}.`);
  } finally {
    if (generation === state.generation) setBusy(false);
  }
}

el.fileInput.addEventListener("change", () => {
  const file = el.fileInput.files && el.fileInput.files[0];
  analyse(file);
  // Allow choosing the same file again (e.g. after entering an API key).
  el.fileInput.value = "";
});

el.errorRetry.addEventListener("click", () => {
  if (!state.card) loadModelCard();
  analyse(state.file);
});

// Drag and drop anywhere on the drop zone; a drop elsewhere on the page must not navigate away.
let dragDepth = 0;
el.dropzone.addEventListener("dragenter", (event) => {
  event.preventDefault();
  dragDepth += 1;
  el.dropzone.classList.add("dropzone--over");
});
el.dropzone.addEventListener("dragover", (event) => {
  event.preventDefault();
  if (event.dataTransfer) event.dataTransfer.dropEffect = "copy";
});
el.dropzone.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (dragDepth === 0) el.dropzone.classList.remove("dropzone--over");
});
el.dropzone.addEventListener("drop", (event) => {
  event.preventDefault();
  dragDepth = 0;
  el.dropzone.classList.remove("dropzone--over");
  const files = event.dataTransfer ? event.dataTransfer.files : null;
  if (files && files.length > 1) setStatus(`${files.length} files dropped: analysing the first one only.`);
  if (files && files.length) analyse(files[0]);
});
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("drop", (event) => event.preventDefault());

// --- API key (kept for this tab only) -------------------------------------------------------------

try {
  el.apiKey.value = sessionStorage.getItem(API_KEY_STORAGE) || "";
} catch (_err) {
  // Storage can be disabled; the key then lives only in the field.
}
if (el.apiKey.value) el.access.open = true;
el.apiKey.addEventListener("change", () => {
  try {
    sessionStorage.setItem(API_KEY_STORAGE, el.apiKey.value.trim());
  } catch (_err) {
    // See above.
  }
  if (!state.card) loadModelCard();
});

loadModelCard();
