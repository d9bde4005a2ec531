"""Issue 7's commands: train-prior, sample, compress/decompress, rate-distortion, restore, train-superres, eval,
demo-apps. Tiny models and a few steps: they check behaviour (round trips, errors, tables), not quality."""
import json
import math
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from vqfast import codec
from vqfast.__main__ import main as vqfast_main
from vqfast.apps import compress, rate_distortion, restore
from vqfast.apps.codes import decode_sequences, image_codes, load_prior, unigram_entropy_bits

TINY = ["--crop-size", "16", "--batch-size", "4", "--channels", "16", "--res-channels", "8", "--num-res-blocks", "1",
        "--codebook-size", "32", "--codebook-dim", "8", "--held-out", "16", "--no-progress", "--no-tensorboard",
        "--lr", "2e-3", "--threads", "1"]
TINY_PRIOR = ["--num-crops", "64", "--held-out", "16", "--dim", "16", "--depth", "1", "--heads", "2",
              "--batch-size", "8", "--bench-samples", "2", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("apps")
    tok, prior = root / "tok", root / "tok" / "prior"
    assert vqfast_main(["train", *TINY, "--steps", "6", "--out", str(tok)]) == 0
    assert vqfast_main(["train-prior", "--tokenizer", str(tok), *TINY_PRIOR, "--steps", "12", "--out",
                        str(prior)]) == 0
    return root, tok, prior


@pytest.fixture(scope="module")
def loaded(runs):
    return load_prior(str(runs[2]))


def random_image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)


# -- train-prior / sample ----------------------------------------------------------------------------------


def test_train_prior_reports_nll_beside_log2k_and_unigram_entropy(runs, loaded):
    _, _, prior_dir = runs
    m = json.loads((prior_dir / "metrics.json").read_text())
    assert m["log2_K"] == pytest.approx(math.log2(32))
    assert 0 <= m["unigram_entropy_bits"] <= m["log2_K"] + 1e-9
    assert math.isfinite(m["val_bits_per_code"]) and m["val_bits_per_code"] > 0
    assert m["samples_per_s_cache"] > 0 and m["samples_per_s_no_cache"] > 0
    # The reported NLL is the prior's own cross-entropy on the held-out codes, recomputed here.
    prior, _, _, _ = loaded
    from safetensors.torch import load_file
    val = load_file(str(prior_dir / "codes.safetensors"))["val"]
    assert prior.bits_per_code(val) == pytest.approx(m["val_bits_per_code"], rel=1e-4)
    # The cached codes are the tokenizer's codes of the held-out crops (computed once, here again).
    from vqfast import data
    _, _, tok, _ = loaded
    again, grid = image_codes(tok, data.load("embedded", 16, 16).held_out)
    assert torch.equal(again, val) and tuple(grid) == (4, 4, 1)


def test_unigram_entropy_matches_a_direct_formula():
    codes = torch.randint(0, 7, (50, 9), generator=torch.Generator().manual_seed(3))
    p = np.bincount(codes.numpy().ravel(), minlength=7) / codes.numel()
    assert unigram_entropy_bits(codes, 7) == pytest.approx(float(-(p[p > 0] * np.log2(p[p > 0])).sum()))


