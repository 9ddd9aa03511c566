"""One layer use's share of each example's gradient, in a form that gives norms and clipped sums cheaply.

A :class:`Contribution` stands for the gradients g_i (one per example i) that one call of a layer adds to one
parameter (or to a block of its rows). It answers the two questions clipping asks — each example's norm and the
weighted sum Σ_i c_i g_i — without necessarily forming every g_i ("book-keeping", Bu et al. 2023,
"Differentially Private Optimization on Large Model at Small Cost").
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..clipping import Norm
from ..example_grads import all_kept, kept_rows, masked_scale, weighted_example_sum
from ..norms import clip_norm

Tensor = torch.Tensor

# Unit roundoff of float32 and float64 (Higham, "Accuracy and Stability of Numerical Algorithms", §2.1).
_U32 = 2.0**-24
_U64 = 2.0**-53


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-p for the dtype's p-bit significand (float32: 2^-24; float64: 2^-53; half types are computed in float32)."""
    return _U64 if dtype == torch.float64 else _U32


def vector_norms(values: Tensor, norm: Norm) -> Tensor:
    """Norm of each example's slice of ``values`` [batch, ...], in float32 or wider."""
    return clip_norm(norm).vector(values)


#: Per-example gradients formed in one step are formed in pieces along the batch of at most this many bytes.
#: glibc's malloc serves a block above its mmap threshold (32 MiB at most) with fresh pages from the kernel each
#: time and unmaps them on free, whatever its settings, so one larger block costs a page fault and a zero fill per
#: 4 KiB in every step; smaller pieces come from the heap, which :func:`dpclip.retain_freed_memory` keeps for the
#: next step (benchmarks/README.md, "Seventh round"). A 6-layer d = 256 transformer keeps blocks of up to 64 MiB.
PIECE_BYTES = 16 * 2**20


