"""Fast path: per-example gradient norms and clipped sums from each layer's input and output gradient.

The model runs its ordinary batched forward; hooks keep each parameterised layer's input ``a`` and, during the
user's ``loss.backward()``, the gradient ``g`` of its output. Parameters are switched to ``requires_grad=False``
for that forward, so autograd computes only activation gradients (no weight gradients at all). When backward
ends, per-example norms come from (a, g) and the clipped sum is one weighted matmul per layer ("book-keeping",
Bu et al. 2023, "Differentially Private Optimization on Large Model at Small Cost"):

- Conv2d: each example's weight gradient is the convolution's own weight backward on that example, vmapped
  (one grouped convolution; no unfolded patches), kept for the clipped sum.
- Linear: per-example weight gradient Σ_t g_t a_tᵀ. Its squared L2 norm is
  ‖a‖²‖g‖² for one position, else Σ_{t,s} (a_t·a_s)(g_t·g_s) (the "ghost norm", Goodfellow 2015; Li et al. 2022)
  when T² ≤ d_in·d_out, else the gradient is formed for that layer alone. The clipped sum Σ_i c_i Σ_t g_it a_itᵀ
  is (c ⊙ G)ᵀ A — the same cost as a non-private weight gradient.
- Embedding: rows are summed per token id within each example (no V × E tensor per example).
- LayerNorm / GroupNorm: the affine gradients Σ g ⊙ x̂ and Σ g, exactly.
- nn.MultiheadAttention: run as its projections (Linear uses on row blocks of in_proj_weight) around the same
  attention computation, so stock attention layers need no replacement.

L1 norms cannot use the ghost identity; the per-example gradients of one layer at a time are formed instead.
Anything else (other layers with parameters, parameters shared between layers) is left to the general vmap
path, which the engine picks automatically; every fast path is tested equal to it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .clipping import Norm
from .errors import EngineUsageError
from .example_grads import masked_scale

Tensor = torch.Tensor


def _vector_norms(values: Tensor, norm: Norm) -> Tensor:
    flat = values.reshape(values.shape[0], -1).float()
    return torch.linalg.vector_norm(flat, ord=2 if norm == "l2" else 1, dim=1)


class _Contribution:
    """One use's contribution to one parameter (or to a block of its rows) for every example."""

    def __init__(self, name: str, rows: slice | None) -> None:
        self.name = name
        self.rows = rows

    def materialize(self) -> Tensor:  # [batch, *block shape]
        raise NotImplementedError

    def norm(self, norm: Norm) -> Tensor:
        return _vector_norms(self.materialize(), norm)

    def weighted(self, factors: Tensor) -> Tensor:  # Σ_i factors[i] · grad_i, block shaped
        return masked_scale(self.materialize(), factors).sum(dim=0)


class _LinearWeight(_Contribution):
    """Weight gradient Σ_t g_t a_tᵀ of a linear map; ``a``: [B, T, in], ``g``: [B, T, out]."""

    def __init__(self, name: str, rows: slice | None, a: Tensor, g: Tensor, shape: torch.Size) -> None:
        super().__init__(name, rows)
        self.a, self.g, self.shape = a, g, shape

    def materialize(self) -> Tensor:
        grads = torch.einsum("bto,bti->boi", self.g, self.a)
        return grads.reshape(grads.shape[0], *self.shape)

    def norm(self, norm: Norm) -> Tensor:
        positions, d_in, d_out = self.a.shape[1], self.a.shape[2], self.g.shape[2]
        if norm == "l1":
            return super().norm(norm)
        if positions == 1:
            return _vector_norms(self.a, "l2") * _vector_norms(self.g, "l2")
        if positions * positions <= d_in * d_out:
            gram = (self.a @ self.a.transpose(1, 2)) * (self.g @ self.g.transpose(1, 2))
            return gram.sum(dim=(1, 2)).clamp_min(0).sqrt()
        return super().norm(norm)

    def weighted(self, factors: Tensor) -> Tensor:
        keep = (factors != 0).to(factors.dtype)
        g = masked_scale(self.g, factors).reshape(-1, self.g.shape[2])
        a = masked_scale(self.a, keep).reshape(-1, self.a.shape[2])
        return (g.transpose(0, 1) @ a).reshape(self.shape)


