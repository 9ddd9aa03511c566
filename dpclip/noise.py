"""Step 4 of the data path: noise calibrated to the clipping bound, drawn on the parameters' device.

Two samplers:

- the default one: ``torch.randn`` / the difference of two ``exponential_`` draws in the parameters' dtype —
  fast, reproducible from a seed, and exposed to the known floating-point attacks on textbook samplers
  (Mironov 2012 for Laplace; Holohan & Braghin 2021 and Jin et al. 2022 for Gaussian samplers);
- the secure one (``secure_mode=True``): seeds from the OS CSPRNG, draws in float64 as a *sum* of independent
  pieces of the target law (Holohan & Braghin 2021, "Secure Random Sampling in Differential Privacy"), and
  releases ``value + noise`` *snapped* to a power-of-two grid Λ and clamped to ±B (the rounding/clamping of
  Mironov 2012, "On Significance of the Least Significant Bits for Differential Privacy"), so the low-order
  bits of a release carry nothing but the grid.

In exact arithmetic the secure sampler is the same mechanism the accountant charges: a sum of independent
N(0, s²/2) is N(0, s²); the Holohan–Braghin product sum is exactly Laplace(0, 1) (characteristic function
(1 + t²)⁻¹); clamping each coordinate of the input is 1-Lipschitz per coordinate, so it cannot raise the L1 or
L2 sensitivity; rounding, clamping the output and casting to the parameters' dtype are post-processing.
No accounting change is needed. What remains (float-level effects, bounded noise support, a 64-bit seed) is
listed in README § "Secure noise".
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch

from accountants.errors import PrivacyParameterError

from .clipping import Norm
from .errors import ModelNotSupportedError
from .example_grads import as_dense
from .norms import NoiseLaw, clip_norm

Tensor = torch.Tensor

#: Λ is the smallest power of two ≥ noise scale × 2^-GRID_BITS (rounding adds variance ≤ Λ²/12 ≤ 2^-18·s²/12).
GRID_BITS = 10
#: Releases are clamped to ±B with B = Λ · 2^RANGE_BITS (≥ 2^20 noise scales): float64 rounding of
#: value + noise (≤ B·2^-53) then stays ≤ 2^-23 Λ, far below the grid.
RANGE_BITS = 30


def snapping_grid(scale: float) -> float:
    """Λ: the smallest power of two ≥ ``scale`` · 2^-GRID_BITS (a power of two, as in Mironov 2012's snapping mechanism)."""
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"the noise scale must be positive and finite, got {scale!r}")
    return math.ldexp(1.0, math.ceil(math.log2(scale)) - GRID_BITS)


def snapping_bound(scale: float) -> float:
    """B = Λ · 2^RANGE_BITS: every coordinate of a secure release is clamped to [−B, B]."""
    return math.ldexp(snapping_grid(scale), RANGE_BITS)


