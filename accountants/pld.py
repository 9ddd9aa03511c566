"""Privacy loss distributions (PLDs): discretised pessimistically, composed by FFT, with an error bound.

A pair of output distributions (P, Q) is summarised by its privacy loss L = log(dP/dQ) under P; then
δ(ε) = P(L = ∞) + E_P[(1 − e^{ε−L})₊] (Meiser & Mohammadi 2018; Sommer, Meiser & Mohammadi 2019), and
composing mechanisms adds independent losses, i.e. convolves PLDs (Koskela, Jälkö & Honkela 2020).

Every operation here replaces a pair by one it *dominates in Blackwell's sense* (the old pair is a
post-processing of the new one), so every δ(ε) computed is an upper bound and every ε is never optimistic:

- discretisation by "connect the dots" (Doroshenko, Ghazi, Kamath, Kumar & Manurangsi 2022, §3): the P- and
  Q-masses of every grid cell (a, b] of the loss are split between a and b so that both totals are kept
  (the original cell is the merge of the two atoms);
- re-binning onto a coarser grid (a multiple of the old step) by the same split;
- tail truncation: P-mass above the grid goes to loss +∞ (counted in δ), P-mass below the grid moves up to
  the lowest grid point (its surplus Q-mass goes to loss −∞, which never counts in δ);
- composition by FFT convolution (independent losses add; Koskela et al. 2020), self-composition by
  repeated squaring;
- a run whose loss spans more than MAX_LOSS_RANGE nats is replaced by the closed form of publishing the
  Poisson sample itself (:func:`revealing`), which dominates every noise on it.

The truncated P-mass at +∞ is what limits the smallest resolvable δ (≈ runs × tail); the accountant asks for
finer tails when δ is small (see :class:`Grid`), and composes such masses as 1 − (1−a)(1−b) without rounding
them away.

Alongside each PLD we track how far it may sit above the exact one. Coupling the discretised loss L' with
the exact L, each split moves the loss by N ∈ [a − ℓ, b − ℓ] (a range of one grid step h) with
0 ≤ E[N | ℓ] ≤ m*(h) ≈ h²/8, and truncations fail the coupling with the truncated probability. By
Azuma–Hoeffding, ΣN ≤ s(η) = Σm* + √(Σh²·ln(1/η)/2) except with probability η, which gives the rigorous
lower bound ε_exact(δ) ≥ ε_PLD(δ + η + failure) − s(η) (see :meth:`DiscretePLD.epsilon_lower_bound`).

Mechanisms (adjacency: add/remove one record). With B0 the noise around the sum without the record, B1
around the sum with it (sensitivity 1), Z = log(dB1/dB0) and M = (1−q)B0 + qB1 the Poisson-sampled output,
"remove" is the pair (M, B0) with loss g(Z) = log(1−q+qe^Z) and "add" is (B0, M) with loss −g(Z); these are
the dominating pairs of Poisson subsampling (Zhu, Dong & Wang 2022, "Optimal accounting of differential
privacy via characteristic function"; the same pairs as dp_accounting's REMOVE and ADD), and the reported δ
is the worse of the two. Laplace noise is analysed, as in dp_accounting and :mod:`accountants.rdp`, for
a shift of the whole L1 sensitivity along one coordinate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache

import numpy as np
from scipy import fft as sfft
from scipy.special import log_ndtr, ndtr, ndtri

__all__ = [
    "DiscretePLD",
    "GaussianLaw",
    "LaplaceLaw",
    "LaplaceGaussianLaw",
    "Mechanism",
    "Grid",
    "discretize",
    "compose",
    "self_compose",
]

#: Tail mass cut off after each FFT convolution by default (a little above plain FFT round-off, ~1e-17 per
#: entry). Every truncation is replicated in every later composition, so T runs truncate ≈ T × tail in all.
COMPOSITION_TAIL = 1e-15
#: Tail mass cut off when discretising one mechanism run, as a fraction of the composition tail.
DISCRETIZATION_TAIL_FRACTION = 0.1
DISCRETIZATION_TAIL = COMPOSITION_TAIL * DISCRETIZATION_TAIL_FRACTION
#: Smallest composition tail a grid may ask for: below it, the tails of long compositions sink into the
#: round-off of the split convolution (see :func:`_convolve`) and arrays stop shrinking.
MIN_COMPOSITION_TAIL = 1e-19
#: Finest and coarsest grid steps the automatic grid will choose (powers of two).
MIN_STEP_EXPONENT, MAX_STEP_EXPONENT = -24, -3
#: Longest PLD kept after a composition: longer ones (heavy tails, e.g. tiny q with small σ) get a coarser grid.
MAX_COMPOSED_POINTS = 1 << 18
#: Grids beyond the coarsest step keep at most this many × points_per_std points per standard deviation.
MAX_OVERSAMPLING = 8.0
#: Largest number of grid points of one mechanism's PLD; the grid is coarsened beyond it.
MAX_POINTS = 1 << 19
#: Widest loss range (nats) of one Poisson-sampled run that is discretised; wider runs (σ ≲ 0.003: the sampled
#: record all but revealed, ε ≳ 3e4 per run) get the closed form :func:`revealing`, exact to double precision
#: for every ε below ~1e4. Unsampled runs (one bell, resolved by any step relative to its spread) go to 2^40.
MAX_LOSS_RANGE = 2.0**16
MAX_LOSS_RANGE_UNSAMPLED = 2.0**40
_DIRECT_CONVOLUTION = 64  # arrays at most this long are convolved directly


def _pow2_floor(x: float) -> int:
    """Largest exponent e with 2^e ≤ x (x > 0)."""
    return math.floor(math.log2(x))


def split_bias(step: float) -> float:
    """sup over ℓ ∈ [a, a+h] of E[L' − ℓ] for the connect-the-dots split of an atom at ℓ onto {a, a+h}.

    The split sends ℓ to a+h with probability (1−e^{−(ℓ−a)})/(1−e^{−h}); the mean shift is maximal at
    e^{−u} = (1−e^{−h})/h, where it equals r − 1 − log r with r = h/(1−e^{−h}) (≈ h²/8).
    """
    if step <= 0:
        return 0.0
    x = (step + math.expm1(-step)) / -math.expm1(-step)  # r − 1
    return max(x - math.log1p(x), 0.0) * (1 + 1e-9) + 1e-300


# ---------------------------------------------------------------------------------------------------
# Discrete PLD
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class DiscretePLD:
    """P-masses ``pmf[i]`` at losses (offset + i)·step, plus ``inf_mass`` at loss +∞.

    The error fields bound how far this PLD may sit above the exact one (see the module docstring):
    ``noise_sq`` = Σ h² and ``noise_abs`` = Σ h over all splits, ``bias`` = Σ m*(h), ``failure`` = total
    truncated probability, ``runs`` = number of mechanism runs composed.
    """

    step: float
    offset: int
    pmf: np.ndarray
    inf_mass: float = 0.0
    noise_sq: float = 0.0
    noise_abs: float = 0.0
    bias: float = 0.0
    failure: float = 0.0
    runs: int = 1

    @staticmethod
    def identity(step: float) -> "DiscretePLD":
        """The PLD of releasing nothing: all mass at loss 0."""
        return DiscretePLD(step, 0, np.ones(1), runs=0)

    @property
    def losses(self) -> np.ndarray:
        return (self.offset + np.arange(self.pmf.size)) * self.step

    def mean_std(self) -> tuple[float, float]:
        """Mean and standard deviation of the finite part of the loss under P (computed once, then cached)."""
        return self._moments

    @cached_property
    def _moments(self) -> tuple[float, float]:
        p = self.pmf
        total = float(p.sum())
        if total <= 0:
            return 0.0, 0.0
        idx = _index(p.size)
        m = float(np.einsum("i,i->", idx, p)) / total
        var = float(np.einsum("i,i,i->", idx, idx, p)) / total - m * m
        return (self.offset + m) * self.step, math.sqrt(max(var, 0.0)) * self.step

    # -- queries -------------------------------------------------------------------------------
    @cached_property
    def _upper(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Losses ℓ > 0 and their masses, with suffix sums Σ_{i ≥ j} p_i and log Σ_{i ≥ j} p_i e^{−ℓ_i}.

        The second sum is accumulated in log space: e^{−ℓ} underflows for the ℓ ≳ 745 of very weak privacy.
        """
        start = max(0, -self.offset + 1 if self.offset <= 0 else 0)
        p = self.pmf[start:]
        ell = (self.offset + start + _index(p.size)) * self.step
        if p.size and ell[0] <= 0:  # fixed grids: guard against round-off in the first loss
            keep = ell > 0
            p, ell = p[keep], ell[keep]
        sp = np.append(np.cumsum(p[::-1])[::-1], 0.0)
        with np.errstate(divide="ignore"):
            log_w = np.log(p) - ell
        log_sq = np.append(np.logaddexp.accumulate(log_w[::-1])[::-1], -np.inf) if p.size else np.array([-np.inf])
        return ell, p, sp, log_sq

    def delta_for_epsilon(self, epsilon: float) -> float:
        """δ(ε) = P(L = ∞) + Σ_{ℓ > ε} p(ℓ)(1 − e^{ε−ℓ}) (Sommer, Meiser & Mohammadi 2019, Thm. 1)."""
        if epsilon >= 0:
            ell, p, _, _ = self._upper
            j = int(np.searchsorted(ell, epsilon, side="right"))
            ell, p = ell[j:], p[j:]
        else:
            ell, p = self.losses, self.pmf
            keep = ell > epsilon
            ell, p = ell[keep], p[keep]
        tail = float(np.einsum("i,i->", p, -np.expm1(epsilon - ell))) if p.size else 0.0
        return min(1.0, self.inf_mass + tail)

    def epsilon_for_delta(self, delta: float) -> float:
        """Smallest ε ≥ 0 with δ(ε) ≤ delta (math.inf if the mass at +∞ alone reaches delta)."""
        if self.inf_mass >= delta:
            return math.inf
        ell, p, sp, log_sq = self._upper
        if p.size == 0 or self.inf_mass + sp[0] - math.exp(log_sq[0]) <= delta:
            return 0.0
        # δ at ε = ℓ_j counts the atoms above ℓ_j: inf + sp[j+1] − e^{ℓ_j} sq[j+1]; it decreases in j.
        at_grid = self.inf_mass + sp[1:] - np.exp(ell + log_sq[1:])
        j = int(np.argmax(at_grid <= delta))  # the last grid point always qualifies (δ = inf_mass)
        # On (ℓ_{j−1}, ℓ_j] the atoms above ε are j, j+1, ...: δ(ε) = inf + sp[j] − e^ε sq[j].
        low = ell[j - 1] if j > 0 else 0.0
        numerator = self.inf_mass + sp[j] - delta
        eps = math.log(numerator) - log_sq[j] if numerator > 0 and np.isfinite(log_sq[j]) else float(ell[j])
        eps = min(max(eps, low), float(ell[j]))
        # Round-off guard: confirm δ(ε) ≤ delta by direct summation over the atoms above ε, else nudge up.
        tail_p, tail_ell = p[j:], ell[j:]
        for _ in range(64):
            direct = self.inf_mass + float(np.einsum("i,i->", tail_p, -np.expm1(eps - tail_ell)))
            if direct <= delta or eps >= ell[j]:
                break
            eps = min(float(ell[j]), eps + max(abs(eps), 1.0) * 1e-13 * 4.0 ** _)
        return float(eps)

    def epsilon_lower_bound(self, delta: float) -> float:
        """A rigorous lower bound on the ε of the exact PLD this one was computed from.

        Coupling the discretised loss with the exact one, the total shift is ≤ s(η) = bias + √(Σh²·ln(1/η)/2)
        except with probability η + failure (Azuma–Hoeffding), and always ≤ Σh except with probability
        failure; then ε_exact(δ) ≥ ε_PLD(δ + η + failure) − s(η). The best of a few η is returned.
        """
        candidates = []
        for eta, shift in [(0.0, self.noise_abs)] + [
            (delta * f, self.bias + math.sqrt(self.noise_sq * -(math.log(delta) + math.log(f)) / 2.0))
            for f in (0.5, 0.1, 1e-2, 1e-3, 1e-4)
        ]:
            inflated = delta + eta + self.failure
            if inflated < 1.0:
                candidates.append(self.epsilon_for_delta(inflated) - shift)
        return max([0.0] + [c for c in candidates if math.isfinite(c)])

    # -- transformations -----------------------------------------------------------------------
    def rebin(self, step: float) -> "DiscretePLD":
        """The same PLD on the grid ``step`` = k × self.step (k integer), by connect-the-dots splits.

        One split of the whole PLD: it adds one term of range ``step`` to the error bookkeeping.
        """
        ratio = int(round(step / self.step))
        if ratio <= 1:
            return self
        if abs(ratio * self.step - step) > 1e-9 * step:
            raise ValueError(f"rebin needs an integer multiple of the step, got {step} / {self.step}")
        start = (self.offset // ratio) * ratio  # integer arithmetic: offsets may exceed 2^53
        lead = self.offset - start
        if ratio <= max(self.pmf.size, 1 << 16):
            n = -(-(lead + self.pmf.size) // ratio) * ratio
            padded = np.zeros(n)
            padded[lead : lead + self.pmf.size] = self.pmf
            blocks = padded.reshape(-1, ratio)
            up = -np.expm1(-np.arange(ratio) * self.step) / -math.expm1(-step)  # share of a+u sent to a+step
            upper = np.einsum("ij,j->i", blocks, up)
            total = blocks.sum(axis=1)
        else:  # far coarser than the PLD is wide: its atoms fall into at most two cells (no ratio-long arrays)
            i = _index(self.pmf.size)
            first = ratio - lead  # atoms i < first lie in the first cell
            low = i < first
            up = -np.expm1(-np.where(low, lead + i, i - first) * self.step) / -math.expm1(-step)
            weighted = self.pmf * up
            upper = np.array([weighted[low].sum(), weighted[~low].sum()])
            total = np.array([self.pmf[low].sum(), self.pmf[~low].sum()])
        pmf = np.zeros(total.size + 1)
        pmf[:-1] += np.maximum(total - upper, 0.0)
        pmf[1:] += np.maximum(upper, 0.0)
        return _trimmed(
            replace(
                self,
                step=step,
                offset=start // ratio,
                pmf=pmf,
                noise_sq=self.noise_sq + step * step,
                noise_abs=self.noise_abs + step,
                bias=self.bias + split_bias(step),
            )
        )

    def truncate(self, tail: float) -> "DiscretePLD":
        """Move at most ``tail`` P-mass from the top to +∞ and at most ``tail`` from the bottom up to the grid."""
        p = self.pmf
        if p.size <= 2:
            return self
        cut_hi, moved_hi = _tail_cut(p[::-1], tail)  # number of top atoms whose total mass is ≤ tail
        cut_lo, moved_lo = _tail_cut(p, tail)
        hi_end = p.size - cut_hi
        if hi_end - cut_lo < 2:
            return self
        if cut_hi == 0 and cut_lo == 0:
            return self
        kept = p[cut_lo:hi_end].copy()
        kept[0] += moved_lo
        return replace(
            self,
            offset=self.offset + cut_lo,
            pmf=kept,
            inf_mass=min(1.0, self.inf_mass + moved_hi),
            failure=self.failure + moved_hi + moved_lo,
        )


def _tail_cut(p: np.ndarray, tail: float) -> tuple[int, float]:
    """Largest k with p[0] + ... + p[k−1] ≤ tail, and that sum (scanning from the start in growing chunks)."""
    chunk = 1024
    done, total = 0, 0.0
    while done < p.size:
        part = np.cumsum(p[done : done + chunk]) + total
        k = int(np.searchsorted(part, tail, side="right"))
        if k < part.size:
            return done + k, float(part[k - 1]) if k > 0 else total
        done, total = done + part.size, float(part[-1])
        chunk *= 4
    return p.size, total


@lru_cache(maxsize=8)
def _index_cache(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float64)


def _index(n: int) -> np.ndarray:
    """0, 1, ..., n−1 as floats (from a cached array at least n long, grown in powers of two)."""
    return _index_cache(1 << max(n - 1, 1).bit_length())[:n]


def _trimmed(pld: DiscretePLD) -> DiscretePLD:
    """Drop exact zeros at both ends of the pmf (no mass moves)."""
    p = pld.pmf
    if p[0] != 0 and p[-1] != 0:
        return pld
    nonzero = p != 0
    if not nonzero.any():
        return replace(pld, pmf=np.zeros(1))
    first = int(np.argmax(nonzero))
    last = p.size - int(np.argmax(nonzero[::-1]))
    return replace(pld, offset=pld.offset + first, pmf=p[first:last].copy())


_EPS = float(np.finfo(np.float64).eps)
_HEAD_THRESHOLD = 1e-7  # entries ≥ this × max form the "head" of a pmf (see _convolve)


def _rfft_conv(a: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """a ∗ b (a ∗ a if b is None) by real FFTs, or directly for short arrays."""
    nb = a.size if b is None else b.size
    if min(a.size, nb) <= _DIRECT_CONVOLUTION:
        return np.convolve(a, a if b is None else b)
    n_out = a.size + nb - 1
    n = sfft.next_fast_len(n_out, real=True)
    fa = sfft.rfft(a, n)
    return sfft.irfft(fa * fa if b is None else fa * sfft.rfft(b, n), n)[:n_out]


def _head_span(p: np.ndarray) -> tuple[int, int]:
    big = np.flatnonzero(p >= _HEAD_THRESHOLD * p.max())
    return int(big[0]), int(big[-1]) + 1


def _convolve(a: np.ndarray, b: np.ndarray | None = None, tail: float = COMPOSITION_TAIL) -> np.ndarray:
    """Linear convolution a ∗ b (a ∗ a if b is None) with small absolute round-off in the tails.

    FFT round-off is ~1e-2·ε_mach·‖a‖₂‖b‖₂ per entry, spread over the whole output; summed over a long tail
    it can exceed the truncation tolerance and hide where the tail really ends. When that could happen, each
    pmf is split into its head (the span of entries ≥ 1e-7 × max, which dominates ‖·‖₂) and a thin tail t:
    a ∗ b = h_a ∗ h_b + (t_a ∗ b + h_a ∗ t_b). The head product is a short FFT whose round-off stays near the
    bulk; the rest has round-off scaled by ‖t‖₂, which is tiny. Negative round-off is clipped to 0.
    """
    square = b is None
    bb = a if square else b
    n_out = a.size + bb.size - 1
    # Measured mean positive round-off is ≤ 0.02 ε‖a‖‖b‖ per entry; split only if it could sum past tail/2.
    noise = 0.02 * _EPS * math.sqrt(float(np.einsum("i,i->", a, a)) * float(np.einsum("i,i->", bb, bb))) * n_out
    if noise <= tail / 2 or min(a.size, bb.size) <= _DIRECT_CONVOLUTION:
        out = _rfft_conv(a, None if square else bb)
    else:
        a0, a1 = _head_span(a)
        b0, b1 = (a0, a1) if square else _head_span(bb)
        head = _rfft_conv(a[a0:a1], None if square else bb[b0:b1])
        ta = a.copy()
        ta[a0:a1] = 0.0
        n = sfft.next_fast_len(n_out, real=True)
        if square:  # a∗a = h∗h + t∗(a + h)
            spectrum = sfft.rfft(ta, n) * sfft.rfft(a + (a - ta), n)
        else:  # a∗b = h_a∗h_b + t_a∗b + h_a∗t_b
            tb = bb.copy()
            tb[b0:b1] = 0.0
            spectrum = sfft.rfft(ta, n) * sfft.rfft(bb, n) + sfft.rfft(a - ta, n) * sfft.rfft(tb, n)
        out = sfft.irfft(spectrum, n)[:n_out]
        out[a0 + b0 : a0 + b0 + head.size] += head
    np.maximum(out, 0.0, out=out)
    return out


# ---------------------------------------------------------------------------------------------------
# Grids: fixed step (as dp_accounting) or automatic (a power of two scaled to the loss spread)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """Grid policy. ``step`` fixed (never changed), or None: automatic, step ≈ std / ``points_per_std``.

    Automatic grids are powers of two, so every grid nests in every coarser one; after each composition the
    PLD is re-binned (pessimistically) to ≈ std/points_per_std of the result, which keeps arrays short
    while the loss spreads out under composition. ``tail`` is the P-mass truncated after each composition
    (a tenth of it when discretising one run); it bounds the resolvable δ from below (≈ runs × tail).
    ``max_exponent``: steps stay ≤ 2^max_exponent while that keeps ≤ 8 × points_per_std points per std.
    """

    step: float | None = None
    points_per_std: float = 512.0
    tail: float = COMPOSITION_TAIL
    max_exponent: int = MAX_STEP_EXPONENT

    def coarser(self, factor: int = 8) -> "Grid":
        """The same policy ``factor`` (a power of two) times coarser, for cheap first bounds."""
        exponent = self.max_exponent + _pow2_floor(factor)
        return replace(self, points_per_std=self.points_per_std / factor, max_exponent=exponent)

    @property
    def discretization_tail(self) -> float:
        return self.tail * DISCRETIZATION_TAIL_FRACTION

    def step_for(self, std: float) -> float:
        if self.step is not None:
            return self.step
        if not std > 0:
            return 2.0**MIN_STEP_EXPONENT
        e = min(max(_pow2_floor(std / self.points_per_std), MIN_STEP_EXPONENT), self.max_exponent)
        # Very wide losses (ε in the hundreds or more) go coarser: at most MAX_OVERSAMPLING × points_per_std per std.
        return 2.0 ** max(e, _pow2_floor(std / (MAX_OVERSAMPLING * self.points_per_std)))


def compose(a: DiscretePLD, b: DiscretePLD, grid: Grid, tail: float | None = None) -> DiscretePLD:
    """PLD of running both mechanisms (independent losses add): FFT convolution, then truncation.

    ``tail`` (default: the grid's) is the P-mass each side that truncation may move.
    """
    tail = grid.tail if tail is None else tail
    step = max(a.step, b.step)
    if grid.step is None:
        var = a.mean_std()[1] ** 2 + b.mean_std()[1] ** 2
        step = max(step, grid.step_for(math.sqrt(var)))
    square = a is b
    (mean_a, std_a), (mean_b, std_b) = a.mean_std(), b.mean_std()
    a = a.rebin(step)
    b = a if square else b.rebin(step)
    pmf = _convolve(a.pmf, None if square else b.pmf, tail)
    result = DiscretePLD(
        step=step,
        offset=a.offset + b.offset,
        pmf=pmf,
        # P(L_a + L_b = ∞) = 1 − (1−x)(1−y), written so that masses far below 1e-16 are not rounded away.
        inf_mass=min(1.0, a.inf_mass + b.inf_mass - a.inf_mass * b.inf_mass),
        noise_sq=a.noise_sq + b.noise_sq,
        noise_abs=a.noise_abs + b.noise_abs,
        bias=a.bias + b.bias,
        failure=a.failure + b.failure,
        runs=a.runs + b.runs,
    )
    result = _trimmed(result).truncate(tail)
    while result.pmf.size > MAX_COMPOSED_POINTS:  # heavy tails the truncation cannot shorten: a coarser grid
        result = result.rebin(2 * result.step)
    # Independent losses: means and variances add (only used to choose later grids).
    result.__dict__["_moments"] = (mean_a + mean_b, math.sqrt(std_a**2 + std_b**2))
    return result


def self_compose(pld: DiscretePLD, count: int, grid: Grid) -> DiscretePLD:
    """PLD of ``count`` runs, by repeated squaring (uncached; see :func:`fold` for the cached version)."""
    result: DiscretePLD | None = None
    power = pld
    while count:
        if count & 1:
            result = power if result is None else compose(result, power, grid)
        count >>= 1
        if count:
            power = compose(power, power, grid)
    return result if result is not None else DiscretePLD.identity(pld.step)


# ---------------------------------------------------------------------------------------------------
# Noise laws: the distribution of Z = log(dB1/dB0) under B0 and under B1
# ---------------------------------------------------------------------------------------------------


def _phi_diff(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Φ(hi) − Φ(lo) for lo ≤ hi, accurate in both tails."""
    upper = lo > 0
    return np.where(upper, ndtr(-lo) - ndtr(-hi), ndtr(hi) - ndtr(lo))


def _log_phi_diff(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """log(Φ(hi) − Φ(lo)) for lo < hi, without overflow or cancellation in either tail."""
    hi, lo = np.broadcast_arrays(np.asarray(hi, dtype=np.float64), np.asarray(lo, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        upper = lo > 0
        a = np.where(upper, log_ndtr(-lo), log_ndtr(hi))
        b = np.where(upper, log_ndtr(-hi), log_ndtr(lo))
        out = a + np.log1p(-np.exp(b - a))
    return out


class _Law:
    """Distribution of Z = log(dB1/dB0) for a noise pair; cdf/sf are right-continuous P(Z ≤ z), P(Z > z)."""

    z_min = -math.inf
    z_max = math.inf
    # Points where P(Z ≤ split) ≥ ½ ≥ P(Z > split) under B0 (resp. B1): masses come from the CDF below the
    # split and from the survival function above it, so tail masses never cancel against 1.
    split0 = 0.0
    split1 = 0.0

    def cdf0(self, z: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def sf0(self, z: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def cdf1(self, z: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def sf1(self, z: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def support(self, tail: float) -> tuple[float, float]:
        """(z_lo, z_hi) with P(Z < z_lo) ≤ tail and P(Z > z_hi) ≤ tail under both B0 and B1."""
        raise NotImplementedError


@dataclass(frozen=True)
class GaussianLaw(_Law):
    """Gaussian noise σ, sensitivity 1: Z ~ N(∓μ²/2, μ²) under B0/B1 with μ = 1/σ (Balle & Wang 2018, Lemma 5)."""

    sigma: float

    @property
    def mu(self) -> float:
        return 1.0 / self.sigma

    @property
    def split0(self) -> float:  # type: ignore[override]
        return -self.mu**2 / 2

    @property
    def split1(self) -> float:  # type: ignore[override]
        return self.mu**2 / 2

    def cdf0(self, z):
        return ndtr((z + self.mu**2 / 2) / self.mu)

    def sf0(self, z):
        return ndtr(-(z + self.mu**2 / 2) / self.mu)

    def cdf1(self, z):
        return ndtr((z - self.mu**2 / 2) / self.mu)

    def sf1(self, z):
        return ndtr(-(z - self.mu**2 / 2) / self.mu)

    def support(self, tail):
        k = -ndtri(tail)
        return -self.mu**2 / 2 - k * self.mu, self.mu**2 / 2 + k * self.mu


@dataclass(frozen=True)
class LaplaceLaw(_Law):
    """Laplace noise b, sensitivity 1: Z = (|x| − |x−1|)/b ∈ [−1/b, 1/b], atoms at both ends.

    Under B0 = Lap(0, b): P(Z = −1/b) = ½, P(Z = 1/b) = e^{−1/b}/2, density e^{−w/2 − 1/(2b)}/4 between;
    under B1 the density is e^w times that (Koskela et al. 2021, §6; Dwork & Roth 2014, §3.3).
    """

    b: float

    @property
    def z_min(self) -> float:  # type: ignore[override]
        return -1.0 / self.b

    @property
    def z_max(self) -> float:  # type: ignore[override]
        return 1.0 / self.b

    @property
    def split0(self) -> float:  # type: ignore[override]
        return -1.0 / self.b  # P_B0(Z = −1/b) = ½

    @property
    def split1(self) -> float:  # type: ignore[override]
        return 1.0 / self.b

    def _parts(self, z):
        z = np.asarray(z, dtype=np.float64)
        r = 1.0 / self.b
        inside = (z >= -r) & (z < r)
        zc = np.clip(z, -r, r)
        return z, r, inside, zc

    def cdf0(self, z):
        z, r, inside, zc = self._parts(z)
        mid = -np.expm1(-(zc + r) / 2) / 2 + 0.5  # 1 − e^{−(z+r)/2}/2
        return np.where(z < -r, 0.0, np.where(inside, mid, 1.0))

    def sf0(self, z):
        z, r, inside, zc = self._parts(z)
        mid = np.exp(-(zc + r) / 2) / 2
        return np.where(z < -r, 1.0, np.where(inside, mid, 0.0))

    def cdf1(self, z):
        z, r, inside, zc = self._parts(z)
        mid = np.exp((zc - r) / 2) / 2
        return np.where(z < -r, 0.0, np.where(inside, mid, 1.0))

    def sf1(self, z):
        z, r, inside, zc = self._parts(z)
        mid = -np.expm1((zc - r) / 2) / 2 + 0.5
        return np.where(z < -r, 1.0, np.where(inside, mid, 0.0))

    def support(self, tail):
        return -1.0 / self.b, 1.0 / self.b


@dataclass(frozen=True)
class LaplaceGaussianLaw(_Law):
    """Laplace(b) and Gaussian(σ) noise on the same record (both sensitivity 1): Z = Z_L + Z_G.

    Closed form of the convolution (integrating e^{cw}Φ(α+βw) in w):
    P_B0(Z ≤ t) = Φ((t + 1/b + μ²/2)/μ) − ½ e^{−(t+1/b)/2 − μ²/8} [Φ((t+1/b)/μ) − Φ((t−1/b)/μ)],
    and Z under B1 is distributed as −Z under B0 (reflect x ↦ 1 − x).
    """

    b: float
    sigma: float

    @property
    def split0(self) -> float:  # type: ignore[override]
        return -0.5 / self.sigma**2 + 1.0 / self.b  # Z ≤ Z_G + 1/b and Z_G has median −μ²/2 under B0

    @property
    def split1(self) -> float:  # type: ignore[override]
        return 0.5 / self.sigma**2 - 1.0 / self.b

    def _terms(self, t):
        t = np.nan_to_num(np.asarray(t, dtype=np.float64), posinf=1e300, neginf=-1e300)
        t = np.clip(t, -1e15, 1e15)  # ±∞ (from the loss-to-Z map) stay far outside every support
        mu, r = 1.0 / self.sigma, 1.0 / self.b
        gauss_hi = (t + r + mu * mu / 2) / mu
        log_mid = -(t + r) / 2 - mu * mu / 8 + _log_phi_diff((t + r) / mu, (t - r) / mu) - math.log(2.0)
        with np.errstate(over="ignore"):
            mid = np.exp(log_mid)
        return gauss_hi, mid

    def cdf0(self, z):
        gauss_hi, mid = self._terms(z)
        return np.maximum(ndtr(gauss_hi) - mid, 0.0)

    def sf0(self, z):
        gauss_hi, mid = self._terms(z)
        return np.minimum(ndtr(-gauss_hi) + mid, 1.0)

    def cdf1(self, z):
        return self.sf0(-np.asarray(z, dtype=np.float64))

    def sf1(self, z):
        return self.cdf0(-np.asarray(z, dtype=np.float64))

    def support(self, tail):
        mu, r = 1.0 / self.sigma, 1.0 / self.b
        k = -ndtri(tail)
        return -mu * mu / 2 - k * mu - r, mu * mu / 2 + k * mu + r


@dataclass(frozen=True)
class Mechanism:
    """One run of noise ``law`` on a Poisson sample at rate ``q`` (q = 1: no sampling)."""

    law: _Law
    q: float = 1.0

    def __str__(self) -> str:
        return f"{self.law} sampled at q={self.q:g}"


# ---------------------------------------------------------------------------------------------------
# Discretisation of one mechanism run (connect the dots on exact cell masses)
# ---------------------------------------------------------------------------------------------------


def _masses(cdf, sf, z: np.ndarray, split: float) -> tuple[np.ndarray, float, float]:
    """Masses of (z_i, z_{i+1}] for increasing z, and P(Z ≤ z_0), P(Z > z_last).

    The CDF is evaluated at points ≤ ``split`` and the survival function above it, so that tail masses are
    differences of small numbers (no cancellation against 1).
    """
    n = z.size
    s = int(np.searchsorted(z, split, side="right"))
    lo, hi = cdf(z[:s]), sf(z[s:])
    m = np.empty(n - 1)
    if s >= 2:
        m[: s - 1] = np.diff(lo)
    if 0 < s < n:
        m[s - 1] = 1.0 - lo[-1] - hi[0]
    if s < n - 1:
        m[s:] = -np.diff(hi)
    below = float(lo[0]) if s > 0 else 1.0 - float(hi[0])
    above = float(hi[-1]) if s < n else 1.0 - float(lo[-1])
    return np.maximum(m, 0.0), max(below, 0.0), max(above, 0.0)


def _loss_range(mech: Mechanism, direction: str, tail: float) -> tuple[float, float]:
    """Range of the loss holding all but ``tail`` of the P-mass on each side (exact ends where bounded)."""
    z_lo, z_hi = mech.law.support(tail)
    q = mech.q
    if q == 1.0:
        return z_lo, z_hi
    g = lambda z: float(np.logaddexp(math.log1p(-q), math.log(q) + z))  # log(1 − q + q e^z)  # noqa: E731
    if direction == "remove":
        low = g(z_lo) if math.isfinite(mech.law.z_min) else math.log1p(-q)
        return low, g(z_hi)
    high = -g(z_lo) if math.isfinite(mech.law.z_min) else -math.log1p(-q)
    return -g(z_hi), high


def _sampled_loss_to_z(ell: np.ndarray, q: float) -> np.ndarray:
    """Z = log(1 + (e^L − 1)/q), the inverse of L = log(1 − q + q e^Z), without overflow for large L.

    For L > 0 it is L − log q + log(1 − (1 − q)e^{−L}); for L ≤ log(1 − q) it is −∞.
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        high = ell + np.log1p(-(1.0 - q) * np.exp(-np.maximum(ell, 0.0))) - math.log(q)
        low = np.log1p(np.maximum(np.expm1(np.minimum(ell, 0.0)) / q, -1.0))
    return np.where(ell > 0, high, low)


def discretize(
    mech: Mechanism,
    direction: str,
    step: float,
    tail: float = DISCRETIZATION_TAIL,
    loss_range: tuple[float, float] | None = None,
) -> DiscretePLD:
    """Pessimistic PLD of one run of ``mech`` on the grid ``step`` (Doroshenko et al. 2022, connect the dots).

    Each grid cell (a, b] of the loss receives its exact P-mass P_c and Q-mass Q_c (from the noise CDFs);
    they are split as p_b = (P_c − e^a Q_c)/(1 − e^{−h}) at b and P_c − p_b at a, which keeps both masses.
    The grid covers ``loss_range`` (default: all but ``tail`` of the mass each side); P-mass below it moves
    up to its lowest point and P-mass above it goes to +∞.
    """
    law, q = mech.law, mech.q
    if direction not in ("remove", "add"):
        raise ValueError(f"direction must be 'remove' or 'add', got {direction!r}")
    if q == 1.0:
        direction = "remove"  # symmetric noise: both directions have the same PLD
    lo, hi = _loss_range(mech, direction, tail) if loss_range is None else loss_range
    k_lo = math.ceil(lo / step) - 1
    k_hi = math.floor(hi / step) + 1
    ell = np.arange(k_lo, k_hi + 1) * step  # cell boundaries
    if q == 1.0:
        z = ell
    elif direction == "remove":  # L = log(1 − q + q e^Z)  ⇔  Z = log(1 + (e^L − 1)/q)
        z = _sampled_loss_to_z(ell, q)
    else:  # L = −log(1 − q + q e^Z)
        z = _sampled_loss_to_z(-ell, q)[::-1]
    m0, below0, above0 = _masses(law.cdf0, law.sf0, z, law.split0)
    m1, below1, above1 = _masses(law.cdf1, law.sf1, z, law.split1)
    if direction == "add":  # z was reversed to increase; cells come back in loss order
        m0, m1 = m0[::-1], m1[::-1]
    if q == 1.0:
        p_cell, q_cell = m1, m0
        below, above = below1, above1
    elif direction == "remove":
        p_cell, q_cell = (1 - q) * m0 + q * m1, m0
        below, above = (1 - q) * below0 + q * below1, (1 - q) * above0 + q * above1
    else:
        p_cell, q_cell = m0, (1 - q) * m0 + q * m1
        below, above = above0, below0  # z reversed: the largest z gives the lowest loss
    a = ell[:-1]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # 1 − e^a Q_c / P_c = 1 − e^{a − ℓ̄} where ℓ̄ = log(P_c/Q_c) ∈ [a, b] is the cell's merged loss.
        one_minus = -np.expm1(a + np.log(q_cell) - np.log(p_cell))
    one_minus = np.where(p_cell > 0, one_minus, 0.0)  # q_cell = 0 gives 1 (all up), overflow −∞ (clipped)
    frac_up = np.clip(one_minus / -math.expm1(-step), 0.0, 1.0)
    upper = p_cell * frac_up
    pmf = np.zeros(ell.size)
    pmf[:-1] += p_cell - upper
    pmf[1:] += upper
    pmf[0] += below
    pld = DiscretePLD(
        step=step,
        offset=k_lo,
        pmf=pmf,
        inf_mass=min(1.0, above),
        noise_sq=step * step,
        noise_abs=step,
        bias=split_bias(step),
        failure=below + above,
        runs=1,
    )
    return _trimmed(pld)


def revealing(mech: Mechanism, direction: str, step: float) -> DiscretePLD:
    """Closed-form PLD of publishing the Poisson sample itself, which dominates every run of ``mech``.

    Any noise on the sample is a post-processing of the sample, so this pair dominates (Blackwell). With
    B0, B1 disjoint, "remove" (M, B0) has loss +∞ with probability q and log(1 − q) otherwise; "add" (B0, M)
    has loss −log(1 − q) with probability 1 (the Poisson-subsampling dominating pairs of Zhu, Dong & Wang
    2022, see the module docstring, with B0 ⊥ B1). Finite losses are rounded up to the grid. ``failure`` = 1: it claims no closeness to the
    exact PLD, so :meth:`DiscretePLD.epsilon_lower_bound` certifies nothing from it.
    """
    q = mech.q
    if q == 1.0:
        loss, mass, inf_mass = 0.0, 0.0, 1.0
    elif direction == "remove":
        loss, mass, inf_mass = math.log1p(-q), 1.0 - q, q
    else:
        loss, mass, inf_mass = -math.log1p(-q), 1.0, 0.0
    return DiscretePLD(
        step=step,
        offset=math.ceil(loss / step),
        pmf=np.array([mass]),
        inf_mass=inf_mass,
        noise_sq=step * step,
        noise_abs=step,
        bias=step,
        failure=1.0,
    )


def discretize_auto(mech: Mechanism, direction: str, grid: Grid) -> DiscretePLD:
    """:func:`discretize` on the grid policy's step; automatic grids refine until step ≤ std/points_per_std.

    A run whose loss spreads over more than :data:`MAX_LOSS_RANGE` nats (tiny σ or b: the record is all but
    revealed) gets the closed form :func:`revealing` instead; the accountant's RDP bound covers large ε there.
    """
    tail = grid.discretization_tail
    lo, hi = _loss_range(mech, direction if mech.q < 1 else "remove", tail)
    if not hi - lo <= (MAX_LOSS_RANGE if mech.q < 1 else MAX_LOSS_RANGE_UNSAMPLED):  # also NaN
        return revealing(mech, direction, grid.step if grid.step is not None else 2.0**MIN_STEP_EXPONENT)
    if grid.step is not None:
        return discretize(mech, direction, grid.step, tail)
    coarsest = 2.0 ** (_pow2_floor(max(hi - lo, 1e-300) / MAX_POINTS) + 1)
    step = max(2.0 ** min(max(_pow2_floor(max(hi - lo, 1e-300) / 4096) + 1, MIN_STEP_EXPONENT), 8), coarsest)
    pld = discretize(mech, direction, step, tail)
    for _ in range(12):
        # The split inflates the variance by at most h²/4, so this std never exceeds the exact one.
        _, std = pld.mean_std()
        std = math.sqrt(max(std * std - step * step / 4, 0.0))
        target = max(grid.step_for(std), coarsest)
        if target >= step:
            return pld.rebin(target) if target > step else pld
        # Refine only where this PLD holds all but `tail` of the P-mass each side ([lo, hi] spans both B0 and
        # B1, and one direction's mass may sit in a sliver of it, e.g. "add" with a small σ), ≤ 64× at a time.
        lo, hi = _mass_range(pld, tail, lo, hi)
        coarsest = 2.0 ** (_pow2_floor(max(hi - lo, 1e-300) / MAX_POINTS) + 1)
        step = max(target, step / 64, coarsest)
        pld = discretize(mech, direction, step, tail, (lo, hi))
    return pld


def _mass_range(pld: DiscretePLD, tail: float, lo: float, hi: float) -> tuple[float, float]:
    """The part of [lo, hi] outside which ``pld`` holds at most ``tail`` P-mass on each side (one cell of margin)."""
    p = pld.pmf
    cut_lo, _ = _tail_cut(p, tail)
    cut_hi, _ = _tail_cut(p[::-1], tail)
    if cut_lo + cut_hi >= p.size:
        return lo, hi
    return max(lo, (pld.offset + cut_lo - 1) * pld.step), min(hi, (pld.offset + p.size - cut_hi) * pld.step)


# ---------------------------------------------------------------------------------------------------
# Cached compositions
# ---------------------------------------------------------------------------------------------------


def _canonical(mech: Mechanism, direction: str) -> str:
    return "remove" if mech.q == 1.0 else direction


@lru_cache(maxsize=384)
def _power(mech: Mechanism, direction: str, grid: Grid, k: int) -> DiscretePLD:
    """PLD of 2^k runs of ``mech`` (cached, so a growing count reuses earlier squarings)."""
    if k == 0:
        pld = discretize_auto(mech, direction, grid)
    else:
        half = _power(mech, direction, grid, k - 1)
        pld = compose(half, half, grid)
    pld.pmf.setflags(write=False)
    return pld


@lru_cache(maxsize=96)
def _fold_cached(mech: Mechanism, direction: str, grid: Grid, count: int) -> DiscretePLD:
    result: DiscretePLD | None = None
    k = 0
    while count:
        power = _power(mech, direction, grid, k)  # every k in turn: the cache then never recurses deeply
        if count & 1:
            result = power if result is None else compose(result, power, grid)
        count >>= 1
        k += 1
    assert result is not None
    result.pmf.setflags(write=False)
    return result


def fold(mech: Mechanism, direction: str, grid: Grid, count: int) -> DiscretePLD:
    """PLD of ``count`` ≥ 1 runs of ``mech`` in ``direction`` ('remove' or 'add'), memoised."""
    return _fold_cached(mech, _canonical(mech, direction), grid, count)


def clear_cache() -> None:
    """Forget memoised PLDs (benchmarks use it to time cold computations)."""
    _power.cache_clear()
    _fold_cached.cache_clear()
