"""Peak memory per rank of the evaluation at ImageNet scale, on fake ImageNet-shaped data.

    python .ci/memory.py                                  # the README's figures (about 25 minutes)
    python .ci/memory.py --sizes 400 1200 --repeats 1     # a quick look
    python .ci/memory.py --steps probe --worlds 2

Each step (sample.py's FID reference and merge, probe.py's default cell and --grid) runs on fake
data of two sizes, on 1 and 2 gloo ranks, in fresh processes; a thread samples each rank's
anonymous memory (RssAnon: what a node must hold; memory-mapped files are not in it) every 2 ms.
Printed per step and world: the peak at each size, its growth per image, and that growth
extrapolated to ImageNet-1k's train split. Stub networks stand in for DiT-B and Inception: what
the tools hold per image does not depend on the networks' compute, which they skip. Progress on
stderr, one JSON line on stdout. The data lives in a temporary folder, removed at the end, on an
error or on Ctrl-C.
"""
import argparse
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fid  # noqa: E402
import probe  # noqa: E402
import sample  # noqa: E402
import train_dit  # noqa: E402
import train_unet  # noqa: E402

IN1K_TRAIN = 1_281_167

# ------------------------------------------------------------------------------------------------
# Stub networks: the shapes of DiT-B's pooled features and Inception's outputs, almost no compute

class StubDiT(nn.Module):
    """DiT-B's pooled features (12 blocks x 768) from a fixed projection of the latent."""
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 768)
        self.feature_layers = [f"block_{i}" for i in range(1, 13)]
        self.num_classes, self.in_ch = 0, 32

    def forward(self, x, t, y=None, feats=(), pool=True):
        f = self.proj(x.mean((2, 3)))  # (N, 768)
        return x, {name: f + i for i, name in enumerate(self.feature_layers) if name in feats}

