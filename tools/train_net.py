#!/usr/bin/env python
"""Train or evaluate a Rank-DETR model from a LazyConfig file.

    .venv/bin/python tools/train_net.py --config-file configs/demo/rank_detr_r18_shapes.py
    .venv/bin/python tools/train_net.py --config-file CFG --eval-only train.init_checkpoint=M.pth
    .venv/bin/python tools/train_net.py --config-file CFG --num-gpus 8 train.amp.enabled=True
    .venv/bin/python tools/train_net.py --config-file CFG --resume        # continue a run

Overrides are `key=value` pairs after the flags (e.g. `model.rank.qrl=False train.max_iter=500`);
a key the config does not have is refused with close matches. Without a GPU, `--num-gpus N`
starts N CPU processes (GLOO). Errors in the config, the data or a checkpoint end the run with one
line naming the problem (exit status 1); RANKDETR_TRACEBACK=1 shows the whole traceback.
"""

from detectron2.engine import default_argument_parser, default_setup, launch

from rankdetr.engine.checkpoint import load_for_evaluation
from rankdetr.engine.runner import build_model, do_test, do_train, load_config, use_ema_weights
from rankdetr.errors import report_user_errors


def main(args) -> None:
    cfg = load_config(args.config_file, args.opts)
    default_setup(cfg, args)
    if args.eval_only:
        model = build_model(cfg)
        # The checkpoint's EMA weights when it holds them (train.model_ema switch), as detrex.
        load_for_evaluation(model, cfg.train.init_checkpoint, use_ema_weights(cfg))
        model.eval()
        do_test(cfg, model)
        return
    do_train(cfg, resume=args.resume)


def parse_args(argv=None):
    parser = default_argument_parser(epilog=__doc__)
    args = parser.parse_args(argv)
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
