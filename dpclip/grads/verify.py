"""Runtime verification: check, on a probe of real examples, that a per-example path computes exactly DP-SGD's
per-example gradients for *this* model — before anything is released.

The probe holds k examples of the batch (cycled when the batch is smaller), with k chosen to match no dim of
the model's parameters or inputs, so a layer that keeps sequence positions, heads or channels in dim 0 cannot
pass for one that keeps examples there. With the model in its training mode but dropout switched off
(:class:`NoDropout`), the random number generators untouched and autocast off, it checks:

1. outputs: the model's output on the probe is batch-first and each example's row equals the output of that
   example run alone (catches time-major outputs and layers that mix examples);
2. per-example gradients: for a random linear loss Σ_i <out_i, v_i>, the path's per-example norms (every
   parameter) equal those of a brute-force loop that differentiates each example alone, and the path's
   Σ_i g_i equals the loop's (catches layouts, missed or extra uses of a parameter, hooks, tying...);
3. state: no parameter or buffer changed (catches layers that write batch data into the model);
4. the real batch size: a path that keeps the batch whole (the layerwise tape) is run once more on the whole
   batch, with the layouts the probe pinned, and its outputs and norms for the probe's rows must again equal
   the brute force (catches a forward that mixes examples only in batches larger than the probe, e.g.
   ``if x.shape[0] > 8: h = h - h.mean(0)``), and a randomly weighted sum of all its rows' gradients must equal
   autograd's on the same batch (catches rows of one example credited to another past the probe, e.g. a layer
   on data-selected rows ``h[mask]``). The vmap path runs every example alone, so its probe suffices.
   (On its probe the tape itself refuses a parameter whose value reaches the loss other than through the outputs
   of the layers that own it: :class:`dpclip.grads.tape._OutsideUses`.)

Its only output is accept/refuse (and which path), decided once before the first release; a refused model
trains on nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import ModelNotSupportedError
from ..example_grads import ExampleGradients
from .contributions import unit_roundoff
from .registry import float_leaves
from .tape import _AS_TEMPLATE_OPS, _TEMPLATE_OPS, _Derived

Tensor = torch.Tensor
PathRunner = Callable[[nn.Module, tuple, dict, int], tuple[Any, Callable[[], ExampleGradients]]]
_PROBE_SIZES = (7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47)
_RUNTIME_TRIES = 4  # probe sizes tried against the shapes the layers see at run time


_DROPOUTS = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, torch.dropout,
    torch.feature_dropout, torch.alpha_dropout, torch.feature_alpha_dropout,
    torch.dropout_, torch.feature_dropout_, torch.alpha_dropout_, torch.feature_alpha_dropout_,
}
# Ops that draw from torch's random number generators (functions, and Tensor methods, which torch-function modes
# see too). A forward that calls one outside the dropouts above is refused (:class:`RandomDraw`).
_RANDOM_OPS = {
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.rand_like, torch.randn_like, torch.randint_like,
    torch.bernoulli, torch.normal, torch.poisson, torch.multinomial, torch.binomial, torch._standard_gamma,
    torch._sample_dirichlet, torch._fused_dropout, Tensor.bernoulli, Tensor.bernoulli_, Tensor.normal_,
    Tensor.uniform_, Tensor.random_, Tensor.exponential_, Tensor.geometric_, Tensor.log_normal_, Tensor.cauchy_,
    Tensor.multinomial, torch._C._nn.rrelu_with_noise,
    # Python functions that draw inside (a torch-function mode sees the outer call only)
    F.gumbel_softmax, nn.init.uniform_, nn.init.normal_, nn.init.trunc_normal_, nn.init.xavier_uniform_,
    nn.init.xavier_normal_, nn.init.kaiming_uniform_, nn.init.kaiming_normal_, nn.init.orthogonal_, nn.init.sparse_,
}
# Ops that draw only in training: (keyword, position) of the flag and its default.
_RANDOM_IF_TRAINING = {
    F.rrelu: ("training", 3, False), F.rrelu_: ("training", 3, False), torch.rrelu: ("training", 3, False),
    torch.rrelu_: ("training", 3, False), torch.native_dropout: ("train", 2, True),
}
# Fractional max pooling draws its pooling regions unless they are passed in (``_random_samples``).
_FRACTIONAL_POOLS = {F.fractional_max_pool2d, F.fractional_max_pool3d, F.fractional_max_pool2d_with_indices,
                     F.fractional_max_pool3d_with_indices}


def _global_generator(generator: Any) -> bool:
    """No generator given, or torch's default one (the same draws as none)."""
    if generator is None or generator is torch.default_generator:
        return True
    return torch.cuda.is_initialized() and any(generator is g for g in torch.cuda.default_generators)


