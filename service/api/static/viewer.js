// Film viewer: zoom, pan and window/level of the displayed radiograph, with pointer and keyboard.
//
// Zoom and pan are one CSS transform on the frame that holds both the film and its heatmap, so the heatmap
// stays registered with the film; the window clips the frame to the film's original box. Window/level is an
// SVG linear transfer function (filter #window-level) applied to the film image alone, never to the heatmap.
// It acts on the grey levels the browser displays: for a DICOM that is the server's 8-bit preview
// (POST /v1/preview), which already applied the file's own VOI window, so a narrower window stretches
// contrast within that range but cannot recover detail the file's window clipped.

const MIN_ZOOM = 1;
const MAX_ZOOM = 8;
const ZOOM_STEP = 1.25;
const PAN_STEP = 0.1; // fraction of the window per arrow key press
const DEFAULT_WINDOW = 100; // percent of the displayed grey range
const DEFAULT_LEVEL = 50;

export class FilmViewer {
  /**
   * @param {object} parts the window (clipping, focusable), frame (transformed), film image, the zoom
   *   buttons, zoom output, window/level sliders and outputs, reset button, and the SVG transfer functions.
   */
  constructor(parts) {
    this.parts = parts;
    this.zoom = 1;
    this.x = 0; // translation in CSS pixels of the frame's top-left corner (transform-origin 0 0)
    this.y = 0;
    this.pointers = new Map(); // pointerId -> {x, y}
    this.gesture = null; // {kind: "pan" | "wl" | "pinch", ...}

    const p = parts;
    p.zoomIn.addEventListener("click", () => this.zoomBy(ZOOM_STEP));
    p.zoomOut.addEventListener("click", () => this.zoomBy(1 / ZOOM_STEP));
    p.reset.addEventListener("click", () => this.reset());
    p.windowInput.addEventListener("input", () => this.applyWindowLevel());
    p.levelInput.addEventListener("input", () => this.applyWindowLevel());
    p.window.addEventListener("keydown", (event) => this.onKey(event));
    p.window.addEventListener("wheel", (event) => this.onWheel(event), { passive: false });
    p.window.addEventListener("pointerdown", (event) => this.onPointerDown(event));
    p.window.addEventListener("pointermove", (event) => this.onPointerMove(event));
    for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) {
      p.window.addEventListener(type, (event) => this.onPointerUp(event));
    }
    // The window's size follows the layout (aspect ratio, viewport): keep the pan inside the film.
    new ResizeObserver(() => this.render()).observe(p.window);
    this.applyWindowLevel();
    this.render();
  }

  /** Back to the whole film at 100% and the displayed grey levels unchanged (a new film, or Reset). */
  reset() {
    this.zoom = 1;
    this.x = 0;
    this.y = 0;
    this.parts.windowInput.value = String(DEFAULT_WINDOW);
    this.parts.levelInput.value = String(DEFAULT_LEVEL);
    this.applyWindowLevel();
    this.render();
  }

  size() {
    return { width: this.parts.window.clientWidth, height: this.parts.window.clientHeight };
  }

  /** Zoom by `factor` about a point of the window (CSS px from its top-left; default: its centre). */
  zoomBy(factor, at) {
    const { width, height } = this.size();
    const cx = at ? at.x : width / 2;
    const cy = at ? at.y : height / 2;
    const zoom = Math.min(MAX_ZOOM, Math.max(MIN_ZOOM, this.zoom * factor));
    const ratio = zoom / this.zoom;
    // The film point under (cx, cy) stays under it.
    this.x = cx - (cx - this.x) * ratio;
    this.y = cy - (cy - this.y) * ratio;
    this.zoom = zoom;
    this.render();
  }

  panBy(dx, dy) {
    this.x += dx;
    this.y += dy;
    this.render();
  }

  /** Keep the film covering the window: at 100% nothing moves; zoomed, no edge comes inside the window. */
  clamp() {
    const { width, height } = this.size();
    this.x = Math.min(0, Math.max(width - width * this.zoom, this.x));
    this.y = Math.min(0, Math.max(height - height * this.zoom, this.y));
  }

  render() {
    this.clamp();
    const p = this.parts;
    p.frame.style.transform = `translate(${this.x}px, ${this.y}px) scale(${this.zoom})`;
    const text = `${Math.round(this.zoom * 100)}%`;
    p.zoomValue.textContent = text;
    p.zoomOut.disabled = this.zoom <= MIN_ZOOM;
    p.zoomIn.disabled = this.zoom >= MAX_ZOOM;
    p.window.classList.toggle("viewer__window--zoomed", this.zoom > MIN_ZOOM);
  }

  /**
   * Window and level in percent of the displayed grey range: grey g in [0, 1] becomes
   * (g - (level - window / 2)) / window, clipped to [0, 1] by the filter. 100% / 50% is the identity.
   */
  applyWindowLevel() {
    const p = this.parts;
    const width = Number(p.windowInput.value) / 100;
    const level = Number(p.levelInput.value) / 100;
    const slope = 1 / width;
    const intercept = -(level - width / 2) / width;
    for (const func of p.transfer) {
      func.setAttribute("slope", slope.toFixed(4));
      func.setAttribute("intercept", intercept.toFixed(4));
    }
    const identity = Number(p.windowInput.value) === DEFAULT_WINDOW && Number(p.levelInput.value) === DEFAULT_LEVEL;
    // No filter at all when it would change nothing: the browser then shows the film's own pixels.
    p.film.style.filter = identity ? "" : "url(#window-level)";
    p.windowValue.textContent = `${p.windowInput.value}%`;
    p.levelValue.textContent = `${p.levelInput.value}%`;
    p.windowInput.setAttribute("aria-valuetext", `window ${p.windowInput.value}% of the grey range`);
    p.levelInput.setAttribute("aria-valuetext", `level ${p.levelInput.value}% of the grey range`);
  }

  setWindowLevel(windowPercent, levelPercent) {
    const p = this.parts;
    const clampTo = (input, value) => Math.min(Number(input.max), Math.max(Number(input.min), Math.round(value)));
    p.windowInput.value = String(clampTo(p.windowInput, windowPercent));
    p.levelInput.value = String(clampTo(p.levelInput, levelPercent));
    this.applyWindowLevel();
  }

  onKey(event) {
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    const { width, height } = this.size();
    const actions = {
      "+": () => this.zoomBy(ZOOM_STEP),
      "=": () => this.zoomBy(ZOOM_STEP),
      "-": () => this.zoomBy(1 / ZOOM_STEP),
      _: () => this.zoomBy(1 / ZOOM_STEP),
      0: () => this.reset(),
      ArrowLeft: () => this.panBy(width * PAN_STEP, 0),
      ArrowRight: () => this.panBy(-width * PAN_STEP, 0),
      ArrowUp: () => this.panBy(0, height * PAN_STEP),
      ArrowDown: () => this.panBy(0, -height * PAN_STEP),
    };
    const action = actions[event.key];
    if (!action) return;
    // Arrow keys at 100% have nothing to pan: leave them to scroll the page.
    if (event.key.startsWith("Arrow") && this.zoom <= MIN_ZOOM) return;
    event.preventDefault();
    action();
  }

  onWheel(event) {
    // Ctrl + wheel (and a trackpad pinch, which browsers report as one) zooms; a plain wheel scrolls the page.
    if (!event.ctrlKey) return;
    event.preventDefault();
    const box = this.parts.window.getBoundingClientRect();
    this.zoomBy(Math.exp(-event.deltaY * 0.002), { x: event.clientX - box.left, y: event.clientY - box.top });
  }

  onPointerDown(event) {
    if (event.pointerType === "mouse" && event.button !== 0) return;
    this.pointers.set(event.pointerId, { x: event.clientX, y: event.clientY });
    this.parts.window.setPointerCapture(event.pointerId);
    if (this.pointers.size === 2) {
      const [a, b] = [...this.pointers.values()];
      this.gesture = { kind: "pinch", distance: Math.hypot(a.x - b.x, a.y - b.y) };
    } else if (event.shiftKey) {
      const p = this.parts;
      this.gesture = {
        kind: "wl",
        x0: event.clientX,
        y0: event.clientY,
        window0: Number(p.windowInput.value),
        level0: Number(p.levelInput.value),
      };
    } else {
      this.gesture = { kind: "pan", x: event.clientX, y: event.clientY };
    }
    this.parts.window.classList.add("viewer__window--dragging");
  }

  onPointerMove(event) {
    if (!this.pointers.has(event.pointerId) || !this.gesture) return;
    this.pointers.set(event.pointerId, { x: event.clientX, y: event.clientY });
    const g = this.gesture;
    if (g.kind === "pinch" && this.pointers.size === 2) {
      const [a, b] = [...this.pointers.values()];
      const distance = Math.hypot(a.x - b.x, a.y - b.y);
      const box = this.parts.window.getBoundingClientRect();
      const centre = { x: (a.x + b.x) / 2 - box.left, y: (a.y + b.y) / 2 - box.top };
      if (g.distance > 0) this.zoomBy(distance / g.distance, centre);
      g.distance = distance;
      return;
    }
    if (g.kind === "pan") {
      this.panBy(event.clientX - g.x, event.clientY - g.y);
      g.x = event.clientX;
      g.y = event.clientY;
    } else if (g.kind === "wl") {
      // The radiology convention: horizontal drag widens the window, vertical drag moves the level; a drag
      // across the whole film spans the whole range.
      const { width, height } = this.size();
      const dWindow = ((event.clientX - g.x0) / Math.max(1, width)) * 100;
      const dLevel = ((g.y0 - event.clientY) / Math.max(1, height)) * 100;
      this.setWindowLevel(g.window0 + dWindow, g.level0 + dLevel);
    }
  }

  onPointerUp(event) {
    this.pointers.delete(event.pointerId);
    if (this.pointers.size === 0) {
      this.gesture = null;
      this.parts.window.classList.remove("viewer__window--dragging");
    } else if (this.gesture && this.gesture.kind === "pinch") {
      const [rest] = [...this.pointers.values()];
      this.gesture = { kind: "pan", x: rest.x, y: rest.y };
    }
  }
}
