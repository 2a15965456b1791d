// P3S Point Selector: a canvas widget on the "P3SPointSelector" node to click the subject's points.
//
// - The node's `points_store` STRING widget is hidden; it still holds (and serialises) the points as
//   JSON: {"version": 1, "width": W, "height": H, "images": [{"positive": [[x, y], ...],
//   "negative": [[x, y], ...]}, ...]} in pixels of the W x H reference image (what the Python side,
//   P3SPoints.from_widget_state, reads).
// - A DOM widget (a toolbar and a <canvas>) shows the reference image scaled to fit (the node is never
//   resized to the image). The image comes from the Load Image node wired to `image` (read from its
//   `image` widget, before any run), or after a run from the node's `p3s_images` (every batch image).
// - Left click: positive point (green). Right click or shift+click: negative point (red). A click on
//   (near) an existing point removes it. The arrows step through the batch.
// - Built on the frontend's public extension API only (registerExtension, node lifecycle callbacks,
//   addDOMWidget, widget value/callback/hidden/options), so it works on the classic canvas of
//   frontends 1.32 and 1.49 and in 1.49's Vue nodes ("Nodes 2.0"), where the same DOM element is
//   mounted inside the node, and in frontend 1.58 (classic and Vue nodes). Where the displays differ,
//   the comments below say which internal.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPE = "P3SPointSelector";
const STORE_WIDGET = "points_store";
const STATE_VERSION = 1;
const POINT_RADIUS = 6; // layout px of the widget
const HIT_RADIUS = 10; // layout px: a click this close to a point removes it
const TOOLBAR_HEIGHT = 24;
const POS_COLOR = "rgb(26, 230, 51)"; // the Python preview's (0.1, 0.9, 0.2)
const NEG_COLOR = "rgb(242, 38, 38)"; // the Python preview's (0.95, 0.15, 0.15)

// ---------------------------------------------------------------------------------------- state
function emptyState() {
  return { version: STATE_VERSION, width: 0, height: 0, images: [] };
}

function toPair(p) {
  if (Array.isArray(p) && p.length >= 2) return [Number(p[0]), Number(p[1])];
  if (p && typeof p === "object" && "x" in p && "y" in p) return [Number(p.x), Number(p.y)];
  return null;
}

/** The widget text parsed into a normalised state; unreadable text gives an empty state. */
export function parseState(text) {
  const state = emptyState();
  if (typeof text !== "string" || !text.trim()) return state;
  let data;
  try {
    data = JSON.parse(text);
  } catch (e) {
    console.warn("[p3s] the Point Selector's points_store is not JSON; starting without points", e);
    return state;
  }
  if (!data || typeof data !== "object") return state;
  state.width = Number(data.width) || 0;
  state.height = Number(data.height) || 0;
  for (const im of Array.isArray(data.images) ? data.images : []) {
    const entry = { positive: [], negative: [] };
    for (const kind of ["positive", "negative"]) {
      for (const p of Array.isArray(im?.[kind]) ? im[kind] : []) {
        const pair = toPair(p);
        if (pair && Number.isFinite(pair[0]) && Number.isFinite(pair[1])) entry[kind].push(pair);
      }
    }
    state.images.push(entry);
  }
  return state;
}

export function serializeState(state) {
  return JSON.stringify({
    version: STATE_VERSION,
    width: state.width,
    height: state.height,
    images: state.images.map((im) => ({ positive: im.positive, negative: im.negative })),
  });
}

const round2 = (v) => Math.round(v * 100) / 100;

/** Rescale every point from the state's size to (w, h), as P3SPoints.from_widget_state does. */
function rescaleState(state, w, h) {
  if (state.width > 0 && state.height > 0 && (state.width !== w || state.height !== h)) {
    const sx = w / state.width;
    const sy = h / state.height;
    for (const im of state.images) {
      im.positive = im.positive.map(([x, y]) => [round2(x * sx), round2(y * sy)]);
      im.negative = im.negative.map(([x, y]) => [round2(x * sx), round2(y * sy)]);
    }
  }
  state.width = w;
  state.height = h;
}

// ---------------------------------------------------------------------------------- image source
function viewUrl(name, type, subfolder = "") {
  const q = new URLSearchParams({ filename: name, type, subfolder: subfolder || "" });
  return api.apiURL(`/view?${q.toString()}`);
}

