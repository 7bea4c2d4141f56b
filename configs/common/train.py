"""Defaults of the `train` node."""

train = dict(
    output_dir="./output",
    init_checkpoint="",  # a local file: rankdetr checkpoint, or converted release weights
    max_iter=90000,
    device="auto",  # "auto": cuda when available, else cpu
    amp=None,  # None, "bf16" or "fp16" (fp16 needs CUDA); the forward runs under autocast
    compile=False,  # True: torch.compile the encoder / decoder layers (RankDETR.compile_layers)
    clip_grad_norm=0.1,
    # A NaN / infinite loss term: "error" stops naming the terms and the iteration (no checkpoint
    # is written from that step); "skip" skips its optimizer step and counts it
    # ("nonfinite_skips" in the metrics). With DDP all processes decide alike.
    nonfinite_loss="error",
    max_nonfinite_skips=None,  # "skip" mode: stop after this many consecutive skips; None: never
    ema=dict(enabled=False, decay=0.9998, evaluate_average=True),
    checkpointer=dict(period=5000, max_to_keep=100),
    eval_period=5000,
    log_period=20,
    seed=-1,  # >= 0: seeds torch, NumPy and Python (+ rank), the data order and augmentations
    # True: torch.use_deterministic_algorithms (an op without a deterministic kernel is an error)
    deterministic=False,
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False),
    cudnn_benchmark=False,
)
