"""
Linear probing of DDAE++ checkpoints (train_unet.py, train_uvit.py or train_dit.py): frozen EMA-model
features at a noise level t and a layer, globally average pooled, classified by BatchNorm(affine=False)
+ Linear, trained with Adam and a cosine schedule (paper Table 11). Several t and layers train one head
per (t, layer) in the same pass over the data; --grid searches a default grid and draws accuracy against
layer (paper Fig. 4-5) and prints the flags that self-condition on the best cell (the paper's rule).

    python probe.py --ckpt runs/X/ckpt.pt --init --raw-pixels    # Table 10 cell, at init, raw pixels
    python probe.py --ckpt runs/X/ckpt.pt --grid                  # every (t, layer)
    python probe.py --ckpt runs/*/ckpt.pt --grid --loss           # several runs: mean +- std per arm
    torchrun --nproc_per_node=8 probe.py --ckpt runs/X/ckpt.pt --grid   # 8 GPUs, data-parallel

Memory, so that ImageNet-1k fits a node: the noise levels are probed one after another (a forward per
level either way); each rank extracts and keeps only its own rows (the extraction batches rank,
rank + world, ...) as float16, and the heads train data-parallel on them (BatchNorm statistics and
gradients all-reduced: every rank takes the steps one process holding all rows would). Latents are
read from the memory-mapped VA-VAE cache a batch at a time, and only the EMA weights are loaded.
Output: tables on stdout, <out>/probe.json and (several layers) <out>/probe.png; with several
checkpoints also <out>/summary.json and <out>/layers.png.
"""
import argparse
import contextlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

from sample import ckpt_name, for_inference, load_checkpoint, setup_distributed

# ----------------------------------------------------------------------------
# Defaults (paper Tables 10-11)

# Grids in native units around the Table 10 optima (DDPM int t of T=1000; EDM sigma; RF t, t=1 is
# noise). EDM: steps 2-8 from the end of the 18-step Heun schedule, written as Table 10 does
# (0.06 = step 4, 0.2964 = step 6).
GRIDS = {
    'DDPM': [1, 11, 21, 41, 66, 101, 151],
    'EDM': [0.0075, 0.023, 0.06, 0.14, 0.2964, 0.59, 1.09],
    'RF': [0.02, 0.06, 0.1, 0.15, 0.25, 0.4, 0.6],
}
# Table 11's probe: Adam, cosine, flip; lr 4e-3 pixel / 2e-3 latent; 15 epochs on CIFAR, 30 elsewhere.
# Its global batch: 1440 for latents, where the table gives pre-training and probing a batch each
# (1024, 1440); for pixels it prints one batch row across both columns, which we read as shared:
# 512 ddpm, 256 ddpmpp and UViT-S. (DDAE, whose probe the paper simplifies, ran 128 per GPU on
# 4 GPUs, 512 for every net.) The CPU presets ('tiny') are not in the paper: 128.
PROBE_BATCH = {'ddpm': 512, 'ddpmpp': 256, 'uvit_s': 256}
MAX_PIXEL_DIM = 12288  # raw pixels: flattened up to 64x64x3 (and 16x16x32 latents), pooled above


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ckpt', required=True, nargs='+',
                   help='checkpoint(s) of a train_*.py script; several: mean +- std per arm')
    p.add_argument('--raw', action='store_true', help='probe the online weights, not the EMA')
    p.add_argument('--t', type=float, nargs='+',
                   help="noise level(s), native units (default: the checkpoint's probe_t)")
    p.add_argument('--layer', nargs='+',
                   help='layer(s): out_6, 6, block_9, cls (UViT [CLS]) or all (default: sc_layer)')
    p.add_argument('--grid', action='store_true',
                   help="--t defaults to the formulation's grid and --layer to all")
    p.add_argument('--raw-pixels', action='store_true', help='also probe raw pixels (the baseline)')
    p.add_argument('--init', action='store_true',
                   help="also probe the same network at its initial weights (the run's seed)")
    p.add_argument('--dense', action='store_true',
                   help='dense probe instead: a linear classifier per location on the unpooled '
                        'features of one (t, layer), scored by mIoU and pixel accuracy (shapes: its '
                        'masks; else --data-path with images/ and annotations/, ignore index 255)')
    p.add_argument('--loss', action='store_true',
                   help='also the held-out denoising loss per noise-level bin (test split)')
    p.add_argument('--sc-stats', action='store_true',
                   help='also what the self-conditioning term adds to emb (UNet, DiT): its norm per '
                        'noise-level bin, and the share of its variance explained by class (and, '
                        'on shapes, by the toy\'s nuisance draws) at the probe level')
    p.add_argument('--precision', choices=['auto', 'bf16', 'fp32'], default='auto',
                   help='bf16 autocast (auto: on CUDA) or fp32')
    # Measured once (shapes, tiny DDPM UNet after 32k images, --limit 2000 --epochs 15, out_2):
    # t=11 32.20% cached vs 32.20% fresh, t=101 27.40% vs 27.60%. Small-t noise barely moves the
    # features (2% of their spread at t=11) and random flips of two cached views are the same
    # augmentation, while fresh costs epochs + 1 extractions, not 3.
    p.add_argument('--feature-mode', choices=['cached', 'fresh'], default='cached',
                   help='cached: 2 flips x fixed noise, extracted once; fresh: new noise and flips '
                        'every epoch (the paper)')
    p.add_argument('--epochs', type=int, help='default 15 on CIFAR, 30 otherwise (Table 11)')
    p.add_argument('--lr', type=float, help='default 4e-3 pixel, 2e-3 latent (Table 11)')
    p.add_argument('--batch-size', type=int,
                   help='global probe batch, default 512 ddpm, 256 ddpmpp / UViT-S, 1440 latent '
                        '(Table 11), 128 tiny')
    p.add_argument('--extract-batch', type=int, default=256,
                   help='images per forward; batches are dealt round-robin to ranks')
    p.add_argument('--dataset',
                   help='transfer: probe the frozen model on this labelled dataset instead (a name the '
                        'trainers know, or class folders), resized to the model\'s input')
    p.add_argument('--data-path', help="--dataset's folder (default: the run's)")
    p.add_argument('--limit', type=int, help='probe a fixed random subset of this many images')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', help='default <ckpt dir>/probe[-<dataset>] (several: <common parent>/...)')
    return p.parse_args(argv)


