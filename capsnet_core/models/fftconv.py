"""A strided 'valid' 2-D convolution (cross-correlation, like F.conv2d) via small DFTs.

Used for CapsNet's primary-capsule convolution on CPU (256 -> 256 channels, 9x9, stride 2,
20x20 -> 6x6). There the direct convolution already runs at the CPU's peak FLOP rate, so only
fewer FLOPs help: in the frequency domain each output needs ~3 x 190 / 36 ~ 16 real
multiply-adds per (input, output) channel pair instead of 81.

* Size N = (out - 1) * stride + k = 19: the outputs we keep read input rows 0..18 only, so a
  circular correlation of size 19 has no wrap-around where it matters (the 20th row/column
  of the input is never read, just as in the direct convolution).
* All transforms are small real matrices (DFT rows split into real and imaginary parts),
  applied separably with plain matmuls, and the data stays position-major, (H, W, B, C):
  every matmul then produces the next layout directly, with no permute copies. The inverse
  transform is evaluated only at the 36 strided output positions.
* The per-frequency complex product uses Gauss's 3-multiplication trick, (A + iB)(C + iD):
  T1 = AC, T2 = BD, T3 = (A + B)(C + D), Re = T1 - T2, Im = T3 - T1 - T2. The forward
  transforms emit A, B, A + B (and C, D, C + D) as extra matrix rows and the inverse folds the
  recombination into its matrix, so the product is a single real bmm over 3 x 190 frequencies.
* Everything is real matmuls, so autograd gives the backward pass (again 3 real bmms per
  gradient) and gradients equal F.conv2d's up to float rounding.

The weight spectrum is computed from a parameter stored physically as (kh, kw, Cin, Cout)
(see ``fft_weight_layout``); any other layout is still correct, it just costs a copy.
"""

from __future__ import annotations

import ctypes
import math
import sys

import torch


def dft_matrices(k: int, stride: int, out: int) -> dict[str, torch.Tensor]:
    """The real matrices of the transform, float64. n = DFT size, f = n // 2 + 1 half-spectrum columns."""
    n = (out - 1) * stride + k
    f = n // 2 + 1
    t = torch.arange(n, dtype=torch.float64)
    fr = torch.arange(f, dtype=torch.float64)
    # Along the width: real signal -> half spectrum; rows (re f=0..f-1, im f=0..f-1).
    ang_w = 2 * math.pi * fr[:, None] * t[None, :] / n  # (f, n)
    # Along the height: complex -> complex over all n frequencies; rows (reim', kh'), cols (h, reim).
    ang_h = 2 * math.pi * t[:, None] * t[None, :] / n  # (n kh', n h)

    def height(sign: float, rows: int) -> torch.Tensor:
        # Z = sum_h Y[h] exp(sign * i * ang): Zr = c Yr - sign s Yi, Zi = c Yi + sign s Yr.
        c, s = torch.cos(ang_h)[:, :rows], sign * torch.sin(ang_h)[:, :rows]
        m = torch.zeros(2, n, rows, 2, dtype=torch.float64)
        m[0, :, :, 0], m[0, :, :, 1] = c, -s
        m[1, :, :, 0], m[1, :, :, 1] = s, c
        m = m.reshape(2 * n, 2 * rows)
        return torch.cat([m[:n], m[n:], m[:n] + m[n:]])  # Gauss rows: re, im, re + im

    # Input x: forward DFT exp(-i...). Weights: conj(DFT(w)) = sum w exp(+i...), which turns the
    # correlation into a per-frequency product Y = X * W.
    x_width = torch.cat([torch.cos(ang_w), -torch.sin(ang_w)])  # (2f, n)
    w_width = torch.cat([torch.cos(ang_w), torch.sin(ang_w)])[:, :k]  # (2f, k): the kernel is k wide
    x_height = height(-1.0, n)  # (3n, 2n)
    w_height = height(+1.0, k)  # (3n, 2k)
    # Inverse at the strided outputs: y = 1/n^2 sum_{kh, kw<f} alpha Re(Y exp(+i phi)), alpha = 1 for
    # kw = 0 and 2 for the columns whose conjugates the half spectrum leaves out (n is odd: no Nyquist).
    pos = torch.arange(out, dtype=torch.float64) * stride
    phi = 2 * math.pi * (pos[:, None, None, None] * t[None, None, :, None]
                         + pos[None, :, None, None] * fr[None, None, None, :]) / n  # (out, out, n, f)
    alpha = torch.full((f,), 2.0, dtype=torch.float64)
    alpha[0] = 1.0
    m_re = (alpha * torch.cos(phi) / n**2).reshape(out * out, n * f)
    m_im = (-alpha * torch.sin(phi) / n**2).reshape(out * out, n * f)
    inverse = torch.cat([m_re - m_im, -m_re - m_im, m_im], dim=1)  # applied to [T1; T2; T3]
    return {"x_width": x_width, "x_height": x_height, "w_width": w_width, "w_height": w_height,
            "inverse": inverse}