def _draws(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether this call draws from torch's global random number generators."""
    if func in _RANDOM_OPS:
        return _global_generator(kwargs.get("generator"))
    if func in _RANDOM_IF_TRAINING:
        key, position, default = _RANDOM_IF_TRAINING[func]
        flag = kwargs[key] if key in kwargs else args[position] if len(args) > position else default
        return flag is None or bool(flag)
    if func in _FRACTIONAL_POOLS:
        return kwargs.get("_random_samples") is None and (len(args) < 6 or args[5] is None)
    return False


class RandomDraw(Exception):
    """Raised inside verification when the model's forward draws random numbers from torch's generators
    (``op``, in layer ``where``; "" in the model's own forward) outside the dropouts :class:`NoDropout` switches
    off."""

    def __init__(self, op: str, where: str) -> None:
        super().__init__(f"{op} in {where or 'the model'}")
        self.op, self.where = op, where

    def message(self, root: str, model: nn.Module) -> str:
        where = (f"{self.where} draws random numbers in its forward" if self.where else
                 f"{type(model).__name__}'s own forward (outside its layers) draws random numbers")
        return (
            f"{root}: {where} ({self.op}) other than dropout's, so dpclip can "
            "neither check that examples stay apart (a batch and an example alone draw different numbers) nor "
            "trust the vmap path to draw them as the batch does (a mask shaped from x.shape[0] is one value per "
            "example in a batch but one per channel under vmap). A dropout-like layer (torchvision's "
            "StochasticDepth, timm's DropPath): set its probability to 0 (torchvision models: "
            "stochastic_depth_prob=0), or use nn.Dropout, which dpclip supports. Noise the model needs (e.g. a "
            "reparameterisation): draw it in the training loop and pass it in as an input, one row per example"
        )


def _op_name(func: Any) -> str:
    """``torch.rand``, ``Tensor.bernoulli_``, ``torch.nn.functional.rrelu``: how a user would write the op."""
    name = getattr(func, "__qualname__", None) or str(func)
    if "<locals>" in name:  # a dispatcher built by a factory (F.fractional_max_pool2d): its given name
        name = getattr(func, "__name__", name)
    if name.startswith("_VariableFunctionsClass."):  # torch.rand and the other torch.* functions
        return "torch." + name.split(".", 1)[1]
    if "." in name:
        return name.replace("TensorBase.", "Tensor.")
    module = getattr(func, "__module__", None) or "torch"
    return f"{'torch' if module.startswith('torch._') else module}.{name}"


class NoDropout(TorchFunctionMode):
    """Dropout as the identity (and attention dropout 0) inside the block, so a batch and each of its examples
    run alone compute the same function; every other op runs as in training, except a draw from torch's random
    number generators (no ``generator=`` or torch's default one: the checks' own draws pass their own), which
    raises :class:`RandomDraw`
    naming the innermost layer ``where()`` reports."""

    def __init__(self, where: Callable[[], str] = lambda: "") -> None:
        super().__init__()
        self.where = where

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _DROPOUTS:
            return args[0] if args else kwargs["input"]
        if _draws(func, args, kwargs):
            raise RandomDraw(_op_name(func), self.where())
        if func is F.scaled_dot_product_attention:
            if len(args) > 4:
                args = (*args[:4], 0.0, *args[5:])
            kwargs = {**kwargs, "dropout_p": 0.0} if "dropout_p" in kwargs or len(args) <= 4 else kwargs
        if func is F.multi_head_attention_forward:  # handled whole: the dropout inside it is not seen here
            if len(args) > 10:
                args = (*args[:10], 0.0, *args[11:])
            else:
                kwargs = {**kwargs, "dropout_p": 0.0}
        return func(*args, **kwargs)


class _LayerStack:
    """The layers entered and not yet left while a model runs (forward pre- and post-hooks on every module), for
    naming where an error or a random draw happened; removed on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.entered: list[str] = []
        self.autocast_in: str | None = None  # the first layer entered with autocast on (the checks turn it off)
        self._names = {id(m): name or type(m).__name__ for name, m in model.named_modules()}
        self._handles: list[Any] = []

    def __enter__(self) -> _LayerStack:
        def enter(module: nn.Module, inputs: Any) -> None:
            self.entered.append(f"{self._names.get(id(module), type(module).__name__)} ({type(module).__name__})")
            if self.autocast_in is None and any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda")):
                self.autocast_in = self.entered[-1]

        def leave(module: nn.Module, inputs: Any, output: Any) -> None:
            if self.entered:
                self.entered.pop()

        # always_call: a layer that raises (and is caught by the forward around it) is left all the same
        self._handles = [h for m in self.model.modules()
                         for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave, always_call=True))]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()

    def innermost(self) -> str:
        return self.entered[-1] if self.entered else describe(self.model)

    def innermost_layer(self) -> str:
        """The innermost layer running, or "" in the model's own forward (outside its layers)."""
        return self.entered[-1] if len(self.entered) > 1 else ""


def probe_size(model: nn.Module, args: tuple, kwargs: dict, batch: int) -> int:
    """The smallest probe size in a list of primes that is no dim of a parameter, of a non-batch input dim, or of
    a non-leading dim of what the model's layers take and return when it runs on that probe (shapes that depend on
    the data, e.g. a batch trimmed to its longest sentence, are only seen there). If every size tried shows up
    (a layer keeps the examples in another dim), the first one: the checks then judge that layout."""
    sizes = {s for p in model.parameters() for s in p.shape}
    sizes |= {s for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor) for s in t.shape[1:]}
    candidates = [k for k in _PROBE_SIZES if k not in sizes] or [_PROBE_SIZES[-1]]
    for k in candidates[:_RUNTIME_TRIES]:
        index = torch.arange(k) % batch
        seen = _layer_dims(model, _take(args, batch, index), _take(kwargs, batch, index))
        if seen is None or k not in seen:
            return k
    return candidates[0]


def _layer_dims(model: nn.Module, args: tuple, kwargs: dict) -> set[int] | None:
    """Every non-leading dim of the tensors the model's modules take and return on this input (no gradients);
    None if the forward fails (the checks then report it)."""
    dims: set[int] = set()

    def record(module: nn.Module, inputs: Any, output: Any) -> None:
        dims.update(s for t in tree_flatten((inputs, output))[0] if isinstance(t, Tensor) for s in t.shape[1:])

    return dims if _run_hooked(model, record, [(args, kwargs)], root=True) else None


