"""Regenerate workflows/*.json and their .jpg thumbnails from workflow_specs.py with the real frontend.

    COMFYUI_PATH=/path/to/ComfyUI [COMFYUI_PYTHON=...] .venv/bin/python tests/integration/build_workflows.py

Starts a ComfyUI server with this pack (comfy_harness), builds each graph in headless Chromium with the
frontend's own node classes, saves ``app.graph.serialize()`` (UI format) and a screenshot of the graph.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from comfy_harness import REPO_ROOT, ComfyServer  # noqa: E402
from frontend import APP, open_frontend  # noqa: E402
from workflow_specs import WORKFLOWS  # noqa: E402

OUT = REPO_ROOT / "workflows"
THUMBNAIL_SIZE = (640, 400)

BUILD = f"""async (spec) => {{
  const app = {APP};
  const LG = window.LiteGraph;
  app.graph.clear();
  const made = {{}};
  for (const n of spec.nodes) {{
    const node = LG.createNode(n.type);
    if (!node) throw new Error(`unknown node type ${{n.type}}`);
    if (n.title) node.title = n.title;
    app.graph.add(node);
    for (const [name, value] of Object.entries(n.widgets)) {{
      const w = node.widgets?.find((x) => x.name === name);
      if (!w) throw new Error(`${{n.type}} has no widget ${{name}}`);
      w.value = value;
      w.callback?.(value);
    }}
    made[n.key] = node;
  }}
  for (const [from, output, to, input] of spec.links) {{
    const a = made[from], b = made[to];
    const o = a.outputs.findIndex((s) => s.name === output);
    const i = b.inputs.findIndex((s) => s.name === input);
    if (o < 0) throw new Error(`${{a.type}} has no output ${{output}}: ${{a.outputs.map((s) => s.name)}}`);
    if (i < 0) throw new Error(`${{b.type}} has no input ${{input}}: ${{b.inputs.map((s) => s.name)}}`);
    if (!a.connect(o, b, i)) throw new Error(`cannot link ${{a.type}}.${{output}} to ${{b.type}}.${{input}}`);
  }}
  // Columns left to right, each stacked top to bottom with the nodes' own sizes.
  let x = 40;
  for (let c = 0; spec.nodes.some((n) => n.column >= c); c++) {{
    const column = spec.nodes.filter((n) => n.column === c).map((n) => made[n.key]);
    let y = 60;
    for (const node of column) {{
      node.pos = [x, y];
      y += node.size[1] + 70;
    }}
    x += Math.max(0, ...column.map((n) => n.size[0])) + 60;
  }}
  const nodes = Object.values(made);
  const minX = Math.min(...nodes.map((n) => n.pos[0])) - 30;
  const minY = Math.min(...nodes.map((n) => n.pos[1])) - 60;
  const maxX = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])) + 30;
  const maxY = Math.max(...nodes.map((n) => n.pos[1] + n.size[1])) + 30;
  app.graph.extra = {{ ...(app.graph.extra ?? {{}}), easyanimate_description: spec.description }};
  // Saved as JSON text without undefined or null properties: Playwright would hand undefined back as null, and the
  // frontend's workflow schema refuses null where it wants an array, object or number ("Invalid workflow").
  const workflow = JSON.stringify(app.graph.serialize(), (key, value) => (value === null ? undefined : value));
  await app.loadGraphData(JSON.parse(workflow));  // what a user opening the file gets
  return {{ workflow, bounds: [minX, minY, maxX, maxY] }};
}}"""


FRAME = f"""([minX, minY, maxX, maxY]) => {{
  const app = {APP};
  const el = app.canvas.canvas;
  const ratio = window.devicePixelRatio || 1;
  app.canvas.ds.scale = Math.min(el.width / ratio / (maxX - minX), el.height / ratio / (maxY - minY));
  app.canvas.ds.offset = [-minX, -minY];
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
}}"""


def write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main() -> int:
    from PIL import Image
    from playwright import sync_api

    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        print("set COMFYUI_PATH to a ComfyUI checkout", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as base:
        server = ComfyServer(Path(comfy_path), Path(base), python=os.environ.get("COMFYUI_PYTHON") or None)
        server.start()
        try:
            with open_frontend(sync_api, server.url) as page:
                for make in WORKFLOWS:
                    spec = make()
                    built = page.evaluate(BUILD, spec.as_js())
                    workflow = json.loads(built["workflow"])
                    page.wait_for_timeout(500)  # the frontend restores the saved view after loading
                    page.evaluate(FRAME, built["bounds"])
                    # The canvas' own pixels: no dialog or toast drawn over it can end up in the thumbnail.
                    data_url = page.evaluate(f"() => {APP}.canvas.canvas.toDataURL('image/png')")
                    png = base64.b64decode(data_url.split(",", 1)[1])
                    image = Image.open(io.BytesIO(png)).convert("RGB")
                    image.thumbnail(THUMBNAIL_SIZE)
                    jpg = io.BytesIO()
                    image.save(jpg, "JPEG", quality=85)
                    write_atomically(OUT / f"{spec.name}.json", (json.dumps(workflow, indent=2) + "\n").encode())
                    write_atomically(OUT / f"{spec.name}.jpg", jpg.getvalue())
                    print(f"wrote workflows/{spec.name}.json and .jpg ({len(workflow['nodes'])} nodes)")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
