"""Shared fixtures: real Fashion-MNIST tensors and a session-trained pair of MLP endpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from lmc_lightning.data.idx import read_idx

# Lightning probes for MPI on every Trainer (MPIEnvironment.detect imports mpi4py, which initialises MPI); a process
# that forks DDP workers after that crashed them with SIGSEGV on a GPU host. No test uses MPI: keep mpi4py out.
if "mpi4py" not in sys.modules:
    sys.modules["mpi4py"] = None  # type: ignore[assignment]  # `import mpi4py` raises ImportError

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530


@pytest.fixture(scope="session")
def fmnist_dir() -> Path:
    """Folder holding the real Fashion-MNIST IDX files (Debian package ``dataset-fashion-mnist``)."""
    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"Real Fashion-MNIST not found in {FMNIST_DIR}: apt-get install -y dataset-fashion-mnist")
    return FMNIST_DIR


@pytest.fixture(scope="session")
def fmnist(fmnist_dir: Path) -> dict[str, Tensor]:
    """First 10k training and all 10k test images of real Fashion-MNIST, normalised, ``[N, 1, 28, 28]``."""

    def load(prefix: str, n: int) -> tuple[Tensor, Tensor]:
        x = torch.from_numpy(read_idx(fmnist_dir / f"{prefix}-images-idx3-ubyte.gz")[:n]).float().div(255)
        y = torch.from_numpy(read_idx(fmnist_dir / f"{prefix}-labels-idx1-ubyte.gz")[:n]).long()
        return ((x - FMNIST_MEAN) / FMNIST_STD).unsqueeze(1), y

    x_train, y_train = load("train", 10_000)
    x_test, y_test = load("t10k", 10_000)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _train(net: nn.Module, x: Tensor, y: Tensor, epochs: int = 2, lr: float = 0.05, batch_size: int = 128,
           seed: int = 0, momentum: float = 0.9) -> nn.Module:
    """Train a classifier with plain SGD on tensors (data order seeded); returns it in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval()


@pytest.fixture(scope="session")
def train_classifier() -> Callable[..., nn.Module]:
    """``train_classifier(net, x, y, epochs=2, lr=0.05, batch_size=128, seed=0)``: plain SGD training loop."""
    return _train


@pytest.fixture(scope="session")
def fmnist_mlp_pair(fmnist: dict[str, Tensor]) -> tuple[nn.Module, nn.Module]:
    """Two MLPs (3 hidden layers of 512) trained on real Fashion-MNIST from different seeds (init and data order)."""
    from lmc_lightning.nets import get_net

    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = get_net("mlp", num_classes=10, in_channels=1, input_size=28, depth=3, width=512)
        nets.append(_train(net, fmnist["x_train"], fmnist["y_train"], epochs=3, lr=0.05, seed=seed))
    return nets[0], nets[1]


@pytest.fixture(scope="session")
def fake_fmnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with tiny Fashion-MNIST IDX .gz files (256 train, 128 test images) in the real on-disk format."""
    import numpy as np

    from lmc_lightning.data.idx import write_idx

    root = tmp_path_factory.mktemp("fake_fmnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 256), ("t10k", 128)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        # class-dependent brightness so that a tiny net can learn something
        images = (rng.integers(0, 64, (n, 28, 28)) + labels[:, None, None] * 19).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture(autouse=True)
def _no_run_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget an earlier test's ``seed_everything``: datamodules with ``seed=None`` read ``PL_GLOBAL_SEED``."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module of tiny ops (OpenMP stalls on shared cores); restored afterwards.

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_CPU_CHILD = "LMC_TEST_CPU_DDP_CHILD"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    """Run ``cpu_ddp`` tests in a child pytest with one OpenMP thread that cannot see a GPU.

    Multi-process CPU DDP forks gloo workers. A fork is unsafe once the parent has run OpenMP-parallel ops (the workers
    died with SIGSEGV in a multi-threaded tensor op on a 16-core GPU machine; they pass with ``OMP_NUM_THREADS=1``)
    or has initialised CUDA. The child (``OMP_NUM_THREADS=1``, ``CUDA_VISIBLE_DEVICES=""``) runs the test exactly as
    on a small CPU-only machine, on every host.
    """
    if item.get_closest_marker("cpu_ddp") is None or os.environ.get(_CPU_CHILD):
        return
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1",
           _CPU_CHILD: "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", item.nodeid],
                          cwd=item.config.rootpath, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        crash = [line for line in (done.stdout + done.stderr).splitlines()
                 if "Fatal Python error" in line or line.lstrip().startswith('File "')][:80]
        pytest.fail(f"{item.nodeid} failed in its CPU-only child process:\n{done.stdout[-6000:]}{done.stderr[-3000:]}"
                    + ("\ncrash stack:\n" + "\n".join(crash) if crash else ""), pytrace=False)
    item.runtest = lambda: None  # passed in the child; nothing left to run here