class _ConvWeight(_Contribution):
    """Per-example Conv2d weight gradients from the layer's input ``x`` and output gradient ``g``.

    Each example's gradient is the convolution's weight backward on that example alone, vmapped (torch batches it
    as one grouped convolution), which is far cheaper than unfolding the input into patches. The gradients are kept
    for the weighted sum when they fit in ``cache_bytes``; otherwise they are recomputed chunk by chunk.
    """

    cache_bytes = 256 * 2**20

    def __init__(self, name: str, module: nn.Conv2d, x: Tensor, g: Tensor) -> None:
        super().__init__(name, None)
        self.module, self.x, self.g = module, x, g
        self._cached: Tensor | None = None
        per_example = module.weight.numel() * module.weight.element_size()
        self.chunk = max(1, self.cache_bytes // per_example)

    def _grads(self, start: int, stop: int) -> Tensor:
        conv = self.module

        def one(xi: Tensor, gi: Tensor) -> Tensor:
            return torch.ops.aten.convolution_backward(
                gi[None], xi[None], conv.weight, None, conv.stride, conv.padding, conv.dilation,
                False, [0, 0], conv.groups, [False, True, False],
            )[1]

        with torch.no_grad():
            return torch.func.vmap(one)(self.x[start:stop], self.g[start:stop])

    def materialize(self) -> Tensor:
        if self._cached is None:
            grads = self._grads(0, self.x.shape[0])
            if self.chunk >= self.x.shape[0]:
                self._cached = grads
            return grads
        return self._cached

    def norm(self, norm: Norm) -> Tensor:
        if self.chunk >= self.x.shape[0]:
            return _vector_norms(self.materialize(), norm)
        batch = self.x.shape[0]
        return torch.cat([_vector_norms(self._grads(i, i + self.chunk), norm) for i in range(0, batch, self.chunk)])

    def weighted(self, factors: Tensor) -> Tensor:
        if self.chunk >= self.x.shape[0]:
            return masked_scale(self.materialize(), factors).sum(dim=0)
        total = torch.zeros_like(self.module.weight)
        for i in range(0, self.x.shape[0], self.chunk):
            total += masked_scale(self._grads(i, i + self.chunk), factors[i : i + self.chunk]).sum(dim=0)
        return total


class _Summed(_Contribution):
    """A gradient that is a sum over positions of ``values`` [B, T, *block]: biases, norm-layer affines."""

    def __init__(self, name: str, rows: slice | None, values: Tensor) -> None:
        super().__init__(name, rows)
        self.values = values

    def materialize(self) -> Tensor:
        return self.values.sum(dim=1)


class _EmbeddingWeight(_Contribution):
    """Rows Σ_{t: id_t = v} g_t of an embedding; ``ids``: [B, T], ``g``: [B, T, E]."""

    def __init__(self, name: str, ids: Tensor, g: Tensor, num_embeddings: int) -> None:
        super().__init__(name, None)
        self.ids, self.g, self.num_embeddings = ids, g, num_embeddings

    def norm(self, norm: Norm) -> Tensor:
        # Gather each example's rows at the first position of every distinct id, then take the norm.
        same = self.ids[:, :, None] == self.ids[:, None, :]
        first = same.to(torch.int8).argmax(dim=2)
        rows = torch.zeros_like(self.g).scatter_add_(1, first[..., None].expand_as(self.g), self.g)
        return _vector_norms(rows, norm)

    def materialize(self) -> Tensor:
        batch, _, width = self.g.shape
        out = self.g.new_zeros(batch, self.num_embeddings, width)
        return out.scatter_add_(1, self.ids[..., None].expand_as(self.g), self.g)

    def weighted(self, factors: Tensor) -> Tensor:
        out = self.g.new_zeros(self.num_embeddings, self.g.shape[2])
        return out.index_add_(0, self.ids.reshape(-1), masked_scale(self.g, factors).reshape(-1, self.g.shape[2]))


class _Use:
    """A parameterised layer's call during the recorded forward; its output gradient arrives in backward."""

    def __init__(self, tape: LayerwiseTape, build: Callable[[Tensor], list[_Contribution]]) -> None:
        self.tape = tape
        self.build = build
        self.grad: Tensor | None = None

    def attach(self, output: Tensor) -> Tensor:
        if not output.requires_grad:
            output = output.requires_grad_()
        output.register_hook(self._on_grad)
        self.tape.uses.append(self)
        return output

    def _on_grad(self, grad: Tensor) -> None:
        if self.grad is not None or self.tape.finished:
            raise EngineUsageError(
                "backward ran twice through the same forward: each example's gradient would count twice. "
                "Run one forward per batch and call backward on it once."
            )
        self.grad = grad.detach()
        self.tape.on_backward()


def _positions(x: Tensor) -> Tensor:
    """[B, ..., d] → [B, T, d] with T the product of the middle dims (1 if none)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


class LayerwiseTape:
    """Hooks on a model's parameterised layers; turns one forward + backward into :class:`LayerwiseGradients`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
        self.recording = False
        self.finished = True
        self.uses: list[_Use] = []
        self.batch = 0
        self.consume: Callable[[LayerwiseGradients], None] | None = None
        self._queued = False
        self._attention = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention) and self._trainable(m)]
        inside_attention = {id(m) for a in model.modules() if isinstance(a, nn.MultiheadAttention) for m in a.modules()}
        self._handles = [
            module.register_forward_hook(self._hook)
            for module in model.modules()
            if id(module) not in inside_attention and self._trainable(module)
        ]

    def _trainable(self, module: nn.Module) -> bool:
        return any(p.requires_grad for p in module.parameters(recurse=isinstance(module, nn.MultiheadAttention)))

    @staticmethod
    def unsupported(model: nn.Module) -> list[str]:
        """Why the fast path cannot serve ``model`` (empty list: it can)."""
        problems = []
        owners: dict[int, list[str]] = defaultdict(list)
        for name, p in model.named_parameters(remove_duplicate=False):
            if p.requires_grad:
                owners[id(p)].append(name)
        problems += [f"{' and '.join(n)} are one shared parameter" for n in owners.values() if len(n) > 1]
        inside_mha = {id(m) for mha in model.modules() if isinstance(mha, nn.MultiheadAttention) for m in mha.modules() if m is not mha}
        for name, module in model.named_modules():
            if id(module) in inside_mha:
                continue
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if isinstance(module, nn.MultiheadAttention):
                if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
                    problems.append(f"{name}: MultiheadAttention with kdim/vdim, bias_kv or add_zero_attn")
                continue
            if not own:
                continue
            if _linear_like(module) or _conv_supported(module) or _embedding_supported(module) or _affine_norm(module):
                continue
            problems.append(f"{name or type(module).__name__}: {type(module).__name__} has no fast path")
        return problems

    # -- recording ---------------------------------------------------------------------------------
    def forward(self, module: nn.Module, args: tuple, kwargs: dict, batch: int, consume: Callable[[LayerwiseGradients], None]) -> Any:
        trainable = [p for p in module.parameters() if p.requires_grad]
        self.uses, self.batch, self.consume = [], batch, consume
        self.finished, self.recording = False, True
        try:
            for p in trainable:
                p.requires_grad_(False)
            for attention in self._attention:  # an instance attribute shadows the class's forward for this call
                attention.forward = _recorded_attention_forward(attention, self)  # type: ignore[method-assign]
            return module(*args, **kwargs)
        finally:
            for p in trainable:
                p.requires_grad_(True)
            for attention in self._attention:
                attention.__dict__.pop("forward", None)
            self.recording = False

    def _hook(self, module: nn.Module, inputs: tuple, output: Any) -> Any:
        if not self.recording:
            return None
        x = inputs[0]
        name = self.names.get
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        w_name = name(id(weight)) if weight is not None else None
        b_name = name(id(bias)) if bias is not None else None
        if _linear_like(module):
            a = _positions(x.detach())

            def build(g: Tensor) -> list[_Contribution]:
                gp = _positions(g)
                parts: list[_Contribution] = []
                if w_name:
                    parts.append(_LinearWeight(w_name, None, a, gp, weight.shape))
                if b_name:
                    parts.append(_Summed(b_name, None, gp))
                return parts

        elif _conv_supported(module):
            xd = x.detach()

            def build(g: Tensor) -> list[_Contribution]:
                gp = g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)
                parts: list[_Contribution] = []
                if w_name:
                    parts.append(_ConvWeight(w_name, module, xd, g))
                if b_name:
                    parts.append(_Summed(b_name, None, gp))
                return parts

        elif _embedding_supported(module):
            ids = x.detach()

            def build(g: Tensor) -> list[_Contribution]:
                if module.padding_idx is not None:
                    g = g * (ids != module.padding_idx)[..., None]
                return [_EmbeddingWeight(w_name, _positions(ids[..., None])[..., 0], _positions(g), module.num_embeddings)]

        elif _affine_norm(module):
            xd = x.detach()

            def build(g: Tensor) -> list[_Contribution]:
                with torch.no_grad():
                    if isinstance(module, nn.LayerNorm):
                        xhat = F.layer_norm(xd, module.normalized_shape, None, None, module.eps)
                        lead = (g.shape[0], -1, *module.normalized_shape)
                        prod, gs = (g * xhat).reshape(lead), g.reshape(lead)
                    else:
                        xhat = F.group_norm(xd, module.num_groups, None, None, module.eps)
                        prod = (g * xhat).reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)
                        gs = g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)
                parts: list[_Contribution] = []
                if w_name:
                    parts.append(_Summed(w_name, None, prod))
                if b_name:
                    parts.append(_Summed(b_name, None, gs))
                return parts

        else:  # pragma: no cover - excluded by unsupported()
            raise EngineUsageError(f"{type(module).__name__} has no fast path")
        return _Use(self, build).attach(output)

    def tracked_linear(self, x: Tensor, weight: Tensor, bias: Tensor | None, w_name: str | None, b_name: str | None, rows: slice | None) -> Tensor:
        """F.linear on a row block of a parameter, recorded as a use (for MultiheadAttention's projections)."""
        out = F.linear(x, weight if rows is None else weight[rows], None if bias is None else (bias if rows is None else bias[rows]))
        if not self.recording:
            return out
        a = _positions(x.detach())
        block = (weight if rows is None else weight[rows]).shape

        def build(g: Tensor) -> list[_Contribution]:
            gp = _positions(g)
            parts: list[_Contribution] = []
            if w_name:
                parts.append(_LinearWeight(w_name, rows, a, gp, block))
            if b_name and bias is not None:
                parts.append(_Summed(b_name, rows, gp))
            return parts

        return _Use(self, build).attach(out)

    # -- end of backward -----------------------------------------------------------------------------
    def on_backward(self) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.finish)

    def finish(self) -> None:
        """Build the per-example statistics (uses that got no gradient contribute zero) and hand them over."""
        self._queued = False
        if self.finished:
            return
        self.finished = True
        parts: list[_Contribution] = []
        for use in self.uses:
            if use.grad is not None:
                parts.extend(use.build(use.grad))
        self.uses = []
        gradients = LayerwiseGradients(self.batch, [n for n in self.names.values()], parts, self.model)
        del parts  # the weighted sum releases each layer's activations and output gradients as it goes
        if self.consume is not None:
            self.consume(gradients)


