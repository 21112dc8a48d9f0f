"""
Linear probing of DDAE++ checkpoints (train_unet.py, train_uvit.py, train_dit.py): frozen EMA
features at a noise level t and a layer, globally average pooled, classified linearly.

    python probe.py --ckpt runs/X/ckpt.pt --init --raw-pixels     # Table 10's cell, init, pixels
    python probe.py --ckpt runs/X/ckpt.pt --grid                   # every (t, layer): Fig. 4-5
    python probe.py --ckpt runs/X/ckpt-*.pt                        # snapshots: App. A's rule
    python probe.py --ckpt runs/*/ckpt.pt --loss                   # seeds and arms: mean +- std
    python probe.py --ckpt runs/X/ckpt.pt --dataset cifar100       # transfer
    python probe.py --ckpt runs/X/ckpt.pt --dense --dataset ade20k # per-pixel probe: mIoU
    torchrun --nproc_per_node=8 probe.py --ckpt runs/X/ckpt.pt --grid   # data-parallel

Heads: `lbfgs` (default), a multinomial logistic regression on standardised features fitted to
convergence by full-batch L-BFGS, its L2 strength chosen on a held-out tenth of the training
images (CLIP's linear probe): a figure that compares two models must come from the optimum of its
objective. `table11`, the paper's recipe (BatchNorm + Linear, Adam, cosine, 15 or 30 epochs), to
reproduce its figures; it stops short of that optimum. Each head prints its final training loss
and accuracy beside its test accuracy. Memory: one noise level at a time; each rank keeps only its
own rows, float16 (spilled to an unlinked file when large); both heads are data-parallel (sums
all-reduced: every rank takes the steps one process holding all rows would).
"""
import argparse
import contextlib
import json
import math
import os
import time
from collections import namedtuple
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

from sample import ckpt_name, for_inference, import_trainer, load_checkpoint, read_checkpoint

# ------------------------------------------------------------------------------------------------
# The protocol: grids, Table 11, the converged head, App. A's snapshot rule

# Grids in native units around Table 10's optima (DDPM step; EDM sigma; RF t, 1 = noise). EDM:
# steps 2-8 from the end of the 18-step Heun schedule (0.06 = step 4, 0.2964 = step 6).
GRIDS = {"DDPM": [1, 11, 21, 41, 66, 101, 151],
         "EDM": [0.0075, 0.023, 0.06, 0.14, 0.2964, 0.59, 1.09],
         "RF": [0.02, 0.06, 0.1, 0.15, 0.25, 0.4, 0.6]}
# Table 11's global batch: 1440 latent; for pixels one row spans pre-training and probing, which
# we read as shared (DDAE ran 512 for every net). "tiny" is not in the paper: 128.
PROBE_BATCH = {"ddpm": 512, "ddpmpp": 256, "uvit_s": 256}
MAX_PIXEL_DIM = 12288  # raw pixels: flattened up to 64x64x3 (and 16x16x32 latents), pooled above
# The converged head's L2 strengths on the mean cross-entropy, strongest first (warm starts);
# a held-out tenth of the training images picks one. 1e-8 is sklearn's C = 100 at 1M images.
L2_PATH, HELD_OUT = [10.0 ** -k for k in range(9)], 0.1
LBFGS = dict(max_iter=1000, tolerance_grad=1e-4, history_size=20)  # sklearn's tolerance
CACHE_BYTES = 2 ** 30  # on CPU a node holds one cell's standardised rows for its fit below this
# App. A: CIFAR accuracy is the best of the 800/1000/1200-epoch snapshots; else the final one.
APP_A_EPOCHS = {"cifar10": (800, 1000, 1200), "cifar100": (800, 1000, 1200)}
# What a best cell or snapshot is picked on, per head: never test for the converged head
PICK = {"lbfgs": ("held_out", "on the held-out tenth of train"),
        "table11": ("test", "on test, as the paper did")}
TEST, TRAIN, FLIPS, LOSS, SC, HOLD = range(6)  # random streams: _seed(--seed, stream, index)
DENSE = {  # the standard protocols: default folder, classes scored; 255 is ignored everywhere
    "ade20k": ("data/ADEChallengeData2016", 150),  # label 0 ("other") ignored: c -> c - 1
    "voc": ("data/VOCdevkit/VOC2012", 21),  # background and 20 classes; 255 marks boundaries
}
# What does not make two runs differ (the seed makes a replicate of an arm)
BOOKKEEPING = {"out", "log_every", "ckpt_every", "ckpt_minutes", "sample_every", "workers",
               "data_path", "cache_dir", "extract_batch", "train_images", "keep_every"}
Job = namedtuple("Job", "path out mod args ts layers run")  # run: the args but bookkeeping

@dataclass(frozen=True)
class Cell:
    """What one head reads: a network ("trained", "init" or "pixels") at noise level t, a layer."""
    net: str
    t: float = None
    layer: str = "pixels"

    def __str__(self):
        return "raw pixels" if self.net == "pixels" else \
            f"t={self.t:g} {self.layer}" + " at init" * (self.net == "init")

def get_args(argv=None):
    """The flags, checked against each other (against each checkpoint: plan)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    arg = p.add_argument
    arg("--ckpt", required=True, nargs="+", help="train_*.py checkpoints (a run's snapshots too)")
    arg("--raw", action="store_true", help="probe the online weights, not the EMA")
    arg("--t", type=float, nargs="+", help="noise levels, native units (default: probe_t)")
    arg("--layer", nargs="+", help="out_6, 6, block_9, cls (UViT), all (default: sc_layer)")
    arg("--grid", action="store_true", help="--t: the formulation's grid, --layer all")
    arg("--raw-pixels", action="store_true", help="also probe raw pixels (a baseline)")
    arg("--init", action="store_true", help="also probe the run's initial weights")
    arg("--head", choices=["lbfgs", "table11"], help="default lbfgs (--dense: table11 only)")
    arg("--draws", type=int, default=1, help="noise draws per training image, each in both "
        "flips; table11 takes draw e %% K in epoch e (the paper: a new one each epoch)")
    arg("--flip", action=argparse.BooleanOptionalAction, help="flip training images (default: "
        "as the run trained)")
    arg("--dense", action="store_true", help="per-pixel probe of the unpooled features (mIoU)")
    arg("--loss", action="store_true", help="also the held-out denoising loss by noise level")
    arg("--sc-stats", action="store_true", help="also what the self-conditioning term carries")
    arg("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on CUDA")
    arg("--epochs", type=int, help="table11, dense: 15 on CIFAR, 30 otherwise (Table 11)")
    arg("--lr", type=float, help="table11, dense: 4e-3 pixel, 2e-3 latent (Table 11)")
    arg("--batch-size", type=int, help="table11, dense: 512 ddpm, 256 ddpmpp, UViT-S, 1440 latent")
    arg("--extract-batch", type=int, default=256, help="images per forward")
    arg("--dataset", help="transfer: a dataset the trainers know or a class folder; --dense: "
        "ade20k, voc or a folder with images/ and annotations/")
    arg("--data-path", help="--dataset's folder (default: its own, never the run's)")
    arg("--limit", type=int, help="probe a fixed random subset of this many images")
    arg("--seed", type=int, default=0)
    arg("--out", help="default <ckpt dir>/probe[-dense][-<dataset>]")
    a = p.parse_args(argv)
    for name in ("draws", "epochs", "batch_size", "extract_batch", "limit"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive")
    bad = [f for f, on in (("--loss", a.loss), ("--sc-stats", a.sc_stats), ("--limit", a.limit),
                           ("--head lbfgs", a.head == "lbfgs"), ("--draws", a.draws > 1)) if on]
    if a.dense and bad:  # dense probing trains the mini-batch head on one map per cell
        raise SystemExit(f"--dense does not take {', '.join(bad)}")
    a.head = a.head or ("table11" if a.dense else "lbfgs")
    return a

# ------------------------------------------------------------------------------------------------
# Data-parallel bookkeeping: rank r owns the rows of extraction batches r, r + world, ...

def world():
    """(rank, world size), (0, 1) outside torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

