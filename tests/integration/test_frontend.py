"""The ComfyUI frontend in headless Chromium (the `page` fixture, conftest.py) registers our web extension
without JS errors, and our widgets snap to the version's rules."""

from __future__ import annotations

import pytest
from comfy_harness import PACK_DIR_NAME

pytestmark = pytest.mark.integration

EXTENSION_NAME = "EasyAnimate.Core"


def test_frontend_registers_our_extension(page):
    names = page.evaluate("() => (window.comfyAPI?.app?.app ?? window.app).extensions.map(e => e.name)")
    assert EXTENSION_NAME in names, names
    assert names.count(EXTENSION_NAME) == 1, names


def _ours(messages: list[str]) -> list[str]:
    return [m for m in messages if PACK_DIR_NAME in m or "EasyAnimate" in m]


def test_frontend_has_no_errors_from_our_extension(page):
    # The stock frontend (1.27.10) itself throws one uncaught TypeError on a fresh user folder
    # (settings onChange, "reading 'id'"), with or without this pack, and logs 404s for optional
    # resources; so only errors whose message or stack involves our extension count.
    page.wait_for_timeout(2000)  # let late setup()/async hooks run
    assert _ours(page.page_errors) == []
    assert _ours(page.console_errors) == []
    assert _ours(page.bad_responses) == []


SNAP_SCRIPT = """async () => {
  const app = window.comfyAPI?.app?.app ?? window.app;
  const node = window.LiteGraph.createNode("EasyAnimateEmptyLatentVideo");
  app.graph.add(node);
  const w = (name) => node.widgets.find((x) => x.name === name);
  const set = (name, value) => { w(name).value = value; w(name).callback(value); };
  for (let i = 0; i < 50 && !node.easyanimateInfo; i++) await new Promise((r) => setTimeout(r, 100));
  const initial = node.easyanimateInfo;
  set("frames", 50);
  set("width", 650);
  set("height", 380);
  const snapped = {frames: w("frames").value, width: w("width").value, height: w("height").value};
  const info = node.easyanimateInfo;
  const {output} = await app.graphToPrompt();
  const inputs = output[String(node.id)]?.inputs;
  const saved = node.serialize().widgets_values;
  const drawn = [];
  const fillText = CanvasRenderingContext2D.prototype.fillText;
  CanvasRenderingContext2D.prototype.fillText = function (text, ...rest) {
    drawn.push(String(text));
    return fillText.call(this, text, ...rest);
  };
  app.canvas.draw(true, true);
  CanvasRenderingContext2D.prototype.fillText = fillText;
  const element = node.easyanimateInfoElement;
  // On the canvas the text is drawn; the DOM copy (for the Vue renderer) stays hidden so it is never shown twice.
  const shown = element ? {text: element.textContent, visible: element.getClientRects().length > 0} : null;
  const canvasDrawn = drawn.includes(info);
  app.graph.remove(node);
  return {initial, snapped, info, inputs, saved, shown, canvasDrawn};
}"""


def test_frames_and_size_widgets_snap_to_the_version_rules_and_show_duration(page):
    result = page.evaluate(SNAP_SCRIPT)
    assert result["initial"] == "49 frames · 6.1 s at 8 fps · latent 13×48×84", result
    assert result["snapped"] == {"frames": 49, "width": 656, "height": 384}, result
    assert result["info"] == "49 frames · 6.1 s at 8 fps · latent 13×48×82", result
    # The info line is a DOM widget on the canvas node, never saved or sent: the prompt carries exactly the node's
    # own inputs and the workflow its own widget values.
    assert result["inputs"] == {"version": "V5.1", "width": 656, "height": 384, "frames": 49, "batch_size": 1}
    assert result["saved"] == ["V5.1", 656, 384, 49, 1]
    assert result["canvasDrawn"], result
    assert result["shown"] == {"text": result["info"], "visible": False}


VUE_SCRIPT = """async () => {
  const app = window.comfyAPI?.app?.app ?? window.app;
  const settings = app.extensionManager.setting;
  const before = settings.get("Comfy.VueNodes.Enabled");
  await settings.set("Comfy.VueNodes.Enabled", true);
  await new Promise((r) => setTimeout(r, 1000));
  const node = window.LiteGraph.createNode("EasyAnimateEmptyLatentVideo");
  app.graph.add(node);
  for (let i = 0; i < 50 && !node.easyanimateInfo; i++) await new Promise((r) => setTimeout(r, 100));
  app.graph.setDirtyCanvas(true, true);
  await new Promise((r) => setTimeout(r, 1500));
  const vueNode = document.querySelector(`[data-node-id="${node.id}"]`);
  const result = {vue: !!vueNode, text: vueNode?.innerText ?? "", info: node.easyanimateInfo};
  app.graph.remove(node);
  await settings.set("Comfy.VueNodes.Enabled", before);
  return result;
}"""


def test_the_info_line_is_shown_in_the_vue_node_renderer(page):
    """The new frontend's Vue nodes draw no canvas foreground: the line is a DOM widget shown inside them."""
    version = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ ?? ''")
    if tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < (1, 35):
        pytest.skip(f"frontend {version}: its Vue node renderer is experimental and renders no DOM widgets")
    result = page.evaluate(VUE_SCRIPT)
    assert result["vue"], result  # the node was rendered as a Vue node
    assert result["info"] == "49 frames · 6.1 s at 8 fps · latent 13×48×84", result
    assert result["info"] in result["text"], result


CONDITIONING_SNAP_SCRIPT = """async () => {
  const app = window.comfyAPI?.app?.app ?? window.app;
  const node = window.LiteGraph.createNode("EasyAnimateImageToVideo");
  app.graph.add(node);
  const w = (name) => node.widgets.find((x) => x.name === name);
  const set = (name, value) => { w(name).value = value; w(name).callback(value); };
  for (let i = 0; i < 50 && !node.easyanimateInfo; i++) await new Promise((r) => setTimeout(r, 100));
  const seen = {};
  for (const frames of [48, 49, 50, 144]) {
    set("frames", frames);
    seen[frames] = [w("frames").value, node.easyanimateInfo];
  }
  app.graph.remove(node);
  return seen;
}"""


def test_conditioning_nodes_keep_frames_valid_for_any_version_and_describe_them_by_it(page):
    """Image To Video has no version widget (its VAE decides): V4's 8k and V5.1's 4k+1 both stay."""
    seen = page.evaluate(CONDITIONING_SNAP_SCRIPT)
    assert seen["48"] == [48, "48 frames · 2.0 s at 24 fps · latent 12×48×84"], seen  # V4: 8k, slice VAE
    assert seen["49"][0] == 49 and seen["49"][1].startswith("49 frames · 6.1 s at 8 fps · latent 13×"), seen
    assert seen["50"][0] == 49, seen  # valid for no version: snapped to V5.1's rule
    assert seen["144"][0] == 144, seen  # the V4 workflows' 144 frames survive loading
