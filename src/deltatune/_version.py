"""The package version, and the versions of the libraries a run's numbers depend on."""

from __future__ import annotations

import importlib.metadata

__version__ = "0.1.0"

#: the distributions whose versions every run records (metrics.json, report.md)
RECORDED_PACKAGES = ("torch", "transformers", "peft")


def software_versions() -> dict[str, str]:
    """``{"deltatune": ..., "torch": ..., "transformers": ..., "peft": ...}``; ``"not installed"`` for a
    missing one (peft is a test dependency only)."""
    out = {"deltatune": __version__}
    for name in RECORDED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def format_versions(versions: dict[str, str]) -> str:
    """``"deltatune 0.1.0, torch 2.13.0+cpu, ..."``."""
    return ", ".join(f"{k} {v}" for k, v in versions.items())