# ----------------------------------------------------------------------------
# Data-parallel bookkeeping: rank r owns the rows of extraction batches r, r + world, ...

def world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def owned(i, block):
    """Which of the rows i (N,) this rank owns, for extraction batches of `block` rows."""
    rank, size = world()
    return i // block % size == rank


def local_rows(i, block):
    """This rank's storage row of each owned row i: its batches are stored one after another."""
    return i // block // world()[1] * block + i % block


# ----------------------------------------------------------------------------
# Data and features

class Data:
    """A labelled split read a batch at a time in model space: uint8 pixels (N, 3, H, W) in memory,
    or the VA-VAE cache (N, 2 flips, 32, 16, 16) float16, memory-mapped, normalised per batch with
    the training latents' statistics. `rows` picks a subset (--limit); `encode` maps pixels to the
    network's input (a latent DiT's dense probe encodes its 256x256 images on the fly)."""

    def __init__(self, x, y, stats=None, rows=None, encode=None):
        self.x, self.stats, self.encode = x, stats, encode
        self.rows = torch.arange(len(y)) if rows is None else rows
        self.y = y[self.rows]

    def __len__(self):
        return len(self.rows)

    def batch(self, i, flip):
        """Positions i (B,) -> (B, C, H, W) float32, horizontally flipped where flip (B,) is True."""
        idx = self.rows[i]
        if self.stats is None:
            x = self.x[idx].float() / 127.5 - 1
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            return x if self.encode is None else self.encode(x)
        # a flipped latent grid is not the latent of the flipped image: the cache holds both
        z = torch.from_numpy(np.asarray(self.x[idx.numpy(), flip.long().numpy()], np.float32))
        mean, std = (self.stats[k][:, None, None] for k in ('mean', 'std'))
        return (z - mean) / std


def load_split(mod, args, ckpt, split):
    """The split's Data: pixels through the trainer's loader (resized to the model's input if they
    differ: a transfer probe), latents from the cache of the VA-VAE's encoding."""
    if getattr(args, 'latent', 'none') == 'none':
        x, y = mod.load_pixels(args, split)
        if x.shape[-1] != args.resolution:
            x = F.interpolate(x.float(), size=args.resolution, mode='bicubic', antialias=True)
            x = x.round().clamp(0, 255).to(torch.uint8)
        return Data(x, y)
    d = mod.latent_cache(args, split)
    y = torch.from_numpy(np.load(d / 'labels.npy'))
    return Data(np.load(d / 'latents.npy', mmap_mode='r'), y, ckpt['latent_stats'])


def pixel_features(x):
    """Raw-pixel features (N, D) of model-space x (N, C, H, W): 2x2-pooled until D <= MAX_PIXEL_DIM."""
    while x[0].numel() > MAX_PIXEL_DIM:
        x = F.avg_pool2d(x, 2)
    return x.flatten(1)


def _seed(*ints):
    """A 32-bit generator seed from a tuple of ints (torch's CPU generator keeps only 32 bits of its seed)."""
    return int(np.random.SeedSequence(list(ints)).generate_state(1)[0])


def _rows(n, width, spill):
    """(n, width) float16 zeros: in memory when they take under half of this node's available memory
    shared among its ranks, else in a file under the folder `spill`, unlinked at once (the mapping
    keeps it until the array is freed, so nothing is left behind even by a kill)."""
    need = 2 * n * width
    with contextlib.suppress(OSError, StopIteration):
        with open('/proc/meminfo') as f:
            avail = next(int(l.split()[1]) * 1024 for l in f if l.startswith('MemAvailable'))
        if need > avail / 2 / int(os.environ.get('LOCAL_WORLD_SIZE', 1)) and spill is not None:
            spill.mkdir(parents=True, exist_ok=True)
            path = spill / f'.features-{os.getpid()}-{time.time_ns()}.npy'
            rows = np.lib.format.open_memmap(path, 'w+', np.float16, (n, width))
            path.unlink()
            return torch.from_numpy(rows)
    return torch.zeros(n, width, dtype=torch.float16)


class Features:
    """One rank's rows of the pooled features of several layers, in one or more views (the flips of
    an image), float16 around a float32 shift per column: the mean of its first batch, since
    pooled features can sit far from zero, where float16 is coarse (a shift per rank is harmless:
    every row is read back with its own rank's)."""

    def __init__(self, n, views=1, spill=None):
        self.n, self.views, self.spill, self.data, self.cols = n, views, spill, None, {}

    def put(self, rows, view, feats):  # rows: a slice of this rank's rows; feats {layer: (B, C)}
        f = torch.cat(list(feats.values()), 1).float().cpu()
        if self.data is None:
            self.data = _rows(self.views * self.n, f.shape[1], self.spill)
            self.shift = f.mean(0)
            bounds = np.cumsum([0] + [v.shape[1] for v in feats.values()])
            self.cols = {k: slice(a, b) for k, a, b in zip(feats, bounds[:-1], bounds[1:])}
        self.data[rows.start + view * self.n:rows.stop + view * self.n] = (f - self.shift).half()

    def get(self, rows, view=None):  # (B,), the view of each row (B,) -> {layer: (B, C) float32}
        f = torch.add(self.data[rows if view is None else rows + view.long() * self.n], self.shift)
        return {k: f[:, c] for k, c in self.cols.items()}


@torch.no_grad()
def extract(models, diffusion, data, t, layers, *, seed, views=(None,), batch_size=256, spill=None,
            desc=None, autocast=contextlib.nullcontext(), pool=True):
    """{model name: Features} of this rank's rows of data at noise level t, every layer, in each view
    (flips (N,): which images it flips; None: none). The noise of a batch depends on (seed, its first
    row) alone, not on t, the view, the layers or the number of ranks: a pair probed alone sees the
    features of a grid. pool=False: the unpooled maps, flattened."""
    rank, size = world()
    device = next(models['trained'].parameters()).device
    starts = list(range(0, len(data), batch_size))[rank::size]
    n = sum(min(batch_size, len(data) - b) for b in starts)
    out = {name: Features(n, len(views), spill) for name in models}
    row = 0
    for b in tqdm(starts, desc=desc, disable=rank > 0 or desc is None, leave=False):
        i = torch.arange(b, min(b + batch_size, len(data)))
        for v, flips in enumerate(views):
            x = data.batch(i, torch.zeros(len(i), dtype=torch.bool) if flips is None else flips[i])
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(_seed(seed, b)))
            tt = torch.full((len(x),), t, device=device)  # int64 for DDPM, float otherwise
            xt = diffusion.add_noise(x.to(device), tt, noise.to(device))
            for name, m in models.items():
                with autocast:  # unconditional (a conditional DiT: the null class), no augment label
                    f = diffusion.pred(m, xt, tt, feats=tuple(layers), pool=pool)[1]
                out[name].put(slice(row, row + len(i)), v, {l: f[l].flatten(1) for l in layers})
        row += len(i)
    return out


