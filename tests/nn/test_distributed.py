"""sync_codebook=True across two CPU processes (gloo): one codebook for the group, equal to a single
process that sees the concatenated batch, and no hang when a rank's batch is empty, fully masked,
of another length, or when a rank runs extra eval / no-grad forwards.

Every scenario runs in two spawned ranks (one spawn for all of them, to pay the start-up once);
a run that does not finish within its timeout kills its ranks and fails: a hang fails, never blocks.
The single-process reference runs here, with the same layer (sync_codebook=True outside a process
group is a group of one) and the same seed as rank 0 (rank 1 is seeded differently on purpose:
rank 0's state must win).
"""
from __future__ import annotations

import multiprocessing
import os
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch

import vqfast.nn.vector_quantize as vq_module
from tests.nn.compare import TOL
from vqfast.nn import ResidualVQ, VectorQuantize

DIM, N, STEPS = 8, 6, 4
RUN_TIMEOUT_S = 150          # the whole two-rank run (start-up included)
COLLECTIVE_TIMEOUT_S = 60    # gloo raises instead of waiting forever in a collective

# -- scenarios: (layer factory, per-step batch sizes per rank, options), shared by ranks and reference --


def _vq_heads():
    return VectorQuantize(dim=DIM, codebook_size=16, heads=2, separate_codebook_per_head=True, codebook_dim=4,
                          kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=3, decay=0.8,
                          sync_codebook=True)


def _vq_one():
    return VectorQuantize(dim=DIM, codebook_size=16, kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=3,
                          decay=0.8, sync_codebook=True)


def _vq_shared_heads_cosine():
    return VectorQuantize(dim=DIM, codebook_size=16, heads=2, codebook_dim=4, use_cosine_sim=True, threshold_ema_dead_code=2,
                          decay=0.8, sync_codebook=True)


def _rvq():
    return ResidualVQ(dim=DIM, codebook_size=16, num_quantizers=2, kmeans_init=True, kmeans_iters=3,
                      threshold_ema_dead_code=2, sync_codebook=True)


def _vq_learnable():
    return VectorQuantize(dim=DIM, codebook_size=16, learnable_codebook=True, ema_update=False,
                          rotation_trick=False, sync_codebook=True)


# batch sizes [rank 0, rank 1] per step; 0 is an empty batch; a negative size -b is a batch of b
# rows all masked out
SCENARIOS = {
    "heads_different_lengths": dict(make=_vq_heads, sizes=[[3, 5], [2, 6], [4, 1], [3, 3]]),
    "shared_heads_cosine": dict(make=_vq_shared_heads_cosine, sizes=[[2, 3]] * STEPS),
    "residual": dict(make=_rvq, sizes=[[2, 4], [3, 3], [1, 5], [2, 2]]),
    "empty_and_masked": dict(make=_vq_one, sizes=[[4, 0], [3, -3], [3, 2], [0, 4]]),
    "eval_and_no_grad_on_one_rank": dict(make=_vq_one, sizes=[[3, 3]] * STEPS, mode_mix=True),
    "learnable_mean_gradient": dict(make=_vq_learnable, sizes=[[3, 3]] * STEPS, optimizer=True),
    # inside DDP the gradient is averaged twice (the layer's hook, then DDP): the mean is unchanged
    "learnable_inside_ddp": dict(make=_vq_learnable, sizes=[[3, 3]] * STEPS, optimizer=True, ddp=True),
}


def _batch(step: int, sizes: list[int], rank: int | None):
    """Rank ``rank``'s share of step ``step``'s global batch (all of it for None), and its mask
    (None when nothing is masked); drawn from a private generator, so the global RNG (k-means,
    dead-code restarts) is consumed only by the layer."""
    gen = torch.Generator().manual_seed(1000 + step)
    parts = [torch.randn(abs(s), N, DIM, generator=gen) * 2 for s in sizes]
    masks = [torch.full((abs(s), N), s >= 0) for s in sizes]
    if rank is not None:
        parts, masks = parts[rank:rank + 1], masks[rank:rank + 1]
    x, mask = torch.cat(parts), torch.cat(masks)
    return x, (None if bool(mask.all()) else mask)


