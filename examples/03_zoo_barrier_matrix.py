# %% [markdown]
# # A zoo of Fashion-MNIST MLPs in one run, then the barrier between every pair
# `EndpointModule(num_models=8)` trains 8 MLPs at once (member k: init seed k, data seed k), writes each as its own
# checkpoint (`model_kk/last.ckpt`), and `barrier_matrix` evaluates the linear path between all 28 pairs.
# The same training from the command line:
#
#     lmc fit --config configs/endpoint/fmnist_mlp.yaml --model.num_models 8 --data.device_resident true
#
# Settings come from environment variables so a test can run this notebook on tiny settings.

# %%
import os
from pathlib import Path

import lightning.pytorch as pl
import torch

import lmc_lightning as lmc
from lmc_lightning.data import FashionMNISTDataModule
from lmc_lightning.modules import EndpointModule, OptimConfig
from lmc_lightning.weights.evaluate import seeded_subset
from lmc_lightning.weights.matrix import barrier_matrix

EPOCHS = int(os.environ.get("LMC_EPOCHS", 3))
SUBSET = int(os.environ.get("LMC_SUBSET", 0)) or None  # None = all 60k training images
OUT = Path(os.environ.get("LMC_OUT", "runs/example03"))
K = int(os.environ.get("LMC_MODELS", 8))

# %% Train the zoo: one Trainer, one optimiser over stacked weights, per-member BN statistics and data order.
pl.seed_everything(0)
data = FashionMNISTDataModule(root="data", batch_size=128, train_subset=SUBSET, seed=0, device_resident=True)
zoo = EndpointModule(net="mlp", net_kwargs={"depth": 3, "width": 512}, num_classes=data.num_classes,
                     input_shape=data.input_shape, optim=OptimConfig(lr=0.05), seed=0, num_models=K)
trainer = pl.Trainer(max_epochs=EPOCHS, default_root_dir=str(OUT), logger=False, enable_checkpointing=False,
                     enable_progress_bar=False)
trainer.fit(zoo, datamodule=data)
test = trainer.test(zoo, datamodule=data, verbose=False)[0]
print("test accuracy per member:", [round(test[f"test/acc_{k:02d}"], 4) for k in range(K)])

# %% Each member is an ordinary endpoint checkpoint: load them as any other mode.
files = sorted((OUT / "zoo").glob("model_*/last.ckpt"))
nets = [lmc.load_net(f) for f in files]
print(f"{len(nets)} member checkpoints, e.g. {files[0]}")

# %% The barrier between every pair (10k test images, 11 points per path).
test_data = seeded_subset(data.split_tensors("test"), SUBSET or 10_000, seed=0)
matrix = barrier_matrix(nets, nets[0], test_data, num_points=11)
pairs = matrix.off_diagonal("loss")
print(f"loss barrier over {len(pairs)} pairs: mean {pairs.mean():.3f}, min {pairs.min():.3f}, max {pairs.max():.3f}")
acc_pairs = matrix.off_diagonal("accuracy")
print(f"accuracy barrier: mean {acc_pairs.mean():.3f}, min {acc_pairs.min():.3f}, max {acc_pairs.max():.3f}")
print("written:", matrix.to_csv(OUT / "barrier_matrix.csv"), matrix.plot(OUT / "barrier_matrix.png"))
torch.save({"loss": matrix.loss, "accuracy": matrix.accuracy}, OUT / "barrier_matrix.pt")
