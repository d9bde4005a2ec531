"""``vqfast.nn.ResidualVQ`` / ``vqfast.nn.GroupedResidualVQ``: drop-ins for
vector-quantize-pytorch 1.32.0's ``ResidualVQ`` / ``GroupedResidualVQ``.

Same constructor (keyword-only), same ``forward`` contract, same state_dict names
(``layers.{i}._codebook.*``, ``project_in`` / ``project_out``, ``mlps.{i}.*``; ``rvqs.{g}.`` prefixed
for the grouped one), so checkpoints load both ways. Each stage is a ``vqfast.nn.VectorQuantize``.

Fused search. The stages' searches are one ``vqfast.residual_nearest_code`` call over the active
stages (r_0 = x, r_{q+1} = r_q - codebooks[q][i_q], no autograd); then each stage finishes from its
chosen indices (``VectorQuantize(..., _chosen_indices=...)``: gather, straight-through or rotation-trick
output, commitment loss, EMA and dead-code expiry, all O(rows * d) per stage) in the usual loop, so
outputs, losses, gradients and buffer updates are the loop's. The stage outputs equal the gathered codes
exactly here, so the fused residuals are the loop's; vector-quantize-pytorch's rotation-trick output
differs from the code by rounding, so its residuals (and indices on near-ties) can differ by that.
Searching every stage up front is valid when no stage's search depends on an earlier stage's side
effects or randomness. The loop runs instead (``loop_reason`` says why) when:

* ``fused`` is False (an attribute, for tests and benchmarks);
* ``implicit_neural_codebook``: stage q's codes are an MLP of the quantized-so-far;
* codebook sizes differ between stages (the op takes one (Q, K, d) tensor);
* the input is not float32 / float64: the loop rounds each residual to the input dtype, the op keeps float32;
* ``shared_codebook`` with dead-code expiry in a training step: stage q may restart codes of the one
  codebook that stage q+1 then searches (its EMA rewrite is deferred to the end of forward, as
  vector-quantize-pytorch's ``manual_ema_update``, so EMA alone does not block fusing);
* a codebook still awaiting k-means init (``kmeans_init``): it is initialized from its own stage's residuals;
* ``stochastic_sample_codes`` in training with temperature > 0: codes are sampled, not searched;
* ``straight_through``: its gradient uses every code's logit.

Per-stage EMA and dead-code expiry without a shared codebook touch only that stage's codebook after its
search, so they do not block fusing; ``mask``, ``quantize_dropout`` (only the kept stages are searched),
``freeze_codebook``, learnable codebooks, cosine codebooks (searched with ``"dot"`` on the raw residual:
the per-row norm does not change the argmax), ``codebook_dim`` projections and ``accept_image_fmap`` fuse.

``implicit_neural_codebook=True`` (QINCo, arXiv 2401.14732) with ``mlp_kwargs`` (``dim_hidden, depth``)
is implemented on the loop (vqfast/nn/implicit_neural_codebook.py), as vector-quantize-pytorch does it:
learnable codebooks, no EMA, stage q >= 1 searching per-row codes ``MLP_q(E_q, condition=quantized so
far)``. With it, ``accept_image_fmap, kmeans_init, threshold_ema_dead_code, orthogonal_reg_weight,
commitment_use_cross_entropy_loss, sync_update_v, straight_through, stochastic_sample_codes,
channel_last=False`` raise NotImplementedError.

Supported: ``dim, num_quantizers, codebook_size`` (an int, or a tuple of per-stage sizes),
``codebook_dim`` (project_in / project_out Linear layers when != dim), ``shared_codebook``,
``quantize_dropout, quantize_dropout_cutoff_index, quantize_dropout_multiple_of`` (the stage
is drawn exactly as vector-quantize-pytorch draws it: one ``torch.randint`` seed, then
``random.Random(seed).randrange``, so seeded runs match), ``quant_grad_frac``,
``accept_image_fmap``, ``return_zeros_for_masked_padding``, ``heads=1``, ``implicit_neural_codebook``,
``mlp_kwargs``, and every ``VectorQuantize`` keyword vqfast supports (forwarded to each stage).
``forward`` accepts ``x, mask, return_all_codes, sample_codebook_temp, freeze_codebook,
rand_quantize_dropout_fixed_seed``.

Not supported (NotImplementedError naming the argument): ``heads != 1`` (vector-quantize-pytorch
asserts heads == 1 too), ``diveq``, ``beam_size`` / ``eval_beam_size`` (beam search needs top-k
codes), a non-default ``beam_score_quantizer_weights``; and ``forward(indices=...)`` (the
cross-entropy path: vector-quantize-pytorch 1.32.0's own implementation unpacks VectorQuantize's
2-tuple into three names and fails, so there is no behaviour to match).
"""
from __future__ import annotations

