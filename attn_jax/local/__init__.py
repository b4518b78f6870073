"""Local and multi-dimensional attention on token grids: neighborhood attention (1-, 2-, 3-D) and
axial attention."""

from attn_jax.local.neighborhood import (NEIGHBORHOOD, NeighborhoodBias, NeighborhoodMask, NeighborhoodSpec,
                                         axis_windows, neighborhood, neighborhood_mask, neighborhood_reference,
                                         neighborhood_spec)
from attn_jax.local.axial import AXIAL, axial, axial_mask, axial_reference

__all__ = ["NEIGHBORHOOD", "NeighborhoodBias", "NeighborhoodMask", "NeighborhoodSpec", "axis_windows", "neighborhood",
           "neighborhood_mask", "neighborhood_reference", "neighborhood_spec", "AXIAL", "axial", "axial_mask",
           "axial_reference"]