# ----------------------------------------------------------------------------
# Linear probes: one head per feature key, all trained in the same loop, data-parallel

class Split:
    """A split as one rank sees it: every label (N,), the width of each feature key, and epoch(e) ->
    feats(i), which gives {key: (len(i), C) float32} for rows i this rank owns (see owned())."""

    def __init__(self, y, dims, epoch, block):
        self.y, self.dims, self.epoch, self.block = y, dims, epoch, block

    def owned(self, i):
        return owned(i, self.block)


class Probe(nn.Module):
    """BatchNorm without affine (feature scales differ by orders of magnitude across t and layers) + Linear.
    Its batch statistics come from the caller, summed over every rank's part of the batch."""

    def __init__(self, dim, classes):
        super().__init__()
        self.register_buffer('mean', torch.zeros(dim))  # running statistics, as nn.BatchNorm1d's
        self.register_buffer('var', torch.ones(dim))
        self.fc = nn.Linear(dim, classes)
        nn.init.zeros_(self.fc.weight)  # the problem is convex: zero init loses nothing and needs no RNG,
        nn.init.zeros_(self.fc.bias)    # so a head in a grid starts exactly like its single run

    def forward(self, f, mean=None, var=None):  # training: the batch's statistics; eval: running
        mean, var = (self.mean, self.var) if mean is None else (mean, var)
        return self.fc((f - mean) / (var + 1e-5).sqrt())

    def track(self, mean, var, n):  # nn.BatchNorm1d's update: momentum 0.1, unbiased variance
        self.mean.lerp_(mean, 0.1)
        self.var.lerp_(var * n / (n - 1), 0.1)


def all_sum(t):
    """t summed over all ranks (in place)."""
    if world()[1] > 1:
        dist.all_reduce(t)
    return t


def batch_stats(f, n):
    """{key: (mean, biased var)} of a batch of n rows over all ranks, from float64 sums of each
    rank's rows f {key: (m, C)}: the statistics of the whole batch, as one process would see it."""
    sums = [torch.stack([v.double().sum(0), v.double().square().sum(0)]) for v in f.values()]
    flat = all_sum(torch.cat([s.flatten() for s in sums]))
    out = {}
    for k, s in zip(f, flat.split([s.numel() for s in sums])):
        s1, s2 = s.view(2, -1) / n
        out[k] = (s1.float(), (s2 - s1.square()).clamp(min=0).float())
    return out


def optimizer(heads, lr, steps):
    """Adam over every head's parameters with a cosine schedule over `steps` (Table 11)."""
    opt = torch.optim.Adam([p for h in heads.values() for p in h.parameters()], lr=lr)
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, cosine)


def step(opt, loss):
    """Backward, the gradients summed over the ranks, an Adam step."""
    params = [p for group in opt.param_groups for p in group['params']]
    opt.zero_grad(set_to_none=False)  # a rank with no rows in the batch still sends zeros
    loss.backward()
    grads = all_sum(torch.cat([p.grad.flatten() for p in params]))
    for p, g in zip(params, grads.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p))
    opt.step()


def train_probes(train, test, *, lr, epochs, batch_size, seed=0, device='cpu', log=None):
    """Train one probe per feature key of the Splits train and test; returns {key: test top-1 %}.

    One Adam over all heads equals one Adam per head (it is per-parameter) and the summed loss gives
    each head exactly its own gradient, so every head trains as if alone. Each rank takes the loss of
    the batch members it owns, over the whole batch's size; BatchNorm statistics are summed over the
    ranks and so are the gradients, so the steps do not depend on the number of ranks."""
    classes = int(max(train.y.max(), test.y.max())) + 1
    heads = {k: Probe(d, classes).to(device) for k, d in train.dims.items()}
    opt, sched = optimizer(heads, lr, epochs * math.ceil(len(train.y) / batch_size))
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        feats = train.epoch(epoch)
        perm = torch.randperm(len(train.y), generator=g)
        for i in range(0, len(train.y), batch_size):
            idx = perm[i:i + batch_size]
            if len(idx) > 1:  # BatchNorm cannot train on a single sample
                mine = idx[train.owned(idx)]
                f = {k: v.to(device) for k, v in feats(mine).items()}
                stats = batch_stats(f, len(idx))
                yb = train.y[mine].to(device)
                loss = sum(F.cross_entropy(h(f[k], *stats[k]), yb, reduction='sum')
                           for k, h in heads.items()) / len(idx)
                step(opt, loss)
                for k, h in heads.items():
                    h.track(*stats[k], len(idx))
            sched.step()
        if log:
            loss = all_sum(loss.detach().reshape(1)).item()
            log(f"epoch {epoch + 1}/{epochs} last-batch loss per head {loss / len(heads):.4f}")
    return evaluate(heads, test, device)


@torch.no_grad()
def evaluate(heads, test, device):
    """{key: top-1 accuracy in %} of the heads on the test split, counted over all ranks."""
    feats = test.epoch(0)
    rows = torch.arange(len(test.y))
    rows = rows[test.owned(rows)]
    correct = torch.zeros(len(heads), dtype=torch.float64, device=device)
    for i in range(0, len(rows), 4096):
        r = rows[i:i + 4096]
        f, y = feats(r), test.y[r].to(device)
        for j, (k, h) in enumerate(heads.items()):
            h.eval()
            correct[j] += (h(f[k].to(device)).argmax(1) == y).sum()
    correct = all_sum(correct).cpu()
    return {k: 100.0 * c.item() / len(test.y) for k, c in zip(heads, correct)}


# ----------------------------------------------------------------------------
# Dense probing: the usual linear segmentation protocol on frozen features, per location

SEG_SPLITS = {'train': ('training', 'train'), 'test': ('validation', 'val')}  # ADE20K's, plain


