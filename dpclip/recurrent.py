"""Recurrent layers that dpclip can train privately: :class:`DPRNN`, :class:`DPLSTM`, :class:`DPGRU`.

``nn.RNN``/``nn.LSTM``/``nn.GRU`` run as one fused kernel that ``torch.func.vmap`` cannot batch and that no
layer rule of the fast path understands. These replacements compute exactly the same function (same gate
order and formulas, same outputs and final states) from plain ``nn.Linear`` layers and elementwise operations:

- for every layer and direction, ``ih_l{k}[_reverse]`` (input → gates) is called once on the whole sequence,
  ``[batch, time, features]`` → ``[batch, time, gates]``, and ``hh_l{k}[_reverse]`` (hidden → gates) once per
  time step on ``[batch, hidden]``; every call receives batch-first tensors, whatever ``batch_first`` says, so
  both per-example paths (the whole-model ``vmap`` and the Linear fast path, which adds up the several calls of
  one Linear exactly) see one row per example;
- a :class:`~torch.nn.utils.rnn.PackedSequence` is unpacked to a padded batch and every step is masked per
  example (a padded step leaves that example's state unchanged, and its gradient is zero), then the output is
  packed again with the input's ``batch_sizes`` and ordering. Padding never reaches an example's state.

The state dict is that of the torch module — same keys (``weight_ih_l0``, ``bias_hh_l1_reverse``, ...), order
and shapes — so a checkpoint of an ``nn.LSTM`` loads into a :class:`DPLSTM` and back, and the torch names work
as attributes (``dp.weight_ih_l0``). ``named_parameters()`` gives the names of the owning Linear layers
(``ih_l0.weight``); :func:`torch_parameter_name` maps them to torch's. Convert a torch module with
:meth:`DPRNNBase.from_module` or :func:`convert` (what :func:`dpclip.fix_model` does), and back with
:meth:`DPRNNBase.to_module`.

Not supported: ``nn.LSTM(proj_size > 0)`` (refused with :class:`~dpclip.errors.ModelNotSupportedError`). On the
``vmap`` path a model cannot pack sequences itself (``pack_padded_sequence`` has no batching rule); the fast path
("layerwise") accepts models that pack their padded batch before the recurrent layer.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar, TypeVar, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .errors import ModelNotSupportedError

Tensor = torch.Tensor
RecurrentOutput = Union[Tensor, PackedSequence]
_Self = TypeVar("_Self", bound="DPRNNBase")

_DP_NAME = re.compile(r"(?:^|(?<=\.))(ih|hh)_l(\d+)(_reverse)?\.(weight|bias)$")
_TORCH_NAME = re.compile(r"(?:^|(?<=\.))(weight|bias)_(ih|hh)_l(\d+)(_reverse)?$")


def torch_parameter_name(name: str) -> str:
    """Torch's name for a parameter of a DP recurrent layer: ``"rnn.ih_l0.weight"`` → ``"rnn.weight_ih_l0"``.

    Any prefix is kept; names that are not of that form are returned unchanged, so this can be applied to every
    name of ``model.named_parameters()`` (e.g. to compare per-example gradients with those of a torch model).
    """
    return _DP_NAME.sub(lambda m: f"{m[4]}_{m[1]}_l{m[2]}{m[3] or ''}", name)


def dp_parameter_name(name: str) -> str:
    """Inverse of :func:`torch_parameter_name`: ``"rnn.weight_ih_l0"`` → ``"rnn.ih_l0.weight"``."""
    return _TORCH_NAME.sub(lambda m: f"{m[2]}_l{m[3]}{m[4] or ''}.{m[1]}", name)


def rnn_step(gi: Tensor, gh: Tensor, state: tuple[Tensor, ...], nonlinearity: str = "tanh") -> tuple[Tensor]:
    """One Elman step from the two projections ``gi`` = W_ih x + b_ih and ``gh`` = W_hh h + b_hh: (act(gi + gh),)."""
    pre = gi + gh
    return (torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre),)


def gru_step(gi: Tensor, gh: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor]:
    """One GRU step (gates r, z, n in torch's order): n = tanh(i_n + r ⊙ h_n), h' = (1 − z) ⊙ n + z ⊙ h."""
    h = state[0]
    i_r, i_z, i_n = gi.chunk(3, dim=1)
    h_r, h_z, h_n = gh.chunk(3, dim=1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return ((1 - z) * n + z * h,)


def lstm_step(gi: Tensor, gh: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """One LSTM step (gates i, f, g, o in torch's order): c' = σ(f) ⊙ c + σ(i) ⊙ tanh(g), h' = σ(o) ⊙ tanh(c')."""
    c = state[1]
    i, f, g, o = (gi + gh).chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class DPRNNBase(nn.Module):
    """Common part of :class:`DPRNN`, :class:`DPLSTM` and :class:`DPGRU` (not used directly).

    Attributes mirror ``nn.RNNBase``: ``input_size``, ``hidden_size``, ``num_layers``, ``bias``, ``batch_first``,
    ``dropout``, ``bidirectional``, ``proj_size`` (always 0) and ``mode``.
    """

    _mode: ClassVar[str]
    gate_count: ClassVar[int]
    torch_type: ClassVar[type[nn.RNNBase]]

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        for arg, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: {arg} must be a positive integer, got {value!r}")
        for arg, value in (("bias", bias), ("batch_first", batch_first), ("bidirectional", bidirectional)):
            if not isinstance(value, bool):
                raise TypeError(f"{name}: {arg} must be a bool, got {type(value).__name__}")
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError(f"{name}: dropout must be a number in [0, 1] (a probability), got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                f"{name}: dropout is applied between recurrent layers only, so dropout={dropout} does nothing with "
                "num_layers=1",
                stacklevel=2,
            )
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = 0
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        gates = self.gate_count * hidden_size
        for layer in range(num_layers):
            features = input_size if layer == 0 else hidden_size * self.num_directions
            for suffix in self._suffixes():
                self.add_module(f"ih_l{layer}{suffix}", nn.Linear(features, gates, bias=bias, **factory))
                self.add_module(f"hh_l{layer}{suffix}", nn.Linear(hidden_size, gates, bias=bias, **factory))
        self.reset_parameters()
        self.register_state_dict_post_hook(_save_with_torch_names)
        self.register_load_state_dict_pre_hook(_load_torch_names)
        self.register_load_state_dict_post_hook(_report_torch_names)

    # -- construction and conversion -------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """Torch's mode string: "RNN_TANH", "RNN_RELU", "LSTM" or "GRU"."""
        return self._mode

    @property
    def num_directions(self) -> int:
        """2 if bidirectional, else 1."""
        return 2 if self.bidirectional else 1

    def _suffixes(self) -> tuple[str, ...]:
        return ("", "_reverse") if self.bidirectional else ("",)

    def reset_parameters(self) -> None:
        """Torch's initialisation: every weight and bias uniform in ±1/√hidden_size."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(-bound, bound)

    def _torch_config(self) -> dict[str, Any]:
        return dict(
            input_size=self.input_size, hidden_size=self.hidden_size, num_layers=self.num_layers, bias=self.bias,
            batch_first=self.batch_first, dropout=self.dropout, bidirectional=self.bidirectional,
        )

    @classmethod
    def _config_of(cls, module: nn.RNNBase, name: str) -> dict[str, Any]:
        if type(module) is not cls.torch_type:
            raise TypeError(
                f"{cls.__name__}.from_module expects an {cls.torch_type.__module__}.{cls.torch_type.__name__}, got "
                f"{type(module).__name__} ({name}); use dpclip.recurrent.convert(module) to pick the right class"
            )
        if getattr(module, "proj_size", 0):
            raise ModelNotSupportedError(
                f"{name} ({type(module).__name__} with proj_size={module.proj_size}) has no private replacement: "
                "dpclip's recurrent layers support proj_size=0 only. Use proj_size=0 (e.g. with a smaller "
                "hidden_size, or an nn.Linear on the outputs)."
            )
        return dict(
            input_size=module.input_size, hidden_size=module.hidden_size, num_layers=module.num_layers,
            bias=module.bias, batch_first=module.batch_first, dropout=float(module.dropout),
            bidirectional=module.bidirectional,
        )

    @classmethod
    def from_module(cls: type[_Self], module: nn.RNNBase, name: str | None = None) -> _Self:
        """A replacement for the torch layer ``module`` with the same settings, weights, ``requires_grad`` flags,
        device, dtype and training mode. ``name`` (its path in the model) is used in error messages.

        Raises :class:`ModelNotSupportedError` for ``nn.LSTM(proj_size > 0)``.
        """
        where = name or type(module).__name__
        config = cls._config_of(module, where)
        first = module.weight_ih_l0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the torch module has already warned about dropout with one layer
            replacement = cls(**config, **cls._extra_config(module), device=first.device, dtype=first.dtype)
        replacement.load_state_dict(module.state_dict())
        for torch_name, p in module.named_parameters():
            getattr(replacement, torch_name).requires_grad_(p.requires_grad)
        replacement.train(module.training)
        return replacement

    @classmethod
    def _extra_config(cls, module: nn.RNNBase) -> dict[str, Any]:
        return {}

    def to_module(self) -> nn.RNNBase:
        """The equivalent torch layer (``nn.RNN``/``nn.LSTM``/``nn.GRU``) with a copy of these weights."""
        first = self.ih_l0.weight
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = self.torch_type(**self._torch_config(), device=first.device, dtype=first.dtype)
        module.load_state_dict(self.state_dict())
        for torch_name, p in module.named_parameters():
            p.requires_grad_(getattr(self, torch_name).requires_grad)
        return module.train(self.training)

    # -- torch's parameter names as attributes ------------------------------------------------------------
    def torch_names(self) -> Iterator[tuple[str, str]]:
        """(torch name, own parameter name) pairs in torch's state-dict order, e.g. ("weight_ih_l0", "ih_l0.weight")."""
        kinds = ("weight", "bias") if self.bias else ("weight",)
        for layer in range(self.num_layers):
            for suffix in self._suffixes():
                for kind in kinds:
                    for path in ("ih", "hh"):
                        yield f"{kind}_{path}_l{layer}{suffix}", f"{path}_l{layer}{suffix}.{kind}"

    def __getattr__(self, name: str) -> Any:
        match = _TORCH_NAME.fullmatch(name)
        if match is not None:
            linear = self._modules.get(f"{match[2]}_l{match[3]}{match[4] or ''}")
            if linear is not None and (match[1] == "weight" or self.bias):
                return getattr(linear, match[1])
        return super().__getattr__(name)

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """Per layer and direction, [weight_ih, weight_hh, bias_ih, bias_hh] (biases if any), as in torch."""
        names = [torch_name for torch_name, _ in self.torch_names()]
        per = 4 if self.bias else 2
        return [[getattr(self, n) for n in names[i : i + per]] for i in range(0, len(names), per)]

    def flatten_parameters(self) -> None:
        """No-op (kept for code written for torch's cuDNN layers; these weights are never flattened)."""

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if getattr(self, "nonlinearity", "tanh") != "tanh":
            s += f", nonlinearity={self.nonlinearity!r}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        return s

    # -- forward ---------------------------------------------------------------------------------------------
    def _cell(self, gi: Tensor, state: tuple[Tensor, ...], hh: nn.Linear) -> tuple[Tensor, ...]:
        """One time step: input projection ``gi`` [B, gates] and state → new state (``state[0]`` is h)."""
        raise NotImplementedError

    def _state_count(self) -> int:
        return 1

    def _run(
        self, input: RecurrentOutput, hx: tuple[Tensor, ...] | None
    ) -> tuple[RecurrentOutput, tuple[Tensor, ...]]:
        name = type(self).__name__
        mask: Tensor | None = None
        packed = input if isinstance(input, PackedSequence) else None
        if packed is not None:
            x, lengths = pad_packed_sequence(packed, batch_first=True)  # original (unsorted) example order
            steps = torch.arange(x.shape[1], device=lengths.device)
            mask = (steps[None, :] < lengths[:, None]).to(x.device)
            unbatched = False
        else:
            if not isinstance(input, Tensor) or input.dim() not in (2, 3):
                shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
                raise ValueError(
                    f"{name}: expected a 2-D (unbatched: time × features) or 3-D input (batched, "
                    f"{'batch × time' if self.batch_first else 'time × batch'} × features) or a PackedSequence, "
                    f"got {shape}"
                )
            unbatched = input.dim() == 2
            x = input.unsqueeze(0) if unbatched else (input if self.batch_first else input.transpose(0, 1))
        if x.shape[-1] != self.input_size:
            raise ValueError(f"{name}: input has {x.shape[-1]} features but input_size={self.input_size}")
        if x.shape[1] == 0:  # as torch's layers refuse it (they would return h_0 as h_n)
            raise ValueError(f"{name}: the input has no time steps (sequence length 0); torch's layers refuse it too")
        weight = next(self.parameters(), None)
        if weight is not None and x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"{name}: input dtype {x.dtype} differs from the parameters' {weight.dtype}: convert the input "
                f"(x.to({weight.dtype})) or the layer (layer.to({x.dtype})), as torch's layers ask"
            )
        batch, length = x.shape[0], x.shape[1]
        states = self._initial_states(hx, x, batch, unbatched)
        finals: list[list[Tensor]] = [[] for _ in range(self._state_count())]
        layer_input = x
        for layer in range(self.num_layers):
            outputs = []
            for direction, suffix in enumerate(self._suffixes()):
                index = layer * self.num_directions + direction
                state = tuple(s[index] for s in states)
                ih: nn.Linear = getattr(self, f"ih_l{layer}{suffix}")
                hh: nn.Linear = getattr(self, f"hh_l{layer}{suffix}")
                gi = ih(layer_input)  # one call for the whole sequence: [B, T, gates]
                hs: list[Tensor] = [x.new_empty(0)] * length
                for t in range(length - 1, -1, -1) if direction else range(length):
                    new = self._cell(gi[:, t], state, hh)
                    if mask is not None:  # padded steps leave the state (and the gradient) unchanged
                        keep = mask[:, t, None]
                        new = tuple(torch.where(keep, n, s) for n, s in zip(new, state))
                    state = new
                    hs[t] = state[0]
                outputs.append(torch.stack(hs, dim=1) if length else x.new_zeros(batch, 0, self.hidden_size))
                for final, s in zip(finals, state):
                    final.append(s)
            layer_input = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        final_states = tuple(torch.stack(f, dim=0) for f in finals)
        out: RecurrentOutput
        if packed is not None:
            out = _repack(layer_input, packed)
        elif unbatched:
            out = layer_input.squeeze(0)
            final_states = tuple(s.squeeze(1) for s in final_states)
        else:
            out = layer_input if self.batch_first else layer_input.transpose(0, 1)
        return out, final_states

    def _initial_states(
        self, hx: tuple[Tensor, ...] | None, x: Tensor, batch: int, unbatched: bool
    ) -> tuple[Tensor, ...]:
        shape = (self.num_layers * self.num_directions, batch, self.hidden_size)
        if hx is None:
            return tuple(x.new_zeros(shape) for _ in range(self._state_count()))
        checked = []
        labels = ("h0", "c0")
        for label, h in zip(labels, hx):
            expected = (shape[0], shape[2]) if unbatched else shape
            if not isinstance(h, Tensor) or tuple(h.shape) != expected:
                got = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
                raise ValueError(
                    f"{type(self).__name__}: {label} must have shape {expected} (num_layers × num_directions, "
                    f"{'' if unbatched else 'batch, '}hidden_size; the batch is dim 1 even with batch_first=True), "
                    f"got {got}"
                )
            checked.append(h.unsqueeze(1) if unbatched else h)
        return tuple(checked)


