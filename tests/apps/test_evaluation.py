"""FID / IS plumbing on a randomly initialized FID Inception (the real weights cannot be
downloaded here): the Frechet distance against an independent float64 formula, the local
weights file path, and the message when no weights are given."""
import functools

import numpy as np
import pytest
import torch

pytest.importorskip("pytorch_fid")
pytest.importorskip("torchmetrics")

from vqfast import evaluation  # noqa: E402


@functools.lru_cache(maxsize=None)
def random_net():
    torch.manual_seed(0)
    return evaluation.build_inception(None, random_init=True, size=75)  # 75: the smallest input, 16x cheaper


def reference_frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """d^2 = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2), by eigendecomposition."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(sa)
    root_a = v @ torch.diag(w.clamp_min(0).sqrt()) @ v.T
    m = root_a @ sb @ root_a
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + sa.trace() + sb.trace() - 2 * tr_sqrt)


def test_frechet_distance_matches_reference_formula():
    torch.manual_seed(1)
    a = torch.randn(200, 6) @ torch.randn(6, 6)
    b = torch.randn(300, 6) @ torch.randn(6, 6) + 0.5
    ours = evaluation.frechet_distance(a, b)
    assert ours == pytest.approx(reference_frechet(a, b), rel=1e-6, abs=1e-8)
    assert evaluation.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        evaluation.frechet_distance(a[:1], b)


def test_fid_path_with_random_inception():
    net = random_net()
    torch.manual_seed(2)
    real, fake = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32).pow(3)
    fr, _ = evaluation.features(net, real, batch_size=4)
    ff, lf = evaluation.features(net, fake, batch_size=3)
    assert fr.shape == (4, 2048) and lf.shape == (4, 1008)
    fid = evaluation.frechet_distance(fr, ff)  # 4 samples in 2048-d: singular covariances, so only the
    assert np.isfinite(fid) and fid > 0          # plumbing is checked here; the formula is checked above
    # IS by its definition exp(E_x KL(p(y|x) || p(y))), one split
    p = lf.double().softmax(-1)
    one_split = float(torch.exp((p * (p.log() - p.mean(0, keepdim=True).log())).sum(-1).mean()))
    assert evaluation.inception_score(lf, splits=1)[0] == pytest.approx(one_split, rel=1e-4)
    out = evaluation.fid_and_is(real[:2], fake[:2], net)
    assert set(out) == {"fid", "inception_score", "inception_score_std"} and np.isfinite(out["fid"])


def test_local_weights_file_round_trip(tmp_path):
    net = random_net()
    path = tmp_path / evaluation.WEIGHTS_FILE
    torch.save(net.net.state_dict(), path)
    loaded, why = evaluation.inception_or_none(str(path))
    assert loaded is not None and why == "" and loaded.size == 299
    loaded.size = net.size
    x = torch.rand(2, 3, 40, 40)
    torch.testing.assert_close(loaded(x)[0], net(x)[0])


def test_no_weights_says_what_to_provide(monkeypatch, tmp_path):
    monkeypatch.delenv(evaluation.WEIGHTS_ENV, raising=False)
    net, why = evaluation.inception_or_none(None)
    assert net is None and evaluation.WEIGHTS_FILE in why and "--inception-weights" in why
    net, why = evaluation.inception_or_none(str(tmp_path / "missing.pth"))
    assert net is None and "not found" in why
    with pytest.raises(ValueError, match=evaluation.WEIGHTS_FILE):
        evaluation.build_inception(None)
