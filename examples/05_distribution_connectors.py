# %% [markdown]
# # Distribution-based connectors and WA ensembles on Fashion-MNIST
# Anokhin & Yarotsky (ICML 2020): connect one-hidden-layer MLPs by Linear, Arc, Linear+WA, Arc+WA, OT and OT+WA
# (their Table 1), bias-free deep MLPs by the step-wise finders (Table 2), and compare WA(n) ensembles with plain ones.
# Endpoints follow the seed's recipe (SGD lr 0.01, momentum 0.9, wd 1e-4, batch 128, Garipov schedule), for fewer
# epochs. Settings come from environment variables so a test can run this notebook on tiny settings.

# %%
# %matplotlib inline
import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import lmc_lightning as lmc
from lmc_lightning.data import FashionMNISTDataModule
from lmc_lightning.modules.base import garipov_factor
from lmc_lightning.nets import get_net
from lmc_lightning.weights.connect import connector_path

EPOCHS = int(os.environ.get("LMC_EPOCHS", 5))
SUBSET = int(os.environ.get("LMC_SUBSET", 0)) or None  # None = all 60k training images
OUT = Path(os.environ.get("LMC_OUT", "runs/example03"))
OUT.mkdir(parents=True, exist_ok=True)
TINY = SUBSET is not None and SUBSET < 5000  # the test's settings: fewer nets, points and units
PAIRS = int(os.environ.get("LMC_PAIRS", 1 if TINY else 4))  # one-hidden-layer pairs: seeds (0, 1), (2, 3), ...
FIRST_PAIR = int(os.environ.get("LMC_FIRST_PAIR", 0))
DEEP_PAIRS = int(os.environ.get("LMC_DEEP_PAIRS", 1 if TINY else 3))  # deep pairs: seeds (0, 1), (2, 3), ...
MEMBERS = int(os.environ.get("LMC_MEMBERS", 3 if TINY else 4))  # deep MLPs in the WA(n) ensembles (seeds 0..MEMBERS-1)
WIDTH = int(os.environ.get("LMC_WIDTH", 32 if TINY else 256))
DEEP = [int(w) for w in os.environ.get("LMC_DEEP", "32,16" if TINY else "512,256").split(",")]
POINTS = int(os.environ.get("LMC_POINTS", 2 if TINY else 11))  # points per unit of t
DEVICE = torch.device(os.environ.get("LMC_DEVICE", "cpu"))
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))

data = FashionMNISTDataModule(root="data", train_subset=SUBSET)
data.setup("fit")
data.setup("test")
train, test = ([t.to(DEVICE) for t in data.split_tensors(s)] for s in ("train", "test"))  # test transform for both
print(f"{len(train[0])} training and {len(test[0])} test images on {DEVICE}")


# %% Endpoints: the seed's recipe, a plain loop over tensors (data order seeded), cached on disk.
def train_net(widths: list[int], bias: bool, seed: int) -> torch.nn.Module:
    file = OUT / "endpoints" / f"mlp{'-'.join(map(str, widths))}{'' if bias else '_nobias'}_s{seed}_e{EPOCHS}.pt"
    torch.manual_seed(seed)
    net = get_net("mlp", num_classes=10, in_channels=1, input_size=28, widths=widths, bias=bias).to(DEVICE)
    if file.exists():
        net.load_state_dict(torch.load(file, map_location=DEVICE, weights_only=True))
        return net.eval()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(EPOCHS):
        for group in opt.param_groups:
            group["lr"] = 0.01 * garipov_factor(epoch, EPOCHS)
        for idx in torch.randperm(len(train[0]), generator=gen).to(DEVICE).split(128):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(train[0][idx]), train[1][idx]).backward()
            opt.step()
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), file)
    return net.eval()


CURVES: dict[str, dict[str, tuple]] = {"table1": {}, "table2": {}}  # (t / end_time, test error %) of the first pair


