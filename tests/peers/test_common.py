"""The adapters' shared helpers and ModelOpt's per-layer config (plain dicts: no peer library needed)."""
import pytest
from torch import nn

from diffptq.models import family_of, load_pipeline
from diffptq.peers import PeerFailed
from diffptq.peers.common import Replay, block_layers, fitting_group, forward_all
from diffptq.peers.modelopt import block_config


def test_fitting_group():
    assert fitting_group(1152, 128) == 128 and fitting_group(320, 128) == 64 and fitting_group(5120, 128) == 128
    assert fitting_group(16, 128) == 16 and fitting_group(96, 128) == 96  # a whole row at most `preferred` wide
    assert fitting_group(200, 128) is None and fitting_group(200, 128, smallest=8) == 8  # 200 = 8 · 25
    assert fitting_group(8, 128) is None
    assert fitting_group(96, 128, 32, whole_row=False) == 32 and fitting_group(64, 128, whole_row=False) == 64


def test_torchao_int4_weight_only_groups_divide_its_padded_rows():
    """tinygemm pads every row to a multiple of 1024 inputs: a 96-wide layer in one group of 96 failed there."""
    from diffptq.peers.torchao import layer_group

    for width in (96, 320, 640, 1152, 4608, 32, 1024):
        group = layer_group("int4wo", width, 128)
        assert 1024 % group == 0 and width % group == 0 and 32 <= group <= 128, (width, group)
    assert layer_group("int4wo", 48, 128) is None  # 16 would be needed: below the kernel's smallest group
    assert layer_group("int8da_int4w", 96, 32) == 32 and layer_group("int8da_int4w", 24, 32) == 24


def test_replay_lists_a_one_shot_iterator_and_keeps_a_reiterable():
    once = Replay(iter([{"a": 1}, {"a": 2}]))
    assert list(once) == list(once) == [{"a": 1}, {"a": 2}]
    source = [{"a": 1}]
    assert Replay(source).source is source
    with pytest.raises(PeerFailed, match="empty"):
        forward_all(nn.Identity(), [])


def test_modelopt_config_names_only_block_layers_and_fits_groups():
    pipe = load_pipeline("tiny-unet")
    den = family_of(pipe).denoiser(pipe)
    layers = block_layers(den)
    preset = {"quant_cfg": [{"quantizer_name": "*", "enable": False},
                            {"quantizer_name": "*weight_quantizer",
                             "cfg": {"num_bits": 4, "block_sizes": {-1: 128, "type": "static"}}},
                            {"quantizer_name": "*input_quantizer", "enable": False},
                            {"quantizer_name": "*proj_out*", "enable": False}],  # a preset's model-specific rule
              "algorithm": "awq_lite"}
    config, left = block_config(preset, layers)
    linear = [n for n, m in layers.items() if isinstance(m, nn.Linear)]
    entries = config["quant_cfg"]
    assert entries[0] == {"quantizer_name": "*", "enable": False} and config["algorithm"] == "awq_lite"
    assert [e["quantizer_name"] for e in entries[1:]] == [f"{n}.{q}" for n in linear
                                                          for q in ("weight_quantizer", "input_quantizer")]
    assert left == {"Conv2d (group-wise format)": len(layers) - len(linear), "layers whose width fits no group": 0}
    for entry in entries[1::2]:
        width = layers[entry["quantizer_name"].rsplit(".", 1)[0]].in_features
        assert entry["cfg"]["block_sizes"] == {-1: fitting_group(width, 128), "type": "static"}
    assert preset["quant_cfg"][1]["cfg"]["block_sizes"][-1] == 128  # the preset itself is left as it was
    per_channel = {"quant_cfg": [{"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}}],
                   "algorithm": "max"}
    config, left = block_config(per_channel, layers)
    assert len(config["quant_cfg"]) == 1 + len(layers) and sum(left.values()) == 0  # Conv2d too


@pytest.mark.parametrize("model", ["tiny-dit", "tiny-unet"])
def test_merged_records_give_the_denoiser_the_same_samples_in_fewer_calls(model):
    """Joined records (the UNet's 0-d timestep repeated over its batch, PixArt's dict of Nones kept) are the same
    samples: the denoiser's output on a joined record is its outputs on the records, concatenated."""
    import torch

    from diffptq.data.calib import collect_calibration
    from diffptq.peers.common import merge_records

    pipe = load_pipeline(model)
    den = family_of(pipe).denoiser(pipe)
    calib = collect_calibration(pipe, ["a red cat", "a dog", "a tree", "a car"], 3, batch_size=2, progress=False)
    records = list(calib.batches())  # 6 records of 4 samples (CFG doubles the 2 prompts)
    merged = merge_records(records, 10)
    assert [m[next(iter(m))].shape[0] for m in merged] == [8, 8, 8]  # two records each: a third would make 12
    assert len(merge_records(records, 3)) == 6 and merge_records(records, 3)[0] is records[0]  # too large: alone
    with torch.no_grad():
        joined = den(**merged[1]).sample
        apart = torch.cat([den(**r).sample for r in records[2:4]])
    torch.testing.assert_close(joined, apart, rtol=1e-4, atol=1e-5)


def test_records_of_other_shapes_are_not_joined():
    import torch

    from diffptq.peers.common import merge_records

    a = {"x": torch.zeros(2, 3), "t": torch.tensor(5)}
    b = {"x": torch.zeros(2, 4), "t": torch.tensor(5)}  # another width
    c = {"x": torch.zeros(1, 4), "t": torch.tensor(7)}
    merged = merge_records([a, b, c], 8)
    assert len(merged) == 2 and merged[0] is a
    assert merged[1]["x"].shape == (3, 4) and merged[1]["t"].tolist() == [5, 5, 7]
    with pytest.raises(PeerFailed, match="no batched tensor"):
        merge_records([{"t": torch.tensor(1)}], 8)