class LayerwiseGradients:
    """Norms and weighted sums of per-example gradients assembled from layer contributions."""

    def __init__(self, batch: int, names: list[str], parts: list[_Contribution], model: nn.Module) -> None:
        self.batch = batch
        self.names = names
        self.params = {name: p for name, p in model.named_parameters() if name in set(names)}
        self._summed = False
        self.by_name: dict[str, list[_Contribution]] = defaultdict(list)
        for part in parts:
            self.by_name[part.name].append(part)

    def _overlapping(self, parts: list[_Contribution]) -> bool:
        if len(parts) <= 1:
            return False
        spans = sorted((p.rows.start, p.rows.stop) if p.rows is not None else (-math.inf, math.inf) for p in parts)
        return any(spans[i][1] > spans[i + 1][0] for i in range(len(spans) - 1))

    def _param_norm(self, name: str, norm: Norm) -> Tensor:
        parts = self.by_name.get(name, [])
        if not parts:
            return torch.zeros(self.batch, device=self.params[name].device)
        if self._overlapping(parts):  # the same entries receive several contributions: add them up first
            param = self.params[name]
            full = param.new_zeros(self.batch, *param.shape)
            for part in parts:
                full[(slice(None), part.rows) if part.rows is not None else slice(None)] += part.materialize()
            return _vector_norms(full, norm)
        norms = torch.stack([part.norm(norm) for part in parts], dim=1)
        return norms.square().sum(dim=1).sqrt() if norm == "l2" else norms.sum(dim=1)

    def norms(self, norm: Norm) -> Tensor:
        return torch.stack([self._param_norm(name, norm) for name in self.names], dim=1)

    def weighted_sum(self, factors: Tensor) -> dict[str, Tensor]:
        """Σ_i factors[i, j] · g_i[names[j]]; single use: it frees the recorded tensors as it goes."""
        if self._summed:
            raise EngineUsageError("LayerwiseGradients.weighted_sum can be called once (its tensors are freed)")
        self._summed = True
        sums = {}
        for j, name in enumerate(self.names):
            total = torch.zeros_like(self.params[name])
            for part in self.by_name.pop(name, []):  # once summed, a part's tensors can be freed
                block = part.weighted(factors[:, j])
                if part.rows is None:
                    total = total + block
                else:
                    total[part.rows] += block
            sums[name] = total
        return sums


