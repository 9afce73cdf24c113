"""The experiment config: one section per module (data, train), the aggregator in ``experiment``,
YAML reading and writing in ``files``, and the checks that need no model."""
