"""Record vector-quantize-pytorch's behaviour on a fixed set of small seeded cases, so vqfast.nn can be
tested against it where the package is not installed (tests/nn/test_recorded_expectations.py).

    .venv/bin/python scripts/record_vq_expectations.py            # writes tests/data/vq_pytorch_expectations.pt

Each case holds everything needed to replay it without vector-quantize-pytorch: the layer's class
name and keyword arguments, the forward keyword arguments, the input and the output-gradient
weights, the initial state_dict (vector-quantize-pytorch's own initialization), the seed set before
the forward; and what vector-quantize-pytorch produced in one training step: quantized output,
indices, loss, the input's and the parameters' gradients, and the state_dict after the step.
The file loads with ``torch.load(..., weights_only=True)``.

``CASES`` and ``training_step`` are also what the test replays, so the two cannot drift apart.
"""
from __future__ import annotations

import argparse
import importlib.metadata
from pathlib import Path

import torch

OUTPUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "vq_pytorch_expectations.pt"
FORMAT_VERSION = 1

B, N, DIM, K = 2, 8, 16, 16

# name -> (layer class in vector_quantize_pytorch / vqfast.nn, constructor kwargs, forward kwargs,
#          input shape). Small on purpose: the whole file stays well under 300 KB.
CASES = {
    "vq_ema": ("VectorQuantize", dict(dim=DIM, codebook_size=K, decay=0.8, commitment_weight=1.), {}, (B, N, DIM)),
    "vq_ema_dead_code": ("VectorQuantize", dict(dim=DIM, codebook_size=K, threshold_ema_dead_code=2), {},
                         (B, N, DIM)),
    "vq_learnable": ("VectorQuantize", dict(dim=DIM, codebook_size=K, learnable_codebook=True, ema_update=False),
                     {}, (B, N, DIM)),
    "vq_cosine": ("VectorQuantize", dict(dim=DIM, codebook_size=K, use_cosine_sim=True), {}, (B, N, DIM)),
    "vq_heads_separate": ("VectorQuantize", dict(dim=DIM, codebook_size=K, heads=2, separate_codebook_per_head=True,
                                                 codebook_dim=8), {}, (B, N, DIM)),
    "vq_heads_shared": ("VectorQuantize", dict(dim=DIM, codebook_size=K, heads=2, codebook_dim=4), {}, (B, N, DIM)),
    "vq_codebook_dim": ("VectorQuantize", dict(dim=DIM, codebook_size=K, codebook_dim=4, rotation_trick=False),
                        {}, (B, N, DIM)),
    "vq_image_fmap_orthogonal": ("VectorQuantize", dict(dim=DIM, codebook_size=K, accept_image_fmap=True,
                                                        orthogonal_reg_weight=10., orthogonal_reg_max_codes=8),
                                 {}, (B, DIM, 4, 4)),
    "vq_lens": ("VectorQuantize", dict(dim=DIM, codebook_size=K), dict(lens=torch.tensor([N, 5])), (B, N, DIM)),
    "vq_stochastic": ("VectorQuantize", dict(dim=DIM, codebook_size=K, stochastic_sample_codes=True,
                                             sample_codebook_temp=0.05), {}, (B, N, DIM)),
    "rvq": ("ResidualVQ", dict(dim=DIM, num_quantizers=3, codebook_size=K), {}, (B, N, DIM)),
    "rvq_codebook_dim_dropout": ("ResidualVQ", dict(dim=DIM, num_quantizers=3, codebook_size=K, codebook_dim=8,
                                                    quantize_dropout=True), {}, (B, N, DIM)),
    "grvq": ("GroupedResidualVQ", dict(dim=DIM, groups=2, num_quantizers=2, codebook_size=K), {}, (B, N, DIM)),
}


def _clone_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def training_step(layer: torch.nn.Module, x: torch.Tensor, out_grad: torch.Tensor, forward_kwargs: dict,
                  seed: int) -> dict:
    """One training-mode forward and backward of ``(quantized * out_grad).sum() + loss.sum()``;
    returns the outputs, gradients and state after it."""
    layer.train()
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    quantized, indices, loss = layer(x, **forward_kwargs)[:3]
    ((quantized * out_grad).sum() + loss.sum()).backward()
    return dict(
        quantized=quantized.detach().clone(),
        indices=indices.clone(),
        loss=loss.detach().clone(),
        input_grad=x.grad.clone(),
        param_grads={n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None},
        state_after=_clone_state(layer),
    )


def record() -> dict:
    """Run every case through vector-quantize-pytorch; returns the recording (nothing written)."""
    import vector_quantize_pytorch

    cases = {}
    for i, (name, (cls_name, kwargs, forward_kwargs, shape)) in enumerate(CASES.items()):
        torch.manual_seed(1000 + i)
        layer = getattr(vector_quantize_pytorch, cls_name)(**kwargs)
        initial = _clone_state(layer)
        x = torch.randn(shape)
        out_grad = None
        seed = 2000 + i
        with torch.no_grad():  # the output's shape, for the gradient weights
            probe = getattr(vector_quantize_pytorch, cls_name)(**kwargs)
            probe.load_state_dict(initial)
            probe.eval()
            out_grad = torch.randn(probe(x, **forward_kwargs)[0].shape)
        result = training_step(layer, x, out_grad, forward_kwargs, seed)
        cases[name] = dict(layer=cls_name, kwargs=kwargs, forward_kwargs=forward_kwargs, input=x, out_grad=out_grad,
                           seed=seed, initial_state=initial, **result)
    return dict(format=FORMAT_VERSION, vector_quantize_pytorch=importlib.metadata.version("vector-quantize-pytorch"),
                torch=torch.__version__.split("+")[0], cases=cases)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    recording = record()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(recording, args.output)
    print(f"{len(recording['cases'])} cases from vector-quantize-pytorch {recording['vector_quantize_pytorch']} "
          f"-> {args.output} ({args.output.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
