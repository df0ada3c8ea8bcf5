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
from norm_optax._stateful import AutoClipState as AutoClipState
from norm_optax._stateful import RecordNormsState as RecordNormsState
from norm_optax._stateful import SkipOnSpikeState as SkipOnSpikeState
from norm_optax._stateful import ZClipState as ZClipState
from norm_optax._stateful import autoclip as autoclip
from norm_optax._stateful import record_norms as record_norms
from norm_optax._stateful import skip_on_spike as skip_on_spike
from norm_optax._stateful import zclip as zclip
from norm_optax.norms import global_norm as global_norm
from norm_optax.norms import leaf_norms as leaf_norms
from norm_optax.norms import unit_norms as unit_norms

__version__ = "0.1.0"

__all__ = [
    "AutoClipState",
    "RecordNormsState",
    "SkipOnSpikeState",
    "ZClipState",
    "__version__",
    "adaptive_clip",
    "autoclip",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "global_norm",
    "leaf_norms",
    "normalize_by_global_norm",
    "record_norms",
    "skip_on_spike",
    "unit_norms",
    "zclip",
]
