"""What a run reports: metric sinks (metrics.jsonl, W&B), telemetry (MFU, memory, timing), non-finite step
skipping, loss-spike detection, the heartbeat watchdog, fault-injection hooks and sample grids.
"""
