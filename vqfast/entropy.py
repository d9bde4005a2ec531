"""Entropy coding of code sequences with a ``CodePrior`` (range coding through ``constriction``).

The prior gives ``p(c_t | c_<t)`` for each position; a range coder turns the sequence into about
``-sum log2 p(c_t | c_<t)`` bits. Encoder and decoder must see bit-identical probabilities, so
both run the same incremental path (``CodePrior.step_logits`` with its key/value cache, batch 1,
float64 softmax): the encoder feeds the true codes, the decoder the codes it has just decoded.
Same weights and same arithmetic on both sides are required (the file header carries a hash of
the prior's weights, so a different model is refused instead of decoding garbage).

``encode_codes`` / ``decode_codes`` work on one sequence; ``raw_bits`` is the baseline of
``ceil(log2 K)`` bits per code.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import torch


def _constriction():
    try:
        import constriction
    except ImportError as e:  # an optional dependency: say how to get it
        raise ImportError("entropy coding needs the 'constriction' package: pip install constriction") from e
    return constriction


def model_hash(module: torch.nn.Module) -> bytes:
    """8-byte fingerprint of a module's weights (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.digest()[:8]


def _step_probabilities(prior, prev, pos, cache, cond) -> np.ndarray:
    logits = prior.step_logits(prev, pos, cache, cond, batch=1)[0]
    return torch.softmax(logits.double(), -1).cpu().numpy()


@torch.no_grad()
def encode_codes(codes: torch.Tensor, prior, cond: int | None = None) -> np.ndarray:
    """Range-code one sequence ``codes`` (L,) with ``prior``; returns the compressed uint32 words."""
    c = _constriction()
    codes = torch.as_tensor(codes).reshape(-1).long().cpu()
    if codes.numel() != prior.seq_len:
        raise ValueError(f"codes must hold {prior.seq_len} codes (the prior's seq_len), got {codes.numel()}")
    if codes.min() < 0 or codes.max() >= prior.num_codes:
        raise ValueError(f"codes must lie in [0, {prior.num_codes})")
    was_training = prior.training
    prior.eval()
    try:
        cond_t = None if cond is None else torch.tensor([cond])
        cache = prior.new_cache(1)
        enc = c.stream.queue.RangeEncoder()
        prev = None
        for t in range(prior.seq_len):
            probs = _step_probabilities(prior, prev, t, cache, cond_t)
            sym = int(codes[t])
            enc.encode(np.array([sym], dtype=np.int32), c.stream.model.Categorical(perfect=False),
                       probs[None].astype(np.float64))
            prev = codes[t:t + 1].to(prior.pos.device)
        return enc.get_compressed()
    finally:
        prior.train(was_training)


@torch.no_grad()
def decode_codes(words: np.ndarray, prior, cond: int | None = None) -> torch.Tensor:
    """Inverse of ``encode_codes``: the (seq_len,) int64 codes."""
    c = _constriction()
    was_training = prior.training
    prior.eval()
    try:
        cond_t = None if cond is None else torch.tensor([cond])
        cache = prior.new_cache(1)
        dec = c.stream.queue.RangeDecoder(np.asarray(words, dtype=np.uint32))
        out = torch.empty(prior.seq_len, dtype=torch.long)
        prev = None
        for t in range(prior.seq_len):
            probs = _step_probabilities(prior, prev, t, cache, cond_t)
            sym = int(dec.decode(c.stream.model.Categorical(perfect=False), probs[None].astype(np.float64))[0])
            out[t] = sym
            prev = out[t:t + 1].to(prior.pos.device)
        return out
    finally:
        prior.train(was_training)


def raw_bits(num_codes: int, count: int) -> int:
    """Bits of ``count`` codes stored at ``ceil(log2 K)`` bits each (the uncoded baseline)."""
    return count * max(1, math.ceil(math.log2(num_codes)))
