"""Static-shape sample selection: feature density and DGCL's density-guided sampler."""

from semijax.sampling import density, dgcl
from semijax.sampling import overlap
from semijax.sampling import semihard

__all__ = ["density", "dgcl"]
