"""vqfast.nn.ResidualVQ / GroupedResidualVQ against vector_quantize_pytorch's (same state, same
input, same random draws: same indices, outputs, losses, input gradients and buffers), plus the
unsupported-argument errors."""
import pytest
import torch

from tests.nn.compare import TOL, assert_same_state, backward_and_compare

from vqfast.nn import GroupedResidualVQ, ResidualVQ

B, N, DIM, K, Q = 2, 8, 16, 32, 3


def vqp():
    return pytest.importorskip("vector_quantize_pytorch")


def make_pair(grouped=False, **kw):
    cls_ref = vqp().GroupedResidualVQ if grouped else vqp().ResidualVQ
    cls_ours = GroupedResidualVQ if grouped else ResidualVQ
    ref, ours = cls_ref(**kw), cls_ours(**kw)
    ours.load_state_dict(ref.state_dict())  # strict: same names and shapes
    return ref, ours


def compare_step(ref, ours, x, seed=0, **fwd):
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(seed)
    out_r = ref(xr, **fwd)
    torch.manual_seed(seed)
    out_o = ours(xo, **fwd)
    assert len(out_r) == len(out_o)
    (qr, ir, lr), (qo, io, lo) = out_r[:3], out_o[:3]
    assert io.shape == ir.shape and io.dtype == ir.dtype
    assert torch.equal(io, ir)
    assert qo.shape == qr.shape and lo.shape == lr.shape
    torch.testing.assert_close(qo, qr, **TOL)
    torch.testing.assert_close(lo, lr, **TOL)
    assert lo.requires_grad == lr.requires_grad
    if qr.requires_grad or lr.requires_grad:
        backward_and_compare(ref, ours, xr, xo, (qr, lr), (qo, lo), weigh_losses=True)
    assert_same_state(ref, ours)
    return out_r, out_o


MODES = {
    "ema": dict(),
    "ema_dead_codes": dict(threshold_ema_dead_code=2, decay=0.5),
    "shared_codebook": dict(shared_codebook=True),
    "shared_codebook_dead": dict(shared_codebook=True, threshold_ema_dead_code=2),
    "learnable": dict(learnable_codebook=True, ema_update=False),
    "cosine": dict(use_cosine_sim=True),
    "codebook_dim_ste": dict(codebook_dim=8, rotation_trick=False, commitment_weight=0.5),
    "quant_grad_frac": dict(quant_grad_frac=0.5, rotation_trick=False),
    "sizes_tuple": dict(num_quantizers=None, codebook_size=(16, 32, 8)),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_training_steps_match(mode):
    kw = dict(dim=DIM, num_quantizers=Q, codebook_size=K)
    kw.update(MODES[mode])
    ref, ours = make_pair(**kw)
    # The second step runs on the codebooks the first one updated. Not for shared_codebook_dead: there
    # both the per-stage and the end-of-forward restarts sample the same input rows, so the codebook
    # holds duplicate codes (equal up to rounding) and which duplicate wins is float noise.
    steps = 1 if mode == "shared_codebook_dead" else 2
    for step in range(steps):
        compare_step(ref, ours, torch.randn(B, N, DIM), seed=step, return_all_codes=(step == 1))
        ref.zero_grad(), ours.zero_grad()


@pytest.mark.parametrize("mode", ["ema", "learnable", "cosine"])
def test_eval_matches(mode):
    kw = dict(dim=DIM, num_quantizers=Q, codebook_size=K, quantize_dropout=True)
    kw.update(MODES[mode])
    ref, ours = make_pair(**kw)
    ref.eval(), ours.eval()
    (_, ir, _, cr), (_, io, _, co) = compare_step(ref, ours, torch.randn(B, N, DIM), return_all_codes=True)
    assert (io >= 0).all()  # no dropout in eval
    torch.testing.assert_close(co, cr, **TOL)
    torch.testing.assert_close(ours.get_output_from_indices(io), ref.get_output_from_indices(ir), **TOL)


@pytest.mark.parametrize("fixed_seed", [None, 3])
def test_quantize_dropout_train_matches(fixed_seed):
    kw = dict(dim=DIM, num_quantizers=4, codebook_size=K, quantize_dropout=True, quantize_dropout_cutoff_index=1,
              quantize_dropout_multiple_of=2)
    ref, ours = make_pair(**kw)
    saw_drop = False
    for step in range(4):
        fwd = dict(return_all_codes=True, freeze_codebook=step % 2 == 1)
        if fixed_seed is not None:
            fwd["rand_quantize_dropout_fixed_seed"] = fixed_seed + step
        (qr, ir, lr, cr), (qo, io, lo, co) = compare_step(ref, ours, torch.randn(B, N, DIM), seed=step, **fwd)
        torch.testing.assert_close(co, cr, **TOL)
        dropped = (io == -1).all(dim=(0, 1))
        saw_drop |= bool(dropped.any())
        assert (lo[dropped] == 0).all() and (co[dropped] == 0).all()
        kept = int((~dropped).sum())
        assert not dropped[:kept].any() and kept % 2 == 0  # a prefix, a multiple of quantize_dropout_multiple_of
        if fwd["freeze_codebook"]:  # codebooks unchanged by the step: the output is the kept codes' sum
            torch.testing.assert_close(qo, co.sum(0), **TOL)
        ref.zero_grad(), ours.zero_grad()
    assert saw_drop or fixed_seed is None


def test_grouped_matches():
    kw = dict(dim=DIM, groups=2, num_quantizers=2, codebook_size=K, quantize_dropout=True)
    ref, ours = make_pair(grouped=True, **kw)
    for step in range(2):
        out_r, out_o = compare_step(ref, ours, torch.randn(B, N, DIM), seed=step, return_all_codes=True)
        for cr, co in zip(out_r[3], out_o[3]):
            torch.testing.assert_close(co, cr, **TOL)
        ref.zero_grad(), ours.zero_grad()
    ref.eval(), ours.eval()
    (_, ir, _), _ = compare_step(ref, ours, torch.randn(B, N, DIM))
    torch.testing.assert_close(ours.get_output_from_indices(ir), ref.get_output_from_indices(ir), **TOL)
    torch.testing.assert_close(ours.get_codes_from_indices(ir), ref.get_codes_from_indices(ir), **TOL)
    torch.testing.assert_close(ours.codebooks, ref.codebooks)


def test_mask_matches():
    ref, ours = make_pair(dim=DIM, num_quantizers=2, codebook_size=K)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, N // 2:] = False
    compare_step(ref, ours, torch.randn(B, N, DIM), mask=mask)


def test_state_dict_round_trip_both_ways():
    kw = dict(dim=DIM, num_quantizers=Q, codebook_size=K, codebook_dim=8, shared_codebook=True)
    ref, ours = make_pair(**kw)
    ours.train()
    ours(torch.randn(B, N, DIM))  # move ours' buffers away from the reference's
    ref2 = vqp().ResidualVQ(**kw)
    ref2.load_state_dict(ours.state_dict())
    assert_same_state(ref2, ours)
    ours2 = ResidualVQ(**kw)
    ours2.load_state_dict(ref2.state_dict())
    assert_same_state(ref2, ours2)
    # shared: one codebook module behind every stage, as in the reference
    assert all(layer._codebook is ours2.layers[0]._codebook for layer in ours2.layers)


def test_get_codes_from_coarse_indices():
    ref, ours = make_pair(dim=DIM, num_quantizers=Q, codebook_size=K, quantize_dropout=True)
    idx = torch.randint(0, K, (B, N, Q - 1))
    torch.testing.assert_close(ours.get_codes_from_indices(idx), ref.get_codes_from_indices(idx))
    torch.testing.assert_close(ours.get_output_from_indices(idx), ref.get_output_from_indices(idx))


@pytest.mark.parametrize("kw", [dict(heads=2), dict(diveq=True), dict(beam_size=2),
                                dict(implicit_neural_codebook=True, threshold_ema_dead_code=2),
                                dict(implicit_neural_codebook=True, accept_image_fmap=True),
                                dict(implicit_neural_codebook=True, kmeans_init=True)])
def test_unsupported_raise(kw):
    name = list(kw)[-1]
    with pytest.raises(NotImplementedError, match=name):
        ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=K, **kw)