def _run_hooked(model: nn.Module, hook: Callable[[nn.Module, Any, Any], None], calls: list[tuple[tuple, dict]],
                root: bool, before_call: Callable[[int], None] | None = None) -> bool:
    """Run ``model`` on each call (args, kwargs) without gradients, ``hook`` a forward hook on every sub-layer (and
    on the model itself with ``root``), ``before_call(i)`` before call i; False if a forward fails (a random
    draw's refusal still propagates). The hooks are removed either way."""
    handles = [m.register_forward_hook(hook) for m in model.modules() if root or m is not model]
    try:
        with torch.no_grad():
            for i, (args, kwargs) in enumerate(calls):
                if before_call is not None:
                    before_call(i)
                model(*args, **kwargs)
    except RandomDraw:
        raise
    except Exception:
        return False
    finally:
        for handle in handles:
            handle.remove()
    return True


def _take(values: Any, batch: int, index: Tensor) -> Any:
    return tree_map(
        lambda t: t.index_select(0, index.to(t.device)) if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == batch else t,
        values,
    )


def _owner(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


class StateGuard:
    """Detects (and, with a snapshot, undoes) changes to a model's parameters and buffers.

    Without a snapshot (every step): in-place writes, by version counter. With one (verification, on the first
    batch): also writes that bypass the counter (``p.data.copy_(...)``, as a data-dependent initialisation does),
    by value. With ``from_batch`` (verification): tensors computed from the batch left in plain attributes
    (``self.center = h.mean(0)``), which :meth:`check` replaces with a stand-in that refuses any later use: they
    would carry the probe's examples into every later step outside DP-SGD's mechanism."""

    def __init__(self, model: nn.Module, snapshot: bool, from_batch: FromBatch | None = None) -> None:
        self.model, self.from_batch = model, from_batch
        self.tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        self.versions = {name: t._version for name, t in self.tensors.items()}
        self.saved = {name: t.detach().clone() for name, t in self.tensors.items()} if snapshot else None

    def changed(self) -> list[str]:
        if self.saved is None:
            return [name for name, t in self.tensors.items() if t._version != self.versions[name]]
        return [name for name, t in self.tensors.items()
                if t._version != self.versions[name] or not _identical(t.detach(), self.saved[name])]

    def check(self, changed: list[str] | None = None) -> None:
        """Raise ModelNotSupportedError (restoring the snapshot, if any) when the forward wrote to the model; with
        ``from_batch``, put a stand-in in place of each tensor computed from the batch held in a plain attribute.
        ``changed``: what :meth:`changed` just returned (with a snapshot it compares every value: not twice)."""
        if self.from_batch is not None:
            _stand_in_for_stored(self.model, self.from_batch)
        changed = self.changed() if changed is None else changed
        if not changed:
            return
        if self.saved is not None:
            with torch.no_grad():
                for name in changed:
                    self.tensors[name].copy_(self.saved[name])
        modules = sorted({_owner(n) for n in changed})
        raise ModelNotSupportedError(
            f"the private forward/backward changed the model's own state ({', '.join(changed)}) in "
            f"{', '.join(modules)}: a layer that writes data of the batch into parameters or buffers releases it "
            "outside DP-SGD's mechanism (a data-dependent initialisation on the first batch, e.g. ActNorm, does), "
            "and one that updates its own state in forward (spectral_norm's power iteration) makes each example's "
            "re-run differ. "
            + ("The state was restored. " if self.saved is not None else "")
            + "Remove the in-forward update (e.g. running statistics: dpclip.fix_model; Embedding max_norm=None; "
            "initialise from public data before make_private)."
        )


def _identical(a: Tensor, b: Tensor) -> bool:
    """Bitwise the same values (NaN matching NaN)."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


class FromBatch(TorchFunctionMode):
    """Marks, while active, every tensor computed from the batch's tensors (any op with such an input, ``.detach()``
    and ``.data`` included; in-place writes mark their target), by id with a weak reference."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.derived = _Derived()
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, Tensor):
                self.derived.add(t, _BATCH)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in _SHAPE_ONLY_OPS:  # x.new_ones(...), ones_like(x): x's shape, dtype and device only
            return out
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        if name in _AS_TEMPLATE_OPS:
            inputs = inputs[:1]  # the other tensor serves as a template only
        elif name == "new_tensor":
            inputs = inputs[1:]  # the data, not the tensor it is made like
        if any(self.derived.sources(t) for t in inputs):
            for t in tree_flatten(out)[0]:
                if isinstance(t, Tensor):
                    self.derived.add(t, _BATCH)
        return out

    def holds(self, value: Any) -> bool:
        """Whether ``value`` (a tensor, or a list/tuple/dict of them) holds a tensor computed from the batch."""
        return any(self.marked(t) for t in tree_flatten(value)[0])

    def marked(self, value: Any) -> bool:
        return isinstance(value, Tensor) and bool(self.derived.sources(value))


_BATCH = frozenset({"batch"})
_SHAPE_ONLY_OPS = _TEMPLATE_OPS - {"detach", "new_tensor"}


