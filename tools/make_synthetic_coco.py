#!/usr/bin/env python
"""A synthetic COCO-sized ground truth and detection results, for timing and testing evaluation.

The ground truth imitates COCO val2017's statistics: 5000 images of 200-640 pixels on the long
side, ~7 boxes per image (~8% have none) in COCO's 80 category ids with a long-tailed
frequency (the first category ~25%), object sizes with ~41% small, ~34% medium and ~25% large
areas (COCO's area ranges read the annotation's `area`, a segment's area, smaller than its box:
here a random 45-95% of it), and ~1% crowd boxes. The detections are 100 per image, as a DETR's
top-100: jittered copies of the ground truth (several per box, sometimes with a wrong class),
near-duplicates of those, and random boxes with low scores; ~30% of the scores are rounded to
three decimals, so tied scores (whose order COCOeval's stable sort fixes) are frequent.

Everything comes from one seeded numpy generator, so the same arguments write the same files.

    .venv/bin/python tools/make_synthetic_coco.py --output-dir /tmp/synthetic_coco
    .venv/bin/python tools/make_synthetic_coco.py --output-dir /tmp/small --images 200 --seed 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

# COCO's 80 category ids (1..90 with 10 unused).
COCO_CATEGORY_IDS = tuple(
    i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
)
GT_FILE = "instances_synthetic.json"
DT_FILE = "detections_synthetic.json"


def make_synthetic_coco(num_images: int = 5000, seed: int = 0, dets_per_image: int = 100):
    """The ground truth (a COCO instances dict) and the detection results (a list of
    {"image_id", "category_id", "bbox" [x, y, w, h], "score"} dicts, `dets_per_image` per
    image) of `num_images` synthetic images."""
    rng = np.random.default_rng(seed)
    images, widths, heights = _images(rng, num_images)
    gt = _ground_truth(rng, widths, heights)
    dets = _detections(rng, gt, widths, heights, dets_per_image)
    categories = [{"id": c, "name": f"class_{c}", "supercategory": "thing"}
                  for c in COCO_CATEGORY_IDS]  # fmt: skip
    annotations = [
        {"id": i + 1, "image_id": int(image), "category_id": int(category),
         "bbox": [float(v) for v in box], "area": float(area), "iscrowd": int(crowd)}
        for i, (image, category, box, area, crowd) in enumerate(
            zip(gt["image"], gt["category"], gt["box"], gt["area"], gt["crowd"]))
    ]  # fmt: skip
    results = [
        {"image_id": int(image), "category_id": int(category),
         "bbox": [float(v) for v in box], "score": float(score)}
        for image, category, box, score in zip(
            dets["image"], dets["category"], dets["box"], dets["score"])
    ]  # fmt: skip
    ground_truth = {
        "info": {"description": f"synthetic COCO-like data, {num_images} images, seed {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    return ground_truth, results


def _images(rng, num_images: int):
    """COCO-like image sizes: most with a 640-pixel long side, landscape 3 in 4."""
    long_side = np.where(rng.random(num_images) < 0.85, 640, rng.integers(200, 641, num_images))
    short_side = np.round(long_side * rng.uniform(0.5, 1.0, num_images)).astype(np.int64)
    landscape = rng.random(num_images) < 0.75
    widths = np.where(landscape, long_side, short_side)
    heights = np.where(landscape, short_side, long_side)
    ids = np.arange(1, num_images + 1)
    images = [
        {"id": int(i), "file_name": f"{i:012d}.jpg", "width": int(w), "height": int(h)}
        for i, w, h in zip(ids, widths, heights)
    ]
    return images, widths, heights


def _category_weights() -> np.ndarray:
    """A long-tailed class frequency (Zipf-like, as COCO's person ~30%, toaster ~0.02%)."""
    weights = np.arange(1, len(COCO_CATEGORY_IDS) + 1, dtype=np.float64) ** -1.1
    return weights / weights.sum()


def _random_boxes(rng, widths, heights, median_side=42.0, sigma=1.17):
    """(N, 4) x, y, w, h boxes inside images of the given (N,) sizes and their (N,) segment
    areas. sqrt(segment area) is log-normal (median 42 px, sigma 1.17: P(< 32) ~ 0.41,
    P(< 96) ~ 0.76, as COCO's small/medium/large split), the box is larger by 1 / fill."""
    n = len(widths)
    side = np.exp(rng.normal(np.log(median_side), sigma, n))
    fill = rng.uniform(0.45, 0.95, n)
    aspect = np.exp(rng.normal(0.0, 0.6, n))  # w / h
    box_area = side**2 / fill
    w = np.clip(np.sqrt(box_area * aspect), 1.0, widths)
    h = np.clip(np.sqrt(box_area / aspect), 1.0, heights)
    x = rng.random(n) * (widths - w)
    y = rng.random(n) * (heights - h)
    boxes = np.round(np.stack([x, y, w, h], axis=1), 2)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], 0.5)  # rounding must not make an empty box
    return boxes, np.round(boxes[:, 2] * boxes[:, 3] * fill, 2)


