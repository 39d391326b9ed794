"""Where the shipped Hydra configs and sweeps are, in a checkout or an installed wheel.

    from rlopt.resources import config_dir, sweeps_dir
    config_dir()   # .../configs in an editable install, .../site-packages/rlopt/configs in a wheel

The repository's top-level ``configs/`` and ``sweeps/`` are the source; the build maps them to
the packages ``rlopt.configs`` and ``rlopt.sweeps`` (``pyproject.toml``, ``package-dir``), so
both kinds of install find them the same way: through the import system.
"""

from __future__ import annotations

import importlib.util
import os


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(f"rlopt's {name!r} folder is not installed; reinstall rlopt (pip install .)")
    return os.path.abspath(locations[0])


def config_dir() -> str:
    """The folder of ``train.yaml`` and the config groups."""
    return _package_dir("rlopt.configs")


def sweeps_dir() -> str:
    """The folder of the sweep configs (``rlopt-train --config-dir <this> --config-name grpo_vs_gspo -m``)."""
    return _package_dir("rlopt.sweeps")
