"""The public names and argument names of ../shared/API.md, checked by signature."""

from __future__ import annotations

import inspect

import pytest

import norm_optax as nox
import norm_optax.masks
import norm_optax.norms

# name -> the parameters API.md gives, in order, with defaults where it gives one.
CONTRACT: dict[str, list[tuple[str, object]]] = {
    # 1. Norm primitives.
    "global_norm": [("tree", inspect.Parameter.empty), ("ord", 2)],
    "leaf_norms": [("tree", inspect.Parameter.empty), ("ord", 2)],
    "unit_norms": [("x", inspect.Parameter.empty), ("axis", None), ("ord", 2)],
    # 2.1 Gradient clipping.
    "clip_by_value": [("max_delta", inspect.Parameter.empty)],
    "clip_by_norm": [("max_norm", inspect.Parameter.empty), ("ord", 2)],
    "clip_by_global_norm": [
        ("max_norm", inspect.Parameter.empty),
        ("ord", 2),
        ("axis_name", None),
    ],
    "normalize_by_global_norm": [("norm", 1.0)],
    "adaptive_clip": [
        ("clipping", inspect.Parameter.empty),
        ("eps", 1e-3),
        ("axis", None),
        ("mask", None),
    ],
    # 2.2 Weight projection.
    "clip_weights": [("max_value", inspect.Parameter.empty)],
    "non_negative": [],
    "max_norm": [("max_value", inspect.Parameter.empty), ("axis", None)],
    "unit_norm": [("axis", None)],
    "min_max_norm": [
        ("min_value", inspect.Parameter.empty),
        ("max_value", inspect.Parameter.empty),
        ("rate", 1.0),
        ("axis", None),
    ],
    "project_l2_ball": [("radius", inspect.Parameter.empty)],
    "project_l1_ball": [("radius", inspect.Parameter.empty)],
    "project_linf_ball": [("radius", inspect.Parameter.empty)],
    # 2.3 Decay.
    "add_l2_decay": [("coeff", inspect.Parameter.empty), ("mask", None)],
    "add_l1_decay": [("coeff", inspect.Parameter.empty), ("mask", None)],
    "prox_l1": [
        ("coeff", inspect.Parameter.empty),
        ("learning_rate", inspect.Parameter.empty),
        ("mask", None),
    ],
    "l2_penalty": [("tree", inspect.Parameter.empty)],
    "l1_penalty": [("tree", inspect.Parameter.empty)],
    # 5. Stateful companions.
    "record_norms": [("inner", inspect.Parameter.empty)],
    # 9. Per-layer norm statistics.
    "record_layer_norms": [("inner", inspect.Parameter.empty)],
    "layer_norms_dict": [("tree", inspect.Parameter.empty), ("prefix", "")],
    "autoclip": [("percentile", 10.0), ("history", 1000)],
    "zclip": [("z_threshold", 2.5), ("alpha", 0.97), ("warmup_steps", 25)],
    "skip_on_spike": [
        ("inner", inspect.Parameter.empty),
        ("window", 128),
        ("num_sigma", 6.0),
    ],
    # 7. More techniques.
    "prox_group_l1": [
        ("coeff", inspect.Parameter.empty),
        ("learning_rate", inspect.Parameter.empty),
        ("axis", None),
    ],
    "prox_elastic_net": [
        ("l1", inspect.Parameter.empty),
        ("l2", inspect.Parameter.empty),
        ("learning_rate", inspect.Parameter.empty),
        ("mask", None),
    ],
    "clip_spectral_norm": [
        ("max_value", inspect.Parameter.empty),
        ("num_iters", 1),
        ("axis", None),
    ],
    # 8. Norm geometry.
    "orthogonalize": [("tree", inspect.Parameter.empty)],
    "scale_by_lmo": [("norm", "auto"), ("radius", 1.0)],
}

# Keyword-only arguments API.md names, with their defaults.
KEYWORD_ONLY: dict[str, dict[str, object]] = {
    "zclip": {
        "max_norm": 1.0,
        "mode": "zscore",
        "clip_option": "adaptive_scaling",
        "clip_factor": 1.0,
        "skip_stats_on_spike": False,
    },
    "prox_group_l1": {"stack_axes": None, "mask": None},
    "clip_spectral_norm": {"stack_axes": None, "mask": None},
    "orthogonalize": {
        "method": "newton_schulz",
        "ns_steps": 5,
        "ns_coeffs": "standard",
        "axis": None,
        "stack_axes": None,
    },
    "scale_by_lmo": {
        "dims_scale": None,
        "axis": None,
        "stack_axes": None,
        "mask": None,
        "method": "newton_schulz",
        "ns_steps": 5,
        "ns_coeffs": "standard",
    },
    "record_layer_norms": {"stack_axes": None},
}

