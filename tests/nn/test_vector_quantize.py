"""vqfast.nn.VectorQuantize against vector_quantize_pytorch.VectorQuantize (same state, same input,
same random draws: same indices, outputs, losses, gradients and buffers), plus hand-computed
expectations that need no second library, and the unsupported-argument errors."""
import inspect

import pytest
import torch

from tests.nn.compare import TOL, assert_same_state, backward_and_compare

from vqfast.nn import VectorQuantize
from vqfast.nn.vector_quantize import UNSUPPORTED_FORWARD_ARGS, UNSUPPORTED_INIT_ARGS, orthogonal_loss

B, N, DIM, K = 2, 16, 32, 64


def vqp():
    return pytest.importorskip("vector_quantize_pytorch")


# ---------------------------------------------------------------------------------------------
# against vector-quantize-pytorch
# ---------------------------------------------------------------------------------------------

def make_pair(**kw):
    ref = vqp().VectorQuantize(**kw)
    ours = VectorQuantize(**kw)
    ours.load_state_dict(ref.state_dict())  # strict: same names and shapes
    return ref, ours


def compare_step(ref, ours, x, seed=0, grad_input=True, **fwd):
    """One forward (+ backward when anything needs grad) of both layers on the same input with the
    same random state; returns both outputs."""
    xr = x.clone().requires_grad_(grad_input)
    xo = x.clone().requires_grad_(grad_input)
    torch.manual_seed(seed)
    out_r = ref(xr, **fwd)
    torch.manual_seed(seed)
    out_o = ours(xo, **fwd)
    qr, ir, lr = out_r[:3]
    qo, io, lo = out_o[:3]
    assert qo.shape == qr.shape and qo.dtype == qr.dtype
    assert io.shape == ir.shape and io.dtype == ir.dtype
    assert torch.equal(io, ir)
    torch.testing.assert_close(qo, qr, **TOL)
    torch.testing.assert_close(lo, lr, **TOL)
    assert lo.requires_grad == lr.requires_grad
    if qr.requires_grad or lr.requires_grad:
        backward_and_compare(ref, ours, xr, xo, (qr, lr), (qo, lo))
    assert_same_state(ref, ours)
    return out_r, out_o


MODES = {
    "ema_rotation": dict(),
    "ema_ste": dict(rotation_trick=False),
    "learnable_rotation": dict(learnable_codebook=True, ema_update=False),
    "learnable_ste": dict(learnable_codebook=True, ema_update=False, rotation_trick=False),
    "cosine": dict(use_cosine_sim=True),
    "cosine_ste_dead": dict(use_cosine_sim=True, rotation_trick=False, threshold_ema_dead_code=2),
    "heads_separate": dict(heads=2, separate_codebook_per_head=True),
    "heads_shared": dict(heads=2, separate_codebook_per_head=False),
    "heads_separate_proj": dict(heads=2, separate_codebook_per_head=True, codebook_dim=8),
    "heads_shared_proj_learnable": dict(heads=2, codebook_dim=8, learnable_codebook=True, ema_update=False),
    "codebook_dim": dict(codebook_dim=16),
    "codebook_dim_layernorm": dict(codebook_dim=16, layernorm_after_project_in=True),
    "dead_codes": dict(threshold_ema_dead_code=2, decay=0.5),
    "dead_codes_heads": dict(threshold_ema_dead_code=2, heads=2, separate_codebook_per_head=True),
    "dead_codes_learnable": dict(threshold_ema_dead_code=2, learnable_codebook=True, ema_update=False),
    "kmeans": dict(kmeans_init=True, kmeans_iters=3, codebook_size=16),
    "kmeans_cosine_heads": dict(kmeans_init=True, kmeans_iters=3, codebook_size=16, use_cosine_sim=True,
                                heads=2, separate_codebook_per_head=True, codebook_dim=8),
    "kmeans_fewer_rows": dict(kmeans_init=True, kmeans_iters=3, codebook_dim=16),  # 32 rows, 64 codes
    "orthogonal": dict(orthogonal_reg_weight=0.5),
    "orthogonal_active_max": dict(orthogonal_reg_weight=0.5, orthogonal_reg_active_codes_only=True,
                                  orthogonal_reg_max_codes=8, learnable_codebook=True, ema_update=False),
    "commitment_weight": dict(commitment_weight=0.25, decay=0.9, eps=1e-3),
    "no_commitment": dict(commitment_weight=0.),
    "manual_ema": dict(manual_ema_update=True, threshold_ema_dead_code=1),
    "sync_update_v": dict(learnable_codebook=True, ema_update=False, sync_update_v=0.5),
    "straight_through": dict(straight_through=True, rotation_trick=False),
}


