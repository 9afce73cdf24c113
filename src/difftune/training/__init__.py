"""A training run: the run folder and its state, the loop, randomness streams, outputs and the dry run."""
