"""User-facing commands over a run directory: status, report, sample, export, evaluate (and FID maths).
Tools import the rest of the trainer; nothing imports tools.
"""
