"""Parallel forms of the plain DiT: tensor-parallel layers, pipeline stages, DeepSpeed-MoE FFN adapter.

Each takes a fully initialised plain ``models.dit.DiT`` (built with the run seed on every rank) and
returns a piece of it, so every layout starts from exactly the single-process weights. Parameter
names stay those of the plain model (official DiT keys), which keeps export a matter of merging
slices; no module here reads a config file or starts a process group.
"""
