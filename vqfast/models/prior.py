"""``CodePrior``: an autoregressive transformer over a tokenizer's code grid.

The second stage of taming-transformers / LlamaGen style generation: the codes of an image,
read in raster order, are modelled as ``p(c_0 | s) p(c_1 | s, c_0) ...`` where ``s`` is a start
token (a learned BOS, or the embedding of a class label). Decoder-only, pre-LayerNorm blocks,
causal attention through ``F.scaled_dot_product_attention``, learned position embeddings.

Sampling runs one position at a time with a key/value cache (each step attends to the cached
keys of earlier positions instead of recomputing them); ``use_cache=False`` recomputes the
whole prefix every step (the reference, and the baseline of the samples/s comparison).
``step_logits`` is the same incremental path, which the entropy coder (vqfast.entropy) uses on
both the encoding and the decoding side so that both see bit-identical probabilities.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, cache: dict | None = None, pos: int = 0) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            # cache["k"], cache["v"]: (B, H, L, hd) preallocated; positions < pos hold earlier keys.
            cache["k"][:, :, pos:pos + t] = k
            cache["v"][:, :, pos:pos + t] = v
            keys, values = cache["k"][:, :, :pos + t], cache["v"][:, :, :pos + t]
            if t == 1:  # one new query sees every cached position: no mask needed
                y = F.scaled_dot_product_attention(q, keys, values, dropout_p=p)
            else:
                mask = torch.ones(t, pos + t, dtype=torch.bool, device=x.device).tril(pos)
                y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim),
                                 nn.Dropout(dropout))

    def forward(self, x, cache=None, pos=0):
        x = x + self.attn(self.norm1(x), cache, pos)
        return x + self.mlp(self.norm2(x))


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering; filtered entries become -inf."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


class CodePrior(nn.Module):
    """Autoregressive prior over sequences of ``seq_len`` codes from a ``num_codes`` codebook.

    Args:
        num_codes: codebook size K of the tokenizer.
        seq_len: codes per image (H * W of the code grid, raster order).
        dim, depth, heads, mlp_ratio, dropout: transformer size.
        num_classes: > 0 for class-conditional models: the start token is the class embedding.
    """

    def __init__(self, num_codes: int, seq_len: int, *, dim: int = 256, depth: int = 4, heads: int = 4,
                 mlp_ratio: int = 4, dropout: float = 0.0, num_classes: int = 0):
        super().__init__()
        for name, v in (("num_codes", num_codes), ("seq_len", seq_len), ("dim", dim), ("depth", depth)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.num_codes, self.seq_len, self.num_classes = num_codes, seq_len, num_classes
        self.config = dict(num_codes=num_codes, seq_len=seq_len, dim=dim, depth=depth, heads=heads,
                           mlp_ratio=mlp_ratio, dropout=dropout, num_classes=num_classes)
        self.tok = nn.Embedding(num_codes, dim)
        self.start = nn.Embedding(max(num_classes, 1), dim)  # BOS (row 0) or one row per class
        self.pos = nn.Parameter(torch.zeros(seq_len, dim))
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_codes)
        self.apply(self._init)
        nn.init.normal_(self.pos, std=0.02)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def _start(self, b: int, cond: torch.Tensor | None, device) -> torch.Tensor:
        if self.num_classes:
            if cond is None:
                raise ValueError("cond (class labels, shape (B,)) is required for a class-conditional prior")
            cond = torch.as_tensor(cond, device=device).reshape(-1)
            if cond.shape[0] != b or cond.dtype.is_floating_point or (cond < 0).any() or (cond >= self.num_classes).any():
                raise ValueError(f"cond must hold {b} class labels in [0, {self.num_classes})")
            return self.start(cond.long())
        if cond is not None:
            raise ValueError("cond was given but the prior is unconditional (num_classes=0)")
        return self.start.weight[:1].expand(b, -1)

    def _check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        if not isinstance(codes, torch.Tensor) or codes.dtype not in (torch.int64, torch.int32):
            raise TypeError("codes must be an integer tensor of shape (B, seq_len)")
        if codes.ndim != 2 or codes.shape[1] > self.seq_len:
            raise ValueError(f"codes must have shape (B, L <= {self.seq_len}), got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.num_codes):
            raise ValueError(f"codes must lie in [0, {self.num_codes})")
        return codes.long()

    def forward(self, codes: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, L, K)``: position t predicts ``codes[:, t]`` from the start token and ``codes[:, :t]``."""
        codes = self._check_codes(codes)
        b, length = codes.shape
        x = torch.cat([self._start(b, cond, codes.device)[:, None], self.tok(codes[:, :-1])], 1)
        x = x + self.pos[:length]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))

    def loss(self, codes: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Mean negative log-likelihood per code, in nats."""
        logits = self(codes, cond)
        return F.cross_entropy(logits.reshape(-1, self.num_codes).float(), codes.reshape(-1).long())

    def bits_per_code(self, codes: torch.Tensor, cond: torch.Tensor | None = None) -> float:
        with torch.no_grad():
            return self.loss(codes, cond).item() / math.log(2)

    # -- incremental decoding ------------------------------------------------------------------

    def new_cache(self, batch: int, device=None, dtype=None) -> list[dict]:
        p = self.pos
        device, dtype = device or p.device, dtype or p.dtype
        shape = (batch, self.blocks[0].attn.heads, self.seq_len, p.shape[1] // self.blocks[0].attn.heads)
        return [{"k": torch.empty(shape, device=device, dtype=dtype), "v": torch.empty(shape, device=device, dtype=dtype)}
                for _ in self.blocks]

    def step_logits(self, prev: torch.Tensor | None, pos: int, cache: list[dict], cond=None,
                    batch: int | None = None) -> torch.Tensor:
        """Logits ``(B, K)`` of position ``pos`` given the code at ``pos - 1`` (``prev``, (B,); None at
        pos 0) and the cache holding positions < pos. Writes position ``pos`` into the cache."""
        if pos == 0:
            x = self._start(batch if prev is None else prev.shape[0], cond, self.pos.device)
        else:
            x = self.tok(prev.long())
        x = (x + self.pos[pos])[:, None]
        for blk, c in zip(self.blocks, cache):
            x = blk(x, c, pos)
        return self.head(self.norm(x))[:, 0]

    @torch.no_grad()
    def sample(self, n: int, cond: torch.Tensor | None = None, *, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` code sequences ``(n, seq_len)`` drawn from the prior (top-k / top-p / temperature)."""
        device = self.pos.device
        out = torch.empty(n, self.seq_len, dtype=torch.long, device=device)
        cache = self.new_cache(n) if use_cache else None
        prev = None
        for t in range(self.seq_len):
            if use_cache:
                logits = self.step_logits(prev, t, cache, cond, batch=n)
            else:  # the reference: the whole prefix again (its last position predicts t)
                prefix = torch.cat([out[:, :t], out.new_zeros(n, 1)], 1)
                logits = self(prefix, cond)[:, -1]
            probs = filter_logits(logits.float(), temperature, top_k, top_p).softmax(-1)
            prev = torch.multinomial(probs, 1, generator=generator)[:, 0]
            out[:, t] = prev
        return out
