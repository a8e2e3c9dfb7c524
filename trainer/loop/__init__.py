"""Engine → steps: the Trainer (stages, micro-steps, logging, checkpoint and sample cadence), the pipeline
step, the per-sample random streams, preemption and the data hook-up.
"""