def _stand_in_for_stored(model: nn.Module, from_batch: FromBatch) -> None:
    """Replace every tensor computed from the batch that verification's forwards left on the model — in a plain
    attribute of a module, of one of its parameters or buffers, or of a plain object they hold (up to three levels:
    ``self.stats.center``), or inside a list or dict there (the elements only, so ``self.acts.clear()`` still works)
    — with a stand-in that refuses any use; a forward that stores it anew replaces it."""
    from .paths import StoredTensorStandIn  # the stand-in the vmap path also leaves for tensors stored under vmap

    def stand_in(where: str) -> Callable[[Any], Any]:
        message = (
            f"the model's forward stored a tensor computed from the batch on the model ({where}) while dpclip "
            "verified it on the first batch, and it was read again later: it carries those examples' data into "
            "every later step outside DP-SGD's mechanism. Compute it before make_private from public data (a "
            "buffer), or return it from forward. Nothing was applied."
        )
        return lambda t: StoredTensorStandIn(message) if from_batch.marked(t) else t

    def scan(owner: Any, where: str, depth: int, seen: set[int]) -> None:
        if id(owner) in seen:
            return
        seen.add(id(owner))
        for attribute, value in list(vars(owner).items()):
            if attribute in ("_parameters", "_buffers", "_modules") or isinstance(value, (nn.Module, type)):
                continue
            here = f"{where}.{attribute}" if where else attribute
            if from_batch.holds(value):
                replace = stand_in(f"{here}, in {type(owner).__name__}")
                if isinstance(value, list):
                    value[:] = [tree_map(replace, v) for v in value]
                elif isinstance(value, dict):
                    for key in list(value):
                        value[key] = tree_map(replace, value[key])
                else:
                    setattr(owner, attribute, tree_map(replace, value))
            elif depth > 1 and hasattr(value, "__dict__") and not callable(value) and not isinstance(value, Tensor):
                scan(value, here, depth - 1, seen)

    seen: set[int] = set()
    for name, sub in model.named_modules():
        scan(sub, name, 3, seen)
        for tensor_name, tensor in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
            scan(tensor, f"{name}.{tensor_name}" if name else tensor_name, 1, seen)


#: Entries compared at a time by :func:`_same` and :func:`_scale`: their float64 temporaries stay a few MB however
#: large the parameter (whole-tensor temporaries of a 30,000-row embedding's sums had doubled the first step's heap).
_CHUNK = 2**20


def _chunks(t: Tensor) -> list[Tensor]:
    flat = t.reshape(-1)
    return [flat[start:start + _CHUNK] for start in range(0, flat.numel(), _CHUNK)]


def _norm64(t: Tensor) -> Tensor:
    """‖t‖₂ accumulated in float64, a chunk at a time (no float64 copy of the whole tensor)."""
    if not t.numel():
        return t.new_zeros((), dtype=torch.float64)
    return torch.stack([part.double().square().sum() for part in _chunks(t)]).sum().sqrt()


def _same(a: Tensor, b: Tensor, scale: float, tol: float) -> bool:
    """Equal within tol·scale (NaN matching NaN, an infinity matching itself)."""
    if a.shape != b.shape:
        return False
    for x, y in zip(_chunks(a), _chunks(b.to(a.device))):
        x, y = x.double(), y.double()
        if not bool(((x == y) | ((x - y).abs() <= tol * scale + 1e-30) | (x.isnan() & y.isnan())).all()):
            return False
    return True


def _scale(t: Tensor) -> float:
    """Largest finite magnitude in ``t`` (a floor of 1e-12)."""
    largest = 0.0
    for part in _chunks(t):
        finite = part.abs().masked_fill_(~torch.isfinite(part), 0)
        largest = max(largest, float(finite.max()) if finite.numel() else 0.0)
    return max(largest, 1e-12)


def verify_paths(
    model: nn.Module,
    args: tuple,
    kwargs: dict,
    batch: int,
    candidates: Mapping[str, PathRunner],
    names: list[str],
    whole_batch: Mapping[str, PathRunner] | None = None,
    chosen_path: str | None = None,
) -> str:
    """The first candidate path that passes the checks on a probe of this batch; ModelNotSupportedError if none.
    ``whole_batch``: for a path whose result may depend on the batch size, a runner that repeats the check on the
    whole batch (when it holds more examples than the probe) without learning layouts anew. ``chosen_path``:
    the one path the user asked for (``grad_sample_mode``; a refusal then points to the other), None for "auto"."""
    params = dict(model.named_parameters())
    trainable = [params[n] for n in names]
    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
    from_batch = FromBatch(args, kwargs)
    guard = StateGuard(model, snapshot=True, from_batch=from_batch)
    root = describe(model)
    try:
        with ExitStack() as stack:
            stack.enter_context(from_batch)
            stack.enter_context(torch.random.fork_rng(devices=devices))
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if devices:
                stack.enter_context(torch.autocast("cuda", enabled=False))
            layers = stack.enter_context(_LayerStack(model))
            stack.enter_context(NoDropout(layers.innermost_layer))
            k = probe_size(model, args, kwargs, batch)
            index = torch.arange(k) % batch
            probe_args, probe_kwargs = _take(args, batch, index), _take(kwargs, batch, index)
            try:
                expected = _reference(model, probe_args, probe_kwargs, k, batch, index, args, kwargs, trainable)
            except RandomDraw:
                raise
            except ModelNotSupportedError as error:
                if (random := _random_layer(model, probe_args, probe_kwargs)) is not None:
                    raise ModelNotSupportedError(
                        f"{root}: two forward passes on the same probe differ, first in the output of {random}: the "
                        "model draws random numbers outside dropout (e.g. torch.randn_like in a reparameterisation) "
                        "or keeps state from one call to the next (a call counter, a tensor kept in a plain "
                        "attribute), so dpclip can neither check that examples stay apart nor re-run a layer on one "
                        "example. Draw the noise in the training loop and pass it to the model as an input, one row "
                        "per example; pass a changing setting (a temperature, a step) as an input too"
                    ) from None
                alone = [(_take(args, batch, index[j:j + 1]), _take(kwargs, batch, index[j:j + 1])) for j in range(min(k, batch))]
                where = _first_layer_that_differs(model, probe_args, probe_kwargs, alone, k)
                raise ModelNotSupportedError(f"{root}: {error}" + (f"; the first layer that does so: {where}" if where else "")) from None
            except Exception as error:
                raise ModelNotSupportedError(
                    f"{root}: the brute-force check (each probe example run and differentiated alone) failed with "
                    f"{type(error).__name__}: {error}" + fix_hint(error)
                ) from error
            guard.check()
            failures: dict[str, str] = {}
            for path, run in candidates.items():  # in order of preference: the first that passes is taken
                reason = _try_path(model, run, probe_args, probe_kwargs, k, k, expected, names, guard)
                if reason is None and batch > k and (again := (whole_batch or {}).get(path)) is not None:
                    if expected.past is None:
                        expected.past = _rows_alone(model, args, kwargs, batch, k)
                    reason = _try_path(model, again, args, kwargs, batch, k, expected, names, guard)
                    if reason is not None:
                        reason = _prefixed(f"on the whole batch of {batch} (the probe of {k} passed): ", reason)
                if reason is None:
                    return path
                failures[path] = reason
    except RandomDraw as draw:
        raise ModelNotSupportedError(draw.message(root, model)) from None
    finally:
        guard.check()  # a forward that wrote into the model: restored, and refused (over any other reason)
    raise ModelNotSupportedError(
        f"dpclip could not verify exact per-example clipping for {root}, so it trains on nothing:\n  - "
        + "\n  - ".join(f"{path} path: {reason}" for path, reason in failures.items())
        + "\nFixes: give the model batch-first inputs and outputs (one row per example), keep examples apart "
        "(no batch statistics), call layers through their forward, or register a layer rule "
        "(dpclip.register_layer) for a custom layer."
        + _OTHER_PATH.get(chosen_path or "", "")
        + (_autocast_hint(layers.autocast_in) if layers.autocast_in is not None else _rounding_hint(failures))
    )


