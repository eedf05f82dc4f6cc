"""benchmarks/int4_gemm.py: its flags and (on a GPU) rows whose outputs match the
dequantized layer."""
import pytest
import torch


@pytest.fixture(scope="module")
def bench(benchmark_script):
    return benchmark_script("int4_gemm")


def test_flags_parse_and_bad_ones_are_refused(bench, capsys):
    args = bench.parse_args(["--tokens", "16,32", "--shapes", "256x128", "--tiles", ""])
    assert args.tokens == [16, 32] and args.shapes == [(256, 128)] and args.tiles == [] and args.group == 128
    assert bench.parse_args([]).shapes == [(3456, 1152), (1152, 1152), (4608, 1152), (1152, 4608)]
    for flags, message in ((["--shapes", "256x"], "is not AxB"), (["--shapes", "256x96"], "not a multiple of --group"),
                           (["--tokens", "a"], "comma list of integers")):
        with pytest.raises(SystemExit) as err:
            bench.parse_args(flags)
        assert err.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_rows_match_the_dequantized_layer(bench):
    rows = bench.measure_shape(256, 384, 256, 128, [(64, 64)])
    by_name = {r["row"]: r for r in rows}
    assert {"bf16", "dequant", "dequant compiled", "dequant compiled, weight only", "triton (default 128x128)",
            "tinygemm"} <= set(by_name)
    for r in rows:
        assert "note" not in r and r["us"] > 0 and r["rel_err"] < 1e-2, r
    assert by_name["bf16"]["vs_bf16"] == 1.0