def run(net: torch.nn.Module, a: dict, b: dict, finder: str, method: str, match: str) -> dict:
    """Build a connection, evaluate train and test along it (``POINTS`` per unit of t) and summarise.

    ``run.last`` holds the connection's test error curve: ``(t / end_time, test error in %)``.
    """
    path = connector_path(net, a, b, finder, method, match, data=train[0])
    end = getattr(path, "end_time", 1.0)
    result = lmc.evaluate_path(path, net, {"test": test, "train": train}, num_points=int(POINTS * end) + 1,
                               device=DEVICE, precision="32")
    run.last = (result.coords[:, 0] / end, 100 * (1 - result.sets["test"].accuracy))
    summary = result.summary()
    return {"finder": finder, "method": method, "match": match, "end_time": end,
            "max_test_error": 1 - summary["test"]["accuracy"]["min"],
            "max_train_error": 1 - summary["train"]["accuracy"]["min"],
            "endpoint_test_error": [1 - summary["test"]["accuracy"]["start"], 1 - summary["test"]["accuracy"]["end"]],
            "int_test_error": 1 - summary["test"]["accuracy"]["int"], "length": float(result.length[-1])}


def plot_errors(curves: dict[str, tuple], title: str) -> None:
    """Test error (%) along each path, against ``t`` scaled to [0, 1]; nothing when there are no curves."""
    if not curves:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, (t, err) in curves.items():
        ax.plot(t, err, marker=".", label=name)
    ax.set_xlabel("t / end_time")
    ax.set_ylabel("test error (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / f"{title.split(':')[0].replace(' ', '_').lower()}.png", dpi=100)


results: dict = {"epochs": EPOCHS, "width": WIDTH, "deep": DEEP, "table1": [], "table2": [], "ensembles": []}

# %% Table 1: one-hidden-layer MLPs (784-WIDTH-10, with bias).
TABLE1 = [("Linear", "with_bias", "lin", "none"), ("Arc", "with_bias", "arc", "none"),
          ("Linear+WA", "with_bias_wa", "lin", "none"), ("Arc+WA", "with_bias_wa", "arc", "none"),
          ("OT", "with_bias", "lin", "ot"), ("OT+WA", "with_bias_wa", "lin", "ot")]


def connect_pairs(label: str, widths: list[int], bias: bool, pairs: range, table: list[tuple[str, ...]],
                  curves: dict[str, tuple]) -> list:
    """Every path of ``table`` between the nets of seeds ``2p`` and ``2p + 1`` for each pair ``p``, one row each.

    The first pair's test error curves go into ``curves`` (by path name).
    """
    rows = []
    for pair in pairs:
        nets = [train_net(widths, bias, 2 * pair + i) for i in (0, 1)]
        a, b = (dict(n.state_dict()) for n in nets)
        for name, finder, method, match in table:
            rows.append({"pair": pair, "name": name, **run(nets[0], a, b, finder, method, match)})
            if pair == pairs[0]:
                curves[name] = run.last
            print(f"{label} {pair} {name:12s} max test error {rows[-1]['max_test_error']:.4f} (endpoints "
                  f"{rows[-1]['endpoint_test_error'][0]:.4f}, {rows[-1]['endpoint_test_error'][1]:.4f})")
    return rows


results["table1"] = connect_pairs("pair", [WIDTH], True, range(FIRST_PAIR, FIRST_PAIR + PAIRS), TABLE1,
                                  CURVES["table1"])
plot_errors(CURVES["table1"], f"Table 1: one-hidden-layer MLPs, pair {FIRST_PAIR}")

# %% Table 2: bias-free deep MLPs with the step-wise finders.
TABLE2 = [("Linear", "simultaneous", "lin", "none"), ("Arc", "simultaneous", "arc", "none"),
          ("Linear+B-fly", "stepwise_butterfly", "lin", "none"), ("Arc+B-fly", "stepwise_butterfly", "arc", "none"),
          ("Linear+WA", "stepwise_wa", "lin", "none"), ("Arc+WA", "stepwise_wa", "arc", "none"),
          ("OT+B-fly", "stepwise_butterfly", "lin", "ot"), ("OT+WA", "stepwise_wa", "lin", "ot")]
results["table2"] = connect_pairs("deep pair", DEEP, False, range(DEEP_PAIRS), TABLE2, CURVES["table2"])
plot_errors(CURVES["table2"], "Table 2: bias-free deep MLPs, pair 0")


# %% Across pairs: mean and std of the max test error per path, and in how many pairs the paper's ordering holds.
def across_pairs(rows: list[dict], checks: dict[str, Callable[[dict[str, float]], bool]]) -> dict:
    """Per path name: mean, std (over pairs) and values of the max test error; per check (and for all of them
    together): the number of pairs where it holds."""
    if not rows:
        return {"pairs": 0, "max_test_error": {}, "ordering_holds": {}}
    by_pair: dict[int, dict[str, float]] = {}
    for row in rows:
        by_pair.setdefault(row["pair"], {})[row["name"]] = row["max_test_error"]
        by_pair[row["pair"]]["endpoints"] = max(row["endpoint_test_error"])
    names = list(next(iter(by_pair.values())))
    stats = {n: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "values": v}
             for n in names for v in [[p[n] for p in by_pair.values()]]}
    held = {name: sum(bool(check(p)) for p in by_pair.values()) for name, check in checks.items()}
    held["all"] = sum(all(check(p) for check in checks.values()) for p in by_pair.values())
    return {"pairs": len(by_pair), "max_test_error": stats, "ordering_holds": held}


