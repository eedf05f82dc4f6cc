"""diffptq: post-training quantization (RTN, GPTQ, Qronos, log-SNR TDQ) for PixArt-alpha and Stable Diffusion."""

__version__ = "0.1.0"


def load_quantized(path, device="cpu", dtype=None, **kwargs):
    """A ready diffusers pipeline from a diffptq checkpoint; see diffptq.io.load.load_quantized."""
    import torch

    from diffptq.io.load import load_quantized as _load

    return _load(path, device=device, dtype=dtype or torch.float32, **kwargs)


def load_pipeline(name_or_path, dtype=None, device=None):
    """A diffusers pipeline for a hub id, local directory or project model; see diffptq.models.load."""
    from diffptq.models.load import load_pipeline as _load

    return _load(name_or_path, dtype=dtype, device=device)