def owned(i, block):
    """Which of the rows i (N,) this rank owns, for extraction batches of `block` rows."""
    return i // block % world()[1] == world()[0]

def local_rows(i, block):
    """This rank's storage row of each owned row i: its batches are stored one after another."""
    return i // block // world()[1] * block + i % block

def all_sum(t):
    """t summed over all ranks, in place (nccl sums on the GPU: a CPU tensor goes and returns)."""
    if world()[1] > 1:
        u = t.cuda() if dist.get_backend() == "nccl" else t
        dist.all_reduce(u)
        t.copy_(u)
    return t

def _seed(*ints):
    """A 32-bit generator seed from ints (torch's CPU generator keeps 32 bits of a seed)."""
    return int(np.random.SeedSequence(list(ints)).generate_state(1)[0])

def _generator(*ints):
    """A CPU generator seeded from ints: a named noise stream (TEST, TRAIN, ..) and its index."""
    return torch.Generator().manual_seed(_seed(*ints))

# ------------------------------------------------------------------------------------------------
# Data: a labelled split in model space

class Data:
    """A labelled split in model space: uint8 pixels (N, 3, H, W) or a VA-VAE latent cache."""
    # latents: (N, 2 flips, 32, 16, 16) float16 memory-mapped, normalised with the training
    # latents' statistics; rows: a subset (--limit); encode: pixels to the network's input

    def __init__(self, x, y, stats=None, rows=None, encode=None):
        self.x, self.stats, self.encode = x, stats, encode
        self.rows = torch.arange(len(y)) if rows is None else rows
        self.y = y[self.rows]

    def __len__(self):
        return len(self.rows)

    def batch(self, i, flip=None):
        """Positions i (B,) -> (B, C, H, W) float32, flipped where flip (B,) is True."""
        idx, flip = self.rows[i], torch.zeros(len(i), dtype=torch.bool) if flip is None else flip
        if self.stats is None:
            x = self.x[idx].float() / 127.5 - 1
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            return x if self.encode is None else self.encode(x)
        # a flipped latent grid is not the latent of the flipped image: the cache holds both
        z = torch.from_numpy(np.asarray(self.x[idx.numpy(), flip.long().numpy()], np.float32))
        return (z - self.stats["mean"][:, None, None]) / self.stats["std"][:, None, None]

class Resized(torch.utils.data.Dataset):
    """Images another trainer read (CIFAR for a latent DiT), ADM-cropped for a latent cache."""
    def __init__(self, x, res, crop):
        self.x, self.res, self.crop = x, res, crop

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        img = self.crop(Image.fromarray(self.x[i].permute(1, 2, 0).numpy()), self.res)
        return i, torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy()), ""

def load_split(mod, args, ckpt, split):
    """The split's Data: pixels resized to the model's input, or the split's latent cache."""
    unet = import_trainer("train_unet.py")  # it reads what the run's trainer does not (CIFAR)
    src = mod if args.dataset in mod.DATASETS or args.dataset not in unet.DATASETS else unet
    read = lambda: src.load_pixels(args if src is mod else src.get_args(
        ["--dataset", args.dataset, "--data-path", args.data_path]), split)
    if getattr(args, "latent", "none") == "none":
        x, y = read()
        if x.shape[-1] != args.resolution:
            x = F.interpolate(x.float(), size=args.resolution, mode="bicubic", antialias=True)
            x = x.round().clamp(0, 255).to(torch.uint8)
        return Data(x, y)
    source = None
    if src is not mod or args.dataset in mod.SHAPES:  # pixels of another loader, encoded at 256
        x, y = read()
        source = (Resized(x, mod.IMAGE_SIZE, mod.center_crop), y)
    d = mod.latent_cache(args, split, source)
    y = torch.from_numpy(np.load(d / "labels.npy"))
    return Data(np.load(d / "latents.npy", mmap_mode="r"), y, ckpt["latent_stats"])

def pixel_features(x):
    """Raw-pixel features (N, D) of model-space x, 2x2-pooled to D <= MAX_PIXEL_DIM."""
    while x[0].numel() > MAX_PIXEL_DIM:
        x = F.avg_pool2d(x, 2)
    return x.flatten(1)

# ------------------------------------------------------------------------------------------------
# Features: this rank's rows, float16, in one or more views (noise draw x flip) per image

def _rows(n, width, spill):
    """(n, width) float16 zeros; over half the node's free memory (per rank), in a spill file."""
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/meminfo") as f:
            avail = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable"))
        if 2 * n * width > avail / 2 / int(os.environ.get("LOCAL_WORLD_SIZE", 1)) and spill:
            spill.mkdir(parents=True, exist_ok=True)
            path = spill / f".features-{os.getpid()}-{time.time_ns()}.npy"
            rows = np.lib.format.open_memmap(path, "w+", np.float16, (n, width))
            path.unlink()  # unlinked at once: nothing is left behind, even by a kill
            return torch.from_numpy(rows)
    return torch.zeros(n, width, dtype=torch.float16)

class Features:
    """One rank's rows of several layers' features, `views` per image, stored float16."""
    def __init__(self, n, views=1, spill=None):
        self.n, self.views, self.spill, self.data, self.cols = n, views, spill, None, {}

    def put(self, rows, view, feats):  # rows: a slice of this rank's rows; feats {layer: (B, ..)}
        f = torch.cat([v.flatten(1) for v in feats.values()], 1).float().cpu()
        if self.data is None:
            self.data = _rows(self.views * self.n, f.shape[1], self.spill)
            self.shift = f.mean(0)  # float16 is coarse far from zero: store around a mean
            self.shapes = {k: v.shape[1:] for k, v in feats.items()}  # (C, h, w) unpooled
            ends = np.cumsum([v[0].numel() for v in feats.values()])
            self.cols = {k: slice(e - v[0].numel(), e) for (k, v), e in zip(feats.items(), ends)}
        self.data[rows.start + view * self.n:rows.stop + view * self.n] = (f - self.shift).half()

    def get(self, rows, view, layer):
        """Local rows (B,) in view(s) (B,) or an int -> (B, C) float32 of one layer."""
        c = self.cols[layer]
        return torch.add(self.data[rows + view * self.n, c], self.shift[c])