/** "sub/name.png [input]" -> the /view URL of that file (input folder unless annotated). */
function comboImageUrl(value) {
  let name = String(value).trim();
  let type = "input";
  const m = name.match(/^(.*) \[(input|output|temp)\]$/);
  if (m) {
    name = m[1];
    type = m[2];
  }
  const slash = name.lastIndexOf("/");
  const subfolder = slash >= 0 ? name.slice(0, slash) : "";
  const filename = slash >= 0 ? name.slice(slash + 1) : name;
  return viewUrl(filename, type, subfolder);
}

/** What feeds the `image` input: {key, urls} (urls null when the source has no file to show). */
function upstreamSource(node) {
  const slot = node.inputs?.findIndex((i) => i.name === "image") ?? -1;
  if (slot < 0 || !node.graph) return { key: "none", urls: null };
  let origin = node.getInputNode(slot);
  const seen = new Set();
  while (origin && origin.type === "Reroute" && !seen.has(origin.id)) {
    seen.add(origin.id);
    origin = origin.getInputNode(0);
  }
  if (!origin) return { key: "none", urls: null };
  const w = origin.widgets?.find((x) => x.name === "image");
  if (w && typeof w.value === "string" && w.value.trim()) {
    return { key: `load:${origin.id}:${w.value}`, urls: [comboImageUrl(w.value)] };
  }
  return { key: `node:${origin.id}`, urls: null };
}

// ------------------------------------------------------------------------------------ the widget
class PointSelector {
  constructor(node) {
    this.node = node;
    this.store = node.widgets?.find((w) => w.name === STORE_WIDGET);
    this.storeText = this.store?.value ?? "";
    this.state = parseState(this.storeText);
    this.index = 0;
    this.urls = [];
    this.images = new Map(); // url -> HTMLImageElement
    this.source = { key: "none", urls: null };
    this.executed = null; // {key, urls}: the images of the last run
    this.buildDom();
  }

  // --- DOM ------------------------------------------------------------------------------------
  buildDom() {
    const root = document.createElement("div");
    root.className = "p3s-point-selector";
    Object.assign(root.style, {
      display: "flex", flexDirection: "column", boxSizing: "border-box", minHeight: "0",
      font: "12px sans-serif", color: "var(--input-text, #ddd)", userSelect: "none",
    });
    const bar = document.createElement("div");
    Object.assign(bar.style, {
      display: "flex", alignItems: "center", gap: "6px", height: `${TOOLBAR_HEIGHT}px`, flex: "0 0 auto",
    });
    const button = (text, title) => {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = text;
      b.title = title;
      Object.assign(b.style, {
        padding: "0 6px", height: "20px", cursor: "pointer", borderRadius: "4px",
        border: "1px solid var(--border-color, #555)", background: "var(--comfy-input-bg, #333)",
        color: "inherit",
      });
      return b;
    };
    this.prevButton = button("◀", "previous image of the batch");
    this.nextButton = button("▶", "next image of the batch");
    this.clearButton = button("clear", "remove the points of this image");
    this.label = document.createElement("span");
    this.label.className = "p3s-point-label";
    Object.assign(this.label.style, { flex: "1 1 auto", textAlign: "center", whiteSpace: "nowrap", overflow: "hidden" });
    bar.append(this.prevButton, this.label, this.nextButton, this.clearButton);

    const canvas = document.createElement("canvas");
    canvas.className = "p3s-point-canvas";
    canvas.title = "left click: subject point (green) · right click / shift+click: distractor point (red) · click a point to remove it";
    Object.assign(canvas.style, {
      flex: "1 1 auto", minHeight: "0", width: "100%", display: "block", cursor: "crosshair",
      borderRadius: "4px", background: "#1b1b1b",
    });
    root.append(bar, canvas);
    root.__p3sSelector = this; // which selector an element on screen belongs to (see takeOverShownElement)
    this.root = root;
    this.canvas = canvas;

    this.prevButton.addEventListener("click", (e) => { e.stopPropagation(); this.step(-1); });
    this.nextButton.addEventListener("click", (e) => { e.stopPropagation(); this.step(1); });
    this.clearButton.addEventListener("click", (e) => { e.stopPropagation(); this.clearCurrent(); });
    // Clicks on the picture edit points; they must never reach the graph (no drag, no menu).
    // (mouseup still bubbles: the frontend's undo history records the edit on it.)
    for (const type of ["pointerdown", "mousedown", "dblclick"]) {
      canvas.addEventListener(type, (e) => e.stopPropagation());
    }
    canvas.addEventListener("pointerdown", (e) => this.onPointerDown(e));
    canvas.addEventListener("contextmenu", (e) => { e.preventDefault(); e.stopPropagation(); });
    if (typeof ResizeObserver !== "undefined") {
      this.resizeObserver = new ResizeObserver(() => this.draw());
      this.resizeObserver.observe(canvas);
    }
  }