def _repack(padded: Tensor, like: PackedSequence) -> PackedSequence:
    """Pack the batch-first ``padded`` output (original example order) like the input ``like``."""
    sizes = like.batch_sizes.to("cpu")
    # In sorted order, example j is present at step t iff j < batch_sizes[t]; its length counts those steps.
    lengths = (torch.arange(padded.shape[0])[:, None] < sizes[None, :]).sum(dim=1)
    if like.sorted_indices is not None:  # None: the input was packed already sorted (enforce_sorted=True)
        padded = padded.index_select(0, like.sorted_indices.to(padded.device))
    data = pack_padded_sequence(padded, lengths, batch_first=True, enforce_sorted=True).data
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


class DPRNN(DPRNNBase):
    """Drop-in replacement for ``nn.RNN`` (``nonlinearity`` "tanh" or "relu"): h' = act(W_ih x + b_ih + W_hh h + b_hh).

    ``forward(input, hx=None)`` → ``(output, h_n)`` exactly as ``nn.RNN``: input ``[T, B, F]`` (``[B, T, F]`` with
    ``batch_first``), ``[T, F]`` unbatched, or a PackedSequence; ``hx``/``h_n`` are ``[num_layers·D, B, H]``.
    """

    _mode = "RNN_TANH"
    gate_count = 1
    torch_type = nn.RNN

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"DPRNN: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, device, dtype)
        self.nonlinearity = nonlinearity

    @property
    def mode(self) -> str:
        """Torch's mode string: "RNN_TANH" or "RNN_RELU"."""
        return "RNN_TANH" if self.nonlinearity == "tanh" else "RNN_RELU"

    @classmethod
    def _extra_config(cls, module: nn.RNNBase) -> dict[str, Any]:
        return {"nonlinearity": module.nonlinearity}

    def _torch_config(self) -> dict[str, Any]:
        return {**super()._torch_config(), "nonlinearity": self.nonlinearity}

    def _cell(self, gi: Tensor, state: tuple[Tensor, ...], hh: nn.Linear) -> tuple[Tensor, ...]:
        return rnn_step(gi, hh(state[0]), state, self.nonlinearity)

    def forward(self, input: RecurrentOutput, hx: Tensor | None = None) -> tuple[RecurrentOutput, Tensor]:
        """``(output, h_n)`` as ``nn.RNN.forward``."""
        out, (h,) = self._run(input, None if hx is None else (hx,))
        return out, h


