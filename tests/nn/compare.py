"""Comparisons of a vqfast layer against the original package's layer, shared by the nn tests."""
import torch

TOL = dict(rtol=1e-4, atol=1e-5)


def assert_same_state(ref, ours):
    """Same state_dict names, and values equal to TOL (booleans exactly)."""
    a, b = ref.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    for name in a:
        if a[name].dtype == torch.bool:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(b[name], a[name], **TOL, msg=lambda m: f"{name}: {m}")


def assert_same_param_grads(ref, ours):
    """Same parameter names, the same ones with a gradient, gradients equal to TOL."""
    params_r, params_o = dict(ref.named_parameters()), dict(ours.named_parameters())
    assert list(params_r) == list(params_o)
    for name, p in params_r.items():
        po = params_o[name]
        assert (po.grad is None) == (p.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(po.grad, p.grad, **TOL, msg=lambda m: f"grad of {name}: {m}")


def backward_and_compare(ref, ours, xr, xo, ref_out, our_out, weigh_losses=False):
    """Backward of ``(quantized * g).sum() + loss`` through both layers (the same random g; with
    ``weigh_losses`` the losses are summed with the same random weights), then the same input
    gradients and parameter gradients, to TOL. ``*_out`` are ``(quantized, loss)`` pairs."""
    (qr, lr), (qo, lo) = ref_out, our_out
    g = torch.randn_like(qr)
    w = torch.rand_like(lr) if weigh_losses else None
    for q, l in ((qr, lr), (qo, lo)):
        total = (q * g).sum() if q.requires_grad else 0.
        if l.requires_grad:
            total = total + ((l * w).sum() if w is not None else l)
        total.backward()
    assert (xo.grad is None) == (xr.grad is None)
    if xr.grad is not None:
        torch.testing.assert_close(xo.grad, xr.grad, **TOL)
    assert_same_param_grads(ref, ours)
