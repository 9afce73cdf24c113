"""Builders of tiny random-init diffusers models for tests and benchmarks (nothing is downloaded).

Not used by training: a test or a benchmark imports :mod:`difftune.testing.models`."""
