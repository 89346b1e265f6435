#!/usr/bin/env python3
"""How much accuracy a 3×3 convolution keeps when its products take bf16 operands.

A simulation in numpy (no torch, no ddim): one convolution (128 input channels, 32 output
channels, 16×16, SiLU-activated normal input, He-initialised weights) computed exactly in
float64, and again the way `ddim --dtype bf16` computes it: the transformed weights U and the
transformed input V rounded to bf16 (round to nearest even), their products summed exactly, the
sums rounded to float32, then the output transform. Prints the signal-to-noise ratio of each
variant against the exact result, for

- a direct convolution (im2col) with bf16 operands,
- Winograd F(2×2, 3×3) (points 0, ±1, ∞), the one ddim runs in bf16,
- Winograd F(4×4, 3×3) with Lavin & Gray's points (0, ±1, ±2, ∞), the one ddim runs in f32,
  and other point sets (the Toom-Cook matrices are built here from the points), to see whether a
  better-conditioned F(4×4) could run in bf16.

    python tools/winograd_bf16_error.py      # needs numpy

The matrices follow from the points: for finite points p_i and ∞, G and Aᵀ are the Vandermonde
rows evaluating the filter and the output polynomial, and Bᵀ is the transposed inverse of the
Vandermonde matrix of the product polynomial (Lavin & Gray 2015, arXiv:1509.09308; Barabasz et
al. 2020, arXiv:1803.10986, study the choice of points).
"""
import numpy as np


def bf16(x):
    """x rounded to bf16 (nearest even), as float32."""
    b = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return (((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)


def winograd_matrices(m, r, points):
    """Aᵀ (m × α), G (α × r), Bᵀ (α × α) of F(m, r) for the finite points and ∞."""
    a = m + r - 1
    assert len(points) == a - 1
    vand = lambda n: np.array([[p**k for k in range(n)] for p in points] + [[0] * (n - 1) + [1]],
                              dtype=np.float64)
    at, g, bt = vand(m).T, vand(r), np.linalg.inv(vand(a)).T
    # check: the 1D correlation of 8 random values with a random filter
    rng = np.random.default_rng(0)
    d, f = rng.normal(size=a), rng.normal(size=r)
    assert np.allclose(at @ ((g @ f) * (bt @ d)), np.correlate(d, f, "valid"))
    return at, g, bt


def data(c_in=128, c_out=32, hw=16, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(c_in, hw + 2, hw + 2))
    x = x / (1 + np.exp(-x))  # SiLU, as after a ResNet block's GroupNorm
    w = rng.normal(size=(c_out, c_in, 3, 3)) * np.sqrt(2 / (9 * c_in))
    return x, w


def exact(x, w):
    hw = x.shape[1] - 2
    return sum(np.einsum("oc,chw->ohw", w[:, :, i, j], x[:, i:i + hw, j:j + hw])
               for i in range(3) for j in range(3))


def direct_bf16(x, w):
    return exact(bf16(x).astype(np.float64), bf16(w).astype(np.float64))


def winograd_bf16(x, w, m, points):
    at, g, bt = winograd_matrices(m, 3, points)
    a, hw = m + 2, x.shape[1] - 2
    u = bf16(np.einsum("ai,ocij,bj->aboc", g, w, g)).astype(np.float64)
    out = np.zeros((w.shape[0], hw, hw))
    for ty in range(0, hw, m):
        for tx in range(0, hw, m):
            v = bf16(np.einsum("ai,cij,bj->abc", bt, x[:, ty:ty + a, tx:tx + a], bt))
            prod = np.einsum("aboc,abc->abo", u, v.astype(np.float64))
            prod = prod.astype(np.float32).astype(np.float64)
            out[:, ty:ty + m, tx:tx + m] = np.einsum("ia,abo,jb->oij", at, prod, at)
    return out


def snr_db(ref, got):
    return 10 * np.log10((ref**2).mean() / ((got - ref)**2).mean())


def main():
    x, w = data()
    ref = exact(x, w)
    rows = [("direct (im2col)", direct_bf16(x, w))]
    for name, m, pts in [("F(2x2) {0, ±1, ∞}", 2, [0, 1, -1]),
                         ("F(4x4) {0, ±1, ±2, ∞}", 4, [0, 1, -1, 2, -2]),
                         ("F(4x4) {0, ±1, ±1/2, ∞}", 4, [0, 1, -1, 0.5, -0.5]),
                         ("F(4x4) {0, ±1, 2, -1/2, ∞}", 4, [0, 1, -1, 2, -0.5]),
                         ("F(4x4) {0, ±1/2, ±2, ∞}", 4, [0, 0.5, -0.5, 2, -2])]:
        rows.append((name, winograd_bf16(x, w, m, pts)))
    print("bf16 operands, f32 sums: SNR against the exact convolution "
          "(128 -> 32 channels, 16x16)")
    for name, got in rows:
        print(f"  {name:28s} {snr_db(ref, got):5.1f} dB")


if __name__ == "__main__":
    main()
