"""Determinism and resume: a small training loop (conv encoder -> quantizer -> decoder,
Adam) under torch.use_deterministic_algorithms(True) with a fixed seed, on every CPU
backend (Triton through the interpreter, at a tiny size).

* two runs are bit-identical: every parameter, buffer and optimizer state (torch.equal);
* a run saved with vqfast.checkpoint.save_training_state at step k, reloaded into a
  freshly built model whose RNGs were reseeded, and continued, ends bit-identical to
  the uninterrupted run.

The batches come from torch's global generator, quantize dropout from Python's
``random``, k-means init and dead-code restarts from torch's generator, so the RNG
states must be restored for the resumed run to match.
"""
import random

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import require_backend
from vqfast.checkpoint import load_training_state, save_training_state
from vqfast.nn import ResidualVQ, VectorQuantize

BACKENDS = ["torch", "cpu", "triton"]
STEPS, RESUME_AT = 5, 2
DIM, CODES = 8, 16

QUANTIZERS = {
    # few codes used per batch at this size, so dead-code restarts (random draws) happen
    "ema": lambda: VectorQuantize(dim=DIM, codebook_size=CODES, accept_image_fmap=True, decay=0.8,
                                  threshold_ema_dead_code=1),
    "learnable": lambda: VectorQuantize(dim=DIM, codebook_size=CODES, accept_image_fmap=True,
                                        learnable_codebook=True, ema_update=False, commitment_weight=0.5),
    "rvq": lambda: ResidualVQ(dim=DIM, num_quantizers=3, codebook_size=CODES, accept_image_fmap=True,
                              quantize_dropout=True, kmeans_init=True, kmeans_iters=2, threshold_ema_dead_code=1),
}


class TinyAutoencoder(nn.Module):
    def __init__(self, variant):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, DIM, 3, padding=1), nn.GELU(), nn.Conv2d(DIM, DIM, 1))
        self.quantizer = QUANTIZERS[variant]()
        self.decoder = nn.Conv2d(DIM, 3, 3, padding=1)

    def forward(self, images):
        quantized, _, commit = self.quantizer(self.encoder(images))
        return nn.functional.mse_loss(self.decoder(quantized), images) + commit.sum()


@pytest.fixture(autouse=True)
def deterministic():
    was, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    # One thread: these tiny convolutions run 20x slower when two threads fight a loaded box.
    torch.set_num_threads(1)
    yield
    torch.use_deterministic_algorithms(was)
    torch.set_num_threads(threads)


def _seed_everything(seed):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _build(variant, backend, seed):
    _seed_everything(seed)
    model = TinyAutoencoder(variant)
    for m in model.modules():
        if isinstance(m, VectorQuantize):
            m.backend = backend
    return model.train(), torch.optim.Adam(model.parameters(), lr=3e-2)


def _train(model, opt, start, stop, save_at=None, directory=None):
    for step in range(start, stop):
        if step == save_at:
            save_training_state(directory, model=model, optimizers={"adam": opt}, step=step,
                                config={"steps": STEPS})
        images = torch.randn(2, 3, 4, 4)  # 32 vectors a batch, from the global generator
        opt.zero_grad(set_to_none=True)
        model(images).backward()
        opt.step()


def _final_state(model, opt):
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    for i, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            state[f"adam.{i}.{k}"] = torch.as_tensor(v).clone()
    return state


def _assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, f"not bit-identical: {different}"


def _uninterrupted(variant, backend, directory=None):
    model, opt = _build(variant, backend, seed=0)
    _train(model, opt, 0, STEPS, save_at=RESUME_AT if directory else None, directory=directory)
    return _final_state(model, opt)


# The Triton interpreter is slow: its learnable and residual runs are in the slow profile.
CASES = [pytest.param(v, b, marks=[pytest.mark.slow] if b == "triton" and v != "ema" else [])
         for v in QUANTIZERS for b in BACKENDS]


@pytest.mark.parametrize("variant, backend", CASES)
def test_two_runs_and_a_resumed_run_are_bit_identical(variant, backend, tmp_path):
    require_backend(backend)
    first = _uninterrupted(variant, backend, directory=tmp_path)
    _assert_bit_identical(first, _uninterrupted(variant, backend))

    # a fresh process would build the model from other seeds: everything must come from the checkpoint
    model, opt = _build(variant, backend, seed=1234)
    step, config, _ = load_training_state(tmp_path, model=model, optimizers={"adam": opt})
    assert step == RESUME_AT and config == {"steps": STEPS}
    _train(model, opt, step, STEPS)
    _assert_bit_identical(first, _final_state(model, opt))


def test_the_rng_matters():
    """The check above can fail: resuming without the saved RNG states diverges."""
    first = _uninterrupted("ema", "torch")
    model, opt = _build("ema", "torch", seed=0)
    _train(model, opt, 0, RESUME_AT)
    _seed_everything(99)  # as if the RNG states were not restored
    _train(model, opt, RESUME_AT, STEPS)
    with pytest.raises(AssertionError, match="not bit-identical"):
        _assert_bit_identical(first, _final_state(model, opt))
