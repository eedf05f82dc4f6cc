"""benchmarks/fp8_gemm.py: its flags and (on an FP8 GPU) rows whose outputs match their fp32 references."""
import pytest

from diffptq.kernels.fp8 import fp8_support


@pytest.fixture(scope="module")
def bench(benchmark_script):
    return benchmark_script("fp8_gemm")


def test_flags_parse_and_bad_ones_are_refused(bench, capsys):
    args = bench.parse_args(["--tokens", "16,32", "--shapes", "256x128"])
    assert args.tokens == [16, 32] and args.shapes == [(256, 128)]
    assert bench.parse_args([]).shapes == [(3456, 1152), (1152, 1152), (4608, 1152), (1152, 4608)]
    for flags, message in ((["--shapes", "256x100"], "needs both dimensions divisible by 16"),
                           (["--shapes", "x4"], "is not AxB"), (["--tokens", "1,b"], "comma list of integers")):
        with pytest.raises(SystemExit) as err:
            bench.parse_args(flags)
        assert err.value.code == 2 and message in capsys.readouterr().err


def test_without_cuda_the_run_is_refused_in_one_line(bench, tmp_path, capsys):
    if fp8_support()[0]:
        pytest.skip("this machine has an FP8 GPU")
    from diffptq.errors import ConfigError

    with pytest.raises(ConfigError, match="fp8_gemm.py times CUDA kernels: no CUDA device here"):
        bench.main(["--tokens", "16", "--shapes", "32x32", "--out", str(tmp_path / "x.md")])


@pytest.mark.skipif(not fp8_support()[0], reason=f"needs FP8 tensor cores: {fp8_support()[1]}")
def test_gpu_rows_match_their_references(bench):
    rows = bench.measure_shape(256, 384, 256)
    by_name = {r["row"]: r for r in rows}
    assert len(by_name) == 7 and by_name["bf16"]["vs_bf16"] == 1.0
    for r in rows:
        assert "note" not in r and r["us"] > 0 and r["rel_err"] < 2e-2, r
