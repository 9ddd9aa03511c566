"""The 2-D scattering transform (Mallat 2012; Bruna & Mallat 2013) in plain torch, as kymatio 0.3.0 computes it.

Tramèr & Boneh (2021, "Differentially Private Learning Needs Better Features (or Much More Data)") train
private linear models on ScatterNet features: J = 2 scales, L = 8 angles, order 2, which for a 28×28 image gives
1 + J·L + L²·J(J−1)/2 = 81 channels of 7×7. :class:`Scattering2D` reproduces kymatio 0.3.0's
``Scattering2D(J, shape, L)`` (torch frontend, ``out_type="array"``): the same Morlet filter bank, built in the
Fourier domain with the same float32/complex64 arithmetic, the same reflection padding to a multiple of 2^J (plus
2^J), the same periodisation of spectra for subsampling, and the same order of operations, so its outputs match
kymatio's to float32 rounding (``tests/test_fashion_mnist.py`` checks it against kymatio itself).

Input: float tensors [..., M, N]. Output: [..., C, M / 2^J, N / 2^J], channels ordered as kymatio orders them:
the low-pass S0; then S1 for every wavelet (j1, θ1), j1 major; then S2 for every pair (j1, θ1), (j2, θ2) with
j2 > j1, (j1, θ1) major. Images are processed in chunks (``chunk_size``), so memory stays bounded whatever the
batch.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["Scattering2D", "filter_bank", "padded_size", "scattering_channels"]


def padded_size(M: int, N: int, J: int) -> tuple[int, int]:
    """kymatio's padded support: the next multiple of 2^J above M (resp. N), plus 2^J."""
    return ((M + 2**J) // 2**J + 1) * 2**J, ((N + 2**J) // 2**J + 1) * 2**J


def scattering_channels(J: int, L: int, max_order: int = 2) -> int:
    """Number of output channels: 1 + J·L (+ L²·J(J−1)/2 at order 2)."""
    return 1 + J * L + (L * L * J * (J - 1) // 2 if max_order == 2 else 0)


# -- filter bank (numpy; built once, a few milliseconds) ------------------------------------------------------
def _gabor(M: int, N: int, sigma: float, theta: float, xi: float, slant: float = 1.0) -> np.ndarray:
    """Gabor filter g_σ(u)·exp(i ξ·u) in space, periodised over 5 × 5 copies of the M × N grid (complex64, as
    kymatio accumulates it: each copy added into a complex64 array in turn)."""
    out = np.zeros((M, N), np.complex64)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]], np.float32)
    rotation_inv = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]], np.float32)
    scaling = np.array([[1, 0], [0, slant * slant]])
    curvature = rotation @ (scaling @ rotation_inv) / (2 * sigma * sigma)
    for ex in (-2, -1, 0, 1, 2):
        for ey in (-2, -1, 0, 1, 2):
            xx, yy = np.mgrid[ex * M: M + ex * M, ey * N: N + ey * N]
            arg = (-(curvature[0, 0] * xx * xx + (curvature[0, 1] + curvature[1, 0]) * xx * yy + curvature[1, 1] * yy * yy)
                   + 1j * (xx * xi * np.cos(theta) + yy * xi * np.sin(theta)))
            out += np.exp(arg)
    out /= 2 * 3.1415 * sigma * sigma / slant  # kymatio's normalisation constant (3.1415, not π)
    return out


def _morlet(M: int, N: int, sigma: float, theta: float, xi: float, slant: float) -> np.ndarray:
    """Morlet filter: a Gabor minus the multiple of its envelope that makes its mean exactly 0."""
    wave = _gabor(M, N, sigma, theta, xi, slant)
    envelope = _gabor(M, N, sigma, theta, 0.0, slant)
    return wave - (np.sum(wave) / np.sum(envelope)) * envelope


def _periodize(spectrum: np.ndarray, res: int) -> np.ndarray:
    """The spectrum of the filter at resolution 2^-res: frequencies beyond the new Nyquist band are zeroed (as
    kymatio masks them) and the 2^res × 2^res blocks summed (periodisation), in kymatio's summation order."""
    M, N = spectrum.shape
    k = 2**res
    mask = np.ones(spectrum.shape, np.float32)
    start_x, len_x = int(M * 2 ** (-res - 1)), int(M * (1 - 2 ** (-res)))
    start_y, len_y = int(N * 2 ** (-res - 1)), int(N * (1 - 2 ** (-res)))
    mask[start_x:start_x + len_x, :] = 0
    mask[:, start_y:start_y + len_y] = 0
    masked = spectrum * mask
    m, n = M // k, N // k
    crop = np.zeros((m, n), spectrum.dtype)
    for i in range(k):
        for j in range(k):
            crop += masked[i * m:(i + 1) * m, j * n:(j + 1) * n]
    return crop


