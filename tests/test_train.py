"""`python -m vqfast train / encode / decode`, the embedded data set, metrics and the code file format.

All runs are tiny (16 x 16 crops, a 16-channel VQ-VAE): they check behaviour, not quality."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vqfast import codec, data, metrics
from vqfast.__main__ import main as vqfast_main
from vqfast.models.vqvae import VQVAE
from vqfast.train import build_model, load_model, model_config, build_parser

TINY = ["--crop-size", "16", "--batch-size", "4", "--channels", "16", "--res-channels", "8", "--num-res-blocks", "1",
        "--codebook-size", "32", "--codebook-dim", "8", "--held-out", "16", "--no-progress", "--no-tensorboard",
        "--lr", "2e-3", "--threads", "1"]


@pytest.fixture(scope="module")
def embedded():
    return data.load("embedded", 16, held_out_limit=16)


def run(out, *extra):
    assert vqfast_main(["train", *TINY, "--out", str(out), *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


# -- data ------------------------------------------------------------------------------------------------------


def test_embedded_data_is_real_photographs_with_a_disjoint_held_out_split(embedded):
    assert set(data.EMBEDDED_TRAIN).isdisjoint(data.EMBEDDED_HELD_OUT)
    assert len(embedded.train) == len(data.EMBEDDED_TRAIN) + 200 - data.LFW_HELD_OUT
    assert embedded.held_out.shape == (16, 3, 16, 16)
    b = embedded.batch(6, seed=1, step=3)
    assert b.shape == (6, 3, 16, 16) and 0 <= float(b.min()) and float(b.max()) <= 1
    assert float(b.std()) > 0.01                            # photographs, not blank crops
    # A pure function of (seed, step, rank): what makes resume bit-identical.
    torch.testing.assert_close(b, embedded.batch(6, seed=1, step=3), rtol=0, atol=0)
    for other in (embedded.batch(6, 1, 4), embedded.batch(6, 2, 3), embedded.batch(6, 1, 3, rank=1)):
        assert not torch.equal(b, other)


def test_image_folder_and_missing_torchvision_sets(tmp_path):
    from PIL import Image
    for i in range(4):
        Image.fromarray((np.random.rand(40, 48, 3) * 255).astype(np.uint8)).save(tmp_path / f"im{i}.png")
    ds = data.load(str(tmp_path), 16)
    assert len(ds.train) == 3 and ds.held_out.shape[1:] == (3, 16, 16)
    with pytest.raises(ValueError, match="does not exist"):
        data.load(str(tmp_path / "nope"), 16)
    with pytest.raises(ValueError, match="cifar10 not found"):
        data.load(f"cifar10:{tmp_path}", 32)


# -- metrics ---------------------------------------------------------------------------------------------------


def test_metrics_match_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    want = np.mean([peak_signal_noise_ratio(a.numpy(), b.numpy(), data_range=1.0) for a, b in zip(x, y)])
    assert metrics.psnr(y, x) == pytest.approx(want, rel=1e-9)
    want = np.mean([structural_similarity(a.permute(1, 2, 0).numpy(), b.permute(1, 2, 0).numpy(), data_range=1.0,
                                          channel_axis=-1) for a, b in zip(x, y)])
    assert metrics.ssim(y, x) == pytest.approx(want, rel=1e-9)
    assert metrics.ssim(x, x) == pytest.approx(1.0)
    assert metrics.bits_per_pixel(num_codes=64, codebook_size=512, num_pixels=32 * 32) == 64 * 9 / 1024
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(x, y[:1])


# -- codec -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 255, 256, 257, 1000, 65536])
def test_pack_unpack_round_trip(k):
    bits = codec.bits_for(k)
    idx = torch.randint(k, (101,)).numpy()
    packed = codec.pack_indices(idx, bits)
    assert len(packed) == (101 * bits + 7) // 8
    np.testing.assert_array_equal(codec.unpack_indices(packed, bits, 101), idx)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    m = run(out, "--steps", "3")
    return out, m


@pytest.mark.parametrize("quantizer", ["ema", "residual"])
def test_encode_decode_round_trip(tmp_path, quantizer):
    model = VQVAE(channels=16, res_channels=8, num_res_blocks=1, codebook_size=40, embed_dim=8, quantizer=quantizer,
                  num_quantizers=2 if quantizer == "residual" else 1)
    model(torch.rand(2, 3, 16, 16))                       # k-means init of the codebook
    config = {"model": "vqvae", "model_config": model.config}
    image = (torch.rand(3, 21, 30) * 255).to(torch.uint8)  # not a multiple of the grid: padded, then cropped
    blob = codec.encode_bytes(model, config, image)
    q = 2 if quantizer == "residual" else 1
    assert len(blob) == codec.HEADER.size + (6 * 8 * q * 6 + 7) // 8   # 24x32 grid of 6-bit codes
    decoded = codec.decode_bytes(model, config, blob)
    assert decoded.shape == image.shape and decoded.dtype == torch.uint8
    # What the file decodes to is the model's own reconstruction of the padded image.
    model.eval()
    x = torch.nn.functional.pad(image.float()[None] / 255 * 2 - 1, (0, 2, 0, 3), mode="replicate")
    with torch.no_grad():
        want = ((model(x)[0][0, :, :21, :30] + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)
    assert (decoded.int() - want.int()).abs().max() <= 1

    with pytest.raises(ValueError, match="CRC"):
        codec.decode_bytes(model, config, blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(ValueError, match="truncated"):
        codec.decode_bytes(model, config, blob[:-3])
    with pytest.raises(ValueError, match="truncated"):
        codec.decode_bytes(model, config, blob[:10])
    with pytest.raises(ValueError, match="not a vqfast code file"):
        codec.decode_bytes(model, config, b"XXXX" + blob[4:])
    other = VQVAE(**model.config)
    with pytest.raises(ValueError, match="different model"):
        codec.decode_bytes(other, config, blob)


def test_encode_decode_commands(trained, tmp_path, capsys):
    out, _ = trained
    from PIL import Image
    img = (np.random.rand(20, 28, 3) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "x.png")
    assert vqfast_main(["encode", str(tmp_path / "x.png"), "--checkpoint", str(out), "-o", str(tmp_path / "x.vqf")]) == 0
    assert "bits/pixel" in capsys.readouterr().out
    assert vqfast_main(["decode", str(tmp_path / "x.vqf"), "--checkpoint", str(out), "-o", str(tmp_path / "y.png"),
                        "--reference", str(tmp_path / "x.png")]) == 0
    assert "PSNR" in capsys.readouterr().out
    assert np.asarray(Image.open(tmp_path / "y.png")).shape == img.shape


# -- training --------------------------------------------------------------------------------------------------


def test_training_reduces_the_loss_and_writes_outputs(tmp_path, embedded):
    torch.manual_seed(0)
    args = build_parser().parse_args(TINY)
    untrained = build_model(*model_config(args, 3))
    untrained(embedded.batch(8, 0, 0) * 2 - 1)            # k-means init, as training's first step does
    before, _ = metrics.reconstruction_metrics(untrained, embedded.held_out)
    m = run(tmp_path, "--steps", "40", "--image-every", "20", "--checkpoint-every", "20")
    assert m["psnr_db"] > before["psnr_db"] + 1.0
    assert 0 < m["codebook_usage_pct"] <= 100 and 1 <= m["perplexity"] <= 32
    assert m["bpp"] == pytest.approx(5 / 16)
    for name in ("recon_000020.png", "recon_000040.png", "recon_final.png", "usage.png",
                 "checkpoint/model.safetensors", "checkpoint/config.json", "checkpoint/training_state.pt"):
        assert (tmp_path / name).is_file(), name
    model, config = load_model(str(tmp_path))
    assert config["model"] == "vqvae" and isinstance(model, VQVAE)


@pytest.mark.parametrize("loss", ["mse", "vqgan"])
def test_resume_is_bit_identical(tmp_path, loss):
    extra = ["--loss", loss, "--disc-start", "2", "--disc-ndf", "8"] if loss == "vqgan" else []
    run(tmp_path / "straight", "--steps", "4", *extra)
    run(tmp_path / "split", "--steps", "2", *extra)
    run(tmp_path / "split", "--steps", "4", "--resume", *extra)
    a = load_file(tmp_path / "straight/checkpoint/model.safetensors")
    b = load_file(tmp_path / "split/checkpoint/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = torch.load(tmp_path / "straight/checkpoint/training_state.pt", weights_only=True)
    sb = torch.load(tmp_path / "split/checkpoint/training_state.pt", weights_only=True)
    assert sa["step"] == sb["step"] == 4
    for name, opt in sa["optimizers"].items():
        for pid, st in opt["state"].items():
            for key, v in st.items():
                assert torch.equal(v, sb["optimizers"][name]["state"][pid][key]), (name, pid, key)
    if loss == "vqgan":
        for k, v in sa["extra"]["loss"].items():
            assert torch.equal(v, sb["extra"]["loss"][k]), k


def test_vqgan_model_trains(tmp_path):
    m = run(tmp_path, "--model", "vqgan", "--steps", "3", "--downsample", "2", "--disc-start", "1",
            "--disc-ndf", "8", "--lr", "1e-3")
    assert np.isfinite(m["psnr_db"]) and m["bpp"] == pytest.approx(5 / 4)
    model, config = load_model(str(tmp_path))
    assert config["model"] == "vqgan" and config["loss"] == "vqgan"
    image = (torch.rand(3, 10, 12) * 255).to(torch.uint8)
    blob = codec.encode_bytes(model, config, image)
    assert len(blob) == codec.HEADER.size + (5 * 6 * 5 + 7) // 8
    assert codec.decode_bytes(model, config, blob).shape == image.shape


def test_demo_runs_both_parts(tmp_path, capsys):
    assert vqfast_main(["demo", "--out", str(tmp_path), "--steps", "2", "--gan-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "PSNR (held-out)" in out and "demo done" in out
    for name in ("vqvae/recon_final.png", "vqvae/usage.png", "vqgan_finetune/metrics.json",
                 "vqgan_finetune/checkpoint/training_state.pt"):
        assert (tmp_path / name).is_file(), name


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="multiple of --downsample"):
        run(tmp_path, "--crop-size", "18")
    with pytest.raises(ValueError, match="needs --lpips-weights"):
        run(tmp_path, "--loss", "vqgan", "--perceptual-weight", "1")
    with pytest.raises(NotImplementedError, match="--quantizer residual with --model vqgan"):
        run(tmp_path, "--model", "vqgan", "--quantizer", "residual")
    with pytest.raises(ValueError, match="--backend must be one of"):
        run(tmp_path, "--backend", "nope", "--steps", "1")
    with pytest.raises(ValueError, match="holds no config.json"):
        load_model(str(tmp_path / "nowhere"))


def test_two_process_gloo_ddp(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vqfast", "train", *TINY, "--steps", "3", "--out", str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    # train() itself compares a checksum of every weight and codebook across the processes at the end
    # (DDP's buffer broadcast is off, so only sync_codebook keeps the EMA codebooks equal).
    assert m["world_size"] == 2 and np.isfinite(m["psnr_db"])


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_steps(tmp_path, amp):
    m = run(tmp_path, "--steps", "2", "--amp", amp)
    assert np.isfinite(m["psnr_db"])


@pytest.mark.slow
def test_compiled_model_trains(tmp_path):
    m = run(tmp_path, "--steps", "2", "--compile")
    assert np.isfinite(m["psnr_db"])