  // --- images ---------------------------------------------------------------------------------
  /** Re-read what feeds the node; cheap, called on every graph draw and on link changes. */
  refreshSource() {
    const src = upstreamSource(this.node);
    if (this.sourceChecked && src.key === this.source.key) return;
    this.sourceChecked = true;
    this.source = src;
    this.chooseImages();
  }

  chooseImages() {
    let urls = [];
    const ex = this.executed;
    if (ex && (ex.key === this.source.key || !this.source.urls)) urls = ex.urls;
    else if (this.source.urls) urls = this.source.urls;
    else if (ex) urls = ex.urls;
    if (urls.join("\n") !== this.urls.join("\n")) {
      this.urls = urls.slice();
      this.index = Math.min(this.index, Math.max(0, this.urls.length - 1));
      this.loadCurrent();
    }
    this.draw();
  }

  setExecutedImages(items) {
    const urls = (items || []).map((it) => viewUrl(it.filename, it.type || "temp", it.subfolder || ""));
    if (!urls.length) return;
    this.source = upstreamSource(this.node);
    this.executed = { key: this.source.key, urls };
    this.chooseImages();
  }

  currentImage() {
    const img = this.images.get(this.urls[this.index]);
    return img && img.complete && img.naturalWidth > 0 ? img : null;
  }

  loadCurrent() {
    const url = this.urls[this.index];
    if (!url || this.images.has(url)) {
      this.onImageReady();
      return;
    }
    const img = new Image();
    img.addEventListener("load", () => this.onImageReady(img));
    img.addEventListener("error", () => {
      console.warn(`[p3s] the Point Selector could not load ${url}`);
      this.draw();
    });
    this.images.set(url, img);
    img.src = url;
  }

  onImageReady(img) {
    const cur = this.currentImage();
    if (img && cur !== img) return; // a stale load
    if (cur && (cur.naturalWidth !== this.state.width || cur.naturalHeight !== this.state.height)) {
      const hadPoints = this.state.images.some((im) => im.positive.length || im.negative.length);
      rescaleState(this.state, cur.naturalWidth, cur.naturalHeight);
      if (hadPoints) this.writeStore();
    }
    this.draw();
  }

  step(delta) {
    const n = this.urls.length;
    if (n < 2) return;
    this.index = (this.index + delta + n) % n;
    this.loadCurrent();
  }

  // --- points ---------------------------------------------------------------------------------
  /** Stored text changed from outside (workflow load / undo): re-read it. */
  reloadStore() {
    this.storeText = this.store?.value ?? "";
    this.state = parseState(this.storeText);
    const cur = this.currentImage();
    if (cur) this.onImageReady();
    else this.draw();
  }

  writeStore() {
    if (!this.store) return;
    this.store.value = this.storeText = serializeState(this.state);
    this.store.callback?.(this.store.value);
    this.node.setDirtyCanvas?.(true, true);
  }

  /** Points shown for the current image: its own entry, or (one entry, batch) the shared one. */
  pointsFor(i) {
    const ims = this.state.images;
    if (ims[i]) return { entry: ims[i], shared: false };
    if (ims.length === 1 && i > 0) return { entry: ims[0], shared: true };
    return { entry: { positive: [], negative: [] }, shared: false };
  }

  editableEntry(i) {
    const n = Math.max(this.urls.length, i + 1);
    const ims = this.state.images;
    // A lone entry is shared by every image of the batch (as in Python). Editing another image
    // gives every image its own entry, starting from the shared points the user was looking at.
    if (ims.length === 1 && n > 1 && i > 0) {
      const copy = () => ({ positive: ims[0].positive.map((p) => p.slice()), negative: ims[0].negative.map((p) => p.slice()) });
      while (ims.length < n) ims.push(copy());
    }
    while (ims.length <= i) ims.push({ positive: [], negative: [] });
    return ims[i];
  }

