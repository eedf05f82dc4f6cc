"""PCA rotation with high-precision leading components (--rotate pca --keep K, docs/ALGORITHMS.md §8b): the basis
diagonalises the calibration second moment, the rotation splits it into the leading components and the rest, folding
keeps the float output, the leading channels sit on an 8-bit grid and the rest on the layer's, outlier-heavy inputs
lose less, the driver shares one R per input tensor, and checkpoints store R and reload to bit-identical outputs."""
import pytest
import torch
from torch import nn

from diffptq.algo.gptq import gptq_quantize_ex
from diffptq.algo.hessian import gram_from_inputs
from diffptq.config import QuantSpec, SequentialConfig
from diffptq.errors import ConfigError
from diffptq.quant.act import (
    KEEP_BITS,
    DynamicActQuantizer,
    LeadingActQuantizer,
    StaticActQuantizer,
    keep_leading,
    same_quantization,
)
from diffptq.quant.layers import QuantConfig, QuantLinear, float_mode
from diffptq.quant.rotation import PcaRotation, make_rotation, pca_basis, pca_rotation

pytestmark = pytest.mark.usefixtures("one_thread")
W4, W8, A4, A8 = QuantSpec(4), QuantSpec(8), QuantSpec(4, symmetric=False), QuantSpec(8, symmetric=False)


