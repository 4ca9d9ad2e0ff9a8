"""The bundled workflows (workflows/*.json), declared as node lists and links.

build_workflows.py turns each spec into a UI-format workflow with the real frontend (so widget order, sizes and
converted inputs are the frontend's own) and a .jpg thumbnail; test_workflows.py loads the saved files back in
the frontend and runs them. Model names are the released folders' names; the tests point them at tiny ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from easyanimate_core.micro import shipped_micro_model
from easyanimate_core.micro.data import Attributes
from easyanimate_core.micro.model import GENERATION_DEFAULTS

V51_INP = "EasyAnimateV5.1-12b-zh-InP"
V51_CONTROL = "EasyAnimateV5.1-12b-zh-Control"
V4_INP = "EasyAnimateV4-XL-2-InP"
V51_CAMERA = "EasyAnimateV5.1-12b-zh-Control-Camera"
V3_INP = "EasyAnimateV3-XL-2-InP-768x768"
V2_T2V = "EasyAnimateV2-XL-2-768x768"
# nodes.common.BUNDLED_MICRO: the micro model shipped in the pack; its workflows run as saved, on its weights.
MICRO = "EasyAnimate-Micro (bundled)"
# Titles (= file names, which the template browser shows) of the micro model's workflows start with this.
MICRO_PREFIX = "EasyAnimate Micro · "
# The tiny random checkpoints the tests put in place of the released folders:
# released name -> (tiny folder name, variant, version).
TINY_STAND_INS = {
    V51_INP: ("tiny-v51-inp", "InP", "V5.1"),
    V51_CONTROL: ("tiny-v51-control", "Control", "V5.1"),
    V51_CAMERA: ("tiny-v51-camera", "Camera", "V5.1"),
    V4_INP: ("tiny-v4-inp", "InP", "V4"),
    V3_INP: ("tiny-v3-inp", "InP", "V3"),
    V2_T2V: ("tiny-v2-t2v", "T2V", "V2"),
}
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


def released(title: str, nodes: list[Node], links: list[tuple[str, str, str, str]]) -> Workflow:
    """A released-model workflow, whose file is named by its title: ComfyUI's template browser (frontends 1.27 to
    1.58) shows a custom node's template by its file name, as both title and description."""
    return Workflow(title, title, nodes, links)


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


def sampler_node(denoise: float = 1.0, steps: int = 50, cfg: float = 6.0, column: int = 3) -> Node:
    """The one-node EasyAnimate sampler with the version's released settings ("default")."""
    widgets = {"seed": 43, "control_after_generate": "fixed", "steps": steps, "cfg": cfg, "denoise": denoise}
    return Node("sampler", "EasyAnimateSampler", {**widgets, "sampler_name": "default", "scheduler": "default"}, column)


def conditioned_nodes(
    model: str,
    prompt: str,
    conditioning: Node,
    inputs: list[Node],
    denoise: float = 1.0,
    steps: int = 50,
    cfg: float = 6.0,
    fps: float = 8.0,
):
    """Loaders and prompts, a conditioning node fed by ``inputs``, our sampler, decode and save."""
    nodes = [
        Node("model", "EasyAnimateModelLoader", {"model_folder": model, "weight_dtype": "default"}, 0),
        Node("text_encoder", "EasyAnimateTextEncoderLoader", {"model_folder": model}, 0),
        Node("vae", "EasyAnimateVAELoader", {"model_folder": model}, 0),
        *inputs,
        Node("positive", "EasyAnimateTextEncode", {"text": prompt}, 1, "Positive prompt"),
        Node("negative", "EasyAnimateTextEncode", {"text": NEGATIVE}, 1, "Negative prompt"),
        conditioning,
        sampler_node(denoise, steps, cfg),
        Node("decode", "EasyAnimateVAEDecode", {}, 4),
        Node("create", "CreateVideo", {"fps": fps}, 4),
        Node("save", "SaveVideo", {"filename_prefix": "video/EasyAnimate"}, 5),
    ]
    links = [
        ("text_encoder", "text_encoder", "positive", "text_encoder"),
        ("text_encoder", "text_encoder", "negative", "text_encoder"),
        ("positive", "CONDITIONING", conditioning.key, "positive"),
        ("negative", "CONDITIONING", conditioning.key, "negative"),
        ("vae", "vae", conditioning.key, "vae"),
        ("model", "model", "sampler", "model"),
        (conditioning.key, "positive", "sampler", "positive"),
        (conditioning.key, "negative", "sampler", "negative"),
        (conditioning.key, "latent", "sampler", "latent"),
        ("sampler", "LATENT", "decode", "samples"),
        ("vae", "vae", "decode", "vae"),
        ("decode", "IMAGE", "create", "images"),
        ("create", "VIDEO", "save", "video"),
    ]
    return nodes, links