@torch.no_grad()
def extract(models, diffusion, data, t, layers, views, *, batch_size=256, spill=None, desc=None,
            autocast=contextlib.nullcontext(), pool=True, pixels=False):
    """{net: Features} of this rank's rows at t, each layer, each view (flips or None, seed)."""
    rank, size = world()
    device = next(models["trained"].parameters()).device
    starts = list(range(0, len(data), batch_size))[rank::size]
    n = sum(min(batch_size, len(data) - b) for b in starts)
    out = {name: Features(n, len(views), spill) for name in [*models, *["pixels"] * pixels]}
    row = 0
    for b in tqdm(starts, desc=desc, disable=rank > 0 or desc is None, leave=False):
        i = torch.arange(b, min(b + batch_size, len(data)))
        for v, (flips, seed) in enumerate(views):
            x = data.batch(i, None if flips is None else flips[i])
            rows = slice(row, row + len(i))
            if pixels:
                out["pixels"].put(rows, v, {"pixels": pixel_features(x) if pool else x})
            # seeded by (view, first row) alone: a cell probed alone sees a grid's features,
            # on any number of ranks
            noise = torch.randn(x.shape, generator=_generator(seed, b))
            tt = torch.full((len(x),), t, device=device)  # int64 for DDPM, float otherwise
            xt = diffusion.add_noise(x.to(device), tt, noise.to(device))
            for name, m in models.items():
                with autocast:  # unconditional (a conditional DiT: the null class)
                    f = diffusion.pred(m, xt, tt, feats=tuple(layers), pool=pool)[1]
                out[name].put(rows, v, {l: f[l] for l in layers})
        row += len(i)
    return out

class Split:
    """A split as this rank holds it: all labels, each cell's (store, layer), its rows `mine`."""
    def __init__(self, y, stores, views, block):
        self.y, self.stores, self.views, self.block = y, stores, views, block
        self.mine = torch.arange(len(y))[owned(torch.arange(len(y)), block)]

    def feats(self, cell, local, view):
        store, layer = self.stores[cell]
        return store.get(local, view, layer)

    def width(self, cell):
        """The feature width of cell."""
        return self.feats(cell, torch.arange(1), 0).shape[1]

    def chunks(self, cell, keep=None, chunk=4096):
        """(features (m, C), labels (m,)) of this rank's rows, every view; keep (N,): a subset."""
        for s in range(0, len(self.mine), chunk):
            local = torch.arange(s, min(s + chunk, len(self.mine)))
            local = local if keep is None else local[keep[self.mine[local]]]
            for v in range(self.views):
                yield self.feats(cell, local, v), self.y[self.mine[local]]

# ------------------------------------------------------------------------------------------------
# Heads: the converged logistic regression (L-BFGS), Table 11's recipe (Adam, cosine)

def moments(chunks, width):
    """(mean, std) (C,) of the rows of chunks, from float64 sums over all ranks."""
    s = torch.zeros(3, width, dtype=torch.float64)
    for x, _ in chunks:
        x = x.double()
        s += torch.stack([x.sum(0), x.square().sum(0), torch.full((width,), float(len(x)))])
    s1, s2, n = all_sum(s)
    std = (s2 / n - (s1 / n).square()).clamp(min=0).sqrt()
    return (s1 / n).float(), torch.where(std > 0, std, 1).float()

def lbfgs(rows, n, classes, width, l2, device, init=None):
    """(W, b, max |gradient|) minimising mean cross-entropy + l2/2 |W|^2 by full-batch L-BFGS."""
    W, b = (torch.zeros(classes, width, dtype=torch.float64, device=device),
            torch.zeros(classes, dtype=torch.float64, device=device)) if init is None \
        else map(torch.clone, init)
    opt = torch.optim.LBFGS([W, b], line_search_fn="strong_wolfe", **LBFGS)

    def closure():
        s = torch.zeros(1 + W.numel() + b.numel(), dtype=torch.float64, device=device)
        for x, y in rows():  # float64: in float32 the gradient stalls near 1e-4 at weak L2
            x = x.double()
            z = torch.addmm(b, x, W.t())  # (m, K) logits
            lse = z.logsumexp(1, keepdim=True)
            g = (z - lse).exp_()  # softmax minus the one-hot labels: d(cross-entropy)/dz
            g[torch.arange(len(y), device=device), y] -= 1
            loss = lse.sum() - z.gather(1, y[:, None]).sum()
            s += torch.cat([loss[None], (g.t() @ x).flatten(), g.sum(0)])
        s = all_sum(s) / n
        W.grad, b.grad = s[1:1 + W.numel()].view_as(W) + l2 * W, s[1 + W.numel():]
        return s[0] + l2 / 2 * W.square().sum()

    opt.step(closure)
    closure()
    return W, b, max(W.grad.abs().max().item(), b.grad.abs().max().item())

def fit_lbfgs(split, cell, classes, device, seed, log):
    """The converged head: (predict(features) -> logits, held-out accuracy %, its L2 strength)."""
    # the L2 that scores best on a held-out tenth of the training images (ties: the stronger; the
    # path stops after two in a row below the best), refitted on all the images
    width = split.width(cell)
    mean, std = (m.to(device) for m in moments(split.chunks(cell), width))
    order = torch.randperm(len(split.y), generator=_generator(seed, HOLD))
    hold = torch.zeros(len(split.y), dtype=torch.bool)
    hold[order[:max(1, round(HELD_OUT * len(split.y)))]] = True
    room = torch.cuda.mem_get_info(device)[0] / 4 if torch.device(device).type == "cuda" else \
        CACHE_BYTES / int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # GPU: a quarter of its free
    cache = split.views * len(split.mine) * width * 4 < room

    def rows(keep):  # chunks of standardised rows: one tensor held when they fit, else streamed
        make = lambda: (((x.to(device) - mean) / std, y.to(device))
                        for x, y in split.chunks(cell, keep))
        held = [tuple(map(torch.cat, zip(*make())))] if cache else None
        return (lambda: held) if cache else make
    predict = lambda wb: lambda x: torch.addmm(wb[1].float(), (x - mean) / std, wb[0].float().t())
    fit, n_fit, best, wb = rows(~hold), split.views * int((~hold).sum()), None, None
    for l2 in L2_PATH:
        wb = lbfgs(fit, n_fit, classes, width, l2, device, wb)[:2]
        acc = evaluate(split, cell, predict(wb), device, hold)[1]
        if best is None or acc > best[0]:
            best, worse = (acc, l2, wb), 0
        elif (worse := worse + 1) == 2:
            break
    acc, l2, wb = best
    W, b, grad = lbfgs(rows(None), split.views * len(split.y), classes, width, l2, device, wb)
    if grad > 10 * LBFGS["tolerance_grad"]:
        log(f"warning: {cell}: L-BFGS stopped at gradient {grad:.1e} (l2 {l2:g}), not converged")
    return predict((W, b)), acc, l2

class Probe(nn.Module):
    """Table 11's head: BatchNorm without affine + Linear, batch statistics over all ranks."""
    # the BatchNorm is our choice (MAE's probe; DDAE's is a plain Linear): feature scales differ by
    # orders of magnitude across cells

    def __init__(self, dim, classes):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))  # running statistics, as nn.BatchNorm1d's
        self.register_buffer("var", torch.ones(dim))
        self.fc = nn.Linear(dim, classes)
        nn.init.zeros_(self.fc.weight)  # a convex problem: zero init loses nothing, needs no RNG
        nn.init.zeros_(self.fc.bias)

    def forward(self, f, n=None):
        """Logits of rows f, this rank's part of a batch of n rows (n None: running stats)."""
        if n is None:
            return self.fc((f - self.mean) / (self.var + 1e-5).sqrt())
        s1, s2 = all_sum(torch.stack([f.double().sum(0), f.double().square().sum(0)])) / n
        mean, var = s1.float(), (s2 - s1.square()).clamp(min=0).float()
        self.mean.lerp_(mean, 0.1)  # nn.BatchNorm1d's update: momentum 0.1, unbiased variance
        self.var.lerp_(var * n / (n - 1), 0.1)
        return self.fc((f - mean) / (var + 1e-5).sqrt())

