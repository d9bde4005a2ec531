"""ResidualVQ's fused path (one vqfast.residual_nearest_code search for every stage, then each stage
finished from its indices) against the stage-by-stage loop (``fused = False``) and against
vector-quantize-pytorch: indices, outputs, losses, input and parameter gradients, and the codebook
state after several training steps; plus when the loop must run instead (``loop_reason``)."""
import pytest
import torch

import vqfast.nn.residual_vq as residual_vq_module
from tests.nn.compare import TOL, assert_same_state
from vqfast.nn import GroupedResidualVQ, ResidualVQ

B, N, DIM, K, Q = 2, 8, 16, 32, 3

vqp = pytest.importorskip("vector_quantize_pytorch")


@pytest.fixture
def searches(monkeypatch):
    """Counts the fused searches ResidualVQ runs."""
    calls = []
    real = residual_vq_module.residual_nearest_code

    def counting(*args, **kwargs):
        calls.append(args[1].shape[0])  # the number of stages searched
        return real(*args, **kwargs)

    monkeypatch.setattr(residual_vq_module, "residual_nearest_code", counting)
    return calls


def make_three(grouped=False, **kw):
    """vector-quantize-pytorch's module, vqfast's fused one and vqfast's looped one, same state."""
    ref = (vqp.GroupedResidualVQ if grouped else vqp.ResidualVQ)(**kw)
    cls = GroupedResidualVQ if grouped else ResidualVQ
    fused, looped = cls(**kw), cls(**kw)
    fused.load_state_dict(ref.state_dict())
    looped.load_state_dict(ref.state_dict())
    for rvq in (looped.rvqs if grouped else [looped]):
        rvq.fused = False
    return ref, fused, looped


def search_codebooks(model):
    """The codebooks as the next search sees them: (G, Q, K, d)."""
    rvqs = model.rvqs if hasattr(model, "rvqs") else [model]
    return torch.stack([rvq.codebooks.detach().clone() for rvq in rvqs])


def first_split_is_near_tie(ia, ib, x_rows, codebooks, cosine):
    """Where two runs' codes (rows, Q) differ, the first differing stage's two codes must be equally
    near (float64, relative 1e-5) to the residual both runs share up to there."""
    differ = (ia != ib)
    for row in differ.any(-1).nonzero().flatten().tolist():
        q = int(differ[row].nonzero()[0])
        cb = codebooks[q].double()
        r = x_rows[row].double() - sum((codebooks[j].double()[ia[row, j]] for j in range(q)), torch.zeros_like(cb[0]))
        if cosine:
            d = -(cb @ (r / r.norm().clamp_min(1e-12)))
        else:
            d = (cb - r).pow(2).sum(-1)
        da, db = d[ia[row, q]], d[ib[row, q]]
        assert (da - db).abs() <= 1e-5 * (da.abs() + db.abs() + 1e-6), (row, q, float(da), float(db))


def assert_params_grads_close(a, b):
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert (pa.grad is None) == (pb.grad is None), name
        if pa.grad is not None:
            torch.testing.assert_close(pb.grad, pa.grad, **TOL, msg=lambda m: f"grad of {name}: {m}")


MODES = {
    "ema": dict(),
    "ema_dead_codes": dict(threshold_ema_dead_code=2, decay=0.5),
    "learnable": dict(learnable_codebook=True, ema_update=False),
    "cosine": dict(use_cosine_sim=True),
    "codebook_dim_ste": dict(codebook_dim=8, rotation_trick=False, commitment_weight=0.5),
    "quant_grad_frac": dict(quant_grad_frac=0.5, rotation_trick=False),
    "shared_codebook_ema": dict(shared_codebook=True),
    "quantize_dropout": dict(num_quantizers=4, quantize_dropout=True, quantize_dropout_cutoff_index=1),
    "orthogonal_reg": dict(orthogonal_reg_weight=0.1, learnable_codebook=True, ema_update=False),
}