def worst(p: dict[str, float], *names: str) -> float:
    return max(p[n] for n in names)


TABLE1_CHECKS = {  # the paper's Table 1: Linear > Arc > WA paths > OT paths (max error along the path)
    "Arc < Linear": lambda p: p["Arc"] < p["Linear"],
    "WA paths < Arc": lambda p: worst(p, "Linear+WA", "Arc+WA") < p["Arc"],
    "OT paths < WA paths": lambda p: worst(p, "OT", "OT+WA") < min(p["Linear+WA"], p["Arc+WA"]),
}
TABLE2_CHECKS = {  # the paper's Table 2: simultaneous > B-fly > WA; OT+WA lowest
    "B-fly < simultaneous": lambda p: worst(p, "Linear+B-fly", "Arc+B-fly") < min(p["Linear"], p["Arc"]),
    "WA < B-fly": lambda p: worst(p, "Linear+WA", "Arc+WA") < min(p["Linear+B-fly"], p["Arc+B-fly"]),
    "OT+WA lowest": lambda p: p["OT+WA"] <= min(v for k, v in p.items() if k != "endpoints"),
}
results["table1_across_pairs"] = across_pairs(results["table1"], TABLE1_CHECKS)
results["table2_across_pairs"] = across_pairs(results["table2"], TABLE2_CHECKS)
for key in ("table1_across_pairs", "table2_across_pairs"):
    agg = results[key]
    for name, st in agg["max_test_error"].items():
        print(f"{key} {name:12s} {100 * st['mean']:.2f} +- {100 * st['std']:.2f} over {agg['pairs']} pairs")
    print(f"{key} ordering holds in: {agg['ordering_holds']} of {agg['pairs']} pairs")

# %% WA(n) ensembles of the deep MLPs vs plain ensembles (the first member is the shared base).
members = [train_net(DEEP, False, seed) for seed in range(MEMBERS)]
layers = [f"hidden.{2 * i}" for i in range(len(DEEP))] + ["classifier"]
plt.figure(figsize=(5, 3.5))
for n in (1, 2):
    layer = layers[-n]
    res = lmc.wa_ensemble(members[0], [dict(m.state_dict()) for m in members], test, train[0], layer,
                          device=DEVICE)
    results["ensembles"].append({"n": n, "layer": layer, **{k: r.to_dict() for k, r in res.items()}})
    print(f"WA({n}) at {layer}: plain {res['plain'].ensemble_accuracy.round(4).tolist()}, "
          f"WA {res['wa'].ensemble_accuracy.round(4).tolist()}")
    plt.plot(range(1, len(members) + 1), 100 * res["wa"].ensemble_accuracy, marker="o", label=f"WA({n}) at {layer}")
plt.plot(range(1, len(members) + 1), 100 * res["plain"].ensemble_accuracy, marker="s", label="plain ensemble")
plt.xlabel("members")
plt.ylabel("test accuracy (%)")
plt.legend(fontsize=8)
plt.title("WA(n) vs plain ensembles")
plt.tight_layout()
plt.savefig(OUT / "ensembles.png", dpi=100)

(OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
print(f"wrote {OUT / 'results.json'}")
