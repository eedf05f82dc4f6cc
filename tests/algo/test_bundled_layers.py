"""RTN / GPTQ / Qronos, dampening and the online Hadamard rotation on real layers of the bundled models.

Layer inputs X are recorded from the float bundled denoisers on calibration trajectories; the quantized stream X̃
is emulated by 4-bit per-token activation quantization of X. Each seed splits the rows at random into a
calibration half (H, G) and a held-out half (errors). Orderings are asserted on averages over seeds and layers,
as docs/ALGORITHMS.md §6 and §12 state them, never per seed.
"""
import statistics

import pytest
import torch

from diffptq.algo import gptq_quantize_ex, gram_from_inputs, input_rows, qronos_quantize_ex, rtn_quantize
from diffptq.algo.driver import SequentialConfig, SequentialQuantizer
from diffptq.data.calib import collect_calibration
from diffptq.data.prompts import calibration_prompts
from diffptq.models import family_of, load_pipeline
from diffptq.quant.act import DynamicActQuantizer
from diffptq.quant.layers import QuantConfig, float_mode, rotate_layers, swap_modules
from diffptq.quant.quantizer import QuantSpec

W4 = QuantSpec(4)
A4_TOKEN = QuantSpec(4, symmetric=False)
SEEDS = (0, 1, 2)
DIT_LAYERS = ("transformer_blocks.2.attn1.to_q", "transformer_blocks.2.attn1.to_out.0",
              "transformer_blocks.2.ff.net.0.proj", "transformer_blocks.2.ff.net.2",
              "transformer_blocks.5.attn2.to_out.0", "transformer_blocks.5.ff.net.2")
UNET_LAYERS = ("down_blocks.1.resnets.0.conv1", "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
               "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k")
MAX_ROWS = 6000


pytestmark = pytest.mark.usefixtures("one_thread")


def _record(model: str, names: tuple[str, ...], n_prompts: int = 8, steps: int = 4):
    """(pipe, calib, {name: (module, [recorded inputs])}) from the float denoiser of a bundled model."""
    torch.manual_seed(0)
    pipe = load_pipeline(model)
    den = family_of(pipe).denoiser(pipe)
    calib = collect_calibration(pipe, calibration_prompts(pipe, n_prompts), steps, batch_size=n_prompts,
                                progress=False)
    seen = {n: (den.get_submodule(n), []) for n in names}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen[n][1].append(a[0].detach()))
             for n, (m, _) in seen.items()]
    with torch.no_grad():
        for inputs in calib.batches():
            den(**inputs)
    for h in hooks:
        h.remove()
    return pipe, calib, seen


@pytest.fixture(scope="module")
def rows():
    """{layer: (W (out, in), X rows, X̃ rows)} for real DiT and UNet layers (conv inputs unfolded)."""
    torch.set_num_threads(1)
    out = {}
    for model, names in (("bundled-dit", DIT_LAYERS), ("bundled-unet", UNET_LAYERS)):
        _, _, seen = _record(model, names)
        for name, (mod, xs) in seen.items():
            x = torch.cat(xs)
            conv = isinstance(mod, torch.nn.Conv2d)
            xq = DynamicActQuantizer(A4_TOKEN, 1 if conv else -1)(x)
            X, Xq = input_rows(x, mod if conv else None), input_rows(xq, mod if conv else None)
            keep = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))[:MAX_ROWS]
            out[f"{model}:{name}"] = (mod.weight.detach().reshape(mod.weight.shape[0], -1).float(), X[keep], Xq[keep])
    return out