def train_head(head, n, block, batch_loss, *, lr, epochs, batch_size, seed):
    """Table 11's optimisation (Adam, cosine) of batch_loss(epoch, batch, rows mine, flips)."""
    g, params = torch.Generator().manual_seed(seed), list(head.parameters())
    opt, steps = torch.optim.Adam(params, lr=lr), epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for epoch in range(epochs):
        flips = torch.rand(n, generator=_generator(seed, FLIPS, epoch)) < 0.5  # each image's
        for idx in torch.randperm(n, generator=g).split(batch_size):
            if len(idx) > 1:  # BatchNorm cannot train on a single sample
                opt.zero_grad(set_to_none=False)  # a rank with no rows in the batch sends zeros
                batch_loss(epoch, idx, idx[owned(idx, block)], flips).backward()
                grads = all_sum(torch.cat([p.grad.flatten() for p in params]))
                for p, grad in zip(params, grads.split([p.numel() for p in params])):
                    p.grad.copy_(grad.view_as(p))
                opt.step()
            sched.step()
    return head.eval()

def fit_table11(split, cell, classes, device, *, lr, epochs, batch_size, seed, flip):
    """Table 11's head: in epoch e each image is one of its views (draw e % K, a random flip)."""
    head = Probe(split.width(cell), classes).to(device)
    draws = split.views // (1 + flip)  # view 2d + f: draw d in flip f

    def batch_loss(epoch, idx, mine, flips):
        view = epoch % draws * (1 + flip) + flips[mine].long() * flip
        f = split.feats(cell, local_rows(mine, split.block), view).to(device)
        y = split.y[mine].to(device)
        return F.cross_entropy(head(f, len(idx)), y, reduction="sum") / len(idx)

    return train_head(head, len(split.y), split.block, batch_loss, lr=lr, epochs=epochs,
                      batch_size=batch_size, seed=seed)

@torch.no_grad()
def evaluate(split, cell, predict, device, keep=None):
    """(mean cross-entropy, top-1 accuracy %) over the rows of split in every view, all ranks."""
    s = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in split.chunks(cell, keep):
        z, y = predict(x.to(device)), y.to(device)
        s += torch.stack([F.cross_entropy(z, y, reduction="sum").double(),
                          (z.argmax(1) == y).sum().double(), torch.tensor(len(y), device=device)])
    loss, correct, n = all_sum(s).tolist()
    return loss / n, 100 * correct / n

# ------------------------------------------------------------------------------------------------
# Dense probing: a linear classifier per location on the unpooled features, scored by mIoU

def load_segmentation(mod, args, split, res):
    """(uint8 images (N, 3, res, res), label maps (N, res, res)): one ADM centre crop each."""
    if args.dataset in mod.SHAPES:  # the toy's masks: 0 background, 1 + class on a dot
        x, _, masks, _ = mod.shapes_split(args, split)
        return x, masks
    root = Path(args.data_path)
    if args.dataset == "voc":  # VOC's lists, else ADE20K's images/ + annotations/ layout
        names = root / "ImageSets/Segmentation" / {"train": "train.txt", "test": "val.txt"}[split]
        if not names.is_file():
            raise SystemExit(f"--dense: no {names}: point --data-path at VOCdevkit/VOC2012")
        files = [(root / "JPEGImages" / f"{n}.jpg", root / "SegmentationClass" / f"{n}.png")
                 for n in names.read_text().split()]
    else:
        subs = [s for s in {"train": ("training", "train"), "test": ("validation", "val")}[split]
                if (root / "images" / s).is_dir()]
        if not subs:
            raise SystemExit(f"--dense: no {root / 'images'}/training or /train: point --data-path"
                             " at a folder with images/ and annotations/ (ADE20K's layout)")
        files = [(f, root / "annotations" / subs[0] / f"{f.stem}.png")
                 for f in sorted((root / "images" / subs[0]).iterdir())]
    xs, ms = [], []
    for f, m in files:
        if not m.exists():
            raise SystemExit(f"--dense: {f} has no label map {m}")
        with Image.open(f) as im, Image.open(m) as lab:
            xs.append(np.asarray(mod.center_crop(im.convert("RGB"), res)).transpose(2, 0, 1))
            ms.append(np.asarray(mod.center_crop(lab, res, labels=True)))
    masks = np.stack(ms)
    if args.dataset == "ade20k":  # reduce_zero_label: 0 -> 255 (ignored), c -> c - 1
        masks = (masks.astype(np.int16) - 1).astype(np.uint8)
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(masks)

def fit_dense(split, cell, masks, classes, device, *, lr, epochs, batch_size, seed, flip):
    """Table 11's head per location of cell's (C, h, w) maps: predict(maps) -> (B, K, H, W)."""
    # logits upsampled bilinearly to the label map (as upsampling the features: both are linear);
    # cross-entropy over the labelled pixels, a label map flipped with its image
    C, h, w = split.stores[cell][0].shapes[cell.layer]
    head = Probe(C, classes).to(device)
    rows = lambda f: f.to(device).view(-1, C, h, w).permute(0, 2, 3, 1).reshape(-1, C)
    up = lambda z: F.interpolate(z.view(-1, h, w, classes).permute(0, 3, 1, 2),
                                 size=masks.shape[1:], mode="bilinear", align_corners=False)

    def batch_loss(epoch, idx, mine, flips):
        f = flips[mine] & flip  # --no-flip: the flips are drawn, none is taken
        y = torch.where(f[:, None, None], masks[mine].flip(-1), masks[mine])
        z = head(rows(split.feats(cell, local_rows(mine, split.block), f.long())),
                 len(idx) * h * w)
        labelled = all_sum(torch.tensor([(y != 255).sum().item()], dtype=torch.float64)).item()
        return F.cross_entropy(up(z), y.long().to(device), ignore_index=255,
                               reduction="sum") / max(labelled, 1)

    train_head(head, len(split.y), split.block, batch_loss, lr=lr, epochs=epochs,
               batch_size=batch_size, seed=seed)
    return lambda f: up(head(rows(f)))

