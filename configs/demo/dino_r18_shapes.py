"""DINO on the bundled shapes dataset: the demo's small network (ResNet-18 from scratch, 128
channels, 3 decoder layers; configs/demo/rank_detr_r18_shapes.py) on the DINO base, with 100
queries and contrastive denoising, at the settings its README table was measured with: 2 encoder
layers, 1300 iterations, random crops (the Rank-DETR demo has since moved to 1 layer, 1100
iterations and no crops, to train in 4 minutes). configs/demo/rank_dino_r18_shapes.py switches
the four rank components on; the two side by side are the demo of Table 3.

    tools/train_net.py --config-file configs/demo/dino_r18_shapes.py
"""

from ..models.dino_r50 import model

# isort would move the noqa comments off the lines they belong to
# isort: off
from .rank_detr_r18_shapes import dataloader, lr_multiplier, optimizer, train  # noqa: F401
from .rank_detr_r18_shapes import model as _rank_detr_demo  # underscore: not a config key

# isort: on

model.backbone = _rank_detr_demo.backbone
model.neck = _rank_detr_demo.neck
for _size in ("embed_dim", "num_heads", "ffn_dim", "encoder_layers", "decoder_layers"):
    model[_size] = _rank_detr_demo[_size]
model.num_queries = 100
model.num_detections = 100
model.dn_number = 20  # shapes images hold a few objects: about 20 / most denoising groups
model.encoder_layers = 2
dataloader.train.mapper.crop_probability = 0.3
train.max_iter = 1300
train.eval_period = 1300
train.output_dir = "./output/demo_dino"
