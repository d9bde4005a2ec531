"""vector-quantize-pytorch's ResidualVQ / GroupedResidualVQ README examples (its tests/test_readme.py), plus
examples of implicit_neural_codebook, quant_grad_frac and mask in the same style, each run unchanged twice:
with ``from vector_quantize_pytorch import ...`` and with the import pointed at ``vqfast.nn``. Same seed,
same initial state (the constructors draw the same numbers): same shapes and the same numbers.

The argument lists are the README's; the inputs have fewer tokens (128, not 1024; 16 with per-row neural
codes) to keep the run short, except k-means init, which needs as many tokens as codes.

vector-quantize-pytorch's rotation-trick output is the chosen code only up to rounding, so its later stages
can pick another code on a near-tie (a few rows in a thousand). Rows whose codes all agree are compared
to TOL; the codebook state is compared to TOL except at the codes such rows picked; losses, a mean over
every row, to a looser tolerance when some row differs.
"""
import re
import textwrap

import pytest
import torch

from tests.nn.compare import TOL

pytest.importorskip("vector_quantize_pytorch")

EXAMPLES = {
    "residual_vq": """
        import torch
        from vector_quantize_pytorch import ResidualVQ

        residual_vq = ResidualVQ(
            dim = 256,
            num_quantizers = 8,      # specify number of quantizers
            codebook_size = 1024,    # codebook size
        )

        x = torch.randn(1, 128, 256)

        quantized, indices, commit_loss = residual_vq(x)
        quantized, indices, commit_loss, all_codes = residual_vq(x, return_all_codes = True)
    """,
    "residual_vq_stochastic_shared": """
        import torch
        from vector_quantize_pytorch import ResidualVQ

        residual_vq = ResidualVQ(
            dim = 256,
            num_quantizers = 8,
            codebook_size = 1024,
            stochastic_sample_codes = True,
            sample_codebook_temp = 0.1,         # temperature for stochastically sampling codes, 0 would be equivalent to non-stochastic
            shared_codebook = True              # whether to share the codebooks for all quantizers or not
        )

        x = torch.randn(1, 128, 256)
        quantized, indices, commit_loss = residual_vq(x)
    """,
    "grouped_residual_vq": """
        import torch
        from vector_quantize_pytorch import GroupedResidualVQ

        residual_vq = GroupedResidualVQ(
            dim = 256,
            num_quantizers = 8,      # specify number of quantizers
            groups = 2,
            codebook_size = 1024,    # codebook size
        )

        x = torch.randn(1, 128, 256)

        quantized, indices, commit_loss = residual_vq(x)
    """,
    "residual_vq_kmeans_init": """
        import torch
        from vector_quantize_pytorch import ResidualVQ

        residual_vq = ResidualVQ(
            dim = 256,
            codebook_size = 256,
            num_quantizers = 4,
            kmeans_init = True,   # set to True
            kmeans_iters = 10     # number of kmeans iterations to calculate the centroids for the codebook on init
        )

        x = torch.randn(1, 1024, 256)
        quantized, indices, commit_loss = residual_vq(x)
    """,
    # per-row neural codes make a (tokens x codebook_size x dim) tensor: 16 tokens, not 1024
    "residual_vq_implicit_neural_codebook": """
        import torch
        from vector_quantize_pytorch import ResidualVQ

        residual_vq = ResidualVQ(
            dim = 256,
            codebook_size = 256,
            num_quantizers = 4,
            implicit_neural_codebook = True,   # QINCo, https://arxiv.org/abs/2401.14732
            mlp_kwargs = dict(depth = 2)
        )

        x = torch.randn(1, 16, 256)
        quantized, indices, commit_loss = residual_vq(x)
    """,
    "residual_vq_quant_grad_frac": """
        import torch
        from vector_quantize_pytorch import ResidualVQ

        residual_vq = ResidualVQ(
            dim = 256,
            num_quantizers = 8,
            codebook_size = 1024,
            quant_grad_frac = 0.5,      # how much gradient each layer's quantized output passes to the next residual
            rotation_trick = False
        )

        x = torch.randn(1, 128, 256, requires_grad = True)
        quantized, indices, commit_loss = residual_vq(x)
        (quantized.sum() + commit_loss.sum()).backward()
        x_grad = x.grad
    """,
    "residual_vq_mask": """
        import torch
        from vector_quantize_pytorch import ResidualVQ

        residual_vq = ResidualVQ(
            dim = 256,
            num_quantizers = 8,
            codebook_size = 1024,
        )

        x = torch.randn(2, 64, 256)
        mask = torch.ones(2, 64, dtype = torch.bool)
        mask[1, 32:] = False        # padding
        quantized, indices, commit_loss = residual_vq(x, mask = mask)
    """,
}
KMEANS_EXAMPLES = {"residual_vq_kmeans_init"}
# 10 k-means iterations over 1024 tokens per stage: ~45 s on a loaded 2-core box
SLOW_EXAMPLES = {"residual_vq_kmeans_init"}
# the variables each example leaves behind that hold its results
RESULTS = ("quantized", "indices", "commit_loss", "all_codes", "x_grad")

