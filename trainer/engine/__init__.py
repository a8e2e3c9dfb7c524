"""Plan → engine: the parallel layout (Topology), process-group start-up, the model factory, optimizer
groups and LR schedule, and the ``apply_*`` steps that turn a plain DiT into a DeepSpeed engine for a layout.
"""