class StubInception(nn.Module):
    """pool3 (N, 2048) and logits (N, 1008) as a fixed random map of the 4x4-pooled image."""
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(48, 2048, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        f = F.adaptive_avg_pool2d(x, 4).flatten(1) @ self.w
        return f, f[:, :1008]

class RandomEncoder:
    """Stands in for the VA-VAE: random latents (B, 32, 16, 16) of any images."""
    def __init__(self):
        self.g = torch.Generator().manual_seed(0)

    def encode(self, x):
        return torch.randn(len(x), 32, 16, 16, generator=self.g)

class BlankImages(torch.utils.data.Dataset):
    """n blank 256x256 images as the latent cache reads them: (index, uint8 (3, 256, 256), '')."""
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i, torch.zeros(3, 256, 256, dtype=torch.uint8), ""

# ------------------------------------------------------------------------------------------------
# Fake data: an ImageNet-1k latent cache and a stub DiT-B checkpoint; class folders and shards

def probe_data(root, n):
    """The latent cache of n train and n / 25 val images of 1000 classes (the real (2 flips, 32,
    16, 16) float16 rows, written by train_dit.py's own cache code) and a checkpoint probing it."""
    args = train_dit.get_args(["--dataset", "in1k", "--no-class-cond", "--extract-batch", "500",
                               "--workers", "0", "--cache-dir", str(root / "cache")])
    load_vae, train_dit.load_vae = train_dit.load_vae, lambda args, device: RandomEncoder()
    try:
        for split, m in (("train", n), ("test", max(n // 25, 100))):
            train_dit.latent_cache(args, split, (BlankImages(m), torch.arange(m) % 1000))
    finally:
        train_dit.load_vae = load_vae
    sd = StubDiT().state_dict()
    torch.save({"script": "train_dit.py", "args": vars(args), "model": sd, "ema": sd, "step": 0,
                "images": 0, "latent_stats": {"mean": torch.zeros(32), "std": torch.ones(32)}},
               root / "ckpt.pt")

def fid_data(root, n):
    """n 320x240 JPEGs in 1000 class folders (ADM-cropped to 256 when read) and sample.py's
    shards of n 256x256 samples, 250 a shard."""
    g = np.random.default_rng(0)
    base = np.clip(g.normal(128, 40, (240, 320, 3)), 0, 255).astype(np.uint8)
    for i in range(n):
        folder = root / "in1k" / f"n{i % 1000:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.roll(base, i, axis=1)).save(folder / f"{i}.jpg")
    (root / "shards").mkdir()
    image = np.clip(g.normal(128, 40, (256, 256, 3)), 0, 255).astype(np.uint8)
    for start in range(0, n, 250):
        m = min(250, n - start)
        np.savez(root / "shards" / f"shard-{start:07d}.npz", images=np.repeat(image[None], m, 0),
                 labels=np.arange(m) % 1000, nfe=np.array(250))

# ------------------------------------------------------------------------------------------------
# The steps, as the tools run them on a rank

def fid_reference(root, world):
    """sample.py --fid in1k's reference: the class folders streamed through the trainer."""
    args = train_unet.get_args(["--dataset", "in1k", "--data-path", str(root / "in1k")])
    ref, _, _ = sample.fid_reference("in1k", train_unet, args, 256, workers=0)
    return fid.compute_statistics(ref(), StubInception(), score=False)

def sample_fid(root, world):
    """sample.py --fid once its shards exist: rank 0 merges them into samples.npz, every rank
    runs Inception over its own shards against reference statistics."""
    paths = sorted((root / "shards").glob("shard-*.npz"))
    n, rank = sum(len(np.load(p)["labels"]) for p in paths), probe.world()[0]
    if rank == 0:
        with open(root / f"samples-{world}.npz", "wb") as f:
            sample.merge(paths, f, n, classes=1000)
    mine = range(rank, len(paths), world)
    own = ((torch.arange(i * 250, i * 250 + len(x)), x)
           for i, x in ((i, sample.shard_images(paths[i])) for i in mine))
    return fid.fid_from_samples(fid.Source(own, n=n), (np.zeros(2048), np.eye(2048), 50_000),
                                StubInception())

# probe.py's steps train Table 11's head for one epoch: the features held per image are those of
# the lbfgs head too (which adds at most probe.CACHE_BYTES of standardised rows per node), and its
# fit to convergence over 1000 classes would take hours here.
PROBE = ["--head", "table11", "--epochs", "1"]
STEPS = {  # name -> (what it measures, the step run on the data under root by each of world ranks)
    "fid-reference": ("sample.py --fid in1k reference", fid_reference),
    "sample-fid": ("sample.py merge + --fid", sample_fid),
    "probe": ("probe.py default cell", lambda root, world: probe.main(
        ["--ckpt", str(root / "ckpt.pt"), *PROBE, "--out", str(root / f"p{world}")])),
    "probe-grid": ("probe.py --grid", lambda root, world: probe.main(
        ["--ckpt", str(root / "ckpt.pt"), "--grid", *PROBE, "--out", str(root / f"g{world}")])),
}

def peak_anon(fn):
    """fn() while a thread samples this process's RssAnon every 2 ms: the peak in bytes."""
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            with open("/proc/self/status") as f:
                kib = next(int(line.split()[1]) for line in f if line.startswith("RssAnon"))
            peak[0] = max(peak[0], kib * 1024)
            done.wait(0.002)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return peak[0]

def rank_main(rank, world, port, step, root, peaks):
    """One rank of a step, as torchrun starts it: its peak goes to `peaks`."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sys.stdout = sys.stderr  # the tools' reports are progress here: stdout is the JSON line's
    warnings.simplefilter("ignore")  # rank-deficient covariances of stub features
    train_dit.build_model = lambda args: StubDiT()
    fid.load_inception = lambda path=None, device="cpu": StubInception()
    peaks.put(peak_anon(lambda: STEPS[step][1](Path(root), world)))

def run_step(step, root, world):
    """The step on `world` fresh processes: the largest rank's peak in bytes."""
    ctx = multiprocessing.get_context("spawn")
    peaks = ctx.Queue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [ctx.Process(target=rank_main, args=(r, world, port, step, str(root), peaks))
             for r in range(world)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise SystemExit(f"{STEPS[step][0]} on {world} rank(s) failed: exit codes "
                             f"{[p.exitcode for p in procs]}")
        return max(peaks.get() for _ in procs)
    finally:  # Ctrl-C or a failed rank: no process left writing into the temporary folder
        for p in procs:
            p.kill()
            p.join()

# ------------------------------------------------------------------------------------------------
# Main

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="steps: " + "; ".join(f"{k}: {v[0]}"
                                                             for k, v in STEPS.items()))
    p.add_argument("--sizes", type=int, nargs=2, default=[4000, 12000], metavar=("N1", "N2"),
                   help="training images of the two fake datasets (the growth is their slope)")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2],
                   help="ranks to run each step on")
    p.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS), metavar="STEP",
                   help="the steps to measure (default: all)")
    p.add_argument("--repeats", type=int, default=3, help="runs per figure, the median reported: "
                   "transient batch buffers move a single run's peak by tens of MiB")
    a = p.parse_args(argv)
    if not 0 < a.sizes[0] < a.sizes[1] or min(a.worlds) < 1 or a.repeats < 1:
        p.error("give two sizes 0 < N1 < N2, worlds >= 1 and repeats >= 1")
    return a

def main(argv=None):
    a = get_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    # a scheduler's or timeout's SIGTERM unwinds like Ctrl-C: the finally below removes the data
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    tmp, rows = Path(tempfile.mkdtemp(prefix="ddae-memory-")), []
    try:
        for n in a.sizes:
            log(f"writing fake data of {n} images in {tmp / str(n)}")
            (tmp / str(n)).mkdir()
            probe_data(tmp / str(n), n)
            fid_data(tmp / str(n), n)
        for step in a.steps:
            for world in a.worlds:
                peaks = [statistics.median(run_step(step, tmp / str(n), world)
                                           for _ in range(a.repeats)) for n in a.sizes]
                growth = (peaks[1] - peaks[0]) / (a.sizes[1] - a.sizes[0])
                in1k = (peaks[0] + growth * (IN1K_TRAIN - a.sizes[0])) / 2**30
                rows.append(dict(step=STEPS[step][0], world=world, sizes=a.sizes,
                                 peak_mib=[p / 2**20 for p in peaks],
                                 kib_per_image=growth / 1024, in1k_gib=in1k))
                log(f"{STEPS[step][0]:31s} {world} rank(s): peak {peaks[0] / 2**20:.0f} / "
                    f"{peaks[1] / 2**20:.0f} MiB at {a.sizes[0]} / {a.sizes[1]} images: "
                    f"{growth / 1024:.2f} KiB per image per rank, ImageNet-1k ({IN1K_TRAIN:,} "
                    f"images) {in1k:.1f} GiB per rank (median of {a.repeats} runs)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(rows))
    return rows

if __name__ == "__main__":
    main()