import random
from math import ceil

import torch
import torch.nn.functional as F
from torch import nn

from vqfast.nn.check_finite import check_finite_rows
from vqfast.nn.implicit_neural_codebook import MLP, implicit_stage
from vqfast.nn.vector_quantize import VectorQuantize
from vqfast.ops import residual_nearest_code


# With implicit_neural_codebook=True, the options implemented (their defaults); another value raises.
_IMPLICIT_CODEBOOK_DEFAULTS = {
    "accept_image_fmap": False, "kmeans_init": False, "threshold_ema_dead_code": 0, "orthogonal_reg_weight": 0.,
    "commitment_use_cross_entropy_loss": False, "sync_update_v": 0., "straight_through": False,
    "stochastic_sample_codes": False, "channel_last": True,
}


def _unsupported(name: str, why: str):
    return NotImplementedError(f"vqfast.nn.ResidualVQ: {name} is not supported; {why}")


def _maybe_sync_seed(device, max_size: int = 10_000) -> int:
    """vector-quantize-pytorch's get_maybe_sync_seed: the same draw (and all-reduce when distributed)."""
    rand_int = torch.randint(0, max_size, (), device=device)
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(rand_int)
    return int(rand_int.item())


def _frac_gradient(t: torch.Tensor, frac: float) -> torch.Tensor:
    detached = t.detach()
    if frac <= 0:
        return detached
    return frac * t + (1. - frac) * detached


