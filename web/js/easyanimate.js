// Frontend extension of the EasyAnimate pack. Served by ComfyUI at
// /extensions/<pack folder>/js/easyanimate.js (WEB_DIRECTORY = "./web"), hence three levels up
// to reach the app shim.
//
// On every EasyAnimate node with frames / width / height widgets it snaps typed values to the
// version's rules (frames 4k+1 for the V5 / V5.1 mag VAE, multiples of 8 for the V4 / V3 slice VAE, 9 for V2's,
// sizes multiples of 16) and shows what the settings mean: duration at the trained frame rate
// and the latent grid. The rules come from the server (nodes/web_routes.py), which reads them
// from the same VAE configs the nodes validate with. Nothing here is needed to run a prompt:
// the API path never loads this file, and the nodes validate on their own.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const RULES_ROUTE = "/easyanimate/video_rules";
const DEFAULT_VERSION = "V5.1";
// The info line: drawn on the canvas node (onDrawForeground), and a DOM widget that only the Vue node renderer
// shows (its nodes are elements with a data-node-id; on the canvas the element stays hidden, as the text is drawn).
const INFO_CSS = `
.easyanimate-info { display: none; }
[data-node-id] .easyanimate-info {
  display: block; font: 11px sans-serif; color: #9ab; padding: 0 6px;
  white-space: nowrap; overflow: hidden; text-overflow: ellipsis;
}`;

let rules = null; // {version: {frame_step, frame_offset, pixel_multiple, spatial_compression, temporal_compression, fps}}

async function loadRules() {
  try {
    const response = await api.fetchApi(RULES_ROUTE);
    if (response.ok) rules = await response.json();
  } catch (error) {
    console.warn("[EasyAnimate] could not load the video rules; widgets will not snap", error);
  }
}

export function nearestFrames(value, rule) {
  if (value <= 1) return 1;
  const k = Math.round((value - rule.frame_offset) / rule.frame_step);
  return Math.max(1, k * rule.frame_step + rule.frame_offset);
}

export function nearestSize(value, multiple) {
  return Math.max(multiple, Math.round(value / multiple) * multiple);
}

function latentFrames(frames, rule) {
  if (frames === 1) return 1;
  return rule.frame_offset === 1
    ? (frames - 1) / rule.temporal_compression + 1
    : frames / rule.temporal_compression;
}

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function validFrames(frames, rule) {
  return frames === 1 || (frames >= rule.frame_step && (frames - rule.frame_offset) % rule.frame_step === 0);
}

// The rules that may hold for a node: its version widget's, or (a conditioning node, whose version is that of
// the VAE it is given) those of every version with InP / Control models, newest first.
function rulesFor(node) {
  if (!rules) return [];
  const version = widget(node, "version")?.value;
  if (version !== undefined) return rules[version] ? [rules[version]] : [];
  const preferred = rules[DEFAULT_VERSION];
  const others = Object.values(rules).filter((r) => r !== preferred && r.conditioning_nodes !== false);
  return [preferred, ...others].filter(Boolean);
}

// Snap every rule-bound widget of the node to the nearest valid value and refresh the info line. Without a
// version widget a frame count valid for any version stays (48 is V4's, 49 V5.1's); others snap to V5.1's.
function applyRules(node) {
  const candidates = rulesFor(node);
  if (!candidates.length) return;
  const frames = widget(node, "frames");
  let rule = candidates[0];
  if (frames && typeof frames.value === "number") {
    const fitting = candidates.find((r) => validFrames(frames.value, r));
    if (fitting) rule = fitting;
    else frames.value = nearestFrames(frames.value, rule);
  }
  for (const name of ["width", "height"]) {
    const w = widget(node, name);
    if (w && typeof w.value === "number") w.value = nearestSize(w.value, rule.pixel_multiple);
  }
  node.easyanimateInfo = describe(node, rule);
  if (node.easyanimateInfoElement) node.easyanimateInfoElement.textContent = node.easyanimateInfo;
  node.setDirtyCanvas?.(true, false);
}

function describe(node, rule) {
  const frames = widget(node, "frames")?.value;
  const width = widget(node, "width")?.value;
  const height = widget(node, "height")?.value;
  const parts = [];
  if (typeof frames === "number") {
    parts.push(`${frames} frames · ${(frames / rule.fps).toFixed(1)} s at ${rule.fps} fps`);
  }
  if (typeof width === "number" && typeof height === "number") {
    const s = rule.spatial_compression;
    const grid = `${height / s}×${width / s}`;
    parts.push(typeof frames === "number" ? `latent ${latentFrames(frames, rule)}×${grid}` : `latent ${grid}`);
  }
  return parts.join(" · ");
}

function hooksRules(nodeData) {
  if (!nodeData.name?.startsWith("EasyAnimate")) return false;
  const inputs = { ...(nodeData.input?.required ?? {}), ...(nodeData.input?.optional ?? {}) };
  return "frames" in inputs || ("width" in inputs && "height" in inputs);
}

function chainCallback(object, property, callback) {
  const original = object[property];
  object[property] = function (...args) {
    const result = original?.apply(this, args);
    callback.apply(this, args);
    return result;
  };
}

app.registerExtension({
  name: "EasyAnimate.Core",

  async setup() {
    const style = document.createElement("style");
    style.textContent = INFO_CSS;
    document.head.appendChild(style);
    await loadRules();
    // Nodes restored before the rules arrived (a workflow open at start-up) get their info line now.
    for (const node of app.graph?._nodes ?? []) if (node.easyanimateRules) applyRules(node);
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!hooksRules(nodeData)) return;

    chainCallback(nodeType.prototype, "onNodeCreated", function () {
      this.easyanimateRules = true;
      for (const name of ["frames", "width", "height", "version"]) {
        const w = widget(this, name);
        if (w) chainCallback(w, "callback", () => applyRules(this));
      }
      // Never saved or sent: the workflow's widget values and the prompt's inputs stay the node's own. Its height
      // is the room the canvas text is drawn in.
      const element = document.createElement("div");
      element.className = "easyanimate-info";
      const info = this.addDOMWidget?.("easyanimate_info", "easyanimate_info", element, {
        serialize: false,
        hideOnZoom: false,
        getMinHeight: () => 18,
        getMaxHeight: () => 18,
      });
      if (info) {
        info.serialize = false;
        this.easyanimateInfoElement = element;
      }
      applyRules(this);
    });

    // Loading a saved workflow sets widget values without callbacks.
    chainCallback(nodeType.prototype, "onConfigure", function () {
      applyRules(this);
    });

    chainCallback(nodeType.prototype, "onDrawForeground", function (ctx) {
      if (!this.easyanimateInfo || this.flags?.collapsed) return;
      ctx.save();
      ctx.font = "11px sans-serif";
      ctx.fillStyle = "#9ab";
      ctx.textAlign = "left";
      ctx.fillText(this.easyanimateInfo, 10, this.size[1] - 6, this.size[0] - 20);
      ctx.restore();
    });
  },
});