@torch.no_grad()
def dense_scores(split, cell, predict, masks, classes):
    """(mIoU % over the classes labelled or predicted, pixel accuracy %, mean cross-entropy)."""
    conf, ce = torch.zeros(classes ** 2, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    for j in torch.arange(len(split.mine)).split(256):
        y, z = masks[split.mine[j]].long(), predict(split.feats(cell, j, 0)).cpu()
        ce += F.cross_entropy(z, y, ignore_index=255, reduction="sum").item()
        ok = y != 255
        conf += torch.bincount(y[ok] * classes + z.argmax(1)[ok], minlength=classes ** 2)
    conf = all_sum(conf).view(classes, classes)
    tp, union, n = conf.diag(), conf.sum(0) + conf.sum(1) - conf.diag(), conf.sum()
    return (100 * (tp[union > 0] / union[union > 0]).mean().item(), 100 * (tp.sum() / n).item(),
            all_sum(ce).item() / n.item())

# ------------------------------------------------------------------------------------------------
# Diagnostics: the held-out denoising loss, what the self-conditioning term carries

@torch.no_grad()
def heldout_loss(model, diffusion, data, sums, *, seed, batch_size, autocast, repeats=4):
    """The plain denoising loss of test images per noise-level bin of the trainer's LossSums."""
    # no augmentation, no EDM uncertainty weight, the same draws for every checkpoint: arms compare
    # alike
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    for _ in range(repeats):
        for i in torch.arange(len(data)).split(batch_size):
            xb = data.batch(i).to(device)
            cond = {"y": data.y[i].to(device)} if getattr(model, "num_classes", 0) else {}
            with autocast:
                loss, level = diffusion.loss(model, xb, **cond)[:2]
            sums.add(loss.float(), level, {})
    rec = sums.read(1)  # every rank computed the same: nothing to reduce
    return [rec[f"loss_bin{i}"] for i in range(sums.BINS)]

def explained(target, x):
    """The share of target's (N, D) variance explained by a linear map of x (N, k) + intercept."""
    x = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    target = target.double()
    residual = target - x @ torch.linalg.lstsq(x, target).solution
    return 1 - (residual.square().sum() / (target - target.mean(0)).square().sum()).item()

@torch.no_grad()
def sc_stats(model, diffusion, data, t, nuisance, *, seed, batch_size, autocast):
    """What self-conditioning adds to emb, d = TimeMLP_sc(t) * Linear(GAP(h_k)) (Sec. 4.1)."""
    # |d| / |emb| per noise-level bin as training draws t; at the probe's t the share of d's
    # variance across images explained linearly by class and by the toy's nuisance draws
    seen = []  # (d, emb) of each forward
    hook = model.self_cond.register_forward_hook(lambda m, inputs, out: seen.append(
        ((out - inputs[0]).float().cpu(), inputs[0].float().cpu())))
    device, bins, terms = next(model.parameters()).device, [[] for _ in range(5)], []
    torch.manual_seed(seed)
    try:
        for i in torch.arange(len(data)).split(batch_size):
            x = data.batch(i).to(device)
            with autocast:  # t drawn as training draws it
                level = diffusion.loss(model, x)[1].cpu()
            d, emb = seen.pop()
            for b, r in zip((level * 5).long().clamp(max=4).tolist(),
                            (d.norm(dim=1) / emb.norm(dim=1)).tolist()):
                bins[b].append(r)
            tt = torch.full((len(x),), t, device=device)
            with autocast:  # at the probe level
                diffusion.pred(model, diffusion.add_noise(x, tt, torch.randn_like(x)), tt)
            terms.append(seen.pop()[0])
    finally:
        hook.remove()
    d = torch.cat(terms)
    return {"norm_ratio_by_level": [float(np.mean(b)) if b else None for b in bins],
            "r2_class": explained(d, F.one_hot(data.y).float()),
            "r2_nuisance": None if nuisance is None else explained(d, torch.as_tensor(nuisance))}

# ------------------------------------------------------------------------------------------------
# The plan: every checkpoint read and every flag checked against it, before any work

def resolve_layers(names, model):
    """Canonical layer names: "6" -> out_6 / block_6, "all" -> every layer (UViT: cls_1 ..)."""
    known = list(model.feature_layers) + list(getattr(model, "cls_layers", []))
    extra = {"cls"} if len(known) > len(model.feature_layers) else set()
    out = []
    for n in names:
        n = f"{known[0].rsplit('_', 1)[0]}_{n}" if n.isdigit() else n
        new = known if n == "all" else [n]
        if not set(new) <= set(known) | extra:
            raise SystemExit(f"unknown layer {n!r}: use one of "
                             f"{', '.join(known + sorted(extra))}, all")
        out += [l for l in new if l not in out]
    return out

def run_key(args, skip=BOOKKEEPING):
    """A run's arguments as a key, but those in skip."""
    return json.dumps({k: v for k, v in args.items() if k not in skip}, sort_keys=True)

def plan(a):
    """([Job] of every --ckpt, the summary's folder), or one line on what does not fit."""
    if a.data_path and not a.dataset:
        raise SystemExit("--data-path needs --dataset (the dataset it holds)")
    folder = "probe" + "-dense" * a.dense + (f"-{Path(a.dataset).name}" if a.dataset else "")
    paths, root = [Path(p) for p in a.ckpt], a.out and Path(a.out)
    if len(paths) > 1:  # a folder each, the summary beside them
        root = root or Path(os.path.commonpath([p.parent.absolute() for p in paths])) / folder
    jobs = []
    for p in paths:
        mod, args, ckpt = read_checkpoint(p)  # metadata only: exists, loads, names a trainer
        if a.raw and "model" not in ckpt:
            raise SystemExit(f"--raw: {p} is a snapshot holding the EMA only; use the run's "
                             "ckpt.pt")
        if a.dataset:  # its own default location, never the run's; an existing folder is itself
            own = a.data_path is None and a.dataset not in DENSE and Path(a.dataset).is_dir()
            path = a.dataset if own else a.data_path or DENSE.get(a.dataset, ["data"])[0]
            vars(args).update(dataset=Path(a.dataset).name if own else a.dataset, data_path=path,
                              cache_dir=None)  # "data": the trainers' default --data-path
        elif a.dense and args.dataset not in mod.SHAPES:
            raise SystemExit(f"--dense: {args.dataset} has no label maps; pass --dataset ade20k, "
                             f"voc or a folder with images/ and annotations/")
        with torch.device("meta"):  # shapes only: layers and modules, no weights
            model = mod.build_model(args)
        diffusion = mod.build_diffusion(args)
        if a.sc_stats and getattr(model, "self_cond", None) is None:
            raise SystemExit(f"--sc-stats: {p} was not trained with --self-cond (a UNet or DiT's "
                             f"term is measured; UViT's [CLS] token adds none)")
        integer = diffusion.kind == "DDPM"
        ts = a.t or (GRIDS[diffusion.kind] + [args.probe_t] if a.grid else [args.probe_t])
        ts = sorted({int(round(t)) if integer else float(t) for t in ts})
        hi = diffusion.T if integer else 1 if diffusion.kind == "RF" else math.inf
        if not all(0 < t <= hi for t in ts):
            raise SystemExit(f"--t {ts} out of range for {diffusion.kind} in {p}: native units in "
                             f"(0, {hi}] (DDPM step of T, EDM sigma, RF t with 1 = noise)")
        layers = resolve_layers(a.layer or (["all"] if a.grid else [args.sc_layer]), model)
        out = root / ckpt_name(p) if len(paths) > 1 else root or p.parent / folder
        jobs.append(Job(p, out, mod, args, ts, layers, run_key(ckpt["args"])))
    return jobs, root

# ------------------------------------------------------------------------------------------------
# Probing one checkpoint

def networks(a, job, device, first=None):
    """({name: model}, diffusion, ckpt): the EMA (--raw: online) and --init's initial weights."""
    _, _, model, diffusion, ckpt = load_checkpoint(job.path, raw=a.raw, device=device)
    models = {"trained": model}
    if a.init and first is None:  # an earlier snapshot of the run (first) measured them
        torch.manual_seed(job.args.seed)  # as its trainer starts: it seeds, then builds
        models["init"] = for_inference(job.mod.build_model(job.args), device)
    return models, diffusion, ckpt

def recipe(a, args):
    """Table 11's lr, epochs and global batch (the table11 and dense heads)."""
    latent = getattr(args, "latent", "none") != "none"
    return dict(lr=a.lr or (2e-3 if latent else 4e-3),
                epochs=a.epochs or (15 if args.dataset in ("cifar10", "cifar100") else 30),
                batch_size=a.batch_size or (1440 if latent else PROBE_BATCH.get(args.net, 128)))

def train_views(a, args, n):
    """(flip, views): each of the n training images in --draws noise draws, each in both flips
    unless --no-flip or the run trained without them (--dense takes one draw)."""
    flip = a.flip if a.flip is not None else getattr(args, "flip", True)
    return flip, [(f, _seed(a.seed, TRAIN, d)) for d in range(a.draws)
                  for f in [None, torch.ones(n, dtype=torch.bool)][:1 + flip]]

def cells(a, job, models, diffusion, data, views, device, pixels, pool=True):
    """(cell, train Split, test Split) of every cell, one noise level's features at a time."""
    ex = dict(batch_size=a.extract_batch, spill=job.out, pool=pool,
              autocast=job.mod.autocast(device, a.precision))
    for t in job.ts:
        px = pixels and t == job.ts[0]  # no noise level changes the raw pixels
        cs = [Cell(net, t, l) for net in models for l in job.layers] + [Cell("pixels")] * px
        splits = []  # the test images in one view, unflipped
        for d, v, name in zip(data, (views, [(None, _seed(a.seed, TEST))]), ("train", "test")):
            f = extract(models, diffusion, d, t, job.layers, v, pixels=px, **ex,
                        desc=f"t={t:g} {name} features")
            splits.append(Split(d.y, {c: (f[c.net], c.layer) for c in cs}, len(v),
                                a.extract_batch))
        yield from ((c, *splits) for c in cs)

def probe_checkpoint(a, job, device, log, first=None):
    """One checkpoint's record, also in job.out/probe.json; first: an earlier snapshot's."""
    mod, args = job.mod, job.args
    models, diffusion, ckpt = networks(a, job, device, first)
    train, test = (load_split(mod, args, ckpt, s) for s in ("train", "test"))
    n_train, hp = len(train), recipe(a, args)
    if a.limit:  # the same random subset for every checkpoint
        pick = lambda d: Data(d.x, d.y, d.stats, torch.randperm(
            len(d), generator=torch.Generator().manual_seed(a.seed))[:a.limit])
        train, test = pick(train), pick(test)
    flip, views = train_views(a, args, len(train))
    classes = int(max(train.y.max(), test.y.max())) + 1
    log(f"probing {job.path} ({'online' if a.raw else 'EMA'}, {diffusion.kind}) on "
        f"{args.dataset}: {len(train)} train / {len(test)} test, t {job.ts}, layers "
        f"{job.layers}, {a.head} head, {len(views)} views per training image")
    results = []  # a head per cell: accuracies (%), final training loss; lbfgs: held-out, l2
    for c, tr, te in cells(a, job, models, diffusion, (train, test), views, device,
                           a.raw_pixels and first is None):
        held = l2 = None
        if a.head == "lbfgs":
            predict, held, l2 = fit_lbfgs(tr, c, classes, device, a.seed, log)
        else:
            predict = fit_table11(tr, c, classes, device, seed=a.seed, flip=flip, **hp)
        loss, acc = evaluate(tr, c, predict, device)
        results.append({**asdict(c), "test": evaluate(te, c, predict, device)[1], "train": acc,
                        "loss": loss, "held_out": held, "l2": l2})
    kw = dict(batch_size=a.extract_batch, autocast=mod.autocast(device, a.precision))
    losses = heldout_loss(models["trained"], diffusion, test, mod.LossSums(),
                          seed=_seed(a.seed, LOSS), **kw) if a.loss else None
    nuisance = mod.shapes_split(args, "test")[3][test.rows.numpy()] \
        if a.sc_stats and args.dataset in mod.SHAPES else None
    sc = sc_stats(models["trained"], diffusion, test, args.probe_t, nuisance,
                  seed=_seed(a.seed, SC), **kw) if a.sc_stats else None
    results += [r for r in (first or {}).get("results", []) if r["net"] != "trained"]
    get = {Cell(r["net"], r["t"], r["layer"]): r for r in results}.get
    best = max((r for r in results if r["net"] == "trained"),
               key=lambda r: r[PICK[a.head][0]])
    cell = get(Cell("trained", args.probe_t, args.sc_layer)) or best
    init, pixels = get(Cell("init", cell["t"], cell["layer"])), get(Cell("pixels"))
    rec = {"ckpt": str(job.path), "script": ckpt["script"], "kind": diffusion.kind,
           "weights": "online" if a.raw else "ema", "dataset": args.dataset,
           "trained_on": ckpt["args"]["dataset"], "args": ckpt["args"],
           "images": ckpt.get("images"), "epoch": (ckpt.get("images") or 0) / n_train,
           "train_size": n_train, "head": a.head, **(hp if a.head == "table11" else {}),
           "draws": a.draws, "flip": flip, "views": len(views), "train_images": len(train),
           "test_images": len(test), "classes": classes, "chance": 100 / classes,
           "seed": a.seed, "ts": job.ts, "layers": job.layers, "heldout_loss_by_level": losses,
           "sc_stats": sc, "results": results, "cell": {**cell, "init": init and init["test"]},
           "raw_pixels": pixels and pixels["test"],
           "best": {**best, "flags": f"--sc-layer {best['layer'].replace('cls_', 'out_')} "
                                     f"--probe-t {best['t']:g}"}}
    if world()[0] == 0:
        report(rec, job, log)
    return rec

def dense_checkpoint(a, job, device, log):
    """--dense on one checkpoint: its record, also written to job.out/probe.json."""
    mod, args = job.mod, job.args
    models, diffusion, ckpt = networks(a, job, device)
    res, encode, hp = args.resolution, None, recipe(a, args)
    if getattr(args, "latent", "none") != "none":  # images at 256, through the run's VA-VAE
        vae, stats = mod.load_vae(args, device), ckpt["latent_stats"]
        mean, std = (stats[k].to(device)[None, :, None, None] for k in ("mean", "std"))
        encode, res = lambda x: (vae.encode(x.to(device)).float() - mean) / std, mod.IMAGE_SIZE
    (x, masks), (x_test, masks_test) = (load_segmentation(mod, args, s, res)
                                        for s in ("train", "test"))
    classes = DENSE[args.dataset][1] if args.dataset in DENSE else int(max(
        masks[masks != 255].max(), masks_test[masks_test != 255].max())) + 1
    data = [Data(d, torch.zeros(len(d), dtype=torch.long), encode=encode) for d in (x, x_test)]
    log(f"dense probe of {job.path} on {args.dataset}: {len(x)} train / {len(x_test)} test "
        f"images, one ADM centre crop each at {res}x{res} (label maps nearest-neighbour), "
        f"{classes} classes, 255 ignored; lr {hp['lr']:g} epochs {hp['epochs']} batch "
        f"{hp['batch_size']}")
    (flip, views), results = train_views(a, args, len(x)), []
    for c, tr, te in cells(a, job, models, diffusion, data, views, device, a.raw_pixels, False):
        predict = fit_dense(tr, c, masks, classes, device, seed=a.seed, flip=flip, **hp)
        miou, acc, _ = dense_scores(te, c, predict, masks_test, classes)
        _, train_acc, loss = dense_scores(tr, c, predict, masks, classes)
        results.append({**asdict(c), "miou": miou, "pixel_acc": acc,
                        "train_pixel_acc": train_acc, "train_loss": loss})
        log(f"dense {c}: mIoU {miou:.2f}%, pixel accuracy {acc:.2f}%; train pixel accuracy "
            f"{train_acc:.2f}% (loss {loss:.4f})")
    rec = {"ckpt": str(job.path), "dataset": args.dataset, "trained_on": ckpt["args"]["dataset"],
           "resolution": res, "classes": classes, "images": ckpt.get("images"), **hp,
           "results": results}
    if world()[0] == 0:
        write(job.out / "probe.json", rec)
    return rec

# ------------------------------------------------------------------------------------------------
# Report: a checkpoint's lines, the grid's table and the Fig. 4-5 chart (accuracy against layer)

def write(path, rec):
    """rec as indented JSON at path, its folder made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=1))

def in_domain(job, rec):
    """(file, test %) of this checkpoint's own in-domain probe, same head and cell, or None."""
    cell = ("trained", rec["cell"]["t"], rec["cell"]["layer"])
    for name in ("", ckpt_name(job.path)):  # probed alone, or among the run's snapshots
        home = job.path.parent / "probe" / name / "probe.json"
        old = json.loads(home.read_text()) if home.exists() else {}
        if Path(old.get("ckpt", "")).absolute() == job.path.absolute() and \
                old.get("head") == rec["head"]:  # another snapshot's or head's figure is no match
            return next(((home, r["test"]) for r in old["results"]
                         if (r["net"], r["t"], r["layer"]) == cell), None)
    return None

def report(rec, job, log):
    """Rank 0's lines and files of a checkpoint's record."""
    for r in rec["results"]:
        held = "" if r["l2"] is None else f", held-out {r['held_out']:.2f}% at l2 {r['l2']:g}"
        log(f"{Cell(r['net'], r['t'], r['layer'])}: test {r['test']:.2f}%, train "
            f"{r['train']:.2f}% (loss {r['loss']:.4f}){held}")
    acc, cell, best = {(r["t"], r["layer"]): r["test"] for r in rec["results"]
                       if r["net"] == "trained"}, rec["cell"], rec["best"]
    if len(acc) > 1:
        log("test accuracy (%)\n" + table(acc, rec["ts"], rec["layers"]))
    parts = [f"trained {cell['test']:.2f}%"] + [f"{k} {v:.2f}%" for k, v in (
        ("at init", cell["init"]), ("raw pixels", rec["raw_pixels"])) if v is not None]
    log(f"t={cell['t']:g} {cell['layer']} ({rec['head']} head): {', '.join(parts)}, "
        f"chance {rec['chance']:.2f}%")
    if rec["dataset"] != rec["trained_on"] and (home := in_domain(job, rec)):
        log(f"in-domain ({rec['trained_on']}, {home[0]}): {home[1]:.2f}% at the same cell")
    if rec["heldout_loss_by_level"]:
        log("held-out loss by noise level " + " ".join(
            f"{v:.4f}" for v in rec["heldout_loss_by_level"]))
    if sc := rec["sc_stats"]:
        log("self-conditioning term / emb norm by noise level " + " ".join(
            "-" if r is None else f"{r:.3f}" for r in sc["norm_ratio_by_level"]) +
            f"; its variance explained by class {sc['r2_class']:.1%}" + ("" if sc["r2_nuisance"]
                is None else f", by the nuisance draws {sc['r2_nuisance']:.1%}"))
    log(f"best cell t={best['t']:g} {best['layer']}, chosen {PICK[rec['head']][1]}: "
        f"test {best['test']:.2f}%")
    if len(acc) > 1:  # Sec. 4.1: self-conditioning reads the baseline's best probe layer
        log(f"the paper's rule for a new setting: on a baseline checkpoint the best cell is where "
            f"self-conditioning reads; train with the baseline's command plus\n"
            f"    --self-cond {best['flags']}")
    write(job.out / "probe.json", rec)
    series = {f"t={t:g}": {i: (v[0], 0.0) for i, v in by_layer(
        rec["results"], t, cell["layer"].rpartition("_")[0]).items()} for t in rec["ts"]}
    if max(map(len, series.values())) > 1:
        chart(job.out / "probe.png", series, f"{rec['script']} {rec['kind']} {rec['dataset']}",
              rec["raw_pixels"])
    log(f"wrote {job.out / 'probe.json'}")

def table(acc, ts, layers):
    """Rows t, columns layers: accuracy {(t, layer): %}."""
    w = max(8, *(len(l) + 1 for l in layers))
    return "\n".join(["t".ljust(8) + "".join(l.rjust(w) for l in layers)] + [
        f"{t:<8g}" + "".join(f"{acc[(t, l)]:{w}.2f}" for l in layers) for t in ts])

def by_layer(results, t, kind):
    """{layer index: [test accuracy]} of the trained network's `kind` layers (out, block, cls)."""
    out = {}
    for r in results:
        k, _, i = r["layer"].rpartition("_")
        if r["net"] == "trained" and r["t"] == t and k == kind and i.isdigit():
            out.setdefault(int(i), []).append(r["test"])
    return out

def chart(path, series, title, baseline=None):
    """A line per series {label: {layer index: (mean, std)}}, a dashed raw-pixel baseline."""
    xs = sorted({i for pts in series.values() for i in pts})
    W, H, L, R, T, B = 760, 440, 60, 190, 40, 50
    vals = [m + s * k for pts in series.values() for m, s in pts.values() for k in (-1, 1)]
    lo = math.floor(min(vals + [baseline or 100]) / 5) * 5
    hi = math.floor(max(vals + [baseline or 0]) / 5) * 5 + 5
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    X = lambda i: L + (W - L - R) * (xs.index(i) + 0.5) / len(xs)
    Y = lambda a: H - B - (H - T - B) * (a - lo) / (hi - lo)
    d.rectangle([L, T, W - R, H - B], outline="black")
    for a in range(lo, hi + 1, 5 if hi - lo <= 50 else 10):
        d.line([L, Y(a), W - R, Y(a)], fill=(225, 225, 225))
        d.text((L - 8, Y(a)), f"{a}", fill="black", anchor="rm")
    for i in xs:
        d.text((X(i), H - B + 6), str(i), fill="black", anchor="ma")
    d.text(((L + W - R) / 2, H - 20), "layer", fill="black", anchor="ma")
    d.text((L, T - 24), "linear probe accuracy (%)   " + title, fill="black")
    for j, (label, pts) in enumerate(series.items()):
        c, ly = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                 (140, 86, 75), (127, 127, 127), (23, 190, 207)][j % 8], T + 10 + 18 * j
        xy = [(X(i), Y(pts[i][0])) for i in sorted(pts)]
        if len(xy) > 1:
            d.line(xy, fill=c, width=2)
        for (x, y), (m, s) in zip(xy, (pts[i] for i in sorted(pts))):
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)
            d.line([x, Y(m - s), x, Y(m + s)], fill=c, width=1)
        d.line([W - R + 12, ly, W - R + 32, ly], fill=c, width=2)
        d.text((W - R + 38, ly), label, fill="black", anchor="lm")
    if baseline is not None:
        for x in range(L, W - R, 12):
            d.line([x, Y(baseline), min(x + 6, W - R), Y(baseline)], fill="gray", width=2)
        d.text((W - R + 12, T + 10 + 18 * len(series)), f"pixels {baseline:.1f}", fill="gray",
               anchor="lm")
    img.save(path)