def filter_bank(M: int, N: int, J: int, L: int = 8) -> dict:
    """Real Fourier-domain filters on the padded M × N grid, as kymatio builds them.

    Returns ``{"phi": [low-pass at resolutions 0..J-1], "psi": [{"j", "theta", "levels": [...]}, ...]}``, each
    level a float32 array (the filters' spectra are real: their imaginary parts are dropped, as kymatio does).
    """
    from scipy.fft import fft2

    psi = []
    for j in range(J):
        for theta in range(L):
            wavelet = _morlet(M, N, 0.8 * 2**j, (int(L - L / 2 - 1) - theta) * np.pi / L, 3.0 / 4.0 * np.pi / 2**j, 4.0 / L)
            spectrum = np.real(fft2(wavelet))
            levels = [_periodize(spectrum, res) for res in range(min(j + 1, max(J - 1, 1)))]
            psi.append({"j": j, "theta": theta, "levels": levels})
    low = np.real(fft2(_gabor(M, N, 0.8 * 2 ** (J - 1), 0.0, 0.0)))
    return {"phi": [_periodize(low, res) for res in range(J)], "psi": psi}


# -- the transform --------------------------------------------------------------------------------------------
def _blocks(x: torch.Tensor, k: int) -> torch.Tensor:
    """[..., M, N, 2] → [k, k, ..., M/k, N/k, 2], contiguous: block (i, j), rows i·M/k.. and columns j·N/k.., is
    the contiguous tensor ``out[i, j]``."""
    *batch, M, N, two = x.shape
    d = len(batch)
    split = x.reshape(*batch, k, M // k, k, N // k, two)  # [..., i, m, j, n, 2]
    return split.permute(d, d + 2, *range(d), d + 1, d + 3, d + 4).contiguous()


def _filter_subsample(x: torch.Tensor, f: torch.Tensor, k: int) -> torch.Tensor:
    """(spectrum ``x`` × real filter ``f``), subsampled by k in space: the mean of the product's k × k spectral
    blocks (periodisation).

    ``f`` is given doubled and in blocks, [k, k, ..., M/k, N/k, 2] (:func:`_blocks` of each value repeated for
    the real and the imaginary part), so the products run on the real view, on contiguous blocks: the numbers
    torch's complex × real product gives. The blocks are multiplied and summed one at a time in kymatio's order
    (the column blocks of each row block, then those sums over the row blocks), which gives the numbers of
    kymatio's ``subsample_fourier(cdgmm(x, f), k)`` (two means), without forming the full-size product.
    """
    if k == 1:
        return torch.view_as_complex(torch.view_as_real(x) * f[0, 0])
    real = _blocks(torch.view_as_real(x), k)  # [k, k, ..., m, n, 2]
    rows = None
    for i in range(k):
        columns = real[i, 0] * f[i, 0]
        for j in range(1, k):
            columns += real[i, j] * f[i, j]
        if rows is None:
            rows = columns
        else:
            rows += columns
    # kymatio divides each column-block sum by k, then the sum of those by k: dividing once by k² at the end
    # gives the same numbers (scaling by a power of two is exact)
    rows /= k * k
    return torch.view_as_complex(rows)


def _doubled(f: np.ndarray, k: int) -> torch.Tensor:
    """A real filter [..., M, N] as [k, k, ..., M/k, N/k, 2] (:func:`_blocks` of the value for the real and for
    the imaginary part), for :func:`_filter_subsample` by k."""
    return _blocks(torch.from_numpy(np.ascontiguousarray(f))[..., None].expand(*f.shape, 2), k)


def _modulus(x: torch.Tensor) -> torch.Tensor:
    """|z| as sqrt(re² + im²) (kymatio's formula; torch.abs uses hypot, which can differ in the last bit); the
    squares on the contiguous real view first (3× faster than squaring the strided parts)."""
    squares = torch.view_as_real(x).square()
    return (squares[..., 0] + squares[..., 1]).sqrt()


def _fft_real(x: torch.Tensor) -> torch.Tensor:
    """Full 2-D FFT of a real signal (torch gives the numbers of kymatio's complex FFT of x + 0i)."""
    return torch.fft.fft2(x)


class Scattering2D:
    """2-D scattering transform of order 2 (or 1) with Morlet wavelets; callable on [..., M, N] float tensors.

    >>> S = Scattering2D(J=2, shape=(28, 28), L=8)
    >>> S(torch.rand(5, 28, 28)).shape
    torch.Size([5, 81, 7, 7])
    """

    def __init__(self, J: int, shape: tuple[int, int], L: int = 8, max_order: int = 2, chunk_size: int = 16) -> None:
        M, N = shape
        if 2**J > M or 2**J > N:
            raise ValueError(f"the image ({M}×{N}) must be at least 2^J = {2**J} pixels on each side")
        if max_order not in (1, 2):
            raise ValueError(f"max_order must be 1 or 2, got {max_order}")
        self.J, self.L, self.shape, self.max_order, self.chunk_size = J, L, (M, N), max_order, chunk_size
        self.padded = padded_size(M, N, J)
        Mp, Np = self.padded
        # reflection padding [top, bottom, left, right], the odd pixel at the bottom/right (kymatio's Pad)
        self.pad = [(Mp - M) // 2, (Mp - M + 1) // 2, (Np - N) // 2, (Np - N + 1) // 2]
        if self.pad[0] >= M or self.pad[2] >= N:
            raise ValueError(f"padding {self.pad} is at least the image size {shape}: use a smaller J")
        bank = filter_bank(Mp, Np, J, L)
        # each filter as _filter_subsample wants it for the subsampling that follows it: φ at resolution 2^-j,
        # subsampled to 2^-J; the L wavelets of scale j (stacked) at resolution 2^-res, subsampled to 2^-j
        self.phi = [_doubled(level, 2 ** (J - j)) for j, level in enumerate(bank["phi"])]
        self.psi = [[_doubled(np.stack([w["levels"][res] for w in bank["psi"] if w["j"] == j]), 2 ** (j - res))
                     for res in range(len(next(w for w in bank["psi"] if w["j"] == j)["levels"]))] for j in range(J)]
        self.channels = scattering_channels(J, L, max_order)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        M, N = self.shape
        return self.channels, M // 2**self.J, N // 2**self.J

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != torch.Size(self.shape):
            raise ValueError(f"expected images of {self.shape} pixels, got {tuple(x.shape[-2:])}")
        if not x.is_floating_point():
            raise TypeError(f"expected a float tensor, got {x.dtype} (scale uint8 images to [0, 1] first)")
        batch = x.shape[:-2]
        flat = x.reshape(-1, *self.shape)
        with torch.no_grad():
            out = torch.cat([self._transform(flat[i:i + self.chunk_size]) for i in range(0, len(flat), self.chunk_size)])\
                if len(flat) else flat.new_zeros((0, *self.output_shape))
        return out.reshape(*batch, *self.output_shape)

    def _lowpass(self, spectrum: torch.Tensor, j: int) -> torch.Tensor:
        """φ_J at resolution 2^-j, subsampled to 2^-J, back to space, border removed: [..., M/2^J, N/2^J]."""
        s = _filter_subsample(spectrum, self.phi[j].to(spectrum.device), 2 ** (self.J - j))
        return torch.fft.ifft2(s).real[..., 1:-1, 1:-1]

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom, left, right = self.pad
        padded = torch.nn.functional.pad(x[:, None], (left, right, top, bottom), mode="reflect")[:, 0]
        U0 = _fft_real(padded.contiguous())  # [B, Mp, Np]
        out = [self._lowpass(U0, 0)[:, None]]
        second: list[torch.Tensor] = []
        for j1 in range(self.J):
            # the L wavelets of scale j1 at once: U1 is [B, θ1, Mp / 2^j1, Np / 2^j1] at resolution 2^-j1
            psi = self.psi[j1][0].to(x.device)
            U1 = _fft_real(_modulus(torch.fft.ifft2(_filter_subsample(U0[:, None], psi, 2**j1))))
            out.append(self._lowpass(U1, j1))
            if self.max_order < 2:
                continue
            # second order from (j1, θ1): every (j2, θ2) with j2 > j1, in kymatio's order (θ1 major, then j2, θ2)
            paths = []
            for j2 in range(j1 + 1, self.J):
                psi2 = self.psi[j2][j1].to(x.device)  # [θ2, ...] at resolution 2^-j1
                U2 = _fft_real(_modulus(torch.fft.ifft2(_filter_subsample(U1[:, :, None], psi2, 2 ** (j2 - j1)))))
                paths.append(self._lowpass(U2, j2))  # [B, θ1, θ2, m, n]
            if paths:
                merged = torch.cat(paths, dim=2)  # [B, θ1, (j2, θ2), m, n]
                second.append(merged.reshape(len(x), -1, *merged.shape[-2:]))
        return torch.cat(out + second, dim=1)

    def features(self, images: np.ndarray | torch.Tensor, progress: bool = False) -> torch.Tensor:
        """uint8 (0..255) or float images [N, M, N'] → float32 features [N, C, M/2^J, N'/2^J], pixels scaled to
        [0, 1] first (as torchvision's ToTensor does)."""
        x = torch.as_tensor(images)
        if not x.is_floating_point():
            x = x.to(torch.float32) / 255.0
        parts = []
        total = len(x)
        step = max(self.chunk_size, 1)
        for start in range(0, total, step):
            parts.append(self(x[start:start + step].to(torch.float32).contiguous()))
            if progress and (start + step) // 10_000 != start // 10_000:  # every 10,000 images
                print(f"  scattering: {min(start + step, total)}/{total} images", flush=True)
        return torch.cat(parts) if parts else torch.zeros((0, *self.output_shape))

