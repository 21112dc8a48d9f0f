"""DDAE++ test suite: small CPU configs, fake datasets, random weights; nothing touches the network.

    python -m pytest -q test_smoke.py
"""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count()))

import train_unet  # noqa: E402


def _run(script, *argv, timeout=600, env=None):
    """Run a repo script as a user would; returns the completed process (raises with its output on failure)."""
    p = subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})
    if p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, argv))} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------
# train_unet.py

UNET_FAST = ["--net", "tiny", "--dataset", "shapes", "--resolution", "16", "--batch-size", "32",
             "--sample-every", "10000000"]


def _unet(tmp, *extra, images=320, log=64):
    out = tmp / "run"
    argv = UNET_FAST + ["--out", str(out), "--train-images", str(images), "--log-every", str(log),
                        "--warmup-images", "64", *map(str, extra)]
    return out, train_unet.main(argv)


@pytest.mark.parametrize("net,total", [("ddpm", 35_746_307), ("ddpmpp", 56_524_291)])
def test_unet_param_counts(net, total):
    """Paper Table 9 sizes; self-conditioning costs +460,288 (SPEC section 2) on both backbones."""
    def count(*flags):
        with torch.device("meta"):
            return train_unet.count_params(train_unet.build_model(train_unet.get_args(["--net", net, *flags])))
    assert count() == total
    assert count("--self-cond") - total == 128 * 512 + 512 + 512 * 512 + 512 + 256 * 512 + 512 == 460_288
    assert count("--self-cond", "--sc-mode", "add") - total == 256 * 512 + 512


def test_unet_dry_run_prints_counts():
    p = _run("train_unet.py", "--net", "ddpm", "--self-cond", "--dry-run")
    assert "36,206,595 total, 460,288 self-conditioning" in p.stdout
    assert json.loads(p.stdout[:p.stdout.rindex("}") + 1])["sc_layer"] == "out_6"  # Table 10, DDPM ddpm CIFAR-10


def test_unet_table10_defaults():
    get = lambda *a: train_unet.get_args(list(a))
    assert (get("--model", "EDM").sc_layer, get("--model", "EDM").probe_t) == ("out_7", 0.06)
    assert get("--model", "EDM", "--dataset", "cifar100").sc_layer == "out_6"
    assert get("--net", "ddpmpp", "--model", "DDPM", "--dataset", "cifar100").sc_layer == "out_8"
    a = get("--model", "EDM", "--dataset", "tiny-imagenet")
    assert (a.sc_layer, a.probe_t, a.resolution) == ("out_5", 0.2964, 64)
    assert get("--sc-layer", "3").sc_layer == "out_3"
    assert (get("--model", "EDM").dropout, get("--model", "EDM").ema) == (0.13, 0.9993)
    with pytest.raises(SystemExit):
        get("--sc-layer", "out_13")


def test_unet_feature_layers_and_resolutions():
    model = train_unet.build_model(train_unet.get_args(["--net", "ddpm"]))
    assert model.feature_layers == [f"out_{i}" for i in range(1, 13)]
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    with torch.no_grad():
        out, feats = model(x, t, feats=("out_1", "out_4", "out_7", "out_10"))
    assert out.shape == x.shape
    assert {k: v.shape[1] for k, v in feats.items()} == {"out_1": 256, "out_4": 256, "out_7": 256, "out_10": 128}


def test_unet_self_cond_starts_as_baseline_and_zero_label_is_no_label():
    base = train_unet.build_model(train_unet.get_args(["--net", "tiny", "--aug"])).eval()
    sc = train_unet.build_model(train_unet.get_args(["--net", "tiny", "--aug", "--self-cond"])).eval()
    missing, unexpected = sc.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("self_cond.") for k in missing)
    x, t = torch.randn(4, 3, 32, 32), torch.rand(4)
    with torch.no_grad():
        assert torch.equal(sc(x, t), base(x, t))  # zero-init projection: a no-op until it learns
        assert torch.equal(base(x, t, aug=torch.zeros(4, 9)), base(x, t))
        assert not torch.equal(base(x, t, aug=torch.randn(4, 9)), base(x, t))
        sc.self_cond.proj.weight.normal_()
        assert not torch.allclose(sc(x, t), base(x, t))


@pytest.mark.parametrize("model,sc_mode", [("DDPM", "adaptive"), ("EDM", "add"), ("RF", "adaptive"),
                                           ("DDPM", "add"), ("EDM", "adaptive"), ("RF", "add")])
def test_unet_formulations_train_and_reload(tmp_path, model, sc_mode):
    out, (net, ema) = _unet(tmp_path, "--model", model, "--self-cond", "--sc-mode", sc_mode, images=256, log=128)
    m = _metrics(out)
    assert m[-1]["loss"] < 0.9 * m[0]["loss"], m
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["script"] == "train_unet.py" and ckpt["step"] == 8 and ckpt["images"] == 256
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    args = train_unet.get_args([])
    vars(args).update(ckpt["args"])
    rebuilt = train_unet.build_model(args)
    rebuilt.load_state_dict(ckpt["ema"], strict=True)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), ema.state_dict().values()))


