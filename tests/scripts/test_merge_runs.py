"""benchmarks/merge_runs.py: several benchmark_final runs of one model, prompts and seeds become one table with one FP
row and benchmark_final's tie marks; runs that are not comparable are refused in one line, with nothing written."""
import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from diffptq.run.benchmark_report import ALL_COLUMNS, TIE_LEGEND

ROOT = Path(__file__).resolve().parents[2]
ARGS = {"model": "bundled-dit", "n_images": 512, "num_inference_steps": 20, "scheduler": "default", "seed": 0,
        "prompts": None, "guidance_scale": None, "dtype": "bf16", "n_calib": 32, "calib_steps": 10,
        "calib_batch_size": 8, "calib_prompts": None}


def _script():
    spec = importlib.util.spec_from_file_location("merge_runs", ROOT / "benchmarks" / "merge_runs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _row(method, wbits, abits, acc, lo, hi, **extra):
    return {"method": method, "dtype": "bf16", "wbits": wbits, "abits": abits, "model": "bundled-dit",
            "n_images": 512, "prompt_acc": acc, "prompt_acc_lo": lo, "prompt_acc_hi": hi, "fid_bundled": 0.0,
            "model_size_gb": 0.0067 if method == "fp" else 0.0023, **extra}


def _run(folder: Path, rows: list[dict], command: str, **changed) -> Path:
    folder.mkdir(parents=True)
    with (folder / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ALL_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    (folder / "config.json").write_text(json.dumps({"args": {**ARGS, **changed}, "command": command,
                                                    "gpu": "NVIDIA H200", "versions": {"torch": "2.11.0"},
                                                    "time": "2026-12-02T07:00:00", "git_commit": "abc1234"}))
    return folder


FP = _row("fp", "", "", 0.93, 0.904, 0.949)


def _main(module, argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        module.run_main(lambda: module.main(argv))
    return exit_info.value.code, capsys.readouterr().err


def test_runs_become_one_table_with_one_fp_row_and_the_tie_marks(tmp_path):
    ours = _run(tmp_path / "ours", [FP, _row("gptq", 4, 8, 0.90, 0.871, 0.923), _row("qronos", 4, 8, 0.906, 0.878,
                                                                                         0.929)], "ours")
    peers = _run(tmp_path / "peers", [FP, _row("torchao:int8da_int4w", 4, 8, 0.70, 0.66, 0.74, peer_version="0.18.0"),
                                      _row("quanto:w4a8", 4, 8, "", "", "", note="needs optimum-quanto")], "peers")
    out = tmp_path / "table.md"
    _script().main([str(ours), str(peers), "--out", str(out)])
    with out.with_suffix(".csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
        assert list(rows[0]) == list(ALL_COLUMNS)
    assert [r["method"] for r in rows] == ["fp", "gptq", "qronos", "torchao:int8da_int4w", "quanto:w4a8"]
    assert rows[3]["peer_version"] == "0.18.0" and rows[4]["note"] == "needs optimum-quanto" and rows[4]["psnr"] == ""
    text = out.read_text()
    assert "```\nours\npeers\n```" in text and "NVIDIA H200" in text and TIE_LEGEND in text
    marks = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "0.906 ★" in marks["qronos"] and "0.9 ≈" in marks["gptq"]  # the peer's interval does not reach it
    assert "★" not in marks["torchao:int8da_int4w"] and "≈" not in marks["torchao:int8da_int4w"]


@pytest.mark.parametrize("case,message", [
    ("setting", "ran with n_images=256"),
    ("fp", "disagree on prompt_acc (0.93 vs 0.92)"),
    ("missing", "no metrics.csv"),
])
def test_runs_that_are_not_one_table_are_refused_in_one_line(tmp_path, capsys, case, message):
    ours = _run(tmp_path / "ours", [FP, _row("gptq", 4, 8, 0.9, 0.87, 0.92)], "ours")
    if case == "setting":
        other = _run(tmp_path / "other", [FP], "other", n_images=256)
    elif case == "fp":
        other = _run(tmp_path / "other", [_row("fp", "", "", 0.92, 0.89, 0.94)], "other")
    else:
        other = tmp_path / "other"
        other.mkdir()
        (other / "config.json").write_text("{}")
    out = tmp_path / "table.md"
    code, err = _main(_script(), [str(ours), str(other), "--out", str(out)], capsys)
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and message in lines[0], err
    assert not out.exists() and not out.with_suffix(".csv").exists()


def _base_table(tmp_path) -> Path:
    """A table merge_runs.py wrote: ours and a peer run whose brevitas row failed."""
    ours = _run(tmp_path / "ours", [FP, _row("qronos", 4, 8, 0.906, 0.878, 0.929)], "cmd-ours")
    peers = _run(tmp_path / "peers", [FP, _row("brevitas:qronos", 4, 8, "", "", "", note="quantize failed: X"),
                                      _row("quanto:w4a8", 4, 8, 0.70, 0.66, 0.74)], "cmd-peers")
    table = tmp_path / "table.md"
    _script().main([str(ours), str(peers), "--out", str(table)])
    return table


def test_base_table_gets_the_failed_row_replaced_and_new_rows_appended_with_its_commands_kept(tmp_path):
    table = _base_table(tmp_path)
    later = _run(tmp_path / "later", [FP, _row("brevitas:qronos", 4, 8, 0.85, 0.82, 0.88, peer_version="0.13.4"),
                                      _row("torchao:int4wo", 4, 16, 0.9, 0.87, 0.92)], "cmd-later")
    out = tmp_path / "table2.md"
    _script().main([str(later), "--base", str(table.with_suffix(".csv")), "--out", str(out)])
    with out.with_suffix(".csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["fp", "qronos", "brevitas:qronos", "quanto:w4a8", "torchao:int4wo"]
    assert rows[2]["prompt_acc"] == "0.85" and rows[2]["note"] == "" and rows[2]["peer_version"] == "0.13.4"
    assert "```\ncmd-ours\ncmd-peers\ncmd-later\n```" in out.read_text()


def test_a_later_run_of_an_earlier_command_is_listed_once_and_said_to_be_run_again(tmp_path):
    table = _base_table(tmp_path)
    again = _run(tmp_path / "again", [FP, _row("quanto:w4a8", 4, 8, 0.88, 0.85, 0.91)], "cmd-peers")
    out = tmp_path / "table2.md"
    _script().main([str(again), "--base", str(table.with_suffix(".csv")), "--out", str(out)])
    text = out.read_text()
    assert "```\ncmd-ours\ncmd-peers\n```" in text
    assert "1 later run(s) of the same model, prompts, seeds and calibration set added, 1 of them an earlier " \
           "command run again (listed once)" in text


@pytest.mark.parametrize("change,message", [
    ({"fp_acc": 0.92}, "disagree on prompt_acc (0.93 vs 0.92)"),
    ({"n_images": 256}, "ran with n_images=256"),
])
def test_a_run_that_does_not_fit_the_base_table_is_refused(tmp_path, capsys, change, message):
    table = _base_table(tmp_path)
    fp = _row("fp", "", "", change.get("fp_acc", 0.93), 0.89, 0.95)
    settings = {"n_images": change["n_images"]} if "n_images" in change else {}
    later = _run(tmp_path / "later", [fp, _row("torchao:int4wo", 4, 16, 0.9, 0.87, 0.92)], "cmd-later", **settings)
    out = tmp_path / "table2.md"
    code, err = _main(_script(), [str(later), "--base", str(table.with_suffix(".csv")), "--out", str(out)], capsys)
    assert code != 0 and message in err.strip().splitlines()[-1] and not out.exists(), err


def test_a_missing_base_table_is_one_line(tmp_path, capsys):
    later = _run(tmp_path / "later", [FP], "cmd-later")
    out = tmp_path / "table.md"
    code, err = _main(_script(), [str(later), "--base", str(tmp_path / "none.csv"), "--out", str(out)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "none.csv: no such file" in lines[0] and not out.exists()


def test_our_rows_with_other_recipe_flags_are_added_beside_the_default_ones_with_the_flags_in_their_note(tmp_path):
    table = _base_table(tmp_path)
    ours_default = _row("qronos", 4, 8, 0.9, 0.87, 0.92, source="quantized")
    later = _run(tmp_path / "later", [FP, ours_default], "cmd-later", skip=["re:conv"], lowrank_conv=True)
    out = tmp_path / "table2.md"
    _script().main([str(later), "--base", str(table.with_suffix(".csv")), "--out", str(out)])
    with out.with_suffix(".csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["fp", "qronos", "brevitas:qronos", "quanto:w4a8", "qronos"]
    assert rows[1]["note"] == "" and rows[4]["note"] == "skip re:conv; lowrank_conv"
