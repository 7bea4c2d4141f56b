#!/usr/bin/env python
"""Convert the original Rank-DETR release's checkpoint into a rankdetr checkpoint.

    .venv/bin/python tools/convert_checkpoint.py rank_detr_r50_12ep.pth converted.pth

The output holds {"model": state_dict} for rankdetr's RankDETR and loads with
`train.init_checkpoint=converted.pth`. The decoder depth is read from the checkpoint (pass
`--num-decoder-layers N` to insist on one); the sizes a matching config needs are printed. Every
tensor must map: unknown ones are listed and nothing is written. The input is read with
`weights_only=True`, so no code in it runs; the output is saved atomically like the training
checkpoints (a temporary file, fsync, rename), so a failure never leaves a half-written checkpoint
behind.
"""

import argparse
import sys
from pathlib import Path

from rankdetr.checkpoint import convert_release_state_dict, describe_release_checkpoint
from rankdetr.checkpoint.backbone_weights import CheckpointError, read_weights_file
from rankdetr.engine.checkpoint import atomic_torch_save


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path, help="the release checkpoint (.pth)")
    parser.add_argument("output", type=Path, help="where to write the rankdetr checkpoint")
    parser.add_argument(
        "--num-decoder-layers",
        type=int,
        default=None,
        help="expected decoder depth (default: read from the checkpoint)",
    )
    args = parser.parse_args(argv)
    try:
        state = read_weights_file(args.input)
        converted = convert_release_state_dict(state, args.num_decoder_layers)
        sizes = describe_release_checkpoint(state)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"model": converted, "converted_from": str(args.input)}, args.output)
    except (CheckpointError, KeyError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {len(converted)} tensors to {args.output}")
    print("model sizes: " + ", ".join(f"{k}={v}" for k, v in sizes.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
