# %% [markdown]
# # Re-normalisation after re-basin, and after pruning (the rethink-re-basin seed, on Fashion-MNIST)
# Pairs of plain (norm-free) VGGs are trained from different seeds, aligned by weight matching and evaluated at the
# midpoint with no re-normalisation, REPAIR, RESCALE (the seed's ``y / sigma * sigma_goal``), RESHIFT and the
# mean-preserving RESCALE, under three recipes: the seed's (VGG-16 with the seed's head, ``vgg_init``, SGD lr 0.1,
# wd 1e-4, x0.1 at 50% and 75%), the seed's net and init trained with Adam (lr 1e-3, cosine), and ours (VGG-11,
# PyTorch init, Adam lr 3e-3, cosine, as the library's tests train plain VGGs). Then a BN VGG pair with
# BN reset and data-independent RESET, and one-shot global magnitude pruning with and without re-normalisation.
# Environment: LMC_EPOCHS, LMC_SUBSET (training samples), LMC_PAIRS, LMC_WIDTH, LMC_SEED_WIDTH (width of the seed
# recipes' net, default LMC_WIDTH), LMC_TEST (test samples), LMC_BN_BATCHES (statistics batches of 500), LMC_DEVICE,
# LMC_SEED_NET (the seed recipe's net), LMC_AMP (0: train in float32 on CUDA; default bf16 autocast), LMC_OUT,
# LMC_RECIPES, LMC_PARTS (plain,bn,prune). For runs split over processes: LMC_CKPT_DIR caches trained endpoints
# (`<recipe>_<seed>.pt` with their per-epoch losses in `.json`; loaded instead of trained when present),
# LMC_TRAIN_ONLY=recipe:seed[,...] trains those into the cache and stops, LMC_PAIR_LIST=0,2 evaluates only those
# pairs, LMC_TRAIN_SECONDS caps training time: after the first epoch the epoch count becomes min(LMC_EPOCHS, what
# fits), and the step schedule follows it; LMC_START_AT (unix time) makes parallel workers start training together,
# so that the first epoch is timed under the same load as the others. An endpoint that diverges (NaN weights) is
# recorded as such and its pair left out of the means.

# %%
# %matplotlib inline
import json
import math
import os
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import lmc_lightning as lmc
from lmc_lightning.data import FashionMNISTDataModule
from lmc_lightning.modules.prune import evaluate_weights
from lmc_lightning.plots import plot_bars
from lmc_lightning.prune import prune
from lmc_lightning.weights import renorm
from lmc_lightning.weights.paths import Linear
from lmc_lightning.weights.permutation import align_weights

