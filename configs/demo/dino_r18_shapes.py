"""DINO on the bundled shapes dataset: the demo's small network (ResNet-18 from scratch, 2 + 3
transformer layers, 128 channels) and schedule (configs/demo/rank_detr_r18_shapes.py) on the DINO
base, with 100 queries and contrastive denoising. configs/demo/rank_dino_r18_shapes.py switches
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
train.output_dir = "./output/demo_dino"
