"""Draw a deterministic synthetic scene (sky, sun, hills, a house, a textured tree) as a PNG.

The shipped token-group pictures are made from it, because the ImageNet dev photos may not be redistributed.
It has flat regions (sky), smooth gradients (hills) and detailed ones (house, tree), which is what token
reduction reacts to.

    python experiments/synthetic_scene/make_synthetic_scene.py --output experiments/synthetic_scene/synthetic_scene.png
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image, ImageDraw


def synthetic_scene(size: int = 256, seed: int = 0) -> Image.Image:
    """The scene as an RGB image of `size` x `size` pixels."""
    rows = np.linspace(0.0, 1.0, size)[:, None, None]
    sky = (np.array([90, 150, 230]) * (1 - 0.3 * rows) + np.array([200, 225, 250]) * 0.3 * rows).astype(np.uint8)
    image = Image.fromarray(np.broadcast_to(sky, (size, size, 3)).copy())
    draw = ImageDraw.Draw(image)
    unit = size / 256
    draw.ellipse([190 * unit, 20 * unit, 235 * unit, 65 * unit], fill=(255, 220, 60))
    draw.ellipse([-80 * unit, 150 * unit, 200 * unit, 380 * unit], fill=(70, 150, 60))
    draw.ellipse([100 * unit, 170 * unit, 380 * unit, 400 * unit], fill=(50, 125, 45))
    draw.rectangle([40 * unit, 140 * unit, 120 * unit, 210 * unit], fill=(190, 60, 50))
    draw.polygon([(30 * unit, 140 * unit), (80 * unit, 100 * unit), (130 * unit, 140 * unit)], fill=(110, 40, 30))
    draw.rectangle([55 * unit, 155 * unit, 75 * unit, 175 * unit], fill=(240, 240, 200))
    draw.rectangle([88 * unit, 170 * unit, 105 * unit, 210 * unit], fill=(80, 50, 30))
    draw.rectangle([180 * unit, 150 * unit, 192 * unit, 215 * unit], fill=(90, 60, 35))
    pixels = np.asarray(image).astype(np.int16)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    crown = (yy - 125 * unit) ** 2 + (xx - 186 * unit) ** 2 < (38 * unit) ** 2
    leaves = rng.integers(-45, 45, size=(size, size, 1)) + np.array([40, 110, 35])
    pixels[crown] = leaves[crown]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.add_argument("--size", type=int, default=256, help="side length in pixels")
    args = parser.parse_args()
    synthetic_scene(args.size).save(args.output)


if __name__ == "__main__":
    main()