def load_segmentation(mod, args, split, res):
    """(uint8 images (N, 3, res, res), uint8 label maps (N, res, res), 255 ignored): the toy's masks
    for shapes; else <data-path>/images/<split>/* with <data-path>/annotations/<split>/<stem>.png
    (ADE20K's layout, split 'training'/'validation' or 'train'/'val')."""
    if args.dataset in getattr(mod, 'SHAPES', ()):
        x, _, masks, _ = mod.shapes_split(args, split)
        return x, masks
    root = Path(args.data_path)
    found = [n for n in SEG_SPLITS[split] if (root / 'images' / n).is_dir()]
    if not found:
        raise SystemExit(f"--dense: no {root / 'images'}/{' or '.join(SEG_SPLITS[split])}: point "
                         f"--data-path at a folder with images/ and annotations/ (ADE20K's layout)")
    xs, ms = [], []
    for f in sorted((root / 'images' / found[0]).iterdir()):
        mask = root / 'annotations' / found[0] / f'{f.stem}.png'
        if not mask.exists():
            raise SystemExit(f"--dense: {f} has no label map {mask}")
        with Image.open(f) as im, Image.open(mask) as m:
            xs.append(np.asarray(mod.center_crop(im.convert('RGB'), res)).transpose(2, 0, 1))
            ms.append(np.asarray(mod.center_crop(m, res, labels=True)))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ms))


def dense_probe(models, diffusion, train, test, t, layer, *, seed, block, epochs, lr, batch_size,
                device, autocast, log):
    """{model name: (mIoU %, pixel accuracy %)} of a per-location BatchNorm + Linear on the (C, h, w)
    features at (t, layer), its logits upsampled bilinearly to the label map (the same as upsampling
    the features: both maps are linear), cross-entropy over the labelled pixels. train, test: (Data,
    label maps); flips: two cached views, one picked per image and epoch, its label map flipped
    alike. Data-parallel as train_probes."""
    (data, masks), (data_test, masks_test) = train, test
    classes = int(max(masks[masks != 255].max(), masks_test[masks_test != 255].max())) + 1
    x0 = data.batch(torch.arange(1), torch.zeros(1, dtype=torch.bool)).to(device)
    t0 = torch.full((1,), t, device=device)
    shape = diffusion.pred(models['trained'], x0, t0, feats=(layer,), pool=False)[1][layer].shape[1:]
    ex = dict(t=t, layers=[layer], batch_size=block, autocast=autocast, pool=False)
    both = (torch.zeros(len(data), dtype=torch.bool), torch.ones(len(data), dtype=torch.bool))
    stores = extract(models, diffusion, data, seed=_seed(seed, 1), views=both, **ex)
    stores_test = extract(models, diffusion, data_test, seed=_seed(seed, 0), **ex)
    heads = {name: Probe(shape[0], classes).to(device) for name in models}
    opt, sched = optimizer(heads, lr, epochs * math.ceil(len(data) / batch_size))
    g, n_loc = torch.Generator().manual_seed(seed), shape[1] * shape[2]

    def maps(store, i, view=None):  # owned images i -> their feature rows (m * h * w, C)
        f = store.get(local_rows(i, block), view)[layer].view(len(i), *shape)
        return f.permute(0, 2, 3, 1).reshape(-1, shape[0]).to(device)

    def logits(out, size):  # (m * h * w, K) -> (m, K, H, W)
        out = out.view(-1, shape[1], shape[2], classes).permute(0, 3, 1, 2)
        return F.interpolate(out, size=size, mode='bilinear', align_corners=False)

    for epoch in range(epochs):
        pick = torch.rand(len(data), generator=torch.Generator().manual_seed(_seed(seed, 2 + epoch))) < 0.5
        perm = torch.randperm(len(data), generator=g)
        for i in range(0, len(data), batch_size):
            idx = perm[i:i + batch_size]
            if len(idx) > 1:  # BatchNorm cannot train on a single sample
                mine = idx[owned(idx, block)]
                y = torch.where(pick[mine, None, None], masks[mine].flip(-1), masks[mine]).long().to(device)
                f = {k: maps(s, mine, pick[mine]) for k, s in stores.items()}
                stats = batch_stats(f, len(idx) * n_loc)
                labelled = all_sum((y != 255).sum().double().reshape(1)).item()
                loss = sum(F.cross_entropy(logits(heads[k](v, *stats[k]), y.shape[1:]), y, ignore_index=255,
                                           reduction='sum') for k, v in f.items()) / max(labelled, 1)
                step(opt, loss)
                for k, h in heads.items():
                    h.track(*stats[k], len(idx) * n_loc)
            sched.step()
        log(f"dense epoch {epoch + 1}/{epochs} last-batch loss per head {loss.item() / len(heads):.4f}")
    conf = {k: torch.zeros(classes * classes, dtype=torch.float64, device=device) for k in heads}
    rows = torch.arange(len(data_test))
    with torch.no_grad():
        for i in rows[owned(rows, block)].split(256):
            y = masks_test[i].long().to(device)
            valid = y != 255
            for k, h in heads.items():
                pred = logits(h.eval()(maps(stores_test[k], i)), y.shape[1:]).argmax(1)
                conf[k] += torch.bincount(y[valid] * classes + pred[valid], minlength=classes ** 2)
    out = {}
    for k, c in conf.items():  # IoU per class present, mean; pixel accuracy
        c = all_sum(c).view(classes, classes).cpu()
        tp, union = c.diag(), c.sum(0) + c.sum(1) - c.diag()
        out[k] = (100 * (tp[union > 0] / union[union > 0]).mean().item(), 100 * (tp.sum() / c.sum()).item())
    return out


# ----------------------------------------------------------------------------
# Report: table and Fig. 4-5 style chart

def fmt_t(t):
    return 'pixels' if t is None else f"{t:g}"


def table(acc, ts, layers):
    """Rows t, columns layers, accuracy in %."""
    w = max(8, *(len(l) + 1 for l in layers))
    lines = ['t'.ljust(8) + ''.join(l.rjust(w) for l in layers)]
    lines += [fmt_t(t).ljust(8) + ''.join(f"{acc[(t, l)]:{w}.2f}" for l in layers) for t in ts]
    return '\n'.join(lines)


