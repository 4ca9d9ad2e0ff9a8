"""The bundled workflows (workflows/*.json), declared as node lists and links.

build_workflows.py turns each spec into a UI-format workflow with the real frontend (so widget order, sizes and
converted inputs are the frontend's own) and a .jpg thumbnail; test_workflows.py loads the saved files back in
the frontend and runs them. Model names are the released folders' names; the tests point them at tiny ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

V51_INP = "EasyAnimateV5.1-12b-zh-InP"
V51_CONTROL = "EasyAnimateV5.1-12b-zh-Control"
# The tiny random checkpoints the tests put in place of the released folders:
# released name -> (tiny folder name, variant, version).
TINY_STAND_INS = {V51_INP: ("tiny-v51-inp", "InP", "V5.1"), V51_CONTROL: ("tiny-v51-control", "Control", "V5.1")}
NEGATIVE = (
    "Twisted body, limb deformities, text captions, comic, static, ugly, error, messy code, blurred, "
    "low quality, watermark"
)


@dataclass
class Node:
    key: str
    type: str
    widgets: dict = field(default_factory=dict)
    column: int = 0  # nodes of a column are stacked top to bottom in list order
    title: str | None = None

    def as_js(self) -> dict:
        return {"key": self.key, "type": self.type, "widgets": self.widgets, "column": self.column, "title": self.title}


@dataclass
class Workflow:
    name: str
    description: str
    nodes: list[Node]
    links: list[tuple[str, str, str, str]]  # (from node key, output name, to node key, input name)

    def as_js(self) -> dict:
        return {"nodes": [n.as_js() for n in self.nodes], "links": self.links, "description": self.description}


def text_to_video_nodes(model: str, prompt: str) -> tuple[list[Node], list[tuple[str, str, str, str]]]:
    """Loader, prompts, empty latent, stock KSampler, decode, stock CreateVideo + SaveVideo."""
    nodes = [
        Node("model", "EasyAnimateModelLoader", {"model_folder": model, "weight_dtype": "default"}, 0),
        Node("text_encoder", "EasyAnimateTextEncoderLoader", {"model_folder": model}, 0),
        Node("vae", "EasyAnimateVAELoader", {"model_folder": model}, 0),
        Node("positive", "EasyAnimateTextEncode", {"text": prompt}, 1, "Positive prompt"),
        Node("negative", "EasyAnimateTextEncode", {"text": NEGATIVE}, 1, "Negative prompt"),
        Node(
            "latent",
            "EasyAnimateEmptyLatentVideo",
            {"version": "V5.1", "width": 672, "height": 384, "frames": 49, "batch_size": 1},
            1,
        ),
        Node(
            "sampler",
            "KSampler",
            {
                "seed": 43,
                "control_after_generate": "fixed",
                "steps": 50,
                "cfg": 6.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "denoise": 1.0,
            },
            2,
        ),
        Node("decode", "EasyAnimateVAEDecode", {}, 3),
        Node("create", "CreateVideo", {"fps": 8.0}, 3),
        Node("save", "SaveVideo", {"filename_prefix": "video/EasyAnimate"}, 4),
    ]
    links = [
        ("model", "model", "sampler", "model"),
        ("text_encoder", "text_encoder", "positive", "text_encoder"),
        ("text_encoder", "text_encoder", "negative", "text_encoder"),
        ("positive", "CONDITIONING", "sampler", "positive"),
        ("negative", "CONDITIONING", "sampler", "negative"),
        ("latent", "LATENT", "sampler", "latent_image"),
        ("sampler", "LATENT", "decode", "samples"),
        ("vae", "vae", "decode", "vae"),
        ("decode", "IMAGE", "create", "images"),
        ("create", "VIDEO", "save", "video"),
    ]
    return nodes, links


def t2v() -> Workflow:
    nodes, links = text_to_video_nodes(V51_INP, "A young woman with beautiful clear eyes and blonde hair, smiling")
    return Workflow("easyanimate_v51_t2v", "EasyAnimate V5.1: text to video", nodes, links)


WORKFLOWS = [t2v]