@pytest.mark.filterwarnings("ignore:k-means init received")
@pytest.mark.parametrize("mode", list(MODES))
def test_training_steps_match(mode):
    kw = dict(dim=DIM, codebook_size=K)
    kw.update(MODES[mode])
    ref, ours = make_pair(**kw)
    for step in range(2):  # the second step runs on the codebook the first one updated
        compare_step(ref, ours, torch.randn(B, N, DIM), seed=step)
        for m in (ref, ours):
            m.zero_grad()


@pytest.mark.parametrize("mode", ["ema_rotation", "learnable_rotation", "cosine", "heads_shared", "codebook_dim",
                                  "orthogonal"])
def test_eval_matches(mode):
    kw = dict(dim=DIM, codebook_size=K)
    kw.update(MODES[mode])
    ref, ours = make_pair(**kw)
    ref.eval(), ours.eval()
    (_, _, lr), (qo, _, lo) = compare_step(ref, ours, torch.randn(B, N, DIM))
    assert float(lo) == 0.0 and not lo.requires_grad
    # a learnable codebook (or the orthogonal regularizer's parameter) still gets the output's gradient
    embed = ours._codebook.embed
    assert (embed.grad is not None) == ours._codebook.learnable_codebook
    if not ours.has_projections:
        assert qo.requires_grad == ours._codebook.learnable_codebook


@pytest.mark.parametrize("layout", ["image_fmap", "image_fmap_heads", "fmap_3d", "channel_first", "one_token",
                                    "one_token_heads"])
def test_layouts_match(layout):
    kw = dict(dim=DIM, codebook_size=K)
    shape = {"image_fmap": (B, DIM, 4, 4), "image_fmap_heads": (B, DIM, 4, 4), "fmap_3d": (B, DIM, 2, 2, 4),
             "channel_first": (B, DIM, N), "one_token": (8, DIM), "one_token_heads": (8, DIM)}[layout]
    kw.update({"image_fmap": dict(accept_image_fmap=True),
               "image_fmap_heads": dict(accept_image_fmap=True, heads=2, separate_codebook_per_head=True),
               "fmap_3d": dict(accept_3d_fmap=True), "channel_first": dict(channel_last=False),
               "one_token": dict(), "one_token_heads": dict(heads=2, codebook_dim=8)}[layout])
    ref, ours = make_pair(**kw)
    (_, ir, _), _ = compare_step(ref, ours, torch.randn(*shape))
    # codes from indices come back in the layer's layout
    assert_same_result(lambda m: m.get_codes_from_indices(ir), ref, ours)
    assert_same_result(lambda m: m.get_output_from_indices(ir), ref, ours)


def assert_same_result(fn, ref, ours):
    """fn(ours) equals fn(ref), or both raise (vector-quantize-pytorch's get_output_from_indices
    fails with channel-first codes and a projection, or a shared multi-head codebook)."""
    try:
        expected = fn(ref)
    except Exception:
        with pytest.raises(Exception):
            fn(ours)
        return
    torch.testing.assert_close(fn(ours), expected)