  clearCurrent() {
    const ims = this.state.images;
    if (!ims[this.index]) return;
    ims[this.index] = { positive: [], negative: [] };
    // An image left without points is reported by the node at run time; no points at all: empty state.
    if (ims.every((im) => !im.positive.length && !im.negative.length)) ims.length = 0;
    this.writeStore();
    this.draw();
  }

  /** Letterbox of the image inside a box of (bw, bh): scale and offset ("contain" fit, centred). */
  static fit(iw, ih, bw, bh) {
    const s = Math.min(bw / iw, bh / ih);
    return { s, ox: (bw - iw * s) / 2, oy: (bh - ih * s) / 2 };
  }

  onPointerDown(e) {
    // No preventDefault here: it would also cancel the mouseup the undo history listens for.
    if (e.button !== 0 && e.button !== 2) return;
    const img = this.currentImage();
    if (!img) return;
    const rect = this.canvas.getBoundingClientRect();
    const lw = this.canvas.clientWidth || rect.width;
    const zoom = rect.width / lw || 1; // the graph's CSS scale of the DOM widget
    const lx = (e.clientX - rect.left) / zoom;
    const ly = (e.clientY - rect.top) / zoom;
    const W = img.naturalWidth;
    const H = img.naturalHeight;
    const { s, ox, oy } = PointSelector.fit(W, H, lw, this.canvas.clientHeight || rect.height / zoom);
    const x = (lx - ox) / s;
    const y = (ly - oy) / s;
    if (this.state.width !== W || this.state.height !== H) rescaleState(this.state, W, H);

    // Near an existing point of this image: remove it.
    const { entry: shown } = this.pointsFor(this.index);
    let best = null;
    for (const kind of ["positive", "negative"]) {
      shown[kind].forEach(([px, py], k) => {
        const d = Math.hypot((px - x) * s, (py - y) * s);
        if (d <= HIT_RADIUS && (!best || d < best.d)) best = { kind, k, d, px, py };
      });
    }
    if (best) {
      const entry = this.editableEntry(this.index);
      const k = entry[best.kind].findIndex(([px, py]) => px === best.px && py === best.py);
      if (k >= 0) entry[best.kind].splice(k, 1);
    } else {
      if (x < 0 || y < 0 || x > W || y > H) return; // outside the picture
      const kind = e.button === 2 || e.shiftKey ? "negative" : "positive";
      this.editableEntry(this.index)[kind].push([round2(x), round2(y)]);
    }
    this.writeStore();
    this.draw();
  }

  // --- drawing --------------------------------------------------------------------------------
  updateLabel() {
    const n = this.urls.length;
    const { entry, shared } = this.pointsFor(this.index);
    const counts = `+${entry.positive.length} / -${entry.negative.length}`;
    this.label.textContent = n
      ? `image ${this.index + 1}/${n}, ${counts}${shared ? " (image 1's points)" : ""}`
      : `no image yet, ${counts}`;
    const many = n > 1;
    this.prevButton.disabled = !many;
    this.nextButton.disabled = !many;
    this.prevButton.style.opacity = many ? "1" : "0.4";
    this.nextButton.style.opacity = many ? "1" : "0.4";
  }