IMPLICIT_MODES = {
    "rotation": dict(),
    "ste_small_mlp": dict(rotation_trick=False, mlp_kwargs=dict(depth=2, dim_hidden=8)),
    "dropout_projection": dict(quantize_dropout=True, codebook_dim=8),
    "shared": dict(shared_codebook=True, commitment_weight=0.5),
}


@pytest.mark.parametrize("mode", list(IMPLICIT_MODES))
def test_implicit_neural_codebook_matches(mode):
    # QINCo: per-stage code MLPs conditioned on the quantized-so-far; same parameter names (mlps.*)
    kw = dict(dim=DIM, num_quantizers=Q, codebook_size=K, implicit_neural_codebook=True, **IMPLICIT_MODES[mode])
    ref, ours = make_pair(**kw)
    assert ours.loop_reason(torch.randn(B, N, ours.codebook_dim)) is not None
    for step in range(2):
        compare_step(ref, ours, torch.randn(B, N, DIM), seed=step, return_all_codes=True)
        ref.zero_grad(), ours.zero_grad()
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, N // 2:] = False
    if "codebook_dim" not in kw:  # vector-quantize-pytorch's masked loss reads the unprojected input
        compare_step(ref, ours, torch.randn(B, N, DIM), seed=5, mask=mask)
        ref.zero_grad(), ours.zero_grad()
    ref.eval(), ours.eval()
    (_, ir, _, cr), (_, io, _, co) = compare_step(ref, ours, torch.randn(B, N, DIM), return_all_codes=True)
    torch.testing.assert_close(co, cr, **TOL)
    torch.testing.assert_close(ours.get_output_from_indices(io), ref.get_output_from_indices(ir), **TOL)


def test_unsupported_forward_indices():
    rvq = ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=K)
    with pytest.raises(NotImplementedError, match="indices"):
        rvq(torch.randn(B, N, DIM), indices=torch.zeros(B, N, 2, dtype=torch.long))
