"""Scoring predictions: metrics from voxel counts, the one streaming evaluation core, reports."""
