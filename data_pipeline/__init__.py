"""Latent data for DiT training: shard format + manifest, VAE adapters, encode tool, loader, demo data.

Knows nothing about the model or DeepSpeed: it turns images into latent shards and shards into
(latents, labels) batches, and decodes sampled latents back to images with the shards' own VAE.
Training reads shards through ``ElasticStream`` (batch k independent of the parallel layout, exact
resume by sample position); ``LatentLoader`` is the older shard-splitting streamer (any URL, resampled).
"""

from .elastic import ElasticDataError, ElasticStream, MicroBatch
from .images import center_crop_arr, save_image_grid
from .loader import LatentLoader, NoValidSamplesError
from .manifest import check_shard_set, open_shard_set, read_manifest, resolve_shards
from .vae import load_vae, load_vae_from_manifest

__all__ = [
    "ElasticDataError",
    "ElasticStream",
    "MicroBatch",
    "LatentLoader",
    "NoValidSamplesError",
    "center_crop_arr",
    "check_shard_set",
    "load_vae",
    "load_vae_from_manifest",
    "open_shard_set",
    "read_manifest",
    "resolve_shards",
    "save_image_grid",
]
