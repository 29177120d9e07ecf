# %% [markdown]
# # Curves and surfaces between modes
# Four Fashion-MNIST MLPs from different seeds. Between two of them, a quadratic Bezier curve (Garipov et al.) is
# fitted; between all four, a Bezier surface with MCSurface's options (degree 2, one optimiser step per sampled
# point, warm-up of the two edges u = 0 and u = 1, its corner order). Both are evaluated on the test split: along
# the curve, and on an 11 x 11 grid of the surface, with the lowest loss and highest accuracy located.
# Settings come from environment variables so a test can run this notebook on tiny settings.

# %%
# %matplotlib inline
import os

import lightning.pytorch as pl
import torch

import lmc_lightning as lmc
from lmc_lightning.data import FashionMNISTDataModule
from lmc_lightning.modules import EndpointModule, OptimConfig, SurfaceModule
from lmc_lightning.modules.surface import grid_extrema
from lmc_lightning.plots import plot_result
from lmc_lightning.weights.curves import Bezier
from lmc_lightning.weights.fit import fit_path
from lmc_lightning.weights.paths import Linear

EPOCHS = int(os.environ.get("LMC_EPOCHS", 3))
SUBSET = int(os.environ.get("LMC_SUBSET", 0)) or None
OUT = os.environ.get("LMC_OUT", "runs/example04")
POINTS = int(os.environ.get("LMC_POINTS", 11))  # grid points per axis
NET = {"net": "mlp", "net_kwargs": {"depth": 2, "width": 256}}

# %% Four modes, saved as checkpoints (SurfaceModule reads its corners from files, as `lmc fit` does).
data = FashionMNISTDataModule(root="data", batch_size=128, train_subset=SUBSET)
files, nets = [], []
for seed in range(4):
    pl.seed_everything(seed)
    model = EndpointModule(**NET, optim=OptimConfig(lr=0.05), seed=seed)
    trainer = pl.Trainer(max_epochs=EPOCHS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    files.append(f"{OUT}/mode{seed}.ckpt")
    trainer.save_checkpoint(files[-1])
    nets.append(model.net.eval())

# %% The straight line and a fitted quadratic Bezier curve between modes 0 and 1.
theta = [n.state_dict() for n in nets]
x, y = data.split_tensors("train")
curve = Bezier(theta[:2], num_bends=1)
fit_path(curve, nets[0], x, y, epochs=EPOCHS, lr=0.05)
line = lmc.evaluate_path(Linear(*theta[:2]), nets[0], data, num_points=POINTS)
bent = lmc.evaluate_path(curve, nets[0], data, num_points=POINTS)
print(f"straight line: accuracy barrier {line.accuracy_barrier:.4f}; Bezier curve: {bent.accuracy_barrier:.4f}")
plot_result(bent, title="Bezier curve between modes 0 and 1")

# %% A Bezier surface through the four modes, trained with MCSurface's options.
surface = SurfaceModule(endpoints=files, degree=2, num_samples=2, sample_mode="sequential", init_epochs=1,
                        warmup="two_edges", corner_order="mcsurface", bn=None, num_points=POINTS,
                        optim=OptimConfig(lr=0.01, weight_decay=4e-4, scheduler="constant"), output_dir=OUT)
trainer = pl.Trainer(max_epochs=EPOCHS + 1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False)
trainer.fit(surface, datamodule=data)
trainer.test(surface, datamodule=data, verbose=False)
trained = surface.result
print({k: round(v, 4) for k, v in grid_extrema(trained).items()})

# %% The same four corners, untrained: the bilinear surface.
bilinear = lmc.evaluate_path(lmc.BezierSurface(theta, degree=2, corner_order="mcsurface"), nets[0], data,
                             num_points=POINTS)
print(f"lowest grid accuracy: bilinear {bilinear.accuracy.min():.4f}, trained {trained.accuracy.min():.4f}; "
      f"corners {trained.accuracy[[0, POINTS - 1, POINTS * (POINTS - 1), -1]].round(4).tolist()}")
torch.save({"trained": trained.accuracy, "bilinear": bilinear.accuracy}, f"{OUT}/surface_accuracy.pt")
plot_result(trained, title="trained Bezier surface (accuracy and loss over (u, v))")

# %%
plot_result(bilinear, title="bilinear surface of the same corners")