#: What a refusal adds when the user asked for one path alone: the other, which grad_sample_mode="auto" also tries.
_OTHER_PATH = {
    "layerwise": "\nOnly the layerwise path was tried (grad_sample_mode='layerwise'): grad_sample_mode='auto' (the "
                 "default) also tries the vmap path, which runs the whole model on each example alone and needs no "
                 "layer rules.",
    "vmap": "\nOnly the vmap path was tried (grad_sample_mode='vmap'): grad_sample_mode='auto' (the default) first "
            "tries the layerwise path, which differentiates the whole batch with autograd and forms each layer's "
            "per-example gradients from its inputs and output gradients (it also runs fused kernels that torch.func "
            "cannot differentiate, e.g. attention with a learned attn_mask).",
}


def fix_hint(error: Exception) -> str:
    """What a user can do about a torch error met while running the model under a path."""
    text = str(error)
    if "reentrant" in text:
        return "; use torch.utils.checkpoint.checkpoint(..., use_reentrant=False) (or no checkpointing)"
    if "stack expects each tensor to be equal size" in text:
        return " (shapes that depend on each example's data, e.g. pack_padded_sequence, cannot be vmapped: use grad_sample_mode='auto')"
    if "must match the size of tensor" in text:
        return (" (if an argument holds one row per example inside an object dpclip does not look into, e.g. a "
                "dataclass, dpclip passes it whole to each example: pass those tensors as arguments, or in tuples, "
                "lists or dicts)")
    if "enforce_sorted" in text:
        return (" (verification runs the model on batches it makes itself, the probe and each example alone, whose "
                "rows are not sorted by length: pack with enforce_sorted=False, which keeps the rows' order)")
    if "is_contiguous" in text:
        return (" (a kernel that needs contiguous inputs met a slice or transpose of another tensor, e.g. GroupNorm on "
                "h[:, :6] under vmap: pass it h[:, :6].contiguous(), or use grad_sample_mode='auto')")
    if "must only return Tensors" in text:
        return " (the model returns non-tensor outputs, e.g. a Hugging Face cache: pass use_cache=False)"
    return ""


def describe(model: nn.Module) -> str:
    """The model's class, followed through wrappers with a single child (PeftModel → LoraModel → GPT2LMHeadModel)."""
    names = [type(model).__name__]
    while len(children := list(model.children())) == 1 and len(names) < 4:
        model = children[0]
        names.append(type(model).__name__)
    return " → ".join(names)


def _try_path(model: nn.Module, run: PathRunner, run_args: tuple, run_kwargs: dict, size: int, k: int,
              expected: _Reference, names: list[str], guard: StateGuard) -> str | None:
    """None if the path passes on a batch of ``size`` whose first ``k`` rows are the probe, else why not (a torch
    error inside it counts as its failure)."""
    with _LayerStack(model) as layers:  # where a torch error inside the path happened
        try:
            reason = _check_path(model, run, run_args, run_kwargs, size, k, expected, names)
        except ModelNotSupportedError as error:
            reason = str(error)
        except RandomDraw:
            raise
        except Exception as error:
            reason = f"{type(error).__name__} in {layers.innermost()} under this path: {error}" + fix_hint(error)
    if changed := guard.changed():
        guard.check(changed)
    return reason


def _layer_outputs(model: nn.Module, calls: list[tuple[tuple, dict]], root: bool = False) -> list[dict[str, Tensor]] | None:
    """For each call (args, kwargs) of ``model`` (no gradients), every sub-layer's first floating output by layer
    name and class, "name (Class)" (the model's own last, with ``root``), in completion order; None if a forward fails (the checks then
    report it)."""
    records: list[dict[str, Tensor]] = [{} for _ in calls]
    names = {id(m): name for name, m in model.named_modules()}
    current: list[dict[str, Tensor]] = [records[0]]

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        floats = float_leaves(output)
        if floats:
            where = names.get(id(module), "?") or type(module).__name__
            current[0].setdefault(f"{where} ({type(module).__name__})", floats[0].detach())

    def select(i: int) -> None:
        current[0] = records[i]

    return records if _run_hooked(model, hook, calls, root, before_call=select) else None


