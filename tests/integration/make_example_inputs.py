"""Write the bundled workflows' example inputs (workflows/inputs/): small drawn pictures and clips, so every
workflow opens with its LoadImage / LoadVideo inputs present (the pack copies them into ComfyUI's input folder).

    .venv/bin/python tests/integration/make_example_inputs.py
"""

from __future__ import annotations

import math
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from PIL import Image, ImageDraw
from workflow_specs import MICRO_START_IMAGE

OUT = Path(__file__).resolve().parents[2] / "workflows" / "inputs"
W, H, FRAMES, FPS = 672, 384, 49, 8


def meadow(dog_x: float, dog_scale: float) -> Image.Image:
    """A sunny meadow with a dog (start / end images of image to video)."""
    image = Image.new("RGB", (W, H))
    draw = ImageDraw.Draw(image)
    for y in range(H):  # sky to grass
        sky = (110 + y // 4, 170 + y // 6, 235) if y < 200 else (70, 150 - (y - 200) // 5, 60)
        draw.line([(0, y), (W, y)], fill=sky)
    draw.ellipse([560, 30, 620, 90], fill=(255, 230, 120))
    s, x, y = dog_scale, dog_x, 250
    draw.ellipse([x - 60 * s, y - 25 * s, x + 60 * s, y + 25 * s], fill=(150, 100, 60))  # body
    draw.ellipse([x + 40 * s, y - 55 * s, x + 90 * s, y - 5 * s], fill=(150, 100, 60))  # head
    for leg in (-45, -20, 20, 45):
        draw.rectangle([x + leg * s - 6 * s, y + 15 * s, x + leg * s + 6 * s, y + 55 * s], fill=(120, 80, 50))
    return image


def studio_person() -> Image.Image:
    """A person in a softly lit studio (the control workflow's reference image)."""
    image = Image.new("RGB", (W, H), (225, 215, 200))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 300, W, H], fill=(170, 150, 130))
    draw.ellipse([306, 60, 366, 120], fill=(235, 195, 160))  # head
    draw.rounded_rectangle([296, 125, 376, 250], 20, fill=(200, 60, 80))  # dress
    draw.rectangle([306, 250, 326, 330], fill=(60, 60, 70))
    draw.rectangle([346, 250, 366, 330], fill=(60, 60, 70))
    return image


def cat_in_snow(t: float) -> np.ndarray:
    """A grey cat walking right through falling snow (the video-to-video source)."""
    image = Image.new("RGB", (W, H), (200, 210, 225))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 270, W, H], fill=(245, 245, 250))
    x = 120 + 420 * t
    step = 6 * math.sin(t * 24)
    draw.ellipse([x - 50, 210, x + 50, 260], fill=(110, 110, 115))
    draw.ellipse([x + 35, 180, x + 80, 225], fill=(110, 110, 115))
    draw.polygon([(x + 40, 190), (x + 48, 168), (x + 58, 185)], fill=(110, 110, 115))
    for leg, sign in ((-35, 1), (-10, -1), (15, 1), (35, -1)):
        draw.rectangle([x + leg + sign * step - 5, 250, x + leg + sign * step + 5, 285], fill=(95, 95, 100))
    rng = np.random.default_rng(0)
    for fx, fy in rng.random((60, 2)):
        y = (fy * H + 90 * t * H / 100) % H
        draw.ellipse([fx * W - 2, y - 2, fx * W + 2, y + 2], fill=(255, 255, 255))
    return np.asarray(image)


def pose(t: float) -> np.ndarray:
    """A dancing stick figure in OpenPose colours on black (the control video)."""
    image = Image.new("RGB", (W, H))
    draw = ImageDraw.Draw(image)
    cx, swing = 336 + 40 * math.sin(t * 2 * math.pi), math.sin(t * 4 * math.pi)
    neck, hip = (cx, 120), (cx, 230)
    joints = {
        "head": (cx, 80),
        "l_hand": (cx - 90, 120 - 70 * swing),
        "r_hand": (cx + 90, 120 + 70 * swing),
        "l_foot": (cx - 50 - 20 * swing, 340),
        "r_foot": (cx + 50 + 20 * swing, 340),
    }
    bones = [
        (neck, joints["head"], (255, 0, 85)),
        (neck, hip, (0, 255, 85)),
        (neck, joints["l_hand"], (255, 170, 0)),
        (neck, joints["r_hand"], (170, 255, 0)),
        (hip, joints["l_foot"], (0, 170, 255)),
        (hip, joints["r_foot"], (85, 0, 255)),
    ]
    for a, b, colour in bones:
        draw.line([a, b], fill=colour, width=8)
    for x, y in [neck, hip, *joints.values()]:
        draw.ellipse([x - 7, y - 7, x + 7, y + 7], fill=(255, 255, 255))
    return np.asarray(image)


def micro_start() -> Image.Image:
    """The micro image-to-video workflow's start image: frame 0 of a clip of its prompt's shape, drawn with a seed the
    training data never used (easyanimate_core.micro.evaluate.start_image)."""
    from workflow_specs import MICRO_I2V_ATTRIBUTES

    from easyanimate_core.micro.evaluate import Case, start_image

    return Image.fromarray((start_image(Case(MICRO_I2V_ATTRIBUTES, seed=0)).numpy() * 255).round().astype(np.uint8))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    micro_start().save(OUT / MICRO_START_IMAGE, optimize=True)
    meadow(150, 0.8).save(OUT / "easyanimate_start.png", optimize=True)
    meadow(380, 1.6).save(OUT / "easyanimate_end.png", optimize=True)
    studio_person().save(OUT / "easyanimate_reference.png", optimize=True)
    for name, draw in (("easyanimate_source.mp4", cat_in_snow), ("easyanimate_control.mp4", pose)):
        frames = np.stack([draw(i / (FRAMES - 1)) for i in range(FRAMES)])
        iio.imwrite(OUT / name, frames, extension=".mp4", fps=FPS, codec="libx264", quality=5)
    for path in sorted(OUT.iterdir()):
        print(f"{path.name}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
