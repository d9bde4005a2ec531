"""The Triton residual search's two paths, through the interpreter on CPU tensors:
the resident kernel (D <= MAX_RESIDENT_D: the residual tile stays on chip for
all stages) and the per-stage fallback above it, on both sides of the bound.
tests/ops/test_residual.py covers the op across backends; this file covers the
D boundary of vqfast/triton/residual_nearest_code.py, which that grid does not reach.

Each stage is judged as a nearest_code search of r_q (tests.checks.assert_nearest,
float64 distances from the definition), with r_q rebuilt along the path the
kernel chose in the accumulation dtype: the kernel's residual, bit for bit.
"""
import pytest
import torch

import vqfast
from tests.checks import assert_nearest

triton_mod = pytest.importorskip("vqfast.triton.residual_nearest_code")


def _require_triton():
    st = vqfast.backends()["triton"]
    if not st.available:
        pytest.skip(f"triton backend unavailable: {st.reason}")


def _check(z, cbs, metric, idx, dist):
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    assert idx.shape == dist.shape == (z.shape[0], cbs.shape[0]) and dist.dtype == acc
    r = z.to(acc)
    for q in range(cbs.shape[0]):
        assert_nearest(r, cbs[q], metric, idx[:, q], dist[:, q])
        r = r - cbs[q][idx[:, q]].to(acc)


@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_both_sides_of_the_resident_bound(metric, dtype):
    _require_triton()
    bound = triton_mod.MAX_RESIDENT_D
    g = torch.Generator().manual_seed(7)
    for d in (bound, bound + 1):
        z = torch.randn(6, d, generator=g).to(dtype)
        cbs = (torch.randn(3, 5, d, generator=g) * torch.tensor([1.0, 0.5, 0.25])[:, None, None]).to(dtype)
        idx, dist = vqfast.residual_nearest_code(z, cbs, metric=metric, backend="triton")
        _check(z, cbs, metric, idx, dist)
        i_ref, d_ref = vqfast.residual_nearest_code(z, cbs, metric=metric, backend="torch")
        assert torch.equal(idx, i_ref)


def test_fallback_ties_take_the_lowest_index():
    _require_triton()
    d = triton_mod.MAX_RESIDENT_D + 8
    base = torch.randn(2, 3, d)
    cbs = torch.cat([base, base], dim=1)  # code j and j + 3 identical in both stages
    idx, _ = vqfast.residual_nearest_code(torch.randn(5, d), cbs, backend="triton")
    assert int(idx.max()) < 3
