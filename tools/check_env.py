#!/usr/bin/env python
"""Print what rankdetr runs on: Python, torch, detectron2, the compiled op and its kernels."""

import argparse
import platform
import sys

DEMO_PLACEHOLDER = """
The demo (train and evaluate a small Rank-DETR on the bundled dataset) arrives with the training
issue. Until then `make demo` checks that the environment is complete, as above.
"""


def _kernel_status(op_name: str) -> str:
    import torch

    if not hasattr(torch.ops.rankdetr, op_name):
        return "not in this build"
    qualified = f"rankdetr::{op_name}"
    keys = [
        k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(qualified, k)
    ]
    return ", ".join(keys) if keys else "declared, no kernel"


def environment_rows() -> list[tuple[str, str]]:
    import detectron2
    import torch
    import torchvision

    import rankdetr
    from rankdetr._ext import extension_available, extension_has_cuda

    rows = [
        ("Python", sys.version.split()[0] + " on " + platform.machine()),
        ("torch", f"{torch.__version__} (CUDA build: {torch.version.cuda or 'no'})"),
        ("torchvision", torchvision.__version__),
        ("GPU available", str(torch.cuda.is_available())),
        ("detectron2", f"{detectron2.__version__} @ {detectron2.__file__.rsplit('/', 2)[0]}"),
        ("rankdetr", f"{rankdetr.__version__} @ {rankdetr.__file__.rsplit('/', 2)[0]}"),
        ("rankdetr._C", "built" if extension_available() else "MISSING (pure-PyTorch fallback)"),
    ]
    if extension_available():
        rows.append(("  compiled CUDA kernels", str(extension_has_cuda())))
        rows.append(("  ms_deform_attn kernels", _kernel_status("ms_deform_attn_forward")))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--demo-placeholder", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rows = environment_rows()
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if args.demo_placeholder:
        print(DEMO_PLACEHOLDER)


if __name__ == "__main__":
    main()
