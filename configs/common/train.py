"""Defaults of the `train` node, with detrex's names (configs and sweeps written for detrex's
`train` node port; an old rankdetr name is refused with the new one)."""

train = dict(
    output_dir="./output",
    # Weights to start from: a local file or a URL (detectron2://..., https://...) resolved by
    # detectron2's PathManager: a rankdetr checkpoint, converted release weights, or ImageNet
    # backbone weights (torchvision / detectron2 .pkl ResNet, Microsoft's Swin, timm). "" starts
    # from random weights. The R50 configs set detrex's ImageNet R-50.
    init_checkpoint="",
    max_iter=90000,
    device="auto",  # "auto": cuda when available, else cpu
    # The forward runs under autocast: dtype "bf16" (CPU or GPU), "fp16" (CUDA only, with a
    # gradient scaler) or "auto" (bf16 where the device computes it natively: CUDA with bf16, a
    # CPU with AMX or AVX-512 BF16; float32 elsewhere; the log says which and why). The
    # deformable-attention op, its sampling locations, boxes, matching and losses stay float32.
    amp=dict(enabled=False, dtype="bf16"),
    compile=False,  # True: torch.compile the encoder / decoder layers (RankDETR.compile_layers)
    clip_grad=dict(enabled=True, params=dict(max_norm=0.1, norm_type=2)),
    # A NaN / infinite loss term: "error" stops naming the terms and the iteration (no checkpoint
    # is written from that step); "skip" skips its optimizer step and counts it
    # ("nonfinite_skips" in the metrics). With DDP all processes decide alike.
    nonfinite_loss="error",
    max_nonfinite_skips=None,  # "skip" mode: stop after this many consecutive skips; None: never
    # An exponential moving average of the weights, saved in every checkpoint. With
    # use_ema_weights_for_eval_only, evaluation (during training, --eval-only, the Predictor, the
    # figure commands) uses the average whenever the checkpoint holds one. device: "" keeps the
    # average beside the weights, "cpu" saves GPU memory.
    model_ema=dict(enabled=False, decay=0.9998, device="", use_ema_weights_for_eval_only=True),
    # A quick check that a config runs: 20 iterations, evaluation at 10 and 20, a log line each.
    fast_dev_run=dict(enabled=False),
    checkpointer=dict(period=5000, max_to_keep=100),
    # Evaluate every eval_period iterations and after the last one; 0 evaluates only after the
    # last (detectron2's EvalHook). `dataloader.evaluator=None` turns evaluation off.
    eval_period=5000,
    log_period=20,
    seed=-1,  # >= 0: seeds torch, NumPy and Python (+ rank), the data order and augmentations
    # True: torch.use_deterministic_algorithms (an op without a deterministic kernel is an error)
    deterministic=False,
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False),
    cudnn_benchmark=False,
)
