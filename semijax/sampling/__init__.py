"""Static-shape sample selection: feature density and DGCL's density-guided sampler."""

from semijax.sampling import density, dgcl

__all__ = ["density", "dgcl"]
