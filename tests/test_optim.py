"""Row-wise sparse optimizers against explicit reference math and against torch.optim."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from lightning_bagpipe.optim import SGD, Adagrad, Adam, RowWiseAdagrad, SparseOptimizer, from_hparams

N, DIM, STEPS = 40, 6, 6


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal within 1e-6 (absolute, or relative for values above 1)."""
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def touched_steps(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per step: distinct touched rows (unsorted) and their gradients; some rows are never touched."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        k = int(torch.randint(1, N - 5, (1,), generator=g))
        ids = torch.randperm(N - 5, generator=g)[:k]  # rows N-5.. are never touched
        out.append((ids, torch.randn(k, DIM, generator=g)))
    return out


def run_sparse(opt: SparseOptimizer, w0: torch.Tensor, seed: int) -> torch.Tensor:
    """What the executor does: gather touched rows, update the copy, scatter it back."""
    table = torch.cat([w0, opt.initial_state(DIM).expand(N, -1)], dim=1)
    for step, (ids, grad) in enumerate(touched_steps(seed)):
        before = table.clone()
        grad_copy = grad.clone()
        rows = table[ids]
        opt.update(rows, grad, step)
        table[ids] = rows
        assert torch.equal(grad, grad_copy), "update must not modify the gradient"
        untouched = torch.ones(N, dtype=torch.bool)
        untouched[ids] = False
        assert torch.equal(table[untouched], before[untouched])
    return table


# ---------------------------------------------------------------------------- reference math (float64)
def ref_run(
    kind: str, w0: torch.Tensor, seed: int, lr: Callable[[int], float], wd: float, **hp: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row loops with the textbook formulas; returns (weights, state) in float64."""
    w = w0.double().numpy().copy()
    if kind == "sgd":
        state = np.zeros((N, 0))
    elif kind == "adagrad":
        state = np.full((N, DIM), hp.get("init", 0.0))
    elif kind == "rowwise_adagrad":
        state = np.full((N, 1), hp.get("init", 0.0))
    else:
        state = np.zeros((N, 2 * DIM + 1))
    eps = hp.get("eps", 0.0)
    b1, b2 = hp.get("b1", 0.0), hp.get("b2", 0.0)
    for step, (ids, grad) in enumerate(touched_steps(seed)):
        a = lr(step)
        for i, r in enumerate(ids.tolist()):
            g = grad[i].double().numpy() + wd * w[r]
            if kind == "sgd":
                w[r] = w[r] - a * g
            elif kind == "adagrad":
                state[r] = state[r] + g * g
                w[r] = w[r] - a * g / (np.sqrt(state[r]) + eps)
            elif kind == "rowwise_adagrad":
                state[r, 0] = state[r, 0] + np.mean(g * g)
                w[r] = w[r] - a * g / (np.sqrt(state[r, 0]) + eps)
            else:
                m, v, c = state[r, :DIM], state[r, DIM : 2 * DIM], state[r, 2 * DIM] + 1
                m = b1 * m + (1 - b1) * g
                v = b2 * v + (1 - b2) * g * g
                m_hat, v_hat = m / (1 - b1**c), v / (1 - b2**c)
                w[r] = w[r] - a * m_hat / (np.sqrt(v_hat) + eps)
                state[r] = np.concatenate([m, v, [c]])
    return w, state


def w0_for(seed: int) -> torch.Tensor:
    return torch.randn(N, DIM, generator=torch.Generator().manual_seed(1000 + seed))


CASES = [
    ("sgd", lambda lr, wd: SGD(lr, weight_decay=wd), {}),
    ("adagrad", lambda lr, wd: Adagrad(lr, eps=1e-10, weight_decay=wd), {"eps": 1e-10}),
    (
        "adagrad",
        lambda lr, wd: Adagrad(lr, eps=1e-3, initial_accumulator_value=0.1, weight_decay=wd),
        {"eps": 1e-3, "init": 0.1},
    ),
    ("rowwise_adagrad", lambda lr, wd: RowWiseAdagrad(lr, weight_decay=wd), {"eps": 1e-10}),
    (
        "rowwise_adagrad",
        lambda lr, wd: RowWiseAdagrad(lr, eps=1e-4, initial_accumulator_value=0.5, weight_decay=wd),
        {"eps": 1e-4, "init": 0.5},
    ),
    ("adam", lambda lr, wd: Adam(lr, weight_decay=wd), {"b1": 0.9, "b2": 0.999, "eps": 1e-8}),
    (
        "adam",
        lambda lr, wd: Adam(lr, betas=(0.5, 0.9), eps=1e-3, weight_decay=wd),
        {"b1": 0.5, "b2": 0.9, "eps": 1e-3},
    ),
]


@pytest.mark.parametrize("wd", [0.0, 0.01])
@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_matches_reference_math(case: int, wd: float) -> None:
    kind, make, hp = CASES[case]
    opt = make(0.05, wd)
    assert opt.name == kind
    w0 = w0_for(case)
    table = run_sparse(opt, w0, seed=case)
    w_ref, s_ref = ref_run(kind, w0, case, lambda s: 0.05, wd, **hp)
    close(table[:, :DIM], torch.from_numpy(w_ref).float())
    close(table[:, DIM:], torch.from_numpy(s_ref).float())
    assert table.shape[1] == opt.row_width(DIM)


def test_lr_schedule_is_called_with_the_step() -> None:
    calls: list[int] = []

    def schedule(step: int) -> float:
        calls.append(step)
        return 0.02 * (step + 1)

    for kind, opt, hp in [
        ("rowwise_adagrad", RowWiseAdagrad(schedule), {"eps": 1e-10}),
        ("adam", Adam(schedule), {"b1": 0.9, "b2": 0.999, "eps": 1e-8}),
    ]:
        calls.clear()
        w0 = w0_for(3)
        table = run_sparse(opt, w0, seed=3)
        assert calls == list(range(STEPS))
        w_ref, _ = ref_run(kind, w0, 3, lambda s: 0.02 * (s + 1), 0.0, **hp)
        close(table[:, :DIM], torch.from_numpy(w_ref).float())


def test_lr_can_be_reassigned_at_run_time() -> None:
    opt = SGD(0.1)
    rows, grad = torch.zeros(2, DIM), torch.ones(2, DIM)
    opt.update(rows, grad, 0)
    opt.lr = 0.5
    opt.update(rows, grad, 1)
    opt.lr = lambda step: 0.25 * step
    opt.update(rows, grad, 2)
    torch.testing.assert_close(rows, torch.full((2, DIM), -(0.1 + 0.5 + 0.5)), rtol=0, atol=1e-7)
    assert opt.lr_at(8) == 2.0
    with pytest.raises(ValueError, match="lr must be"):
        opt.lr = -1.0


# ---------------------------------------------------------------------------- against torch.optim
def test_sgd_and_adagrad_match_dense_torch_with_zero_grads() -> None:
    """Without weight decay a zero gradient leaves a row alone in torch's SGD and Adagrad too."""
    for ours, theirs in [
        (SGD(0.05), lambda p: torch.optim.SGD([p], lr=0.05)),
        (
            Adagrad(0.05, initial_accumulator_value=0.2),
            lambda p: torch.optim.Adagrad([p], lr=0.05, initial_accumulator_value=0.2, foreach=False),
        ),
    ]:
        w0 = w0_for(5)
        table = run_sparse(ours, w0, seed=5)
        p = torch.nn.Parameter(w0.clone())
        opt = theirs(p)
        for ids, grad in touched_steps(5):
            dense = torch.zeros(N, DIM)
            dense[ids] = grad
            p.grad = dense
            opt.step()
        close(table[:, :DIM], p.detach())
        if isinstance(ours, Adagrad):
            close(table[:, DIM:], opt.state[p]["sum"])


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_adam_and_adagrad_equal_per_row_torch_optimizers_stepped_when_touched(wd: float) -> None:
    """Lazy semantics: each row behaves like its own torch optimizer that only steps when touched."""
    for ours, make in [
        (Adam(0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd), "adam"),
        (Adagrad(0.05, eps=1e-10, weight_decay=wd), "adagrad"),
        (SGD(0.05, weight_decay=wd), "sgd"),
    ]:
        w0 = w0_for(6)
        table = run_sparse(ours, w0, seed=6)
        params = [torch.nn.Parameter(w0[r].clone()) for r in range(N)]
        if make == "adam":
            opts: list[torch.optim.Optimizer] = [
                torch.optim.Adam([p], lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd, foreach=False)
                for p in params
            ]
        elif make == "adagrad":
            opts = [torch.optim.Adagrad([p], lr=0.05, weight_decay=wd, foreach=False) for p in params]
        else:
            opts = [torch.optim.SGD([p], lr=0.05, weight_decay=wd) for p in params]
        for ids, grad in touched_steps(6):
            for i, r in enumerate(ids.tolist()):
                params[r].grad = grad[i].clone()
                opts[r].step()
        close(table[:, :DIM], torch.stack([p.detach() for p in params]))
        if make == "adam":
            touched = [r for r in range(N) if opts[r].state]
            st = [opts[r].state[params[r]] for r in touched]
            close(table[touched, DIM : 2 * DIM], torch.stack([s["exp_avg"] for s in st]))
            close(table[touched, 2 * DIM : 3 * DIM], torch.stack([s["exp_avg_sq"] for s in st]))
            assert table[touched, -1].tolist() == [float(s["step"]) for s in st]


def test_adam_moves_rows_with_zero_gradient_but_only_when_touched() -> None:
    """A touched row with zero gradient still moves (momentum); an untouched row does not."""
    opt = Adam(0.1)
    rows = torch.cat([torch.zeros(1, DIM), opt.initial_state(DIM).unsqueeze(0)], dim=1)
    opt.update(rows, torch.ones(1, DIM), 0)
    after_one = rows.clone()
    opt.update(rows, torch.zeros(1, DIM), 1)
    assert (rows[0, :DIM] < after_one[0, :DIM]).all()
    assert rows[0, -1] == 2.0


# ---------------------------------------------------------------------------- layout, errors, hparams
def test_state_layout() -> None:
    assert SGD(0.1).state_width(DIM) == 0
    assert torch.equal(Adagrad(0.1, initial_accumulator_value=0.3).initial_state(4), torch.full((4,), 0.3))
    assert torch.equal(
        RowWiseAdagrad(0.1, initial_accumulator_value=0.3).initial_state(4), torch.tensor([0.3])
    )
    assert torch.equal(Adam(0.1).initial_state(4), torch.zeros(9))
    assert Adam(0.1).row_width(4) == 13


def test_numpy_scalars_are_numbers_like_any_other() -> None:
    rows = torch.randn(3, DIM + 1)
    grad = torch.randn(3, DIM)
    expected = rows.clone()
    RowWiseAdagrad(0.01, weight_decay=0.5).update(expected, grad, 0)
    for lr, wd in [(np.float32(0.01), np.int64(0)), (np.float64(0.01), np.float32(0.5))]:
        got = rows.clone()
        opt = RowWiseAdagrad(lr, weight_decay=wd)  # type: ignore[arg-type]
        assert type(opt.lr) is float and type(opt.weight_decay) is float
        opt.update(got, grad, 0)
        if float(wd) == 0.5:
            assert torch.equal(got, expected)
    with pytest.raises(ValueError, match=r"lr must be a finite number, got np\.True_"):
        RowWiseAdagrad(np.bool_(True))  # type: ignore[arg-type]
    scheduled = SGD(lambda step: np.float32(0.5))
    scheduled.update(torch.zeros(1, DIM), torch.ones(1, DIM), 0)


@pytest.mark.parametrize("bad", [None, 0, 0.0, -0.1, math.nan, math.inf, "0.1", True])
def test_bad_lr_is_a_clear_error(bad: object) -> None:
    with pytest.raises(ValueError, match=r"RowWiseAdagrad (needs a learning rate|lr must be)"):
        RowWiseAdagrad(bad)  # type: ignore[arg-type]


def test_bad_hyperparameters() -> None:
    with pytest.raises(ValueError, match="weight_decay must be in"):
        SGD(0.1, weight_decay=-1)
    with pytest.raises(ValueError, match="beta2 must be in"):
        Adam(0.1, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="betas must be a pair"):
        Adam(0.1, betas=(0.9,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps must be"):
        Adagrad(0.1, eps=-1e-3)


def test_schedule_returning_a_bad_value_names_the_step() -> None:
    opt = SGD(lambda s: 0.1 - 0.05 * s)
    opt.update(torch.zeros(1, DIM), torch.ones(1, DIM), 2)  # lr 0 is allowed from a schedule
    with pytest.raises(ValueError, match=r"lr schedule at step 3 must be in \[0.0, inf\), got -0.05"):
        opt.update(torch.zeros(1, DIM), torch.ones(1, DIM), 3)


def test_update_shape_errors() -> None:
    opt = Adam(0.1)
    with pytest.raises(
        ValueError, match=r"needs rows of shape \[3, 19\] \(dim 6 \+ state 13\), got \[3, 18\]"
    ):
        opt.update(torch.zeros(3, 18), torch.zeros(3, DIM), 0)
    with pytest.raises(ValueError, match="float32"):
        opt.update(torch.zeros(3, 19, dtype=torch.float64), torch.zeros(3, DIM, dtype=torch.float64), 0)
    with pytest.raises(ValueError, match="2-D"):
        opt.update(torch.zeros(19), torch.zeros(DIM), 0)
    opt.update(torch.zeros(0, 19), torch.zeros(0, DIM), 0)  # a step that touched nothing


def test_hparams_are_plain_and_roundtrip() -> None:
    for opt in [
        SGD(0.1, weight_decay=0.01),
        Adagrad(0.2, eps=1e-6, initial_accumulator_value=0.1),
        RowWiseAdagrad(0.3),
        Adam(0.4, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.02),
    ]:
        h = opt.hparams()
        assert json.loads(json.dumps(h)) == h
        again = from_hparams(h)
        assert type(again) is type(opt) and again.hparams() == h
    sched = Adam(lambda s: 0.1)
    assert sched.hparams()["lr"] is None and sched.hparams()["lr_is_schedule"]
    with pytest.raises(
        ValueError, match=r"saved with an lr schedule.*load_from_checkpoint\(path, sparse_optimizer="
    ):
        from_hparams(sched.hparams())
    assert from_hparams(sched.hparams(), lr=0.3).lr == 0.3
    with pytest.raises(ValueError, match="unknown sparse optimizer 'lamb'"):
        from_hparams({"name": "lamb", "lr": 0.1})
