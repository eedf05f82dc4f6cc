"""Online input rotations for quantized layers: y = W x = (W R)(Rᵀ x) with R orthonormal (QuaRot-style).

Two kinds (docs/ALGORITHMS.md §8, §8b): HadamardRotation, random and data-free, and PcaRotation, the eigenvectors of
the calibration inputs' second moment (data dependent: stored as a matrix).

Hadamard: rotating spreads a few outlier channels over all channels, so per-token (and per-tensor) activation grids and
per-channel weight grids both lose less. For an input of n = m·p features, p the largest power of two dividing n:

    R = diag(s) · (Q ⊗ H_p)

s random signs (n,), H_p the Sylvester Hadamard matrix of order p scaled by 1/√p, Q a random (Haar) orthogonal
m × m matrix (Q = [1] when n is a power of two: a plain randomised Hadamard). Q ⊗ H_p mixes every channel with
every other, also when n is not a power of two (e.g. 160 = 5·32, 96 = 3·32). Applying Rᵀ costs O(n·(m + p)) per
token: the features are viewed as an (m, p) matrix V and Rᵀx = vec(Qᵀ · V_{s⊙x} · H_p); no n × n matrix is formed.
R depends only on (n, seed), so the rotation is rebuilt from those two numbers (checkpoints store no matrix).

PCA: U = the eigenvectors of E[x xᵀ] by decreasing eigenvalue, so Uᵀx lists the input's principal components first
(pca_basis); R = U · blockdiag(Q_k, Q_{n−k}) mixes the k leading components among themselves and the others among
themselves (pca_rotation). Applying Rᵀ is a dense (n, n) matmul per token, and R is stored (n² float32 per group).
"""
from __future__ import annotations

import functools
import math
import weakref

import torch
from torch import Tensor, nn

from diffptq.config.sequential import ROTATIONS


def hadamard_matrix(p: int) -> Tensor:
    """Sylvester Hadamard matrix of order p (a power of two), entries ±1, float64."""
    if p < 1 or p & (p - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two order, got {p}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def random_orthogonal(m: int, generator: torch.Generator) -> Tensor:
    """A Haar-random orthogonal m × m matrix (float64): QR of a Gaussian matrix with the signs of R's diagonal."""
    q, r = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64, generator=generator))
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a rotation computes in: x's own when float32/64, else float32 (fp16/bf16 inputs)."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


class Rotation:
    """What every rotation offers. rotate(x, dim) computes Rᵀx along `dim` (-1 for Linear inputs (..., n), 1 for
    Conv2d inputs (N, C, H, W)); a weight is rotated with the same call along its input dimension, W ↦ W R (rows
    w ↦ Rᵀw), so that F.linear(rotate(x), rotate(W, 1)) = F.linear(x, W) up to float rounding. unrotate(x, dim)
    computes R x. Subclasses set `kind` and `size` and implement rotate, unrotate and config."""

    kind: str
    size: int
    _last: tuple | None = None  # (weakref input, its version, weakref output, its version, dim)

    def rotate(self, x: Tensor, dim: int = -1) -> Tensor:
        raise NotImplementedError

    def unrotate(self, x: Tensor, dim: int = -1) -> Tensor:
        raise NotImplementedError

    def config(self) -> dict:
        raise NotImplementedError

    def rotate_input(self, x: Tensor, dim: int = -1) -> Tensor:
        """rotate(x, dim), returning the very same output tensor when called again with the same, unmodified x.

        Layers fed by one tensor (q, k, v) so share one rotated input: no repeated work, and code that groups
        layers by the identity of their input (the sequential driver) still sees one group.
        """
        last = self._last
        if last is not None and last[0]() is x and last[1] == x._version and last[4] == dim:
            out = last[2]()
            if out is not None and out._version == last[3]:
                return out
        out = self.rotate(x, dim)
        self._last = (weakref.ref(x), x._version, weakref.ref(out), out._version, dim)
        return out

    def matrix(self) -> Tensor:
        """The dense R (size, size) float64, for tests and inspection."""
        return self.unrotate(torch.eye(self.size, dtype=torch.float64), dim=0)


