#!/usr/bin/env python
"""Train or evaluate a Rank-DETR model from a LazyConfig file.

    .venv/bin/python tools/train_net.py --config-file configs/demo/rank_detr_r18_shapes.py
    .venv/bin/python tools/train_net.py --config-file CFG --eval-only train.init_checkpoint=M.pth
    .venv/bin/python tools/train_net.py --config-file CFG --num-gpus 8 train.amp.enabled=True
    .venv/bin/python tools/train_net.py --config-file CFG --resume        # continue a run
    .venv/bin/python tools/train_net.py --config-file CFG --eval-only --onnx model.onnx

`--eval-only --onnx FILE` evaluates an exported model (tools/export_onnx.py) in ONNX Runtime on
the config's test data, through the same data loader and evaluator (train.init_checkpoint is then
not read); the config's test mapper gives the images, one session run per image.

Overrides are `key=value` pairs after the flags (e.g. `model.rank.qrl=False train.max_iter=500`);
a key the config does not have is refused with close matches. Without a GPU, `--num-gpus N`
starts N CPU processes (GLOO). Errors in the config, the data or a checkpoint end the run with one
line naming the problem (exit status 1); RANKDETR_TRACEBACK=1 shows the whole traceback.
"""

from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from rankdetr.engine.checkpoint import load_for_evaluation
from rankdetr.engine.run_lock import hold_output_dir
from rankdetr.engine.runner import (
    build_model,
    check_num_classes,
    do_test,
    do_train,
    load_config,
    use_ema_weights,
)
from rankdetr.errors import report_user_errors


def main(args) -> None:
    """One process's run: train (or, with --eval-only, evaluate) with train.output_dir held.

    The folder's lock is taken first, before detectron2's default_setup writes `config.yaml` and
    `log.txt` there, so a run refused because another one holds the folder changes none of its
    files (do_train's own lock is then a no-op). --eval-only takes the same lock, not a separate
    evaluation lock: it writes the same `config.yaml` and `log.txt`, and its results go to the
    same `inference/` files the training run's evaluations write, so an evaluation beside a live
    training run would replace the config the figure tools and sweeps read and race with its
    evaluations; evaluate a running training into another train.output_dir instead. In a launch
    of several processes only the main one locks; the others wait for it (hold_output_dir).
    """
    cfg = load_config(args.config_file, args.opts)
    with hold_output_dir(cfg.train.output_dir):
        default_setup(cfg, args)
        # default_setup gives the "detectron2" and "fvcore" loggers their console and log.txt;
        # ours (the model summary, the training precision) go to the same places.
        setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="rankdetr")
        if args.eval_only:
            evaluate(cfg, onnx=args.onnx)
        else:
            do_train(cfg, resume=args.resume)


def evaluate(cfg, onnx: str | None = None) -> dict:
    """--eval-only: train.init_checkpoint on the test data, its EMA weights when it holds them
    (train.model_ema switch), as detrex; with `onnx`, that exported file in ONNX Runtime
    instead (see :func:`onnx_model`).

    model.num_classes (None: the training data's, as for training) is checked against the test
    data before the inference, so that a mismatch is one line naming both numbers, not an
    evaluator's error after the whole inference. The checkpoint is loaded first, so that one
    trained for another class count is refused naming its file.
    """
    if onnx:
        return do_test(cfg, onnx_model(cfg, onnx))
    model = build_model(cfg)
    load_for_evaluation(model, cfg.train.init_checkpoint, use_ema_weights(cfg))
    check_num_classes(cfg, "test")
    model.eval()
    return do_test(cfg, model)


def onnx_model(cfg, path: str):
    """The exported file as the model do_test runs (detectron2 inputs in, Instances out).

    Checked first against the test data, as the PyTorch path checks model.num_classes: the
    file's class count (from its metadata) and channel order must be the test mapper's, else
    one line names both, not an evaluator's error (or silently swapped channels) at the end.
    """
    from rankdetr.data.datasets import num_classes_of
    from rankdetr.engine.config_checks import ConfigError
    from rankdetr.export.runtime import OnnxDetector

    model = OnnxDetector(path)
    image_format = cfg.dataloader.test.mapper.get("img_format", "RGB")
    if image_format != model.image_format:
        raise ConfigError(f"the test mapper gives {image_format} images but {path} was "
                          f"exported for {model.image_format}")  # fmt: skip
    dataset = cfg.dataloader.test.dataset.names
    dataset = dataset if isinstance(dataset, str) else dataset[0]
    names, data_classes = model.class_names, num_classes_of(dataset)
    if names is not None and len(names) != data_classes:
        raise ConfigError(f"{path} was exported with {len(names)} classes but the test data "
                          f"{dataset!r} has {data_classes}")  # fmt: skip
    return model


def parse_args(argv=None):
    parser = default_argument_parser(epilog=__doc__)
    parser.add_argument(
        "--onnx",
        metavar="FILE",
        help="with --eval-only: evaluate this exported model in ONNX Runtime",
    )
    args = parser.parse_args(argv)
    if args.onnx and not args.eval_only:
        parser.error("--onnx evaluates an exported model: it needs --eval-only")
    return args


def run(args) -> None:
    # The config is checked here too, before any process starts.
    load_config(args.config_file, args.opts)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    # Errors in the config, data or checkpoints: one line, exit status 1 (RANKDETR_TRACEBACK=1
    # shows the traceback).
    report_user_errors(run, parse_args())
