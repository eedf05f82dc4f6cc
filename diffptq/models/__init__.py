"""Model loading (hub id, local dir, bundled, tiny, full-size random) and model-family descriptions."""
from diffptq.models.families import FAMILIES, PIXART, SD, ModelFamily, family_of
from diffptq.models.load import BUNDLED_MODELS, PROJECT_MODELS, load_pipeline

__all__ = ["FAMILIES", "PIXART", "SD", "ModelFamily", "family_of", "BUNDLED_MODELS", "PROJECT_MODELS",
           "load_pipeline"]
