"""The original Rank-DETR release's checkpoint layout (tests/data), for name/shape checks."""

from pathlib import Path

REFERENCE = Path(__file__).resolve().parent / "data"
REFERENCE = REFERENCE / "official-rank-detr-r50-two-stage-state-dict.txt"


def reference_shapes(prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Tensor names starting with `prefix` (which is removed) and their shapes."""
    shapes = {}
    for line in REFERENCE.read_text().splitlines():
        if line.startswith(prefix) and not line.startswith("#"):
            name, shape = line.split(" ", 1)
            shapes[name[len(prefix) :]] = tuple(int(s) for s in shape.strip("()").split(",") if s)
    return shapes
