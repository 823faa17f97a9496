"""Training data: the ARC cohort from the hub, its manifest, cross-validation folds and the preprocessing cache."""
