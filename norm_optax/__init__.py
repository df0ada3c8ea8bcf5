"""norm_optax: norm-based training techniques as first-class Optax transforms.

Gradient clipping (before the optimizer), weight projection (last in the
chain), L1/L2 decay, and the norm primitives they are built on::

    import optax
    import norm_optax as nox

    tx = optax.chain(nox.clip_by_global_norm(1.0), optax.adamw(3e-4))

See ``README.md`` for the placement of each transform in ``optax.chain``.
"""

from norm_optax import masks as masks
from norm_optax._alias import muon as muon
from norm_optax._alias import scion as scion
from norm_optax._balls import project_l1_ball as project_l1_ball
from norm_optax._balls import project_l2_ball as project_l2_ball
from norm_optax._clipping import adaptive_clip as adaptive_clip
from norm_optax._clipping import clip_by_global_norm as clip_by_global_norm
from norm_optax._clipping import clip_by_norm as clip_by_norm
from norm_optax._clipping import clip_by_value as clip_by_value
from norm_optax._clipping import normalize_by_global_norm as normalize_by_global_norm
from norm_optax._decay import add_l1_decay as add_l1_decay
from norm_optax._decay import add_l2_decay as add_l2_decay
from norm_optax._decay import l1_penalty as l1_penalty
from norm_optax._decay import l2_penalty as l2_penalty
from norm_optax._lmo import scale_by_lmo as scale_by_lmo
from norm_optax._projection import clip_weights as clip_weights
from norm_optax._projection import max_norm as max_norm
from norm_optax._projection import min_max_norm as min_max_norm
from norm_optax._projection import non_negative as non_negative
from norm_optax._projection import project_linf_ball as project_linf_ball
from norm_optax._projection import unit_norm as unit_norm
from norm_optax._prox import prox_elastic_net as prox_elastic_net
from norm_optax._prox import prox_group_l1 as prox_group_l1
from norm_optax._prox import prox_l1 as prox_l1
from norm_optax._spectral import ClipSpectralNormState as ClipSpectralNormState
from norm_optax._spectral import clip_spectral_norm as clip_spectral_norm
from norm_optax._stateful import AutoClipState as AutoClipState
from norm_optax._stateful import RecordNormsState as RecordNormsState
from norm_optax._stateful import SkipOnSpikeState as SkipOnSpikeState
from norm_optax._stateful import autoclip as autoclip
from norm_optax._stateful import record_norms as record_norms
from norm_optax._stateful import skip_on_spike as skip_on_spike
from norm_optax._telemetry import RecordLayerNormsState as RecordLayerNormsState
from norm_optax._telemetry import layer_norms_dict as layer_norms_dict
from norm_optax._telemetry import record_layer_norms as record_layer_norms
from norm_optax._transform import ScheduleState as ScheduleState
from norm_optax._zclip import ZClipState as ZClipState
from norm_optax._zclip import zclip as zclip
from norm_optax.norms import global_norm as global_norm
from norm_optax.norms import leaf_norms as leaf_norms
from norm_optax.norms import orthogonalize as orthogonalize
from norm_optax.norms import unit_norms as unit_norms

__version__ = "0.3.0"

__all__ = [
    "AutoClipState",
    "ClipSpectralNormState",
    "RecordLayerNormsState",
    "RecordNormsState",
    "ScheduleState",
    "SkipOnSpikeState",
    "ZClipState",
    "__version__",
    "adaptive_clip",
    "add_l1_decay",
    "add_l2_decay",
    "autoclip",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "clip_spectral_norm",
    "clip_weights",
    "global_norm",
    "l1_penalty",
    "l2_penalty",
    "layer_norms_dict",
    "leaf_norms",
    "masks",
    "max_norm",
    "min_max_norm",
    "muon",
    "non_negative",
    "normalize_by_global_norm",
    "orthogonalize",
    "project_l1_ball",
    "project_l2_ball",
    "project_linf_ball",
    "prox_elastic_net",
    "prox_group_l1",
    "prox_l1",
    "record_layer_norms",
    "record_norms",
    "scale_by_lmo",
    "scion",
    "skip_on_spike",
    "unit_norm",
    "unit_norms",
    "zclip",
]