def _random_layer(model: nn.Module, probe_args: tuple, probe_kwargs: dict) -> str | None:
    """If two forward passes on the same probe (dropout off) differ — a forward that samples noise — the first
    layer (in completion order) whose output differs; else None."""
    records = _layer_outputs(model, [(probe_args, probe_kwargs)] * 2, root=True)
    if records is None:
        return None
    for name, first in records[0].items():
        second = records[1].get(name)
        if second is not None and (first.shape != second.shape or not _same(first, second, _scale(first), _tolerance(first))):
            return name
    return None


def _first_layer_that_differs(model: nn.Module, probe_args: tuple, probe_kwargs: dict,
                              alone: list[tuple[tuple, dict]], k: int) -> str | None:
    """The first layer (in completion order) whose output does not hold the k examples in dim 0, or whose row for
    some example j differs from its output when example j runs alone (``alone[j]``: its arguments; every distinct
    example of the probe is run, since an op that mixes examples may leave one row as it was — a flip over the
    batch keeps the middle row); None if no layer output shows it."""
    records = _layer_outputs(model, [(probe_args, probe_kwargs), *alone])
    if records is None:
        return None
    for name, together in records[0].items():
        for j, record in enumerate(records[1:]):
            one = record.get(name)
            if one is None:
                continue
            if together.dim() == 0 or together.shape[0] != k or one.shape[0] != 1 or together.shape[1:] != one.shape[1:]:
                return f"{name}, whose output {tuple(together.shape)} does not hold the {k} examples in dim 0"
            if not _same(one, together[j:j + 1], _scale(together), _tolerance(together)):
                return f"{name}, whose output for an example differs alone and in a batch"
    return None


class _Reference:
    def __init__(self, outputs: list[Tensor], cotangents: list[Tensor], norms: Tensor, total: list[Tensor]) -> None:
        self.outputs, self.cotangents, self.norms, self.total = outputs, cotangents, norms, total
        self.past: tuple[Tensor, list[Tensor]] | None = None  # rows past the probe and their outputs alone


def _outputs_alone(model: nn.Module, args: tuple, kwargs: dict, batch: int, row: int) -> list[Tensor]:
    """The model's floating outputs for example ``row`` of the batch, run alone (a batch of one)."""
    one = torch.tensor([row])
    return float_leaves(model(*_take(args, batch, one), **_take(kwargs, batch, one)))


def _rows_alone(model: nn.Module, args: tuple, kwargs: dict, batch: int, k: int) -> tuple[Tensor, list[Tensor]]:
    """Up to k rows spread over the batch past the probe (the last one included), and each one's outputs when it
    runs alone: a model whose output depends on a row's position in the batch (``h * (arange(B) >= 12)``), or
    that mixes examples only there, passes the probe but not these."""
    rows = torch.linspace(k, batch - 1, steps=min(k, batch - k)).round().long().unique()
    alone: list[list[Tensor]] = []
    with torch.no_grad():
        for row in rows.tolist():
            alone.append([t.detach() for t in _outputs_alone(model, args, kwargs, batch, row)])
    if any(len(a) != len(alone[0]) for a in alone):
        raise ModelNotSupportedError("the model returns other outputs for one example than for another")
    return rows, [torch.cat(leaf) for leaf in zip(*alone)]


def _reference(model: nn.Module, probe_args: tuple, probe_kwargs: dict, k: int, batch: int, index: Tensor,
               args: tuple, kwargs: dict, trainable: list[Tensor]) -> _Reference:
    """Brute force: the probe's outputs, and each example's gradient computed on that example alone."""
    with torch.no_grad():
        returned = model(*probe_args, **probe_kwargs)
    outputs = float_leaves(returned)
    if not outputs:
        raise ModelNotSupportedError(
            f"the model's forward returned no floating-point tensor (it returned {type(returned).__name__}), so no "
            "loss can be formed from it: return the outputs the loss is computed from (a forward that ends without "
            "`return` returns None)"
        )
    for j, out in enumerate(outputs):
        if out.dim() == 0 or out.shape[0] != k:
            raise ModelNotSupportedError(
                f"the model's output {j} has shape {tuple(out.shape)} on a probe of {k} examples: dpclip needs "
                "outputs with one row per example in dim 0 (compute the loss outside the model, from per-example "
                "outputs; transpose time-major outputs inside the model)"
            )
    generator = torch.Generator().manual_seed(0)
    cotangents = [torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out) for out in outputs]
    norms, total = [], [torch.zeros_like(p) for p in trainable]
    for i in range(k):
        single = _outputs_alone(model, args, kwargs, batch, int(index[i]))
        if len(single) != len(outputs):
            raise ModelNotSupportedError("the model returns other outputs for one example than for a batch")
        for j, (alone, together) in enumerate(zip(single, outputs)):
            if alone.shape != together[i : i + 1].shape:
                raise ModelNotSupportedError(
                    f"the model's output {j} has shape {tuple(alone.shape)} for one example and "
                    f"{tuple(together.shape)} for a batch of {k}: dpclip runs each example alone as a batch of one, "
                    "whose output must keep its batch dim (e.g. squeeze(-1) instead of squeeze(), which also drops "
                    "a batch dim of 1)"
                )
            if not _same(alone.detach(), together[i : i + 1], _scale(together), _tolerance(together)):
                raise ModelNotSupportedError(
                    f"example {i}'s output {j} differs when it runs alone and inside a batch: the model mixes "
                    "examples (batch statistics, a batch-wide reduction, or examples not in dim 0 of the inputs), "
                    "so clipping each example's gradient would not bound its influence"
                )
        loss = sum((out * cot[i : i + 1]).sum() for out, cot in zip(single, cotangents))
        grads = torch.autograd.grad(loss, trainable, allow_unused=True) if loss.requires_grad else [None] * len(trainable)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, trainable)]
        norms.append(torch.stack([_norm64(g) for g in grads]) if grads else torch.zeros(0, dtype=torch.float64))
        for t, g in zip(total, grads):
            t.add_(g)
    return _Reference(outputs, cotangents, torch.stack(norms), total)


