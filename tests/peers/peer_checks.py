"""What the peer tests share: a tiny model with calibration records, and the checks every adapter must pass (the
block layers quantized to at most 2^bits values per output channel or group, every other layer untouched, the
denoiser's output changed). Imported by the test modules (this folder is on their path)."""
import copy

import torch
from torch import nn

from diffptq.config import CalibConfig
from diffptq.models import family_of, load_pipeline

MODELS = ("tiny-dit", "tiny-unet")


class Tiny:
    """A tiny model's float denoiser (never modified), its calibration records (CPU) and one record's FP output."""

    def __init__(self, name: str) -> None:
        from diffptq.data.calib import calibration_set

        pipe = load_pipeline(name, dtype=torch.float32, device=torch.device("cpu"))
        self.family = family_of(pipe)
        self.fp = self.family.denoiser(pipe)
        calib, _ = calibration_set(pipe, CalibConfig(n_calib=1, calib_steps=2, batch_size=1), progress=False)
        self.records = list(calib.batches("cpu"))
        self.block_names = self.family.block_layer_names(self.fp)
        with torch.no_grad():
            self.fp_out = self.fp(**self.records[0]).sample

    def copy(self) -> nn.Module:
        return copy.deepcopy(self.fp)


def distinct_per_group(weight: torch.Tensor, group: int | None) -> int:
    """The largest number of distinct values in one group of `group` inputs (None: the whole row) of one output
    channel; weight (out, in, ...) is taken as (out, in·...)."""
    rows = weight.detach().float().reshape(weight.shape[0], -1)
    group = group or rows.shape[1]
    return max(len(torch.unique(rows[r, c:c + group])) for r in range(rows.shape[0])
               for c in range(0, rows.shape[1], group))


def check_quantized(tiny: Tiny, quantized: nn.Module, bits: int, effective_weight, group_of,
                    expect: set[str] | None = None) -> None:
    """The peer's denoiser `quantized` vs the float one: its output differs; every block layer in `expect` (default:
    all) has effective weights (`effective_weight(module)`) with at most 2^bits values per output channel or group
    (`group_of(name, module)`); every other Linear / Conv2d gives the float layer's output exactly."""
    with torch.no_grad():
        out = quantized(**tiny.records[0]).sample
    assert not torch.allclose(out, tiny.fp_out), "the peer changed nothing"
    expect = set(tiny.block_names) if expect is None else expect
    for name in expect:
        module = quantized.get_submodule(name)
        count = distinct_per_group(effective_weight(module), group_of(name, module))
        assert 2 < count <= 2**bits, (name, count)
    others = [n for n, m in tiny.fp.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n not in expect]
    gen = torch.Generator().manual_seed(0)
    for name in others:
        fp_layer, layer = tiny.fp.get_submodule(name), quantized.get_submodule(name)
        shape = (3, fp_layer.in_features) if isinstance(fp_layer, nn.Linear) else (1, fp_layer.in_channels, 6, 6)
        x = torch.randn(shape, generator=gen)
        with torch.no_grad():
            assert torch.equal(layer(x), fp_layer(x)), name