def chart(path, series, title, baseline=None):
    """Accuracy against layer index (paper Fig. 4-5): one line per series {label: {layer index:
    (mean, std)}}, std as error bars, and a dashed raw-pixel baseline."""
    xs = sorted({i for pts in series.values() for i in pts})
    W, H, L, R, T, B = 760, 440, 60, 190, 40, 50
    vals = [m + s * sign for pts in series.values() for m, s in pts.values() for sign in (-1, 1)]
    vals += [baseline] if baseline is not None else []
    lo, hi = math.floor(min(vals) / 5) * 5, math.floor(max(vals) / 5) * 5 + 5
    img = Image.new('RGB', (W, H), 'white')
    d = ImageDraw.Draw(img)
    X = lambda i: L + (W - L - R) * (xs.index(i) + 0.5) / len(xs)
    Y = lambda a: H - B - (H - T - B) * (a - lo) / (hi - lo)
    d.rectangle([L, T, W - R, H - B], outline='black')
    for a in range(lo, hi + 1, 5 if hi - lo <= 50 else 10):
        d.line([L, Y(a), W - R, Y(a)], fill=(225, 225, 225))
        d.text((L - 8, Y(a)), f"{a}", fill='black', anchor='rm')
    for i in xs:
        d.text((X(i), H - B + 6), str(i), fill='black', anchor='ma')
    d.text(((L + W - R) / 2, H - 20), 'layer', fill='black', anchor='ma')
    d.text((L, T - 24), 'linear probe accuracy (%)   ' + title, fill='black')
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
              (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    for j, (label, pts) in enumerate(series.items()):
        c, ly = colors[j % len(colors)], T + 10 + 18 * j
        xy = [(X(i), Y(m)) for i, (m, _) in sorted(pts.items())]
        if len(xy) > 1:
            d.line(xy, fill=c, width=2)
        for (x, y), (m, s) in zip(xy, (pts[i] for i in sorted(pts))):
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)
            if s:
                d.line([x, Y(m - s), x, Y(m + s)], fill=c, width=1)
        d.line([W - R + 12, ly, W - R + 32, ly], fill=c, width=2)
        d.text((W - R + 38, ly), label, fill='black', anchor='lm')
    if baseline is not None:
        for x in range(L, W - R, 12):
            d.line([x, Y(baseline), min(x + 6, W - R), Y(baseline)], fill='gray', width=2)
        d.text((W - R + 12, T + 10 + 18 * len(series)), f"pixels {baseline:.1f}", fill='gray',
               anchor='lm')
    img.save(path)


def layer_series(acc, ts, layers):
    """{'t=... [kind]': {layer index: (acc, 0)}} of one checkpoint: a line per t and layer kind."""
    kinds = {}  # 'out' -> {index: name}; UViT adds 'cls' (the alias 'cls' has no index)
    for l in layers:
        kind, _, i = l.rpartition('_')
        if i.isdigit():
            kinds.setdefault(kind, {})[int(i)] = l
    return {f"t={fmt_t(t)}" + ('' if len(kinds) == 1 else f" {k}"):
            {i: (acc[(t, l)], 0.0) for i, l in names.items()} for t in ts for k, names in kinds.items()}


@torch.no_grad()
def heldout_loss(model, diffusion, data, sums, *, seed, batch_size, autocast, repeats=4):
    """The plain denoising loss of held-out images (no augmentation, no EDM uncertainty weight,
    so arms compare alike) per noise-level bin, binned by the trainer's own LossSums (`sums`,
    empty) as its training log is: `repeats` draws of t and noise per image, the same for every
    checkpoint given the seed."""
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    for _ in range(repeats):
        for i in range(0, len(data), batch_size):
            i = torch.arange(i, min(i + batch_size, len(data)))
            xb = data.batch(i, torch.zeros(len(i), dtype=torch.bool)).to(device)
            cond = {'y': data.y[i].to(device)} if getattr(model, 'num_classes', 0) else {}
            with autocast:
                loss, level = diffusion.loss(model, xb, **cond)[:2]
            sums.add(loss.float(), level, {})
    rec = sums.read(1)  # every rank computed the same: nothing to reduce
    return [rec[f'loss_bin{i}'] for i in range(sums.BINS)]


def explained(target, x):
    """The share of the variance of target (N, D) explained by a linear map of x (N, k) + intercept."""
    x = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    target = target.double()
    residual = target - x @ torch.linalg.lstsq(x, target).solution
    return 1 - (residual.square().sum() / (target - target.mean(0)).square().sum()).item()


@torch.no_grad()
def sc_stats(model, diffusion, data, t, nuisance, *, seed, batch_size, autocast):
    """What self-conditioning adds to the conditioning vector: the term d = TimeMLP_sc(t) *
    Linear(GAP(h_k)) (Sec. 4.1), seen by a hook on the model's SelfCond. Its norm over emb's per
    noise-level bin, for t drawn as in training; and at noise level t, the share of d's variance
    across images explained linearly by class and by `nuisance` (N, k), when given."""
    if getattr(model, 'self_cond', None) is None:
        raise SystemExit("--sc-stats needs a UNet or DiT trained with --self-cond (UViT's [CLS] "
                         "token adds no term to measure)")
    seen = []  # (d, emb) of each forward
    hook = model.self_cond.register_forward_hook(
        lambda m, inputs, out: seen.append(((out - inputs[0]).float().cpu(), inputs[0].float().cpu())))
    device, bins, terms = next(model.parameters()).device, [[] for _ in range(5)], []
    torch.manual_seed(seed)
    try:
        for i in range(0, len(data), batch_size):
            i = torch.arange(i, min(i + batch_size, len(data)))
            x = data.batch(i, torch.zeros(len(i), dtype=torch.bool)).to(device)
            with autocast:  # t drawn as training draws it
                level = diffusion.loss(model, x)[1].cpu()
            d, emb = seen.pop()
            ratios = (d.norm(dim=1) / emb.norm(dim=1)).tolist()
            for b, r in zip((level * 5).long().clamp(max=4).tolist(), ratios):
                bins[b].append(r)
            tt = torch.full((len(x),), t, device=device)
            with autocast:  # at the probe level
                diffusion.pred(model, diffusion.add_noise(x, tt, torch.randn_like(x)), tt)
            terms.append(seen.pop()[0])
    finally:
        hook.remove()
    d = torch.cat(terms)
    return {'norm_ratio_by_level': [float(np.mean(b)) if b else None for b in bins],
            'r2_class': explained(d, F.one_hot(data.y).float()),
            'r2_nuisance': None if nuisance is None else explained(d, torch.as_tensor(nuisance))}


