"""Fixtures with tiny fake datasets written in the real on-disk formats (see ``fake_datasets.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_datasets import write_all


@pytest.fixture(scope="session")
def fake_data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every fake dataset (MNIST, Fashion-MNIST, CIFAR-10/100, TinyImageNet) under one root, shared by the session.

    Treat it as read-only; TinyImageNet's val folder gets sorted into class folders on first use.
    """
    return write_all(tmp_path_factory.mktemp("fake_data"))
