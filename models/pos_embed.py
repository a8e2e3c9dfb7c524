"""Fixed 2D sine-cosine position embeddings (the MAE/DiT table), for any token grid.

The table is computed in float64 and rounded to float32 once, as the reference does with numpy,
so a model built here and a released checkpoint carry the same numbers.
"""
from __future__ import annotations

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) table: first half sin, second half cos, frequencies 1/10000^(2i/dim)."""
    if dim % 2 != 0:
        raise ValueError(f"1D sin-cos embedding needs an even dim, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def grid_coordinates(
    grid_h: int,
    grid_w: int,
    base_size: int | tuple[int, int] | None = None,
    pe_interpolation: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column coordinates of a grid_h x grid_w token grid, each (grid_h * grid_w,), row-major.

    Without base_size the coordinates are token indices (the official DiT table). With base_size the
    coordinates are rescaled PixArt-style, `index / (grid / base_size) / pe_interpolation`, so a model
    trained on a base_size grid sees the same coordinate range at a larger resolution.
    """
    rows = torch.arange(grid_h, dtype=torch.float64)
    cols = torch.arange(grid_w, dtype=torch.float64)
    if base_size is not None:
        base_h, base_w = (base_size, base_size) if isinstance(base_size, int) else base_size
        rows = rows / (grid_h / base_h) / pe_interpolation
        cols = cols / (grid_w / base_w) / pe_interpolation
    row_of_token = rows[:, None].expand(grid_h, grid_w).reshape(-1)
    col_of_token = cols[None, :].expand(grid_h, grid_w).reshape(-1)
    return row_of_token, col_of_token


def sincos_2d(
    dim: int,
    grid_h: int,
    grid_w: int | None = None,
    base_size: int | tuple[int, int] | None = None,
    pe_interpolation: float = 1.0,
) -> torch.Tensor:
    """(grid_h * grid_w, dim) float32 table on the CPU.

    Channel layout as in the reference: the first dim/2 channels encode the column (x) coordinate, the
    last dim/2 the row (y) coordinate (the reference meshgrid puts w first), tokens in row-major order.
    """
    if dim % 4 != 0:
        raise ValueError(f"2D sin-cos embedding needs hidden size divisible by 4, got {dim}")
    grid_w = grid_h if grid_w is None else grid_w
    rows, cols = grid_coordinates(grid_h, grid_w, base_size, pe_interpolation)
    table = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)  # (T, dim)
    return table.to(torch.float32)