# ----------------------------------------------------------------------------
# Main

def resolve_layers(names, model):
    """Canonical layer names: '6' -> out_6 / block_6, 'all' -> every layer (UViT: also cls_1 ..);
    one line for an unknown one."""
    known = list(model.feature_layers) + list(getattr(model, 'cls_layers', []))  # UViT [CLS] per out-block
    out = []
    for n in names:
        n = f"{known[0].rsplit('_', 1)[0]}_{n}" if n.isdigit() else n
        new = known if n == 'all' else [n]
        if not set(new) <= set(known) | ({'cls'} if len(known) > len(model.feature_layers) else set()):
            raise SystemExit(f"unknown layer {n!r}: use one of {', '.join(known)}, all"
                             + (", cls" if len(known) > len(model.feature_layers) else ''))
        out += [l for l in new if l not in out]
    return out


def probe_checkpoint(a, path, out, device, log):
    """Probe one checkpoint: (accuracy {(t, layer): %}, the record written to out/probe.json)."""
    rank = world()[0]
    mod, args, model, diffusion, ckpt = load_checkpoint(path, raw=a.raw, device=device)
    trained_on = args.dataset
    if a.dataset:  # transfer ("transferable representations", abstract): another labelled dataset
        vars(args).update(dataset=a.dataset, data_path=a.data_path or args.data_path, cache_dir=None)
    models = {'trained': model}
    if a.init:  # what training starts from: the trainer seeds with --seed, then builds
        torch.manual_seed(args.seed)
        models['init'] = for_inference(mod.build_model(args), device)  # as the trained one

    # pairs to probe
    integer = diffusion.kind == 'DDPM'
    ts = a.t or (GRIDS[diffusion.kind] + [args.probe_t] if a.grid else [args.probe_t])
    ts = sorted({int(round(t)) if integer else float(t) for t in ts})
    hi = diffusion.T if integer else 1 if diffusion.kind == 'RF' else math.inf
    if not all(0 < t <= hi for t in ts):
        raise SystemExit(f"--t {ts} out of range for {diffusion.kind}: use native units in "
                         f"(0, {hi}] (DDPM step of T, EDM sigma, RF t with 1 = noise)")
    layers = resolve_layers(a.layer or (['all'] if a.grid else [args.sc_layer]), model)

    latent = getattr(args, 'latent', 'none') != 'none'
    lr = a.lr or (2e-3 if latent else 4e-3)
    epochs = a.epochs or (15 if args.dataset in ('cifar10', 'cifar100') else 30)
    batch_size = a.batch_size or (1440 if latent else PROBE_BATCH.get(args.net, 128))
    autocast = mod.autocast(device, a.precision)
    if a.dense:
        return dense(a, path, mod, args, ckpt, models, diffusion, ts[0], layers[0], out, device, log,
                     dict(epochs=epochs, lr=lr, batch_size=batch_size, autocast=autocast))

    # data (labels required), optional fixed subset
    train, test = (load_split(mod, args, ckpt, s) for s in ('train', 'test'))
    if a.limit:
        pick = lambda d: Data(d.x, d.y, d.stats, torch.randperm(
            len(d), generator=torch.Generator().manual_seed(a.seed))[:a.limit])
        train, test = pick(train), pick(test)
    log(f"probing {path} ({'online' if a.raw else 'EMA'}, {diffusion.kind}) on {args.dataset}: "
        f"{len(train)} train / {len(test)} test, t {ts}, layers {layers}, {a.feature_mode} "
        f"features, lr {lr:g} epochs {epochs} batch {batch_size}")

    # One noise level at a time: the same forwards as all at once, a level's features in memory.
    # Noise streams: 0 test, 1 cached train (both flips alike), 2 + epoch fresh train.
    timer = {'images': 0, 'seconds': 0.0}
    block = a.extract_batch
    kw = dict(layers=layers, batch_size=block, spill=out, autocast=autocast)
    names = lambda name, t: {l: (t, l) if name == 'trained' else (name, t, l) for l in layers}

    def run(data, t, stream, views=(None,), desc=None):  # {model name: Features}, timed
        if device.type == 'cuda':
            torch.cuda.synchronize()
        t0 = time.time()
        stores = extract(models, diffusion, data, t, seed=_seed(a.seed, stream), views=views,
                         desc=desc, **kw)
        timer['images'] += len(data) * len(models) * len(views)
        timer['seconds'] += time.time() - t0
        return stores

    def getter(stores, t, data, pick=None):  # rows i -> {key: (len(i), C)}; pick: each row's view
        def feats(i):
            rows, view, out_ = local_rows(i, block), None if pick is None else pick[i], {}
            for name, store in stores.items():
                out_.update({names(name, t)[l]: f for l, f in store.get(rows, view).items()})
            if a.raw_pixels and t == ts[0]:
                flip = torch.zeros(len(i), dtype=torch.bool) if pick is None else pick[i]
                out_[(None, 'pixels')] = pixel_features(data.batch(i, flip))
            return out_
        return feats

    def flips(stream):
        return torch.rand(len(train), generator=torch.Generator().manual_seed(_seed(a.seed, stream))) < 0.5

    x0 = train.batch(torch.arange(1), torch.zeros(1, dtype=torch.bool)).to(device)
    dims = {l: f.shape[1] for l, f in diffusion.pred(
        model, x0, torch.full((1,), ts[0], device=device), feats=tuple(layers))[1].items()}
    def level(t):  # {key: accuracy} of every head at noise level t; its features freed after
        keys = {k: dims[l] for name in models for l, k in names(name, t).items()}
        if a.raw_pixels and t == ts[0]:
            keys[(None, 'pixels')] = pixel_features(x0).shape[1]
        test_feats = getter(run(test, t, 0, desc=f't={fmt_t(t)} test features'), t, test)
        if a.feature_mode == 'cached':  # each epoch, each image takes one of its two flips
            both = (torch.zeros(len(train), dtype=torch.bool), torch.ones(len(train), dtype=torch.bool))
            stores = run(train, t, 1, both, desc=f't={fmt_t(t)} train features (both flips)')
            epoch = lambda e: getter(stores, t, train, flips(2 + e))
        else:  # the paper's protocol: new noise and flips every epoch (an extraction per epoch)
            epoch = lambda e: getter(run(train, t, 2 + e, (flips(2 + e),), desc=f'epoch {e + 1} features'),
                                     t, train)
        return train_probes(Split(train.y, keys, epoch, block),
                            Split(test.y, keys, lambda e: test_feats, block), lr=lr, epochs=epochs,
                            batch_size=batch_size, seed=a.seed, device=device, log=log)

    acc = {k: v for t in ts for k, v in level(t).items()}
    at_init = {k[1:]: acc.pop(k) for k in list(acc) if k[0] == 'init'}
    losses = heldout_loss(model, diffusion, test, mod.LossSums(), seed=_seed(a.seed, 3),
                          batch_size=block, autocast=autocast) if a.loss else None
    sc = None
    if a.sc_stats:
        shapes = args.dataset in getattr(mod, 'SHAPES', ())
        nuisance = mod.shapes_split(args, 'test')[3][test.rows.numpy()] if shapes else None
        sc = sc_stats(model, diffusion, test, args.probe_t, nuisance, seed=_seed(a.seed, 4),
                      batch_size=block, autocast=autocast)
    speed = timer['images'] / max(timer['seconds'], 1e-9)

    best = max((k for k in acc if k[0] is not None), key=acc.get)
    cell = (args.probe_t, args.sc_layer) if (args.probe_t, args.sc_layer) in acc else best
    classes = int(max(train.y.max(), test.y.max())) + 1
    flags = f"--sc-layer {best[1].replace('cls_', 'out_')} --probe-t {fmt_t(best[0])}"
    record = {'ckpt': str(path), 'script': ckpt['script'], 'kind': diffusion.kind,
              'weights': 'online' if a.raw else 'ema', 'dataset': args.dataset,
              'trained_on': trained_on,
              'args': ckpt['args'], 'images': ckpt.get('images'), 'train_images': len(train),
              'test_images': len(test), 'classes': classes, 'feature_mode': a.feature_mode,
              'lr': lr, 'epochs': epochs, 'batch_size': batch_size, 'seed': a.seed, 'ts': ts,
              'layers': layers, 'extract_img_per_s': speed, 'chance': 100 / classes,
              'raw_pixels': acc.get((None, 'pixels')), 'heldout_loss_by_level': losses,
              'sc_stats': sc,
              'cell': {'t': cell[0], 'layer': cell[1], 'acc': acc[cell],
                       'init': at_init.get(cell)},
              'best': {'t': best[0], 'layer': best[1], 'acc': acc[best], 'flags': flags},
              'results': [{'t': t, 'layer': l, 'acc': acc[(t, l)],
                           **({'init': at_init[(t, l)]} if at_init else {})}
                          for t in ts for l in layers]}
    if rank == 0:
        log(table(acc, ts, layers))
        if at_init:
            log('at init\n' + table(at_init, ts, layers))
        report = [f"trained {acc[cell]:.2f}%"]
        report += [f"at init {at_init[cell]:.2f}%"] if at_init else []
        report += [f"raw pixels {acc[(None, 'pixels')]:.2f}%"] if a.raw_pixels else []
        log(f"t={fmt_t(cell[0])} {cell[1]}: {', '.join(report)}, chance {100 / classes:.2f}%")
        home = Path(path).parent / 'probe' / 'probe.json'  # the in-domain figure, beside a transfer
        if a.dataset and home.exists():
            r = json.loads(home.read_text())
            same_cell = [e['acc'] for e in r['results'] if [e['t'], e['layer']] == list(cell)]
            if same_cell:
                log(f"in-domain ({r['dataset']}, {home}): {same_cell[0]:.2f}% at the same cell")
        if losses:
            log("held-out loss by noise level " + " ".join(f"{v:.4f}" for v in losses))
        if sc:
            log("self-conditioning term / emb norm by noise level " + " ".join(
                '-' if r is None else f"{r:.3f}" for r in sc['norm_ratio_by_level']) +
                f"; at t={fmt_t(args.probe_t)} its variance explained by class {sc['r2_class']:.1%}" +
                ('' if sc['r2_nuisance'] is None else f", by the nuisance draws {sc['r2_nuisance']:.1%}"))
        log(f"best {acc[best]:.2f}% at t={fmt_t(best[0])} {best[1]}; feature extraction "
            f"{speed:.1f} img/s (one image at one t)")
        if a.grid:  # Sec. 4.1: self-conditioning reads the baseline's best probe layer
            log(f"the paper's rule for a new setting: on a baseline checkpoint the best cell is "
                f"where self-conditioning reads; train with the baseline's command plus\n"
                f"    --self-cond {flags}")
        out.mkdir(parents=True, exist_ok=True)
        (out / 'probe.json').write_text(json.dumps(record, indent=1))
        if sum(l.rpartition('_')[2].isdigit() for l in layers) > 1:
            chart(out / 'probe.png', layer_series(acc, ts, layers),
                  f"{record['script']} {diffusion.kind} {args.dataset}", acc.get((None, 'pixels')))
        log(f"wrote {out / 'probe.json'}")
    return acc, record


