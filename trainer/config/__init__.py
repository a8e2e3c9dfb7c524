"""Config → plan: the YAML schema, the DeepSpeed JSON filling, progressive stages, shard sets and the
whole-run validation that runs before any process group exists (no torch imported here).
"""
