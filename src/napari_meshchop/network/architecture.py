"""What a MeshNet is, without torch: width, dilations, classes (stored in every checkpoint).

Kept free of torch so that settings, the command line's parser and the widgets can name
architectures without loading the network.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# The paper's schedule as arc-meshchop reads it, and the one brainchop deploys.
PAPER_DILATIONS = (1, 2, 4, 8, 16, 16, 8, 4, 2)
BRAINCHOP_DILATIONS = (1, 2, 4, 8, 16, 8, 4, 2, 1)

PRESETS = {"meshnet-5": 5, "meshnet-16": 16, "meshnet-26": 26}


@dataclass(frozen=True)
class Architecture:
    """Everything needed to rebuild a MeshNet; stored in every checkpoint."""

    channels: int = 26
    dilations: tuple[int, ...] = PAPER_DILATIONS
    in_channels: int = 1
    n_classes: int = 2
    dropout: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "dilations", tuple(int(d) for d in self.dilations))
        if self.channels < 1 or not self.dilations or min(self.dilations) < 1:
            raise ValueError(f"invalid MeshNet architecture: {self}")

    @classmethod
    def preset(cls, name: str, **overrides) -> Architecture:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls(channels=PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dilations"] = list(self.dilations)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Architecture:
        return cls(**d)

    @property
    def receptive_field(self) -> int:
        return 1 + 2 * sum(self.dilations)
