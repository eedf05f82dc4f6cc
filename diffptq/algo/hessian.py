"""Streaming second-moment statistics of a layer's inputs: H = X̃ᵀX̃/n and G = X̃ᵀX/n (Qronos).

Rows of X are what one output of the matmul sees: Linear inputs (..., in) flattened over all leading dims;
Conv2d inputs (N, C, H, W) unfolded to patches (N·L, C·kh·kw) with the conv's kernel, stride, padding (including
"same"/"valid" and non-zero padding modes) and dilation, in the column order of weight.reshape(out, -1).
Accumulation in float32; n counts rows. Float32 inputs use full-precision matmuls (TF32 off). fp16/bf16 inputs on
CUDA are upcast chunk by chunk and multiplied on TF32 tensor cores: their values have at most 11 significant bits,
which TF32 holds exactly, so every product is exact and sums stay float32 — the same precision, several times faster.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffptq.algo.damping import fp32_matmul, matmul_precision

HALF = (torch.float16, torch.bfloat16)


def _conv_pads(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding as the conv applies it."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0, 0, 0)
        pads = []
        for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation)):  # "same": w first, as F.pad wants
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)  # type: ignore[return-value]
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def conv_patches(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """Unfold a conv input x (N, C, H, W) to rows (N·L, C·kh·kw), L the number of output positions."""
    if conv.groups != 1:
        raise ValueError(f"conv_patches supports groups=1 only, got groups={conv.groups}")
    pads = _conv_pads(conv)
    if any(pads):
        x = F.pad(x, pads, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=0, stride=conv.stride)  # (N, C·k·k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def input_rows(x: Tensor, module: nn.Module | None = None) -> Tensor:
    """Rows (n, in) float32 of a layer input: unfolded patches for an nn.Conv2d, else x flattened to (-1, in)."""
    if isinstance(module, nn.Conv2d):
        return conv_patches(x.float(), module)
    return x.reshape(-1, x.shape[-1]).float()


class GramAccumulator:
    """Streams H = X̃ᵀX̃/n (and G = X̃ᵀX/n when `cross`) over batches of one layer's inputs.

    module: the nn.Conv2d whose geometry unfolds the inputs, or None / an nn.Linear (rows = last dim).
    update(x_q, x_fp): x_q the quantized-stream input as the matmul sees it, x_fp the paired float-stream input
    (same samples, same order; needed when cross=True). Rows are processed in chunks of at most `chunk_rows` rows
    (default: as many as keep one float32 chunk under `chunk_elems` elements), bounding the memory of the float32
    copies and of unfolded conv inputs.
    """

    def __init__(self, module: nn.Module | None = None, cross: bool = False, chunk_rows: int | None = None,
                 chunk_elems: int = 1 << 25):
        self.module = module
        self.cross = cross
        self.chunk_rows = chunk_rows
        self.chunk_elems = chunk_elems
        self.n = 0
        self._h: Tensor | None = None
        self._g: Tensor | None = None

    def _rows_per_chunk(self, width: int) -> int:
        return self.chunk_rows or max(self.chunk_elems // max(width, 1), 1)

    @torch.no_grad()
    def update(self, x_q: Tensor, x_fp: Tensor | None = None) -> None:
        if self.cross:
            if x_fp is None:
                raise ValueError("GramAccumulator(cross=True).update needs the paired float input x_fp")
            if x_fp.shape != x_q.shape:
                raise ValueError(f"paired inputs differ in shape: x_q {tuple(x_q.shape)} vs x_fp {tuple(x_fp.shape)}")
        exact_tf32 = x_q.is_cuda and x_q.dtype in HALF and (x_fp is None or x_fp.dtype in HALF)
        with matmul_precision("high" if exact_tf32 else "highest"):
            if isinstance(self.module, nn.Conv2d):
                one = input_rows(x_q[:1], self.module)  # (rows per sample, patch width)
                step = max(self._rows_per_chunk(one.shape[1]) // max(one.shape[0], 1), 1)
                for i in range(0, x_q.shape[0], step):
                    self._add(input_rows(x_q[i:i + step], self.module),
                              input_rows(x_fp[i:i + step], self.module) if self.cross else None)
                return
            xq2 = x_q.reshape(-1, x_q.shape[-1])
            xf2 = x_fp.reshape(-1, x_fp.shape[-1]) if self.cross else None
            step = self._rows_per_chunk(xq2.shape[1])
            for i in range(0, xq2.shape[0], step):
                self._add(xq2[i:i + step].float(), xf2[i:i + step].float() if self.cross else None)

    def _add(self, rq: Tensor, rf: Tensor | None) -> None:
        if self._h is None:
            self._h = torch.zeros(rq.shape[1], rq.shape[1], device=rq.device, dtype=torch.float32)
            self._g = torch.zeros_like(self._h) if self.cross else None
        self._h.addmm_(rq.T, rq)
        if rf is not None:
            self._g.addmm_(rq.T, rf)
        self.n += rq.shape[0]

    def finish(self) -> tuple[Tensor, Tensor | None]:
        """(H, G) (G None unless `cross`), divided by n in place: no copies; the accumulator is empty after."""
        if self._h is None:
            raise RuntimeError("GramAccumulator.finish: no batch was accumulated")
        n = max(self.n, 1)
        H, G = self._h.div_(n), (self._g.div_(n) if self._g is not None else None)
        self._h = self._g = None
        self.n = 0
        return H, G

    @property
    def H(self) -> Tensor:
        """X̃ᵀX̃ / n, (in, in) float32."""
        if self._h is None:
            raise RuntimeError("GramAccumulator.H: no batch was accumulated")
        return self._h / max(self.n, 1)

    @property
    def G(self) -> Tensor:
        """X̃ᵀX / n, (in, in) float32 (cross=True only)."""
        if not self.cross:
            raise RuntimeError("GramAccumulator.G needs cross=True")
        if self._g is None:
            raise RuntimeError("GramAccumulator.G: no batch was accumulated")
        return self._g / max(self.n, 1)


def gram_from_inputs(x_q: Tensor, x_fp: Tensor | None = None, module: nn.Module | None = None
                     ) -> tuple[Tensor, Tensor | None]:
    """H = X̃ᵀX̃/n and (when x_fp is given) G = X̃ᵀX/n from whole inputs at once."""
    with fp32_matmul():
        rq = input_rows(x_q, module)
        H = rq.T @ rq / rq.shape[0]
        G = None if x_fp is None else rq.T @ input_rows(x_fp, module) / rq.shape[0]
    return H, G


def hessian_from_inputs(x: Tensor, module: nn.Module | None = None) -> Tensor:
    """H = XᵀX/n (in, in) float32 from a whole input at once."""
    return gram_from_inputs(x, None, module)[0]
