"""Images on grids: NIfTI input and output, resampling, conform, the network's preprocessing."""
