"""Class-conditional sample grids with classifier-free guidance, decoded by the shards' VAE.

Rows are classes and columns are samples of that class, so a glance at the grid tells whether
the model has learned class structure.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def sample_latents(model, objective, *, classes: list[int], per_class: int, latent_shape: tuple, cfg_scale: float,
                   steps: int, method: str, seed: int, device: torch.device, num_classes: int) -> torch.Tensor:
    """(len(classes)·per_class, C, H, W) latents, class-major order."""
    n = len(classes) * per_class
    gen = torch.Generator(device="cpu").manual_seed(seed)
    z = torch.randn((n, *latent_shape), generator=gen).to(device)  # (n, C, H, W)
    y = torch.tensor([c for c in classes for _ in range(per_class)], device=device)
    model.eval()
    if cfg_scale > 1.0:
        z = torch.cat([z, z], 0)  # (2n, C, H, W): conditional half, then unconditional half
        y_null = torch.full_like(y, num_classes)
        kwargs = {"y": torch.cat([y, y_null], 0), "cfg_scale": cfg_scale}
        fn = model.forward_with_cfg
    else:
        kwargs = {"y": y}
        fn = model.forward
    out = objective.sample(fn, tuple(z.shape), noise=z, steps=steps, method=method, model_kwargs=kwargs)
    if cfg_scale > 1.0:
        out = out[:n]
    return out.float()


def sample_grid(model, objective, vae, path: str, *, classes: list[int], per_class: int, latent_shape: tuple,
                cfg_scale: float, steps: int, method: str, seed: int, device: torch.device, num_classes: int) -> str:
    from data_pipeline.images import save_image_grid

    latents = sample_latents(model, objective, classes=classes, per_class=per_class, latent_shape=latent_shape,
                             cfg_scale=cfg_scale, steps=steps, method=method, seed=seed, device=device,
                             num_classes=num_classes)
    images = vae.decode(latents)  # (n, 3, H·f, W·f) in [-1, 1], decoded on the VAE's device
    save_image_grid(images.cpu(), path, nrow=per_class)
    return path