def check_triple(ref, fused, looped, make_x, steps, grouped=False, fwd_of_step=lambda s: {}):
    """Training/eval steps on the same inputs and seeds: fused against looped and (unless ref is None)
    against vector-quantize-pytorch: indices, outputs, losses, input gradients, parameter gradients,
    state. Where codes differ, the split must be a float64 near-tie, and the run stops comparing."""
    models = {"fused": fused, "looped": looped}
    if ref is not None:
        models["ref"] = ref
    cosine = (fused.rvqs[0] if grouped else fused).layers[0]._codebook.use_cosine_sim
    for step in range(steps):
        x = make_x()
        fwd = fwd_of_step(step)
        before = search_codebooks(fused)
        gen = torch.Generator().manual_seed(100 + step)
        g = None
        results = {}
        for name, model in models.items():
            xx = x.clone().requires_grad_()
            torch.manual_seed(step)
            out = model(xx, **fwd)
            q, losses = out[0], out[2]
            if g is None:
                g, w = torch.randn(q.shape, generator=gen), torch.rand(losses.shape, generator=gen)
            total = q.new_zeros(())
            if q.requires_grad:
                total = total + (q * g).sum()
            if losses.requires_grad:
                total = total + (losses * w).sum()
            if total.requires_grad:
                total.backward()
            results[name] = (out, xx.grad)
        out_f, gf = results.pop("fused")
        i_f = out_f[1]
        for out_o, _ in results.values():
            assert out_o[1].shape == i_f.shape and out_o[1].dtype == i_f.dtype
        if not all(torch.equal(i_f, out_o[1]) for out_o, _ in results.values()):
            assert not grouped, "codes differ"  # (the near-tie check below reads one ResidualVQ)
            # a near-tie, searched with different rounding: check it is one
            x_rows = fused.layers[0]._channel_last_input(fused._project(fused.project_in, x))
            x_rows = x_rows.reshape(-1, fused.codebook_dim).detach()
            nq = i_f.shape[-1]
            for out_o, _ in results.values():
                first_split_is_near_tie(i_f.reshape(-1, nq), out_o[1].reshape(-1, nq), x_rows, before[0], cosine)
            pytest.skip("a near-tie split the codes; the rest of the run is no longer comparable")
        for name, (out_o, g_o) in results.items():
            assert len(out_o) == len(out_f)
            for a, b in zip(out_f, out_o):
                torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"fused vs {name}: {m}")
            assert out_f[2].requires_grad == out_o[2].requires_grad
            assert (gf is None) == (g_o is None)
            if gf is not None:
                torch.testing.assert_close(gf, g_o, **TOL, msg=lambda m: f"input grad, fused vs {name}: {m}")
            assert_same_state(models[name], fused)
            assert_params_grads_close(models[name], fused)
        for model in models.values():
            model.zero_grad()


@pytest.mark.parametrize("mode", list(MODES))
def test_fused_training_steps_match_loop_and_reference(mode, searches):
    kw = dict(dim=DIM, num_quantizers=Q, codebook_size=K)
    kw.update(MODES[mode])
    ref, fused, looped = make_three(**kw)
    steps = 3
    check_triple(ref, fused, looped, lambda: torch.randn(B, N, DIM), steps,
                 fwd_of_step=lambda s: dict(return_all_codes=s == 1, freeze_codebook=s == 2))
    assert len(searches) == steps  # every forward of the fused module searched once
    assert fused.loop_reason(torch.randn(B, N, fused.codebook_dim)) is None


def test_fused_eval_matches(searches):
    ref, fused, looped = make_three(dim=DIM, num_quantizers=Q, codebook_size=K, quantize_dropout=True)
    for m in (ref, fused, looped):
        m.eval()
    check_triple(ref, fused, looped, lambda: torch.randn(B, N, DIM), steps=2,
                 fwd_of_step=lambda s: dict(return_all_codes=True))
    assert searches == [Q, Q]  # no dropout in eval: every stage searched


def test_fused_mask_matches(searches):
    ref, fused, looped = make_three(dim=DIM, num_quantizers=Q, codebook_size=K, threshold_ema_dead_code=1)
    mask = torch.rand(B, N) > 0.3
    mask[:, 0] = True
    check_triple(ref, fused, looped, lambda: torch.randn(B, N, DIM), steps=2, fwd_of_step=lambda s: dict(mask=mask))
    assert len(searches) == 2


def test_fused_image_fmap_matches_loop(searches):
    # fused against the loop only: vector-quantize-pytorch 1.32.0's ResidualVQ fails in training on
    # channel-first maps (it concatenates the residuals as if channel-last)
    _, fused, looped = make_three(dim=DIM, num_quantizers=Q, codebook_size=K, accept_image_fmap=True)
    for step in range(2):
        x = torch.randn(B, DIM, 3, 4)
        g = torch.randn(x.shape)
        outs = []
        for model in (fused, looped):
            xx = x.clone().requires_grad_()
            torch.manual_seed(step)
            q, idx, losses, codes = model(xx, return_all_codes=True)
            ((q * g).sum() + losses.sum()).backward()
            outs.append((q, idx, losses, codes, xx.grad))
        (qf, i_f, lf, cf, gf), (ql, il, ll, cl, gl) = outs
        assert i_f.shape == (B, 3, 4, Q) and torch.equal(i_f, il)
        for a, b in ((qf, ql), (lf, ll), (cf, cl), (gf, gl)):
            torch.testing.assert_close(a, b, **TOL)
        assert_same_state(looped, fused)
    assert len(searches) == 2


