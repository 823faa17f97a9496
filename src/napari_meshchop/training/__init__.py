"""Training MeshNet: the recipe's settings, memory modes, the resumable loop and one fold of a cohort."""