def _train(name: str, rank: int | None, seed: int, compiled: bool = False):
    """Run scenario ``name`` as rank ``rank`` (None: the single process seeing every rank's batch);
    returns the layer's state and the last step's indices."""
    spec = SCENARIOS[name]
    torch.manual_seed(seed)
    layer = spec["make"]().train()
    call = layer
    if spec.get("ddp") and rank is not None:
        call = torch.nn.parallel.DistributedDataParallel(layer)
    if compiled:
        call = torch.compile(call, backend="aot_eager")
    opt = torch.optim.SGD(layer.parameters(), lr=0.5) if spec.get("optimizer") else None
    indices = None
    for step, sizes in enumerate(spec["sizes"]):
        x, mask = _batch(step, sizes, rank)
        if spec.get("mode_mix") and rank == 1 and step == 1:  # extra evaluation on rank 1 only
            layer.eval()
            layer(x)
            layer.train()
        no_grad = spec.get("mode_mix") and rank == 1 and step == 2
        with torch.no_grad() if no_grad else torch.enable_grad():
            kwargs = {} if mask is None else dict(mask=mask)
            _, indices, loss = call(x.requires_grad_(), **kwargs)
        if opt is not None:
            opt.zero_grad()
            loss.backward()
            opt.step()
    if spec.get("mode_mix") and rank in (None, 0):  # rank 0 evaluates alone at the end
        layer.eval()
        layer(_batch(0, [3, 3], 0)[0])
    return {"state": {k: v.clone() for k, v in layer.state_dict().items()}, "indices": indices}


def _default_resolution(rank: int):
    """sync_codebook=None inside the group means True; False keeps each rank's own codebook."""
    torch.manual_seed(rank)
    default, local = VectorQuantize(dim=DIM, codebook_size=16), VectorQuantize(dim=DIM, codebook_size=16,
                                                                              sync_codebook=False)
    x = _batch(0, [4, 4], rank)[0]
    local(x)
    return {"default": default._codebook.sync_codebook, "local_sync": local._codebook.sync_codebook,
            "local_embed": local._codebook.embed.clone()}


def _rank0_kmeans(rank: int | None, seed: int):
    """sync_kmeans=False: k-means on rank 0's rows only (in eval: k-means init runs in any mode)."""
    torch.manual_seed(seed)
    layer = VectorQuantize(dim=DIM, codebook_size=16, kmeans_init=True, kmeans_iters=3, sync_codebook=True,
                           sync_kmeans=False).eval()
    layer(_batch(0, [5, 2], 0 if rank is None else rank)[0])
    return layer._codebook.embed.clone()


# -- the two-rank harness ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, jobs: list[str], out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        for job in jobs:
            try:
                if job == "default_resolution":
                    result = _default_resolution(rank)
                elif job == "rank0_kmeans":
                    result = _rank0_kmeans(rank, seed=rank)
                elif job.startswith("compiled:"):
                    result = _train(job.split(":", 1)[1], rank, seed=rank, compiled=True)
                else:
                    result = _train(job, rank, seed=rank)
            except Exception:
                result = {"error": traceback.format_exc()}
            torch.save(result, Path(out_dir) / f"{job.replace(':', '_')}.{rank}.pt")
            if isinstance(result, dict) and "error" in result:
                return  # the other rank may now wait in a collective: the harness times it out
    finally:
        dist.destroy_process_group()


def run_two_ranks(jobs: list[str], timeout_s: float = RUN_TIMEOUT_S) -> dict:
    """Run ``jobs`` in order on two spawned gloo ranks; {job: (rank 0 result, rank 1 result)} for the
    jobs both ranks finished. Ranks still running after ``timeout_s`` are killed."""
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_rank_main, args=(r, 2, port, jobs, out_dir), daemon=True) for r in range(2)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(timeout=max(deadline - time.monotonic(), 1))
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
            p.join()
        results = {}
        for job in jobs:
            files = [Path(out_dir) / f"{job.replace(':', '_')}.{r}.pt" for r in range(2)]
            if all(f.exists() for f in files):
                results[job] = tuple(torch.load(f, weights_only=False) for f in files)
        results["_hung"] = bool(hung)
    return results