def _ground_truth(rng, widths, heights) -> dict:
    """Flat arrays of the ground truth: image id, category id, box (N, 4), area, crowd flag."""
    num_images = len(widths)
    # Negative binomial with mean 7.3 (COCO val2017: 36781 boxes / 5000 images), ~5% empty.
    per_image = np.minimum(rng.negative_binomial(1.5, 1.5 / (1.5 + 7.3), num_images), 60)
    image_index = np.repeat(np.arange(num_images), per_image)
    boxes, areas = _random_boxes(rng, widths[image_index], heights[image_index])
    categories = rng.choice(np.array(COCO_CATEGORY_IDS), size=len(image_index),
                            p=_category_weights())  # fmt: skip
    crowd = (rng.random(len(image_index)) < 0.015) & (areas > 32**2)  # crowds are large
    return {"image": image_index + 1, "index": image_index, "category": categories,
            "box": boxes, "area": areas, "crowd": crowd}  # fmt: skip


def _detections(rng, gt: dict, widths, heights, dets_per_image: int) -> dict:
    """Flat arrays of `dets_per_image` detections per image: jittered ground truth, their
    near-duplicates, then random low-score boxes up to the count."""
    num_images = len(widths)
    # 1 + Poisson(0.6) detections per ground-truth box, of varying localisation quality.
    copies = 1 + rng.poisson(0.6, len(gt["image"]))
    source = np.repeat(np.arange(len(gt["image"])), copies)
    image_index = gt["index"][source]
    box = gt["box"][source]
    noise = rng.uniform(0.02, 0.3, len(source))[:, None]  # relative jitter
    jitter = rng.normal(0.0, 1.0, (len(source), 4)) * noise
    w = box[:, 2] * np.exp(jitter[:, 2])
    h = box[:, 3] * np.exp(jitter[:, 3])
    x = box[:, 0] + jitter[:, 0] * box[:, 2]
    y = box[:, 1] + jitter[:, 1] * box[:, 3]
    near = np.stack([x, y, w, h], axis=1)
    category = gt["category"][source].copy()
    wrong = rng.random(len(source)) < 0.12
    category[wrong] = rng.choice(np.array(COCO_CATEGORY_IDS), size=int(wrong.sum()))
    score = np.clip(rng.normal(0.75, 0.15, len(source)) - noise[:, 0], 0.02, 0.999)

    # Near-duplicates of 15% of those: the same box moved by ~1%, a somewhat lower score.
    dup = rng.random(len(source)) < 0.15
    dup_box = near[dup] * (1 + rng.normal(0.0, 0.01, (int(dup.sum()), 4)))
    image_index = np.concatenate([image_index, image_index[dup]])
    near = np.concatenate([near, dup_box])
    category = np.concatenate([category, category[dup]])
    score = np.concatenate([score, score[dup] * rng.uniform(0.5, 1.0, int(dup.sum()))])

    # Keep at most dets_per_image per image, the highest scores (a detector's top-k).
    order = np.lexsort((-score, image_index))
    image_index, near, category, score = (a[order] for a in (image_index, near, category, score))
    starts = np.searchsorted(image_index, np.arange(num_images))
    rank = np.arange(len(image_index)) - starts[image_index]
    keep = rank < dets_per_image
    image_index, near, category, score = (a[keep] for a in (image_index, near, category, score))

    # Random boxes fill every image up to dets_per_image.
    fill = dets_per_image - np.bincount(image_index, minlength=num_images)
    random_index = np.repeat(np.arange(num_images), fill)
    random_box, _ = _random_boxes(rng, widths[random_index], heights[random_index])
    random_category = rng.choice(np.array(COCO_CATEGORY_IDS), size=len(random_index),
                                 p=_category_weights())  # fmt: skip
    random_score = rng.uniform(0.0, 0.6, len(random_index)) ** 2

    image_index = np.concatenate([image_index, random_index])
    boxes = _clip_to_image(np.concatenate([near, random_box]), widths[image_index],
                           heights[image_index])  # fmt: skip
    category = np.concatenate([category, random_category])
    score = np.concatenate([score, random_score])
    # Ties: 30% of the scores at three decimals; the others at float32 precision, as dumped.
    tied = rng.random(len(score)) < 0.3
    score = np.where(tied, np.round(score, 3), score.astype(np.float32).astype(np.float64))
    order = np.argsort(image_index, kind="stable")  # results grouped by image, as dumped
    return {"image": image_index[order] + 1, "category": category[order], "box": boxes[order],
            "score": score[order]}  # fmt: skip


