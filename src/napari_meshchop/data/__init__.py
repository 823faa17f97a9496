"""Training data: the ARC cohort from the hub, its manifest, cross-validation folds and the preprocessing cache."""

from pathlib import Path

# Kept here, free of heavy imports, for the command line's defaults.
REPO = "hugging-science/arc-aphasia-bids"  # the paper's cohort on the Hugging Face hub
DEFAULT_DATA_DIR = Path("data") / "arc"  # where a downloaded cohort lives
