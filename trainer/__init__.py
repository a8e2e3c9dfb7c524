"""Training: config, DeepSpeed engine, loop, progressive stages, EMA, checkpoints, metrics, tools."""