@pytest.mark.parametrize("heads,separate", [(1, False), (2, True), (2, False)])
def test_codes_from_indices(heads, separate):
    ref, ours = make_pair(dim=DIM, codebook_size=K, heads=heads, separate_codebook_per_head=separate,
                          codebook_dim=8)
    ours.eval()
    q, idx, _ = ours(torch.randn(B, N, DIM))
    assert_same_result(lambda m: m.get_codes_from_indices(idx), ref, ours)
    assert_same_result(lambda m: m.get_output_from_indices(idx), ref, ours)
    if heads == 1 or separate:
        torch.testing.assert_close(ours.get_output_from_indices(idx), q)
    assert ours.codebook.shape == ref.codebook.shape
    torch.testing.assert_close(ours.codebook, ref.codebook)


@pytest.mark.parametrize("case", ["mask", "lens", "mask_pass_input", "mask_cosine", "mask_heads_no_commit",
                                  "mask_learnable"])
def test_mask_matches(case):
    kw = dict(dim=DIM, codebook_size=K, threshold_ema_dead_code=1)
    kw.update({"mask": {}, "lens": {}, "mask_pass_input": dict(return_zeros_for_masked_padding=False),
               "mask_cosine": dict(use_cosine_sim=True), "mask_learnable": dict(learnable_codebook=True,
                                                                                 ema_update=False),
               "mask_heads_no_commit": dict(heads=2, separate_codebook_per_head=True, commitment_weight=0.)}[case])
    ref, ours = make_pair(**kw)
    lens = torch.tensor([N, N - 5])
    fwd = dict(lens=lens) if case == "lens" else dict(mask=torch.arange(N) < lens[:, None])
    for step in range(2):
        (_, ir, _), _ = compare_step(ref, ours, torch.randn(B, N, DIM), seed=step, **fwd)
        assert (ir[1, N - 5:] == -1).all()


def test_input_without_grad_matches():
    """The input needs no grad: no straight-through to it, but project_in still learns from the loss."""
    ref, ours = make_pair(dim=DIM, codebook_size=K, codebook_dim=16, orthogonal_reg_weight=0.1)
    compare_step(ref, ours, torch.randn(B, N, DIM), grad_input=False)
    assert ours.project_in.weight.grad is not None and ours._codebook.embed.grad is not None


def test_no_route_gradients_to_input_matches():
    ref, ours = make_pair(dim=DIM, codebook_size=K, route_gradients_to_input=False, learnable_codebook=True,
                          ema_update=False)
    compare_step(ref, ours, torch.randn(B, N, DIM))


@pytest.mark.parametrize("fwd", [dict(freeze_codebook=True), dict(ema_update=False), dict(return_loss_breakdown=True)],
                         ids=["freeze", "no_ema", "breakdown"])
def test_forward_options_match(fwd):
    ref, ours = make_pair(dim=DIM, codebook_size=K, threshold_ema_dead_code=2, orthogonal_reg_weight=0.1)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    out_r, out_o = compare_step(ref, ours, torch.randn(B, N, DIM), **fwd)
    if "freeze_codebook" in fwd:
        for k, v in ours.state_dict().items():
            assert torch.equal(v, before[k]), k
    if fwd.get("return_loss_breakdown"):
        assert type(out_o[3]).__name__ == "LossBreakdown" and out_o[3]._fields == out_r[3]._fields
        for a, b in zip(out_o[3], out_r[3]):
            torch.testing.assert_close(a, b, **TOL)


def test_freeze_codebook_constructor_learnable():
    """Frozen learnable codebook: the commitment loss is taken against the detached code."""
    ref, ours = make_pair(dim=DIM, codebook_size=K, learnable_codebook=True, ema_update=False, freeze_codebook=True)
    compare_step(ref, ours, torch.randn(B, N, DIM))
    assert ours._codebook.embed.grad is None


def ce_step(vq, x, targets, **fwd):
    x = x.clone().requires_grad_()
    q, loss = vq(x, indices=targets, **fwd)
    (loss + q.sum()).backward()
    return q, loss, x.grad


