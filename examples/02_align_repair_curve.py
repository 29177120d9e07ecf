# %% [markdown]
# # Aligning, re-normalising and bending the path between two modes
# Two Fashion-MNIST MLPs from different seeds; compare the loss barrier of
# (1) the plain linear path, (2) after weight matching, (3) weight matching + REPAIR, (4) a fitted Bezier curve.

# %%
# %matplotlib inline
import os

import lightning.pytorch as pl

import lmc_lightning as lmc
from lmc_lightning.data import FashionMNISTDataModule
from lmc_lightning.modules import EndpointModule, OptimConfig
from lmc_lightning.plots import plot_result
from lmc_lightning.weights.curves import Bezier
from lmc_lightning.weights.fit import fit_path
from lmc_lightning.weights.paths import Linear

EPOCHS = int(os.environ.get("LMC_EPOCHS", 3))
SUBSET = int(os.environ.get("LMC_SUBSET", 0)) or None
POINTS = int(os.environ.get("LMC_POINTS", 11))  # points along each path
OUT = os.environ.get("LMC_OUT", "runs/example02")

# %% Two endpoints.
data = FashionMNISTDataModule(root="data", batch_size=128, train_subset=SUBSET)
nets = []
for seed in (0, 1):
    pl.seed_everything(seed)
    model = EndpointModule(net="mlp", net_kwargs={"depth": 2, "width": 256}, optim=OptimConfig(lr=0.05), seed=seed)
    pl.Trainer(max_epochs=EPOCHS, logger=False, enable_checkpointing=False, enable_progress_bar=False).fit(
        model, datamodule=data)
    nets.append(model.net.eval())
net_a, net_b = nets
theta_a, theta_b = net_a.state_dict(), net_b.state_dict()

# %% Permute net_b into net_a's basin by weight matching: the aligned net computes the same function.
aligned_b, perm = lmc.align(net_a, net_b, method="weight")
theta_b_aligned = aligned_b.state_dict()

# %% Measure the paths on the test split (statistics for REPAIR come from the training split).
results = {
    "linear": lmc.evaluate_path(Linear(theta_a, theta_b), net_a, data, num_points=POINTS),
    "weight matching": lmc.evaluate_path(Linear(theta_a, theta_b_aligned), net_a, data, num_points=POINTS),
    "weight matching + REPAIR": lmc.evaluate_path(Linear(theta_a, theta_b_aligned), net_a, data, num_points=POINTS,
                                                  bn="repair"),
}

# %% Fit a quadratic Bezier curve (one bend) between the unaligned endpoints.
x, y = data.split_tensors("train")
curve = Bezier([theta_a, theta_b], num_bends=1)
fit_path(curve, net_a, x, y, epochs=EPOCHS, lr=0.05)
results["Bezier curve (1 bend)"] = lmc.evaluate_path(curve, net_a, data, num_points=POINTS)

# %%
for name, result in results.items():
    print(f"{name:26s} loss barrier {result.loss_barrier:7.4f}   accuracy barrier {result.accuracy_barrier:7.4f}")
    result.to_json(f"{OUT}/{name.replace(' ', '_').replace('+', 'and')}.json")

# %%
plot_result(results["linear"], title="linear path")

# %%
plot_result(results["weight matching + REPAIR"], title="weight matching + REPAIR")
