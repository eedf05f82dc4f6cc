"""--rotate / --rotate_conv / --rotate_seed: one definition (diffptq.cli.add_rotation_args) shared by the quantization
scripts; refused by name, before any output, where a script cannot rotate (the TDQ scripts) or the flags conflict."""
import importlib.util
from pathlib import Path

import pytest

from diffptq.cli import sequential_config

ROOT = Path(__file__).resolve().parents[2]


def _script(folder: str, name: str):
    spec = importlib.util.spec_from_file_location(f"{folder}_{name}".replace("-", "_"), ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _exit(module, argv, capsys) -> tuple[int, str]:
    """Run the script's main through run_main as the command line would; returns (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        module.run_main(lambda: module.main(argv))
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("name", ["quantize_qronos_4blocks", "benchmark_final"])
def test_quantization_scripts_share_the_rotation_flags(name):
    parse = _script("qronos_diffusion", name).parse_args
    default = parse([])
    assert (default.rotate, default.act_quant, default.rotate_seed, default.rotate_conv) == ("auto", "auto", 0, False)
    cfg = sequential_config(default, method="rtn", wbits=4, abits=8)
    assert (cfg.rotate, cfg.act_kind, cfg.rotate_seed, cfg.rotate_conv) == (None, "static", 0, False)
    given = sequential_config(parse(["--rotate", "hadamard", "--rotate_seed", "5", "--rotate_conv"]), method="rtn",
                              wbits=4, abits=8)
    assert (given.rotate, given.rotate_seed, given.rotate_conv) == ("hadamard", 5, True)
    with pytest.raises(SystemExit):
        parse(["--rotate", "givens"])


@pytest.mark.parametrize("name", ["quantize_qronos_4blocks", "benchmark_final"])
def test_default_flags_give_the_low_bit_recipe_at_a4_only(name):
    """Left at auto, --act_quant / --rotate follow the activation bits: per-token activations behind a Hadamard
    rotation at 4 bits and below (static per-tensor A4 collapses), static and unrotated at 8; a flag given wins."""
    parse = _script("qronos_diffusion", name).parse_args
    kinds = {}
    for argv in ([], ["--act_quant", "static"], ["--rotate", "none"], ["--act_quant", "dynamic", "--rotate", "none"]):
        base = sequential_config(parse(argv), method="qronos", wbits=4, abits=8)
        kinds[tuple(argv)] = [(c.act_kind, c.rotate) for c in (base.with_bits(4, 4), base.with_bits(4, 3),
                                                              base.with_bits(4, 8), base.with_bits(4, 16))]
    assert kinds[()] == [("dynamic", "hadamard"), ("dynamic", "hadamard"), ("static", None), ("static", None)]
    assert kinds[("--act_quant", "static")] == [("static", "hadamard"), ("static", "hadamard"), ("static", None),
                                                ("static", None)]
    assert kinds[("--rotate", "none")] == [("dynamic", None), ("dynamic", None), ("static", None), ("static", None)]
    assert kinds[("--act_quant", "dynamic", "--rotate", "none")] == [("dynamic", None)] * 4


@pytest.mark.parametrize("name", ["quantize_qronos_4blocks", "benchmark_final"])
def test_default_lowrank_is_the_rank_32_branch_at_a4_only(name, capsys):
    """Left at auto, --lowrank keeps a rank-32 16-bit branch out of each Linear at 4-bit activations and below (the
    W4A4 recipes table: +3.5-4.5 dB on bundled-dit) and none above; a number given holds at every bit width."""
    from diffptq.config import RECIPE_LOWRANK

    parse = _script("qronos_diffusion", name).parse_args
    ranks = {}
    for argv in ([], ["--lowrank", "auto"], ["--lowrank", "0"], ["--lowrank", "8"]):
        base = sequential_config(parse(argv), method="gptq", wbits=4, abits=8)
        ranks[tuple(argv)] = [base.with_bits(4, a).lowrank for a in (4, 3, 8, 16)]
    assert RECIPE_LOWRANK == 32
    assert ranks[()] == ranks[("--lowrank", "auto")] == [32, 32, 0, 0]
    assert ranks[("--lowrank", "0")] == [0, 0, 0, 0]
    assert ranks[("--lowrank", "8")] == [8, 8, 8, 8]
    with pytest.raises(SystemExit):
        parse(["--lowrank", "-1"])
    assert "argument --lowrank:" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["quantize_qronos_4blocks", "benchmark_final"])
def test_default_correction_is_a_quarter_at_a4_only(name, capsys):
    """Left at auto, --correction lets Qronos correct a quarter of the upstream error at 4-bit activations and below
    (as published it loses to GPTQ there: docs/ALGORITHMS.md §6) and all of it above; a value given holds."""
    from diffptq.config import RECIPE_CORRECTION

    parse = _script("qronos_diffusion", name).parse_args
    got = {}
    for argv in ([], ["--correction", "auto"], ["--correction", "1"], ["--correction", "0.5"]):
        base = sequential_config(parse(argv), method="qronos", wbits=4, abits=8)
        got[tuple(argv)] = [base.with_bits(4, a).correction for a in (4, 3, 8, 16)]
    assert RECIPE_CORRECTION == 0.25
    assert got[()] == got[("--correction", "auto")] == [0.25, 0.25, 1.0, 1.0]
    assert got[("--correction", "1")] == [1.0] * 4 and got[("--correction", "0.5")] == [0.5] * 4
    for bad in ("1.5", "-0.1", "half"):
        with pytest.raises(SystemExit):
            parse(["--correction", bad])
        assert "argument --correction:" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["quantize_qronos_4blocks", "benchmark_final"])
def test_rotate_conv_without_a_rotation_is_refused(name, tmp_path, capsys):
    code, err = _exit(_script("qronos_diffusion", name), ["--model", "tiny-dit", "--rotate_conv",
                                                          "--out_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "--rotate_conv rotates Conv2d inputs as well: it needs --rotate hadamard" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("folder", ["LogSnr-DiT", "LogSnr-Unet"])
@pytest.mark.parametrize("name", ["calibrate_snr", "evaluate_compare"])
def test_tdq_scripts_refuse_rotate_with_the_reason(folder, name, tmp_path, capsys):
    code, err = _exit(_script(folder, name), ["--model", "tiny-dit" if folder.endswith("DiT") else "tiny-unet",
                                              "--rotate", "hadamard", "--out_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "Traceback" not in err
    assert "--rotate hadamard: the TDQ scripts do not rotate layer inputs" in err
    assert not (tmp_path / "o").exists()  # refused before the output folder or the model


def test_granularity_flag_reaches_the_sequential_config():
    parse = _script("qronos_diffusion", "quantize_qronos_4blocks").parse_args
    assert sequential_config(parse([])).granularity == "unit"
    assert sequential_config(parse(["--granularity", "block"]), blocks=[0]).granularity == "block"
    with pytest.raises(SystemExit):
        parse(["--granularity", "layer"])
