"""Regenerate workflows/*.json and their .jpg thumbnails from workflow_specs.py with the real frontend.

    COMFYUI_PATH=/path/to/ComfyUI [COMFYUI_PYTHON=...] .venv/bin/python tests/integration/build_workflows.py [TITLE ...]

(only the workflows with these titles when titles are given, e.g. "EasyAnimate V3 · Image to Video")

Starts a ComfyUI server with this pack (comfy_harness), builds each graph in headless Chromium with the
frontend's own node classes, saves ``app.graph.serialize()`` (UI format) and a schematic thumbnail: the title and
the nodes as labelled boxes with their links; the bundled micro model's workflows are run on its weights instead, and
their thumbnails show frames of the video each makes.
"""

from __future__ import annotations

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
from workflow_specs import MICRO_PREFIX, WORKFLOWS  # noqa: E402

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
  app.graph.extra = {{ ...(app.graph.extra ?? {{}}), easyanimate_description: spec.description }};
  // Saved as JSON text without undefined or null properties: Playwright would hand undefined back as null, and the
  // frontend's workflow schema refuses null where it wants an array, object or number ("Invalid workflow").
  const workflow = JSON.stringify(app.graph.serialize(), (key, value) => (value === null ? undefined : value));
  await app.loadGraphData(JSON.parse(workflow));  // what a user opening the file gets
  const titles = Object.fromEntries(Object.entries(made).map(([key, node]) => [key, node.title]));
  return {{ workflow, titles }};
}}"""


# Link colours by output (type or name), as ComfyUI draws the types.
LINK_COLOURS = {
    "model": "#b39ddb",
    "conditioning": "#ffa931",
    "positive": "#ffa931",
    "negative": "#ffa931",
    "latent": "#ff9cf9",
    "vae": "#ff6e6e",
    "image": "#64b5f6",
    "images": "#64b5f6",
    "video": "#64b5f6",
    "text_encoder": "#ffd500",
    "image_encoder": "#a5d6a7",
}


def _font(size: int, bold: bool = False):
    from PIL import ImageFont

    try:
        return ImageFont.truetype("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size)


def _wrapped(draw, text: str, font, width: int) -> str:
    """``text`` on at most two lines of ``width`` pixels, the second cut with an ellipsis."""
    words, lines = text.split(), [""]
    for word in words:
        candidate = f"{lines[-1]} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not lines[-1]:
            lines[-1] = candidate
        else:
            lines.append(word)
    if len(lines) > 2:
        lines = [lines[0], lines[1] + " …"]
    while draw.textlength(lines[-1], font=font) > width and len(lines[-1]) > 2:
        lines[-1] = lines[-1][:-2].rstrip() + "…"
    return "\n".join(lines)


def schematic_thumbnail(spec, titles: dict[str, str]):
    """A legible picture of a workflow at thumbnail size: its title, then its nodes as labelled boxes in the spec's
    columns with the links between them in ComfyUI's type colours (a screenshot of the graph is unreadable at
    640 x 400, and blank when the canvas has not drawn yet)."""
    from PIL import Image, ImageDraw

    width, height = THUMBNAIL_SIZE
    image = Image.new("RGB", (width, height), "#202020")
    draw = ImageDraw.Draw(image)
    draw.text((16, 14), spec.description, font=_font(22, bold=True), fill="#f0f0f0")
    columns = sorted({n.column for n in spec.nodes})
    space = 18
    box_w = (width - 32 - space * (len(columns) - 1)) // len(columns)
    top, box_h, gap = 58, 42, 12
    boxes = {}
    for c, column in enumerate(columns):
        x = 16 + c * (box_w + space)
        members = [n for n in spec.nodes if n.column == column]
        y = top + max(0, (height - top - 10 - len(members) * (box_h + gap) + gap) // 2)
        for node in members:
            boxes[node.key] = (x, y, x + box_w, y + box_h)
            y += box_h + gap
    for source, output, target, _ in spec.links:
        (sx0, sy0, sx1, sy1), (tx0, ty0, _, ty1) = boxes[source], boxes[target]
        colour = LINK_COLOURS.get(output.lower(), "#9e9e9e")
        if tx0 <= sx0:  # the same column: straight down (or up) between the boxes
            x = (sx0 + sx1) // 2
            ends = [(x, sy1), (x, ty0)] if ty0 > sy1 else [(x, sy0), (x, ty1)]
            draw.line(ends, fill=colour, width=3)
            continue
        start, end = (sx1, (sy0 + sy1) // 2), (tx0, (ty0 + ty1) // 2)
        middle = end[0] - space // 2
        draw.line([start, (middle, start[1]), (middle, end[1]), end], fill=colour, width=3)
    label = _font(12)
    for node in spec.nodes:
        x0, y0, x1, y1 = boxes[node.key]
        draw.rounded_rectangle(boxes[node.key], 6, fill="#353535", outline="#5a5a5a")
        text = _wrapped(draw, titles.get(node.key, node.type).removeprefix("EasyAnimate "), label, box_w - 10)
        draw.multiline_text((x0 + 5, (y0 + y1) // 2), text, font=label, fill="#e8e8e8", anchor="lm", spacing=2)
    return image


def output_thumbnail(title: str, prompt: str, frames):
    """The micro model's thumbnail: its title and prompt over ten frames of the video its workflow made
    ([F, H, W, 3] uint8), each shown 2x with nearest pixels."""
    import numpy as np
    from PIL import Image, ImageDraw

    width, height = THUMBNAIL_SIZE
    image = Image.new("RGB", (width, height), "#202020")
    draw = ImageDraw.Draw(image)
    font, small = _font(22, bold=True), _font(18)
    draw.text((16, 14), _wrapped(draw, title, font, width - 32), font=font, fill="#f0f0f0")
    draw.text((16, 54), _wrapped(draw, f"“{prompt}”", small, width - 32), font=small, fill="#f0f0f0")
    picks = np.linspace(0, len(frames) - 1, 10).round().astype(int)
    side = width // 5
    for i, index in enumerate(picks):
        frame = Image.fromarray(frames[index]).resize((side, side), Image.NEAREST)
        image.paste(frame, ((i % 5) * side, height - (2 - i // 5) * side))
    return image


def micro_frames(server, page):
    """Run the workflow just built (as a user would queue it) and read back the frames of the video it saves."""
    import imageio.v3 as iio

    prompt = page.evaluate(f"async () => (await {APP}.graphToPrompt()).output")
    entry = server.run_prompt(prompt, timeout=600)
    videos = [f for f in server.output_files(entry) if f.suffix in (".mp4", ".webm", ".webp", ".gif")]
    return iio.imread(videos[0])


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
                wanted = set(sys.argv[1:])
                for make in WORKFLOWS:
                    spec = make()
                    if wanted and spec.name not in wanted:
                        continue
                    built = page.evaluate(BUILD, spec.as_js())
                    workflow = json.loads(built["workflow"])
                    write_atomically(OUT / f"{spec.name}.json", (json.dumps(workflow, indent=2) + "\n").encode())
                    jpg = io.BytesIO()
                    if spec.name.startswith(MICRO_PREFIX):  # the bundled model: show what the workflow makes
                        prompt = next(n.widgets["text"] for n in spec.nodes if n.key == "positive")
                        thumbnail = output_thumbnail(spec.description, prompt, micro_frames(server, page))
                    else:
                        thumbnail = schematic_thumbnail(spec, built["titles"])
                    thumbnail.save(jpg, "JPEG", quality=90)
                    write_atomically(OUT / f"{spec.name}.jpg", jpg.getvalue())
                    print(f"wrote workflows/{spec.name}.json and .jpg ({len(workflow['nodes'])} nodes)")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
