"""Crash-safe checkpoints that load without running code from the file.

:class:`SafeCheckpointer` is detectron2's DetectionCheckpointer with three changes:

* **Atomic writes.** A checkpoint is written to a temporary file in the same folder, flushed to
  disk (fsync), then renamed over its final name (os.replace); the `last_checkpoint` pointer is
  replaced the same way. A process killed during a save leaves the previous checkpoint and
  pointer intact (and a stale temporary file, removed by the next save). A save that the file
  system refuses (e.g. a full disk) removes its temporary file, leaves the previous checkpoint
  and pointer as they were, and raises a one-line :class:`CheckpointError` naming the file (for
  a full disk with the free space and the checkpoint's size).
* **Resume picks the newest complete checkpoint.** When `last_checkpoint` is missing, or names a
  missing or incomplete file, the newest complete `model_*.pth` in the folder is used instead,
  with a warning naming what was skipped.
* **Safe loading.** `.pth` files are read with `torch.load(weights_only=True)`; the checkpoints
  written here hold only tensors, numbers, strings and containers (anything else is converted or
  refused when saving), so they load that way. detectron2 / Caffe2 `.pkl` files go through an
  unpickler that only rebuilds containers and NumPy arrays. A missing, truncated or corrupt file,
  or one that asks to run code, raises :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from rankdetr.checkpoint.backbone_weights import (
    CheckpointError,
    load_backbone_weights,
    read_checkpoint_file,
    read_weights_file,
)
from rankdetr.checkpoint.swin import convert_swin_state_dict, is_swin_classification_checkpoint
from rankdetr.engine.run_lock import process_is_alive

__all__ = [
    "CheckpointError",
    "SafeCheckpointer",
    "atomic_torch_save",
    "ema_weights_in",
    "is_complete_checkpoint",
    "load_for_evaluation",
    "local_weights_file",
    "to_weights_only",
]

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint"
TEMP_MARKER = ".tmp-"
_PERIODIC_NAME = re.compile(r"^model_(\d+|final)\.pth$")
_PLAIN_TYPES = (str, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)


def to_weights_only(value: Any, where: str = "checkpoint") -> Any:
    """`value` with NumPy arrays and scalars turned into tensors and Python numbers, so that
    `torch.load(weights_only=True)` can read it back; other unknown objects are refused.

    Args:
        value: tensors, numbers, strings, None, dtypes, and dicts / lists / tuples of these.
        where: the key path, for the error message.

    Raises:
        TypeError naming the key path of an object that cannot be stored safely.
    """
    # NumPy first: np.float64 and np.str_ subclass Python's float and str but pickle as NumPy.
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    # Exact types: a subclass (an IntEnum, say) would pickle as its own class.
    if isinstance(value, torch.Tensor) or type(value) in _PLAIN_TYPES:
        return value
    if isinstance(value, dict):
        converted = OrderedDict() if isinstance(value, OrderedDict) else {}
        for key, item in value.items():
            converted[key] = to_weights_only(item, f"{where}[{key!r}]")
        if hasattr(value, "_metadata"):  # a module state dict's version information
            converted._metadata = value._metadata
        return converted
    if isinstance(value, (list, tuple)):
        items = [to_weights_only(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which a checkpoint "
        "loaded with weights_only=True cannot hold; store tensors, numbers, strings or "
        "containers of them"
    )


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write, size: Callable[[], int] | None = None) -> None:
    """Call write(file) on a temporary file next to `path`, fsync it, rename it to `path`.

    A failed write removes the temporary file, so `path` keeps its previous content. An error
    of the file system (an OSError, also when torch.save reports it as a RuntimeError whose
    context is the OSError) becomes a one-line CheckpointError naming `path`; for a full disk it
    gives the free space and `size()`, the bytes the file needs.
    """
    temp = path.with_name(f".{path.name}{TEMP_MARKER}{os.getpid()}")
    try:
        with open(temp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException as error:
        temp.unlink(missing_ok=True)  # before measuring the free space: it frees the partial file
        cause = _os_error_in_chain(error)
        if cause is None:
            raise
        raise CheckpointError(f"cannot write {path}: {_describe(cause, path, size)}") from error
    _fsync_directory(path.parent)


# torch's zip writer turns a failed write() into "[enforce fail at inline_container.cc] ...
# unexpected pos"; the OSError stays in the chain, and its text in the message of some versions.
_NO_SPACE_TEXT = os.strerror(errno.ENOSPC)
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}  # a full disk or quota


def _os_error_in_chain(error: BaseException) -> OSError | None:
    """The OSError that `error` is or was raised from (its __cause__ / __context__ chain), or
    None. A torch error that only says "No space left on device" counts as that OSError."""
    seen: set[int] = set()
    current: BaseException | None = error
    # Only torch's RuntimeError is looked through: another error raised while an OSError was
    # being handled (a bug, say) keeps its own traceback.
    while isinstance(current, (OSError, RuntimeError)) and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        if _NO_SPACE_TEXT in str(current):
            return OSError(errno.ENOSPC, _NO_SPACE_TEXT)
        current = current.__cause__ or current.__context__
    return None


def _describe(error: OSError, path: Path, size: Callable[[], int] | None) -> str:
    """What went wrong, in words; a full disk with the free space and the size needed."""
    reason = error.strerror or str(error)
    if error.errno not in _DISK_FULL:
        return reason
    try:
        free = f"{_megabytes(shutil.disk_usage(path.parent).free)} MB free"
    except OSError:
        free = "free space unknown"
    needs = f", the checkpoint needs ~{_megabytes(size())} MB" if size is not None else ""
    return f"{reason} ({free}{needs})"


def _megabytes(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.1f}"


def _serialized_size(data: Any) -> int:
    """About how many bytes torch.save writes for `data`: its tensors' storages, each once (a
    view saves its whole storage), plus a little for the pickled structure."""
    storages: dict[tuple[int, int], int] = {}

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            storages[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(data)
    return sum(storages.values()) + 64 * len(storages) + 4096


def atomic_torch_save(data: Any, path: str | Path) -> None:
    """torch.save(data) to `path` atomically: the file is either the old one or complete.

    Raises:
        CheckpointError naming `path` when the file system refuses the write (for a full disk,
        with the free space and the checkpoint's size); the previous file is left as it was.
    """
    _atomic_write(
        Path(path), lambda handle: torch.save(data, handle), size=lambda: _serialized_size(data)
    )


def is_complete_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a whole torch zip file whose entries pass their CRC check (a file cut
    short by a crash, or with damaged bytes, is not)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def _periodic_rank(name: str) -> int:
    """Order of a model_XXXXXXX.pth / model_final.pth name (final is the newest), or -1."""
    match = _PERIODIC_NAME.match(name)
    if match is None:
        return -1
    return 1 << 62 if match.group(1) == "final" else int(match.group(1))


class SafeCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer with atomic saves, resume from the newest complete checkpoint, and
    loading that never unpickles arbitrary objects (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, save_dir: str = "", **kwargs: Any):
        super().__init__(model, save_dir, **kwargs)
        self._saved_here: Path | None = None  # the last file this checkpointer wrote
        self._strict = False  # set for one load() at a time
        self._loading: str = ""

    # --- saving ----------------------------------------------------------------------------

    def save(self, name: str, **kwargs: Any) -> None:
        """Write `<save_dir>/<name>.pth` (model, checkpointables, kwargs) and point
        `last_checkpoint` at it, both atomically."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, checkpointable in self.checkpointables.items():
            data[key] = checkpointable.state_dict()
        data.update(kwargs)
        data = to_weights_only(data)
        save_dir = Path(self.save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temp_files()
        path = save_dir / f"{name}.pth"
        self.logger.info("Saving checkpoint to %s", path)
        atomic_torch_save(data, path)
        self.tag_last_checkpoint(path.name)
        self._saved_here = path  # known complete: get_checkpoint_file need not re-read it

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Point `last_checkpoint` at a file of save_dir, atomically."""
        path = Path(self.save_dir) / LAST_CHECKPOINT
        _atomic_write(path, lambda handle: handle.write(last_filename_basename.encode()))

    def _remove_stale_temp_files(self) -> None:
        """Remove temporary files left by processes killed while saving. A temporary file names
        its writer's pid: files of live processes (another run's save in progress) are left."""
        for temp in Path(self.save_dir).glob(f".*{TEMP_MARKER}*"):
            pid = temp.name.rsplit(TEMP_MARKER, 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and process_is_alive(int(pid)):
                continue
            logger.info("Removing %s, left by an interrupted save", temp)
            temp.unlink(missing_ok=True)

    # --- choosing the checkpoint to resume from --------------------------------------------

    def has_checkpoint(self) -> bool:
        """Whether save_dir holds a complete checkpoint to resume from."""
        return bool(self.get_checkpoint_file())

    def get_checkpoint_file(self) -> str:
        """The checkpoint to resume from: the file named by `last_checkpoint` when it is
        complete, else the newest complete model_*.pth (with a warning), else ""."""
        if not self.save_dir or not Path(self.save_dir).is_dir():
            return ""
        save_dir = Path(self.save_dir)
        named = self._named_by_pointer()
        if named is not None and named == self._saved_here and named.is_file():
            return str(named)  # PeriodicCheckpointer asks after every save
        if named is not None and is_complete_checkpoint(named):
            return str(named)
        skipped = []
        if named is not None:
            state = "is missing" if not named.exists() else "is incomplete or corrupt"
            skipped.append(f"{named} (named by {save_dir / LAST_CHECKPOINT}) {state}")
        for candidate in self._periodic_checkpoints_newest_first():
            if candidate == named:
                continue
            if is_complete_checkpoint(candidate):
                if skipped:
                    logger.warning("Resuming from %s; skipped: %s", candidate, "; ".join(skipped))
                return str(candidate)
            skipped.append(f"{candidate} is incomplete or corrupt")
        if skipped:
            logger.warning(
                "No complete checkpoint in %s; skipped: %s", save_dir, "; ".join(skipped)
            )
        return ""

    def _named_by_pointer(self) -> Path | None:
        pointer = Path(self.save_dir) / LAST_CHECKPOINT
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        return Path(self.save_dir) / name if name else None

    def _periodic_checkpoints_newest_first(self) -> list[Path]:
        files = [p for p in Path(self.save_dir).iterdir() if _periodic_rank(p.name) >= 0]
        return sorted(files, key=lambda p: _periodic_rank(p.name), reverse=True)

    # --- loading ---------------------------------------------------------------------------

    def load(self, path: str, *args, strict: bool = False, **kwargs) -> dict[str, Any]:
        """As Checkpointer.load; a URL is downloaded first (:func:`local_weights_file`).

        With `strict`, a checkpoint whose tensors do not match the model's one for one (missing,
        unexpected or of another shape) raises CheckpointError naming them, before anything is
        loaded. Evaluation and resuming load strictly; `train.init_checkpoint` at the start of
        training does not (it may hold only a backbone, e.g. ImageNet weights).
        """
        path = local_weights_file(path)
        if path and not os.path.isfile(path):
            raise CheckpointError(f"checkpoint file not found: {path}")
        self._strict, self._loading = strict, path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._strict = False

    def resume_or_load(self, path: str, *, resume: bool = True) -> dict[str, Any]:
        """Resume strictly from the newest complete checkpoint of save_dir when `resume` and
        there is one; else load `path` (train.init_checkpoint, a file or a URL) without its
        checkpointables. ImageNet weights of the backbone alone (torchvision / detectron2 ResNet,
        Microsoft's Swin, timm) go through :func:`load_backbone_weights`, which recognises
        their names and refuses a file that lacks a backbone tensor."""
        if resume and self.has_checkpoint():
            return self.load(self.get_checkpoint_file(), strict=True)
        path = local_weights_file(path)
        if path and self._holds_backbone_weights_only(path):
            load_backbone_weights(self.model.backbone, path)
            return {}
        return self.load(path, checkpointables=[])

    def _holds_backbone_weights_only(self, path: str) -> bool:
        """Whether `path` has none of the model's tensors outside `backbone.` (an ImageNet
        file), so that it is the backbone's to load."""
        if not isinstance(getattr(self.model, "backbone", None), torch.nn.Module):
            return False
        if not os.path.isfile(path):
            return False  # load() names the missing file
        names = {re.sub(r"^module\.", "", k) for k in read_weights_file(path)}
        rest = {k for k in self.model.state_dict() if not k.startswith("backbone.")}
        return not names & rest

    def _load_model(self, checkpoint: dict[str, Any]):
        if self._strict:
            self._check_fits(checkpoint["model"])
        elif _is_full_model(checkpoint["model"]):
            checkpoint["model"] = self._without_other_class_heads(checkpoint["model"])
            self._check_fits(checkpoint["model"], allowed_missing=_CLASS_DEPENDENT)
        return super()._load_model(checkpoint)

    def _without_other_class_heads(self, state: dict[str, Any]) -> dict[str, Any]:
        """Fine-tuning onto another number of classes: the checkpoint's class heads and per-class
        RCH biases have another shape; they are left out (the model keeps its fresh
        initialisation of them), and a log line lists them."""
        expected = self.model.state_dict()
        other = [
            k
            for k, v in state.items()
            if _CLASS_DEPENDENT.match(k) and k in expected
            and tuple(np.shape(v)) != tuple(expected[k].shape)
        ]  # fmt: skip
        if other:
            logger.warning(
                "%s was trained for another number of classes: re-initialising %d class-specific "
                "tensors (%s); everything else loads strictly", self._loading, len(other),
                ", ".join(other),
            )  # fmt: skip
        return {k: v for k, v in state.items() if k not in set(other)}

    def _check_fits(self, state: dict[str, Any], allowed_missing: re.Pattern | None = None):
        """Raise CheckpointError unless `state` has exactly the model's tensors and shapes (the
        names matching `allowed_missing` may be absent)."""
        state = {re.sub(r"^module\.", "", k): v for k, v in state.items()}
        expected = {
            k: v
            for k, v in self.model.state_dict().items()
            if k in state or allowed_missing is None or not allowed_missing.match(k)
        }
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = [
            (k, tuple(np.shape(state[k])), tuple(expected[k].shape))
            for k in expected
            if k in state and tuple(np.shape(state[k])) != tuple(expected[k].shape)
        ]
        problems = []
        if missing:
            problems.append(f"{len(missing)} model tensors missing (e.g. {missing[:3]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            key, theirs, ours = wrong[0]
            problems.append(
                f"{len(wrong)} with other shapes (e.g. {key}: {theirs} in the checkpoint, {ours} "
                "in the model)"
            )
        if problems:
            raise CheckpointError(
                f"checkpoint {self._loading} does not fit the model built from the config "
                f"(wrong config or weights?): {'; '.join(problems)}"
            )

    def _load_file(self, filename: str) -> dict[str, Any]:
        """Read a checkpoint without running code from it (:func:`read_checkpoint_file`);
        errors name the file."""
        suffix = Path(filename).suffix
        if suffix == ".pkl":
            return _detectron2_pickle_checkpoint(filename)
        if suffix == ".safetensors":
            return {"model": read_weights_file(filename)}
        loaded = read_checkpoint_file(filename)
        if not isinstance(loaded, dict):
            raise CheckpointError(f"{filename} holds a {type(loaded).__name__}, not a dict")
        loaded = loaded if "model" in loaded else {"model": loaded}
        if isinstance(loaded["model"], dict) and is_swin_classification_checkpoint(loaded["model"]):
            loaded["model"] = _swin_imagenet_weights_for_the_backbone(filename, loaded["model"])
        return loaded


def ema_weights_in(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The moving average of the weights that a loaded checkpoint holds: rankdetr's
    (`trainer.hooks.EMAHook.shadow`) or detrex's (`ema_state`); None when it holds none."""
    trainer = checkpoint.get("trainer")
    hooks = trainer.get("hooks", {}) if isinstance(trainer, dict) else {}
    shadow = hooks.get("EMAHook", {}).get("shadow") or checkpoint.get("ema_state")
    if not isinstance(shadow, dict) or not shadow:
        return None
    return {re.sub(r"^module\.", "", name): value for name, value in shadow.items()}


def load_for_evaluation(model: torch.nn.Module, path: str, use_ema: bool = True) -> bool:
    """Load `path` strictly into `model` to evaluate it; with `use_ema` (the config's
    train.model_ema.use_ema_weights_for_eval_only) and an EMA average in the file, the average
    replaces the weights, as detrex evaluates. Returns whether the EMA weights were loaded."""
    rest = SafeCheckpointer(model).load(path, strict=True)
    average = ema_weights_in(rest) if use_ema else None
    if average is None:
        return False
    expected = model.state_dict()
    misfits = [k for k, v in average.items()
               if k not in expected or tuple(np.shape(v)) != tuple(expected[k].shape)]  # fmt: skip
    if misfits:
        raise CheckpointError(
            f"the EMA weights in {path} do not fit the model ({len(misfits)} tensors, e.g. "
            f"{misfits[:3]}); train.model_ema.use_ema_weights_for_eval_only=False loads the rest"
        )
    model.load_state_dict({k: torch.as_tensor(v) for k, v in average.items()}, strict=False)
    logger.info("Evaluating the EMA weights of %s (train.model_ema."
                "use_ema_weights_for_eval_only=False for the trained ones)", path)  # fmt: skip
    return True


def local_weights_file(path: str) -> str:
    """`path` as a local file: a URL (detectron2://, https://, ...) is downloaded once into
    detectron2's cache by its PathManager, as detectron2 and detrex do; "" stays "".

    Raises:
        CheckpointError saying that the download failed and how to pass a local file instead.
    """
    if "://" not in str(path):
        return path
    try:
        return PathManager.get_local_path(path)
    except Exception as error:  # noqa: BLE001  (no network, a proxy, an HTTP error...)
        name = str(path).rstrip("/").rsplit("/", 1)[-1]
        raise CheckpointError(
            f"cannot download {path} ({_short(error)}). Without internet, download it "
            f"elsewhere and pass the local file: train.init_checkpoint=/path/to/{name} (or "
            'train.init_checkpoint="" to start from random weights)'
        ) from error


# Tensors whose shape follows the number of classes: the class heads and the RCH biases.
# Tensors with a row or column per class: the class heads, the RCH biases and DINO's denoising
# label embeddings.
_CLASS_DEPENDENT = re.compile(
    r"^(decoder\.class_heads\.\d+\.|proposals\.class_head\.|decoder\.rank_class_bias\.\d+\."
    r"|label_embedding\.)"
)


def _is_full_model(state: dict[str, Any]) -> bool:
    """A whole detector's weights (rankdetr's names), not only a backbone's."""
    return any(k.startswith("decoder.layers.") for k in state)


def _swin_imagenet_weights_for_the_backbone(filename: str, state: dict) -> dict:
    """Microsoft's ImageNet Swin file (what the release's Swin configs name as init_checkpoint)
    -> `backbone.*` names; its classifier is dropped, the backbone's output norms keep their
    initialisation (the file has none), as in the release."""
    try:
        converted = convert_swin_state_dict(state)
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{filename}: {error}") from error
    logger.info(
        "%s: ImageNet Swin weights, %d tensors into the backbone (its output norms keep their "
        "initialisation)",
        filename,
        len(converted),
    )
    return {f"backbone.{name}": tensor for name, tensor in converted.items()}


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _detectron2_pickle_checkpoint(filename: str) -> dict[str, Any]:
    """A detectron2 model-zoo or Caffe2 .pkl, in the form DetectionCheckpointer gives it."""
    data = read_checkpoint_file(filename)
    if not isinstance(data, dict):
        raise CheckpointError(f"{filename} holds a {type(data).__name__}, not a dict")
    if "model" in data and "__author__" in data:
        return data  # detectron2 model zoo format
    if "blobs" in data:  # Caffe2 detection models
        data = data["blobs"]
    model = {k: v for k, v in data.items() if not k.endswith("_momentum")}
    return {"model": model, "__author__": "Caffe2", "matching_heuristics": True}
