"""The dock widgets: each picks inputs, starts a core generator in a worker and shows what it yields."""