_FLOAT32_TOLERANCE = 2e-4
#: A float32 norm mismatch at most this fraction of the norms gets the rounding hint (:func:`_rounding_hint`).
_SMALL_MISMATCH = 1e-2


class _NormMismatch(str):
    """A path's failure reason for per-example norms that differ from the brute force's, with the largest
    difference relative to the norms and whether the float32 tolerance applied."""

    relative: float
    float32: bool

    def __new__(cls, text: str, *, relative: float, float32: bool) -> _NormMismatch:
        reason = super().__new__(cls, text)
        reason.relative, reason.float32 = relative, float32
        return reason


def _prefixed(prefix: str, reason: str) -> str:
    """``prefix + reason``, keeping what a :class:`_NormMismatch` knows."""
    if isinstance(reason, _NormMismatch):
        return _NormMismatch(prefix + reason, relative=reason.relative, float32=reason.float32)
    return prefix + reason


def _autocast_hint(layer: str) -> str:
    """The refusal's hint for a model whose forward turns autocast on itself (first seen entering ``layer``)."""
    return (f"\nThe model's forward turns autocast on itself ({layer} ran under it): verification compares the "
            "batch with each example alone with autocast off, and half-precision rounding inside the forward makes "
            "them differ. Take torch.autocast out of forward and wrap the training step's forward and loss in it "
            "instead (README § Mixed precision): dpclip then checks the model in float32 and trains it in bf16.")


def _rounding_hint(failures: Mapping[str, str]) -> str:
    """Where a path failed only by a small float32 norm difference: how to tell rounding from examples mixing.
    A deep or ill-conditioned float32 network (e.g. torchvision's GoogLeNet with transform_input, Inception3)
    sums a batch and an example alone in different orders, and its gradients can differ by more than the check's
    tolerance (2e-4 of the norms) without any example reaching another; in float64 the same check is 1e-9."""
    small = [r.relative for r in failures.values() if isinstance(r, _NormMismatch) and r.float32 and r.relative <= _SMALL_MISMATCH]
    if not small:
        return ""
    return (
        f"\nThe norm differences are small (at most {max(small):.2g} of the norms, the float32 check allows 2e-4): in a "
        "deep or ill-conditioned network float32 rounding alone can cause them (a batch and an example alone are "
        "summed in different orders). To tell: make_private a copy converted with model.double(), fed float64 inputs. "
        "If dpclip accepts it, the model keeps examples apart and training it in float64 is exact; if it refuses it "
        "too, examples do mix."
    )


def _tolerance(t: Tensor) -> float:
    return 1e-9 if t.dtype == torch.float64 else _FLOAT32_TOLERANCE


def _check_path(model: nn.Module, run: PathRunner, run_args: tuple, run_kwargs: dict, size: int, k: int,
                expected: _Reference, names: list[str]) -> str | None:
    """None if the path's outputs and per-example gradient norms for the first ``k`` rows (the probe) of a batch of
    ``size`` equal the brute force, and its sum does: on the probe alone, the brute force's; on a whole batch
    (the other rows with their own random cotangents), autograd's on that batch (:func:`_check_every_row`); else
    why not."""
    output, collect = run(model, run_args, run_kwargs, size)
    outputs = float_leaves(output)
    if len(outputs) != len(expected.outputs) or any(
        o.dim() == 0 or o.shape[0] != size or not _same(o[:k].detach(), e, _scale(e), _tolerance(e))
        for o, e in zip(outputs, expected.outputs)
    ):
        return (f"its forward returns other outputs than {type(model).__name__}'s own forward" if size == k else
                "the probe's examples get other outputs inside the whole batch than alone: the model mixes examples "
                "in batches of this size")
    if size > k and expected.past is not None:
        rows, alone = expected.past
        if len(alone) != len(outputs) or any(not _same(o[rows].detach(), a, _scale(a), _tolerance(a))
                                             for o, a in zip(outputs, alone)):
            return ("examples past the probe get other outputs inside the whole batch than alone (rows "
                    f"{', '.join(str(r) for r in rows.tolist())} checked): the output depends on the row's position in "
                    "the batch or on other examples")
    generator = torch.Generator().manual_seed(1)
    cotangents = [cot if size == k else torch.cat([cot, torch.randn((size - k, *cot.shape[1:]), generator=generator,
                                                                    dtype=torch.float64).to(cot)])
                  for cot in expected.cotangents]
    loss = sum((out * cot).sum() for out, cot in zip(outputs, cotangents))
    if isinstance(loss, Tensor) and loss.requires_grad:
        loss.backward()
    gradients = collect()
    if list(gradients.names) != names:
        return "it covers other parameters than the trainable ones"
    norms = gradients.norms("l2").double()[:k]
    tol = max(_tolerance(p) for p in expected.total) if expected.total else _FLOAT32_TOLERANCE
    scale = _scale(expected.norms)
    for j, name in enumerate(names):
        # The layer rules return certified upper bounds (LinearWeight adds (d_in + d_out + 11)·u of rounding cover):
        # a norm may exceed the exact one by that relative allowance, never fall below it by more than tol.
        allowance = (expected.total[j].numel() + 16) * unit_roundoff(expected.total[j].dtype) if expected.total else 0.0
        excess = norms[:, j] - expected.norms[:, j]
        bounded = bool((excess >= -tol * scale).all()) and bool((excess <= allowance * expected.norms[:, j] + tol * scale).all())
        if not (bounded or _same(norms[:, j], expected.norms[:, j], scale, tol)):  # (_same: non-finite examples too)
            difference = float((norms[:, j] - expected.norms[:, j]).abs().nan_to_num(nan=math.inf).max())
            return _NormMismatch(
                f"per-example gradient norms of {name} (in {_owner(name)}) differ from those of each example "
                f"computed alone (max difference {difference:.3g} on norms up to {scale:.3g})",
                relative=difference / scale, float32=tol == _FLOAT32_TOLERANCE,
            )
    if size > k:  # (the tensors behind the gradients serve one weighted sum)
        with _batch_frequency_scaling_off(model) as scaled:
            if scaled:  # the layout checked once more without it, where autograd's batch gradient is a plain sum
                del gradients
                output, collect = run(model, run_args, run_kwargs, size)
                loss = sum((out * cot).sum() for out, cot in zip(float_leaves(output), cotangents))
                if isinstance(loss, Tensor) and loss.requires_grad:
                    loss.backward()
                gradients = collect()
            return _check_every_row(model, run_args, run_kwargs, size, cotangents, gradients, names)
    sums = gradients.weighted_sum(torch.ones(size, len(names), dtype=torch.float64))
    for name, total in zip(names, expected.total):
        if not _same(sums[name], total, max(_scale(total), scale), tol):
            return (
                f"Σ of the per-example gradients of {name} (in {_owner(name)}) differs from the sum of each example's "
                "gradient computed alone: the parameter is used outside its layer's forward (e.g. tying by "
                "h @ emb.weight.T), or a hook changes what the layer returns"
            )
    return None