SIZE = {"width": 672, "height": 384, "frames": 49, "batch_size": 1}


def t2v() -> Workflow:
    nodes, links = text_to_video_nodes(V51_INP, "A young woman with beautiful clear eyes and blonde hair, smiling")
    return released("EasyAnimate V5.1 · Text to Video", nodes, links)


def i2v() -> Workflow:
    """Start and end images (stock LoadImage) on an InP model."""
    conditioning = Node("i2v", "EasyAnimateImageToVideo", {**SIZE, "noise_aug_strength": 0.0563}, 2)
    inputs = [
        Node("start", "LoadImage", {"image": "easyanimate_start.png"}, 1, "Start image"),
        Node("end", "LoadImage", {"image": "easyanimate_end.png"}, 1, "End image"),
    ]
    prompt = "A dog running across a meadow towards the camera, sunny day"
    nodes, links = conditioned_nodes(V51_INP, prompt, conditioning, inputs)
    links += [("start", "IMAGE", "i2v", "start_image"), ("end", "IMAGE", "i2v", "end_image")]
    return released("EasyAnimate V5.1 · Image to Video (start + end)", nodes, links)


def v2v() -> Workflow:
    """A source video (stock LoadVideo + GetVideoComponents) re-noised and denoised at strength 0.7."""
    conditioning = Node("v2v", "EasyAnimateVideoToVideo", SIZE, 2)
    inputs = [
        Node("load", "LoadVideo", {"file": "easyanimate_source.mp4"}, 1, "Source video"),
        Node("frames", "GetVideoComponents", {}, 1),
    ]
    prompt = "A cat walking in the snow, cinematic lighting"
    nodes, links = conditioned_nodes(V51_INP, prompt, conditioning, inputs, denoise=0.7)
    links += [("load", "VIDEO", "frames", "video"), ("frames", "images", "v2v", "video")]
    return released("EasyAnimate V5.1 · Video to Video (strength 0.7)", nodes, links)


def control() -> Workflow:
    """A control video (e.g. pose, depth or canny frames) and a reference image on a Control model."""
    conditioning = Node("control", "EasyAnimateControlVideo", SIZE, 2)
    inputs = [
        Node("load", "LoadVideo", {"file": "easyanimate_control.mp4"}, 1, "Control video (pose / depth / canny)"),
        Node("frames", "GetVideoComponents", {}, 1),
        Node("reference", "LoadImage", {"image": "easyanimate_reference.png"}, 1, "Reference image"),
    ]
    prompt = "A person dancing in a studio, soft light"
    nodes, links = conditioned_nodes(V51_CONTROL, prompt, conditioning, inputs)
    links += [
        ("load", "VIDEO", "frames", "video"),
        ("frames", "images", "control", "video"),
        ("reference", "IMAGE", "control", "ref_image"),
    ]
    return released("EasyAnimate V5.1 · Control Video + Reference", nodes, links)


def lora() -> Workflow:
    """Text to video with a LoRA (official, peft or diffusers layout) from models/loras/."""
    nodes, links = text_to_video_nodes(V51_INP, "A young woman with beautiful clear eyes and blonde hair, smiling")
    nodes.insert(
        1, Node("lora", "EasyAnimateLoraLoader", {"lora_name": "easyanimate_style.safetensors", "strength": 1.0}, 0)
    )
    links = [link for link in links if link[:2] != ("model", "model")]
    links += [("model", "model", "lora", "model"), ("lora", "MODEL", "sampler", "model")]
    return released("EasyAnimate V5.1 · Text to Video with a LoRA", nodes, links)


