"""What a preprocessing is called and on which grid it puts a scan (stored in checkpoints).

Kept free of numpy, nibabel and scipy, so that settings and the command line's parser read
it cheaply; :mod:`.preprocess` does the work.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

KNOWN = ("conform", "ras-minmax", "brainchop")
# Specs on FreeSurfer's conformed grid (256^3, 1 mm, LIA), read from its uint8 volume.
CONFORMED = ("conform", "brainchop")


@dataclass(frozen=True)
class PreprocessSpec:
    name: str = "conform"
    shape: tuple[int, int, int] = (256, 256, 256)
    voxel_size: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.name not in KNOWN:
            raise ValueError(f"unknown preprocessing {self.name!r}; known: {', '.join(KNOWN)}")
        if self.name in CONFORMED and (self.shape != (256,) * 3 or self.voxel_size != 1.0):
            raise ValueError(f"{self.name} is defined for 256^3 at 1 mm only")

    @property
    def summary(self) -> str:
        """One line that says what the network is fed."""
        if self.name == "conform":
            return ("FreeSurfer's conform (256^3, 1 mm, LIA, robust range to 0..255 with the "
                    "top 0.1% clipped), divided by 255")
        if self.name == "brainchop":
            return ("niimath's conform (256^3, 1 mm, LIA, uint8 with the top 2% clipped), then "
                    "its 2%-98% quantile range scaled to [0, 1] and clipped")
        return (f"reoriented to RAS, resampled to {self.voxel_size:g} mm, centre crop or pad "
                f"to {'x'.join(map(str, self.shape))}, min-max scaled to [0, 1]")

    @property
    def axis_codes(self) -> str:
        """Where the network grid's voxel axes point (nibabel's codes): the order in which
        the network sees the volume."""
        return "RAS" if self.name == "ras-minmax" else "LIA"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessSpec:
        return cls(**d)