def _linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _conv_supported(module: nn.Module) -> bool:
    return (
        type(module) is nn.Conv2d
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def _embedding_supported(module: nn.Module) -> bool:
    return type(module) is nn.Embedding and module.max_norm is None and not module.sparse


def _affine_norm(module: nn.Module) -> bool:
    return (type(module) is nn.LayerNorm and module.elementwise_affine) or (type(module) is nn.GroupNorm and module.affine)


def _recorded_attention_forward(module: nn.MultiheadAttention, tape: LayerwiseTape) -> Callable[..., Any]:
    """nn.MultiheadAttention's forward (training semantics), computed from recorded projections."""
    names = tape.names

    def forward(
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if not module.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, tgt, embed = query.shape
        src, heads = key.shape[1], module.num_heads
        head_dim = embed // heads
        w, b = module.in_proj_weight, module.in_proj_bias
        w_name, b_name = names.get(id(w)), (names.get(id(b)) if b is not None else None)
        q, k, v = (
            tape.tracked_linear(x, w, b, w_name, b_name, slice(i * embed, (i + 1) * embed))
            for i, x in enumerate((query, key, value))
        )
        q = q.reshape(batch, tgt, heads, head_dim).transpose(1, 2)
        k = k.reshape(batch, src, heads, head_dim).transpose(1, 2)
        v = v.reshape(batch, src, heads, head_dim).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(tgt, src, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            mask = attn_mask.reshape(-1, heads, tgt, src) if attn_mask.dim() == 3 else attn_mask
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        if key_padding_mask is not None:
            pad = key_padding_mask[:, None, None, :]
            scores = scores.masked_fill(pad, float("-inf")) if pad.dtype == torch.bool else scores + pad
        attn = F.dropout(torch.softmax(scores, dim=-1), p=module.dropout, training=module.training)
        out = (attn @ v).transpose(1, 2).reshape(batch, tgt, embed)
        proj = module.out_proj
        out = tape.tracked_linear(out, proj.weight, proj.bias, names.get(id(proj.weight)),
                                  names.get(id(proj.bias)) if proj.bias is not None else None, None)
        if not module.batch_first:
            out = out.transpose(0, 1)
        weights = (attn.mean(dim=1) if average_attn_weights else attn) if need_weights else None
        return out, weights

    return forward


__all__ = ["LayerwiseGradients", "LayerwiseTape"]

