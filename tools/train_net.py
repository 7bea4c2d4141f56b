#!/usr/bin/env python
"""Train or evaluate a Rank-DETR model from a LazyConfig file.

    .venv/bin/python tools/train_net.py --config-file configs/demo/rank_detr_r18_shapes.py
    .venv/bin/python tools/train_net.py --config-file CFG --eval-only train.init_checkpoint=M.pth
    .venv/bin/python tools/train_net.py --config-file CFG --num-gpus 8 train.amp=bf16
    .venv/bin/python tools/train_net.py --config-file CFG --resume        # continue a run

Overrides are `key=value` pairs after the flags (e.g. `model.rank.qrl=False train.max_iter=500`);
a key the config does not have is refused with close matches. Without a GPU, `--num-gpus N`
starts N CPU processes (GLOO).
"""

import sys

from detectron2.engine import default_argument_parser, default_setup, launch

from rankdetr.engine.checkpoint import SafeCheckpointer
from rankdetr.engine.runner import ConfigError, build_model, do_test, do_train, load_config


def main(args) -> None:
    cfg = load_config(args.config_file, args.opts)
    default_setup(cfg, args)
    if args.eval_only:
        model = build_model(cfg)
        SafeCheckpointer(model).load(cfg.train.init_checkpoint)
        model.eval()
        do_test(cfg, model)
        return
    do_train(cfg, resume=args.resume)


def parse_args(argv=None):
    parser = default_argument_parser(epilog=__doc__)
    args = parser.parse_args(argv)
    return args


if __name__ == "__main__":
    args = parse_args()
    try:
        # Checked here too, before any process starts: a bad config is one line, exit status 1.
        load_config(args.config_file, args.opts)
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