def _inputs(n=512, width=64, outliers=(3, 17, 40), seed=0):
    """Correlated inputs whose range sits in a few channels, as in diffusion FFN inputs."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(width) + 0.3 * torch.randn(width, width, generator=torch.Generator().manual_seed(99))
    x = torch.randn(n, width, generator=g) @ mix
    x[:, list(outliers)] *= 40.0
    return x


def _grid_values(x, bits):
    """Per-token asymmetric min-max fake quantization at `bits`, written out (range widened to include 0)."""
    lo, hi = x.amin(-1, keepdim=True).clamp_max(0), x.amax(-1, keepdim=True).clamp_min(0)
    qmax = 2 ** bits - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-10)
    zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale * (torch.clamp(torch.round(x / scale) + zero, 0, qmax) - zero)


# ---- the basis ---------------------------------------------------------------------------------------------------
def test_basis_is_orthonormal_and_diagonalises_the_second_moment():
    x = _inputs(n=2000, width=24, outliers=(5,))
    C = x.double().T @ x.double() / x.shape[0]
    R, values = pca_basis(C.float())
    assert R.dtype == torch.float32 and R.shape == (24, 24)
    Rd = R.double()
    torch.testing.assert_close(Rd.T @ Rd, torch.eye(24, dtype=torch.float64), rtol=0, atol=1e-5)
    D = Rd.T @ C @ Rd
    off = D - torch.diag(torch.diagonal(D))
    assert float(off.abs().max()) < 1e-5 * float(D.abs().max())
    d = torch.diagonal(D)
    assert bool((d[:-1] >= d[1:]).all())  # leading components first
    # the same spectrum as the data's singular values (an independent route: SVD of X, not eigh of C)
    torch.testing.assert_close(d, torch.linalg.svdvals(x.double()) ** 2 / x.shape[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(values, d, rtol=1e-5, atol=1e-6)
    top = torch.linalg.svd(x.double(), full_matrices=False).Vh[0]
    assert abs(float(top @ Rd[:, 0])) == pytest.approx(1.0, abs=1e-6)  # the first column is the top direction
    assert float(Rd[:, 0].abs().argmax()) == 5  # ... which the outlier channel dominates


def test_rotation_splits_the_leading_components_from_the_rest_and_spreads_each_part():
    x = _inputs(n=2000, width=24, outliers=(5,))
    C = (x.double().T @ x.double() / x.shape[0])
    values = torch.linalg.eigvalsh(C).flip(0)  # descending, computed apart from pca_basis
    U, _ = pca_basis(C.float())
    R = pca_rotation(C.float(), keep=8, seed=3).double()
    torch.testing.assert_close(R.T @ R, torch.eye(24, dtype=torch.float64), rtol=0, atol=1e-5)
    D = R.T @ C @ R
    assert float(D[:8, 8:].abs().max()) < 1e-5 * float(D.abs().max())  # no energy crosses the split
    # the first 8 channels span the 8 leading components: the same projector as U's first 8 columns
    torch.testing.assert_close(R[:, :8] @ R[:, :8].T, U[:, :8].double() @ U[:, :8].double().T, rtol=0, atol=1e-5)
    # 8 and 16 are powers of two: a signed Hadamard mix gives every channel of a part the part's mean variance
    torch.testing.assert_close(torch.diagonal(D)[:8], values[:8].mean().expand(8), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.diagonal(D)[8:], values[8:].mean().expand(16), rtol=1e-5, atol=1e-6)
    assert float((D[:8, :8] - torch.diag(torch.diagonal(D[:8, :8]))).abs().max()) > 1e-3 * float(values[0])  # mixed
    assert torch.equal(pca_rotation(C.float(), 8, 3), R.float()) and not torch.equal(pca_rotation(C.float(), 8, 4),
                                                                                     R.float())
    torch.testing.assert_close(pca_rotation(C.float(), 100, 3).double() @ pca_rotation(C.float(), 100, 3).double().T,
                               torch.eye(24, dtype=torch.float64), rtol=0, atol=1e-5)  # keep beyond the width


def test_pca_rotation_matches_the_dense_matrix_and_unrotate_inverts():
    R, _ = pca_basis(torch.cov(_inputs(width=16, outliers=(3,)).T))
    rot = PcaRotation(R)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(rot.rotate(x), x @ R, rtol=0, atol=1e-6)
    torch.testing.assert_close(rot.unrotate(rot.rotate(x)), x, rtol=0, atol=1e-5)
    torch.testing.assert_close(rot.matrix(), R.double())
    with pytest.raises(ValueError, match="square"):
        PcaRotation(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="depends on the calibration inputs"):
        make_rotation("pca", 16)
    with pytest.raises(ValueError, match="sequential driver"):
        QuantConfig(rotate="pca")


def test_folding_keeps_the_float_output_and_the_weight_is_w_r():
    lin = nn.Linear(64, 24)
    x = _inputs()
    R = pca_rotation(x.T @ x / x.shape[0], keep=8)
    layer = QuantLinear(lin, DynamicActQuantizer(A4), W4)
    layer.set_rotation(PcaRotation(R))
    torch.testing.assert_close(layer.weight_matrix(), lin.weight.detach() @ R, rtol=0, atol=1e-5)
    with torch.no_grad(), float_mode(layer):
        torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-4)
    assert "rotation.basis" not in layer.state_dict()  # the checkpoint stores it, not the module's state dict


# ---- the leading channels at 8 bits ------------------------------------------------------------------------------
def test_leading_channels_are_on_an_8_bit_grid_and_the_rest_on_the_layers():
    x = _inputs(n=64)
    keep = 10
    aq = keep_leading(DynamicActQuantizer(A4), keep, 64)
    assert isinstance(aq, LeadingActQuantizer) and aq.spec == A4 and KEEP_BITS == 8
    y = aq(x)
    torch.testing.assert_close(y[:, :keep], _grid_values(x[:, :keep], 8), rtol=0, atol=1e-4)
    torch.testing.assert_close(y[:, keep:], _grid_values(x[:, keep:], 4), rtol=0, atol=1e-4)
    lead_levels = [row.unique().numel() for row in y[:, :keep]]
    rest_levels = [row.unique().numel() for row in y[:, keep:]]
    assert max(lead_levels) <= 256 and max(rest_levels) <= 16
    assert max(lead_levels) == keep  # 10 values, all distinct on the fine grid (a 4-bit grid merges some)
    assert min(_grid_values(x[:, :keep], 4)[i].unique().numel() for i in range(64)) < keep


def test_static_parts_calibrate_on_their_own_channels():
    x = _inputs(n=256)
    aq = keep_leading(StaticActQuantizer(A4), 3, 64)
    aq.start_calibration()
    assert torch.equal(aq(x), x)  # observing only
    aq.finish_calibration()
    lead, rest = StaticActQuantizer(A8), StaticActQuantizer(A4)
    lead.observe(x[:, :3])
    rest.observe(x[:, 3:])
    lead.finish_calibration()
    rest.finish_calibration()
    torch.testing.assert_close(aq(x), torch.cat([lead(x[:, :3]), rest(x[:, 3:])], 1), rtol=0, atol=0)
    assert aq(x)[:, :3].unique().numel() <= 256 and aq(x)[:, 3:].unique().numel() <= 16
    twin = keep_leading(StaticActQuantizer(A4), 3, 64)
    twin.load_state_dict(aq.state_dict())  # a checkpoint's state: lead.* and rest.*, marked calibrated
    assert same_quantization(aq, twin) and torch.equal(twin(x), aq(x))
    assert not same_quantization(aq, keep_leading(StaticActQuantizer(A4), 4, 64))


@pytest.mark.parametrize("kind", [DynamicActQuantizer, StaticActQuantizer])
def test_keep_equal_to_the_width_behaves_as_a8(kind):
    x = _inputs()
    lin = nn.Linear(64, 24)
    rot = PcaRotation(pca_rotation(x.T @ x / x.shape[0], keep=64))
    layers = []
    for act in (keep_leading(kind(A4), 64, 64), kind(A8)):
        layer = QuantLinear(nn.Linear(64, 24), act, W4)
        layer.load_state_dict(lin.state_dict(), strict=False)
        layer.set_rotation(rot)
        if kind is StaticActQuantizer:
            act.start_calibration()
            layer(x)
            act.finish_calibration()
        layers.append(layer)
    W = layers[0].weight_matrix()
    res = gptq_quantize_ex(W, gram_from_inputs(rot.rotate(x))[0], W4)
    for layer in layers:
        layer.set_quantized_weight(res.codes, res.scale, res.zero)
    with torch.no_grad():
        torch.testing.assert_close(layers[0](x), layers[1](x), rtol=0, atol=0)
    assert keep_leading(kind(A4), 1000, 64).keep == 64  # K beyond the width: clamped
    assert keep_leading(kind(A4), 0, 64).__class__ is kind  # K = 0: the layer's own quantizer


def _error(x_cal, x_eval, lin, basis, keep: int, weight: QuantSpec, act: QuantSpec | None) -> float:
    """Relative output error on x_eval of `lin` quantized by GPTQ (H from x_cal) with per-token activations, in the
    basis `basis` ("mixed": pca_rotation, "pure": the PCA basis alone, None: no rotation)."""
    layer = QuantLinear(nn.Linear(64, 48), None if act is None else keep_leading(DynamicActQuantizer(act), keep, 64),
                        weight)
    layer.load_state_dict(lin.state_dict(), strict=False)
    C = x_cal.T @ x_cal / x_cal.shape[0]
    if basis is not None:
        layer.set_rotation(PcaRotation(pca_rotation(C, keep) if basis == "mixed" else pca_basis(C)[0]))
    xr = layer.rotation.rotate(x_cal) if basis is not None else x_cal
    res = gptq_quantize_ex(layer.weight_matrix(), gram_from_inputs(layer.quant_input(xr))[0], weight)
    layer.set_quantized_weight(res.codes, res.scale, res.zero)
    with torch.no_grad():
        ref = lin(x_eval)
        return float((layer(x_eval) - ref).norm() / ref.norm())


def test_keep_beats_no_rotation_and_the_unmixed_basis_on_outlier_heavy_inputs():
    """Per-token A4: without a rotation the outlier channels set every token's step; keeping the leading components
    at 8 bits leaves a fine 4-bit grid for the rest. The unmixed PCA basis makes H diagonal, so GPTQ can compensate
    nothing (its W4 error is RTN's); the mixing inside each part gives it correlations back."""
    lin = nn.Linear(64, 48)
    x_cal, x_eval = _inputs(seed=0), _inputs(seed=1)

    def err(basis, keep, weight, act=A4):
        return _error(x_cal, x_eval, lin, basis, keep, weight, act)
    kept = err("mixed", 8, W8)  # activations alone (8-bit weights)
    assert kept < 0.25 * err(None, 0, W8) and kept < 0.5 * err("mixed", 0, W8)
    kept = err("mixed", 8, W4)
    assert kept < 0.6 * err(None, 0, W4) and kept < 0.7 * err("pure", 8, W4)
    assert err("mixed", 8, W4, None) < 0.7 * err("pure", 8, W4, None)  # weights alone (float activations)


# ---- configuration -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,message", [
    ({"keep": 8}, "--keep 8 keeps the leading PCA components at 8 bits: it needs --rotate pca"),
    ({"keep": 8, "rotate": "hadamard"}, "it needs --rotate pca"),
    ({"keep": -1, "rotate": "pca"}, "--keep: must be >= 0, got -1"),
    ({"rotate": "pca", "rotate_conv": True}, "the PCA rotation applies to Linear layers only"),
])
def test_config_refuses_keep_without_pca(kw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        SequentialConfig(**kw)
    assert SequentialConfig(rotate="pca", keep=8).keep == 8


@pytest.mark.parametrize("name", ["quantize_qronos_4blocks", "benchmark_final"])
def test_scripts_map_rotate_pca_and_keep(name):
    import importlib.util
    from pathlib import Path

    from diffptq.cli import sequential_config

    path = Path(__file__).resolve().parents[2] / "qronos_diffusion" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"pca_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.parse_args([]).keep == 0
    cfg = sequential_config(module.parse_args(["--rotate", "pca", "--keep", "16"]), method="rtn", wbits=4, abits=4)
    assert (cfg.rotate, cfg.keep) == ("pca", 16)


# ---- through the driver and checkpoints --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calib():
    from diffptq.data.calib import collect_calibration
    from diffptq.models import load_pipeline

    return collect_calibration(load_pipeline("tiny-dit"), ["a red cat on a sofa", "a blue cup"], 2, batch_size=2,
                               progress=False)


def _quantized(calib, **kw):
    from diffptq.algo.driver import SequentialQuantizer
    from diffptq.models import family_of, load_pipeline

    pipe = load_pipeline("tiny-dit")
    fam = family_of(pipe)
    cfg = SequentialConfig(**{"method": "gptq", "act_kind": "dynamic", "rotate": "pca", "keep": 4, "blocks": [0],
                              "holdout_every": 0, **kw}).with_bits(4, 4)
    SequentialQuantizer(fam.denoiser(pipe), fam, calib, cfg, "cpu", progress=False).run()
    return pipe, fam


def test_driver_shares_one_rotation_per_input_that_splits_off_its_leading_components(calib):
    from diffptq.models import family_of, load_pipeline
    from diffptq.quant.layers import quant_layers

    float_pipe = load_pipeline("tiny-dit")
    float_den = family_of(float_pipe).denoiser(float_pipe)
    seen = []  # block 0's attn1 input on every record: the quantized stream there is the float prologue's output
    float_den.transformer_blocks[0].attn1.to_q.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        refs = [float_den(**inputs, return_dict=False)[0] for inputs in calib.batches()]
    X = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()
    C = X.T @ X / X.shape[0]

    pipe, fam = _quantized(calib)
    den = fam.denoiser(pipe)
    layers = dict(quant_layers(den))
    q, k, v = (layers[f"transformer_blocks.0.attn1.to_{c}"] for c in "qkv")
    assert isinstance(q.rotation, PcaRotation) and q.rotation is k.rotation is v.rotation
    assert layers["transformer_blocks.0.attn1.to_out.0"].rotation is not q.rotation
    assert all(isinstance(m.act_quant, LeadingActQuantizer) and m.act_quant.keep == 4 for m in layers.values())
    R = q.rotation.basis.double()
    D = R.T @ C @ R  # the leading 4 channels hold the 4 leading components of the input, and nothing else
    assert float(D[:4, 4:].abs().max()) < 1e-4 * float(D.abs().max())
    torch.testing.assert_close(torch.trace(D[:4, :4]), torch.linalg.eigvalsh(C)[-4:].sum(), rtol=1e-4, atol=0)
    with torch.no_grad(), float_mode(den):  # folded weights: the float model is unchanged
        for inputs, ref in zip(calib.batches(), refs):
            torch.testing.assert_close(den(**inputs, return_dict=False)[0], ref, rtol=1e-4, atol=1e-5)


def test_checkpoint_stores_each_basis_once_and_reloads_bit_identical(calib, tmp_path):
    import diffptq
    from diffptq.eval.hardware import module_bytes
    from diffptq.io.checkpoint import read_checkpoint, save_quantized
    from diffptq.quant.layers import quant_layers

    pipe, fam = _quantized(calib, act_kind="static", method="qronos")
    den = fam.denoiser(pipe)
    layers = dict(quant_layers(den))
    bases = {id(m.rotation): m.rotation.basis for m in layers.values()}
    path = tmp_path / "pca.safetensors"
    save_quantized(path, den, {"source": "tiny-dit", "family": fam.name, "pipeline_class": type(pipe).__name__},
                   {"method": "qronos"})
    meta, tensors = read_checkpoint(path)
    assert meta["version"] == 4 and {e["act_keep"] for e in meta["layers"]} == {4}
    stored = [key for key in tensors if key.endswith(".rotation")]
    assert len(stored) == len(bases) < len(layers)  # q/k/v (and the cross-attention k/v) share one
    assert {e["rotation"]["matrix"] for e in meta["layers"]} == set(stored)
    # the model size counts each basis once (float32 (in, in))
    size = module_bytes(den)
    for m in layers.values():
        m._modules.pop("rotation")
    assert size - module_bytes(den) == sum(b.numel() * 4 for b in bases.values())
    pipe, fam = _quantized(calib, act_kind="static", method="qronos")  # the model again, with its rotations
    loaded = diffptq.load_quantized(path)
    got = dict(quant_layers(fam.denoiser(loaded)))
    assert got["transformer_blocks.0.attn1.to_q"].rotation is got["transformer_blocks.0.attn1.to_v"].rotation
    inputs = next(calib.batches())
    with torch.no_grad():
        torch.testing.assert_close(fam.denoiser(loaded)(**inputs).sample, fam.denoiser(pipe)(**inputs).sample,
                                   rtol=0, atol=0)


def _damaged(src, dst, edit):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["diffptq"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(meta, tensors)
    save_file(tensors, str(dst), metadata={"diffptq": json.dumps(meta)})
    return dst


def _set_matrix(value):
    def edit(meta, tensors):
        key = meta["layers"][0]["rotation"]["matrix"]
        tensors[key] = value(tensors[key])
    return edit


@pytest.mark.parametrize("edit,message", [
    (_set_matrix(lambda t: torch.full_like(t, float("nan"))), "holds NaN or Inf"),
    (_set_matrix(lambda t: t[:-1].contiguous()), "expected a float (16, 16) matrix"),
    (_set_matrix(lambda t: 2 * t), "columns are not unit vectors"),
    (lambda m, t: t.pop(m["layers"][0]["rotation"]["matrix"]), "is missing"),
    (lambda m, t: m["layers"][0]["rotation"].pop("matrix"), "rotation must give kind"),
    (lambda m, t: m["layers"][0].update(act_keep=99), "act_keep must be 0..16"),
    (lambda m, t: m["layers"][0]["rotation"].update(size=8), "rotation size 8 is not the input width 16"),
])
def test_damaged_pca_checkpoints_are_refused(calib, tmp_path, edit, message):
    from diffptq.errors import CheckpointError
    from diffptq.io.checkpoint import read_checkpoint, save_quantized

    pipe, fam = _quantized(calib, method="rtn")
    good = tmp_path / "good.safetensors"
    save_quantized(good, fam.denoiser(pipe), {"source": "tiny-dit", "family": fam.name,
                                              "pipeline_class": type(pipe).__name__}, {"method": "rtn"})
    bad = _damaged(good, tmp_path / "bad.safetensors", edit)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_checkpoint(bad)
