"""Model loading (hub id, local dir, bundled, tiny, full-size random) and model-family descriptions.

The names below are imported on first use, so that `diffptq.models.names` (the model and scheduler names a
command line needs to check its flags) loads without torch or diffusers.
"""
import importlib

_LAZY = {"FAMILIES": "families", "PIXART": "families", "SD": "families", "ModelFamily": "families",
         "family_of": "families", "BUNDLED_MODELS": "load", "PROJECT_MODELS": "load", "load_pipeline": "load"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"diffptq.models.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'diffptq.models' has no attribute {name!r}")
