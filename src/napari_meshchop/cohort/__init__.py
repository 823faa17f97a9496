"""Segmenting a cohort: a BIDS dataset or folders of NIfTI files, as BIDS derivatives."""