def test_fused_quantize_dropout_searches_kept_stages_only(searches):
    ref, fused, looped = make_three(dim=DIM, num_quantizers=4, codebook_size=K, quantize_dropout=True)
    check_triple(ref, fused, looped, lambda: torch.randn(B, N, DIM), steps=4,
                 fwd_of_step=lambda s: dict(rand_quantize_dropout_fixed_seed=s, return_all_codes=True))
    for seed, stages in zip(range(4), searches):
        import random
        assert stages == random.Random(seed).randrange(0, 4) + 1


def test_fused_grouped_matches(searches):
    kw = dict(dim=DIM, groups=2, num_quantizers=2, codebook_size=K, quantize_dropout=True)
    ref, fused, looped = make_three(grouped=True, **kw)
    check_triple(ref, fused, looped, lambda: torch.randn(B, N, DIM), steps=2, grouped=True,
                 fwd_of_step=lambda s: dict(return_all_codes=True))
    assert len(searches) == 4  # two groups, two steps


def test_fused_double_input_matches_loop(searches):
    _, fused, looped = make_three(dim=DIM, num_quantizers=Q, codebook_size=K)
    fused.double(), looped.double()
    x = torch.randn(B, N, DIM, dtype=torch.float64)
    torch.manual_seed(0)
    qf, i_f, lf = fused(x)
    torch.manual_seed(0)
    ql, il, ll = looped(x)
    assert torch.equal(i_f, il)
    torch.testing.assert_close(qf, ql)
    torch.testing.assert_close(lf, ll, **TOL)  # the stages compute their losses in float32
    assert len(searches) == 1


LOOP_CASES = {
    "switched_off": (dict(), lambda m: setattr(m, "fused", False), "fused=False"),
    "implicit_neural_codebook": (dict(implicit_neural_codebook=True), None, "implicit_neural_codebook"),
    "sizes_differ": (dict(num_quantizers=None, codebook_size=(16, 32, 8)), None, "sizes differ"),
    "shared_dead_codes": (dict(shared_codebook=True, threshold_ema_dead_code=2), None, "shared codebook"),
    "kmeans_pending": (dict(kmeans_init=True, kmeans_iters=2, codebook_size=8), None, "k-means"),
    "stochastic": (dict(stochastic_sample_codes=True, sample_codebook_temp=0.5), None, "stochastic"),
    "straight_through": (dict(straight_through=True, rotation_trick=False), None, "straight_through"),
}


@pytest.mark.parametrize("case", list(LOOP_CASES))
def test_loop_runs_when_fusing_is_invalid(case, searches):
    kw, setup, reason = LOOP_CASES[case]
    model = ResidualVQ(**{**dict(dim=DIM, num_quantizers=Q, codebook_size=K), **kw})
    if setup is not None:
        setup(model)
    x = torch.randn(B, N, DIM)
    assert reason in model.loop_reason(x)
    model(x)
    assert searches == []


def test_half_input_loops():
    model = ResidualVQ(dim=DIM, num_quantizers=Q, codebook_size=K)
    assert "input" in model.loop_reason(torch.randn(B, N, DIM).half())


def test_shared_codebook_dead_codes_fuses_when_frozen_or_eval():
    model = ResidualVQ(dim=DIM, num_quantizers=Q, codebook_size=K, shared_codebook=True, threshold_ema_dead_code=2)
    x = torch.randn(B, N, DIM)
    assert model.loop_reason(x, freeze_codebook=True) is None
    model.eval()
    assert model.loop_reason(x) is None


def test_kmeans_init_fuses_after_the_first_step(searches):
    # fused against the loop only: vqfast's k-means and vector-quantize-pytorch's round their distances
    # differently, so on later stages' residuals a few rows join another cluster (tests/nn/test_readme_examples_rvq.py)
    _, fused, looped = make_three(dim=DIM, num_quantizers=Q, codebook_size=8, kmeans_init=True, kmeans_iters=2)
    check_triple(None, fused, looped, lambda: torch.randn(B, N, DIM), steps=3)
    assert len(searches) == 2  # step 0 initialized every codebook from its stage's residuals, in the loop