# ------------------------------------------------------------------------------------------------
# Several checkpoints: App. A's snapshot rule, seeds, arms and their paired differences

def mean_std(values):
    """(mean, std) of the values that are not None; None if none is."""
    v = [x for x in values if x is not None]
    return (float(np.mean(v)), float(np.std(v))) if v else None

def app_a(snapshots, on="test"):
    """The snapshot standing for a run (App. A): CIFAR's best of 800/1000/1200, else the last."""
    # "best" by the cell's `on` figure: the paper picked on test (table11 reproduces it), the lbfgs
    # head picks on its held-out tenth of the training images, so test never chooses
    at = lambda r, e: 0 <= r["epoch"] - e < r["args"]["batch_size"] / r["train_size"]  # in a step
    picks = [r for r in snapshots if r["dataset"] == r["trained_on"] and any(
        at(r, e) for e in APP_A_EPOCHS.get(r["trained_on"], ()))]
    return max(picks, key=lambda r: r["cell"][on]) if picks else \
        max(snapshots, key=lambda r: r["images"] or 0)

def trajectories(records, log):
    """[the snapshot that stands for each run], and each run's trajectory (several snapshots)."""
    on, how = PICK[records[0]["head"]]
    runs, stands, out = {}, [], []
    for r in records:
        runs.setdefault(run_key(r["args"]), []).append(r)
    for rs in (sorted(rs, key=lambda r: r["images"] or 0) for rs in runs.values()):
        stands.append(pick := app_a(rs, on))  # one pick per run (ties: the earliest snapshot)
        if len(rs) == 1:
            continue
        cell = rs[0]["cell"]
        out.append({"ckpts": [r["ckpt"] for r in rs], "images": [r["images"] for r in rs],
                    "test": [r["cell"]["test"] for r in rs], "stands": pick["ckpt"]})
        log(f"along {Path(rs[0]['ckpt']).parent} at t={cell['t']:g} {cell['layer']}: " + ", ".join(
            f"{r['images']:,} images {r['cell']['test']:.2f}%" for r in rs))
        log(f"    the run's figure (App. A: CIFAR's best of epochs 800/1000/1200 {how}, else the "
            f"final snapshot): {pick['ckpt']} ({pick['images']:,} images)")
    return stands, out