  draw() {
    this.updateLabel();
    const c = this.canvas;
    const lw = c.clientWidth;
    const lh = c.clientHeight;
    if (!lw || !lh) return;
    const scale = Math.max(1, app.canvas?.ds?.scale ?? 1);
    const res = Math.min(4, (window.devicePixelRatio || 1) * scale);
    const bw = Math.max(1, Math.round(lw * res));
    const bh = Math.max(1, Math.round(lh * res));
    if (c.width !== bw || c.height !== bh) {
      c.width = bw;
      c.height = bh;
    }
    const ctx = c.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, bw, bh);
    ctx.setTransform(bw / lw, 0, 0, bh / lh, 0, 0); // draw in layout px
    const img = this.currentImage();
    if (!img) {
      ctx.fillStyle = "#888";
      ctx.font = "12px sans-serif";
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      const msg = this.urls.length ? "loading image…" : "connect a Load Image node (or run the graph)";
      ctx.fillText(msg, lw / 2, lh / 2, lw - 8);
      this.drawn = null;
      return;
    }
    const W = img.naturalWidth;
    const H = img.naturalHeight;
    const { s, ox, oy } = PointSelector.fit(W, H, lw, lh);
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(img, ox, oy, W * s, H * s);
    const { entry, shared } = this.pointsFor(this.index);
    ctx.globalAlpha = shared ? 0.5 : 1;
    for (const [kind, color] of [["positive", POS_COLOR], ["negative", NEG_COLOR]]) {
      for (const [x, y] of entry[kind]) {
        const cx = ox + x * s;
        const cy = oy + y * s;
        ctx.beginPath();
        ctx.arc(cx, cy, POINT_RADIUS, 0, Math.PI * 2);
        ctx.fillStyle = color;
        ctx.fill();
        ctx.lineWidth = 1;
        ctx.strokeStyle = "rgba(0, 0, 0, 0.8)";
        ctx.stroke();
        ctx.beginPath();
        ctx.arc(cx, cy, POINT_RADIUS * 0.45, 0, Math.PI * 2);
        ctx.fillStyle = "#fff";
        ctx.fill();
      }
    }
    ctx.globalAlpha = 1;
    this.drawn = { url: this.urls[this.index], width: W, height: H, s, ox, oy, lw, lh };
  }

  /**
   * Undo and redo reload the whole graph: every node is made anew (same id), with a new selector and
   * a new DOM element. The classic canvas mounts the new element. Frontend 1.58's Vue nodes keep the
   * node's component (same id) and with it the element they mounted first (WidgetDOM mounts once),
   * so the screen would keep showing the replaced node's selector, frozen in its old state, while
   * this one (not in the page) holds the restored points. When this node's Vue element shows another
   * selector's element that no live node owns, this selector's element takes its place.
   */
  takeOverShownElement() {
    if (this.root.isConnected || !this.node.graph) return false;
    if (app.canvas?.graph && app.canvas.graph !== this.node.graph) return false; // not on screen
    const id = String(this.node.id);
    for (const host of document.querySelectorAll("[data-node-id]")) {
      if (host.getAttribute("data-node-id") !== id) continue;
      for (const shown of host.querySelectorAll(".p3s-point-selector")) {
        const owner = shown.__p3sSelector;
        if (shown === this.root || !owner || owner.isCurrent()) continue;
        shown.replaceWith(this.root);
        this.draw();
        return true;
      }
    }
    return false;
  }

  /** This selector's node is still the one its graph holds under its id (not replaced, not removed). */
  isCurrent() {
    const g = this.node.graph;
    return !!g && g.getNodeById?.(this.node.id) === this.node;
  }

  /** Called on every graph redraw: follow the source and keep the backing store sharp. */
  onGraphDraw() {
    this.takeOverShownElement();
    if ((this.store?.value ?? "") !== this.storeText) this.reloadStore(); // set from outside
    this.refreshSource();
    const c = this.canvas;
    const scale = Math.max(1, app.canvas?.ds?.scale ?? 1);
    const res = Math.min(4, (window.devicePixelRatio || 1) * scale);
    if (c.clientWidth && Math.abs(c.width - Math.round(c.clientWidth * res)) > 1) this.draw();
  }

  /** A plain snapshot for tests and debugging. */
  snapshot() {
    return {
      state: JSON.parse(serializeState(this.state)),
      store: this.store?.value ?? null,
      urls: this.urls.slice(),
      index: this.index,
      label: this.label.textContent,
      drawn: this.drawn ? { ...this.drawn } : null,
      sourceKey: this.source.key,
      executed: this.executed ? { ...this.executed } : null,
    };
  }
}

// ---------------------------------------------------------------------------------- registration
function hideWidget(w) {
  // The classic canvas (frontend 1.32 and 1.49) reads `widget.hidden`; frontend 1.49's Vue nodes
  // ("Nodes 2.0") and its properties panel read `widget.options.hidden` instead (both are fields of
  // the public widget interface), so set both.
  w.hidden = true;
  w.options = w.options || {};
  w.options.hidden = true;
  w.computeSize = () => [0, -4]; // no row left behind in the layout
}

// The classic canvas calls a DOM widget's onDraw on every frame; frontend 1.49 with "Nodes 2.0"
// (LiteGraph.vueNodesMode) never draws nodes or widgets on the canvas, so onDraw never runs there.
// The same cheap checks (store changed from outside, source changed, backing-store resolution)
// also run on this timer, whatever the display.
const live = new Set();
let ticker = null;
function track(sel) {
  live.add(sel);
  if (!ticker) ticker = setInterval(tick, 200);
}
function untrack(sel) {
  live.delete(sel);
  if (!live.size && ticker) {
    clearInterval(ticker);
    ticker = null;
  }
}
function tick() {
  for (const sel of live) {
    if (!sel.node.graph) continue;
    try {
      sel.onGraphDraw();
    } catch (e) {
      console.warn("[p3s] Point Selector refresh failed", e);
    }
  }
}

