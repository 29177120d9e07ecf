"""Assignment solvers and the exact savings of weight matching (lazy re-solving, streaming)."""

from __future__ import annotations

import pytest
import torch

from lmc_lightning.nets import get_net
from lmc_lightning.weights.permutation import derive_spec, weight_matching
from lmc_lightning.weights.permutation.solvers import auction, has_lap, resolve_solver, solve_assignment

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


def test_auction_is_epsilon_optimal_with_a_coarse_epsilon() -> None:
    gen = torch.Generator().manual_seed(0)
    cost = torch.rand(40, 40, generator=gen, dtype=torch.float64)
    best = cost[torch.arange(40), solve_assignment(cost, "scipy")].sum().item()
    got = cost[torch.arange(40), auction(cost, eps_final=1e-3)].sum().item()
    assert best - 40 * 1e-3 <= got <= best + 1e-12


def test_solver_names_are_checked() -> None:
    assert resolve_solver("auto") == ("lap" if has_lap() else "scipy")
    with pytest.raises(ValueError, match="choose one of"):
        resolve_solver("hungarian")


def test_lazy_and_streamed_weight_matching_take_the_same_path() -> None:
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(get_net("vgg11", num_classes=5, in_channels=3, input_size=16, width=0.125))
    spec = derive_spec(nets[0])
    a, b = nets[0].state_dict(), nets[1].state_dict()
    eager = weight_matching(spec, a, b, solver="scipy", lazy=False)
    lazy = weight_matching(spec, a, b, solver="scipy", lazy=True)
    streamed = weight_matching(spec, a, b, solver="auction", lazy=True, stream=True)
    assert eager.rounds >= 3 and lazy.rounds == eager.rounds == streamed.rounds
    assert lazy.solves < 0.8 * eager.solves and eager.solves == eager.rounds * len(spec.groups)
    for result in (lazy, streamed):
        assert all(torch.equal(result.perm[g], eager.perm[g]) for g in spec.groups)
        assert result.objective == pytest.approx(eager.objective, rel=1e-6)


def test_concurrent_steps_give_the_sequential_result() -> None:
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(get_net("resnet20", num_classes=5, in_channels=3, input_size=8, width=0.5))
    spec = derive_spec(nets[0])
    a, b = nets[0].state_dict(), nets[1].state_dict()
    one = weight_matching(spec, a, b, solver="scipy", workers=1, seed=3)
    many = weight_matching(spec, a, b, solver="scipy", workers=4, seed=3)
    assert one.rounds == many.rounds >= 2 and one.solves == many.solves
    assert all(torch.equal(one.perm[g], many.perm[g]) for g in spec.groups)
    with pytest.raises(ValueError, match="workers"):
        weight_matching(spec, a, b, workers=0)
