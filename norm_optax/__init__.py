"""norm_optax: norm-based training techniques as first-class Optax transforms.

Gradient clipping (before the optimizer), weight projection (last in the
chain), L1/L2 decay, and the norm primitives they are built on::

    import optax
    import norm_optax as nox

    tx = optax.chain(nox.clip_by_global_norm(1.0), optax.adamw(3e-4))

See ``README.md`` for the placement of each transform in ``optax.chain``.
"""

from norm_optax._clipping import adaptive_clip as adaptive_clip
from norm_optax._clipping import clip_by_global_norm as clip_by_global_norm
from norm_optax._clipping import clip_by_norm as clip_by_norm
from norm_optax._clipping import clip_by_value as clip_by_value
from norm_optax._clipping import normalize_by_global_norm as normalize_by_global_norm
from norm_optax.norms import global_norm as global_norm
from norm_optax.norms import leaf_norms as leaf_norms
from norm_optax.norms import unit_norms as unit_norms

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "adaptive_clip",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "global_norm",
    "leaf_norms",
    "normalize_by_global_norm",
    "unit_norms",
]
