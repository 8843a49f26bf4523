"""A run's files: the checks before a model loads, the output directory, the models as the config asks, checkpoints."""
