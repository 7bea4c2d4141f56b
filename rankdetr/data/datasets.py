"""Dataset registration for detectron2's DatasetCatalog / MetadataCatalog.

* "shapes_train" / "shapes_val": the bundled synthetic dataset (:mod:`rankdetr.data.synthetic`),
  generated on first load.
* "coco_2017_train" / "coco_2017_val": detectron2's own builtin registration (made when it is
  imported, from `$DETECTRON2_DATASETS`, default "datasets"); the configs use those names.
* any COCO-format dataset: :func:`register_coco_format`.

All loaders return detectron2 dataset dicts with boxes in XYXY_ABS and contiguous category ids
0..K-1 (COCO ids in increasing order), and validate the file (see
:func:`load_coco_json_checked`). Registering is cheap and touches no file: errors come when the
data is first loaded.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from rankdetr.data.synthetic import (
    SHAPES_CATEGORIES,
    SHAPES_SPLITS,
    generate_shapes_dataset,
    shapes_split_paths,
)
from rankdetr.data.training_boxes import LoadSummary, remember_load
from rankdetr.errors import UserError

__all__ = [
    "DatasetFormatError",
    "check_annotation_integrity",
    "default_shapes_root",
    "load_coco_json_checked",
    "UnknownDatasetError",
    "class_names_of",
    "num_classes_of",
    "register_coco_format",
    "register_shapes_dataset",
]

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUIRED_KEYS = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}
MAX_EXAMPLES = 5  # offending entries quoted in an error message

# name -> the arguments we registered it with; names we did not register are never replaced.
_REGISTERED: dict[str, tuple] = {}


class DatasetFormatError(ValueError, UserError):
    """An annotation file that is not valid COCO; the message names the file and the problem."""


# --- registration -----------------------------------------------------------------------------


def default_shapes_root() -> Path:
    """`$RANKDETR_DATASETS/shapes` if the variable is set, else `<repo root>/datasets/shapes`."""
    datasets = os.environ.get("RANKDETR_DATASETS")
    return Path(datasets) / "shapes" if datasets else REPO_ROOT / "datasets" / "shapes"


def register_shapes_dataset(
    root: str | Path | None = None, num_images: Mapping[str, int] | None = None
) -> Path:
    """Register "shapes_train" and "shapes_val"; the files are generated when first loaded.

    Calling it again with the same arguments does nothing; with other arguments it replaces
    the earlier registration. COCOEvaluator reads the JSON when it is constructed: load the
    dataset first (DatasetCatalog.get or the test loader, as detectron2's evaluation flow does).

    Args:
        root: dataset folder (splits in `root/train`, `root/val`); default
            :func:`default_shapes_root`.
        num_images: images per split, overriding the defaults (2000 train, 200 val), e.g.
            {"train": 64} for a quick test. The seeds stay those of SHAPES_SPLITS.

    Returns:
        The root folder.
    """
    root = Path(root) if root is not None else default_shapes_root()
    for split, spec in SHAPES_SPLITS.items():
        count = dict(num_images or {}).get(split, spec["num_images"])
        json_file, image_root = shapes_split_paths(root, split)
        _register(
            f"shapes_{split}",
            functools.partial(_load_shapes_split, root, split, count, spec["seed"]),
            _shapes_metadata(json_file, image_root),
            key=("shapes", str(root), split, count),
        )
    return root


def _shapes_metadata(json_file: Path, image_root: Path) -> dict:
    # The categories are known, so the metadata is complete before anything is generated.
    return {
        "thing_classes": [category["name"] for category in SHAPES_CATEGORIES],
        "thing_dataset_id_to_contiguous_id": {
            category["id"]: index for index, category in enumerate(SHAPES_CATEGORIES)
        },
        "json_file": str(json_file),
        "image_root": str(image_root),
        "evaluator_type": "coco",
    }


def _load_shapes_split(root: Path, split: str, num_images: int, seed: int) -> list[dict]:
    json_file = generate_shapes_dataset(root, split, num_images, seed)
    return load_coco_json_checked(json_file, shapes_split_paths(root, split)[1], f"shapes_{split}")


def register_coco_format(name: str, json_file: str | Path, image_root: str | Path) -> None:
    """Register a COCO-format detection dataset under `name` (loaded by
    :func:`load_coco_json_checked`, evaluated with COCOEvaluator).

    The class names and the id mapping enter the metadata when the data is first loaded (or by
    :func:`num_classes_of`). Registering a name again with the same files does nothing, with other
    files replaces it; a name registered by someone else (e.g. detectron2's builtin datasets) is
    refused.
    """
    metadata = {
        "json_file": str(json_file),
        "image_root": str(image_root),
        "evaluator_type": "coco",
    }
    _register(
        name,
        functools.partial(load_coco_json_checked, json_file, image_root, name),
        metadata,
        key=("coco_format", str(json_file), str(image_root)),
    )


def _register(name: str, loader: Callable[[], list[dict]], metadata: dict, key: tuple) -> None:
    if name in DatasetCatalog.list():
        if _REGISTERED.get(name) == key:
            return
        if name not in _REGISTERED:
            raise ValueError(
                f"dataset name {name!r} is already registered (not by rankdetr); choose another"
            )
        DatasetCatalog.remove(name)
    _replace_metadata(name, metadata)
    DatasetCatalog.register(name, loader)
    _REGISTERED[name] = key


def _replace_metadata(name: str, metadata: dict) -> None:
    # detectron2 refuses to change a metadata value in place; start from a fresh entry instead.
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    MetadataCatalog.get(name).set(**metadata)


class UnknownDatasetError(KeyError, UserError):
    """A dataset name that is not registered."""

    def __str__(self) -> str:
        return str(self.args[0])


def class_names_of(dataset_name: str) -> list[str]:
    """The class names (metadata `thing_classes`) of a registered dataset: the one lookup the
    runner, the predictor and the data use.

    For a :func:`register_coco_format` dataset that was not loaded yet, this loads it (the
    classes come from its JSON).
    """
    if dataset_name not in DatasetCatalog.list():
        raise UnknownDatasetError(
            f"dataset {dataset_name!r} is not registered (register your own COCO-format data "
            "with rankdetr.data.register_coco_format(name, json_file, image_root))"
        )
    if not MetadataCatalog.get(dataset_name).get("thing_classes"):
        DatasetCatalog.get(dataset_name)  # our COCO loaders set thing_classes
    classes = MetadataCatalog.get(dataset_name).get("thing_classes")
    if not classes:
        raise DatasetFormatError(f"dataset {dataset_name!r} has no thing_classes in its metadata")
    return list(classes)


def num_classes_of(dataset_name: str) -> int:
    """Number of classes of a registered dataset (see :func:`class_names_of`)."""
    return len(class_names_of(dataset_name))


# --- loading and validating COCO JSON ---------------------------------------------------------


def load_coco_json_checked(
    json_file: str | Path,
    image_root: str | Path,
    dataset_name: str | None = None,
    check_image_files: bool = True,
) -> list[dict]:
    """Load a COCO instances JSON as detectron2 dataset dicts, validating it first.

    Errors (raised): a missing JSON (FileNotFoundError); invalid JSON, named with line and column,
    or a file that is not UTF-8 text; missing top-level or per-entry keys, named; no images;
    duplicate image or category ids; ids that are not integers or strings; empty or non-string
    file names; non-positive image sizes; 'iscrowd' other than 0 / 1; annotations of unknown
    categories, with the unknown ids; what pycocotools would evaluate wrongly: duplicate
    annotation ids (named with their counts), annotations of unknown images, a negative 'area'
    (:func:`check_annotation_integrity`) (all DatasetFormatError); a missing image folder or
    image files, named (FileNotFoundError; `check_image_files=False` skips the file check, e.g.
    for remote storage).

    Skipped (logged as a warning with the count per reason): annotations whose box is not 4
    finite numbers, has non-positive width or height, or lies entirely outside its image. Boxes
    that extend past the image border are clipped to it (also counted in the log).

    Args:
        json_file: COCO instances JSON (images, annotations, categories).
        image_root: folder that the images' `file_name`s are relative to.
        dataset_name: if given, its metadata receives thing_classes and
            thing_dataset_id_to_contiguous_id (existing ones must agree with the file).
        check_image_files: whether to check that every image file exists.

    Returns:
        One dict per image, in file order: file_name (joined with image_root), height, width,
        image_id, annotations: [{bbox [x0, y0, x1, y1], bbox_mode XYXY_ABS, category_id in
        0..K-1, iscrowd}]. Images without annotations are kept.
    """
    json_file, image_root = Path(json_file), Path(image_root)
    label = f"dataset {dataset_name!r} ({json_file})" if dataset_name else str(json_file)
    data = _read_json(json_file, label)
    for section, keys in REQUIRED_KEYS.items():
        _check_entries(data[section], section, keys, label)
    id_map, class_names = _category_mapping(data["categories"], label)
    images = _images_by_id(data["images"], label)
    _check_references(data["annotations"], id_map, label)
    check_annotation_integrity(data, label)
    if dataset_name:
        _set_class_metadata(dataset_name, id_map, class_names, label)
    if check_image_files:
        _check_image_files(images.values(), image_root, label)
    return _dataset_dicts(images, data["annotations"], id_map, image_root, label)


def _read_json(json_file: Path, label: str) -> dict:
    if not json_file.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {json_file} ({label})")
    try:
        with open(json_file, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise DatasetFormatError(
            f"{json_file} is not valid JSON: {error.msg} at line {error.lineno} column "
            f"{error.colno} (character {error.pos})"
        ) from None
    except UnicodeDecodeError as error:
        raise DatasetFormatError(
            f"{json_file} is not a UTF-8 text file (byte {error.start}): not a COCO JSON"
        ) from None
    if not isinstance(data, dict):
        raise DatasetFormatError(f"{label}: the top level must be a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise DatasetFormatError(f"{label}: missing top-level key(s) {_quoted(missing)}")
    return data


def _quoted(names) -> str:
    return ", ".join(f"'{name}'" for name in names)


def _check_entries(entries, section: str, required: tuple[str, ...], label: str) -> None:
    """Every entry of `section` is an object with the required keys; name the offenders."""
    if not isinstance(entries, list):
        raise DatasetFormatError(f"{label}: '{section}' must be a list")
    problems = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            problems.append(f"{section}[{index}] is not an object")
            continue
        missing = [key for key in required if key not in entry]
        if missing:
            problems.append(f"{section}[{index}] lacks {_quoted(missing)}")
    if problems:
        examples = "; ".join(problems[:MAX_EXAMPLES])
        raise DatasetFormatError(
            f"{label}: {len(problems)} of {len(entries)} '{section}' entries are malformed "
            f"(each needs {_quoted(required)}): {examples}"
        )


def _category_mapping(categories: list[dict], label: str) -> tuple[dict[int, int], list[str]]:
    """COCO category id -> contiguous 0..K-1 (ids in increasing order), and the class names."""
    ids = [category["id"] for category in categories]
    not_int = [i for i in ids if not isinstance(i, int) or isinstance(i, bool)]
    if not_int:
        raise DatasetFormatError(f"{label}: category ids must be integers, got {not_int[:5]}")
    duplicates = sorted(i for i, count in Counter(ids).items() if count > 1)
    if duplicates:
        raise DatasetFormatError(f"{label}: duplicate category id(s) {duplicates}")
    if not categories:
        raise DatasetFormatError(f"{label}: 'categories' is empty")
    ordered = sorted(categories, key=lambda category: category["id"])
    id_map = {category["id"]: index for index, category in enumerate(ordered)}
    return id_map, [str(category["name"]) for category in ordered]


def _images_by_id(images: list[dict], label: str) -> dict:
    if not images:  # nothing to train on or evaluate; detectron2 would only assert
        raise DatasetFormatError(f"{label}: 'images' is empty")
    by_id = {}
    for image in images:
        if not isinstance(image["id"], (int, str)) or isinstance(image["id"], bool):
            raise DatasetFormatError(
                f"{label}: image id {image['id']!r} must be an integer or a string"
            )
        if not isinstance(image["file_name"], str) or not image["file_name"]:
            raise DatasetFormatError(
                f"{label}: image {image['id']!r} has file_name {image['file_name']!r}; it must "
                "be a non-empty string"
            )
        if image["id"] in by_id:
            raise DatasetFormatError(f"{label}: duplicate image id {image['id']!r}")
        if not _positive_int(image["width"]) or not _positive_int(image["height"]):
            raise DatasetFormatError(
                f"{label}: image {image['id']!r} ({image['file_name']}) has size "
                f"{image['width']!r} x {image['height']!r}; width and height must be positive "
                "integers"
            )
        by_id[image["id"]] = image
    return by_id


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_references(annotations: list[dict], id_map: dict, label: str) -> None:
    unhashable = [a["category_id"] for a in annotations if not _hashable(a["category_id"])]
    unhashable += [a["image_id"] for a in annotations if not _hashable(a["image_id"])]
    if unhashable:
        raise DatasetFormatError(
            f"{label}: annotation image_id / category_id values must be integers or strings, "
            f"got e.g. {unhashable[:MAX_EXAMPLES]}"
        )
    bad_crowd = [a["id"] for a in annotations if a.get("iscrowd", 0) not in (0, 1)]
    if bad_crowd:
        raise DatasetFormatError(
            f"{label}: 'iscrowd' must be 0 or 1; annotation id(s) {bad_crowd[:MAX_EXAMPLES]} "
            "have other values"
        )
    unknown_categories = Counter(
        a["category_id"] for a in annotations if a["category_id"] not in id_map
    )
    if unknown_categories:
        raise DatasetFormatError(
            f"{label}: {sum(unknown_categories.values())} annotation(s) use category id(s) "
            f"{sorted(unknown_categories, key=str)} that 'categories' does not define "
            f"(known: {sorted(id_map)})"
        )


def _hashable(value) -> bool:
    # JSON lists and objects cannot be ids (and would break the lookups below).
    return not isinstance(value, (list, dict))


def check_annotation_integrity(data: Mapping, label: str) -> None:
    """Refuse a COCO dict whose annotations pycocotools would evaluate wrongly without a word.

    pycocotools indexes annotations by `id` (of two annotations sharing one, evaluation counts
    one twice and loses the other), files them under their `image_id`, and leaves ground truth
    whose `area` is negative out of every area range. So: annotation ids are unique, every
    `image_id` is an image of `images`, and a numeric `area` is >= 0 (a missing one is fine).
    The training loader and the evaluator both run this check, on the same file.

    Raises:
        DatasetFormatError: naming `label` (the file), the offending ids and their counts.
    """
    annotations = data.get("annotations") or []
    _check_unique_annotation_ids(annotations, label)
    image_ids = {
        image.get("id") for image in data.get("images") or [] if _hashable(image.get("id"))
    }
    _check_image_ids_exist(annotations, image_ids, label)
    _check_areas(annotations, label)


def _check_unique_annotation_ids(annotations: list[dict], label: str) -> None:
    ids = [annotation.get("id") for annotation in annotations]
    unhashable = [value for value in ids if not _hashable(value)]
    if unhashable:
        raise DatasetFormatError(
            f"{label}: annotation ids must be integers or strings, got e.g. "
            f"{unhashable[:MAX_EXAMPLES]}"
        )
    # Counter keeps the order of first appearance: the first duplicate in the file is named.
    shared = [(value, count) for value, count in Counter(ids).items() if count > 1]
    if not shared:
        return
    value, count = shared[0]
    others = ""
    if len(shared) > 1:
        examples = ", ".join(f"{v!r} ({n}x)" for v, n in shared[1 : MAX_EXAMPLES + 1])
        others = f"; {len(shared) - 1} more id(s) are shared too, e.g. {examples}"
    raise DatasetFormatError(
        f"{label}: annotation id {value!r} is used by {count} annotations{others}. "
        "pycocotools indexes annotations by id, so evaluation would count one of them several "
        "times and lose the others: give every annotation its own id"
    )


def _check_image_ids_exist(annotations: list[dict], image_ids: set, label: str) -> None:
    # Unhashable image ids were refused before (by the loader, or by pycocotools' own index).
    referenced = (annotation.get("image_id") for annotation in annotations)
    unknown = Counter(v for v in referenced if _hashable(v) and v not in image_ids)
    if unknown:
        examples = sorted(unknown, key=str)[:MAX_EXAMPLES]
        raise DatasetFormatError(
            f"{label}: {sum(unknown.values())} annotation(s) refer to image id(s) that "
            f"'images' does not define, e.g. {examples}"
        )


def _check_areas(annotations: list[dict], label: str) -> None:
    negative = [a.get("id") for a in annotations if _is_number(a.get("area")) and a["area"] < 0]
    if negative:
        raise DatasetFormatError(
            f"{label}: {len(negative)} annotation(s) have a negative 'area', e.g. id(s) "
            f"{negative[:MAX_EXAMPLES]}; pycocotools would leave them out of the evaluation. "
            "'area' must be >= 0 (the object's area in pixels), or left out"
        )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _set_class_metadata(name: str, id_map: dict, class_names: list[str], label: str) -> None:
    metadata = MetadataCatalog.get(name)
    registered = metadata.get("thing_dataset_id_to_contiguous_id")
    if registered is not None and dict(registered) != id_map:
        raise DatasetFormatError(
            f"{label}: its categories {sorted(id_map)} disagree with the registered metadata of "
            f"{name!r} (category ids {sorted(registered)})"
        )
    if registered is None:
        metadata.thing_dataset_id_to_contiguous_id = id_map
    if metadata.get("thing_classes") is None:
        metadata.thing_classes = class_names


def _check_image_files(images, image_root: Path, label: str) -> None:
    if not image_root.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_root} ({label})")
    # One directory listing instead of a stat per image: fast for COCO's 118k files.
    listed = set(os.listdir(image_root))
    missing = [
        image["file_name"]
        for image in images
        if image["file_name"] not in listed and not (image_root / image["file_name"]).is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image file(s) of {label} are missing under {image_root}, e.g. "
            f"{', '.join(missing[:MAX_EXAMPLES])}"
        )


def _dataset_dicts(
    images: dict, annotations: list[dict], id_map: dict, image_root: Path, label: str
) -> list[dict]:
    records = {
        image_id: {
            "file_name": str(image_root / image["file_name"]),
            "height": image["height"],
            "width": image["width"],
            "image_id": image_id,
            "annotations": [],
        }
        for image_id, image in images.items()
    }
    outcomes = Counter()
    for annotation in annotations:
        record = records[annotation["image_id"]]
        box, outcome = _checked_box(annotation["bbox"], record["width"], record["height"])
        outcomes[outcome] += 1
        if box is None:
            continue
        record["annotations"].append(
            {
                "bbox": box,
                "bbox_mode": BoxMode.XYXY_ABS,
                "category_id": id_map[annotation["category_id"]],
                "iscrowd": int(annotation.get("iscrowd", 0)),
            }
        )
    _log_box_outcomes(outcomes, len(annotations), label)
    logger.info("%s: %d images, %d annotations", label, len(records), len(annotations))
    dataset_dicts = list(records.values())
    remember_load(_load_summary(dataset_dicts, outcomes, len(annotations), label))
    return dataset_dicts


def _load_summary(
    dataset_dicts: list[dict], outcomes: Counter, total: int, label: str
) -> LoadSummary:
    """What training will need to explain an empty result (see rankdetr.data.training_boxes)."""
    skipped = _skipped(outcomes)
    crowd = sum(a["iscrowd"] for record in dataset_dicts for a in record["annotations"])
    return LoadSummary(
        label=label,
        num_images=len(dataset_dicts),
        num_annotations=total,
        skipped=skipped,
        crowd=crowd,
        first_record=dataset_dicts[0] if dataset_dicts else None,
    )


def _checked_box(bbox, width: int, height: int) -> tuple[list[float] | None, str]:
    """COCO [x, y, w, h] -> ([x0, y0, x1, y1] clipped to the image, "ok" / "clipped"), or
    (None, reason) for a box to skip."""
    if not _is_four_numbers(bbox):
        return None, "not a list of 4 numbers"
    if not all(math.isfinite(v) for v in bbox):
        return None, "NaN or infinite coordinates"
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return None, "non-positive width or height"
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    if x1 <= x0 or y1 <= y0:
        return None, "outside the image"
    clipped = (x0, y0, x1, y1) != (x, y, x + w, y + h)
    return [x0, y0, x1, y1], "clipped" if clipped else "ok"


def _is_four_numbers(bbox) -> bool:
    return (
        isinstance(bbox, list)
        and len(bbox) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
    )


def _skipped(outcomes: Counter) -> dict[str, int]:
    """The counts of the skip reasons among the box outcomes ("ok" and "clipped" are kept)."""
    return {reason: n for reason, n in outcomes.items() if reason not in ("ok", "clipped")}


def _log_box_outcomes(outcomes: Counter, total: int, label: str) -> None:
    skipped = _skipped(outcomes)
    if skipped:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
        logger.warning(
            "%s: skipped %d of %d annotations with unusable boxes: %s",
            label,
            sum(skipped.values()),
            total,
            reasons,
        )
    if outcomes["clipped"]:
        logger.warning(
            "%s: clipped %d of %d boxes that extend past the image border",
            label,
            outcomes["clipped"],
            total,
        )