function setUp(node) {
  if (node.__p3sSelector) return node.__p3sSelector;
  const store = node.widgets?.find((w) => w.name === STORE_WIDGET);
  if (!store) {
    console.error(`[p3s] the ${NODE_TYPE} node has no '${STORE_WIDGET}' widget; the canvas is not added`);
    return null;
  }
  hideWidget(store);
  const sel = new PointSelector(node);
  const widget = node.addDOMWidget("p3s_points_canvas", "p3s_points_canvas", sel.root, {
    serialize: false, // the points live in points_store
    hideOnZoom: false,
    // Frontend 1.49's properties panel would mount this element there (taking it off the node).
    hideInPanel: true,
    getValue: () => store.value,
    setValue: () => {},
    getMinHeight: () => 140,
    onDraw: () => sel.onGraphDraw(),
  });
  widget.serialize = false;
  sel.widget = widget;
  node.__p3sSelector = sel;
  if (node.graph) track(sel);
  sel.draw();
  return sel;
}

const pointSelectorApi = {
  /** The selector of a node (or node id) on the current graph, or null. */
  of(nodeOrId) {
    const node = typeof nodeOrId === "object" ? nodeOrId : app.graph?.getNodeById(nodeOrId);
    return node?.__p3sSelector ?? null;
  },
  getState(nodeOrId) {
    return pointSelectorApi.of(nodeOrId)?.snapshot() ?? null;
  },
  parseState,
  serializeState,
};
window.__p3s = Object.assign(window.__p3s || {}, { pointSelector: pointSelectorApi });

/** The node that an execution id names (top-level graph, or the last id of a subgraph path). */
function nodeByExecutionId(id) {
  const parts = String(id).split(":");
  const graph = app.graph;
  if (parts.length === 1) return graph?.getNodeById(parts[0]) ?? null;
  let node = null;
  let g = graph;
  for (const part of parts) {
    node = g?.getNodeById(part) ?? null;
    g = node?.subgraph;
  }
  return node;
}

app.registerExtension({
  name: "p3s.pointSelector",
  async setup() {
    // Sent by the node when it stops for want of points, so the user can click them after a run that
    // could not finish (a source other than Load Image has nothing to show before a run):
    // {"node": <execution id>, "p3s_images": [{"filename", "subfolder", "type"}, ...]}.
    api.addEventListener("p3s.point_selector.images", ({ detail }) => {
      const node = detail ? nodeByExecutionId(detail.node) : null;
      node?.__p3sSelector?.setExecutedImages(detail.p3s_images);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_TYPE) return;
    const proto = nodeType.prototype;

    const onConfigure = proto.onConfigure;
    proto.onConfigure = function (info) {
      const r = onConfigure?.apply(this, arguments);
      const sel = this.__p3sSelector;
      if (sel) {
        sel.reloadStore();
        sel.refreshSource();
      }
      return r;
    };

    const onConnectionsChange = proto.onConnectionsChange;
    proto.onConnectionsChange = function () {
      const r = onConnectionsChange?.apply(this, arguments);
      // The link may only exist after this call returns.
      queueMicrotask(() => this.__p3sSelector?.refreshSource());
      return r;
    };

    const onExecuted = proto.onExecuted;
    proto.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      if (message?.p3s_images) this.__p3sSelector?.setExecutedImages(message.p3s_images);
      return r;
    };

    const onAdded = proto.onAdded;
    proto.onAdded = function () {
      const r = onAdded?.apply(this, arguments);
      if (this.__p3sSelector) track(this.__p3sSelector); // not before: a node made and never added
      return r;
    };

    const onRemoved = proto.onRemoved;
    proto.onRemoved = function () {
      const sel = this.__p3sSelector;
      sel?.resizeObserver?.disconnect();
      if (sel) untrack(sel);
      return onRemoved?.apply(this, arguments);
    };
  },
  nodeCreated(node) {
    if (node?.comfyClass !== NODE_TYPE) return;
    setUp(node);
    // A new node gets room for the picture; saved workflows keep their own size (configure).
    const [w, h] = node.size;
    node.setSize([Math.max(w, 340), Math.max(h, 380)]);
  },
});