def _clip_to_image(boxes, widths, heights):
    """x, y, w, h boxes clipped to their images (a detector clips its boxes), at least 0.5 px
    wide and high, rounded to 2 decimals."""
    x1 = np.clip(boxes[:, 0], 0, widths - 0.5)
    y1 = np.clip(boxes[:, 1], 0, heights - 0.5)
    x2 = np.clip(boxes[:, 0] + boxes[:, 2], x1 + 0.5, widths)
    y2 = np.clip(boxes[:, 1] + boxes[:, 3], y1 + 0.5, heights)
    clipped = np.round(np.stack([x1, y1, x2 - x1, y2 - y1], axis=1), 2)
    clipped[:, 2:] = np.maximum(clipped[:, 2:], 0.5)
    return clipped


def write_synthetic_coco(output_dir, num_images: int = 5000, seed: int = 0):
    """Write GT_FILE and DT_FILE into output_dir; return their paths and contents."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ground_truth, results = make_synthetic_coco(num_images, seed)
    gt_path, dt_path = output_dir / GT_FILE, output_dir / DT_FILE
    gt_path.write_text(json.dumps(ground_truth))
    dt_path.write_text(json.dumps(results))
    return gt_path, dt_path, ground_truth, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--images", type=int, default=5000, help="number of images (5000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    gt_path, dt_path, ground_truth, results = write_synthetic_coco(
        args.output_dir, args.images, args.seed
    )
    annotations = ground_truth["annotations"]
    areas = np.array([a["area"] for a in annotations])
    print(f"{gt_path}: {len(ground_truth['images'])} images, {len(annotations)} boxes "
          f"({np.mean(areas < 32**2):.0%} small, {np.mean((areas >= 32**2) & (areas < 96**2)):.0%} "
          f"medium, {np.mean(areas >= 96**2):.0%} large, "
          f"{sum(a['iscrowd'] for a in annotations)} crowd)")  # fmt: skip
    print(f"{dt_path}: {len(results)} detections")


if __name__ == "__main__":
    main()