IMPORT = re.compile(r"^from vector_quantize_pytorch import ", re.MULTILINE)


def run_example(source: str, use_vqfast: bool, seed: int = 0) -> dict:
    source = textwrap.dedent(source)
    if use_vqfast:
        source, count = IMPORT.subn("from vqfast.nn import ", source)
        assert count == 1
    namespace = {}
    torch.manual_seed(seed)
    exec(compile(source, "<readme example>", "exec"), namespace)
    return namespace




def stage_indices(indices: torch.Tensor, grouped: bool):
    """(state_dict prefix, indices (rows, Q)) per ResidualVQ."""
    if not grouped:
        return [("", indices.reshape(-1, indices.shape[-1]))]
    return [(f"rvqs.{g}.", i.reshape(-1, i.shape[-1])) for g, i in enumerate(indices)]


def assert_rows_close(a, b, rows_agree, name):
    """a, b (..., rows..., d) whose row dims flatten like rows_agree; compared where rows agree."""
    lead = a.shape[:a.ndim - 1 - rows_agree.ndim]
    a = a.reshape(*lead, rows_agree.numel(), a.shape[-1])[..., rows_agree.flatten(), :]
    b = b.reshape(*lead, rows_agree.numel(), b.shape[-1])[..., rows_agree.flatten(), :]
    torch.testing.assert_close(b, a, **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_EXAMPLES else n
                                  for n in EXAMPLES])
def test_readme_example_matches(name):
    ref = run_example(EXAMPLES[name], use_vqfast=False)
    ours = run_example(EXAMPLES[name], use_vqfast=True)
    grouped = "Grouped" in type(ours["residual_vq"]).__name__
    assert type(ours["residual_vq"]).__module__.startswith("vqfast.nn")
    assert torch.equal(ours["x"], ref["x"])  # the same draws up to the forward
    for key in RESULTS:
        assert (key in ref) == (key in ours), key
        if key in ref:
            assert ours[key].shape == ref[key].shape and ours[key].dtype == ref[key].dtype, key

    ia, ib = ref["indices"], ours["indices"]
    if name in KMEANS_EXAMPLES:
        # k-means assigns rows by distance, and both libraries' float32 distances round differently: on a
        # residual (stage >= 1), whose distances to the sampled means are concentrated, a few rows land in
        # another cluster, and the iterations carry that on. Stage 0 (the raw input) must match exactly;
        # later stages must reach a loss of the same size.
        assert torch.equal(ib[..., 0], ia[..., 0])
        for key, a in ref["residual_vq"].layers[0].state_dict().items():
            b = ours["residual_vq"].layers[0].state_dict()[key]
            torch.testing.assert_close(b.to(a.dtype), a, **TOL, msg=lambda m: f"layers.0.{key}: {m}")
        torch.testing.assert_close(ours["commit_loss"][..., 0], ref["commit_loss"][..., 0], **TOL)
        torch.testing.assert_close(ours["commit_loss"], ref["commit_loss"], rtol=0.1, atol=0)
        return
    # rows (b, n) whose codes agree at every stage (and every group)
    differs = (ia != ib).any(-1)
    rows_agree = ~(differs.any(0) if grouped else differs)
    assert rows_agree.double().mean().item() > 0.99, "codes differ on more than near-ties would explain"
    assert_rows_close(ref["quantized"], ours["quantized"], rows_agree, "quantized")
    if "all_codes" in ref:
        assert_rows_close(ref["all_codes"], ours["all_codes"], rows_agree, "all_codes")
    if "x_grad" in ref:
        assert_rows_close(ref["x_grad"], ours["x_grad"], rows_agree, "x.grad")
    loss_tol = TOL if bool(rows_agree.all()) else dict(rtol=2e-2, atol=1e-5)
    torch.testing.assert_close(ours["commit_loss"], ref["commit_loss"], **loss_tol)

    ref_state, our_state = ref["residual_vq"].state_dict(), ours["residual_vq"].state_dict()
    assert list(our_state) == list(ref_state)
    skip = {}  # state name prefix -> codes picked by a disagreeing row
    for prefix, (ra, rb) in zip((p for p, _ in stage_indices(ia, grouped)),
                                zip((i for _, i in stage_indices(ia, grouped)),
                                    (i for _, i in stage_indices(ib, grouped)))):
        bad = (ra != rb).any(-1)
        for q in range(ra.shape[-1]):
            codes = torch.cat((ra[bad, q], rb[bad, q]))
            skip[f"{prefix}layers.{q}._codebook."] = codes[codes >= 0].unique()
    for key, a in ref_state.items():
        b = our_state[key]
        if not a.is_floating_point():
            assert torch.equal(b, a), key
            continue
        codes = next((c for p, c in skip.items() if key.startswith(p)), None)
        if codes is not None and codes.numel() and a.ndim >= 2:  # (1, K, ...) codebook tensors
            keep = torch.ones(a.shape[1], dtype=torch.bool)
            keep[codes] = False
            a, b = a[:, keep], b[:, keep]
        torch.testing.assert_close(b, a, **TOL, msg=lambda m: f"{key}: {m}")
