"""benchmarks/fp8_attention_speed.py: its flags and (on an FP8 GPU) rows whose
outputs match the FP8 reference."""
import pytest
import torch


@pytest.fixture(scope="module")
def bench(benchmark_script):
    return benchmark_script("fp8_attention_speed")


def test_flags_parse_and_bad_ones_are_refused(bench, capsys):
    args = bench.parse_args(["--batches", "2", "--shapes", "4x64x72", "--tiles", ""])
    assert args.batches == [2] and args.shapes == [(4, 64, 72)] and args.tiles == []
    assert bench.parse_args([]).tiles[0] == (64, 4, 3)
    for flags, message in ((["--shapes", "4x64"], "is not AxBxC"), (["--tiles", "96x4x3"], "not a power of two"),
                           (["--batches", "x"], "comma list of integers")):
        with pytest.raises(SystemExit) as err:
            bench.parse_args(flags)
        assert err.value.code == 2 and message in capsys.readouterr().err


def _fp8_gpu() -> bool:
    if not torch.cuda.is_available():
        return False
    from diffptq.kernels.fp8 import fp8_support

    return fp8_support(torch.device("cuda"))[0]


@pytest.mark.skipif(not _fp8_gpu(), reason="needs a CUDA GPU with FP8 tensor cores")
def test_gpu_rows_match_the_reference(bench):
    rows = bench.measure_shape(2, 4, 256, 72, [(128, 8, 3)])
    names = [r["row"] for r in rows]
    assert names[:4] == ["sdpa bf16", "fp8 eager", "fp8 compiled", "fp8 quantize only (compiled)"]
    assert "kernel 64x4x3" in names and "kernel 128x8x3" in names
    for r in rows:
        assert "note" not in r and r["us"] > 0, r
        if r["row"].startswith(("fp8 eager", "fp8 compiled", "kernel")):
            assert r["rel_err"] < 5e-3, r
