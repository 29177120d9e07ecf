"""Assignment solvers and the exact savings of weight matching (lazy re-solving, streaming)."""

from __future__ import annotations

import pytest
import torch

from lmc_lightning.nets import get_net
from lmc_lightning.weights.permutation import PermutationSpec, derive_spec, weight_matching
from lmc_lightning.weights.permutation.solvers import (
    auction,
    dual_prices,
    has_lap,
    optimality_gap,
    resolve_solver,
    solve_assignment,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("n", [1, 2, 7, 60])
def test_solvers_reach_the_optimum(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(n, 20, generator=gen, dtype=torch.float64)
    cost = a @ (0.5 * a[torch.randperm(n, generator=gen)] + torch.randn(n, 20, generator=gen,
                                                                       dtype=torch.float64)).T
    best = cost[torch.arange(n), solve_assignment(cost, "scipy")].sum()
    solvers = ["auction"] + (["lap"] if has_lap() else [])
    for solver in solvers:
        col = solve_assignment(cost, solver)
        assert torch.equal(col.sort().values, torch.arange(n))
        assert cost[torch.arange(n), col].sum() >= best - 1e-9 * best.abs()
    if n <= 7:  # brute force over all permutations
        import itertools
        brute = max(sum(cost[i, p[i]].item() for i in range(n)) for p in itertools.permutations(range(n)))
        assert abs(best.item() - brute) < 1e-9


def _matrices(n: int) -> dict[str, torch.Tensor]:
    """Random, structured (weight-matching-like: a permuted low-rank match plus noise), integer and all-tied costs."""
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(n, 8, generator=gen, dtype=torch.float64)
    return {"random": torch.randn(n, n, generator=gen, dtype=torch.float64),
            "structured": a @ a[torch.randperm(n, generator=gen)].T + 0.1 * torch.randn(n, n, generator=gen,
                                                                                      dtype=torch.float64),
            "integer ties": torch.randint(0, 3, (n, n), generator=gen).double(),
            "all tied": torch.ones(n, n, dtype=torch.float64)}


def _objective(cost: torch.Tensor, col: torch.Tensor) -> float:
    return cost[torch.arange(len(cost)), col.cpu()].sum().item()


@pytest.mark.parametrize("n", [1, 2, 5, 40])
def test_auction_and_dual_prices_are_optimal(n: int) -> None:
    for name, cost in _matrices(n).items():
        best = _objective(cost, solve_assignment(cost, "scipy"))
        solved = auction(cost)
        assert torch.equal(solved.col.sort().values, torch.arange(n)), name
        assert _objective(cost, solved.col) == pytest.approx(best, rel=1e-6, abs=1e-9), name
        # the auction's prices certify its own assignment up to its accuracy
        assert optimality_gap(cost, solved.col, solved.price).item() <= 1e-8 * (cost.max() - cost.min() + 1)
        duals = dual_prices(cost, solve_assignment(cost, "scipy"))
        u = cost[torch.arange(n), duals.col] - duals.price[duals.col]
        assert (cost - u[:, None] - duals.price[None]).max().item() <= 1e-12, name  # dual feasible
        assert optimality_gap(cost, duals.col, duals.price).item() <= 1e-12, name


def test_prices_expose_a_worse_assignment_and_warm_start_the_auction() -> None:
    cost = _matrices(60)["structured"]
    col = solve_assignment(cost, "scipy")
    prices = dual_prices(cost, col).price
    swapped = col.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    loss = _objective(cost, col) - _objective(cost, swapped)
    assert optimality_gap(cost, swapped, prices).item() >= loss - 1e-12 > 0
    changed = cost + 0.05 * torch.randn(60, 60, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    best = _objective(changed, solve_assignment(changed, "scipy"))
    cold, warm = auction(changed), auction(changed, prices, col)
    assert _objective(changed, warm.col) == pytest.approx(best, rel=1e-9)
    assert warm.iterations <= cold.iterations  # a small saving: the bidding tail dominates (see benchmarks/align.py)
    with pytest.raises(ValueError, match="square"):
        auction(torch.zeros(3, 4))


def test_solver_names_are_checked() -> None:
    assert resolve_solver("auto") == ("lap" if has_lap() else "scipy")
    with pytest.raises(ValueError, match="choose one of"):
        resolve_solver("hungarian")


def _pair(name: str, **kwargs: float) -> tuple[PermutationSpec, dict, dict]:
    """Spec and state dicts of two nets ``name`` from seeds 0 and 1."""
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(get_net(name, num_classes=5, in_channels=3, **kwargs))
    return derive_spec(nets[0]), nets[0].state_dict(), nets[1].state_dict()


def test_lazy_and_streamed_weight_matching_take_the_same_path() -> None:
    spec, a, b = _pair("vgg11", input_size=16, width=0.125)
    eager = weight_matching(spec, a, b, solver="scipy", lazy=False)
    lazy = weight_matching(spec, a, b, solver="scipy", lazy=True)
    streamed = weight_matching(spec, a, b, solver="auction", lazy=True, stream=True)
    assert eager.rounds >= 3 and lazy.rounds == eager.rounds == streamed.rounds
    assert lazy.solves < 0.8 * eager.solves and eager.solves == eager.rounds * len(spec.groups)
    for result in (lazy, streamed):
        assert all(torch.equal(result.perm[g], eager.perm[g]) for g in spec.groups)
        assert result.objective == pytest.approx(eager.objective, rel=1e-6)


@pytest.mark.parametrize("solver", ["scipy", "auction"])
def test_warm_steps_take_the_exact_path(solver: str) -> None:
    spec, a, b = _pair("resnet20", input_size=8, width=0.5)
    exact = weight_matching(spec, a, b, solver="scipy", warm=False)
    for workers in (1, 4):
        warm = weight_matching(spec, a, b, solver=solver, warm=True, workers=workers)
        assert warm.rounds == exact.rounds >= 2 and warm.solves == exact.solves
        assert warm.cold == len(spec.groups) and (warm.bids > 0) == (solver == "auction")
        assert all(torch.equal(warm.perm[g], exact.perm[g]) for g in spec.groups)
        assert warm.objective == pytest.approx(exact.objective, rel=1e-9)


def test_concurrent_steps_give_the_sequential_result() -> None:
    spec, a, b = _pair("resnet20", input_size=8, width=0.5)
    one = weight_matching(spec, a, b, solver="scipy", workers=1, seed=3)
    many = weight_matching(spec, a, b, solver="scipy", workers=4, seed=3)
    assert one.rounds == many.rounds >= 2 and one.solves == many.solves
    assert all(torch.equal(one.perm[g], many.perm[g]) for g in spec.groups)
    with pytest.raises(ValueError, match="workers"):
        weight_matching(spec, a, b, workers=0)


@pytest.mark.skipif(not has_lap(), reason="the lapx package (the fast extra) is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lap_and_scipy_agree(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 17, 64, 300):
        for name, cost in _matrices(n).items():
            cost = cost.to(dtype)
            ref, col = solve_assignment(cost, "scipy"), solve_assignment(cost, "lap")
            assert torch.equal(col.sort().values, torch.arange(n)), (n, name)
            best = _objective(cost.double(), ref)
            assert _objective(cost.double(), col) == pytest.approx(best, rel=1e-12, abs=1e-12), (n, name)
            if "tie" not in name:  # continuous random costs: one optimum, so the same assignment
                assert torch.equal(col, ref), (n, name)
        scaled = 1e4 * torch.randn(n, n, generator=gen, dtype=dtype) + 1e6  # large offset: float32 rounding
        assert torch.equal(solve_assignment(scaled, "lap"), solve_assignment(scaled, "scipy"))
    cost = torch.randn(40, 40, generator=gen, dtype=dtype)
    view = cost.T  # non-contiguous; and bfloat16 (no numpy dtype) is solved in float64
    assert torch.equal(solve_assignment(view, "lap"), solve_assignment(view, "scipy"))
    assert torch.equal(solve_assignment(cost.bfloat16(), "lap"), solve_assignment(cost.bfloat16(), "scipy"))


def _direct_objective(spec: PermutationSpec, a: dict, b: dict, perm: dict) -> float:
    from lmc_lightning.weights.permutation import apply_permutation

    aligned = apply_permutation(b, spec, perm)
    return sum(float((a[k].double() * aligned[k].double()).sum()) for k in spec.by_key()
               if k not in spec.buffers and a[k].is_floating_point())


@pytest.mark.parametrize("name,kwargs", [("vgg11", {"input_size": 16, "width": 0.25}),
                                         ("resnet20", {"input_size": 8, "width": 1.0}),
                                         ("mlp", {"input_size": 8, "width": 48, "depth": 3})])
def test_default_weight_matching_takes_the_exact_loops_path(name: str, kwargs: dict) -> None:
    """The default (lazy steps, ``auto`` solver: lapjvh on float32 costs where installed, threads on a GPU) finds
    the same permutations, rounds and objective as the textbook loop (every group every round, scipy in float64)."""
    spec, a, b = _pair(name, **kwargs)
    exact = weight_matching(spec, a, b, solver="scipy", lazy=False, workers=1)
    for workers in (None, 3):
        fast = weight_matching(spec, a, b, workers=workers)
        assert fast.rounds == exact.rounds >= 2 and fast.solves < exact.solves
        assert all(torch.equal(fast.perm[g], exact.perm[g]) for g in spec.groups)
        assert fast.objective == pytest.approx(exact.objective, rel=1e-6)
    direct = _direct_objective(spec, a, b, exact.perm)
    assert exact.objective == pytest.approx(direct, rel=1e-5)
    assert direct > _direct_objective(spec, a, b, {g: torch.arange(len(p)) for g, p in exact.perm.items()})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked streaming needs a CUDA device")
def test_pinned_streaming_on_cuda_takes_the_resident_path() -> None:
    spec, a, b = _pair("resnet20", input_size=8, width=0.5)
    resident = weight_matching(spec, {k: v.cuda() for k, v in a.items()}, {k: v.cuda() for k, v in b.items()})
    for pin in (True, False):
        streamed = weight_matching(spec, a, b, device="cuda", stream=True, pin=pin)
        assert streamed.rounds == resident.rounds and streamed.solves == resident.solves
        assert all(torch.equal(streamed.perm[g], resident.perm[g]) for g in spec.groups)
        assert streamed.objective == pytest.approx(resident.objective, rel=1e-6)
