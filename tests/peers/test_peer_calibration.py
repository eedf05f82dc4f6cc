"""A peer that is the first variant to need the calibration set collects it with its fresh float copy in the
pipeline: the benchmark has moved the pipeline's own denoiser off the device by then (on a GPU, running the
pipeline with it failed with 'Input type (CUDABFloat16Type) and weight type (CPUBFloat16Type)')."""
import copy

import pytest
import torch
from torch import nn

from diffptq.config import CalibConfig
from diffptq.data.calib import calibration_set
from diffptq.models import family_of, load_pipeline
from diffptq.peers import PEERS
from diffptq.run.benchmark import SharedCalibration
from diffptq.run.benchmark_peers import prepare_peer

CFG = CalibConfig(n_calib=2, calib_steps=2, batch_size=2)


class _Away(nn.Module):
    """Stands for the pipeline's own denoiser while it sits on another device: running it is an error."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config, self.dtype, self.device = config, torch.float32, torch.device("cpu")

    def forward(self, *args, **kwargs):
        raise RuntimeError("the pipeline's own denoiser is off the device")


class _RecordingPeer:
    """A peer that counts the calibration records it is fed and the device of the model it quantizes."""

    name, wbits, abits = "test:recording", 4, 8

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def require(self) -> None:
        pass

    def version(self) -> str:
        return "0"

    def quantize(self, denoiser: nn.Module, inputs, device) -> str:
        self.seen = list(inputs)
        return f"{len(self.seen)} records on {next(denoiser.parameters()).device}"


def test_a_peer_first_to_need_calibration_collects_it_with_its_float_copy(monkeypatch):
    pipe = load_pipeline("tiny-dit", dtype=torch.float32, device="cpu")
    family = family_of(pipe)
    reference, _ = calibration_set(pipe, CFG, False)  # the float pipeline's records, collected independently
    fp_cpu = copy.deepcopy(family.denoiser(pipe))
    away = _Away(fp_cpu.config)
    setattr(pipe, family.denoiser_attr, away)
    with pytest.raises(RuntimeError, match="off the device"):  # what a peer met before: the pipeline cannot run
        calibration_set(pipe, CFG, False)

    peer = _RecordingPeer()
    monkeypatch.setitem(PEERS, peer.name, peer)
    calib = SharedCalibration(pipe, CFG, progress=False)
    denoiser, info = prepare_peer(fp_cpu, peer.name, calib, torch.device("cpu"), torch.float32)
    assert denoiser is not None, info["note"]
    assert info["note"] == f"{len(reference)} records on cpu" and info["calib_time_s"] >= 0
    assert getattr(pipe, family.denoiser_attr) is away  # the pipeline's own denoiser is put back
    assert len(peer.seen) == len(reference) > 0
    for got, want in zip(peer.seen, reference.batches("cpu")):
        assert got.keys() == want.keys()
        for key, value in want.items():
            if torch.is_tensor(value):
                torch.testing.assert_close(got[key], value, rtol=0, atol=0)