class ResidualVQ(nn.Module):
    """Residual vector quantization (Algorithm 1 of arXiv 2107.03312) over vqfast VectorQuantize
    stages. ``forward(x)`` returns ``(quantized, indices (..., Q), losses (Q,))`` and, with
    ``return_all_codes``, the codes of every stage ``(Q, ..., codebook_dim)``. Stages dropped by
    quantize dropout get index -1 and loss 0 and add nothing to ``quantized``."""

    def __init__(self, *, dim, num_quantizers: int | None = None, codebook_size, codebook_dim=None,
                 shared_codebook=False, diveq=False, heads=1, quantize_dropout=False,
                 quantize_dropout_cutoff_index=0, quantize_dropout_multiple_of=1, accept_image_fmap=False,
                 implicit_neural_codebook=False, mlp_kwargs: dict | None = None, beam_size=None,
                 eval_beam_size=None, beam_score_quantizer_weights=None, quant_grad_frac=0.,
                 return_zeros_for_masked_padding=True, check_finite=False, **vq_kwargs):
        super().__init__()
        self.check_finite = bool(check_finite)  # NaN/Inf rows of x raise (vqfast/nn/check_finite.py)
        if heads != 1:
            raise _unsupported(f"heads={heads!r}", "residual vq is not compatible with multi-headed codes "
                               "(vector-quantize-pytorch asserts heads == 1)")
        if diveq:
            raise _unsupported("diveq=True", "DiVeQ's directional reparameterization is not implemented")
        if implicit_neural_codebook:
            for name, default in _IMPLICIT_CODEBOOK_DEFAULTS.items():
                value = accept_image_fmap if name == "accept_image_fmap" else vq_kwargs.get(name, default)
                if value != default:
                    raise _unsupported(f"implicit_neural_codebook=True with {name}={value!r}",
                                       f"only {name}={default!r} is implemented with per-row neural codes")
        elif mlp_kwargs:
            raise _unsupported("mlp_kwargs", "it only configures implicit_neural_codebook")
        if beam_size is not None or eval_beam_size is not None:
            raise _unsupported("beam_size / eval_beam_size", "beam search needs the top-k codes of every "
                               "stage; vqfast's quantizer returns the single nearest code")
        if beam_score_quantizer_weights is not None:
            raise _unsupported("beam_score_quantizer_weights", "it only weighs beam search scores")
        if num_quantizers is None and not isinstance(codebook_size, tuple):
            raise ValueError("pass num_quantizers, or codebook_size as a tuple of per-stage sizes")
        if quantize_dropout_cutoff_index < 0:
            raise ValueError("quantize_dropout_cutoff_index must be >= 0")

        codebook_dim = dim if codebook_dim is None else codebook_dim
        self.codebook_dim = codebook_dim
        requires_projection = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if requires_projection else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if requires_projection else nn.Identity()
        self.has_projections = requires_projection
        self.accept_image_fmap = accept_image_fmap
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        vq_kwargs.update(return_zeros_for_masked_padding=return_zeros_for_masked_padding)
        if shared_codebook:
            # vector-quantize-pytorch also sets manual_in_place_optimizer_update=True: without an in-place
            # optimizer (unsupported in vqfast) that flag does nothing, so it is not passed.
            vq_kwargs.update(manual_ema_update=True)
        self.diveq = False
        self.implicit_neural_codebook = implicit_neural_codebook
        if implicit_neural_codebook:
            vq_kwargs.update(learnable_codebook=True, ema_update=False)

        codebook_sizes = codebook_size if isinstance(codebook_size, tuple) else (codebook_size,) * num_quantizers
        num_quantizers = len(codebook_sizes) if num_quantizers is None else num_quantizers
        if len(codebook_sizes) != num_quantizers:
            raise ValueError(f"{len(codebook_sizes)} codebook sizes for {num_quantizers} quantizers")
        self.num_quantizers = num_quantizers
        self.codebook_sizes = codebook_sizes
        self.uniform_codebook_size = len(set(codebook_sizes)) == 1

        self.layers = nn.ModuleList([
            VectorQuantize(dim=codebook_dim, codebook_size=size, codebook_dim=codebook_dim,
                           accept_image_fmap=accept_image_fmap, **vq_kwargs)
            for size in codebook_sizes])

        self.quantize_dropout = bool(quantize_dropout) and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.vq_is_ema_updating = self.layers[0].ema_update
        self.quant_grad_frac = quant_grad_frac
        self.beam_size = self.eval_beam_size = None
        self.register_buffer("beam_score_weights", torch.ones(num_quantizers), persistent=False)
        if implicit_neural_codebook:
            self.mlps = nn.ModuleList([MLP(dim=codebook_dim, l2norm_output=self.layers[0].use_cosine_sim,
                                           **(mlp_kwargs or {})) for _ in range(num_quantizers - 1)])
        else:
            self.mlps = (None,) * (num_quantizers - 1)

        # False forces the stage-by-stage loop (tests, benchmarks); see loop_reason for when it runs anyway.
        self.fused = True
        self.shared_codebook = shared_codebook
        if shared_codebook:
            if not self.uniform_codebook_size:
                raise ValueError("shared_codebook needs one codebook size for every stage")
            codebook = self.layers[0]._codebook
            for vq in self.layers[1:]:
                vq._codebook = codebook

    # -- codebook access -------------------------------------------------------------------------

    @property
    def codebook_size(self):
        return self.layers[0].codebook_size

    @property
    def codebooks(self):
        """(Q, K, codebook_dim) for one codebook size, else a tuple of (K_q, codebook_dim)."""
        codebooks = tuple(layer._codebook.embed.squeeze(0) for layer in self.layers)
        if not self.uniform_codebook_size:
            return codebooks
        return torch.stack(codebooks)

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes (Q, b, ..., codebook_dim) of ``indices`` (b, ..., q); -1 (dropped) gives zeros, and
        q < num_quantizers is padded with -1 (needs quantize_dropout)."""
        lead = indices.shape[:-1]
        q = indices.shape[-1]
        flat = indices.reshape(indices.shape[0], -1, q)                   # b n q
        if q < self.num_quantizers:
            if not self.quantize_dropout:
                raise ValueError("quantize dropout must be on to reconstruct from fewer quantizers' indices")
            flat = F.pad(flat, (0, self.num_quantizers - q), value=-1)
        dropped = flat == -1
        flat = flat.masked_fill(dropped, 0)
        if self.implicit_neural_codebook:
            # stage q's codes depend on the codes of the stages before: derived stage by stage
            all_codes, quantized_out = [], 0.
            for q, (codebook, ids) in enumerate(zip(self.codebooks, flat.unbind(-1))):
                if q == 0:
                    codes = codebook[ids]
                else:
                    per_row = self.mlps[q - 1](codebook, condition=quantized_out)     # b n K d
                    codes = per_row.gather(-2, ids[..., None, None].expand(*ids.shape, 1, per_row.shape[-1]))
                    codes = codes.squeeze(-2)
                all_codes.append(codes)
                quantized_out = quantized_out + codes
            all_codes = torch.stack(all_codes)
        elif self.uniform_codebook_size:
            codebooks = self.codebooks                                     # q c d
            all_codes = codebooks[torch.arange(codebooks.shape[0], device=flat.device)[:, None, None],
                                  flat.permute(2, 0, 1)]                   # q b n d
        else:
            all_codes = torch.stack([cb[ids] for cb, ids in zip(self.codebooks, flat.unbind(-1))])
        all_codes = all_codes.masked_fill(dropped.permute(2, 0, 1)[..., None], 0.)
        return all_codes.reshape(all_codes.shape[0], *lead, all_codes.shape[-1])

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.project_out(self.get_codes_from_indices(indices).sum(0))

    # -- forward ---------------------------------------------------------------------------------

    def _project(self, proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.has_projections and self.accept_image_fmap:  # channel-first feature maps
            return proj(x.movedim(1, -1)).movedim(-1, 1)
        return proj(x)

    def _dropout_index(self, device, seed):
        """The last stage kept by quantize dropout, drawn as vector-quantize-pytorch draws it."""
        if seed is None:
            seed = _maybe_sync_seed(device)
        index = random.Random(seed).randrange(self.quantize_dropout_cutoff_index, self.num_quantizers)
        mult = self.quantize_dropout_multiple_of
        if mult != 1:
            index = ceil((index + 1) / mult) * mult - 1
        return index

    def loop_reason(self, x: torch.Tensor, sample_codebook_temp=None, freeze_codebook=False) -> str | None:
        """Why ``forward`` on ``x`` (already projected in) must run the stages one by one, or None
        when the fused search is valid. The rule is in the module docstring."""
        first_vq = self.layers[0]
        if not self.fused:
            return "fused=False"
        if self.implicit_neural_codebook:
            return "implicit_neural_codebook: each stage's codes depend on the stages before"
        if not self.uniform_codebook_size:
            return "codebook sizes differ between stages"
        if x.dtype not in (torch.float32, torch.float64):
            return f"{x.dtype} input: the loop rounds every residual to it, the fused search keeps float32"
        updating = self.training and not freeze_codebook
        if self.shared_codebook and updating and first_vq._codebook.has_dead_code_replacement:
            return "shared codebook with dead-code expiry: stage q+1 searches the codes stage q restarted"
        for vq in self.layers:
            cb = vq._codebook
            if not (cb._initted_seen or bool(cb.initted)):
                return "a codebook awaits k-means init from its stage's residuals"
            temperature = vq.sample_codebook_temp if sample_codebook_temp is None else sample_codebook_temp
            if self.training and getattr(vq, "stochastic_sample_codes", False) and temperature > 0:
                return "stochastic_sample_codes: the codes are sampled, not the nearest"
            if vq.straight_through:
                return "straight_through: its gradient needs every code's logit"
        return None

    @torch.no_grad()
    def _search_all_stages(self, x: torch.Tensor, active: int) -> torch.Tensor:
        """Indices (rows, active) of the first ``active`` stages, for ``x`` in the stages' layout, from one
        ``vqfast.residual_nearest_code`` call (rows in each VectorQuantize's order)."""
        first_vq = self.layers[0]
        rows = first_vq._channel_last_input(x.detach()).reshape(-1, self.codebook_dim)
        codebooks = torch.stack([vq._codebook.embed.detach()[0] for vq in self.layers[:active]])
        # cosine stages score dot(x / |x|, e) against the stored codes; the per-row 1/|x| does not
        # change the argmax, so "dot" on the raw residual picks the same code.
        metric = "dot" if first_vq.use_cosine_sim else "l2"
        indices, _ = residual_nearest_code(rows, codebooks.to(rows.dtype), metric=metric, backend=first_vq.backend)
        return indices

    def forward(self, x, mask=None, indices=None, return_all_codes=False, sample_codebook_temp=None,
                freeze_codebook=False, beam_size=None, rand_quantize_dropout_fixed_seed=None):
        if indices is not None:
            raise _unsupported("forward(indices=...)", "the cross-entropy path of vector-quantize-pytorch "
                               "1.32.0's ResidualVQ fails (it unpacks a 2-tuple into 3), so there is nothing to match")
        if beam_size is not None and beam_size > 1:
            raise _unsupported("beam_size", "beam search needs the top-k codes of every stage")
        if self.check_finite:
            check_finite_rows("ResidualVQ", x, 1 if self.accept_image_fmap else -1)

        orig_input = x
        x = self._project(self.project_in, x)
        quantized_out = torch.zeros_like(x)
        residual = x

        dropout_index = None
        if self.training and self.quantize_dropout:
            dropout_index = self._dropout_index(x.device, rand_quantize_dropout_fixed_seed)

        active = self.num_quantizers if dropout_index is None else dropout_index + 1
        chosen_indices = None
        if self.loop_reason(x, sample_codebook_temp=sample_codebook_temp, freeze_codebook=freeze_codebook) is None:
            chosen_indices = self._search_all_stages(x, active)

        all_indices, all_losses, all_residuals = [], [], []
        for q, vq in enumerate(self.layers):
            if dropout_index is not None and q > dropout_index:
                all_indices.append(None)
                all_losses.append(None)
                continue
            all_residuals.append(residual)
            if self.implicit_neural_codebook and q > 0:
                quantized, embed_indices, loss = implicit_stage(vq, self.mlps[q - 1], residual, quantized_out,
                                                                mask=mask, freeze_codebook=freeze_codebook)
            else:
                chosen = None if chosen_indices is None else chosen_indices[:, q]
                quantized, embed_indices, loss = vq(residual, mask=mask, sample_codebook_temp=sample_codebook_temp,
                                                    freeze_codebook=freeze_codebook, _chosen_indices=chosen)
            residual = residual - _frac_gradient(quantized, self.quant_grad_frac)
            quantized_out = quantized_out + quantized
            all_indices.append(embed_indices)
            all_losses.append(loss)

        kept_indices = next(i for i in all_indices if i is not None)
        all_indices = torch.stack([torch.full_like(kept_indices, -1) if i is None else i for i in all_indices], -1)
        kept_loss = all_losses[0]
        loss_dtype = torch.promote_types(torch.float32, kept_loss.dtype)
        all_losses = torch.stack([kept_loss.new_zeros((), dtype=loss_dtype) if l is None else l.to(loss_dtype)
                                  for l in all_losses])

        if self.training and self.shared_codebook:
            shared_layer = self.layers[0]
            if self.vq_is_ema_updating:
                shared_layer._codebook.update_ema()
                shared_layer.update_in_place_optimizer()
            # every stage's input, interleaved per position as vector-quantize-pytorch's '(n l)'.
            # vector-quantize-pytorch 1.32.0 hands this (b, n l, d) tensor to a codebook that reads its
            # first dim as the codebook dim, so only batch item 0's residuals can restart dead codes;
            # mirrored (``[:1]``) so that checkpoints and seeded runs stay identical.
            stacked = torch.stack(all_residuals, dim=-2)                  # ... n l d
            shared_layer.expire_codes_(stacked.flatten(-3, -2)[:1])

        quantized_out = self._project(self.project_out, quantized_out)
        if mask is not None:
            masked_out_value = torch.zeros_like(quantized_out) if self.return_zeros_for_masked_padding else orig_input
            quantized_out = torch.where(mask[..., None], quantized_out, masked_out_value)

        ret = (quantized_out, all_indices, all_losses)
        if not return_all_codes:
            return ret
        return (*ret, self.get_codes_from_indices(all_indices))


class GroupedResidualVQ(nn.Module):
    """``groups`` ResidualVQ's over equal slices of the feature dimension (the channel dim with
    ``accept_image_fmap``). ``forward`` returns ``(quantized, indices (G, ..., Q), losses (G, Q))``
    (+ all codes (G, Q, ..., d) with ``return_all_codes``)."""

    def __init__(self, *, dim, groups=1, accept_image_fmap=False, check_finite=False, **kwargs):
        super().__init__()
        self.check_finite = bool(check_finite)  # NaN/Inf rows of x raise (vqfast/nn/check_finite.py)
        if dim % groups != 0:
            raise ValueError(f"dim {dim} is not divisible by groups {groups}")
        self.dim = dim
        self.groups = groups
        self.accept_image_fmap = accept_image_fmap
        self.rvqs = nn.ModuleList([ResidualVQ(dim=dim // groups, accept_image_fmap=accept_image_fmap, **kwargs)
                                   for _ in range(groups)])

    @property
    def codebooks(self):
        return torch.stack(tuple(rvq.codebooks for rvq in self.rvqs))

    @property
    def split_dim(self):
        return 1 if self.accept_image_fmap else -1

    def get_codes_from_indices(self, indices):
        return torch.stack(tuple(rvq.get_codes_from_indices(i) for rvq, i in zip(self.rvqs, indices)))

    def get_output_from_indices(self, indices):
        outputs = tuple(rvq.get_output_from_indices(i) for rvq, i in zip(self.rvqs, indices))
        return torch.cat(outputs, dim=self.split_dim)

    def forward(self, x, indices=None, return_all_codes=False, sample_codebook_temp=None, freeze_codebook=False,
                mask=None):
        if indices is not None and len(indices) > 0:
            raise _unsupported("forward(indices=...)", "see ResidualVQ.forward")
        if x.shape[self.split_dim] != self.dim:
            raise ValueError(f"expected {self.dim} features on dim {self.split_dim}, got {tuple(x.shape)}")
        if self.check_finite:
            check_finite_rows("GroupedResidualVQ", x, self.split_dim)
        chunks = x.chunk(self.groups, dim=self.split_dim)
        # vector-quantize-pytorch draws this seed in every training forward, dropout or not: mirrored so
        # seeded runs stay in step.
        seed = _maybe_sync_seed(x.device) if self.training else None
        out = tuple(rvq(chunk, return_all_codes=return_all_codes, sample_codebook_temp=sample_codebook_temp,
                        mask=mask, freeze_codebook=freeze_codebook, rand_quantize_dropout_fixed_seed=seed)
                    for rvq, chunk in zip(self.rvqs, chunks))
        quantized, all_indices, commit_losses, *maybe_all_codes = tuple(zip(*out))
        return (torch.cat(quantized, dim=self.split_dim), torch.stack(all_indices), torch.stack(commit_losses),
                *maybe_all_codes)
