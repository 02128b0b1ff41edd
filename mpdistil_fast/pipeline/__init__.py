"""Run machinery: config, training loop and stages, evaluation, checkpoints, metrics log, report."""