def _split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[: n // 2], perm[n // 2:]


def _err(Xq: torch.Tensor, Q: torch.Tensor, X: torch.Tensor, W: torch.Tensor) -> float:
    """‖X̃Qᵀ − XWᵀ‖ / ‖XWᵀ‖."""
    ref = X @ W.T
    return float((Xq @ Q.T - ref).norm() / ref.norm())


def test_gptq_beats_rtn_on_real_layers_on_average(rows):
    rtn, gptq = [], []
    for W, X, _ in rows.values():
        for seed in SEEDS:
            cal, ev = _split(X.shape[0], seed)
            H, _ = gram_from_inputs(X[cal])
            rtn.append(_err(X[ev], rtn_quantize(W, W4), X[ev], W))
            gptq.append(_err(X[ev], gptq_quantize_ex(W, H, W4).weight, X[ev], W))
    assert statistics.mean(gptq) < statistics.mean(rtn), (statistics.mean(gptq), statistics.mean(rtn))


def test_qronos_beats_gptq_on_real_layers_with_a4_inputs_on_average(rows):
    gptq, qronos = [], []
    for W, X, Xq in rows.values():
        for seed in SEEDS:
            cal, ev = _split(X.shape[0], seed)
            H, G = gram_from_inputs(Xq[cal], X[cal])
            gptq.append(_err(Xq[ev], gptq_quantize_ex(W, H, W4).weight, X[ev], W))
            qronos.append(_err(Xq[ev], qronos_quantize_ex(W, H, G, W4).weight, X[ev], W))
    assert statistics.mean(qronos) < statistics.mean(gptq), (statistics.mean(qronos), statistics.mean(gptq))


def test_qronos_equals_gptq_on_real_layers_when_streams_agree(rows):
    """With X̃ = X (G = H) Qronos is GPTQ up to float rounding. On real, ill-conditioned H that rounding flips a few
    codes at grid-point ties, and the error feedback carries each flip on (measured: <= 2.4% of the codes, by
    1-3 grid steps, on these layers), so the check is on the layer error and on most codes, not bitwise."""
    for name in ("bundled-dit:transformer_blocks.2.ff.net.2", "bundled-dit:transformer_blocks.2.attn1.to_q"):
        W, X, _ = rows[name]
        H, G = gram_from_inputs(X, X)
        q, g = qronos_quantize_ex(W, H, G, W4), gptq_quantize_ex(W, H, W4)
        assert float((q.codes == g.codes).float().mean()) > 0.95, name
        assert _err(X, q.weight, X, W) == pytest.approx(_err(X, g.weight, X, W), rel=0.01), name


def test_spread_rule_and_fixed_damping_on_a_real_ffn_layer(rows):
    """What is guaranteed: both succeed without RTN fallback, and the spread rule damps at least as much as 1% (its
    boost is >= 1). Which one gives the lower error is measured, not asserted (benchmarks/results/weight_quant_*)."""
    W, X, Xq = rows["bundled-dit:transformer_blocks.2.ff.net.2"]
    cal, ev = _split(X.shape[0], 0)
    H, G = gram_from_inputs(Xq[cal], X[cal])
    errs = {}
    for damp in (0.01, "spread"):
        res = qronos_quantize_ex(W, H, G, W4, damp=damp)
        assert not res.fell_back and torch.isfinite(res.weight).all()
        errs[damp] = (res.damp_rel, _err(Xq[ev], res.weight, X[ev], W))
    assert errs["spread"][0] >= 0.01 * (1 - 1e-6)
    print(f"ff.net.2 W4A4 Qronos held-out rel_out_err: fixed 1% {errs[0.01]}, spread rule {errs['spread']}")


@pytest.mark.parametrize("model,names", [("bundled-dit", ("transformer_blocks.3.attn1.to_q",
                                                          "transformer_blocks.3.ff.net.2")),
                                         ("bundled-unet", ("down_blocks.1.resnets.0.conv1",
                                                           "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"))])
def test_rotated_layer_with_quantization_disabled_equals_the_float_layer(model, names):
    _, _, seen = _record(model, names, n_prompts=2, steps=2)
    for name, (mod, xs) in seen.items():
        x = xs[0]
        with torch.no_grad():
            ref = mod(x)
            holder = torch.nn.ModuleDict({"m": mod})
            layer = swap_modules(holder, QuantConfig(weight=W4, act=A4_TOKEN, act_kind="dynamic"))["m"]
            rotate_layers({name: layer}, "hadamard", conv=True)
            assert layer.rotation is not None
            with float_mode(holder):
                out = layer(x)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5, msg=name)


def test_w4a4_per_token_hadamard_beats_static_on_a_real_block():
    pipe = load_pipeline("bundled-dit")
    calib = collect_calibration(pipe, calibration_prompts(pipe, 4), 3, batch_size=4, progress=False)
    mean_err = {}
    for kind, rotate in (("static", None), ("dynamic", "hadamard")):
        torch.manual_seed(0)
        pipe = load_pipeline("bundled-dit")
        fam = family_of(pipe)
        cfg = SequentialConfig(method="gptq", weight=W4, act=A4_TOKEN, act_kind=kind, blocks=[2], holdout_every=3)
        drv = SequentialQuantizer(fam.denoiser(pipe), fam, calib, cfg, "cpu", progress=False)
        if rotate:
            rotate_layers(drv.swap(), rotate)
        mean_err[kind] = statistics.mean(r.rel_out_err for r in drv.run().layers)
    assert mean_err["dynamic"] < mean_err["static"], mean_err
