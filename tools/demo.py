#!/usr/bin/env python
"""Detect objects in images and save them with their boxes, class names and scores drawn.

    .venv/bin/python tools/demo.py --config-file configs/demo/rank_detr_r18_shapes.py \\
        --checkpoint output/demo/model_final.pth --input datasets/shapes/val/images \\
        --output output/demo/vis --score-threshold 0.3

An exported model (tools/export_onnx.py) runs in ONNX Runtime instead, with the same resize,
outputs and drawing; the file's metadata gives the test transform and class names, so the config
is optional (given, it is read for those instead):

    .venv/bin/python tools/demo.py --onnx output/demo/model.onnx \\
        --input datasets/shapes/val/images --output output/demo/vis_onnx

`--input` takes image files, directories (their image files, not recursive) and glob patterns
(quoted, `**` allowed). Each image is written as a PNG of the same stem into `--output`. An image
that cannot be read is reported and skipped; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

import numpy as np
from detectron2.utils.colormap import colormap
from detectron2.utils.visualizer import Visualizer
from PIL import Image
from tqdm import tqdm

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given (a missing one is reported when read), directories' image files and glob
    matches, in order, without duplicates."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif glob.has_magic(item):
            paths += [Path(p) for p in sorted(glob.glob(item, recursive=True)) if Path(p).is_file()]
        else:
            paths.append(path)
    return list(dict.fromkeys(paths))


def output_names(paths: list[Path]) -> list[str]:
    """`stem.png` per input; a stem seen before gets `_1`, `_2`, ... so nothing is overwritten."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        count = seen.get(path.stem, 0)
        seen[path.stem] = count + 1
        names.append(f"{path.stem}.png" if count == 0 else f"{path.stem}_{count}.png")
    return names


def class_colour(label: int) -> np.ndarray:
    """RGB in [0, 1] of a class: detectron2's colour map, reused cyclically."""
    colours = colormap(rgb=True, maximum=1)
    return colours[int(label) % len(colours)]


def draw_prediction(image: np.ndarray, prediction) -> Image.Image:
    """(H, W, 3) uint8 RGB image with each detection's box and "name score" label drawn by
    detectron2's Visualizer, one colour per class."""
    labels = [
        f"{name} {score:.2f}" for name, score in zip(prediction.class_names, prediction.scores)
    ]
    visualizer = Visualizer(image, scale=1.0)
    drawn = visualizer.overlay_instances(
        boxes=np.asarray(prediction.boxes, dtype=np.float64).reshape(-1, 4),
        labels=labels,
        assigned_colors=[class_colour(label) for label in prediction.classes],
    )
    return Image.fromarray(drawn.get_image())


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", help="the LazyConfig (optional with --onnx)")
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", help="trained weights (.pth)")
    weights.add_argument("--onnx", help="an exported model (.onnx), run by ONNX Runtime")
    parser.add_argument("--input", nargs="+", required=True,
                        help="image files, directories or glob patterns")  # fmt: skip
    parser.add_argument("--output", required=True, help="directory for the drawn PNGs")
    parser.add_argument("--score-threshold", type=float, default=0.3)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    if args.config_file is None and args.onnx is None:
        parser.error("--config-file is required with --checkpoint")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    paths = expand_inputs(args.input)
    if not paths:
        print(f"demo: no images found for --input {' '.join(args.input)}", file=sys.stderr)
        return 1
    from rankdetr.errors import is_user_error
    from rankdetr.predictor import Predictor, as_rgb_image

    try:
        predictor = Predictor(
            args.config_file,
            args.onnx or args.checkpoint,
            device=args.device,
            score_threshold=args.score_threshold,
            overrides=args.overrides,
        )
    except (KeyError, ValueError, TypeError, OSError, RuntimeError, ImportError) as error:
        print(f"demo: {error}", file=sys.stderr)
        return 1
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    failed = []
    for path, name in tqdm(list(zip(paths, output_names(paths))), desc="images", unit="img"):
        try:
            image = as_rgb_image(path, predictor.max_image_pixels)
        except (OSError, ValueError) as error:  # missing, unreadable or too large: report, go on
            tqdm.write(f"demo: skipped: {error}", file=sys.stderr)
            failed.append(path)
            continue
        try:
            prediction = predictor(image)
        except ValueError as error:  # e.g. ONNX Runtime refused the image: report, go on
            if not is_user_error(error):
                raise
            tqdm.write(f"demo: skipped {path}: {error}", file=sys.stderr)
            failed.append(path)
            continue
        draw_prediction(image, prediction).save(output / name)
    written = len(paths) - len(failed)
    print(f"demo: wrote {written} image(s) to {output}")
    if failed:
        print(f"demo: {len(failed)} of {len(paths)} image(s) could not be read: "
              + ", ".join(str(p) for p in failed), file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
