"""Checks that the ``examples`` extra (flax, matplotlib, scikit-learn) is installed."""

from __future__ import annotations

import importlib

from norm_optax import __version__

# norm-optax is not on PyPI yet: the release's git tag (in a clone of the
# repository, `pip install ".[examples]"` does the same).
INSTALL_HINT = (
    'pip install "norm-optax[examples] @ '
    f'git+https://github.com/norm-optax/norm_optax@v{__version__}"'
)

# import name -> distribution name
EXTRAS = {"flax": "flax", "matplotlib": "matplotlib", "sklearn": "scikit-learn"}


def missing_extras() -> list[str]:
    """Distribution names of the extra packages that cannot be imported."""
    missing = []
    for module, distribution in EXTRAS.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(distribution)
    return missing


def require_extras() -> None:
    """Exits with a clear message if a package of the ``examples`` extra is missing.

    Raises:
      SystemExit: naming the missing packages and the install command.
    """
    missing = missing_extras()
    if missing:
        raise SystemExit(
            f"norm_optax.demo needs {', '.join(missing)} (the 'examples' extra). "
            f"Install it with:\n    {INSTALL_HINT}"
        )