def summarize(records, out, log):
    """Mean +- std over each arm's seeds, paired differences from the first arm; their files."""
    f = lambda ms, d=2: "-" if ms is None else f"{ms[0]:.{d}f} +- {ms[1]:.{d}f}"
    chosen, runs = trajectories(records, log)
    arms, rows, series = {}, [], {}
    for r in chosen:
        arms.setdefault(run_key(r["args"], BOOKKEEPING | {"seed"}), []).append(r)
    varying = sorted({k for r in chosen for k, v in r["args"].items() if k not in BOOKKEEPING
                      and k != "seed" and any(v != q["args"].get(k) for q in chosen)})
    for rs in arms.values():
        label = ", ".join(f"{k}={rs[0]['args'].get(k)}" for k in varying) or "all"
        cell, seeds = rs[0]["cell"], {r["args"]["seed"]: r["cell"]["test"] for r in rs}
        row = {"arm": label, "n": len(rs), "seeds": list(seeds),
               "cell": [cell["t"], cell["layer"]],
               "test": mean_std(seeds.values()), "train": mean_std(r["cell"]["train"] for r in rs),
               "best": mean_std(r["best"]["test"] for r in rs),
               "best_cells": [f"t={r['best']['t']:g} {r['best']['layer']}" for r in rs],
               "init": mean_std(r["cell"]["init"] for r in rs),
               "raw_pixels": mean_std(r["raw_pixels"] for r in rs)}
        if rs[0]["heldout_loss_by_level"]:
            row["heldout_loss_by_level"] = [mean_std(v) for v in zip(
                *(r["heldout_loss_by_level"] for r in rs))]
        base = rows[0] if rows else None
        common = [s for s in seeds if base and s in base["by_seed"]]
        if common:  # per seed: both arms start from the same weights and see the same data
            diff = [seeds[s] - base["by_seed"][s] for s in common]
            row["paired"] = {"vs": base["arm"], "seeds": common, "diff": diff,
                             "mean_std": mean_std(diff)}
        rows.append({**row, "by_seed": seeds})
        per_layer = by_layer([q for r in rs for q in r["results"]], cell["t"],
                             cell["layer"].rpartition("_")[0])
        series[f"{label} (t={cell['t']:g})"] = {i: mean_std(v) for i, v in per_layer.items()}
        log(f"{label} ({len(rs)} seeds): t={cell['t']:g} {cell['layer']} {f(row['test'])}% (train "
            f"{f(row['train'])}%), best cell {f(row['best'])}% ({', '.join(row['best_cells'])}), "
            f"at init {f(row['init'])}%, raw pixels {f(row['raw_pixels'])}%")
        if "heldout_loss_by_level" in row:
            log("    held-out loss by noise level " + ", ".join(
                f(ms, 4) for ms in row["heldout_loss_by_level"]))
        if "paired" in row:
            log(f"    minus {base['arm']}, per seed " + ", ".join(f"{d:+.2f}" for d in diff) +
                f": {f(row['paired']['mean_std'])} points")
    write(out / "summary.json", {"arms": rows, "runs": runs})
    pixels = mean_std(r["raw_pixels"] for r in chosen)
    chart(out / "layers.png", series, f"{chosen[0]['script']} {chosen[0]['dataset']}",
          pixels and pixels[0])
    log(f"wrote {out / 'summary.json'} and {out / 'layers.png'}")

def main(argv=None):
    """Probe every --ckpt; its record, or their list (several: the summary too)."""
    a = get_args(argv)
    jobs, root = plan(a)  # every flag against every checkpoint: one line within seconds
    rank, _, device = jobs[0].mod.setup_distributed()
    log = print if rank == 0 else (lambda *_: None)
    records, firsts = [], {}  # the first snapshot of each run: --init, --raw-pixels once a run
    for job in jobs:
        records.append(dense_checkpoint(a, job, device, log) if a.dense else
                       probe_checkpoint(a, job, device, log, firsts.get(job.run)))
        firsts.setdefault(job.run, records[-1])
    if len(records) > 1 and rank == 0 and not a.dense:
        summarize(records, root, log)
    if dist.is_initialized():
        dist.destroy_process_group()
    return records[0] if len(records) == 1 else records

if __name__ == "__main__":
    main()