@contextmanager
def _batch_frequency_scaling_off(model: nn.Module) -> Iterator[bool]:
    """``scale_grad_by_freq`` turned off on the model's embeddings for the block (yields whether any had it).
    Autograd's backward of such a table divides each row's gradient by its id's count over the whole batch, so
    its batch gradient is no sum of per-example ones and cannot check which example each row belongs to; without
    the scaling it can, and the rows belong to the same examples either way (the scaling by each example's own
    counts is checked on the probe, against each example run alone)."""
    scaled = [m for m in model.modules() if getattr(m, "scale_grad_by_freq", False) is True]
    for module in scaled:
        module.scale_grad_by_freq = False
    try:
        yield bool(scaled)
    finally:
        for module in scaled:
            module.scale_grad_by_freq = True


def _check_every_row(model: nn.Module, run_args: tuple, run_kwargs: dict, size: int, cotangents: list[Tensor],
                     gradients: ExampleGradients, names: list[str]) -> str | None:
    """On the whole batch, every row and not only the probe's: the path's Σ_i w_i·g_i for random weights w_i must
    equal the gradient of Σ_i w_i·<out_i, v_i> that plain autograd computes on the same batch (the rows of an
    example the path hands to another example, e.g. data-selected rows ``head(h[mask])`` that happen to line up
    with the examples on the probe, change the weighted sum unless the two weights are equal, which random
    weights are not). One more forward and backward of the batch, without the path."""
    generator = torch.Generator().manual_seed(2)
    # magnitudes in [0.25, 1] with random signs: the sum grows like √size, so one row credited to the wrong example
    # (an error of one row's size) stays visible at large batches
    signs = torch.randint(0, 2, (size,), generator=generator, dtype=torch.float64) * 2 - 1
    weights = (torch.rand(size, dtype=torch.float64, generator=generator) * 0.75 + 0.25) * signs
    # the path's sum first: it frees the path's activations and output gradients before autograd's pass runs
    sums = gradients.weighted_sum(weights[:, None].expand(size, len(names)).contiguous())
    params = dict(model.named_parameters())
    trainable = [params[n] for n in names]
    outputs = float_leaves(model(*run_args, **run_kwargs))
    loss = sum((out * (cot * weights.to(cot).view(-1, *[1] * (cot.dim() - 1)))).sum() for out, cot in zip(outputs, cotangents))
    if not (isinstance(loss, Tensor) and loss.requires_grad):
        return None
    truth = [torch.zeros_like(p) if g is None else g for g, p in zip(torch.autograd.grad(loss, trainable, allow_unused=True), trainable)]
    # measured against the largest entry of any parameter's sum: a parameter whose exact gradient is 0 (an attention
    # key bias, which softmax cancels) holds only rounding on both sides; with float32's tolerance whatever the
    # dtype, since the two sides add in other orders (and float64 models may compute parts in float32: HF's
    # RMSNorm), while a misattributed row is about 1/√size of the scale
    scale = max((_scale(g) for g in truth), default=1e-12)
    for name, parameter, exact in zip(names, trainable, truth):
        if not _same(sums[name], exact, scale, _FLOAT32_TOLERANCE):
            return (
                f"the per-example gradients of {name} (in {_owner(name)}) on the batch's rows past the probe are not "
                "each example's own: a weighted sum of them differs from autograd's on the same batch (rows of one "
                "example credited to another, e.g. a layer run on rows selected by the data, h[mask], whose rows "
                "are not the examples)"
            )
    return None