# API.md section 6: every per-leaf or per-unit operation takes ``stack_axes``.
STACK_AXES = [
    "leaf_norms",
    "unit_norms",
    "clip_by_norm",
    "adaptive_clip",
    "max_norm",
    "unit_norm",
    "min_max_norm",
    "prox_group_l1",
    "clip_spectral_norm",
]

# Every public transform (the shared battery runs each, see tests/cases.py).
TRANSFORMS = [
    "clip_by_value",
    "clip_by_norm",
    "clip_by_global_norm",
    "normalize_by_global_norm",
    "adaptive_clip",
    "clip_weights",
    "non_negative",
    "max_norm",
    "unit_norm",
    "min_max_norm",
    "project_l2_ball",
    "project_l1_ball",
    "project_linf_ball",
    "add_l2_decay",
    "add_l1_decay",
    "prox_l1",
    "prox_group_l1",
    "prox_elastic_net",
    "clip_spectral_norm",
    "record_norms",
    "autoclip",
    "zclip",
    "skip_on_spike",
    "scale_by_lmo",
    "record_layer_norms",
]

# The transforms that read ``params`` (they take a ``mask``).
PARAMS_READERS = [
    name
    for name in TRANSFORMS
    if name
    not in (
        "clip_by_value",
        "clip_by_norm",
        "clip_by_global_norm",
        "normalize_by_global_norm",
        "record_norms",
        "record_layer_norms",
        "autoclip",
        "zclip",
        "skip_on_spike",
    )
]


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_public_name_and_arguments(name: str) -> None:
    assert name in nox.__all__
    fn = getattr(nox, name)
    params = list(inspect.signature(fn).parameters.values())
    expected = CONTRACT[name]
    assert [p.name for p in params[: len(expected)]] == [n for n, _ in expected]
    for param, (_, default) in zip(params, expected, strict=False):
        assert param.default == default, (name, param.name)
    # Anything beyond the contract is optional.
    for param in params[len(expected) :]:
        assert param.default is not inspect.Parameter.empty, (name, param.name)
    doc = inspect.getdoc(fn) or ""
    assert "Example" in doc, f"{name} needs an Example section"
    assert ">>>" in doc, f"{name} needs a doctest example"


@pytest.mark.parametrize("name", sorted(KEYWORD_ONLY))
def test_keyword_only_arguments(name: str) -> None:
    params = inspect.signature(getattr(nox, name)).parameters
    for arg, default in KEYWORD_ONLY[name].items():
        assert params[arg].kind is inspect.Parameter.KEYWORD_ONLY, (name, arg)
        assert params[arg].default == default, (name, arg)


@pytest.mark.parametrize("name", STACK_AXES)
def test_stack_axes_is_a_keyword_with_default_none(name: str) -> None:
    param = inspect.signature(getattr(nox, name)).parameters["stack_axes"]
    assert param.kind is inspect.Parameter.KEYWORD_ONLY
    assert param.default is None


def test_matrices_only_takes_stack_axes() -> None:
    param = inspect.signature(nox.masks.matrices_only).parameters["stack_axes"]
    assert param.kind is inspect.Parameter.KEYWORD_ONLY
    assert param.default is None


@pytest.mark.parametrize("name", PARAMS_READERS)
def test_params_readers_take_a_mask(name: str) -> None:
    assert "mask" in inspect.signature(getattr(nox, name)).parameters


@pytest.mark.parametrize(
    "name", ["global_norm", "leaf_norms", "unit_norms", "orthogonalize"]
)
def test_norms_module_reexported(name: str) -> None:
    assert getattr(norm_optax.norms, name) is getattr(nox, name)


def test_masks_module() -> None:
    for name in ("matrices_only", "by_path", "exclude_path", "all_of"):
        assert callable(getattr(norm_optax.masks, name))
    assert nox.masks is norm_optax.masks


def test_all_is_sorted_and_importable() -> None:
    public = [n for n in nox.__all__ if not n.startswith("__")]
    assert public == sorted(public)
    for name in nox.__all__:
        assert hasattr(nox, name)