def camera() -> Workflow:
    """A camera motion (two presets moving together) on a Control-Camera model, with a reference image."""
    motion = Node(
        "motion",
        "EasyAnimateCameraMotion",
        {"motion": "Pan Left", "motion_2": "Zoom In", "speed": 1.0, "frames": 49},
        1,
    )
    conditioning = Node("camera", "EasyAnimateCameraControl", SIZE, 2)
    inputs = [motion, Node("reference", "LoadImage", {"image": "easyanimate_reference.png"}, 1, "Reference image")]
    prompt = "A quiet harbour town at sunrise, boats on calm water"
    nodes, links = conditioned_nodes(V51_CAMERA, prompt, conditioning, inputs)
    links += [("motion", "camera", "camera", "camera"), ("reference", "IMAGE", "camera", "ref_image")]
    return released("EasyAnimate V5.1 · Camera Control", nodes, links)


def trajectory() -> Workflow:
    """A drawn trajectory (points a frame, as KJNodes' spline editor writes them) as the control video of a Control
    model, with a reference image."""
    points = [{"x": 120 + 9 * i, "y": 260 - 3 * i} for i in range(49)]
    track = Node("track", "EasyAnimateTrajectory", {"coordinates": json.dumps(points), "width": 672, "height": 384}, 1)
    conditioning = Node("control", "EasyAnimateControlVideo", SIZE, 2)
    inputs = [track, Node("reference", "LoadImage", {"image": "easyanimate_reference.png"}, 1, "Reference image")]
    prompt = "A red kite flying over a green hill, blue sky"
    nodes, links = conditioned_nodes(V51_CONTROL, prompt, conditioning, inputs)
    links += [("track", "video", "control", "video"), ("reference", "IMAGE", "control", "ref_image")]
    return released("EasyAnimate V5.1 · Trajectory Control", nodes, links)


def long_video() -> Workflow:
    """145 frames from 49-frame windows: ComfyUI's own "WAN Context Windows (Manual)" node (frames in video frames,
    4 per latent frame, like EasyAnimate's VAE) between the loader and the stock KSampler."""
    nodes, links = text_to_video_nodes(V51_INP, "A sailing boat gliding along a rocky coast at sunset, drone shot")
    next(n for n in nodes if n.key == "latent").widgets["frames"] = 145
    windows = {
        "context_length": 49,
        "context_overlap": 16,
        "context_schedule": "standard_static",
        "context_stride": 1,
        "closed_loop": False,
        "fuse_method": "pyramid",
    }
    nodes.insert(3, Node("windows", "WanContextWindowsManual", windows, 1, "Context windows"))
    links = [link for link in links if link[:2] != ("model", "model")]
    links += [("model", "model", "windows", "model"), ("windows", "MODEL", "sampler", "model")]
    return released("EasyAnimate V5.1 · Long Video (145 frames)", nodes, links)


def released_text_to_video(title: str, model: str, version: str, steps: int, cfg: float) -> Workflow:
    """Text to video with EasyAnimate Sampler (the version's released sampler at "default"), 144 frames at 24 fps."""
    nodes, links = text_to_video_nodes(model, "A young woman with beautiful clear eyes and blonde hair, smiling")
    nodes = [n for n in nodes if n.key != "sampler"]
    latent = next(n for n in nodes if n.key == "latent")
    latent.widgets = {**latent.widgets, "version": version, "frames": 144}
    next(n for n in nodes if n.key == "create").widgets = {"fps": 24.0}
    nodes.insert(nodes.index(latent) + 1, sampler_node(steps=steps, cfg=cfg, column=2))
    links = [(a, b, c, "latent" if d == "latent_image" else d) for a, b, c, d in links]
    return released(title, nodes, links)