def dense(a, path, mod, args, ckpt, models, diffusion, t, layer, out, device, log, train_kw):
    """--dense on one checkpoint: ({model name: mIoU}, the record written to out/probe.json)."""
    res, encode = args.resolution, None
    if getattr(args, 'latent', 'none') != 'none':  # images at 256, through the run's VA-VAE
        vae, stats = mod.load_vae(args, device), ckpt['latent_stats']
        mean, std = (stats[k].to(device)[None, :, None, None] for k in ('mean', 'std'))
        encode, res = lambda x: (vae.encode(x.to(device)).float() - mean) / std, mod.IMAGE_SIZE
    if a.limit:
        log("--limit does not apply to --dense")
    split = lambda s: (lambda x, m: (Data(x, torch.zeros(len(x), dtype=torch.long), encode=encode), m))(
        *load_segmentation(mod, args, s, res))
    train, test = split('train'), split('test')
    log(f"dense probe of {path} at t={fmt_t(t)} {layer} on {args.dataset}: {len(train[0])} train / "
        f"{len(test[0])} test images, lr {train_kw['lr']:g} epochs {train_kw['epochs']} batch "
        f"{train_kw['batch_size']}")
    res_ = dense_probe(models, diffusion, train, test, t, layer, seed=a.seed, block=a.extract_batch,
                       device=device, log=log, **train_kw)
    record = {'ckpt': str(path), 'dataset': args.dataset, 't': t, 'layer': layer,
              'images': ckpt.get('images'),
              **{name: {'miou': m, 'pixel_acc': acc} for name, (m, acc) in res_.items()}}
    if world()[0] == 0:
        for name, (m, acc) in res_.items():
            log(f"dense t={fmt_t(t)} {layer} {name}: mIoU {m:.2f}%, pixel accuracy {acc:.2f}%")
        out.mkdir(parents=True, exist_ok=True)
        (out / 'probe.json').write_text(json.dumps(record, indent=1))
    return {name: m for name, (m, _) in res_.items()}, record


