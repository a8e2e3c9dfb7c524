"""What a run keeps: atomic, verified checkpoints, the EMA (plain and layout-aware), and the consolidation
of sharded states into one official state dict.
"""
