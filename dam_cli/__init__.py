"""dam: Dynamic Attention Masks (DAM) for Hugging Face causal language models.

Public API (docs/reference/api.md): `load_profile`, `Profile`, `sparse_attention`, `DamError`,
the model helpers `enable_dam` / `disable_dam`, and `DynamicSelection` (the dynamic part's
settings, defined in `dam_kernels.dynamic`). Imports are lazy so `dam --help` stays instant.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_profile": ("artifact.profile", "load_profile"),
    "read_meta": ("artifact.profile", "read_meta"),
    "Profile": ("artifact.profile", "Profile"),
    "ProfileMeta": ("artifact.profile", "ProfileMeta"),
    "DamError": ("errors", "DamError"),
    "sparse_attention": ("runtime.attention", "sparse_attention"),
    "DynamicSelection": ("runtime.attention", "DynamicSelection"),
    "enable_dam": ("runtime.backend", "enable_dam"),
    "disable_dam": ("runtime.backend", "disable_dam"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f"{__name__}.{mod}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
