"""Local and multi-dimensional attention: neighborhood attention on 1-, 2- and 3-D token grids."""

from attn_jax.local.neighborhood import (NEIGHBORHOOD, NeighborhoodMask, NeighborhoodSpec, axis_windows,
                                         neighborhood, neighborhood_mask, neighborhood_reference,
                                         neighborhood_spec)

__all__ = ["NEIGHBORHOOD", "NeighborhoodMask", "NeighborhoodSpec", "axis_windows", "neighborhood",
           "neighborhood_mask", "neighborhood_reference", "neighborhood_spec"]
