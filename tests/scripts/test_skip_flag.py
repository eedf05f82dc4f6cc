"""--skip: block layers left in float by name pattern (glob or re:REGEX), shared by the quantization scripts; bad
patterns are refused at parse time; the driver leaves the matching layers as they were."""
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from diffptq.cli import sequential_config

ROOT = Path(__file__).resolve().parents[2]


def _parse(name: str):
    spec = importlib.util.spec_from_file_location(f"skip_{name}", ROOT / "qronos_diffusion" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args


@pytest.mark.parametrize("name", ["quantize_qronos_4blocks", "benchmark_final"])
def test_skip_patterns_parse_into_the_config_and_bad_ones_are_refused(name, capsys):
    parse = _parse(name)
    assert sequential_config(parse([]), method="rtn", wbits=4, abits=8).skip == ()
    cfg = sequential_config(parse(["--skip", "re:conv, *.ff.*"]), method="rtn", wbits=4, abits=8)
    assert cfg.skip == ("re:conv", "*.ff.*")
    for bad, why in (("re:(", "not a valid regular expression"), ("a,,b", "layer-name patterns"), ("re:", "patterns")):
        with pytest.raises(SystemExit) as err:
            parse(["--skip", bad])
        assert err.value.code == 2 and why in capsys.readouterr().err


def test_skipped_layers_stay_float_in_the_unet():
    """'re:conv|proj_in|proj_out' names every Conv2d among tiny-unet's block layers (resnet convs and the 1×1
    projections): all stay the float nn.Conv2d they were, the Linear layers are quantized."""
    from diffptq.algo.driver import SequentialQuantizer
    from diffptq.config import SequentialConfig
    from diffptq.data.calib import collect_calibration
    from diffptq.models import family_of, load_pipeline
    from diffptq.quant.layers import QuantConv2d, QuantLinear, quant_layers

    pipe = load_pipeline("tiny-unet")
    fam = family_of(pipe)
    den = fam.denoiser(pipe)
    convs = {n: den.get_submodule(n).weight.detach().clone() for n in fam.block_layer_names(den)
             if type(den.get_submodule(n)) is nn.Conv2d}
    calib = collect_calibration(pipe, ["a red cat", "a dog"], 2, batch_size=2, progress=False)
    cfg = SequentialConfig(method="rtn", skip=("re:conv|proj_in|proj_out",)).with_bits(4, 8)
    SequentialQuantizer(den, fam, calib, cfg, "cpu", progress=False).run()
    layers = dict(quant_layers(den))
    assert convs and not any(isinstance(m, QuantConv2d) for m in layers.values())
    assert any(isinstance(m, QuantLinear) and m.is_quantized for m in layers.values())
    for name, weight in convs.items():
        assert type(den.get_submodule(name)) is nn.Conv2d and torch.equal(den.get_submodule(name).weight, weight)


def test_our_rows_state_non_default_recipe_flags_in_their_note_alike_from_the_config_and_the_flags():
    """benchmark_final's rows of ours carry recipe_note of their SequentialConfig; merge_runs derives the same note
    from an older run's recorded flags: both must read the same for the same command line."""
    from diffptq.run.benchmark import _recipe_settings
    from diffptq.run.benchmark_report import recipe_note

    parse = _parse("benchmark_final")
    flags = ["--skip", "re:conv", "--lowrank_conv", "--group_size", "64"]
    cfg = sequential_config(parse(flags), method="gptq", wbits=4, abits=8)
    assert recipe_note(_recipe_settings(cfg)) == "skip re:conv; lowrank_conv; group_size 64"
    assert recipe_note(vars(parse(flags))) == "skip re:conv; lowrank_conv; group_size 64"
    assert recipe_note(_recipe_settings(sequential_config(parse([]), method="gptq", wbits=4, abits=8))) == ""
    assert recipe_note(vars(parse([]))) == ""
