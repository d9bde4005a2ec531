"""Shared by the VQGAN model, loader and loss tests: random images and a one-thread fixture."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions run far faster on one thread than on two contended ones; restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def images(b=2, size=16, seed=0, dtype=torch.float32):
    """Images in [-1, 1], as the models and LPIPS expect, from their own generator."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 3, size, size, generator=g) * 2 - 1).to(dtype)
