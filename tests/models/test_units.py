"""Sequential units: the UNet's blocks split into ResNets, transformer blocks and resamplers."""
import torch

from diffptq.models import PIXART, SD, load_pipeline
from diffptq.models.families import QUANTIZABLE_TYPES


def _layers(den, prefix):
    return {n for n, m in den.named_modules() if n.startswith(prefix + ".") and isinstance(m, QUANTIZABLE_TYPES)}


def test_fine_unet_units_cover_each_block_in_order():
    den = load_pipeline("bundled-unet").unet
    blocks = SD.blocks(den)
    units = SD.units(den)
    assert len(units) > len(blocks)
    assert [u.block for u in units] == sorted(u.block for u in units)  # forward order, grouped by block
    for k, (name, _) in enumerate(blocks):
        mine = [u for u in units if u.block == k]
        assert all(u.name.startswith(name + ".") for u in mine)
        covered = set().union(*(_layers(den, u.name) for u in mine))
        assert covered == _layers(den, name), name  # every quantizable layer of the block is in one of its units
    # only up-block ResNets read a skip tensor (the one they concatenate); the rest pass skips through
    assert {u.name.rsplit(".", 2)[-2] for u in units if u.skips_read} == {"resnets"}
    assert all(u.name.startswith("up_blocks.") for u in units if u.skips_read)
    assert [u.name for u in SD.units(den, fine=False)] == [n for n, _ in blocks]


def test_pixart_units_are_its_blocks():
    den = load_pipeline("tiny-dit").transformer
    assert [(u.name, u.block) for u in PIXART.units(den)] == [(n, k) for k, (n, _) in enumerate(PIXART.blocks(den))]


def test_up_blocks_with_freeu_stay_whole_and_still_match():
    pipe = load_pipeline("bundled-unet")
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    den = pipe.unet
    units = SD.units(den)
    ups = [u.name for u in units if u.name.startswith("up_blocks.")]
    assert ups == [f"up_blocks.{i}" for i in range(len(den.up_blocks))]
    assert all(u.skips_read == len(den.up_blocks[i].resnets)
               for i, u in enumerate(u for u in units if u.name.startswith("up_blocks.")))
    g = torch.Generator().manual_seed(0)
    size = den.config.sample_size
    inputs = {"sample": torch.randn(2, 4, size, size, generator=g), "timestep": torch.tensor([10, 900]),
              "encoder_hidden_states": torch.randn(2, 8, den.config.cross_attention_dim, generator=g)}
    with torch.no_grad():
        ref = den(**inputs, return_dict=False)[0]
        out = SD.forward_unrolled(den, inputs, fine=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
