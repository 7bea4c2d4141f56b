"""A one-line error, instead of detectron2's `AssertionError: No valid data found`, when the
training data has no usable box.

detectron2's `get_detection_dataset_dicts` (which the configs call for `dataloader.train`) drops
the images without a non-crowd annotation and then asserts that some are left. When none is, the
reason is known to rankdetr's COCO loader, which skipped the unusable boxes: it records what it
loaded (:func:`remember_load`), and the filter, wrapped here, turns an empty result into a
:class:`NoTrainingBoxesError` that says why: no annotations at all, every annotation skipped (with
the count per reason), or only crowd annotations left. The wrapper changes nothing else: it
raises exactly where detectron2's assertion would have failed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from detectron2.data import build as detectron2_build

from rankdetr.errors import UserError

__all__ = ["LoadSummary", "NoTrainingBoxesError", "remember_load"]

_FILTER_NAME = "filter_images_with_only_crowd_annotations"


class NoTrainingBoxesError(ValueError, UserError):
    """Training data in which no image has a usable non-crowd box; the message says why."""


@dataclass
class LoadSummary:
    """What the COCO loader made of one file: annotation counts and the boxes it skipped."""

    label: str  # the dataset and its file, as the loader names them in messages
    num_images: int
    num_annotations: int
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    crowd: int = 0  # usable annotations with iscrowd=1
    first_record: dict | None = None  # identifies this load's records in a later filter call

    def explain(self) -> str:
        """Why this file gives training nothing (valid only when it does give nothing)."""
        if not self.num_annotations:
            return f"{self.label} has no annotations (in its {self.num_images} images)"
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        skipped = sum(self.skipped.values())
        if skipped == self.num_annotations:
            return (
                f"every one of the {skipped} annotations of {self.label} was skipped: {reasons} "
                "(a COCO bbox is [x, y, width, height] in pixels, inside the image)"
            )
        also = f"; the other {skipped} were skipped: {reasons}" if skipped else ""
        return (
            f"the {self.crowd} usable annotations of {self.label} are all crowd (iscrowd=1), "
            f"which training leaves out{also}"
        )


# label -> the latest load of that file; one record each is kept alive, nothing more.
_LOADS: dict[str, LoadSummary] = {}


def remember_load(summary: LoadSummary) -> None:
    """Record a finished load, for the explanation should training find no usable box in it."""
    _LOADS[summary.label] = summary


def _explanation(dataset_dicts: list[dict]) -> str:
    # The records of a load are the same objects after detectron2 concatenates the datasets.
    loaded = [
        summary.explain()
        for summary in _LOADS.values()
        if any(record is summary.first_record for record in dataset_dicts)
    ]
    if loaded:
        return "; ".join(loaded)
    # Data that another loader produced: say what the records themselves show.
    crowd = sum(len(record.get("annotations", [])) for record in dataset_dicts)
    found = f"{crowd} crowd annotation(s) only" if crowd else "no annotations"
    return f"none of its {len(dataset_dicts)} images has a non-crowd annotation ({found})"


def _explaining(detectron2_filter):
    """detectron2's filter, raising NoTrainingBoxesError where it would leave no image."""

    @functools.wraps(detectron2_filter)
    def filter_images(dataset_dicts, *args, **kwargs):
        kept = detectron2_filter(dataset_dicts, *args, **kwargs)
        if dataset_dicts and not kept:
            raise NoTrainingBoxesError(
                f"no usable training box: {_explanation(dataset_dicts)}; training needs at "
                "least one image with a non-crowd box"
            )
        return kept

    filter_images.explains_empty_training_data = True
    return filter_images


def _install() -> None:
    """Wrap detectron2's filter once per process (get_detection_dataset_dicts looks the name up
    in its module when it runs, so the configs' references to it need no change)."""
    current = getattr(detectron2_build, _FILTER_NAME)
    if not getattr(current, "explains_empty_training_data", False):
        setattr(detectron2_build, _FILTER_NAME, _explaining(current))


_install()
