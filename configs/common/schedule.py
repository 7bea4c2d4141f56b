"""Step schedules of the paper, in iterations at a total batch of 16 on COCO train2017.

1 epoch = 118,287 images / 16 images per iteration ~= 7,393 iterations; detrex rounds to 7,500:
  12 epochs = 12 * 7,500 = 90,000 iterations, lr x0.1 at epoch 11 (iteration 82,500);
  24 epochs = 180,000 iterations, lr x0.1 at epoch 20 (DINO, iteration 150,000);
  36 epochs = 36 * 7,500 = 270,000 iterations, lr x0.1 at epoch 30 (iteration 225,000).
The drop is a fraction of train.max_iter, so it follows a shortened or lengthened run.
"""

from detectron2.config import LazyCall as L

from rankdetr.engine.optim import step_lr_schedule

ITERS_PER_EPOCH = 7500

lr_multiplier_12ep = L(step_lr_schedule)(max_iter="${..train.max_iter}", drop_fraction=11 / 12)
lr_multiplier_36ep = L(step_lr_schedule)(max_iter="${..train.max_iter}", drop_fraction=30 / 36)
# DINO's 24-epoch schedule (detrex): lr x0.1 at epoch 20.
lr_multiplier_24ep = L(step_lr_schedule)(max_iter="${..train.max_iter}", drop_fraction=20 / 24)
