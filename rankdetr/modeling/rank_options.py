"""The four rank-oriented components of Rank-DETR and their parameters, in one place.

A model config holds one `rank` node of this type; the meta-architecture passes each component
only what it needs (decoder: RCH, QRL; criterion: GCL; matcher: HMC). All four off is H-DETR.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["RankOptions"]


@dataclass(frozen=True)
class RankOptions:
    """
    Attributes:
        rch: rank-adaptive classification head (Eq. 1).
        qrl: query rank layer (Eq. 2-3).
        gcl: GIoU-aware classification loss (Eq. 6) on the decoder outputs.
        hmc: high-order matching cost (Eq. 8) from `hmc_start` of training on.
        hmc_start: fraction of training (iterations) after which HMC is used (0.75).
        hmc_power: alpha of Eq. 8 (4); Table 5b varies it.
        hmc_quality: "iou" (Eq. 8) or "giou" (((GIoU + 1) / 2)^alpha, Table 5b).
        gcl_target: "giou" (t = (GIoU + 1) / 2, Eq. 6) or "iou" (t = IoU), Table 5a.
        gcl_power: k in t^k, Table 5a (1).
        varifocal: use the varifocal loss (Eq. 7, t = IoU^k) instead of GCL (Sec. 4.3); needs
            gcl off.
    """

    rch: bool = True
    qrl: bool = True
    gcl: bool = True
    hmc: bool = True
    hmc_start: float = 0.75
    hmc_power: float = 4.0
    hmc_quality: str = "iou"
    gcl_target: str = "giou"
    gcl_power: float = 1.0
    varifocal: bool = False

    def __post_init__(self):
        if not 0.0 <= self.hmc_start <= 1.0:
            raise ValueError(
                f"rank.hmc_start is a fraction of training in [0, 1], got {self.hmc_start}"
            )
        if self.hmc_quality not in ("iou", "giou"):
            raise ValueError(f"rank.hmc_quality must be 'iou' or 'giou', got {self.hmc_quality!r}")
        if self.gcl_target not in ("iou", "giou"):
            raise ValueError(f"rank.gcl_target must be 'iou' or 'giou', got {self.gcl_target!r}")
        if self.varifocal and self.gcl:
            raise ValueError("rank.varifocal replaces GCL: set rank.gcl=False to use it")

    @property
    def classification_loss(self) -> str:
        """ "gcl", "varifocal" or "focal" (plain H-DETR)."""
        if self.varifocal:
            return "varifocal"
        return "gcl" if self.gcl else "focal"

    @property
    def flags(self) -> str:
        """A short name of the switched-on components, e.g. "RCH+QRL+GCL+HMC" or "none"."""
        names = [n.upper() for n in ("rch", "qrl", "gcl", "hmc") if getattr(self, n)]
        return "+".join(names) or "none"

    def to_dict(self) -> dict:
        return asdict(self)
