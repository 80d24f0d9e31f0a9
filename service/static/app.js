// Web page of the chest X-ray inference service: upload one radiograph, show the model's findings with
// their Monte-Carlo uncertainty, the refer flag and Grad-CAM heatmaps. Plain JS, no build step, no
// external assets; talks only to this origin's /v1 API.
"use strict";

(() => {
  const API = {
    model: "/v1/model",
    predict: "/v1/predict?cams=auto",
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
    outside_intended_population: "the DICOM header says it is outside the intended use",
    no_referral_rule: "this model has no fitted referral rule",
  };
  const POPULATION_TEXT = {
    paediatric: "a child",
    lateral_or_oblique_view: "a lateral or oblique view",
    non_chest_body_part: "not a chest",
  };

  const $ = (testid) => document.querySelector(`[data-testid="${testid}"]`);
  const el = {
    apiKey: $("api-key"),
    access: $("access"),
    modelNote: $("model-note"),
    modelLoading: $("model-note-loading"),
    modelBody: document.querySelector(".model-note__body"),
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
    frame: $("viewer-frame"),
    radiograph: $("radiograph"),
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
    ood: $("ood-banner"),
    oodDetail: $("ood-detail"),
    findingsBody: $("findings-body"),
    resultsUntrained: $("results-untrained"),
    imageWarnings: $("image-warnings"),
    requestId: $("request-id"),
    rowTemplate: document.getElementById("finding-row-template"),
  };

  const state = {
    card: null, // GET /v1/model body, or null
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

  function formatVariance(v) {
    const n = Number(v) || 0;
    if (n === 0) return "0";
    return n >= 0.001 ? n.toFixed(4) : n.toExponential(1);
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
    el.modelLoading.hidden = true;
    el.modelBody.hidden = false;
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
    el.frame.style.removeProperty("--ar");
    el.imageInfo.textContent = "";
    el.viewer.hidden = true;
    el.camControls.hidden = true;
    el.camEmpty.hidden = true;
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
    if (ratio) el.frame.style.setProperty("--ar", String(ratio));
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

  function renderResults(result) {
    const predictions = Object.entries(result.predictions || {}).sort(
      ([aName, a], [bName, b]) => b.conf - a.conf || aName.localeCompare(bName),
    );
    const cams = result.gradcam || {};
    // The out-of-distribution gate (null when the model has none) and the DICOM header's population checks:
    // the numbers below are about an image the model was not made for, so no decision is shown as if it applied.
    const ood = result.ood;
    const offTarget = Boolean(ood) && ood.in_distribution === false;
    const referral = result.referral || { refer: true, reasons: [], population: [] };
    const outside = referral.reasons.includes("outside_intended_population");
    const withheld = offTarget || outside;
    const rows = predictions.map(([label, p]) => renderRow(label, p, label in cams, withheld));
    el.findingsBody.replaceChildren(...rows);

    el.refer.hidden = !referral.refer;
    el.referReasons.textContent = referral.refer
      ? ` Why: ${referral.reasons.map((code) => REASON_TEXT[code] || code).join("; ")}.`
      : "";
    el.cleared.hidden = referral.refer;
    el.population.hidden = !outside;
    el.populationDetail.textContent = outside
      ? ` The header describes ${(referral.population || []).map((code) => POPULATION_TEXT[code] || code).join(", ")}; ` +
        "the model was made for adult frontal chest radiographs, so no decision is shown."
      : "";
    el.ood.hidden = !offTarget;
    el.oodDetail.textContent = offTarget
      ? ` Its out-of-distribution score ${ood.score.toFixed(1)} is above the model's threshold ` +
        `${ood.threshold.toFixed(1)}: the findings below are not meaningful for this image, and no decision is shown.`
      : "";

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
    el.requestId.textContent = `Request ID: ${result.request_id || "—"} · ${model.name || "model"} v${model.version || "?"}${sha}`;

    if (result.image) {
      const img = result.image;
      el.imageInfo.textContent = `${String(img.format).toUpperCase()} · ${img.width} × ${img.height} px · ${img.photometric}`;
    }

    renderCams(cams, predictions.map(([label]) => label));
    el.resultsEmpty.hidden = true;
    el.resultsBody.hidden = false;
  }

  function renderRow(label, p, hasCam, withheld) {
    const row = el.rowTemplate.content.firstElementChild.cloneNode(true);
    const conf = clamp01(p.conf);
    const [lo, hi] = Array.isArray(p.interval) ? p.interval.map(clamp01) : [conf, conf];
    const threshold = clamp01(p.threshold ?? 0.5);
    const decision = DECISION_TEXT[p.decision] ? p.decision : "uncertain";

    row.dataset.label = label;
    row.dataset.decision = decision;
    row.dataset.conf = String(conf);
    row.querySelector(".finding__name").textContent = label;
    const variance = row.querySelector(".finding__variance");
    variance.textContent = `variance ${formatVariance(p.uncertainty)}`;
    variance.title = `Variance of the ${label} probability over the Monte-Carlo samples (std ${formatVariance(p.std)})`;

    const bar = row.querySelector(".bar");
    bar.style.setProperty("--conf", String(conf));
    bar.style.setProperty("--lo", String(lo));
    bar.style.setProperty("--hi", String(hi));
    bar.style.setProperty("--threshold", String(threshold));
    bar.classList.add(`bar--${decision}`);
    bar.setAttribute(
      "aria-label",
      `${percent(conf)}; 5th to 95th percentile ${percent(lo)} to ${percent(hi)}; threshold ${percent(threshold, 0)}`,
    );
    bar.title = `Mean ${percent(conf)} · samples 5th–95th percentile ${percent(lo)}–${percent(hi)} · threshold ${percent(threshold, 0)}`;

    row.querySelector(".finding__conf").textContent = percent(conf);
    row.querySelector(".finding__interval").textContent = `${(lo * 100).toFixed(1)}–${percent(hi)}`;
    row.querySelector(".finding__interval").title = "5th–95th percentile of the Monte-Carlo samples";

    const chip = row.querySelector(".chip");
    if (withheld) {
      // No chip that reads as a verdict on an image the model was not made for.
      chip.textContent = "No decision";
      chip.dataset.decision = "withheld";
      chip.classList.add("chip--withheld");
      chip.title = "Not applicable: the image is outside what the model was made for";
      bar.classList.remove(`bar--${decision}`);
      bar.classList.add("bar--withheld");
    } else {
      chip.textContent = DECISION_TEXT[decision];
      chip.dataset.decision = decision;
      chip.classList.add(`chip--${decision}`);
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
      return;
    }
    markCamRow(label);
    el.overlay.alt = `Grad-CAM heatmap for ${label}`;
    if (el.overlay.getAttribute("src") !== camSources[label]) el.overlay.src = camSources[label];
    el.overlay.hidden = false;
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

  async function analyse(file) {
    if (!file) return;
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
      const response = await request(API.predict, {
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
      const n = Object.keys(result.predictions || {}).length;
      setStatus(
        `Analysis of ${file.name} complete: ${n} findings.${result.referral && result.referral.refer ? " Refer for review." : " Cleared as normal."}` +
        `${result.ood && result.ood.in_distribution === false ? " This does not look like a frontal chest radiograph." : ""}`,
      );
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
})();