def secure_standard_gaussian(shape: torch.Size | tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    """N(0, 1) in float64 as (N₁ + N₂)/√2 of two independent draws (Holohan & Braghin 2021; as in diffprivlib)."""
    pair = torch.randn((2, *shape), generator=generator, device=device, dtype=torch.float64)
    return (pair[0] + pair[1]) * math.sqrt(0.5)


def secure_standard_laplace(shape: torch.Size | tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    """Laplace(0, 1) in float64 as ln(1−U₁)cos(πU₂) + ln(1−U₃)cos(πU₄) (Holohan & Braghin 2021).

    Each term is distributed as the product of two independent standard normals (characteristic function
    (1 + t²)^-½), so the sum has characteristic function (1 + t²)⁻¹: exactly the standard Laplace law.
    U ∈ [0, 1) on the 2^-53 grid, so 1 − U ∈ (0, 1] and every logarithm is finite.
    """
    u = torch.rand((4, *shape), generator=generator, device=device, dtype=torch.float64)
    return torch.log1p(-u[0]) * torch.cos(math.pi * u[1]) + torch.log1p(-u[2]) * torch.cos(math.pi * u[3])


def check_real(values: Tensor) -> None:
    """Refuse a complex tensor: ``normal_`` on one gives each real coordinate std scale/√2, not scale."""
    if values.is_complex():
        raise ModelNotSupportedError(f"dpclip adds noise to real tensors only, got {values.dtype}: store the "
                                     "parameter as a real tensor with a trailing dimension of 2 and use "
                                     "torch.view_as_complex on it in forward")


class NoiseSource:
    """One ``torch.Generator`` per device, so noise is drawn where the parameters live (no host copies).

    ``secure_mode=True`` reseeds the generator from the operating system's CSPRNG (``os.urandom``) before every
    draw and refuses a user seed, so noise cannot be replayed from a known seed; it also switches to the
    float-attack-resistant sampler of :meth:`noisy` (the device must support float64: CPU and CUDA do).
    """

    def __init__(self, seed: int | None = None, secure_mode: bool = False) -> None:
        if secure_mode and seed is not None:
            raise PrivacyParameterError(
                f"secure_mode=True draws seeds from the OS; do not pass a seed (got seed={seed!r}): drop the seed for "
                "secure noise and sampling, or drop secure_mode=True for a reproducible run"
            )
        self.secure_mode = secure_mode
        self.seed = int.from_bytes(os.urandom(8), "little") if seed is None else int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    @classmethod
    def from_generator(cls, generator: torch.Generator, module: torch.nn.Module, secure_mode: bool,
                       distributed: bool) -> NoiseSource:
        """Noise drawn from the user's ``generator`` (Opacus's ``noise_generator``), which must live on the device
        of the trainable parameters; refused in secure mode (OS seeds only) and in distributed training (every
        rank draws the same noise from a shared seed: use ``PrivacyEngine(seed=...)``), and refused when never seeded
        (torch's default seed is public)."""
        if not isinstance(generator, torch.Generator):
            raise PrivacyParameterError(f"noise_generator must be a torch.Generator, got {type(generator).__name__}")
        if secure_mode:
            raise PrivacyParameterError(
                "secure_mode=True seeds every noise draw from the operating system; do not pass noise_generator"
            )
        if distributed:
            raise PrivacyParameterError(
                "noise_generator is not used in distributed training: the ranks draw one shared noise from a seed "
                "they agree on; pass PrivacyEngine(seed=...) for reproducible noise"
            )
        devices = {p.device for p in module.parameters() if p.requires_grad}
        if devices != {generator.device}:
            raise PrivacyParameterError(
                f"noise_generator is on {generator.device} but the trainable parameters are on "
                f"{', '.join(sorted(map(str, devices)))}: noise is drawn where the parameters live; create the "
                "generator there, e.g. torch.Generator(device=...)"
            )
        unseeded = torch.Generator().initial_seed()  # every torch.Generator() starts from this public seed
        if generator.initial_seed() == unseeded:
            raise PrivacyParameterError(
                f"noise_generator was never seeded: every torch.Generator() starts from the same public seed "
                f"({unseeded}), so anyone can regenerate its noise and subtract it from the released gradients (no "
                "privacy at all). Seed it secretly, e.g. generator.seed() (from the OS) or "
                "generator.manual_seed(secrets.randbits(63)), or leave noise_generator out (dpclip then seeds its "
                "noise from the OS, or from PrivacyEngine(seed=...)), or use secure_mode=True"
            )
        source = cls(seed=generator.initial_seed())
        source._generators[generator.device] = generator
        return source

    def generator(self, device: torch.device) -> torch.Generator:
        device = torch.device(device)
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        gen = self._generators[device]
        if self.secure_mode:
            gen.manual_seed(int.from_bytes(os.urandom(8), "little"))
        return gen

    def gaussian(self, like: Tensor, std: float) -> Tensor:
        """N(0, std²) per coordinate, shaped and placed like ``like`` (secure mode: drawn in float64, then cast)."""
        gen = self.generator(like.device)
        if self.secure_mode:
            return (secure_standard_gaussian(like.shape, gen, like.device) * std).to(like.dtype)
        return torch.empty(like.shape, device=like.device, dtype=like.dtype).normal_(0.0, std, generator=gen)

    def laplace(self, like: Tensor, scale: float) -> Tensor:
        """Laplace(0, scale) per coordinate: the difference of two Exp(1) draws times the scale (secure mode:
        the Holohan–Braghin sampler in float64, then cast)."""
        gen = self.generator(like.device)
        if self.secure_mode:
            return (secure_standard_laplace(like.shape, gen, like.device) * scale).to(like.dtype)
        first = torch.empty_like(like).exponential_(generator=gen)
        second = torch.empty_like(like).exponential_(generator=gen)
        return (first - second) * scale

    def draw(self, like: Tensor, scale: float, law: NoiseLaw) -> Tensor:
        """The noise alone, shaped and placed like ``like`` (a real float32/float64 tensor): Gaussian of std ``scale``
        or Laplace of scale ``scale`` per coordinate, from the default sampler (secure mode snaps the noisy *sum*,
        :meth:`noisy`, so it never draws through here). The same draws :meth:`noisy` adds its values to."""
        if self.secure_mode:
            raise RuntimeError("secure_mode noise is drawn by noisy(), which snaps the sum")
        check_real(like)
        return self.gaussian(like, scale) if law == "gaussian" else self.laplace(like, scale)

    def noisy(self, values: Tensor, scale: float, law: NoiseLaw, factor: float = 1.0) -> Tensor:
        """``values`` + Gaussian (std ``scale``) or Laplace (scale ``scale``) noise: the released tensor, times
        ``factor`` (post-processing, e.g. 1/B for an average: Gaussian draws take it into their std, one pass).
        Half-precision ``values`` (bf16, fp16) are widened to float32 first and only the release is cast back.

        Secure mode: clamp(values, ±B) in float64, add the secure float64 sample, round to the grid Λ
        (:func:`snapping_grid`), clamp to ±B, cast to ``values.dtype`` — snapping the *sum*, never the noise
        alone (noise on a grid added to an off-grid value would reveal the value modulo Λ).
        """
        if law not in ("gaussian", "laplace"):
            raise ValueError(f"the noise law must be 'gaussian' or 'laplace', got {law!r}")
        check_real(values)
        if self.secure_mode:  # (a sparse sum, an embedding's rows, is clamped and snapped densely below)
            values = as_dense(values)
        if values.dtype in (torch.bfloat16, torch.float16):  # half-precision sums: noise drawn, added and scaled in
            return self.noisy(values.float(), scale, law, factor).to(values.dtype)  # float32; the release cast once
        if not self.secure_mode:  # factor·(values + noise(scale)) = noise(factor·scale) + factor·values: one pass
            # a sparse sum (an embedding's rows) is added into dense noise, only its rows read; the draw is asked for
            # a dense tensor of its shape (a stride-0 stand-in, no memory), as a subclass's gaussian() expects
            like = (values if not values.is_sparse
                    else torch.empty((), dtype=values.dtype, device=values.device).expand(values.shape))
            return self.draw(like, scale * factor, law).add_(values, alpha=factor)
        grid, bound = snapping_grid(scale), snapping_bound(scale)
        sampler = secure_standard_gaussian if law == "gaussian" else secure_standard_laplace
        noise = sampler(values.shape, self.generator(values.device), values.device) * scale
        released = values.to(torch.float64).clamp(-bound, bound) + noise
        snapped = (torch.round(released / grid) * grid).clamp(-bound, bound).to(values.dtype)
        return snapped if factor == 1.0 else snapped.mul_(factor)

    def reseed_from_os(self) -> None:
        """Continue from a fresh OS seed (``os.urandom``): no draw repeats one made from the earlier state."""
        self.seed = int.from_bytes(os.urandom(8), "little") >> 1
        self._generators = {}

    def state_dict(self) -> dict:
        return {"seed": self.seed, "generators": {str(d): g.get_state() for d, g in self._generators.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        self.seed = int(state["seed"])
        self._generators = {}
        for device, gen_state in state["generators"].items():
            gen = torch.Generator(device=torch.device(device))
            gen.set_state(gen_state)
            self._generators[torch.device(device)] = gen


def add_noise(
    summed: Mapping[str, Tensor], noise_multiplier: float, max_norm: float, norm: Norm, source: NoiseSource,
    factor: float = 1.0,
) -> dict[str, Tensor]:
    """Σ clip(g_i) + noise: Gaussian with std σ·C per coordinate for L2, Laplace with scale λ·C for L1
    (snapped to a grid in secure mode, see :meth:`NoiseSource.noisy`), times ``factor`` (post-processing: 1/B
    gives the averaged gradient). ``noise_multiplier=0`` (the non-private baseline, charged ε = ∞) returns the
    sums times ``factor``."""
    if noise_multiplier == 0:
        return {name: as_dense(s) * factor for name, s in summed.items()}
    scale = noise_multiplier * max_norm
    law = clip_norm(norm).noise
    return {name: source.noisy(s, scale, law, factor) for name, s in summed.items()}