_malloc_tuned: bool | None = None  # set by the first keep_freed_memory() call


def keep_freed_memory() -> bool:
    """Ask glibc to serve all allocations from its heap and keep freed memory for reuse.

    A training step of the FFT path allocates and frees tensors of 40-150 MB (spectra and their
    gradients). glibc serves anything above 32 MB with a fresh mmap and unmaps it on free, so each
    step page-faults them in again: that alone cost ~40 % of the step (140 -> 245 img/s at batch
    100 on a 2-core CPU). PyTorch's CPU allocator does not cache, so we tune malloc instead:
    M_MMAP_MAX = 0 (no mmap), M_TRIM_THRESHOLD = 1 GiB (keep freed memory). Process-wide; peak
    RSS grows a little (~15 %) and freed memory stays with the process. No-op off glibc.
    Called on the first FFT forward only (CPU), never on GPU ranks, where it buys nothing.
    """
    global _malloc_tuned
    if _malloc_tuned is not None:
        return _malloc_tuned
    _malloc_tuned = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        _malloc_tuned = bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc (musl, ...)
        pass
    return _malloc_tuned


def malloc_tuned() -> bool | None:
    """Whether ``keep_freed_memory`` ran in this process (None: never asked, e.g. GPU-only runs)."""
    return _malloc_tuned


def fft_weight_layout(weight: torch.Tensor) -> torch.Tensor:
    """The same (Cout, Cin, kh, kw) tensor, stored physically as (kh, kw, Cin, Cout)."""
    return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def conv2d_fft(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               mats: dict[str, torch.Tensor], out: int) -> torch.Tensor:
    """Valid strided correlation of position-major inputs.

    x: (n, n, B, Cin) with n = (out - 1) * stride + k (extra input rows/columns must be cut off
    by the caller); weight: (Cout, Cin, k, k); mats: ``dft_matrices`` in x's dtype.
    Returns (out * out, B, Cout), positions row-major.
    """
    n, _, b, cin = x.shape
    cout, _, k, _ = weight.shape
    f = n // 2 + 1
    # Input spectrum: width, then height (+ Gauss rows).
    xs = torch.matmul(mats["x_width"], x.reshape(n, n, b * cin))  # (n h, 2f (reim, kw'), B*Cin)
    xs = mats["x_height"] @ xs.reshape(2 * n, f * b * cin)  # (3n, f*B*Cin): rows (gauss, kh')
    xs = xs.reshape(3 * n * f, b, cin)  # (3 x n x f frequencies, B, Cin)
    # Weight spectrum, the same way on the (kh, kw, Cin*Cout) storage.
    w = weight.permute(2, 3, 1, 0).reshape(k, k, cin * cout)  # a view for fft_weight_layout
    ws = torch.matmul(mats["w_width"], w)  # (k kh, 2f, Cin*Cout)
    ws = mats["w_height"] @ ws.reshape(2 * k, f * cin * cout)  # (3n, f*Cin*Cout)
    ws = ws.reshape(3 * n * f, cin, cout)
    t = torch.bmm(xs, ws)  # (3nf, B, Cout): T1, T2, T3 of the Gauss product, per frequency
    y = mats["inverse"] @ t.reshape(3 * n * f, b * cout)  # (out*out, B*Cout)
    y = y.reshape(out * out, b, cout)
    return y if bias is None else y + bias
