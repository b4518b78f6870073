"""Local and multi-dimensional attention on token grids: neighborhood attention (1-, 2-, 3-D),
axial attention, Swin (shifted-)window attention, multi-scale (per-head) window attention, HaloNet
blocked attention with a halo, HiLo attention and radial (spatiotemporal energy-decay) attention."""

from attn_jax.local.neighborhood import (NEIGHBORHOOD, NeighborhoodBias, NeighborhoodMask, NeighborhoodSpec,
                                         axis_windows, neighborhood, neighborhood_mask, neighborhood_reference,
                                         neighborhood_spec)
from attn_jax.local.axial import AXIAL, axial, axial_mask, axial_reference
from attn_jax.local.mswa import MSWA, mswa_mask, multi_scale_window_attention
from attn_jax.local.window import WINDOW_ATTENTION, window_attention, window_attention_reference, window_mask
from attn_jax.local.grid_mask import GridMask, dense_grid_mask
from attn_jax.local.halo import HALO, HaloMask, halo_attention, halo_attention_reference, halo_mask
from attn_jax.local.hilo import HILO, hilo_attention, hilo_attention_reference, pool_windows
from attn_jax.local.window import WindowMask
from attn_jax.local.axial import AxialMask
from attn_jax.local.radial import RADIAL, RadialMask, radial_attention, radial_attention_reference, radial_mask

__all__ = ["NEIGHBORHOOD", "NeighborhoodBias", "NeighborhoodMask", "NeighborhoodSpec", "axis_windows", "neighborhood",
           "neighborhood_mask", "neighborhood_reference", "neighborhood_spec", "AXIAL", "axial", "axial_mask",
           "axial_reference", "WINDOW_ATTENTION", "window_attention", "window_attention_reference", "window_mask",
           "MSWA", "mswa_mask", "multi_scale_window_attention", "GridMask", "dense_grid_mask", "HALO", "HaloMask",
           "halo_attention", "halo_attention_reference", "halo_mask", "HILO", "hilo_attention",
           "hilo_attention_reference", "RADIAL", "RadialMask", "radial_attention", "radial_attention_reference",
           "radial_mask", "pool_windows", "WindowMask", "AxialMask"]