def _outcome(results: dict, job: str):
    if job not in results:
        pytest.fail(f"{job}: the two ranks did not both finish (hang or crash; killed after the timeout)"
                    if results["_hung"] else f"{job}: a rank did not finish")
    r0, r1 = results[job]
    for rank, r in enumerate((r0, r1)):
        if isinstance(r, dict) and "error" in r:
            pytest.fail(f"{job}: rank {rank} raised:\n{r['error']}")
    return r0, r1


JOBS = list(SCENARIOS) + ["default_resolution", "rank0_kmeans"]


@pytest.fixture(scope="module")
def two_rank_results():
    return run_two_ranks(JOBS)


def _assert_states_identical(a: dict, b: dict):
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs between the ranks"


def _assert_matches_reference(got: dict, ref: dict):
    for name in ref:
        if ref[name].dtype == torch.bool:
            assert torch.equal(got[name], ref[name]), name
        else:
            torch.testing.assert_close(got[name], ref[name], **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_codebook_identical_across_ranks_and_equal_to_concatenated_batch(two_rank_results, name, monkeypatch):
    r0, r1 = _outcome(two_rank_results, name)
    _assert_states_identical(r0["state"], r1["state"])

    restarts = []
    expire = vq_module.expire_codes_

    def counting_expire(*args, **kwargs):
        restarts.append(expire(*args, **kwargs))
        return restarts[-1]

    monkeypatch.setattr(vq_module, "expire_codes_", counting_expire)
    ref = _train(name, None, seed=0)
    if any(k.endswith("cluster_size") for k in ref["state"]) and "learnable" not in name:
        assert sum(restarts) > 0, "the scenario should exercise dead-code restarts"
    _assert_matches_reference(r0["state"], ref["state"])
    # the last step's codes: rank 0's rows are the first rows of the concatenated batch
    b0 = r0["indices"].shape[0]
    assert torch.equal(r0["indices"], ref["indices"][:b0])
    assert torch.equal(r1["indices"], ref["indices"][b0:])


def test_rank_zero_seed_wins(two_rank_results):
    """Rank 1 is seeded differently, so its initial codebook differs; after training it holds rank
    0's (checked above); here: that the ranks really started apart."""
    torch.manual_seed(0)
    a = _vq_learnable()._codebook.embed.detach().clone()
    torch.manual_seed(1)
    b = _vq_learnable()._codebook.embed.detach().clone()
    assert not torch.equal(a, b)


def test_sync_codebook_default_and_opt_out(two_rank_results):
    r0, r1 = _outcome(two_rank_results, "default_resolution")
    assert r0["default"] is True and r1["default"] is True
    assert r0["local_sync"] is False
    assert not torch.equal(r0["local_embed"], r1["local_embed"]), "sync_codebook=False must keep per-rank codebooks"


def test_sync_kmeans_false_uses_rank_zero_rows(two_rank_results):
    r0, r1 = _outcome(two_rank_results, "rank0_kmeans")
    assert torch.equal(r0, r1)
    torch.testing.assert_close(r0, _rank0_kmeans(None, seed=0), **TOL)


def test_outside_a_process_group_sync_is_a_group_of_one():
    torch.manual_seed(0)
    synced = VectorQuantize(dim=DIM, codebook_size=16, sync_codebook=True, threshold_ema_dead_code=2)
    torch.manual_seed(0)
    plain = VectorQuantize(dim=DIM, codebook_size=16, sync_codebook=False, threshold_ema_dead_code=2)
    x = torch.randn(4, N, DIM)
    for layer in (synced, plain):
        torch.manual_seed(1)  # the same dead-code restart draws
        layer(x)
    torch.testing.assert_close(synced._codebook.embed, plain._codebook.embed, **TOL)


@pytest.mark.slow
def test_compiled_training_forward_syncs():
    """torch.compile(layer, backend="aot_eager"): the collectives run outside the graph
    (torch._dynamo.disable), the synced training steps equal the eager single process's."""
    job = "compiled:heads_different_lengths"
    results = run_two_ranks([job], timeout_s=300)
    r0, r1 = _outcome(results, job)
    _assert_states_identical(r0["state"], r1["state"])
    ref = _train("heads_different_lengths", None, seed=0)
    _assert_matches_reference(r0["state"], ref["state"])