def test_unet_resume_is_exact(tmp_path):
    """A run stopped half way and restarted with the same command ends bitwise equal to an uninterrupted run."""
    full, (m_full, e_full) = _unet(tmp_path / "a", "--ckpt-every", "160", images=320)
    out = tmp_path / "b" / "run"
    argv = UNET_FAST + ["--out", str(out), "--train-images", "320", "--log-every", "64", "--warmup-images", "64",
                        "--ckpt-every", "160"]
    train_unet.main(argv[:-1] + ["160"] + ["--train-images", "160"])  # stops after 5 steps
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 5
    m, e = train_unet.main(argv)
    assert "resumed from" in (out / "log.txt").read_text()
    for a, b in [(m_full, m), (e_full, e)]:
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_unet_resume_refuses_other_architecture(tmp_path):
    out, _ = _unet(tmp_path, images=64)
    before = (out / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit, match="another architecture.*self_cond"):
        _unet(tmp_path, "--self-cond", images=128)
    assert (out / "ckpt.pt").read_bytes() == before


def test_unet_two_ranks_hold_identical_weights(tmp_path):
    """torchrun --nproc_per_node=2 on CPU (gloo): DDP keeps both replicas equal."""
    out = tmp_path / "ddp"
    code = ("import sys, torch, train_unet as t; m, e = t.main(sys.argv[1:]); "
            "import torch.distributed as d; r = __import__('os').environ['RANK']; "
            f"torch.save(m.state_dict(), r'{out}' + f'/rank{{r}}.pt')")
    argv = UNET_FAST + ["--out", str(out), "--train-images", "192", "--log-every", "64"]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-c", code, *argv],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    if p.returncode != 0 and "-c" in p.stderr:  # torchrun has no -c: run the snippet from a file instead
        script = tmp_path / "ddp_snippet.py"
        script.write_text(f"import sys; sys.path.insert(0, r'{ROOT}')\n" + code.replace("; ", "\n"))
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script), *argv],
                           capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert "world 2" in (out / "log.txt").read_text()
    assert _metrics(out)[-1]["images"] == 192


def test_unet_quickstart_loss_falls_grid_and_resume(tmp_path):
    """The README quickstart, shortened: loss falls, a preview grid is written, rerunning resumes."""
    out = tmp_path / "qs"
    argv = ["--net", "tiny", "--dataset", "shapes", "--out", out, "--batch-size", "64", "--log-every", "640",
            "--sample-every", "1280", "--ckpt-every", "1280", "--warmup-images", "128"]
    _run("train_unet.py", *argv, "--train-images", "1280")
    assert (out / "grid-000001280.png").exists()
    p = _run("train_unet.py", *argv, "--train-images", "1920")
    assert "resumed from" in p.stdout + p.stderr + (out / "log.txt").read_text()
    m = _metrics(out)
    assert [r["step"] for r in m] == [10, 20, 30] and m[-1]["loss"] < 0.6 * m[0]["loss"]


def test_unet_aug_cl_losses_fall(tmp_path):
    out, _ = _unet(tmp_path, "--model", "EDM", "--aug", "--cl", "--self-cond", images=640, log=160)
    m = _metrics(out)
    chance = 2 * 0.2 * np.log(32)
    assert m[0]["cl_loss"] < 1.2 * chance and m[-1]["cl_loss"] < 0.6 * chance, m
    assert m[-1]["loss"] < m[0]["loss"]


def test_unet_nan_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch):
    out, _ = _unet(tmp_path, images=64)
    before = (out / "ckpt.pt").read_bytes()
    loss = train_unet.DDPM.loss
    monkeypatch.setattr(train_unet.DDPM, "loss", lambda self, *a, **k: (lambda r: (r[0] * float("nan"), r[1]))(loss(self, *a, **k)))
    with pytest.raises(SystemExit, match=r"loss is nan at step 4 \(128 images\); the last good checkpoint"):
        _unet(tmp_path, images=128)
    assert (out / "ckpt.pt").read_bytes() == before


# ----------------------------------------------------------------------------------------------------------
# Data

def test_shapes_deterministic_and_balanced():
    x, y = train_unet.make_shapes(200, seed=3)
    x2, y2 = train_unet.make_shapes.__wrapped__(200, seed=3)
    assert x.shape == (200, 3, 32, 32) and x.dtype == torch.uint8 and torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.bincount(y).tolist() == [20] * 10
    means = torch.stack([x[y == c].float().std(dim=0).mean() for c in range(10)])
    assert (means > 10).all()  # varied within a class: pose, size and colour change


def test_cifar_loader_reads_official_pickles(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}, f)
    args = train_unet.get_args(["--dataset", "cifar10", "--data-path", str(tmp_path)])
    x, y = train_unet.load_dataset(args, "train")
    assert x.shape == (20, 3, 32, 32) and y.tolist() == [0, 1, 2, 3] * 5
    assert train_unet.load_dataset(args, "test")[0].shape == (4, 3, 32, 32)


def test_folder_dataset_and_corrupt_image(tmp_path):
    from PIL import Image
    for c in ("cat", "dog"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (80, 60), (40 * i, 100, 200)).save(tmp_path / "train" / c / f"{i}.png")
    args = train_unet.get_args(["--dataset", "pets", "--data-path", str(tmp_path), "--resolution", "16"])
    x, y = train_unet.load_dataset(args, "train")
    assert x.shape == (6, 3, 16, 16) and y.tolist() == [0, 0, 0, 1, 1, 1]
    (tmp_path / "train" / "dog" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(SystemExit, match="cannot read image .*bad.png.*--skip-bad"):
        train_unet.load_dataset(args, "train")
    args.skip_bad = True
    assert len(train_unet.load_dataset(args, "train")[0]) == 6
    with pytest.raises(SystemExit, match="no images found"):
        train_unet.load_dataset(train_unet.get_args(["--dataset", "x", "--data-path", str(tmp_path / "none")]))
