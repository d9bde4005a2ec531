"""Entropy coding of code sequences with a ``CodePrior`` (range coding through ``constriction``).

The prior gives ``p(c_t | c_<t)`` for each position; a range coder turns the sequence into about
``-sum log2 p(c_t | c_<t)`` bits. Encoder and decoder must see bit-identical probabilities, so
both run the same incremental path (``CodePrior.step_logits`` with its key/value cache, batch 1,
float64 softmax): the encoder feeds the true codes, the decoder the codes it has just decoded.
Same weights and same arithmetic on both sides are required (the file header carries a hash of
the prior's weights, so a different model is refused instead of decoding garbage).

``encode_codes`` / ``decode_codes`` code one sequence or a batch of them (the tiles of an
image) into one stream; ``raw_bits`` is the baseline of ``ceil(log2 K)`` bits per code.
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


@torch.no_grad()
def _range_code(prior, n: int, cond, codes: torch.Tensor | None = None, words: np.ndarray | None = None):
    """Encode ``codes`` (n, L) into one word stream, or decode n sequences from ``words``: the same
    batched incremental steps on both sides, so both see the same probabilities."""
    c = _constriction()
    model = c.stream.model.Categorical(perfect=False)
    coder = c.stream.queue.RangeEncoder() if codes is not None else c.stream.queue.RangeDecoder(words)
    out = torch.empty(n, prior.seq_len, dtype=torch.long)
    cond_t = None if cond is None else torch.as_tensor(cond).reshape(-1).expand(n)
    was_training = prior.training
    prior.eval()
    try:
        cache = prior.new_cache(n)
        prev = None
        for t in range(prior.seq_len):
            logits = prior.step_logits(prev, t, cache, cond_t, batch=n)
            probs = torch.softmax(logits.double(), -1).cpu().numpy()
            if codes is not None:
                coder.encode(codes[:, t].numpy().astype(np.int32), model, probs)
                out[:, t] = codes[:, t]
            else:
                out[:, t] = torch.from_numpy(np.asarray(coder.decode(model, probs), dtype=np.int64))
            prev = out[:, t].to(prior.pos.device)
    finally:
        prior.train(was_training)
    return coder.get_compressed() if codes is not None else out


def encode_codes(codes: torch.Tensor, prior, cond: int | None = None) -> np.ndarray:
    """Range-code ``codes`` ((L,) or (n, L), L = the prior's seq_len) with ``prior`` into one
    stream of uint32 words (n sequences coded together, one batched prior step per position)."""
    codes = torch.as_tensor(codes).long().cpu()
    seqs = codes.reshape(1, -1) if codes.ndim == 1 else codes
    if seqs.ndim != 2 or seqs.shape[1] != prior.seq_len:
        raise ValueError(f"codes must hold {prior.seq_len} codes (the prior's seq_len) per sequence, "
                         f"got shape {tuple(codes.shape)}")
    if seqs.numel() and (seqs.min() < 0 or seqs.max() >= prior.num_codes):
        raise ValueError(f"codes must lie in [0, {prior.num_codes})")
    return _range_code(prior, seqs.shape[0], cond, codes=seqs)


def decode_codes(words: np.ndarray, prior, cond: int | None = None, n: int | None = None) -> torch.Tensor:
    """Inverse of ``encode_codes``: ``n`` sequences (n, L) int64, or one (L,) when ``n`` is None."""
    out = _range_code(prior, 1 if n is None else n, cond, words=np.asarray(words, dtype=np.uint32))
    return out[0] if n is None else out


def raw_bits(num_codes: int, count: int) -> int:
    """Bits of ``count`` codes stored at ``ceil(log2 K)`` bits each (the uncoded baseline)."""
    return count * max(1, math.ceil(math.log2(num_codes)))
