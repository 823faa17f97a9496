"""What a preprocessing is called and on which grid it puts a scan (stored in checkpoints).

Kept free of numpy, nibabel and scipy, so that settings and the command line's parser read
it cheaply; :mod:`.preprocess` does the work.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

KNOWN = ("conform", "ras-minmax")


@dataclass(frozen=True)
class PreprocessSpec:
    name: str = "conform"
    shape: tuple[int, int, int] = (256, 256, 256)
    voxel_size: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.name not in KNOWN:
            raise ValueError(f"unknown preprocessing {self.name!r}; known: {', '.join(KNOWN)}")
        if self.name == "conform" and (self.shape != (256,) * 3 or self.voxel_size != 1.0):
            raise ValueError("conform is defined for 256^3 at 1 mm only")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessSpec:
        return cls(**d)