def mean_std(values):
    v = [x for x in values if x is not None]
    return (float(np.mean(v)), float(np.std(v))) if v else None


def summarize(records, out, log):
    """Accuracy along each run given by several snapshots, and which is best; mean +- std over the
    seeds of each arm (runs whose training settings differ in more than the seed), a table and
    out/layers.png: accuracy by layer at each arm's cell's t."""
    # an arm is what is trained: seeds are its replicates, and bookkeeping does not count
    same = {'seed', 'out', 'log_every', 'ckpt_every', 'ckpt_minutes', 'sample_every', 'workers',
            'data_path', 'cache_dir', 'extract_batch', 'train_images', 'keep_every'}
    key = lambda r: json.dumps({k: v for k, v in r['args'].items() if k not in same}, sort_keys=True)
    runs = {}  # snapshots of one run (--keep-every): the run counts with its best (App. A)
    for r in records:
        runs.setdefault(f"{key(r)} {r['args']['seed']}", []).append(r)
    trajectories = []
    for rs in (rs for rs in runs.values() if len(rs) > 1):
        rs.sort(key=lambda r: r['images'] or 0)
        best = max(rs, key=lambda r: r['cell']['acc'])
        trajectories.append({'ckpts': [r['ckpt'] for r in rs], 'images': [r['images'] for r in rs],
                             'cell_acc': [r['cell']['acc'] for r in rs], 'best': best['ckpt']})
        log(f"along {Path(rs[0]['ckpt']).parent} at t={fmt_t(best['cell']['t'])} "
            f"{best['cell']['layer']}: " + ", ".join(f"{r['images']:,} images {r['cell']['acc']:.2f}%"
                                                     for r in rs))
        log(f"    best snapshot {best['ckpt']} ({best['images']:,} images)")
    records = [max(rs, key=lambda r: r['cell']['acc']) for rs in runs.values()]
    arms = {}
    for r in records:
        arms.setdefault(key(r), []).append(r)
    varying = sorted({k for r in records for k, v in r['args'].items() if k not in same
                      and any(v != q['args'].get(k) for q in records)})
    rows, series = [], {}
    for rs in arms.values():
        label = ', '.join(f"{k}={rs[0]['args'].get(k)}" for k in varying) or 'all'
        cell = rs[0]['cell']
        row = {'arm': label, 'n': len(rs), 'seeds': [r['args']['seed'] for r in rs],
               'cell': {'t': cell['t'], 'layer': cell['layer']},
               'cell_acc': mean_std(r['cell']['acc'] for r in rs),
               'best_acc': mean_std(r['best']['acc'] for r in rs),
               'best_cells': [f"t={fmt_t(r['best']['t'])} {r['best']['layer']}" for r in rs],
               'init_acc': mean_std(r['cell']['init'] for r in rs),
               'raw_pixels': mean_std(r['raw_pixels'] for r in rs)}
        if rs[0]['heldout_loss_by_level']:
            row['heldout_loss_by_level'] = [mean_std(r['heldout_loss_by_level'][i] for r in rs)
                                            for i in range(len(rs[0]['heldout_loss_by_level']))]
        rows.append(row)
        kind = cell['layer'].rpartition('_')[0]
        per_layer = {}
        for r in rs:
            for e in r['results']:
                if e['t'] == cell['t'] and e['layer'].rpartition('_')[0] == kind:
                    per_layer.setdefault(int(e['layer'].rpartition('_')[2]), []).append(e['acc'])
        series[f"{label} (t={fmt_t(cell['t'])})"] = {i: mean_std(v) for i, v in per_layer.items()}
    f = lambda ms, d=2: '-' if ms is None else f"{ms[0]:.{d}f} +- {ms[1]:.{d}f}"
    for row in rows:
        cell = f"t={fmt_t(row['cell']['t'])} {row['cell']['layer']}"
        log(f"{row['arm']} ({row['n']} seeds): {cell} {f(row['cell_acc'])}%, best cell "
            f"{f(row['best_acc'])}% ({', '.join(row['best_cells'])}), at init {f(row['init_acc'])}%, "
            f"raw pixels {f(row['raw_pixels'])}%")
        if 'heldout_loss_by_level' in row:
            log("    held-out loss by noise level " + ", ".join(f(ms, 4) for ms in
                                                             row['heldout_loss_by_level']))
    out.mkdir(parents=True, exist_ok=True)
    (out / 'summary.json').write_text(json.dumps({'arms': rows, 'runs': trajectories}, indent=1))
    pixels = mean_std(r['raw_pixels'] for r in records)
    chart(out / 'layers.png', series, f"{records[0]['script']} {records[0]['dataset']}",
          pixels[0] if pixels else None)
    log(f"wrote {out / 'summary.json'} and {out / 'layers.png'}")


def main(argv=None):
    a = get_args(argv)
    rank, _, device = setup_distributed()
    log = print if rank == 0 else (lambda *_: None)
    paths = [Path(p) for p in a.ckpt]
    folder = 'probe' + '-dense' * a.dense + (f'-{Path(a.dataset).name}' if a.dataset else '')
    if len(paths) == 1:
        out = Path(a.out or paths[0].parent / folder)
        outs = [out]
    else:  # one folder per checkpoint, the summary beside them
        out = Path(a.out or Path(os.path.commonpath([p.parent for p in paths])) / folder)
        outs = [out / ckpt_name(p) for p in paths]
    results = [probe_checkpoint(a, p, o, device, log) for p, o in zip(paths, outs)]
    if len(results) > 1 and rank == 0 and not a.dense:
        summarize([r for _, r in results], out, log)
    if dist.is_initialized():
        dist.destroy_process_group()
    accs = [acc for acc, _ in results]
    return accs[0] if len(accs) == 1 else accs


if __name__ == '__main__':
    main()