class DPGRU(DPRNNBase):
    """Drop-in replacement for ``nn.GRU`` (gates r, z, n in torch's order and formulas).

    ``forward(input, hx=None)`` → ``(output, h_n)`` exactly as ``nn.GRU``.
    """

    _mode = "GRU"
    gate_count = 3
    torch_type = nn.GRU

    def _cell(self, gi: Tensor, state: tuple[Tensor, ...], hh: nn.Linear) -> tuple[Tensor, ...]:
        return gru_step(gi, hh(state[0]), state)

    def forward(self, input: RecurrentOutput, hx: Tensor | None = None) -> tuple[RecurrentOutput, Tensor]:
        """``(output, h_n)`` as ``nn.GRU.forward``."""
        out, (h,) = self._run(input, None if hx is None else (hx,))
        return out, h


class DPLSTM(DPRNNBase):
    """Drop-in replacement for ``nn.LSTM`` with ``proj_size=0`` (gates i, f, g, o in torch's order).

    ``forward(input, hx=None)`` → ``(output, (h_n, c_n))`` exactly as ``nn.LSTM``; ``hx`` is ``(h_0, c_0)``.
    """

    _mode = "LSTM"
    gate_count = 4
    torch_type = nn.LSTM

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if proj_size != 0:
            raise ModelNotSupportedError(
                f"DPLSTM supports proj_size=0 only, got proj_size={proj_size}: use an LSTM without projection "
                "(e.g. with a smaller hidden_size, or an nn.Linear on the outputs)"
            )
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, device, dtype)

    def _state_count(self) -> int:
        return 2

    def _cell(self, gi: Tensor, state: tuple[Tensor, ...], hh: nn.Linear) -> tuple[Tensor, ...]:
        return lstm_step(gi, hh(state[0]), state)

    def forward(
        self, input: RecurrentOutput, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[RecurrentOutput, tuple[Tensor, Tensor]]:
        """``(output, (h_n, c_n))`` as ``nn.LSTM.forward``."""
        if hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
            raise ValueError("DPLSTM: hx must be a pair (h_0, c_0), as for nn.LSTM")
        out, (h, c) = self._run(input, None if hx is None else tuple(hx))
        return out, (h, c)


_REPLACEMENTS: dict[type[nn.Module], type[DPRNNBase]] = {nn.RNN: DPRNN, nn.LSTM: DPLSTM, nn.GRU: DPGRU}


def is_convertible(module: nn.Module) -> bool:
    """Whether ``module`` is exactly an ``nn.RNN``, ``nn.LSTM`` or ``nn.GRU`` (subclasses may change forward)."""
    return type(module) in _REPLACEMENTS


def convert(module: nn.RNNBase, name: str | None = None) -> DPRNNBase:
    """The DP replacement (:class:`DPRNN`, :class:`DPLSTM` or :class:`DPGRU`) of a torch recurrent layer.

    Weights, ``requires_grad``, device, dtype and training mode are copied; ``name`` (the layer's path in its
    model) appears in errors. Raises :class:`ModelNotSupportedError` for ``nn.LSTM(proj_size > 0)`` and
    ``TypeError`` for anything but an ``nn.RNN``/``nn.LSTM``/``nn.GRU`` (subclasses included, since their
    forward may differ: replace those by hand).
    """
    replacement = _REPLACEMENTS.get(type(module))
    if replacement is None:
        raise TypeError(
            f"{name or type(module).__name__} ({type(module).__name__}) is not an nn.RNN, nn.LSTM or nn.GRU; "
            "dpclip.recurrent.convert replaces those exact types only"
        )
    return replacement.from_module(module, name)


# -- state dict under torch's names ---------------------------------------------------------------------------
def _save_with_torch_names(module: DPRNNBase, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """Rename ``ih_l0.weight`` → ``weight_ih_l0`` (torch's order); the Linear layers' metadata entries go too."""
    for torch_name, own in module.torch_names():
        if prefix + own in state_dict:  # this module's keys are the last ones: re-inserting keeps the order
            state_dict[prefix + torch_name] = state_dict.pop(prefix + own)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        for child in module._modules:
            metadata.pop(prefix + child, None)


def _load_torch_names(
    module: DPRNNBase, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
    missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
) -> None:
    """Accept torch's keys (``weight_ih_l0``) by renaming them to the Linear layers' (``ih_l0.weight``)."""
    for torch_name, own in module.torch_names():
        if prefix + torch_name in state_dict:
            state_dict[prefix + own] = state_dict.pop(prefix + torch_name)
    module.__dict__["_loading_prefix"] = prefix


def _report_torch_names(module: DPRNNBase, incompatible_keys: Any) -> None:
    """Name missing keys as the state dict does (``weight_ih_l0``), not by the Linear layers' names."""
    prefix = module.__dict__.pop("_loading_prefix", None)
    if prefix is None:
        return
    renames = {prefix + own: prefix + torch_name for torch_name, own in module.torch_names()}
    incompatible_keys.missing_keys[:] = [renames.get(k, k) for k in incompatible_keys.missing_keys]


__all__ = [
    "DPGRU",
    "DPLSTM",
    "DPRNN",
    "DPRNNBase",
    "convert",
    "dp_parameter_name",
    "is_convertible",
    "torch_parameter_name",
]
