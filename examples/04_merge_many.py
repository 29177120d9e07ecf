# %% [markdown]
# # Merging N Fashion-MNIST models, and aligning two small ViTs
# Train 5 MLPs, 3 small CNNs (VGG-11-BN) and 2 small ViTs from different seeds, merge 3 and 5 of them with each
# alignment order (`lmc.align_many`), and compare the merged model with the naive average; evaluate the simplex of
# three MLPs; measure the ViTs' barrier before and after alignment. Settings come from environment variables so a
# test can run this notebook on tiny settings. The README's "N-way merging" table comes from this script.

# %%
import os

import torch
import torch.nn.functional as F

import lmc_lightning as lmc
from lmc_lightning.data import FashionMNISTDataModule
from lmc_lightning.weights.paths import Linear
from lmc_lightning.weights.simplex import Simplex, average, renormalize_average

EPOCHS = int(os.environ.get("LMC_EPOCHS", 3))
SUBSET = int(os.environ.get("LMC_SUBSET", 0)) or 20_000  # training images per model
OUT = os.environ.get("LMC_OUT", "runs/example04")
os.makedirs(OUT, exist_ok=True)

data = FashionMNISTDataModule(root="data", train_subset=SUBSET, seed=0)
data.setup("fit")
data.setup("test")
x_train, y_train = data.split_tensors("train")
x_test, y_test = data.split_tensors("test")
if SUBSET < 1000:  # tiny settings (tests): a small test split too
    x_test, y_test = x_test[:500], y_test[:500]
pad = lambda x: F.pad(x, (2, 2, 2, 2))  # noqa: E731  (VGG and the ViT take 32x32)


def train(net, x, y, seed, epochs=EPOCHS, lr=0.05, adam=False):
    """Plain SGD (or Adam) on tensors, data order seeded; returns the net in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr) if adam else torch.optim.SGD(net.parameters(), lr=lr,
                                                                                   momentum=0.9)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(128):
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def evaluate(net, theta, x, y):
    """Test loss and accuracy of weights ``theta``."""
    logits = torch.func.functional_call(net, theta, (x,))
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).double().mean().item()


def make(name, seed, **kwargs):
    torch.manual_seed(seed)
    return lmc.get_net(name, num_classes=10, in_channels=1, **kwargs)


# %% Train the endpoints.
mlps = [train(make("mlp", s, input_size=28, depth=2, width=128), x_train, y_train, s) for s in range(5)]
cnns = [train(make("vgg11_bn", s, input_size=32, width=0.25), pad(x_train), y_train, s) for s in range(3)]
vits = [train(make("vit", s, input_size=32, width=0.5, depth=2), pad(x_train), y_train, s, lr=1e-3, adam=True)
        for s in range(2)]
stats_x = pad(x_train[:2000])


# %% Merge 3 and 5 MLPs and 3 CNNs with each order, and naively.
def merge_row(label, nets, x, order):
    """Merged (uniform average) test accuracy and loss barrier (merged loss - mean endpoint loss)."""
    thetas = [n.state_dict() for n in nets]
    if order != "naive":
        thetas = lmc.align_many(nets, order=order, probe=x[:8])[0]
        thetas = [n.state_dict() for n in thetas]
    merged = average(thetas)
    if any(isinstance(m, torch.nn.BatchNorm2d) for m in nets[0].modules()):
        merged = renormalize_average(nets[0], thetas, merged, list(stats_x.split(500)), "reset")
    ends = [evaluate(nets[0], t, x, y_test) for t in thetas]
    loss, acc = evaluate(nets[0], merged, x, y_test)
    mean_loss = sum(e[0] for e in ends) / len(ends)
    return {"models": label, "order": order, "merged_acc": acc, "barrier": loss - mean_loss,
            "endpoint_acc": sum(e[1] for e in ends) / len(ends)}


rows = []
for label, nets, x in [("3 MLPs", mlps[:3], x_test), ("5 MLPs", mlps, x_test), ("3 VGG-11-BN (BN reset)", cnns,
                                                                                 pad(x_test))]:
    for order in ("naive", "reference", "sequential", "iterative"):
        rows.append(merge_row(label, nets, x, order))
        print(rows[-1], flush=True)

print("\n| models | order | endpoints' mean acc. | merged acc. | merged loss - mean endpoint loss |")
print("| --- | --- | --- | --- | --- |")
for r in rows:
    print(f"| {r['models']} | {r['order']} | {100 * r['endpoint_acc']:.2f}% | {100 * r['merged_acc']:.2f}% | "
          f"{r['barrier']:.3f} |")

# %% The simplex of three MLPs, before and after iterative alignment.
for order in ("naive", "iterative"):
    nets = mlps[:3] if order == "naive" else lmc.align_many(mlps[:3], order="iterative", probe=x_test[:8])[0]
    result = lmc.evaluate_path(Simplex([n.state_dict() for n in nets]), mlps[0], (x_test, y_test), num_points=6,
                               device="cpu")
    result.plot(f"{OUT}/simplex_{order}.png")
    print(f"simplex of 3 MLPs ({order}): loss barrier over the plane {result.loss_barrier:.3f}, accuracy barrier "
          f"{100 * result.accuracy_barrier:.2f} pts")

# %% Two ViTs: barrier along the line before and after alignment.
for method in (None, "weight", "activation"):
    theta_b = vits[1].state_dict()
    if method is not None:
        theta_b = lmc.align(vits[0], vits[1], method=method, data=pad(x_train[:2000]), probe=pad(x_test[:8]))[0]
        theta_b = theta_b.state_dict()
    result = lmc.evaluate_path(Linear(vits[0].state_dict(), theta_b), vits[0], (pad(x_test), y_test),
                               num_points=11, device="cpu")
    print(f"ViT pair ({method or 'no alignment'}): endpoint acc {100 * result.accuracy[0]:.2f}% / "
          f"{100 * result.accuracy[-1]:.2f}%, loss barrier {result.loss_barrier:.3f}, accuracy barrier "
          f"{100 * result.accuracy_barrier:.2f} pts")
    result.to_csv(f"{OUT}/vit_{method or 'naive'}.csv")
