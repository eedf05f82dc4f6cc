"""Phase timing of the sequential driver."""
import pytest
import torch

from diffptq.algo.driver.timing import PhaseTimer


def test_phase_timer_sums_phases():
    t = PhaseTimer(torch.device("cpu"))
    for _ in range(3):
        with t("a"):
            pass
    with pytest.raises(RuntimeError), t("b"):
        raise RuntimeError
    assert set(t.totals) == {"a", "b"} and all(v >= 0 for v in t.totals.values())