def test_train_prior_resume_is_bit_identical(runs, tmp_path):
    from safetensors.torch import load_file
    _, tok, _ = runs
    # A constant learning rate: the cosine schedule depends on --steps, which differs between the runs.
    common = ["train-prior", "--tokenizer", str(tok), *TINY_PRIOR, "--bench-samples", "0", "--lr-decay", "none"]
    assert vqfast_main([*common, "--steps", "6", "--out", str(tmp_path / "full")]) == 0
    assert vqfast_main([*common, "--steps", "3", "--out", str(tmp_path / "half")]) == 0
    assert vqfast_main([*common, "--steps", "6", "--out", str(tmp_path / "half"), "--resume"]) == 0
    a = load_file(str(tmp_path / "full" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "half" / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_prior_rejects_bad_arguments(runs):
    with pytest.raises(ValueError, match="--steps"):
        vqfast_main(["train-prior", "--tokenizer", str(runs[1]), "--steps", "-1"])
    with pytest.raises(ValueError, match="does not exist"):
        vqfast_main(["train-prior", "--tokenizer", str(runs[0] / "nope")])
    with pytest.raises(ValueError, match="not a train-prior run|holds no"):
        load_prior(str(runs[1]))


def test_sample_writes_a_grid_of_decoded_samples(runs, loaded, tmp_path):
    out = tmp_path / "s.png"
    assert vqfast_main(["sample", "--prior", str(runs[2]), "--n", "4", "--scale", "1", "--top-k", "5",
                        "-o", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)   # 2 x 2 grid of 16 px tiles, 2 px padding
    prior, config, tok, _ = loaded
    codes = prior.sample(3, generator=torch.Generator().manual_seed(0))
    imgs = decode_sequences(tok, codes, config["grid"])
    assert imgs.shape == (3, 3, 16, 16) and 0 <= float(imgs.min()) and float(imgs.max()) <= 1


# -- compress / decompress ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(16, 16), (21, 37)])
def test_compress_round_trips_the_codes_bit_for_bit(loaded, shape):
    prior, config, tok, tok_cfg = loaded
    img = random_image(*shape, seed=shape[1])
    data = compress.compress_bytes(tok, tok_cfg, prior, config["grid"], img)
    codes, hd = compress.decompress_codes(tok, tok_cfg, prior, data)
    encoded, grid = compress.image_tile_codes(tok, img, hd["tile"])
    assert torch.equal(compress._tiles(codes, hd["tile"]), encoded)
    assert tuple(grid) == hd["grid"] and (hd["height"], hd["width"]) == shape
    image = compress.decompress_bytes(tok, tok_cfg, prior, data)
    assert image.shape == img.shape and image.dtype == torch.uint8
    assert torch.equal(image, codec.codes_to_image(tok, codes[..., 0], *shape))


def test_compressed_size_follows_the_priors_probabilities(loaded):
    """The payload costs about -sum log2 p(code) under the prior: a range coder adds a few words at most."""
    prior, config, tok, tok_cfg = loaded
    img = random_image(32, 48, seed=5)
    data = compress.compress_bytes(tok, tok_cfg, prior, config["grid"], img)
    seqs, _ = compress.image_tile_codes(tok, img, tuple(config["grid"]))
    with torch.no_grad():
        logp = torch.log_softmax(prior(seqs).double(), -1).gather(-1, seqs[..., None])
    nll_bits = float(-logp.sum() / math.log(2))
    payload_bits = 8 * (len(data) - compress.HEADER.size)
    assert nll_bits - 1 <= payload_bits <= nll_bits + 64 + 0.05 * nll_bits


def test_decompress_refuses_corrupt_truncated_and_foreign_files(runs, loaded, tmp_path):
    prior, config, tok, tok_cfg = loaded
    data = compress.compress_bytes(tok, tok_cfg, prior, config["grid"], random_image(16, 32, seed=9))
    flipped = bytearray(data)
    flipped[-1] ^= 0x10
    with pytest.raises(ValueError, match="CRC"):
        compress.decompress_bytes(tok, tok_cfg, prior, bytes(flipped))
    for cut in (0, 3, 4, 5, 20, compress.HEADER.size - 1, len(data) - 1):
        with pytest.raises(ValueError, match="truncated"):
            compress.decompress_bytes(tok, tok_cfg, prior, data[:cut])
    with pytest.raises(ValueError, match="not a vqfast code file"):
        compress.decompress_bytes(tok, tok_cfg, prior, b"PNG!" + data[4:])
    bad_method = bytearray(data)
    bad_method[5] = 7
    with pytest.raises(ValueError, match="method"):
        compress.decompress_bytes(tok, tok_cfg, prior, bytes(bad_method))
    other = type(prior)(**prior.config)                       # same shape, other weights
    with pytest.raises(ValueError, match="different prior"):
        compress.decompress_bytes(tok, tok_cfg, other.eval(), data)
    # A header claiming a payload that the CRC does cover but with an impossible grid.
    hdr = list(compress.HEADER.unpack_from(data))
    hdr[8] = hdr[8] + 1                                       # grid height no longer a multiple of the tile
    with pytest.raises(ValueError, match="corrupt header"):
        compress.decompress_bytes(tok, tok_cfg, prior, compress.HEADER.pack(*hdr) + data[compress.HEADER.size:])
    with pytest.raises(TypeError, match="uint8"):
        compress.compress_bytes(tok, tok_cfg, prior, config["grid"], torch.rand(3, 16, 16))


def test_compress_and_decompress_commands(runs, tmp_path):
    _, _, prior_dir = runs
    src = tmp_path / "in.png"
    Image.fromarray(random_image(20, 24, seed=2).permute(1, 2, 0).numpy()).save(src)
    for method in ("prior", "raw"):
        f, out = tmp_path / f"{method}.vqf", tmp_path / f"{method}.png"
        assert vqfast_main(["compress", str(src), "--prior", str(prior_dir), "-o", str(f), "--method", method]) == 0
        assert f.read_bytes()[4] == (2 if method == "prior" else 1)
        assert vqfast_main(["decompress", str(f), "--prior", str(prior_dir), "-o", str(out),
                            "--reference", str(src)]) == 0
        with Image.open(out) as im:
            assert im.size == (24, 20)


# -- rate-distortion ---------------------------------------------------------------------------------------


def test_matched_quality_is_the_highest_that_fits():
    img = random_image(48, 48, seed=1)
    for fmt in ("JPEG", "WEBP"):
        budget = rate_distortion.pillow_round_trip(img, fmt, 40)[0]
        q, size, dec = rate_distortion.matched_quality(img, fmt, budget)
        assert size <= budget and q >= 40 and dec.shape == img.shape
        hi = rate_distortion.PILLOW_FORMATS[fmt][1]
        if q < hi:
            assert rate_distortion.pillow_round_trip(img, fmt, q + 1)[0] > budget


def test_rate_distortion_table_has_the_four_methods(loaded, tmp_path):
    prior, config, tok, tok_cfg = loaded
    images = rate_distortion.held_out_images("embedded", max_side=32)
    table, curves = rate_distortion.rate_distortion(tok, tok_cfg, prior, config["grid"], images[:2],
                                                    curve_qualities=(10, 50))
    assert list(table) == ["raw indices", "prior-coded indices", "JPEG (matched bpp)", "WebP (matched bpp)"]
    raw = codec.encode_bytes(tok, tok_cfg, images[0][1])
    assert table["raw indices"]["per_image"][0]["bpp"] == pytest.approx(8 * len(raw) / 32 ** 2)
    # Same codes, same picture: raw and prior-coded differ only in their size.
    assert table["raw indices"]["psnr_db"] == pytest.approx(table["prior-coded indices"]["psnr_db"])
    for label in ("JPEG (matched bpp)", "WebP (matched bpp)"):
        for r, p in zip(table[label]["per_image"], table["prior-coded indices"]["per_image"]):
            assert r["bpp"] <= p["bpp"] + 1e-9 or r["quality"] == min(rate_distortion.PILLOW_FORMATS[
                "JPEG" if label.startswith("JPEG") else "WEBP"])
    rate_distortion.plot_psnr_bpp(str(tmp_path / "rd.png"), table, curves)
    with Image.open(tmp_path / "rd.png") as im:
        assert im.size[0] > 100


# -- restoration -------------------------------------------------------------------------------------------


def test_restoration_table_and_degradations(loaded):
    _, _, tok, _ = loaded
    clean = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 0.6 + 0.2
    row, noisy, restored = restore.restoration_table(tok, clean, "denoise", sigma=0.05)
    # No clamping bites at this level: the noisy input's PSNR is that of the noise, 20 log10(1 / sigma).
    assert row["input"]["psnr_db"] == pytest.approx(20 * math.log10(1 / 0.05), abs=0.5)
    assert set(row) == {"input", "restored"} and restored.shape == clean.shape
    up = restore.bicubic_input(clean, 4)
    assert up.shape == clean.shape and not torch.equal(up, clean)
    with pytest.raises(ValueError, match="scale"):
        restore.bicubic_input(clean, 3)
    with pytest.raises(ValueError, match="task"):
        restore.restoration_table(tok, clean, "inpaint")


def test_restore_and_train_superres_commands(runs, tmp_path, capsys):
    _, tok, _ = runs
    sr = tmp_path / "sr"
    assert vqfast_main(["train-superres", *TINY, "--scale", "2", "--steps", "3", "--out", str(sr)]) == 0
    m = json.loads((sr / "metrics.json").read_text())
    assert set(m["superres_x2"]) == {"input", "restored"}
    src = tmp_path / "lr.png"
    Image.fromarray(random_image(10, 14, seed=8).permute(1, 2, 0).numpy()).save(src)
    assert vqfast_main(["restore", "--task", "superres", "--tokenizer", str(sr), str(src), "-o",
                        str(tmp_path / "hr.png")]) == 0
    with Image.open(tmp_path / "hr.png") as im:
        assert im.size == (28, 20)
    assert vqfast_main(["restore", "--task", "denoise", "--tokenizer", str(tok), "--held-out", "8", "-o",
                        str(tmp_path / "side.png")]) == 0
    out = capsys.readouterr().out
    assert "gain" in out and "denoise" in out and (tmp_path / "side.png").is_file()
    with pytest.raises(ValueError, match="not a super-resolution tokenizer"):
        vqfast_main(["restore", "--task", "superres", "--tokenizer", str(tok)])


# -- eval, demo ------------------------------------------------------------------------------------------


def test_eval_without_weights_names_them_and_skips_fid(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VQFAST_INCEPTION_WEIGHTS", raising=False)
    _, tok, _ = runs
    assert vqfast_main(["eval", str(tok), "--held-out", "8", "--json", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    assert "FID/IS skipped" in out and "pt_inception" in out and "LPIPS skipped" in out
    m = json.loads((tmp_path / "e.json").read_text())
    assert "fid" not in m and "lpips" not in m
    assert {"psnr_db", "ssim", "codebook_usage_pct", "perplexity"} <= set(m)
    with pytest.raises(ValueError, match="--lpips-weights"):
        vqfast_main(["eval", str(tok), "--lpips-weights", str(tmp_path / "missing.pth")])


def test_demo_apps_quick_runs_end_to_end(tmp_path, capsys):
    assert vqfast_main(["demo-apps", "--quick", "--threads", "1", "--out", str(tmp_path), "--tokenizer-steps", "4",
                        "--prior-steps", "4", "--superres-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "identical to the encoded ones: True" in out and "WebP (matched bpp)" in out and "superres x4" in out
    s = json.loads((tmp_path / "summary.json").read_text())
    assert set(s) >= {"prior", "rate_distortion", "restoration"}
    for f in ("samples.png", "rd.png", "denoise.png"):
        assert (tmp_path / f).is_file()


def test_digits_is_the_embedded_mnist_stand_in():
    from sklearn.datasets import load_digits

    from vqfast import data
    d = data.load("digits", 16, held_out_limit=32)
    assert d.channels == 1 and d.held_out.shape == (32, 1, 16, 16) and len(d.train) == 1797 - 1797 // 5
    # Held-out images are the last digits, upsampled: shrinking back gives the 8 x 8 originals.
    small = torch.nn.functional.interpolate(d.held_out[:4], size=(8, 8), mode="area")
    orig = torch.from_numpy(load_digits().images[-(1797 // 5):][:4]).float()[:, None] / 16
    assert float((small - orig).abs().mean()) < 0.08
    with pytest.raises(ValueError, match="digits"):
        data.load("mnist", 16)


def test_residual_tokenizer_codes_round_trip_through_prior_and_file(tmp_path):
    """Residual quantizers: the sequence is the grid read in raster order, stage fastest."""
    tok, prior_dir = tmp_path / "rtok", tmp_path / "rprior"
    assert vqfast_main(["train", *TINY, "--quantizer", "residual", "--num-quantizers", "2", "--steps", "2",
                        "--out", str(tok)]) == 0
    assert vqfast_main(["train-prior", "--tokenizer", str(tok), *TINY_PRIOR, "--steps", "2", "--bench-samples", "0",
                        "--out", str(prior_dir)]) == 0
    prior, config, tk, tk_cfg = load_prior(str(prior_dir))
    assert config["grid"] == [4, 4, 2] and prior.seq_len == 32
    img = random_image(16, 32, seed=11)
    data = compress.compress_bytes(tk, tk_cfg, prior, config["grid"], img)
    codes, hd = compress.decompress_codes(tk, tk_cfg, prior, data)
    direct = codec.image_to_codes(tk, img)                     # (h, w, Q)
    assert torch.equal(codes, direct.long())
    assert torch.equal(compress.decompress_bytes(tk, tk_cfg, prior, data), codec.codes_to_image(tk, direct, 16, 32))


@pytest.mark.slow  # builds Inception v3 and VGG16 (~35 s on the shared CPU box)
def test_eval_with_weight_files_reports_lpips_and_fid(runs, tmp_path, monkeypatch):
    """The plumbing with stand-in networks (random weights from local files): what eval computes when the
    user supplies the real files."""
    from vqfast import evaluation
    from vqfast.apps import evaluate
    from vqfast.checkpoint import save_state_dict
    from vqfast.losses.lpips import LPIPS
    torch.manual_seed(0)
    save_state_dict(LPIPS().state_dict(), tmp_path / "lpips.safetensors")     # net.* and lin*: a full LPIPS
    net = evaluation.build_inception(None, random_init=True, size=75)
    monkeypatch.setattr(evaluation, "inception_or_none", lambda path: (net, ""))
    m, messages = evaluate.evaluate(str(runs[1]), held_out=6, lpips_weights=str(tmp_path / "lpips.safetensors"),
                                    inception_weights="given")
    assert messages == []
    # Random calibration weights may be negative: only finiteness says the path ran.
    assert math.isfinite(m["lpips"]) and m["lpips"] != 0 and math.isfinite(m["fid"]) and m["inception_score"] > 0


def test_superres_output_is_input_plus_decoded_detail():
    """The super-resolution model adds its decoded codes to the bicubic input: with a decoder whose
    last layer outputs 0 the result is the input exactly; with any decoder, input + detail."""
    from vqfast.apps import restore
    from vqfast.models import VQVAE

    torch.manual_seed(0)
    model = VQVAE(channels=16, res_channels=8, num_res_blocks=1, downsample=4, codebook_size=16, embed_dim=8)
    images = restore.bicubic_input(torch.rand(3, 3, 16, 16), 2)
    plain = restore.through_codes(model, images)
    with_input = restore.through_codes(model, images, residual=True)
    torch.testing.assert_close(with_input, (images + (plain * 2 - 1) / 2).clamp(0, 1), atol=1e-5, rtol=0)
    last = model.get_last_layer()
    with torch.no_grad():
        last.zero_()
        for m in model.modules():  # and the bias of the layer that weight belongs to
            if getattr(m, "weight", None) is last and getattr(m, "bias", None) is not None:
                m.bias.zero_()
    torch.testing.assert_close(restore.through_codes(model, images, residual=True), images.clamp(0, 1))
