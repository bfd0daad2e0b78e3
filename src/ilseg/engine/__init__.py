"""Training engine: one step, evaluation, the whole incremental run, checkpoints."""
