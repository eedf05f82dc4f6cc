"""benchmarks/kernel_bench.py, what the GPU kernel micro-benchmarks share: size flags, rows that keep a failing call's
reason, and the one-line refusal without CUDA (nothing written)."""
import argparse

import pytest
import torch


@pytest.fixture(scope="module")
def kb(benchmark_script):
    return benchmark_script("kernel_bench")


def test_sizes_parse_and_refuse_bad_items(kb):
    assert kb.sizes("3456x1152,1152X4608", "--shapes", 2) == [(3456, 1152), (1152, 4608)]
    assert kb.sizes("", "--tiles", 3) == []
    for text, n in (("3x4", 3), ("0x4", 2), ("ax4", 2)):
        with pytest.raises(argparse.ArgumentTypeError, match="with positive integers"):
            kb.sizes(text, "--shapes", n)


def test_timed_rows_keep_a_failure_as_a_note(kb, monkeypatch):
    monkeypatch.setattr(kb, "time_us", lambda fn: 10.0 if fn() == "ref" else 5.0)

    def boom():
        raise RuntimeError("out of shared memory\nmore")

    rows = kb.timed_rows({"ref": lambda: "ref", "fast": lambda: "fast", "bad": boom}, {"M": 4}, "ref",
                         lambda name, y: {"seen": y}, "ratio")
    assert [r["row"] for r in rows] == ["ref", "fast", "bad"] and rows[1]["seen"] == "fast"
    assert rows[0]["ratio"] == 1.0 and rows[1]["ratio"] == 2.0 and rows[1]["M"] == 4
    assert rows[2]["note"] == "RuntimeError: out of shared memory" and rows[2]["ratio"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("name", ["int4_gemm", "fp8_attention_speed"])
def test_without_cuda_the_scripts_say_so_in_one_line(benchmark_script, name, tmp_path, capsys):
    bench = benchmark_script(name)
    with pytest.raises(SystemExit) as err:
        bench.run_main(lambda: bench.main(["--out", str(tmp_path / "x.md")]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and lines == [f"error: {name}.py times CUDA kernels: no CUDA device here"]
    assert not (tmp_path / "x.md").exists()
