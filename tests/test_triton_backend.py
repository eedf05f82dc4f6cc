"""TritonBackend: the auto | eager | triton choice and the fall-back-once shared by the Triton kernels."""
import logging

import pytest

from diffptq.triton_backend import TritonBackend


def _backend(available=True):
    return TritonBackend("DIFFPTQ_TEST_KERNEL", "test kernel", lambda: available)


def test_choice_follows_argument_then_environment(monkeypatch):
    b = _backend()
    monkeypatch.delenv("DIFFPTQ_TEST_KERNEL", raising=False)
    assert b.choose(usable=True) == "triton" and b.choose(usable=False) == "eager"
    monkeypatch.setenv("DIFFPTQ_TEST_KERNEL", "eager")
    assert b.choose(usable=True) == "eager"
    assert b.choose(usable=True, backend="triton") == "triton"  # the argument wins
    monkeypatch.setenv("DIFFPTQ_TEST_KERNEL", "triton")
    assert b.choose(usable=False) == "triton"  # forced: the caller's inputs decide nothing
    monkeypatch.setenv("DIFFPTQ_TEST_KERNEL", "gpu")
    with pytest.raises(ValueError, match=r"test kernel backend \(DIFFPTQ_TEST_KERNEL\) must be one of"):
        b.choose(usable=True)


def test_without_triton_auto_is_eager_and_forcing_raises(monkeypatch):
    b = _backend(available=False)
    monkeypatch.delenv("DIFFPTQ_TEST_KERNEL", raising=False)
    assert b.choose(usable=True) == "eager"
    with pytest.raises(RuntimeError, match="not installed"):
        b.choose(usable=True, backend="triton")


def test_a_failure_under_auto_falls_back_for_good_and_a_forced_one_raises(monkeypatch, caplog):
    b = _backend()
    monkeypatch.delenv("DIFFPTQ_TEST_KERNEL", raising=False)
    err = RuntimeError("no GPU compiler")
    with pytest.raises(RuntimeError, match="no GPU compiler"):
        b.fall_back(err, backend="triton")
    assert b.broken is None
    with caplog.at_level(logging.WARNING, logger="diffptq.triton_backend"):
        b.fall_back(err)
    assert b.broken == "RuntimeError: no GPU compiler" and "test kernel failed" in caplog.text
    assert b.choose(usable=True) == "eager"  # auto never tries again
    assert b.choose(usable=True, backend="triton") == "triton"  # forcing still reaches the kernel
