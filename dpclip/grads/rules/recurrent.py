"""nn.RNNCell, nn.GRUCell and nn.LSTMCell: run as their two linear maps around the same step.

A cell computes gi = W_ih x + b_ih and gh = W_hh h + b_hh, then the new state from (gi, gh, state). While the
tape records, the cell runs as exactly that: both projections are recorded Linear uses (``tape.record_linear``,
whose per-example gradients the Linear machinery forms: ∂gi_iᵀ x_i and ∂gh_iᵀ h_i), and the step is
:mod:`dpclip.recurrent`'s (torch's gate order and formulas, as :class:`~dpclip.recurrent.DPLSTM` uses). Stock
cells need no replacement; ``nn.LSTMCell``, which torch cannot vmap, trains on the fast path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ...recurrent import gru_step, lstm_step, rnn_step
from ..registry import LayerRule, register_layer

if TYPE_CHECKING:
    from ..tape import LayerwiseTape

Tensor = torch.Tensor


@register_layer(nn.RNNCell, nn.GRUCell, nn.LSTMCell)
class RecurrentCellRule(LayerRule):
    def recorded_forward(self, module: nn.Module, tape: LayerwiseTape) -> Callable[..., Any] | None:
        return _recorded_forward(module, tape, tape.module_names[id(module)])


def _recorded_forward(cell: nn.RNNCellBase, tape: LayerwiseTape, where: str) -> Callable[..., Any]:
    """The cell's forward (batched input [B, input_size]) from recorded projections."""
    lstm = isinstance(cell, nn.LSTMCell)

    def forward(input: Tensor, hx: Any = None) -> Any:
        if input.dim() != 2:
            raise ValueError(f"{where} ({type(cell).__name__}): expected a batched input [batch, {cell.input_size}] "
                             f"while training privately, got {tuple(input.shape)}")
        zeros = input.new_zeros(input.shape[0], cell.hidden_size)
        if lstm:
            state = (zeros, zeros) if hx is None else tuple(hx)
        else:
            state = (zeros if hx is None else hx,)
        gi = tape.record_linear(f"{where}.ih", input, cell.weight_ih, cell.bias_ih, None)
        gh = tape.record_linear(f"{where}.hh", state[0], cell.weight_hh, cell.bias_hh, None)
        if lstm:
            return lstm_step(gi, gh, state)
        if isinstance(cell, nn.GRUCell):
            return gru_step(gi, gh, state)[0]
        return rnn_step(gi, gh, state, cell.nonlinearity)[0]

    return forward