def v4_t2v() -> Workflow:
    """V4 text to video: its released 25 Euler steps at guidance 7, 144 frames (multiples of 8), BERT + mT5."""
    return released_text_to_video("EasyAnimate V4 · Text to Video (144 frames)", V4_INP, "V4", 25, 7.0)


V4_SIZE = {"width": 672, "height": 384, "frames": 144, "batch_size": 1}
V4_SAMPLING = {"steps": 25, "cfg": 7.0, "fps": 24.0}  # released: Euler 25 steps, guidance 7, 24 fps


def v4_i2v() -> Workflow:
    """V4 image to video: the start image through the slice VAE and, for the last 40% of steps, its CLIP features."""
    conditioning = Node("i2v", "EasyAnimateImageToVideo", {**V4_SIZE, "noise_aug_strength": 0.0563}, 2)
    inputs = [
        Node("image_encoder", "EasyAnimateImageEncoderLoader", {"model_folder": V4_INP}, 0),
        Node("start", "LoadImage", {"image": "easyanimate_start.png"}, 1, "Start image"),
    ]
    prompt = "A dog running across a meadow towards the camera, sunny day"
    nodes, links = conditioned_nodes(V4_INP, prompt, conditioning, inputs, **V4_SAMPLING)
    links += [("start", "IMAGE", "i2v", "start_image"), ("image_encoder", "image_encoder", "i2v", "image_encoder")]
    return released("EasyAnimate V4 · Image to Video", nodes, links)


def v4_v2v() -> Workflow:
    """V4 video to video at strength 0.7."""
    conditioning = Node("v2v", "EasyAnimateVideoToVideo", V4_SIZE, 2)
    inputs = [
        Node("load", "LoadVideo", {"file": "easyanimate_source.mp4"}, 1, "Source video"),
        Node("frames", "GetVideoComponents", {}, 1),
    ]
    prompt = "A cat walking in the snow, cinematic lighting"
    nodes, links = conditioned_nodes(V4_INP, prompt, conditioning, inputs, denoise=0.7, **V4_SAMPLING)
    links += [("load", "VIDEO", "frames", "video"), ("frames", "images", "v2v", "video")]
    return released("EasyAnimate V4 · Video to Video (strength 0.7)", nodes, links)


V3_SIZE = {"width": 1008, "height": 576, "frames": 72, "batch_size": 1}  # the official V3 ComfyUI workflow's


def v3_i2v() -> Workflow:
    """V3 image to video: the start image through the slice VAE and, on the last half of the steps, its CLIP image
    embedding; 72 frames at 1008 x 576 (the official V3 ComfyUI workflow's), DPM++ 25 steps at guidance 7
    (predict_i2v.py, the Sampler's "default"), T5 prompts, 24 fps."""
    conditioning = Node("i2v", "EasyAnimateImageToVideo", {**V3_SIZE, "noise_aug_strength": 0.0563}, 2)
    inputs = [
        Node("image_encoder", "EasyAnimateImageEncoderLoader", {"model_folder": V3_INP}, 0),
        Node("start", "LoadImage", {"image": "easyanimate_start.png"}, 1, "Start image"),
    ]
    prompt = "A dog running across a meadow towards the camera, sunny day"
    nodes, links = conditioned_nodes(V3_INP, prompt, conditioning, inputs, steps=25, cfg=7.0, fps=24.0)
    links += [("start", "IMAGE", "i2v", "start_image"), ("image_encoder", "image_encoder", "i2v", "image_encoder")]
    return released("EasyAnimate V3 · Image to Video", nodes, links)


def v2_t2v() -> Workflow:
    """V2 text to video: 144 frames (multiples of 9 for its MagViT VAE) at 672 x 384, DPM++ 30 steps at guidance 6
    (its predict_t2v.py, the Sampler's "default"), T5 prompts, 24 fps."""
    return released_text_to_video("EasyAnimate V2 · Text to Video (144 frames)", V2_T2V, "V2", 30, 6.0)