@pytest.mark.parametrize("kw", [dict(), dict(heads=2, separate_codebook_per_head=True, codebook_dim=8),
                                dict(heads=2, codebook_dim=8, use_cosine_sim=True),
                                dict(learnable_codebook=True, ema_update=False)],
                         ids=["one_head", "separate", "shared_cosine", "learnable"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cross_entropy_to_given_indices_matches(kw, training):
    ref, ours = make_pair(dim=DIM, codebook_size=K, **kw)
    ref.train(training), ours.train(training)
    shape = (B, N) if kw.get("heads", 1) == 1 else (B, N, 2)
    targets = torch.randint(0, K, shape)
    targets[0, 0] = -1  # ignored
    x = torch.randn(B, N, DIM)
    # vector-quantize-pytorch's cross-entropy gradient reads the codebook after its in-place EMA
    # update (the distance matmul saved a view of it); ours uses the codebook the forward used,
    # which is what it computes with the codebook frozen. Values and the update itself agree.
    qr, lr, gr = ce_step(ref, x, targets, freeze_codebook=True)
    qo, lo, go = ce_step(ours, x, targets)
    assert qo.shape == qr.shape
    torch.testing.assert_close(qo, qr, **TOL)
    torch.testing.assert_close(lo, lr, **TOL)
    torch.testing.assert_close(go, gr, **TOL)
    for (name, p), po in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(po.grad, p.grad, **TOL, msg=lambda m: f"grad of {name}: {m}")
    ref.zero_grad()
    ref_q, ref_l, _ = ce_step(ref, x, targets)  # now let vector-quantize-pytorch update too
    torch.testing.assert_close(ref_l, lo, **TOL)
    assert_same_state(ref, ours)


def test_cross_entropy_commitment_matches():
    ref, ours = make_pair(dim=DIM, codebook_size=K, commitment_use_cross_entropy_loss=True)
    mask = torch.arange(N) < torch.tensor([[N], [N - 3]])
    for fwd in (dict(), dict(mask=mask)):  # frozen: see test_cross_entropy_to_given_indices_matches
        compare_step(ref, ours, torch.randn(B, N, DIM), freeze_codebook=True, **fwd)
        ref.eval(), ours.eval()
        compare_step(ref, ours, torch.randn(B, N, DIM), **fwd)
        ref.train(), ours.train()


@pytest.mark.parametrize("kw", [dict(), dict(learnable_codebook=True, ema_update=False),
                                dict(heads=2, separate_codebook_per_head=True, codebook_dim=8, kmeans_init=True,
                                     codebook_size=16)],
                         ids=["ema", "learnable", "kmeans_heads"])
def test_state_dict_round_trip(kw):
    vq = vqp()
    kw = dict(dict(dim=DIM, codebook_size=K), **kw)
    ours = VectorQuantize(**kw)
    ours.train()
    ours(torch.randn(B, N, DIM))  # move the buffers (and run k-means) first
    ref = vq.VectorQuantize(**kw)
    ref.load_state_dict(ours.state_dict())
    assert_same_state(ref, ours)
    back = VectorQuantize(**kw)
    back.load_state_dict(ref.state_dict())
    assert_same_state(ref, back)
    assert bool(back._codebook.initted)
    # and both continue identically from the loaded state
    compare_step(ref, back, torch.randn(B, N, DIM))


@pytest.mark.parametrize("kw", [dict(threshold_ema_dead_code=2), dict(heads=2, separate_codebook_per_head=True,
                                                                   codebook_dim=8, threshold_ema_dead_code=2),
                                dict(use_cosine_sim=True, channel_last=False)],
                         ids=["one_head", "separate", "cosine_channel_first"])
def test_update_indices_and_expire_match(kw):
    """The maintenance entry points ResidualVQ-style callers use, on given indices."""
    ref, ours = make_pair(dim=DIM, codebook_size=K, **kw)
    x = torch.randn(B, DIM, N) if kw.get("channel_last", True) is False else torch.randn(B, N, DIM)
    shape = (B, N) if kw.get("heads", 1) == 1 else (B, N, 2)
    indices = torch.randint(0, K, shape)
    indices[0, :3] = -1
    mask = torch.arange(N) < torch.tensor([[N], [N - 4]])
    for m in (ref, ours):
        torch.manual_seed(1)
        m.update_indices(x, indices)
    assert_same_state(ref, ours)
    if kw.get("channel_last", True):
        for m in (ref, ours):
            torch.manual_seed(2)
            m.update_indices(x, indices, mask=mask)
        assert_same_state(ref, ours)
    # batch 1: with one head, vector-quantize-pytorch's expire_codes_ reads the batch axis as the
    # codebook axis and samples from the first batch item only
    codes_in = torch.randn(1, N, ours.codebook_dim * ours.heads)
    for m in (ref, ours):
        m._codebook.cluster_size[..., :5] = 0.  # dead
        torch.manual_seed(3)
        m.expire_codes_(codes_in)
    assert_same_state(ref, ours)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("mode", ["ema_rotation", "learnable_ste", "kmeans_cosine_heads"])
def test_backends_match(backend, mode):
    """Every vqfast backend that runs here drives the layer to the same result (small sizes: the
    Triton backend runs in its interpreter on the CPU)."""
    from tests.conftest import require_backend

    require_backend(backend)
    kw = dict(dim=8, codebook_size=8)
    kw.update(MODES[mode])
    kw["codebook_size"] = 8
    kw.pop("codebook_dim", None)
    ref, ours = make_pair(**kw)
    ours.backend = backend
    for step in range(2):
        compare_step(ref, ours, torch.randn(1, 8, 8), seed=step)


VQFAST_ONLY_ARGS = {"check_finite", "_chosen_indices"}


def test_signature_covers_vector_quantize_pytorch():
    """Every constructor / forward argument of vector-quantize-pytorch exists here, same default."""
    vq = vqp()
    for fn_ref, fn_ours in ((vq.VectorQuantize.__init__, VectorQuantize.__init__),
                            (vq.VectorQuantize.forward, VectorQuantize.forward)):
        ref_params = inspect.signature(fn_ref).parameters
        ours_params = inspect.signature(fn_ours).parameters
        # vqfast's own options come last, after every vector-quantize-pytorch argument
        extras = [n for n in ours_params if n not in ref_params]
        assert set(extras) <= VQFAST_ONLY_ARGS, extras
        assert list(ref_params) == [n for n in ours_params if n not in extras]
        for name, p in ref_params.items():
            assert ours_params[name].default == p.default or (p.default is ours_params[name].default), name


# ---------------------------------------------------------------------------------------------
# hand-computed expectations (no second library)
# ---------------------------------------------------------------------------------------------

def set_state(vq, embed, cluster_size=None, embed_avg=None):
    cb = vq._codebook
    with torch.no_grad():
        cb.embed.copy_(torch.tensor(embed, dtype=torch.float32).reshape(cb.embed.shape))
        cb.embed_avg.copy_(torch.tensor(embed_avg if embed_avg is not None else embed).reshape(cb.embed.shape))
        if cluster_size is not None:
            cb.cluster_size.copy_(torch.tensor(cluster_size).reshape(cb.cluster_size.shape))


def test_recorded_ema_step():
    """codes (0,0), (10,10); rows (1,1), (3,1) -> code 0 and (9,9) -> code 1; decay 1/2, eps 0:
    cluster_size = (1+2)/2, (1+1)/2 = 1.5, 1; embed_avg = ((0,0)+(4,2))/2, ((10,10)+(9,9))/2;
    codes = embed_avg / cluster_size. The output is taken before the update."""
    vq = VectorQuantize(dim=2, codebook_size=2, decay=0.5, eps=0.0, rotation_trick=False)
    set_state(vq, [[0., 0.], [10., 10.]], cluster_size=[1., 1.])
    x = torch.tensor([[[1., 1.], [3., 1.], [9., 9.]]], requires_grad=True)
    q, idx, loss = vq(x)
    assert idx.tolist() == [[0, 0, 1]]
    torch.testing.assert_close(q, torch.tensor([[[0., 0.], [0., 0.], [10., 10.]]]))
    torch.testing.assert_close(loss, torch.tensor(14. / 6.))  # (1+1 + 9+1 + 1+1) / 6
    cb = vq._codebook
    torch.testing.assert_close(cb.cluster_size, torch.tensor([[1.5, 1.]]))
    torch.testing.assert_close(cb.embed_avg, torch.tensor([[[2., 1.], [9.5, 9.5]]]))
    torch.testing.assert_close(cb.embed, torch.tensor([[[4. / 3., 2. / 3.], [9.5, 9.5]]]))
    loss.backward()  # straight-through: dloss/dx = 2 (x - q) / 6
    torch.testing.assert_close(x.grad, torch.tensor([[[1., 1.], [3., 1.], [-1., -1.]]]) / 3.)


def test_recorded_laplace_smoothing():
    """eps > 0: code = embed_avg / ((N_k + eps) / (n + K eps) * n)."""
    vq = VectorQuantize(dim=1, codebook_size=2, decay=0.0, eps=0.5)
    set_state(vq, [[0.], [10.]], cluster_size=[1., 1.])
    vq(torch.tensor([[[1.], [2.], [3.], [9.]]]))  # decay 0: N = (3, 1), embed_avg = (6, 9), n = 4
    smoothed = torch.tensor([(3 + .5) / (4 + 1.) * 4, (1 + .5) / (4 + 1.) * 4])  # 2.8, 1.2
    torch.testing.assert_close(vq._codebook.embed[0, :, 0], torch.tensor([6., 9.]) / smoothed)


def test_recorded_dead_code_restart():
    """code 1's count decays to 0.05 < threshold 1: it is restarted at the only row, with count 1."""
    vq = VectorQuantize(dim=2, codebook_size=2, decay=0.5, eps=0.0, threshold_ema_dead_code=1)
    set_state(vq, [[0., 0.], [100., 100.]], cluster_size=[5., 0.1], embed_avg=[[0., 0.], [100., 100.]])
    vq(torch.tensor([[[1., 2.]]]))
    cb = vq._codebook
    torch.testing.assert_close(cb.cluster_size, torch.tensor([[3., 1.]]))
    torch.testing.assert_close(cb.embed_avg, torch.tensor([[[.5, 1.], [1., 2.]]]))
    torch.testing.assert_close(cb.embed, torch.tensor([[[1. / 6., 1. / 3.], [1., 2.]]]))


def test_recorded_rotation_trick_gradient():
    """x = (1,0) -> code (0,2): u = (1,0), q = (0,1), lambda = 2, R the +90 degree rotation.
    dL/dx = lambda R^T g + 2 (x - e) / 2 = 2 (0,-1) + (1,-2) for g = (1,0)."""
    vq = VectorQuantize(dim=2, codebook_size=3)  # rotation trick is the default for dim > 1
    set_state(vq, [[0., 2.], [5., 5.], [-3., 0.]])
    x = torch.tensor([[[1., 0.]]], requires_grad=True)
    q, idx, loss = vq(x)
    assert idx.item() == 0
    torch.testing.assert_close(q, torch.tensor([[[0., 2.]]]))
    torch.testing.assert_close(loss, torch.tensor(2.5))
    ((q * torch.tensor([1., 0.])).sum() + loss).backward()
    torch.testing.assert_close(x.grad, torch.tensor([[[1., -4.]]]))


def test_recorded_cosine_and_eval():
    """Cosine: rows are compared (and committed) as unit vectors; eval: no update, zero loss."""
    vq = VectorQuantize(dim=2, codebook_size=2, use_cosine_sim=True, rotation_trick=False)
    set_state(vq, [[1., 0.], [0., 1.]])
    x = torch.tensor([[[3., 1.], [-1., 5.]]])
    q, idx, loss = vq(x)
    assert idx.tolist() == [[0, 1]]
    torch.testing.assert_close(q, torch.tensor([[[1., 0.], [0., 1.]]]))
    u = x / x.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(loss, ((u - q) ** 2).mean())
    vq.eval()
    before = vq._codebook.embed.clone()
    q2, idx2, loss2 = vq(x)
    assert float(loss2.detach()) == 0.0 and torch.equal(idx2, idx)
    assert torch.equal(vq._codebook.embed, before)


def test_recorded_learnable_codebook_gradients():
    """mse(code, x) with both sides live: dL/dx = 2 (x - e) / M, dL/de = -2 (x - e) / M."""
    vq = VectorQuantize(dim=2, codebook_size=2, learnable_codebook=True, ema_update=False, rotation_trick=False,
                        commitment_weight=2.0)
    set_state(vq, [[0., 0.], [4., 4.]])
    x = torch.tensor([[[1., 0.], [3., 5.]]], requires_grad=True)
    q, idx, loss = vq(x)
    assert idx.tolist() == [[0, 1]]
    torch.testing.assert_close(loss, torch.tensor(2.0 * (1 + 0 + 1 + 1) / 4))
    loss.backward()
    diff = torch.tensor([[1., 0.], [-1., 1.]])  # x - e
    torch.testing.assert_close(x.grad[0], 2.0 * 2 * diff / 4)
    torch.testing.assert_close(vq._codebook.embed.grad[0], -2.0 * 2 * diff / 4)


def test_recorded_orthogonal_loss():
    """Orthonormal codes: sum cos^2 = n (the diagonal), loss = n/n^2 - 1/n = 0;
    n equal codes: sum = n^2, loss = 1 - 1/n."""
    eye = torch.eye(4).unsqueeze(0) * 3.0
    torch.testing.assert_close(orthogonal_loss(eye), torch.tensor(0.0))
    same = torch.ones(1, 5, 3)
    torch.testing.assert_close(orthogonal_loss(same), torch.tensor(1.0 - 1.0 / 5))
    # against the definition, pair by pair, with more codes than dims and fewer
    for h, n, d in ((2, 6, 3), (1, 3, 5)):
        t = torch.randn(h, n, d, dtype=torch.float64)
        total = sum(float(torch.dot(t[k, i], t[k, j]) / (t[k, i].norm() * t[k, j].norm())) ** 2
                    for k in range(h) for i in range(n) for j in range(n))
        torch.testing.assert_close(orthogonal_loss(t), torch.tensor(total / (h * n * n) - 1 / n, dtype=torch.float64))


def test_recorded_state_dict_layout():
    """vector-quantize-pytorch's buffer names and shapes: (codebooks, K, codebook_dim)."""
    vq = VectorQuantize(dim=DIM, codebook_size=K, heads=2, separate_codebook_per_head=True, codebook_dim=8)
    shapes = {k: tuple(v.shape) for k, v in vq.state_dict().items()}
    assert shapes == {"project_in.weight": (16, DIM), "project_in.bias": (16,), "project_out.weight": (DIM, 16),
                      "project_out.bias": (DIM,), "_codebook.initted": (), "_codebook.cluster_size": (2, K),
                      "_codebook.embed_avg": (2, K, 8), "_codebook.embed": (2, K, 8)}
    plain = VectorQuantize(dim=DIM, codebook_size=K)
    assert set(plain.state_dict()) == {"_codebook.initted", "_codebook.cluster_size", "_codebook.embed_avg",
                                       "_codebook.embed"}
    assert isinstance(VectorQuantize(dim=DIM, codebook_size=K, learnable_codebook=True, ema_update=False)
                      ._codebook.embed, torch.nn.Parameter)


def test_recorded_kmeans_init():
    """Two tight clusters, two codes: k-means puts one code on each cluster mean."""
    vq = VectorQuantize(dim=2, codebook_size=2, kmeans_init=True, kmeans_iters=5, eps=0.0)
    assert not bool(vq._codebook.initted)
    x = torch.tensor([[[0., 0.], [0., 1.], [10., 10.], [10., 11.]]])
    vq.eval()
    _, idx, _ = vq(x)
    assert bool(vq._codebook.initted)
    codes = sorted(vq._codebook.embed[0].tolist())
    torch.testing.assert_close(torch.tensor(codes), torch.tensor([[0., .5], [10., 10.5]]))
    assert idx[0, 0] == idx[0, 1] != idx[0, 2] == idx[0, 3]


def test_autocast_keeps_fp32_buffers():
    vq = VectorQuantize(dim=DIM, codebook_size=K, codebook_dim=16)
    x = torch.randn(B, N, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, idx, loss = vq(x)
    for name in ("embed", "embed_avg", "cluster_size"):
        assert getattr(vq._codebook, name).dtype == torch.float32
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------
# unsupported arguments
# ---------------------------------------------------------------------------------------------

NON_DEFAULT = {
    "codebook_diversity_loss_weight": 0.1, "codebook_diversity_temperature": 10.0,
    "directional_reparam": True, "directional_reparam_variance": 1e-2, "sync_affine_param": True,
    "vq_bridge": torch.nn.Identity(), "in_place_codebook_optimizer": torch.optim.SGD,
    "manual_in_place_optimizer_update": True, "affine_param": True, "affine_param_batch_decay": 0.9,
    "affine_param_codebook_decay": 0.5,
}


def test_unsupported_list_is_complete():
    assert set(NON_DEFAULT) == set(UNSUPPORTED_INIT_ARGS)


@pytest.mark.parametrize("name", list(NON_DEFAULT))
def test_unsupported_constructor_args_raise(name):
    value = NON_DEFAULT[name]
    with pytest.raises(NotImplementedError, match=name):
        VectorQuantize(dim=DIM, codebook_size=K, **{name: value})


@pytest.mark.parametrize("name,value", [("topk", 2), ("codebook_transform_fn", lambda e: e)])
def test_unsupported_forward_args_raise(name, value):
    assert name in UNSUPPORTED_FORWARD_ARGS
    vq = VectorQuantize(dim=DIM, codebook_size=K)
    with pytest.raises(NotImplementedError, match=name):
        vq(torch.randn(B, N, DIM), **{name: value})


def test_unsupported_paths_raise():
    vq = VectorQuantize(dim=DIM, codebook_size=K, heads=2, codebook_dim=16)
    with pytest.raises(NotImplementedError, match="mask"):
        vq(torch.randn(B, N, DIM), mask=torch.ones(B, N, dtype=torch.bool))
    st = VectorQuantize(dim=DIM, codebook_size=K, codebook_dim=16, straight_through=True, rotation_trick=False)
    with pytest.raises(NotImplementedError, match="straight_through"):
        st(torch.randn(B, N, DIM))  # input without grad, projection with: the softmax path would matter
    # defaults of the unsupported arguments are accepted, as is sync_codebook=False
    VectorQuantize(dim=DIM, codebook_size=K, sync_codebook=False, sync_kmeans=False,
                   **{k: v for k, v in UNSUPPORTED_INIT_ARGS.items()})


def test_invalid_combinations_rejected():
    with pytest.raises(ValueError):
        VectorQuantize(dim=DIM, codebook_size=K, learnable_codebook=True)  # EMA on by default
    with pytest.raises(ValueError):
        VectorQuantize(dim=DIM, codebook_size=K, use_cosine_sim=True, learnable_codebook=True, ema_update=False)
    with pytest.raises(ValueError):
        VectorQuantize(dim=DIM, codebook_size=K, straight_through=True)  # rotation_trick defaults on
