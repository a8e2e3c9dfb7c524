"""Shard format, VAE adapters, encode tool, streaming loader and demo data for DiT latents."""
