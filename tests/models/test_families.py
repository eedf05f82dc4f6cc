"""ModelFamily: which layers of a denoiser the project quantizes."""
import torch

from diffptq.models import PIXART, load_pipeline


def test_block_layer_names_are_the_linears_of_the_transformer_blocks():
    den = load_pipeline("tiny-dit").transformer
    want = [name for name, m in den.named_modules()
            if name.startswith("transformer_blocks.") and isinstance(m, torch.nn.Linear)]
    names = PIXART.block_layer_names(den)
    assert names == want and len(names) == len(set(names)) > 0
    assert all(isinstance(den.get_submodule(n), torch.nn.Linear) for n in names)
