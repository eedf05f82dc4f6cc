"""benchmarks/fp8_attention_quality.py on bundled-dit (4 images, CPU reference): the exact and FP8 rows with their
intervals, the header facts, and a model without the bundled evaluator refused as one line."""
import csv
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script():
    path = ROOT / "benchmarks" / "fp8_attention_quality.py"
    spec = importlib.util.spec_from_file_location("fp8_attention_quality", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_intervals_and_header(tmp_path):
    out = tmp_path / "q.md"
    _script().main(["--models", "bundled-dit", "--n_images", "4", "--batch_size", "4", "--device", "cpu",
                    "--out", str(out)])
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [r["attention"] for r in rows] == ["exact", "fp8 self-attention"]
    exact, fp8 = rows
    assert exact["psnr"] == "" and int(exact["switched"]) == 0 and int(fp8["switched"]) > 0
    assert 30 < float(fp8["psnr_lo"]) <= float(fp8["psnr"]) <= float(fp8["psnr_hi"]) < 100
    assert float(fp8["acc_lo"]) <= float(fp8["prompt_acc"]) <= float(fp8["acc_hi"])
    text = out.read_text()
    assert "(2" in text.splitlines()[0] and "CPU, float32" in text.splitlines()[0]
    assert "python benchmarks/fp8_attention_quality.py --models bundled-dit" in text


def test_a_model_without_the_evaluator_is_refused(capsys):
    with pytest.raises(SystemExit) as err:
        _script().parse_args(["--models", "tiny-dit"])
    assert err.value.code == 2 and "'tiny-dit' is not a bundled model" in capsys.readouterr().err