EPOCHS = int(os.environ.get("LMC_EPOCHS", 4))
SUBSET = int(os.environ.get("LMC_SUBSET", 0)) or None
PAIRS = int(os.environ.get("LMC_PAIRS", 3 if SUBSET is None or SUBSET > 1000 else 1))
WIDTH = float(os.environ.get("LMC_WIDTH", 0.125))
TEST = int(os.environ.get("LMC_TEST", 0)) or (1000 if SUBSET is not None and SUBSET <= 1000 else None)
BN_BATCHES = int(os.environ.get("LMC_BN_BATCHES", 10))
DEVICE = os.environ.get("LMC_DEVICE", "cpu")
SEED_NET = os.environ.get("LMC_SEED_NET", "vgg16_seed")
TINY = SUBSET is not None and SUBSET <= 1000  # a smoke run (the examples test): one recipe, two sparsities
ONLY = os.environ.get("LMC_RECIPES", "ours" if TINY else "seed,seed_adam,ours").split(",")
SPARSITIES = (0.5, 0.9) if TINY else (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
OUT = os.environ.get("LMC_OUT", "runs/example03")
SEED_WIDTH = float(os.environ.get("LMC_SEED_WIDTH", WIDTH))
PARTS = os.environ.get("LMC_PARTS", "plain,bn,prune").split(",")
CKPT_DIR = os.environ.get("LMC_CKPT_DIR")
TRAIN_ONLY = [tuple(job.split(":")) for job in os.environ.get("LMC_TRAIN_ONLY", "").split(",") if job]
PAIR_LIST = [int(p) for p in os.environ.get("LMC_PAIR_LIST", "").split(",") if p] or list(range(PAIRS))
TRAIN_SECONDS = float(os.environ.get("LMC_TRAIN_SECONDS", 0)) or None
MODES = [None, "repair", "rescale", "reshift", "rescale_centered"]
RECIPES = {  # the seed's SGD recipe; its net and init with Adam; ours (Adam, as the library's tests train plain VGGs)
    "seed": {"net": SEED_NET, "kwargs": {"init": "kaiming_normal", "width": SEED_WIDTH}, "opt": "sgd", "lr": 0.1,
             "wd": 1e-4, "schedule": "step"},
    "seed_adam": {"net": SEED_NET, "kwargs": {"init": "kaiming_normal", "width": SEED_WIDTH}, "opt": "adam",
                  "lr": 1e-3, "wd": 0.0, "schedule": "cosine"},
    "ours": {"net": "vgg11", "kwargs": {"width": WIDTH}, "opt": "adam", "lr": 3e-3, "wd": 0.0, "schedule": "cosine"},
}
BN_RECIPE = {"net": "vgg11_bn", "kwargs": {"width": WIDTH}, "opt": "sgd", "lr": 0.05, "wd": 5e-4,
             "schedule": "cosine"}  # SGD: BN nets train with it at this budget
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
CUDA = DEVICE.startswith("cuda")
AMP = os.environ.get("LMC_AMP", "1") != "0"  # bf16 autocast for training on CUDA (LMC_AMP=0: float32)

# %%
data = FashionMNISTDataModule(root="data", batch_size=128, train_subset=SUBSET)
data.prepare_data()
data.setup("fit")
x_train, y_train = data.split_tensors("train")
x_test, y_test = data.split_tensors("test")
x_test, y_test = x_test[:TEST], y_test[:TEST]
x_train, y_train, x_test, y_test = (t.to(DEVICE) for t in (x_train, y_train, x_test, y_test))


def _train(r: dict, seed: int) -> tuple[torch.nn.Module, dict]:
    """SGD (momentum 0.9) or Adam, batch 128, from a seeded init and a seeded data order; bf16 autocast on CUDA
    (LMC_AMP).

    Returns the net (eval mode) and its log: mean training loss per epoch, the epochs run and the seconds taken.
    """
    torch.manual_seed(seed)
    net = lmc.get_net(r["net"], num_classes=10, in_channels=1, input_size=28, **r["kwargs"]).to(DEVICE)
    if CUDA:
        net = net.to(memory_format=torch.channels_last)
    if r["opt"] == "adam":
        opt = torch.optim.Adam(net.parameters(), lr=r["lr"], weight_decay=r["wd"])
    else:
        opt = torch.optim.SGD(net.parameters(), lr=r["lr"], momentum=0.9, weight_decay=r["wd"])
    per_epoch = math.ceil(len(x_train) / 128)
    epochs, step, losses, t0 = EPOCHS, 0, [], time.time()

    def factor(s: int) -> float:  # reads `epochs`, which the time cap may lower after the first epoch
        steps = epochs * per_epoch
        if r["schedule"] == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
        return 0.1 ** ((s >= steps // 2) + (s >= 3 * steps // 4))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(1000 + seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=CUDA and AMP)
    net.train()
    epoch = 0
    while epoch < epochs:
        total = torch.zeros((), device=DEVICE)
        for idx in torch.randperm(len(x_train), generator=gen).to(DEVICE).split(128):
            with autocast:
                loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach() * len(idx)
            step += 1
        losses.append(float(total) / len(x_train))
        epoch += 1
        if epoch == 1 and TRAIN_SECONDS is not None:  # fit the schedule into the time cap
            epochs = max(1, min(EPOCHS, int(TRAIN_SECONDS / (time.time() - t0))))
        if not math.isfinite(losses[-1]):
            break
    log = {"loss": losses, "epochs": epoch, "seconds": time.time() - t0}
    return net.eval(), log


def train(recipe: str, seed: int) -> torch.nn.Module:
    """The endpoint of ``recipe`` from ``seed``: loaded from LMC_CKPT_DIR when cached there, else trained (and
    cached); its training log goes to ``results["train"]``."""
    r = RECIPES.get(recipe, BN_RECIPE)
    path = f"{CKPT_DIR}/{recipe}_{seed}" if CKPT_DIR else None
    if path and os.path.exists(f"{path}.pt"):
        net = lmc.get_net(r["net"], num_classes=10, in_channels=1, input_size=28, **r["kwargs"]).to(DEVICE)
        net.load_state_dict(torch.load(f"{path}.pt", map_location=DEVICE, weights_only=True))
        with open(f"{path}.json") as f:
            log = json.load(f)
        net.eval()
    else:
        net, log = _train(r, seed)
        log["test_acc"] = evaluate_weights(net, dict(net.state_dict()), x_test, y_test)[1]
        if path:
            os.makedirs(CKPT_DIR, exist_ok=True)
            torch.save(net.state_dict(), f"{path}.pt")
            with open(f"{path}.json", "w") as f:
                json.dump(log, f)
    results["train"][f"{recipe}_{seed}"] = log
    print(f"{recipe} seed {seed}: {log['epochs']} epochs, loss {[round(v, 3) for v in log['loss']]}, test accuracy "
          f"{log['test_acc']:.4f}", flush=True)
    return net


def midpoints(net, theta_a, theta_b, modes, coords=(0.5,), homogeneous=False, **kw) -> dict:
    """Test accuracy at ``coords`` (default the midpoint) for each statistics mode."""
    out = {}
    for mode in modes:
        res = lmc.evaluate_path(Linear(theta_a, theta_b, homogeneous=homogeneous), net, (x_test, y_test),
                                coords=list(coords), bn=mode, train_data=x_train, bn_batches=BN_BATCHES,
                                bn_batch_size=500, device=DEVICE, precision="32", **kw)
        out[str(mode)] = [float(a) for a in res.accuracy]
    return out


# %% Plain VGG pairs: weight matching, then each re-normalisation at the midpoint.
results = {"settings": {"epochs": EPOCHS, "subset": SUBSET, "pairs": PAIR_LIST, "width": WIDTH,
                        "seed_width": SEED_WIDTH, "device": DEVICE}, "train": {}, "plain": {}, "bn": {}, "prune": {}}
start = time.time()
trained = {}


def save() -> None:
    """Write what has been measured so far."""
    os.makedirs(OUT, exist_ok=True)
    with open(f"{OUT}/rebasin_renorm.json", "w") as f:
        json.dump(results, f, indent=1)


if TRAIN_ONLY:  # one worker of a run split over processes: train into LMC_CKPT_DIR, then stop
    if not CKPT_DIR:
        raise SystemExit("LMC_TRAIN_ONLY needs LMC_CKPT_DIR (where the trained endpoints go).")
    time.sleep(max(0.0, float(os.environ.get("LMC_START_AT", 0)) - time.time()))
    for recipe, seed in TRAIN_ONLY:
        train(recipe, int(seed))
    raise SystemExit(0)

for recipe in RECIPES:
    if recipe not in ONLY or "plain" not in PARTS:
        continue
    rows = []
    for p in PAIR_LIST:
        a = train(recipe, 2 * p)
        b = train(recipe, 2 * p + 1)
        ta, tb = a.state_dict(), b.state_dict()
        diverged = [s for s, th in ((2 * p, ta), (2 * p + 1, tb)) if not all(v.isfinite().all() for v in th.values())]
        if diverged:  # a finding, not an error: recorded, and the pair is left out of the means
            rows.append({"pair": p, "diverged_seeds": diverged})
            print(recipe, p, f"endpoint(s) of seed(s) {diverged} diverged (NaN weights): pair left out", flush=True)
            results["plain"][recipe] = rows
            save()
            continue
        trained.setdefault(recipe, a)
        tb_wm, _ = align_weights(a, ta, tb, method="weight")
        row = {"pair": p, "endpoints": midpoints(a, ta, tb, [None], coords=(0.0, 1.0))["None"],
               "naive": midpoints(a, ta, tb, [None])["None"], **midpoints(a, ta, tb_wm, MODES),
               "homogeneous": midpoints(a, ta, tb_wm, [None], homogeneous=True)["None"],
               "homogeneous_rescale": midpoints(a, ta, tb_wm, ["rescale"], homogeneous=True)["rescale"],
               **{f"{mode}_seed_statistics": acc for mode, acc in midpoints(
                   a, ta, tb_wm, ["repair", "rescale"], renorm_options={"statistics": "seed"}).items()}}
        rows.append(row)
        print(recipe, p, {k: [round(x, 4) for x in v] for k, v in row.items() if k != "pair"},
              f"{time.time() - start:.0f}s", flush=True)
        results["plain"][recipe] = rows
        save()

# %% A BN VGG pair: BN reset and data-independent RESET (BN in train mode on each test batch of 500).
if "bn" in PARTS:
    a, b = train("bn", 0), train("bn", 1)
    trained["bn"] = a
    ta, tb = a.state_dict(), b.state_dict()
    tb_wm, _ = align_weights(a, ta, tb, method="weight")
    results["bn"] = {"endpoints": midpoints(a, ta, tb, ["reset"], coords=(0.0, 1.0))["reset"],
                     "naive_reset": midpoints(a, ta, tb, ["reset"])["reset"],
                     **midpoints(a, ta, tb_wm, [None, "reset"]),
                     "reset_test": midpoints(a, ta, tb_wm, ["reset_test"], batch_size=500)["reset_test"]}
    print("bn", results["bn"], flush=True)
    save()

# %% One-shot global magnitude pruning, with and without re-normalisation towards the dense net's statistics.
stats_x = list(x_train[torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))[:256].to(DEVICE)]
               .split(128))
for name, modes in (("ours", ["repair", "rescale"]), ("seed", ["repair", "rescale"]),
                    ("seed_adam", ["repair", "rescale"]), ("bn", ["reset"])):
    if name not in trained or "prune" not in PARTS:
        continue
    net = trained[name]
    dense = dict(net.state_dict())
    sites = renorm.find_sites(net, stats_x[0][:2], dense)
    goal = renorm.site_statistics(net, stats_x, dense, sites=sites) if modes != ["reset"] else None
    rows = []
    for s in SPARSITIES:
        pruned, _ = prune(net, s, dense)
        row = {"sparsity": s, "dense": evaluate_weights(net, dense, x_test, y_test)[1],
               "pruned": evaluate_weights(net, pruned, x_test, y_test)[1]}
        for mode in modes:
            fixed = (renorm.reset_bn(net, stats_x, pruned) if mode == "reset"
                     else renorm.renormalize_to(net, pruned, goal, stats_x, mode, sites=sites))
            row[mode] = evaluate_weights(net, fixed, x_test, y_test)[1]
        rows.append(row)
    results["prune"][name] = rows
    save()
    print("prune", name, [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in rows])

# %% Midpoint test accuracy of the plain pairs per correction (mean over the pairs), one bar per recipe.
COLUMNS = {"naive": "naive", "None": "WM", "repair": "WM+REPAIR", "rescale": "WM+RESCALE", "reshift": "WM+RESHIFT",
           "rescale_centered": "WM+mean-pres. rescale", "homogeneous": "WM+homog. bias",
           "homogeneous_rescale": "homog.+RESCALE"}
finished = {recipe: [r for r in rows if "diverged_seeds" not in r] for recipe, rows in results["plain"].items()}
plot_bars({recipe: [100 * sum(r[c][0] for r in rows) / len(rows) for c in COLUMNS]
           for recipe, rows in finished.items() if rows}, list(COLUMNS.values()), "midpoint test accuracy (%)",
          "plain VGG pairs: weight-matched midpoint, per correction")

# %% Pruning: test accuracy against sparsity, with and without re-normalisation.
fig, ax = plt.subplots(figsize=(6, 3.5))
for name, rows in results["prune"].items():
    for key in [k for k in rows[0] if k not in ("sparsity", "dense")]:
        ax.plot([r["sparsity"] for r in rows], [100 * r[key] for r in rows], marker=".", label=f"{name}: {key}")
ax.set_xlabel("sparsity")
ax.set_ylabel("test accuracy (%)")
ax.set_title("one-shot global magnitude pruning")
ax.legend(fontsize=7)
fig.savefig(f"{OUT}/prune.png", dpi=100)

# %%
save()
print(f"wrote {OUT}/rebasin_renorm.json in {time.time() - start:.0f}s")
