#!/usr/bin/env python
"""Convert a checkpoint of the original Rank-DETR release or of detrex's DINO into a rankdetr one.

    .venv/bin/python tools/convert_checkpoint.py rank_detr_r50_12ep.pth converted.pth
    .venv/bin/python tools/convert_checkpoint.py dino_r50_4scale_12ep.pth dino_converted.pth

The kind is recognised from the tensor names (DINO has the positional-query MLP and the
denoising label embeddings). The output holds {"model": state_dict} for rankdetr's RankDETR or
DINO and loads with `train.init_checkpoint=converted.pth`. The decoder depth is read from the
checkpoint (pass `--num-decoder-layers N` to insist on one); the sizes a matching config needs
are printed. Every tensor must map: unknown ones are listed and nothing is written. The input is
read with `weights_only=True`, so no code in it runs; the output is saved atomically like the
training checkpoints (a temporary file, fsync, rename), so a failure never leaves a half-written
checkpoint behind.
"""

import argparse
import sys
from pathlib import Path

from rankdetr.checkpoint import convert_release_state_dict, describe_release_checkpoint
from rankdetr.checkpoint.backbone_weights import CheckpointError, read_weights_file
from rankdetr.checkpoint.dino import (
    convert_dino_state_dict,
    describe_dino_checkpoint,
    is_dino_checkpoint,
)
from rankdetr.engine.checkpoint import atomic_torch_save


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path, help="the release or detrex DINO checkpoint (.pth)")
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
        if is_dino_checkpoint(state):
            kind = "DINO (configs/dino/)"
            converted = convert_dino_state_dict(state, args.num_decoder_layers)
            sizes = describe_dino_checkpoint(state)
        else:
            kind = "Rank-DETR release (configs/rank_detr/)"
            converted = convert_release_state_dict(state, args.num_decoder_layers)
            sizes = describe_release_checkpoint(state)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"model": converted, "converted_from": str(args.input)}, args.output)
    except (CheckpointError, KeyError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {len(converted)} tensors of a {kind} checkpoint to {args.output}")
    print("model sizes: " + ", ".join(f"{k}={v}" for k, v in sizes.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
