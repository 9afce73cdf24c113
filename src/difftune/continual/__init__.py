"""Continual Diff-Tuning: a sequence of target tasks, each stage starting from the previous stage's final model."""