def micro_t2v() -> Workflow:
    """The bundled micro model: a 64 x 64 clip of 17 frames in seconds on a CPU, at its own generation defaults."""
    nodes, links = text_to_video_nodes(MICRO, "a red circle moving right slowly on a navy background")
    title = f"{MICRO_PREFIX}Text to Video"
    return _micro_settings(Workflow(title, title, nodes, links))


def micro_lora() -> Workflow:
    """The bundled micro model with its bundled LoRA, which teaches a colour the base model never saw (cyan)."""
    nodes, links = text_to_video_nodes(MICRO, "a cyan circle moving right slowly on a navy background")
    nodes.insert(1, Node("lora", "EasyAnimateLoraLoader", {"lora_name": "micro_cyan.safetensors", "strength": 1.0}, 0))
    links = [link for link in links if link[:2] != ("model", "model")]
    links += [("model", "model", "lora", "model"), ("lora", "MODEL", "sampler", "model")]
    title = f"{MICRO_PREFIX}LoRA (a new colour)"
    return _micro_settings(Workflow(title, title, nodes, links))


def micro_i2v() -> Workflow:
    """The bundled micro model from a start image (a first frame it never saw in training): the prompt says how
    the shape moves on."""
    defaults = GENERATION_DEFAULTS
    size = {"width": defaults["width"], "height": defaults["height"], "frames": defaults["frames"], "batch_size": 1}
    conditioning = Node("i2v", "EasyAnimateImageToVideo", {**size, "noise_aug_strength": 0.0563}, 2)
    inputs = [Node("start", "LoadImage", {"image": MICRO_START_IMAGE}, 1, "Start image")]
    prompt = MICRO_I2V_ATTRIBUTES.caption
    nodes, links = conditioned_nodes(
        MICRO, prompt, conditioning, inputs, steps=defaults["steps"], cfg=defaults["guidance"], fps=defaults["fps"]
    )
    next(n for n in nodes if n.key == "negative").widgets = {"text": ""}
    links += [("start", "IMAGE", "i2v", "start_image")]
    title = f"{MICRO_PREFIX}Image to Video"
    return Workflow(title, title, nodes, links)


# The micro image-to-video workflow's start image (workflows/inputs/, made by make_example_inputs.py): frame 0
# of a clip of these attributes (a held-out colour and shape pair) that no training clip is.
MICRO_START_IMAGE = "easyanimate_micro_start.png"
MICRO_I2V_ATTRIBUTES = Attributes("circle", "green", "down", "quickly", "black")


def _micro_settings(workflow: Workflow) -> Workflow:
    """The micro model's generation defaults (the CLI's too), EasyAnimate Sampler, and an empty negative prompt
    (the unconditional branch the model was trained with, by caption dropout)."""
    defaults = GENERATION_DEFAULTS
    nodes = [n for n in workflow.nodes if n.key != "sampler"]
    latent = next(n for n in nodes if n.key == "latent")
    latent.widgets = {**latent.widgets, **{k: defaults[k] for k in ("width", "height", "frames")}}
    next(n for n in nodes if n.key == "negative").widgets = {"text": ""}
    next(n for n in nodes if n.key == "create").widgets = {"fps": float(defaults["fps"])}
    nodes.insert(nodes.index(latent) + 1, sampler_node(steps=defaults["steps"], cfg=defaults["guidance"], column=2))
    links = [(a, b, c, "latent" if d == "latent_image" else d) for a, b, c, d in workflow.links]
    return Workflow(workflow.name, workflow.description, nodes, links)


MICRO_WORKFLOWS = [micro_t2v, micro_i2v, micro_lora]
# The micro model's workflows exist (and are built) once its weights are in the repository: before that no
# loader lists the bundled model, and a workflow naming it could not run.
WORKFLOWS = [t2v, i2v, v2v, control, camera, trajectory, lora, long_video, v4_t2v, v4_i2v, v4_v2v, v3_i2v, v2_t2v]
if shipped_micro_model() is not None:
    WORKFLOWS += MICRO_WORKFLOWS
