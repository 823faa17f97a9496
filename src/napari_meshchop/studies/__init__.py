"""Many runs: the shared work queue, the paper's experiment protocol and hyperparameter search."""
