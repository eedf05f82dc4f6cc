"""What the GPU kernel micro-benchmarks (int4_gemm.py, fp8_attention_speed.py, fp8_gemm.py) share: their size flags,
the timing of one call (optionally replayed from a CUDA graph), and the loop that measures shape after shape and
rewrites the markdown and CSV after each."""
from __future__ import annotations

import argparse
from collections.abc import Callable


def sizes(text: str, flag: str, n: int) -> list[tuple[int, ...]]:
    """'AxB,...' (n numbers per item) -> [(A, B), ...] of positive integers; argparse's error otherwise."""
    out = []
    for item in (t for t in text.split(",") if t):
        parts = item.lower().split("x")
        if len(parts) != n or not all(p.isdigit() and int(p) > 0 for p in parts):
            form = "x".join("ABCD"[:n])
            raise argparse.ArgumentTypeError(f"{flag}: {item!r} is not {form} with positive integers")
        out.append(tuple(int(p) for p in parts))
    return out


PIXART_GEMM_SHAPES = "3456x1152,1152x1152,4608x1152,1152x4608"  # N x K of PixArt-XL-2's block layers


def add_gemm_size_flags(p: argparse.ArgumentParser, shapes_help: str) -> None:
    """--tokens (M, the rows of x; converted with int_list after parsing) and --shapes (NxK weight shapes, default
    PixArt-XL-2's), the sizes of the GEMM micro-benchmarks."""
    p.add_argument("--tokens", default="1024,4096,16384", help="comma list of M (rows of x)")
    p.add_argument("--shapes", type=lambda t: sizes(t, "--shapes", 2), default=PIXART_GEMM_SHAPES, help=shapes_help)


def int_list(p: argparse.ArgumentParser, text: str, flag: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3]; the parser's usage error otherwise."""
    try:
        return [int(t) for t in text.split(",") if t]
    except ValueError:
        p.error(f"argument {flag}: a comma list of integers, got {text!r}")


def time_us(fn: Callable[[], object]) -> float:
    """Median microseconds of one call of `fn` (triton.testing.do_bench: warm-up, L2 flushed between calls)."""
    import triton.testing

    return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def graph_replay(fn: Callable[[], object], warmup: int = 3) -> Callable[[], object]:
    """`fn` as one CUDA graph: at the first call, `warmup` calls on a side stream (compilation, cuBLAS workspaces),
    then one captured call; every call replays it and returns the captured output tensor (overwritten per replay).
    Timing the replay leaves out the host's cost per call, which dominates small compiled calls."""
    from diffptq.kernels.graphs import capture_graph

    state: dict = {}

    def call():
        if "graph" not in state:
            state["graph"], state["out"] = capture_graph(fn, (), {}, warmup, None)
        state["graph"].replay()
        return state["out"]

    return call


def timed_rows(rows: dict[str, Callable], base: dict, reference: str, check: Callable[[str, object], dict],
               ratio: str) -> list[dict]:
    """One table row per named call: `base` fields, check(name, output) (e.g. rel_err), `us`, and `ratio` = the
    reference row's µs over this row's (the reference first in `rows`). A call that fails keeps its reason in `note`."""
    out, ref_us = [], None
    for name, fn in rows.items():
        row = {**base, "row": name}
        try:
            row.update(check(name, fn()))
            row["us"] = time_us(fn)
        except Exception as err:  # a launch the card cannot take (shared memory, registers): the row says so
            row["note"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        if name == reference:
            ref_us = row.get("us")
        row[ratio] = ref_us / row["us"] if ref_us and row.get("us") else None
        out.append(row)
    return out


def run_jobs(script: str, title: str, explanation: str, columns: tuple[str, ...], out_flag: str,
             jobs: list[Callable[[], list[dict]]], argv, requirement: Callable[[], str | None] = lambda: None) -> None:
    """Run every job (one shape each) on the CUDA device, rewriting --out (markdown: card, versions, commit, command,
    the table) and the CSV beside it after each; one-line error without CUDA or when `requirement()` names what is
    missing."""
    import torch

    from diffptq.cli import check_output_file
    from diffptq.cli.common import report_header, report_meta
    from diffptq.errors import ConfigError
    from diffptq.eval.report import markdown_table, write_csv
    from diffptq.io.files import write_text_atomic

    if not torch.cuda.is_available():
        raise ConfigError(f"{script.rsplit('/', 1)[-1]} times CUDA kernels: no CUDA device here")
    missing = requirement()
    if missing:
        raise ConfigError(f"{script.rsplit('/', 1)[-1]} needs {missing}")
    out = check_output_file(out_flag, "--out")
    meta = report_meta(script, argv, torch.device("cuda"), torch.bfloat16, ("torch", "triton"))
    rows: list[dict] = []
    for job in jobs:
        rows += job()
        write_csv(rows, out.with_suffix(".csv"), [*columns, "note"])
        write_text_atomic(out, "\n".join([*report_header(title, meta), explanation, "",
                                          markdown_table(rows, [*columns, "note"]), ""]))
    print(out.read_text())
