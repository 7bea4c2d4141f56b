"""Building blocks shared by the detectors: the deformable attention op and module, box
utilities, position embeddings."""

from rankdetr.layers.ms_deform_attn_op import ms_deform_attn, ms_deform_attn_reference
from rankdetr.layers.multi_scale_deform_attn import MultiScaleDeformableAttention

__all__ = ["ms_deform_attn", "ms_deform_attn_reference", "MultiScaleDeformableAttention"]
