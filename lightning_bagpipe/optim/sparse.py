"""Row-wise sparse optimizers that update only the embedding rows a step touched.

Each optimizer keeps its state *inside the row*: a row is ``[weights (dim) | state (state_width)]``
float32, the layout shared by the store and the device cache, so state moves with its row and no row
ever sees another's state. :meth:`SparseOptimizer.update` receives a gathered copy of the touched rows
and their summed gradients and updates them in place, vectorized over rows.

Rows not touched at a step are not passed in and do not change: no weight decay, no moment decay, no
step count. That is exact for SGD and Adagrad without weight decay (a zero gradient changes nothing
there) and defines *lazy* Adam (see :class:`Adam`).

Weight decay is L2 on touched rows only: ``g = g + weight_decay * w`` before the update.

The learning rate is a positive float or a callable ``step -> lr`` (a schedule); ``opt.lr = ...`` may
replace either at run time and takes effect from the next :meth:`~SparseOptimizer.update`.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["SGD", "Adagrad", "Adam", "LRLike", "RowWiseAdagrad", "SparseOptimizer", "from_hparams"]

LRLike = float | Callable[[int], float]


def _finite(value: Any, name: str, lo: float = 0.0, lo_open: bool = False, hi: float | None = None) -> float:
    """``value`` as a float; ValueError unless finite and in ``[lo, hi)`` (``(lo, hi)`` if ``lo_open``).
    Any real number counts (numpy's scalars too), but not a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    v = float(value)
    if v < lo or (lo_open and v == lo) or (hi is not None and v >= hi):
        rng = f"{'(' if lo_open else '['}{lo}, {'inf' if hi is None else hi})"
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    return v


class SparseOptimizer(ABC):
    """Base class: learning rate, weight decay, shape checks; subclasses implement :meth:`_step`."""

    name: str = ""

    def __init__(self, lr: LRLike | None, weight_decay: float = 0.0) -> None:
        self.lr = lr  # type: ignore[assignment]  # validated by the setter
        self.weight_decay = _finite(weight_decay, f"{type(self).__name__} weight_decay")

    # ------------------------------------------------------------------ learning rate
    @property
    def lr(self) -> LRLike:
        """The learning rate: a positive float or a callable ``step -> lr``. Assignable at run time."""
        return self._lr

    @lr.setter
    def lr(self, value: LRLike) -> None:
        cls = type(self).__name__
        if value is None:
            raise ValueError(
                f"{cls} needs a learning rate: pass lr=<positive float> or lr=<callable step -> lr>"
            )
        if callable(value):
            self._lr: LRLike = value
        else:
            self._lr = _finite(value, f"{cls} lr", lo_open=True)

    def lr_at(self, step: int) -> float:
        """The learning rate used by :meth:`update` at ``step`` (a schedule may return 0, never < 0)."""
        if not callable(self._lr):
            return self._lr
        value = self._lr(int(step))
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        return _finite(value, f"{type(self).__name__} lr schedule at step {int(step)}")

    # ------------------------------------------------------------------ layout
    @abstractmethod
    def state_width(self, dim: int) -> int:
        """Optimizer-state floats stored after the ``dim`` weights of each row."""

    def initial_state(self, dim: int) -> Tensor:
        """The ``[state_width(dim)]`` float32 state every row starts with."""
        return torch.zeros(self.state_width(dim), dtype=torch.float32)

    def row_width(self, dim: int) -> int:
        """``dim + state_width(dim)``: the width of a store or cache row."""
        return int(dim) + self.state_width(dim)

    # ------------------------------------------------------------------ update
    def update(self, rows: Tensor, grad: Tensor, step: int) -> None:
        """Apply one step to ``rows`` in place.

        ``rows`` is ``[U, dim + state_width]`` float32 (a gathered copy of the touched rows); ``grad`` is
        ``[U, dim]``, the summed gradient of each touched row (already averaged across ranks). ``step`` is
        the global optimizer step, passed to a learning-rate schedule.
        """
        cls = type(self).__name__
        if grad.dim() != 2 or rows.dim() != 2:
            raise ValueError(
                f"{cls}.update: rows and grad must be 2-D, got {list(rows.shape)} and {list(grad.shape)}"
            )
        dim = grad.shape[1]
        width = self.row_width(dim)
        if rows.shape != (grad.shape[0], width):
            raise ValueError(
                f"{cls}.update: grad {list(grad.shape)} needs rows of shape [{grad.shape[0]}, {width}] "
                f"(dim {dim} + state {width - dim}), got {list(rows.shape)}"
            )
        if rows.dtype != torch.float32 or grad.dtype != torch.float32:
            raise ValueError(
                f"{cls}.update: rows and grad must be float32, got {rows.dtype} and {grad.dtype}"
            )
        if rows.device != grad.device:
            raise ValueError(f"{cls}.update: rows on {rows.device} but grad on {grad.device}")
        lr = self.lr_at(step)
        with torch.no_grad():
            w = rows[:, :dim]
            g = grad.add(w, alpha=self.weight_decay) if self.weight_decay else grad
            self._step(w, rows[:, dim:], g, lr)

    @abstractmethod
    def _step(self, w: Tensor, state: Tensor, g: Tensor, lr: float) -> None:
        """Update weights ``w`` [U, dim] and ``state`` [U, state_width] (views into rows) in place."""

    # ------------------------------------------------------------------ checkpoints
    def hparams(self) -> dict[str, Any]:
        """Plain-typed hyper-parameters; ``lr`` is None when it is a schedule (not serializable)."""
        schedule = callable(self._lr)
        return {
            "name": self.name,
            "lr": None if schedule else self._lr,
            "lr_is_schedule": schedule,
            "weight_decay": self.weight_decay,
            **self._extra_hparams(),
        }

    def _extra_hparams(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        h = self.hparams()
        lr = self._lr if not callable(self._lr) else "<schedule>"
        extra = ", ".join(f"{k}={v!r}" for k, v in h.items() if k not in ("name", "lr", "lr_is_schedule"))
        return f"{type(self).__name__}(lr={lr}, {extra})"


class SGD(SparseOptimizer):
    """Plain SGD: ``w = w - lr * g``. No state (``state_width == 0``). Matches ``torch.optim.SGD``."""

    name = "sgd"

    def state_width(self, dim: int) -> int:
        return 0

    def _step(self, w: Tensor, state: Tensor, g: Tensor, lr: float) -> None:
        w.add_(g, alpha=-lr)


class Adagrad(SparseOptimizer):
    """Element-wise Adagrad, as ``torch.optim.Adagrad`` with ``lr_decay=0``.

    State: one accumulator per weight (``state_width == dim``), starting at ``initial_accumulator_value``.
    Per touched row: ``s = s + g * g``; ``w = w - lr * g / (sqrt(s) + eps)``.
    """

    name = "adagrad"

    def __init__(
        self,
        lr: LRLike | None,
        eps: float = 1e-10,
        initial_accumulator_value: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(lr, weight_decay)
        self.eps = _finite(eps, f"{type(self).__name__} eps")
        self.initial_accumulator_value = _finite(
            initial_accumulator_value, f"{type(self).__name__} initial_accumulator_value"
        )

    def state_width(self, dim: int) -> int:
        return int(dim)

    def initial_state(self, dim: int) -> Tensor:
        return torch.full((self.state_width(dim),), self.initial_accumulator_value, dtype=torch.float32)

    def _step(self, w: Tensor, state: Tensor, g: Tensor, lr: float) -> None:
        # Element-wise math on the strided column views is slow on CPU; compute contiguously, copy back.
        s = torch.addcmul(state, g, g, value=1.0)
        state.copy_(s)
        w.addcdiv_(g, s.sqrt_().add_(self.eps), value=-lr)

    def _extra_hparams(self) -> dict[str, Any]:
        return {"eps": self.eps, "initial_accumulator_value": self.initial_accumulator_value}


class RowWiseAdagrad(Adagrad):
    """Row-wise Adagrad (FBGEMM's ``EXACT_ROWWISE_ADAGRAD``, DLRM's ``RWSAdagrad``): one accumulator per row.

    State: ``state_width == 1``. Per touched row: ``s = s + mean(g * g)`` (mean over the ``dim``
    weights); ``m = lr / (sqrt(s) + eps)``; ``w = w - m * g``. Costs 1 float per row instead of ``dim``.
    """

    name = "rowwise_adagrad"

    def state_width(self, dim: int) -> int:
        return 1

    def _step(self, w: Tensor, state: Tensor, g: Tensor, lr: float) -> None:
        state.add_((g * g).mean(dim=1, keepdim=True))
        denom = state.sqrt().add_(self.eps)
        multiplier = torch.full_like(denom, lr).div_(denom)
        w.addcmul_(g, multiplier, value=-1.0)


class Adam(SparseOptimizer):
    """Lazy (sparse) Adam: ``torch.optim.Adam`` (non-amsgrad) applied to each row on the steps it is touched.

    State: ``[m (dim) | v (dim) | c (1)]``, ``state_width == 2 * dim + 1``, all starting at 0. ``c`` is the
    row's own step count. Per touched row::

        c = c + 1
        m = b1 * m + (1 - b1) * g          (torch's lerp)
        v = b2 * v + (1 - b2) * g * g
        w = w - (lr / (1 - b1**c)) * m / (sqrt(v) / sqrt(1 - b2**c) + eps)

    Untouched rows keep ``m``, ``v`` and ``c``: moments do not decay while a row is unused, and bias
    correction uses the row's own count (like TensorFlow's LazyAdam / ``torch.optim.SparseAdam``, unlike
    dense Adam, which moves every row every step). ``c`` is float32, exact up to ``2**24`` (16.7 M)
    updates of one row; beyond that the count stalls, which changes nothing in practice because the bias
    corrections are 1.0 in float32 long before.
    """

    name = "adam"

    def __init__(
        self,
        lr: LRLike | None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(lr, weight_decay)
        cls = type(self).__name__
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{cls} betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = (
            _finite(betas[0], f"{cls} beta1", hi=1.0),
            _finite(betas[1], f"{cls} beta2", hi=1.0),
        )
        self.eps = _finite(eps, f"{cls} eps")

    def state_width(self, dim: int) -> int:
        return 2 * int(dim) + 1

    def _step(self, w: Tensor, state: Tensor, g: Tensor, lr: float) -> None:
        dim = w.shape[1]
        m, v, count = state[:, :dim], state[:, dim : 2 * dim], state[:, 2 * dim :]
        b1, b2 = self.betas
        count.add_(1.0)
        # Compute the moments contiguously (strided column views are slow on CPU), then store them.
        m_new = torch.lerp(m, g, 1.0 - b1)
        v_new = torch.mul(v, b2).addcmul_(g, g, value=1.0 - b2)
        m.copy_(m_new)
        v.copy_(v_new)
        c = count.to(torch.float64)
        step_size = (lr / (1.0 - torch.pow(b1, c))).to(torch.float32)
        bc2_sqrt = torch.sqrt(1.0 - torch.pow(b2, c)).to(torch.float32)
        denom = v_new.sqrt_().div_(bc2_sqrt).add_(self.eps)
        w.addcmul_(m_new.div_(denom), step_size, value=-1.0)

    def _extra_hparams(self) -> dict[str, Any]:
        return {"betas": list(self.betas), "eps": self.eps}


_REGISTRY: dict[str, type[SparseOptimizer]] = {c.name: c for c in (SGD, Adagrad, RowWiseAdagrad, Adam)}


def from_hparams(hparams: dict[str, Any], lr: LRLike | None = None) -> SparseOptimizer:
    """Rebuild an optimizer from :meth:`SparseOptimizer.hparams` (e.g. from a checkpoint).

    ``lr`` overrides the stored one and is required when the original used a schedule.
    """
    h = dict(hparams)
    name = h.pop("name", None)
    if name not in _REGISTRY:
        raise ValueError(f"unknown sparse optimizer {name!r}; known: {sorted(_REGISTRY)}")
    stored_lr, schedule = h.pop("lr", None), h.pop("lr_is_schedule", False)
    if lr is None:
        if schedule:
            raise ValueError(
                f"optimizer {name!r} was saved with an lr schedule, which a checkpoint cannot hold: pass the "
                "schedule again (from_hparams(..., lr=<the schedule>), or the whole optimizer to the model: "
                "load_from_checkpoint(path, sparse_optimizer=<optimizer with its schedule>))"
            )
        lr = stored_lr
    if "betas" in h:
        h["betas"] = tuple(h["betas"])
    return _REGISTRY[name](lr, **h)
