"""vqfast.nn.VectorQuantize's stochastic code sampling (``stochastic_sample_codes``,
``sample_codebook_temp``) and weighted / accumulated EMA steps (``forward(ema_update_weight=...,
accum_ema_update=...)``): against vector_quantize_pytorch when installed (same seed on the CPU: the
same draws), and against properties that need no second library (the sampled frequencies follow
softmax(logits / T), accumulation equals one step on the joined batches, weight 0 freezes a code)."""
import pytest
import torch

import vqfast.nn.vector_quantize as vq_module
from tests.nn.compare import TOL, assert_same_param_grads, assert_same_state
from vqfast.nn import VectorQuantize
from vqfast.nn.vector_quantize import gumbel_sample_codes

B, N, DIM, K = 2, 12, 16, 32


def make_pair(**kw):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    ref = vqp.VectorQuantize(**kw)
    ours = VectorQuantize(**kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def step_both(ref, ours, x, seed, grad_input=True, **fwd):
    """One seeded forward + backward of both layers; asserts the same indices, outputs, loss, input
    and parameter gradients, buffers and pending (accumulated) statistics."""
    xr, xo = (x.clone().requires_grad_(grad_input) for _ in range(2))
    torch.manual_seed(seed)
    qr, ir, lr = ref(xr, **fwd)
    torch.manual_seed(seed)
    qo, io, lo = ours(xo, **fwd)
    assert torch.equal(io, ir)
    torch.testing.assert_close(qo, qr, **TOL)
    torch.testing.assert_close(lo, lr, **TOL)
    if lr.requires_grad or qr.requires_grad:
        g = torch.randn_like(qr)
        for q, loss in ((qr, lr), (qo, lo)):
            ((q * g).sum() + loss).backward()
        if grad_input:
            torch.testing.assert_close(xo.grad, xr.grad, **TOL)
        assert_same_param_grads(ref, ours)
    assert_same_state(ref, ours)
    for name in ("cluster_size", "embed_avg"):
        gr, go = getattr(ref._codebook, name).grad, getattr(ours._codebook, name).grad
        assert (gr is None) == (go is None), name
        if gr is not None:
            torch.testing.assert_close(go, gr, **TOL)
    return ir


# ---------------------------------------------------------------------------------------------
# stochastic_sample_codes
# ---------------------------------------------------------------------------------------------

SAMPLING_CASES = {
    "l2": dict(),
    "l2-hot": dict(sample_codebook_temp=5.0),
    "cosine-separate-heads": dict(use_cosine_sim=True, heads=2, separate_codebook_per_head=True, codebook_dim=8),
    "shared-heads-projection": dict(heads=2, codebook_dim=4, threshold_ema_dead_code=2),
    "learnable-st": dict(learnable_codebook=True, ema_update=False, rotation_trick=False),
}


@pytest.mark.parametrize("case", list(SAMPLING_CASES))
def test_sampling_matches_vq_pytorch_with_chunks(case, monkeypatch):
    # a few rows per chunk, so the chunked draw must line up with vector-quantize-pytorch's single one
    monkeypatch.setattr(vq_module, "_CE_CHUNK_ELEMS", 5 * K + 3)
    ref, ours = make_pair(dim=DIM, codebook_size=K, stochastic_sample_codes=True, **SAMPLING_CASES[case])
    nearest_differs = False
    for seed in range(3):
        x = torch.randn(B, N, DIM)
        with torch.no_grad():
            ours.eval()
            _, nearest, _ = ours(x)
            ours.train()
        idx = step_both(ref, ours, x, seed)
        nearest_differs |= not torch.equal(idx, nearest)
    assert nearest_differs, "sampling never left the nearest code: the test would not see it"


def test_sampling_temperature_override_and_eval_match_vq_pytorch():
    ref, ours = make_pair(dim=DIM, codebook_size=K, stochastic_sample_codes=True)
    step_both(ref, ours, torch.randn(B, N, DIM), seed=1, sample_codebook_temp=0.3)
    step_both(ref, ours, torch.randn(B, N, DIM), seed=2, sample_codebook_temp=0.)   # argmax
    ref.eval(), ours.eval()
    step_both(ref, ours, torch.randn(B, N, DIM), seed=3)                            # no sampling in eval


def test_gumbel_sample_is_chunk_invariant_and_bounded(monkeypatch):
    z, codebook = torch.randn(2, 50, 8), torch.randn(2, 7, 8)
    seen = []
    real = vq_module._code_logits

    def recording(zc, cb, cosine):
        out = real(zc, cb, cosine)
        seen.append(out.numel())
        return out

    torch.manual_seed(0)
    whole = gumbel_sample_codes(z, codebook, 0.7, cosine=False, chunk_elems=10 ** 6)
    monkeypatch.setattr(vq_module, "_code_logits", recording)
    torch.manual_seed(0)
    chunked = gumbel_sample_codes(z, codebook, 0.7, cosine=False, chunk_elems=3 * 7)
    assert torch.equal(whole, chunked)
    assert max(seen) <= 3 * 7 and len(seen) == 2 * 17


def test_sampling_follows_softmax_of_logits():
    """Every row the same vector: the code frequencies over many rows estimate softmax(logits / T)."""
    torch.manual_seed(0)
    k, m, temperature = 5, 40_000, 0.5
    codebook = torch.randn(1, k, 4)
    z = torch.randn(1, 1, 4).expand(1, m, 4).contiguous()
    idx = gumbel_sample_codes(z, codebook, temperature, cosine=False, chunk_elems=4096)
    freq = torch.bincount(idx.flatten(), minlength=k).double() / m
    logits = -torch.cdist(z[0, :1].double(), codebook[0].double())[0]
    expected = (logits / temperature).softmax(-1)
    # 6 standard errors of a binomial proportion: fails for a wrong temperature or sign, not by chance
    bound = 6 * (expected * (1 - expected) / m).sqrt() + 1e-4
    assert ((freq - expected).abs() <= bound).all(), (freq, expected)


def test_sampling_cosine_follows_softmax_of_dot():
    torch.manual_seed(1)
    k, m, temperature = 4, 40_000, 0.25
    codebook = torch.nn.functional.normalize(torch.randn(1, k, 3), dim=-1)
    z = torch.nn.functional.normalize(torch.randn(1, 1, 3), dim=-1).expand(1, m, 3).contiguous()
    idx = gumbel_sample_codes(z, codebook, temperature, cosine=True)
    freq = torch.bincount(idx.flatten(), minlength=k).double() / m
    expected = ((z[0, 0].double() @ codebook[0].double().t()) / temperature).softmax(-1)
    bound = 6 * (expected * (1 - expected) / m).sqrt() + 1e-4
    assert ((freq - expected).abs() <= bound).all(), (freq, expected)


def test_sampled_codes_drive_output_loss_and_ema():
    """Without vector-quantize-pytorch: output = the sampled code, loss = mse(code, x), EMA counts
    the sampled codes."""
    torch.manual_seed(3)
    vq = VectorQuantize(dim=DIM, codebook_size=K, stochastic_sample_codes=True, sample_codebook_temp=3.0,
                        decay=0.5)
    codebook = vq.codebook.clone()
    counts_before = vq._codebook.cluster_size.clone()
    x = torch.randn(B, N, DIM)
    q, idx, loss = vq(x)
    torch.testing.assert_close(q, codebook[idx])
    torch.testing.assert_close(loss, ((codebook[idx] - x) ** 2).mean())
    batch_counts = torch.bincount(idx.flatten(), minlength=K).float()
    torch.testing.assert_close(vq._codebook.cluster_size[0], 0.5 * counts_before[0] + 0.5 * batch_counts)


# ---------------------------------------------------------------------------------------------
# ema_update_weight, accum_ema_update
# ---------------------------------------------------------------------------------------------

WEIGHTS = {
    "tensor-K": lambda: torch.rand(K),
    "float": lambda: 0.3,
    "callable": lambda: (lambda embed_sum, cluster_size: (cluster_size > 0).float() * 0.5 + 0.1),
}


@pytest.mark.parametrize("weight", list(WEIGHTS))
def test_ema_update_weight_matches_vq_pytorch(weight):
    ref, ours = make_pair(dim=DIM, codebook_size=K, threshold_ema_dead_code=1)
    w = WEIGHTS[weight]()
    for seed in range(2):
        step_both(ref, ours, torch.randn(B, N, DIM), seed, ema_update_weight=w)


def test_ema_update_weight_per_head_matches_vq_pytorch():
    ref, ours = make_pair(dim=DIM, codebook_size=K, heads=2, separate_codebook_per_head=True, use_cosine_sim=True)
    step_both(ref, ours, torch.randn(B, N, DIM), 0, ema_update_weight=torch.rand(2, K))


@pytest.mark.parametrize("kw", [dict(), dict(threshold_ema_dead_code=2), dict(manual_ema_update=True),
                                dict(ema_update=False, threshold_ema_dead_code=1)])
def test_accum_ema_update_matches_vq_pytorch(kw):
    ref, ours = make_pair(dim=DIM, codebook_size=K, **kw)
    for seed, accum in enumerate([True, True, False, True, False]):
        weight = torch.rand(K) if seed == 2 else None
        step_both(ref, ours, torch.randn(B, N, DIM), seed, accum_ema_update=accum, ema_update_weight=weight)


def test_ema_update_weight_one_and_zero():
    torch.manual_seed(0)
    fused = VectorQuantize(dim=DIM, codebook_size=K)
    weighted = VectorQuantize(dim=DIM, codebook_size=K)
    weighted.load_state_dict(fused.state_dict())
    x = torch.randn(B, N, DIM)
    fused(x)
    weighted(x, ema_update_weight=torch.ones(K))
    assert_same_state(fused, weighted)              # weight 1: the fused step's result

    frozen = torch.zeros(K)
    frozen[::2] = 1.
    before = weighted._codebook.cluster_size.clone()
    _, idx, _ = weighted(torch.randn(B, N, DIM), ema_update_weight=frozen)
    after = weighted._codebook.cluster_size
    torch.testing.assert_close(after[0, 1::2], before[0, 1::2], rtol=0, atol=0)   # weight 0: untouched
    assert not torch.equal(after[0, ::2], before[0, ::2])


def test_accumulated_steps_equal_one_step_on_joined_batches():
    torch.manual_seed(0)
    accumulating = VectorQuantize(dim=DIM, codebook_size=K, decay=0.7)
    joined = VectorQuantize(dim=DIM, codebook_size=K, decay=0.7)
    joined.load_state_dict(accumulating.state_dict())
    state = {k: v.clone() for k, v in accumulating.state_dict().items()}
    x1, x2, x3 = (torch.randn(B, N, DIM) for _ in range(3))
    accumulating(x1, accum_ema_update=True)
    accumulating(x2, accum_ema_update=True)
    for name, value in accumulating.state_dict().items():   # nothing applied yet
        assert torch.equal(value, state[name]), name
    assert accumulating._codebook.cluster_size.grad.sum() == 2 * B * N
    accumulating(x3)
    joined(torch.cat([x1, x2, x3]))
    assert_same_state(joined, accumulating)
    assert accumulating._codebook.cluster_size.grad is None and accumulating._codebook.embed_avg.grad is None


def test_bad_ema_arguments_raise_before_work():
    vq = VectorQuantize(dim=DIM, codebook_size=K)
    x = torch.randn(B, N, DIM)
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    with pytest.raises(ValueError, match="ema_update_weight"):
        vq(x, ema_update_weight=torch.ones(K + 1))
    with pytest.raises(ValueError, match="ema_update_weight"):
        vq(x, ema_update_weight=torch.tensor(1.))
    with pytest.raises(TypeError, match="ema_update_weight"):
        vq(x, ema_update_weight="heavy")
    with pytest.raises(TypeError, match="ema_update_weight"):
        vq(x, ema_update_weight=torch.ones(K, dtype=torch.long))
    with pytest.raises(TypeError, match="accum_ema_update"):
        vq(x, accum_ema_update="yes")
    for name, value in vq.state_dict().items():
        assert torch.equal(value, state[name]), name
    with pytest.raises(ValueError, match="ema_update_weight"):
        vq(x, ema_update_weight=lambda embed_sum, cluster_size: torch.ones(3))