def batch_pieces(batch: int, example_bytes: int) -> list[slice]:
    """Consecutive slices of a batch, each covering at most :data:`PIECE_BYTES` of examples of ``example_bytes``
    bytes (one example at least)."""
    step = max(1, PIECE_BYTES // max(1, example_bytes))
    return [slice(start, min(start + step, batch)) for start in range(0, batch, step)]


class ExamplePieces:
    """Per-example gradients [batch, ...] kept as pieces along the batch (:func:`batch_pieces`): the norms and the
    clipped sum read them piece by piece, so no block larger than :data:`PIECE_BYTES` is formed."""

    def __init__(self, batch: int, example_bytes: int, form: Callable[[slice], Tensor]) -> None:
        """``form(examples)``: the gradients of the examples in that slice of the batch."""
        self.pieces = [(examples, form(examples)) for examples in batch_pieces(batch, example_bytes)]

    def whole(self) -> Tensor:
        """All of them as one tensor [batch, ...]."""
        if len(self.pieces) == 1:
            return self.pieces[0][1]
        return torch.cat([values for _, values in self.pieces])

    def norms(self, norm: Norm) -> Tensor:
        return torch.cat([vector_norms(values, norm) for _, values in self.pieces])

    def weighted(self, factors: Tensor) -> Tensor:
        """Σ_i factors[i] · g_i (:func:`weighted_example_sum`, piece by piece)."""
        total: Tensor | None = None
        for examples, values in self.pieces:
            part = weighted_example_sum(values, factors[examples])
            total = part if total is None else total.add_(part)
        assert total is not None  # a batch has one example at least
        return total


def pieces_norms(batch: int, example_bytes: int, form: Callable[[slice], Tensor], norm: Norm) -> Tensor:
    """Each example's norm of gradients formed piece by piece (:func:`batch_pieces`) and dropped after each."""
    return torch.cat([vector_norms(form(examples), norm) for examples in batch_pieces(batch, example_bytes)])


class CacheBudget:
    """Bytes of per-example gradients that the contributions sharing it may form once and keep for the clipped sum.

    :class:`~dpclip.grads.tape.LayerwiseGradients` gives one budget to all of a step's contributions, so the kept
    gradients stay bounded however many layers the model has; the first layers to ask get them."""

    def __init__(self, total: float) -> None:
        self.left = total

    def take(self, size: int) -> bool:
        """Reserve ``size`` bytes if that many are left."""
        if size > self.left:
            return False
        self.left -= size
        return True


class Contribution:
    """The gradients one use of a layer adds to parameter ``name`` (rows ``rows`` of it, or all of it).

    ``budget``: what the contributions of one step may keep between the norms and the clipped sum, shared (no
    limit beyond each class's own ``cache_bytes`` where none was given)."""

    def __init__(self, name: str, rows: slice | None = None) -> None:
        self.name = name
        self.rows = rows
        self.budget = CacheBudget(math.inf)

    def materialize(self) -> Tensor:
        """Every example's gradient block: [batch, *block shape]."""
        raise NotImplementedError

    def norm(self, norm: Norm) -> Tensor:
        """Each example's norm of this block (an upper bound where it is not computed exactly)."""
        return vector_norms(self.materialize(), norm)

    def weighted(self, factors: Tensor) -> Tensor:
        """Σ_i factors[i] · g_i, shaped like the block; examples with factor 0 contribute exactly 0."""
        return weighted_example_sum(self.materialize(), factors)

    def after_norm(self) -> None:
        """The step's norm of this block is formed: let go of what only the norm reads. Called as each norm is
        formed, so that what a block no longer needs is freed while the other blocks' norms are formed (the
        step holds the most then: every layer's recorded tensors, plus the per-example gradients kept so far)."""

    def weighted_rows(self, factors: Tensor) -> Tensor:
        """:meth:`weighted`, or the same sum as a sparse COO tensor of the block's shape where only some rows of the
        block receive gradient (an embedding's looked-up rows): the noisy release adds it into the noise without
        forming or reading a dense block of zeros. Dense here; a contribution overrides it where rows pay."""
        return self.weighted(factors)

    def add_weighted(self, out: Tensor, factors: Tensor) -> None:
        """``out`` += Σ_i factors[i] · g_i in place (``out``: a dense tensor shaped like the block, e.g. the noise the
        sum is released in). A contribution overrides it where the sum can be formed inside ``out``."""
        out.add_(self.weighted_rows(factors).to(out.dtype))

    def joined(self, others: list[Contribution]) -> Contribution | None:
        """One contribution equal to the sum of this one and ``others`` (further uses of the same block: a layer
        called more than once per example), or None where this kind cannot join them (the caller then adds their
        per-example gradients up in full)."""
        return None


class Materialized(Contribution):
    """Per-example gradients held in full (the per-layer vmap fallback, recurrent cells...)."""

    def __init__(self, name: str, grads: Tensor, rows: slice | None = None) -> None:
        super().__init__(name, rows)
        self.grads = grads

    def materialize(self) -> Tensor:
        return self.grads


def _frobenius(values: Tensor, u: float) -> Tensor:
    """Each example's L2 norm of ``values`` [B, ...] over all its entries, in float64, inflated to an upper bound
    on the exact norm (Higham 2002, §3.1: |fl(x·y) − x·y| ≤ γ_n |x|·|y|, n the entries summed)."""
    entries = math.prod(values.shape[1:])
    return torch.linalg.vector_norm(values, dim=tuple(range(1, values.dim()))).double() * (1 + (entries + 4) * u)


class LinearWeight(Contribution):
    """Weight gradient Σ_t g_t a_tᵀ of a linear map; ``a``: [B, T, in], ``g``: [B, T, out].

    ``transposed`` stores it as [in, out] (transformers' ``Conv1D``). L2 norms use the ghost identity
    ‖Σ_t g_t a_tᵀ‖² = Σ_{t,s} (a_t·a_s)(g_t·g_s) (Goodfellow 2015; Li et al. 2022, "Large Language Models Can
    Be Strong Differentially Private Learners", §4) when T² ≤ in·out, accumulated in float64 and returned as an
    upper bound that covers its own rounding (Higham 2002, Thm. 3.1/3.5): the sum can cancel, and a norm that
    came out too small would let an example's clipped gradient exceed C.
    """

    #: Per-example gradients up to this size are formed once and kept: the norm then costs what the clipped sum
    #: would (B·T·in·out), and the clipped sum becomes a B·in·out contraction — cheaper than the ghost identity's
    #: B·T²·(in + out) plus a B·T·in·out weighted product ("mixed" clipping, Bu et al. 2023). Larger layers use the
    #: ghost identity (or chunks), which never holds them.
    cache_bytes = 64 * 2**20

    def __init__(self, name: str, rows: slice | None, a: Tensor, g: Tensor, shape: torch.Size, transposed: bool = False) -> None:
        super().__init__(name, rows)
        self.a, self.g, self.shape, self.transposed = a, g, shape, transposed
        self.batch, self.positions, self.d_in, self.d_out = a.shape[0], a.shape[1], a.shape[2], g.shape[2]
        self.u = unit_roundoff(a.dtype)  # the precision the book-keeping sum is formed in
        self._cached: ExamplePieces | None = None
        self._spreads: dict[int, Tensor] = {}  # _spread's, by order

    def _rows(self, examples: slice = slice(None)) -> Tensor:
        """The gradients of the examples in ``examples`` as the matrices the layer stores: [b, out, in] ([b, in,
        out] if transposed)."""
        a, g = self.a[examples], self.g[examples]
        return torch.bmm(a.transpose(1, 2), g) if self.transposed else torch.bmm(g.transpose(1, 2), a)

    def _example_bytes(self) -> int:
        return self.d_in * self.d_out * max(self.a.element_size(), 4)

    def _shaped(self, rows: Tensor) -> Tensor:
        """``rows`` [..., out, in] (one matrix, or one per example) in the parameter's shape."""
        return rows.reshape(*rows.shape[:-2], *self.shape)

    def materialize(self) -> Tensor:
        return self._shaped(self._cached.whole() if self._cached is not None else self._rows())

    def _keeps(self) -> bool:
        """Whether the per-example gradients are formed and kept (several positions, and they fit in cache_bytes
        and in what is left of the step's budget)."""
        size = self.batch * self._example_bytes()
        return self.positions > 1 and size <= self.cache_bytes and self.budget.take(size)

    def _widened(self) -> tuple[Tensor, Tensor]:
        """``a`` and ``g`` in the precision the statistics are formed in (float32, or float64 if given)."""
        return (self.a, self.g) if self.a.dtype == torch.float64 else (self.a.float(), self.g.float())

    def _spread(self, order: int) -> Tensor:
        """An upper bound on Σ_t ‖a_t‖‖g_t‖ (L``order``) per example, which scales the rounding slack. L2: ‖a‖_F‖g‖_F
        (Cauchy–Schwarz) from two whole-example norms, cheap where per-position ones are not (a short, strided
        channel dim: conv output gradients) and about as tight; equal to the sum when T = 1. L1: per position (a
        whole-example product would be up to T times looser). Once ``a`` and ``g`` are let go (:meth:`after_norm`,
        after a norm that left its own spread), the other order's from it: L1 as √(in·out) times the L2 one
        (‖v‖₁ ≤ √n‖v‖₂, then Cauchy–Schwarz), L2 as the L1 one (‖v‖₂ ≤ ‖v‖₁ per position, and the L1 spread bounds
        Σ_t ‖a_t‖‖g_t‖ itself)."""
        if order in self._spreads:
            return self._spreads[order]
        if not hasattr(self, "a"):
            if 2 in self._spreads:
                return self._spreads[2] * (math.sqrt(self.d_in * self.d_out) * (1 + 4 * _U64))
            return self._spreads[1]
        if order == 2:
            spread = self._input_norm() * _frobenius(self._widened()[1], self.u)
        else:
            a, g = self._widened()
            a_norms = a.norm(p=1, dim=2).double() * (1 + (self.d_in + 4) * self.u)
            g_norms = g.norm(p=1, dim=2).double() * (1 + (self.d_out + 4) * self.u)
            spread = (a_norms * g_norms).sum(dim=1)
        self._spreads[order] = spread
        return spread

    def _input_norm(self) -> Tensor:
        """Each example's ‖a‖_F over all its positions (an upper bound, float64)."""
        return _frobenius(self._widened()[0], self.u)

    def norm(self, norm: Norm) -> Tensor:
        positions, d_in, d_out, u, batch = self.positions, self.d_in, self.d_out, self.u, self.batch
        if self._cached is None and self._keeps():
            self._cached = ExamplePieces(batch, self._example_bytes(), self._rows)
        if self._cached is not None or norm == "l1" or positions * positions > d_in * d_out:
            if self._cached is not None:
                norms = self._cached.norms(norm)
            else:  # formed for the norms only, piece by piece
                norms = pieces_norms(batch, self._example_bytes(), self._rows, norm)
            slack = (positions + 2) * u * self._spread(2 if norm == "l2" else 1)  # forming Σ_t g_t a_tᵀ in that precision
            return norms.double() + 2 * slack
        if positions == 1:  # ‖g aᵀ‖ = ‖a‖‖g‖, with a's own norm (not a subclass's bound on it: ConvPatches')
            a, g = self._widened()  # each norm inflated as _frobenius does, times 1 + 3u: forming g aᵀ's one product
            inflation = (1 + (d_in + 4) * u) * (1 + (d_out + 4) * u) * (1 + (positions + 2) * u)
            a_norms = torch.linalg.vector_norm(a, dim=(1, 2)).double()
            return a_norms.mul_(torch.linalg.vector_norm(g, dim=(1, 2)).double()).mul_(inflation)
        a, g = self._widened()
        a_gram, g_gram = a @ a.transpose(1, 2), g @ g.transpose(1, 2)
        # Σ_t ‖a_t‖‖g_t‖ from the Grams' diagonals (each a float32 dot product: inflated as above), an upper bound
        # that scales every rounding error below.
        a_norms = a_gram.diagonal(dim1=1, dim2=2).clamp_min(0).double().sqrt() * (1 + (d_in + 4) * u)
        g_norms = g_gram.diagonal(dim1=1, dim2=2).clamp_min(0).double().sqrt() * (1 + (d_out + 4) * u)
        spread = (a_norms * g_norms).sum(dim=1)
        slack = (positions + 2) * u * spread  # forming Σ_t g_t a_tᵀ in that precision (the book-keeping sum does)
        squared = (a_gram * g_gram).sum(dim=(1, 2), dtype=torch.float64)
        rounding = (d_in + d_out + 4) * u * spread.square()  # the Gram products' rounding, summed in float64
        loose = rounding > 1e-3 * squared.clamp_min(0)  # cancellation: redo those examples in float64
        if bool(loose.any()):
            a64, g64 = self.a[loose].double(), self.g[loose].double()
            squared[loose] = ((a64 @ a64.transpose(1, 2)) * (g64 @ g64.transpose(1, 2))).sum(dim=(1, 2))
            rounding[loose] = (2 * positions + d_in + d_out + 8) * _U64 * spread[loose].square()
        return (squared + rounding).clamp_min(0).sqrt() + slack

    def after_norm(self) -> None:
        # the clipped sum reads the kept gradients only; the norm that formed them left its spread (_spread)
        if self._cached is not None and hasattr(self, "a"):
            del self.a, self.g

    def _joins(self, other: Contribution) -> bool:
        return (type(other) is type(self) and other.rows == self.rows and other.shape == self.shape  # type: ignore[attr-defined]
                and other.transposed == self.transposed and other._cached is None  # type: ignore[attr-defined]
                and all(o.dtype == s.dtype and o.device == s.device and o.shape[0] == s.shape[0]
                        for o, s in ((other.a, self.a), (other.g, self.g))))  # type: ignore[attr-defined]

    def joined(self, others: list[Contribution]) -> Contribution | None:
        """Σ_c Σ_t g_ct a_ctᵀ over calls c is one linear-map gradient over the calls' positions side by side: the
        same norms (the ghost identity then covers the cross-call terms) without forming per-example gradients."""
        if self._cached is not None or not all(self._joins(other) for other in others):
            return None
        parts = [self, *others]
        out = copy.copy(self)
        out._spreads = {}
        out.a = torch.cat([part.a for part in parts], dim=1)  # type: ignore[attr-defined]
        out.g = torch.cat([part.g for part in parts], dim=1)  # type: ignore[attr-defined]
        out.positions = out.a.shape[1]
        return out

    def _operands(self, factors: Tensor) -> tuple[Tensor, Tensor]:
        """The clipped sum's two factors, Σ_i c_i G_iᵀA_i = (c ⊙ G)ᵀA over all rows: [B·T, in] and [B·T, out]."""
        kept = all_kept(factors)
        g = masked_scale(self.g, factors, kept).reshape(-1, self.g.shape[2])
        a = kept_rows(self.a, factors, kept).reshape(-1, self.a.shape[2])
        return a, g

    def weighted(self, factors: Tensor) -> Tensor:
        if self._cached is not None:  # the per-example gradients the norm formed
            return self._shaped(self._cached.weighted(factors))
        a, g = self._operands(factors)
        return self._shaped(a.transpose(0, 1) @ g if self.transposed else g.transpose(0, 1) @ a)

    def add_weighted(self, out: Tensor, factors: Tensor) -> None:
        """The clipped sum's matrix product accumulated straight into ``out`` (``addmm_``: no block of its own, no
        pass to add it), where the block is stored as the product gives it and in ``out``'s precision."""
        if self._cached is not None or self.a.dtype != out.dtype or not out.is_contiguous():
            return super().add_weighted(out, factors)
        a, g = self._operands(factors)
        matrix = out.view(self.d_in, self.d_out) if self.transposed else out.view(self.d_out, self.d_in)
        if self.transposed:
            matrix.addmm_(a.transpose(0, 1), g)
        else:
            matrix.addmm_(g.transpose(0, 1), a)


class Summed(Contribution):
    """A gradient that is a sum over positions of ``values`` [B, T, *block]: biases, norm-layer affines."""

    def __init__(self, name: str, values: Tensor, rows: slice | None = None) -> None:
        super().__init__(name, rows)
        self.values = values
        self._sum: Tensor | None = None

    def materialize(self) -> Tensor:
        if self._sum is None:  # asked for twice: by the norm, then by the weighted sum
            self._sum = self.values.sum(dim=1)
            del self.values  # only the sum is read again
        return self._sum

    def joined(self, others: list[Contribution]) -> Contribution | None:
        """Several calls' values side by side along the positions: their sum is the same sum."""
        def joins(other: Contribution) -> bool:
            return (type(other) is Summed and other.rows == self.rows and other._sum is None  # type: ignore[attr-defined]
                    and other.values.shape[:1] + other.values.shape[2:] == self.values.shape[:1] + self.values.shape[2:]  # type: ignore[attr-defined]
                    and other.values.dtype == self.values.dtype and other.values.device == self.values.device)  # type: ignore[attr-defined]

        if self._sum is not None or not all(joins(other) for other in others):
            return None
        return Summed(self.name, torch.cat([self.values, *(other.values for other in others)], dim=1), self.rows)  # type: ignore[attr-defined]


class EmbeddingWeight(Contribution):
    """Rows Σ_{t: id_t = v} w_t g_t of an embedding; ``ids``: [B, T], ``g``: [B, T, E].

    ``scale_grad_by_freq`` divides each position's gradient by the count of its id in the example (torch
    counts within the batch; per example it is the example's own count).
    """

    def __init__(self, name: str, ids: Tensor, g: Tensor, num_embeddings: int, scale_grad_by_freq: bool = False) -> None:
        super().__init__(name)
        same = ids[:, :, None] == ids[:, None, :]
        if scale_grad_by_freq:
            g = g / same.sum(dim=2, keepdim=True).to(g.dtype)
        self.ids, self.g, self.num_embeddings, self._same = ids, g, num_embeddings, same

    def norm(self, norm: Norm) -> Tensor:
        # Gather each example's rows at the first position of every distinct id, then take the norm.
        first = self._same.to(torch.int8).argmax(dim=2)
        rows = torch.zeros_like(self.g).scatter_add_(1, first[..., None].expand_as(self.g), self.g)
        return vector_norms(rows, norm)

    def materialize(self) -> Tensor:
        batch, _, width = self.g.shape
        out = self.g.new_zeros(batch, self.num_embeddings, width)
        return out.scatter_add_(1, self.ids[..., None].expand_as(self.g), self.g)

    def weighted(self, factors: Tensor) -> Tensor:
        out = self.g.new_zeros(self.num_embeddings, self.g.shape[2])
        return out.index_add_(0, self.ids.reshape(-1), masked_scale(self.g, factors).reshape(-1, self.g.shape[2]))

    def weighted_rows(self, factors: Tensor) -> Tensor:
        """The clipped sum as the B·T scaled rows at their ids (a sparse COO tensor [vocab, E], duplicates not yet
        added up): with a large vocabulary, the dense zeros and the pass that adds them to the noise cost more than
        the rows themselves. The ids index the table already (F.embedding refused any other in the forward)."""
        rows = masked_scale(self.g, factors).reshape(-1, self.g.shape[2])
        return torch.sparse_coo_tensor(self.ids.reshape(1, -1), rows, (self.num_embeddings, self.g.shape[2]),
                                       check_invariants=False)


class ConvWeight(Contribution):
    """Per-example ConvNd weight gradients from the layer's input ``x`` and output gradient ``g``.

    Norms: each example's gradient is the convolution's own weight backward on that example alone, vmapped (torch
    batches it as one grouped convolution, cheaper than unfolding the input into patches); on one input channel
    (on CPU), one grouped forward convolution of the input with the output gradients (:func:`single_channel_grads`).
    When all of them fit in ``cache_bytes`` (and in what is left of the step's budget) they are kept (in pieces,
    :class:`ExamplePieces`), and the clipped sum is one contraction Σ_i c_i ∇W_i over them (B × |W| work).
    Otherwise they are computed piece by piece for the norms and dropped, and the clipped sum is one ordinary
    batched weight backward with each g_i scaled by c_i (the weight gradient is linear in the output gradient; Bu
    et al. 2023's book-keeping), the cost of the non-private weight gradient.
    """

    cache_bytes = 256 * 2**20

    def __init__(self, name: str, module: nn.Module, x: Tensor, g: Tensor) -> None:
        super().__init__(name)
        self.module, self.x, self.g = module, x, g
        self.batch = x.shape[0]
        self._cached: ExamplePieces | None = None
        self._keep: bool | None = None  # decided once, when first asked
        weight = module.weight  # type: ignore[union-attr]
        self.example_bytes = weight.numel() * weight.element_size()
        self.transposed_conv = isinstance(module, nn.modules.conv._ConvTransposeNd)
        self.output_padding = output_padding_of_call(module, x, g) if self.transposed_conv else [0] * (weight.dim() - 2)

    def _weight_backward(self, x: Tensor, g: Tensor) -> Tensor:
        """The weight gradient of the convolution for input ``x`` and output gradient ``g`` (batched over dim 0)."""
        conv = self.module
        return torch.ops.aten.convolution_backward(
            g, x, conv.weight, None, conv.stride, conv.padding, conv.dilation,  # type: ignore[union-attr]
            self.transposed_conv, self.output_padding, conv.groups, [False, True, False],  # type: ignore[union-attr]
        )[1]

    def _grads(self, examples: slice) -> Tensor:
        """The per-example weight gradients of the examples in that slice of the batch."""
        x, g = self.x[examples], self.g[examples]
        with torch.no_grad():
            if single_channel(self.module) and x.device.type == "cpu":  # (measured on CPU only)
                return single_channel_grads(self.module, x, g)
            return torch.func.vmap(lambda xi, gi: self._weight_backward(xi[None], gi[None]))(x, g)

    def _kept(self) -> bool:
        """Whether every example's gradient fits in cache_bytes and the step's budget: then they are formed once
        and kept."""
        if self._keep is None:
            size = self.batch * self.example_bytes
            self._keep = size <= self.cache_bytes and self.budget.take(size)
        return self._keep

    def _kept_grads(self) -> ExamplePieces | None:
        """The kept per-example gradients (formed on first use), or None where they are not kept."""
        if self._cached is None and self._kept():
            self._cached = ExamplePieces(self.batch, self.example_bytes, self._grads)
            del self.x, self.g  # the clipped sum reads the kept gradients only: let the recorded tensors go
        return self._cached

    def materialize(self) -> Tensor:
        kept = self._kept_grads()
        return kept.whole() if kept is not None else self._grads(slice(None))

    def norm(self, norm: Norm) -> Tensor:
        kept = self._kept_grads()
        if kept is not None:
            return kept.norms(norm)
        return pieces_norms(self.batch, self.example_bytes, self._grads, norm)

    def weighted(self, factors: Tensor) -> Tensor:
        kept = self._kept_grads()
        if kept is not None:  # the norm formed them
            return kept.weighted(factors)
        with torch.no_grad():
            kept_all = all_kept(factors)
            return self._weight_backward(kept_rows(self.x, factors, kept_all), masked_scale(self.g, factors, kept_all))


def output_padding_of_call(conv: nn.Module, x: Tensor, g: Tensor) -> list[int]:
    """The output padding one call of a transposed ConvNd ran with, read off its input ``x`` and output gradient
    ``g`` [B, C, *spatial]: per dim, out = (in − 1)·s − 2p + d·(k − 1) + 1 + output_padding (torch's
    ConvTranspose2d documentation). A call with ``output_size=...`` picks its own padding, not the module's
    ``output_padding`` attribute, so the per-example weight backward takes it from the sizes."""
    geometry = zip(x.shape[2:], g.shape[2:], conv.stride, conv.padding, conv.dilation, conv.kernel_size)  # type: ignore[union-attr, arg-type]
    return [out - ((size - 1) * s - 2 * p + d * (k - 1) + 1) for size, out, s, p, d, k in geometry]


def single_channel(conv: nn.Module) -> bool:
    """Whether ``conv`` is an ordinary convolution (groups = 1, not transposed) on one input channel: its
    per-example weight gradients come from :func:`single_channel_grads`."""
    return (not isinstance(conv, nn.modules.conv._ConvTransposeNd) and conv.groups == 1  # type: ignore[union-attr]
            and conv.in_channels == 1)  # type: ignore[union-attr]


def single_channel_grads(conv: nn.Module, x: Tensor, g: Tensor) -> Tensor:
    """Per-example weight gradients [B, C_out, 1, *kernel] of a :func:`single_channel` ConvNd from its input ``x``
    and output gradient ``g``, as one grouped convolution: ∇W_i[o, 0, k] = Σ_t g_i[o, t] x_i[t·s + k·d − p] is
    the correlation of x_i with g_i[o] dilated by the stride s, read at steps of the dilation d (Rochette et al.
    2019, "Efficient Per-Example Gradient Computations in Convolutional Neural Networks", §3). With one input
    channel the examples become the channels of one input, one group each (the vmapped weight backward runs a
    grouped weight backward instead: 1.6× slower on the DP CNN's first layer, 1 → 16, kernel 8, stride 2, and
    1.15–1.3× on one-channel 3 × 3 and 5 × 5 layers at 28 × 28, batch 256, one thread; with three or more input
    channels the vmapped one was as fast or faster, up to 5×).
    The correlation's output is at least the kernel's size; the entries past it are not gradients and are cut."""
    batch, out_channels = g.shape[:2]
    dims = g.dim() - 2
    correlate = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    kernels = g.reshape(batch * out_channels, 1, *g.shape[2:])
    grads = correlate(x.transpose(0, 1), kernels, None, conv.dilation, conv.padding, conv.stride, batch)  # type: ignore[union-attr]
    kernel = conv.kernel_size  # type: ignore[union-attr]
    grads = grads[(slice(None), slice(None), *(slice(0, k) for k in kernel))]
    return grads.reshape(batch, out_channels, 1, *kernel)


def _zero_padded(conv: nn.Module, x: Tensor) -> Tensor:
    """``x`` with the convolution's zero padding on every spatial side (``x`` itself without padding)."""
    pad = [p for size in reversed(conv.padding) for p in (size, size)]  # type: ignore[union-attr]
    return nn.functional.pad(x, pad) if any(pad) else x


def conv_patches(conv: nn.Module, x: Tensor) -> Tensor:
    """The patches a ConvNd (groups = 1, not transposed) multiplies its weight with: [B, T, k_1·…·k_d·C_in], one
    row per output position, columns ordered (kernel offsets, then input channel).

    Built as a strided view of the zero-padded input in channels-last order, so the one copy that forms the rows
    reads runs of C_in contiguous values (about twice as fast as ``F.unfold``'s channel-major order on CPU)."""
    dims = x.dim() - 2
    padded = _zero_padded(conv, x)
    last = padded.movedim(1, -1).contiguous()  # [B, *spatial, C]
    spatial = last.shape[1:-1]
    kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation  # type: ignore[union-attr]
    out = [(spatial[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(dims)]
    steps = last.stride()
    view = last.as_strided(
        (last.shape[0], *out, *kernel, last.shape[-1]),
        (steps[0], *(steps[1 + i] * stride[i] for i in range(dims)), *(steps[1 + i] * dilation[i] for i in range(dims)), steps[-1]),
    )
    return view.reshape(last.shape[0], math.prod(out), -1)


def phase_patches(conv: nn.Module, x: Tensor) -> Tensor:
    """The same patches as :func:`conv_patches`, columns ordered (C_in, phases r_1…r_d, taps a_1…a_d), for a
    ConvNd without dilation whose kernel is a multiple of its stride in every dim; returned as a transposed view
    [B, T, K] of a [B, K, T] tensor (so :class:`ConvPatches` multiplies it untransposed: Σ_t p_t g_tᵀ, [K, C_out]).

    Polyphase form: with stride s, kernel offset j = a·s + r (r < s, a < k/s) reads input s·t + j = s·(t + a) + r,
    entry t + a of phase r (the input's entries ≡ r mod s). So the input is split once into its s_1·…·s_d phases,
    and each (channel, phase, tap) column is a window of a phase shifted by a: its copy reads runs of out_d
    contiguous values — longer than :func:`conv_patches`' runs of k_d·C_in on layers with few input channels and
    wide outputs (a first layer on one grey channel: 7× faster on 1→16, k 3, at 28×28)."""
    dims = x.dim() - 2
    padded = _zero_padded(conv, x)
    kernel, stride = conv.kernel_size, conv.stride  # type: ignore[union-attr]
    batch, channels = padded.shape[:2]
    out = [(padded.shape[2 + i] - kernel[i]) // stride[i] + 1 for i in range(dims)]
    taps = [kernel[i] // stride[i] for i in range(dims)]
    reach = [out[i] + taps[i] - 1 for i in range(dims)]  # the entries of each phase the windows read
    cropped = padded[(slice(None), slice(None), *(slice(0, reach[i] * stride[i]) for i in range(dims)))]
    split = cropped.reshape(batch, channels, *(v for i in range(dims) for v in (reach[i], stride[i])))
    order = [0, 1, *(3 + 2 * i for i in range(dims)), *(2 + 2 * i for i in range(dims))]
    phases = split.permute(order).contiguous()  # [B, C, *phases, *reach]
    steps = phases.stride()
    inner = steps[2 + dims:]
    windows = phases.as_strided((batch, channels, *stride, *taps, *out), (*steps[: 2 + dims], *inner, *inner))
    return windows.reshape(batch, -1, math.prod(out)).transpose(1, 2)


def phases_pay(conv: nn.Module, g: Tensor) -> bool:
    """Whether :class:`ConvPatches` builds its patches by :func:`phase_patches`: possible without dilation and
    with every kernel side a multiple of its stride; chosen when its copy's contiguous runs (the last side of the
    output gradient ``g``) are longer than :func:`conv_patches`' (k_d·C_in), measured by ``benchmarks/conv_routes.py``."""
    kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation  # type: ignore[union-attr]
    if any(d != 1 for d in dilation) or any(k % s for k, s in zip(kernel, stride)):
        return False
    return g.shape[-1] > kernel[-1] * conv.in_channels  # type: ignore[union-attr, operator]


@functools.lru_cache(maxsize=256)
def _reads(spatial: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...],
           padding: tuple[int, ...]) -> Tensor:
    """n(p): how many patches read input entry p, [*spatial] (float64). Per dim, entry p is read by output t
    through kernel offset j when t·s + j·d = p + pad; the count over all dims is the product of the dims' counts."""
    counts = []
    for i, (size, k, s, d, pad) in enumerate(zip(spatial, kernel, stride, dilation, padding)):
        out = (size + 2 * pad - d * (k - 1) - 1) // s + 1
        padded = torch.zeros(size + 2 * pad, dtype=torch.float64)
        for j in range(k):
            padded[j * d: j * d + s * (out - 1) + 1: s] += 1
        counts.append(padded[pad: pad + size].reshape([-1 if a == i else 1 for a in range(len(spatial))]))
    return functools.reduce(torch.mul, counts)


@functools.lru_cache(maxsize=256)
def _root_reads(spatial: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...],
                padding: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """√n(p) (:func:`_reads`) on ``device`` in ``dtype``, formed once per shape: no host-to-device copy per step."""
    return _reads(spatial, kernel, stride, dilation, padding).sqrt().to(device, dtype)


def patch_norms(conv: nn.Module, x: Tensor, u: float) -> Tensor:
    """Each example's ‖patches‖_F (:func:`conv_patches`), from the input without forming them: ‖P‖² = Σ_p n(p)·x_p²
    with n(p) the patches that read entry p (zero padding adds nothing). An upper bound: x·√n rounds each entry by
    at most (1 + u)², and the norm covers its own rounding (:func:`_frobenius`)."""
    geometry = tuple(tuple(getattr(conv, a)) for a in ("kernel_size", "stride", "dilation", "padding"))
    return _frobenius(x * _root_reads(tuple(x.shape[2:]), *geometry, x.device, x.dtype), u) * (1 + 3 * u)


class ConvPatches(LinearWeight):
    """A ConvNd weight gradient as the linear map it is on the input's patches: Σ_t g_t p_tᵀ, with p_t the patch
    under output position t (:func:`conv_patches`, or :func:`phase_patches` where :func:`phases_pay`) and g_t the
    output gradient there.

    Everything :class:`LinearWeight` does follows: per-example gradients formed and kept when they fit, the ghost
    identity ‖Σ_t g_t p_tᵀ‖² = Σ_{t,s} (p_t·p_s)(g_t·g_s) when T² ≤ |W| (Bu et al. 2023's mixed ghost clipping
    for convolutions), its rounding bound, and the clipped sum as one matrix product over all rows. The columns are
    in (kernel offset, channel) or (channel, phase, tap) order, so the results are permuted back to the weight's
    (C_out, C_in, *kernel); norms do not depend on the order."""

    #: The largest patch tensor the rule builds (it is held from the backward pass to the clipped sum).
    patch_bytes = 256 * 2**20

    def __init__(self, name: str, conv: nn.Module, x: Tensor, g: Tensor) -> None:
        weight = conv.weight  # type: ignore[union-attr]
        self.phased = phases_pay(conv, g)
        if self.phased:  # (C_in, *phases, *taps, C_out): stored transposed, [K, C_out], read from the [B, K, T] patches
            stride = conv.stride  # type: ignore[union-attr]
            taps = [k // s for k, s in zip(weight.shape[2:], stride)]
            layout = torch.Size((weight.shape[1], *stride, *taps, weight.shape[0]))
            patches = phase_patches(conv, x)
        else:  # (C_out, *kernel, C_in)
            layout = torch.Size((weight.shape[0], *weight.shape[2:], weight.shape[1]))
            patches = conv_patches(conv, x)
        self.weight_shape = weight.shape
        super().__init__(name, None, patches, g.flatten(2).transpose(1, 2), layout, transposed=self.phased)
        # ‖patches‖_F from the (smaller) input, formed now so the input need not be held
        self._patch_norm = patch_norms(conv, x if x.dtype == torch.float64 else x.float(), self.u)

    def _input_norm(self) -> Tensor:
        return self._patch_norm

    def _shaped(self, rows: Tensor) -> Tensor:
        shaped = super()._shaped(rows)
        lead = rows.dim() - 2
        if not self.phased:
            return shaped.movedim(-1, lead + 1)  # C_in from last to after C_out
        dims = len(self.weight_shape) - 2  # (C_out, C_in, then per dim the kernel offset a·s + r: tap a, phase r)
        order = [*range(lead), lead + 1 + 2 * dims, lead, *(v for i in range(dims) for v in (lead + 1 + dims + i, lead + 1 + i))]
        return shaped.permute(order).reshape(*rows.shape[:-2], *self.weight_shape)

    def joined(self, others: list[Contribution]) -> Contribution | None:
        """As :meth:`LinearWeight.joined` over the calls' patches; ‖patches‖_F of the whole is √Σ_c ‖patches_c‖_F²
        (upper bounds in, an upper bound out: the float64 combination's rounding is covered by 4u₆₄)."""
        if not all(isinstance(other, ConvPatches) and other.weight_shape == self.weight_shape
                   and other.phased == self.phased for other in others):
            return None
        out = super().joined(others)
        if isinstance(out, ConvPatches):
            squares = torch.stack([part._patch_norm for part in (self, *others)]).square().sum(dim=0)  # type: ignore[attr-defined]
            out._patch_norm = squares.sqrt() * (1 + 4 * _U64)
        return out

    def weighted(self, factors: Tensor) -> Tensor:
        return super().weighted(factors).contiguous()

    def add_weighted(self, out: Tensor, factors: Tensor) -> None:
        Contribution.add_weighted(self, out, factors)  # the product's columns are permuted to the weight's order
