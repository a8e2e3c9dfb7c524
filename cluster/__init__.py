"""Cluster glue: Slurm scripts, launch environment, preemption/requeue, parallelism planner."""
