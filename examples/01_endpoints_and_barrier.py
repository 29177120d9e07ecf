# %% [markdown]
# # Two Fashion-MNIST modes and the barrier between them
# Train two MLPs from different seeds with Lightning, then evaluate the linear path between them.
# Settings come from environment variables so a test can run this notebook on tiny settings.

# %%
# %matplotlib inline
import os

import lightning.pytorch as pl

import lmc_lightning as lmc
from lmc_lightning.data import FashionMNISTDataModule
from lmc_lightning.modules import EndpointModule, OptimConfig
from lmc_lightning.plots import plot_result
from lmc_lightning.weights.paths import Linear

EPOCHS = int(os.environ.get("LMC_EPOCHS", 3))
SUBSET = int(os.environ.get("LMC_SUBSET", 0)) or None  # None = all 60k training images
POINTS = int(os.environ.get("LMC_POINTS", 11))  # points along each path
OUT = os.environ.get("LMC_OUT", "runs/example01")

# %% Train two endpoints (modes) that differ in initialisation and data order.
nets = []
for seed in (0, 1):
    pl.seed_everything(seed)
    data = FashionMNISTDataModule(root="data", batch_size=128, train_subset=SUBSET, seed=seed)
    model = EndpointModule(net="mlp", net_kwargs={"depth": 3, "width": 512}, num_classes=data.num_classes,
                           input_shape=data.input_shape, optim=OptimConfig(lr=0.05), seed=seed)
    trainer = pl.Trainer(max_epochs=EPOCHS, default_root_dir=f"{OUT}/seed{seed}", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, datamodule=data)
    print(f"seed {seed}:", trainer.test(model, datamodule=data, verbose=False)[0])
    nets.append(model.net.eval())

# %% Evaluate the linear path between them on the test split.
data.setup("test")
path = Linear(nets[0].state_dict(), nets[1].state_dict())
result = lmc.evaluate_path(path, nets[0], data, num_points=POINTS)
print(f"loss barrier {result.loss_barrier:.4f}, accuracy barrier {result.accuracy_barrier:.4f}")
result.to_csv(f"{OUT}/path.csv")
result.plot(f"{OUT}/path.png")

# %%
plot_result(result, title="linear path between the two modes")