class HadamardRotation(Rotation):
    """R = diag(s)·(Q ⊗ H_p) for inputs of `size` features (see the module docstring); deterministic in `seed`."""

    kind = "hadamard"

    def __init__(self, size: int, seed: int = 0):
        if size < 1:
            raise ValueError(f"rotation size must be >= 1, got {size}")
        self.size, self.seed = size, seed
        self.p = size & -size  # largest power of two dividing size
        self.m = size // self.p
        gen = torch.Generator().manual_seed(seed)
        self._signs = torch.randint(0, 2, (size,), generator=gen, dtype=torch.float64) * 2 - 1
        self._mix = random_orthogonal(self.m, gen) if self.m > 1 else torch.ones(1, 1, dtype=torch.float64)
        self._had = hadamard_matrix(self.p) / math.sqrt(self.p)
        self._factors: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}

    def config(self) -> dict:
        """What rebuilds this rotation: make_rotation(**config)."""
        return {"kind": self.kind, "size": self.size, "seed": self.seed}

    def _on(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        key = (device, dtype)
        if key not in self._factors:
            self._factors[key] = tuple(t.to(device, dtype) for t in (self._signs, self._mix, self._had))
        return self._factors[key]

    def _apply(self, x: Tensor, dim: int, inverse: bool) -> Tensor:
        if x.shape[dim] != self.size:
            raise ValueError(f"rotation of size {self.size} applied to a dimension of size {x.shape[dim]}")
        compute = compute_dtype(x)
        s, q, h = self._on(x.device, compute)
        t = x.movedim(dim, -1).to(compute)
        lead = t.shape[:-1]
        if not inverse:
            t = t * s
        v = t.reshape(*lead, self.m, self.p)
        v = (q.T if not inverse else q) @ v @ h  # H_p is symmetric
        t = v.reshape(*lead, self.size)
        if inverse:
            t = t * s
        return t.to(x.dtype).movedim(-1, dim)

    def rotate(self, x: Tensor, dim: int = -1) -> Tensor:
        """Rᵀ x along `dim` (for a weight (out, in, ...): W R, with dim=1)."""
        return self._apply(x, dim, inverse=False)

    def unrotate(self, x: Tensor, dim: int = -1) -> Tensor:
        """R x along `dim`: undoes rotate."""
        return self._apply(x, dim, inverse=True)

    def __repr__(self) -> str:
        return f"HadamardRotation(size={self.size} = {self.m}·{self.p}, seed={self.seed})"


class PcaRotation(Rotation, nn.Module):
    """R = `basis` (size, size) with orthonormal columns (pca_rotation): Rᵀx puts the input's leading principal
    components in its first channels. An nn.Module whose non-persistent buffer `basis` (float32) moves with the
    model and counts in its size once, however many layers (q, k, v) share the instance; checkpoints store it."""

    kind = "pca"

    def __init__(self, basis: Tensor):
        nn.Module.__init__(self)
        if basis.dim() != 2 or basis.shape[0] != basis.shape[1] or basis.shape[0] < 1:
            raise ValueError(f"a PCA basis is a square (n, n) matrix, got shape {tuple(basis.shape)}")
        self.size = int(basis.shape[0])
        self.register_buffer("basis", basis.detach().float().contiguous(), persistent=False)

    def config(self) -> dict:
        """kind and size; the checkpoint adds where the matrix is stored."""
        return {"kind": self.kind, "size": self.size}

    def _apply_basis(self, x: Tensor, dim: int, transpose: bool) -> Tensor:
        if x.shape[dim] != self.size:
            raise ValueError(f"rotation of size {self.size} applied to a dimension of size {x.shape[dim]}")
        r = self.basis.to(x.device, compute_dtype(x))
        t = x.movedim(dim, -1).to(r.dtype)
        return (t @ (r.T if transpose else r)).to(x.dtype).movedim(-1, dim)  # rows: (Rᵀx)ᵀ = xᵀR

    def rotate(self, x: Tensor, dim: int = -1) -> Tensor:
        """Rᵀ x along `dim` (for a weight (out, in): W R, with dim=1)."""
        return self._apply_basis(x, dim, transpose=False)

    def unrotate(self, x: Tensor, dim: int = -1) -> Tensor:
        """R x along `dim`: undoes rotate."""
        return self._apply_basis(x, dim, transpose=True)

    def extra_repr(self) -> str:
        return f"size={self.size}"


@torch.no_grad()
def pca_basis(second_moment: Tensor) -> tuple[Tensor, Tensor]:
    """(R, eigenvalues) of a symmetric second-moment matrix C = E[x xᵀ] (n, n): R (n, n) float32 with the
    eigenvectors as columns, by decreasing eigenvalue (float64 eigh), each column's largest entry made positive
    (deterministic signs), so that C = R diag(λ) Rᵀ and Rᵀx lists the principal components first."""
    c = second_moment.detach().double()
    c = (c + c.T) / 2  # symmetric up to the accumulation's rounding
    values, vectors = torch.linalg.eigh(c)  # ascending
    values, vectors = values.flip(0), vectors.flip(1)
    peak = vectors.gather(0, vectors.abs().argmax(dim=0, keepdim=True))
    vectors = vectors * torch.where(peak < 0, -1.0, 1.0)
    return vectors.float(), values


@torch.no_grad()
def pca_rotation(second_moment: Tensor, keep: int, seed: int = 0) -> Tensor:
    """R (n, n) float32 for inputs with second moment C (n, n): the PCA basis U of pca_basis with its first
    k = min(keep, n) columns mixed by one randomized Hadamard rotation (HadamardRotation(k, seed)) and its other
    n − k columns by another, R = U · blockdiag(Q_k, Q_{n−k}). Rᵀx's first k channels span the k leading principal
    components, the others the rest; inside each part the energy is spread evenly over the channels, and the
    rotated second moment RᵀCR is block diagonal but not diagonal (GPTQ keeps correlations to work with)."""
    basis, _ = pca_basis(second_moment)
    basis = basis.double()
    n = basis.shape[0]
    k = min(max(keep, 0), n)
    for lo, hi in ((0, k), (k, n)):
        if hi > lo:  # U[:, lo:hi] @ Q: each row of the block rotated as an input row is
            basis[:, lo:hi] = _shared_rotation(hi - lo, seed).rotate(basis[:, lo:hi], dim=1)
    return basis.float()


def make_rotation(kind: str, size: int, seed: int = 0) -> HadamardRotation:
    """The data-free rotation `kind` for `size` input features; one shared instance per (kind, size, seed). The
    PCA rotation is built from calibration inputs instead (PcaRotation(pca_rotation(C, keep, seed)))."""
    if kind not in ROTATIONS:
        raise ValueError(f"unknown rotation {kind!r}; choose one of {', '.join(ROTATIONS)}")
    if kind == "pca":
        raise ValueError("the pca rotation depends on the calibration inputs: the sequential driver computes it "
                         "(SequentialConfig.rotate), a checkpoint stores it")
    return _shared_rotation(int(size), int(seed))


@functools.lru_cache(maxsize=None)
def _shared_rotation(size: int, seed: int) -> HadamardRotation:
    return HadamardRotation(size, seed)
