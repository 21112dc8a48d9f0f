"""
FID and Inception Score with pytorch-fid's FID Inception (the TF 2015-12-05 graph ported to torch).

    python fid.py samples.npz ref_stats.npz        # FID + IS of ADM-format samples vs statistics
    python fid.py samples.npz path/to/images --batch-size 500   # vs a folder of reference images
    python fid.py path/to/images --stats-out ref_stats.npz     # save the statistics of one input
    torchrun --nproc_per_node 8 fid.py samples.npz ref_stats.npz

Inputs: a samples .npz (ADM format: arr_0 uint8 NHWC), a statistics .npz (mu, sigma: pytorch-fid's
and ADM's reference batches work too) or a folder of images (searched recursively); every input is
checked before the network is built or its weights downloaded. Statistics of a reference are cached
in --cache-dir. A training set by name (cifar10, class folders ...) is sample.py --fid's: it reads
the set through the checkpoint's own trainer. This file imports no trainer.
"""
import argparse
import contextlib
import hashlib
import json
import os
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from tqdm import tqdm

FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + FID_WEIGHTS)
IMAGE_EXTS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}
FEATURE_DIM = 2048
CACHE_DIR = os.path.expanduser("~/.cache/ddae/fid")  # reference statistics, by what they are of
THROUGHPUT = {"images": 0, "seconds": 0.0}  # this process's Inception passes, for the report

# ----------------------------------------------------------------------------
# Inception network (module names follow torchvision, so the official weights load strictly)

class BasicConv2d(nn.Module):
    """Conv without bias + BatchNorm with TF's eps + ReLU."""
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return self.bn(self.conv(x)).relu_()  # in place: no second activation-sized tensor

    def fold(self):
        """Fold the eval-mode BatchNorm into the conv (in float64, then rounded once to fp32)."""
        bn, w = self.bn, self.conv.weight.double()
        scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
        bias = bn.bias.double() - bn.running_mean.double() * scale
        w = w * scale[:, None, None, None]
        self.conv.weight = nn.Parameter(w.float(), requires_grad=False)
        self.conv.bias = nn.Parameter(bias.float(), requires_grad=False)
        self.bn = nn.Identity()

def _chain(x, *layers):
    for layer in layers:
        x = layer(x)
    return x

def _avg_pool(x):
    # TF's average pool divides by the number of real (unpadded) pixels
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

class InceptionA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled branches."""
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          _chain(x, self.branch5x5_1, self.branch5x5_2),
                          _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          self.branch_pool(_avg_pool(x))], 1)

class InceptionB(nn.Module):
    """Grid reduction 35x35 -> 17x17."""
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          F.max_pool2d(x, 3, stride=2)], 1)

class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions."""
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                          _chain(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                                 self.branch7x7dbl_4, self.branch7x7dbl_5),
                          self.branch_pool(_avg_pool(x))], 1)

class InceptionD(nn.Module):
    """Grid reduction 17x17 -> 8x8."""
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([_chain(x, self.branch3x3_1, self.branch3x3_2),
                          _chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                                 self.branch7x7x3_4),
                          F.max_pool2d(x, 3, stride=2)], 1)

class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs; the last one of the FID graph max-pools."""
    def __init__(self, cin, max_pool=False):
        super().__init__()
        self.max_pool = max_pool  # a quirk of the 2015 TF graph that FID numbers depend on
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
                          self.branch_pool(pool)], 1)

class InceptionV3(nn.Module):
    """FID Inception: images in [0, 1] (N, 3, H, W) -> (pool3 (N, 2048), logits (N, 1008))."""
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, 1008)

    def forward(self, x):
        # channels_last throughout (weights too, see load_inception): ~1.5x faster on CPU; the
        # resize is 4x faster and bit-identical; in-place 2x - 1 rounds exactly as pytorch-fid's
        # out-of-place one
        x = x.contiguous(memory_format=torch.channels_last)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = x.mul_(2).sub_(1)
        x = _chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 64, 73, 73)
        x = _chain(x, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 192, 35, 35)
        x = _chain(x, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d,
                   self.Mixed_6a)  # (N, 768, 17, 17)
        x = _chain(x, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e,
                   self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)  # (N, 2048, 8, 8)
        pool3 = x.mean((2, 3))  # (N, 2048)
        # the reference IS (improved-GAN, ADM evaluator) uses the softmax matmul without its bias
        return pool3, pool3 @ self.fc.weight.t()  # (N, 1008)

def load_inception(path=None, device="cpu"):
    """The FID Inception with the official weights, ready for inference (BatchNorm folded,
    channels_last). Without `path` the weights come from the torch hub cache, downloaded once per
    node when missing; under torch.distributed every rank must call it."""
    sd = torch.load(_weights_file(path), map_location="cpu", weights_only=True)
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    with torch.device("meta"):  # skip the random init of 24M weights that the file replaces
        model = InceptionV3()
    # strict: any other Inception (e.g. torchvision's) must not load
    model.load_state_dict(sd, assign=True)
    # eval only, so each BatchNorm is an affine map that folds into its conv: 94 fewer passes
    # over the activations, 10-20% faster on CPU; features stay within ~1e-6 relative of the
    # unfolded net
    for m in model.modules():
        if isinstance(m, BasicConv2d):
            m.fold()
    return model.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)

def _weights_file(path):
    """`path`, or the torch hub cache copy, downloaded when missing by one process per node while
    the others wait: to a temporary name beside it, its sha256 prefix checked, then renamed (torch
    hub's download does all three). A failure ends every rank promptly with the same line."""
    if path is not None:
        if not os.path.exists(path):
            raise SystemExit(f"--inception {path}: no such file; it should be {FID_WEIGHTS} from "
                             f"{FID_WEIGHTS_URL}")
        return path
    path = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS
    error = None
    if _local_rank() == 0 and not path.exists():
        print(f"downloading {FID_WEIGHTS_URL} to {path}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(path),
                                           hash_prefix=FID_WEIGHTS.split("-")[-1][:8])
        except Exception as e:  # network, disk, checksum: one line for every rank
            if not path.exists():  # else another node sharing the folder finished first
                why = str(e).splitlines()[0] if str(e) else ""
                error = (f"could not download the FID Inception weights ({type(e).__name__}: "
                         f"{why}); get {FID_WEIGHTS} from {FID_WEIGHTS_URL} and pass "
                         f"--inception PATH (or put it at {path})")
    _raise_on_any(error)  # also the barrier: no rank reads the file before it is in place
    return path

# ----------------------------------------------------------------------------
# Ranks: torchrun's process group when there is one, else a world of one

def _dist():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

def _local_rank():
    """This process's index on its node: torchrun's LOCAL_RANK, else the global rank."""
    return int(os.environ.get("LOCAL_RANK", _dist()[0]))

def _raise_on_any(error):
    """Collective: when any rank has an error message, every rank exits with the first one."""
    if _dist()[1] > 1:
        errors = [None] * _dist()[1]
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise SystemExit(error)

def _rank0(value):
    """Rank 0's value on every rank, so that all ranks take the same branch (and collectives)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]

# ----------------------------------------------------------------------------
# Statistics

class _ImageFiles(torch.utils.data.Dataset):
    """Image files -> (index, uint8 (3, H, W), '' or why the file cannot be read)."""
    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            with Image.open(self.files[i]) as im:
                return i, torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1), ""
        except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for a damaged file
            return i, torch.zeros(3, 1, 1, dtype=torch.uint8), f"{self.files[i]} ({e})"

class Source:
    """Images to measure: their number n and this rank's share as batches of (global indices
    (B,), uint8 (B, C, H, W)[, reasons files could not be read]): a tensor or array (N, C, H, W),
    a list of image files, or a dataset of (index, image, error) (the trainers' ImageFiles), each
    rank taking every world-th image; or any iterable of batches that is already this rank's."""
    def __init__(self, images, batch_size=200, num_workers=0, n=None):
        rank, world = _dist()
        if isinstance(images, (list, tuple)):
            images = _ImageFiles(images)
        if isinstance(images, torch.utils.data.Dataset):
            shard = torch.utils.data.Subset(images, range(rank, len(images), world))
            self.batches = torch.utils.data.DataLoader(shard, batch_size, num_workers=num_workers,
                                                       pin_memory=torch.cuda.is_available())
        elif isinstance(images, (torch.Tensor, np.ndarray)):
            idx = torch.arange(rank, len(images), world)
            self.batches = ((i, torch.as_tensor(images[i.numpy()])) for i in idx.split(batch_size))
        else:
            self.batches = images
        self.n = len(images) if n is None else n

class Sums:
    """Running sums of Inception outputs, float64: count, sum f and sum f f^T of pool3 (the FID
    statistics, never the features themselves), and per Inception Score split (chunks of the n
    images by global index) the sum of p(y|x) and of sum_y p log p. Summed over the ranks by
    reduce()."""
    def __init__(self, n, splits=10, device="cpu", dim=FEATURE_DIM):
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)
        self.n, self.splits = n, splits
        self.count, self.s1, self.s2 = z(1), z(dim), z(dim, dim)
        self.p, self.plogp, self.k = z(splits, 1008), z(splits), z(splits)
        self.bounds = torch.tensor([s * n // splits for s in range(splits + 1)], device=device)

    def add(self, pool3, logits=None, index=None):  # (B, 2048), (B, 1008), global indices (B,)
        f = pool3.double()
        self.count += len(f)
        self.s1 += f.sum(0)
        self.s2 += f.t() @ f
        if logits is not None:
            logp = logits.double().log_softmax(1)
            split = torch.searchsorted(self.bounds, index.to(self.bounds.device), right=True) - 1
            self.p.index_add_(0, split, logp.exp())
            self.plogp.index_add_(0, split, (logp.exp() * logp).sum(1))
            self.k.index_add_(0, split, torch.ones_like(f[:, 0]))

    def reduce(self):
        if _dist()[1] > 1:
            for t in (self.count, self.s1, self.s2, self.p, self.plogp, self.k):
                dist.all_reduce(t)
        return self

    def statistics(self):
        """Mean (D,) and covariance (D, D), unbiased as np.cov, with a check on the count."""
        n, d = int(self.count.item()), len(self.s1)
        if n <= 2:
            raise ValueError(f"FID statistics need at least 3 images, got {n}: the covariance "
                             f"would be NaN or rank 1")
        if n <= d:
            warnings.warn(f"FID from {n} images: the {d}x{d} covariance is rank-deficient (needs "
                          f"at least {d + 1} images); the value is biased upwards, the paper uses "
                          f"50,000", stacklevel=3)
        mu = self.s1 / n
        return mu.cpu().numpy(), ((self.s2 - n * torch.outer(mu, mu)) / (n - 1)).cpu().numpy()

    def inception_score(self):
        """(mean, std) over the splits of exp(E_x KL(p(y|x) || p(y)))
        = exp(E sum p log p - sum pbar log pbar)."""
        if self.n < self.splits:
            raise ValueError(f"Inception Score with {self.splits} splits needs at least "
                             f"{self.splits} images, got {self.n}")
        pbar = self.p / self.k[:, None]
        scores = (self.plogp / self.k - torch.special.xlogy(pbar, pbar).sum(1)).exp().cpu().numpy()
        return float(np.mean(scores)), float(np.std(scores))

@contextlib.contextmanager
def _fp32():
    """Plain fp32 on GPU, TF32 off (sample.py turns it on), cuDNN autotuned; the flags are
    restored after. bf16 or TF32 would be faster, but their features could not be checked against
    pytorch-fid's here."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, benchmark=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul

def _check_batch(x):
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images (N, 1 or 3, H, W), got {x.dtype} "
                         f"{tuple(x.shape)}")

@torch.inference_mode()
def compute_features(images, model, batch_size=200, num_workers=0):
    """pool3 features (N, 2048) float64 and logits (N, 1008) float32 of uint8 images (see
    Source), every rank's gathered on every rank in the input order: for benchmarks and tests;
    statistics use Sums."""
    rank, world = _dist()
    device = next(model.parameters()).device
    t0, feats, logits = time.time(), [], []
    with _fp32():
        for _, x, *_ in tqdm(Source(images, batch_size, num_workers).batches, desc="inception",
                             disable=rank != 0, leave=False):
            _check_batch(x)
            f, l = model(x.to(device, non_blocking=True).float().div(255).expand(-1, 3, -1, -1))
            feats.append(f.float())
            logits.append(l.float())
    f = torch.cat(feats) if feats else torch.zeros(0, FEATURE_DIM, device=device)
    l = torch.cat(logits) if logits else torch.zeros(0, 1008, device=device)
    if world > 1:  # shards differ by at most one image: pad, gather, interleave to input order
        n = torch.tensor([len(f)], device=device)
        dist.all_reduce(n)
        m = (int(n) + world - 1) // world
        out = []
        for t in (f, l):
            t = F.pad(t, (0, 0, 0, m - len(t)))
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t)
            out.append(torch.stack(parts, 1).flatten(0, 1)[:int(n)])
        f, l = out
    f, l = f.cpu().double().numpy(), l.cpu().numpy()
    THROUGHPUT["images"] += len(f)
    THROUGHPUT["seconds"] += time.time() - t0
    return f, l

def statistics(feats):
    """Mean (D,) and covariance (D, D) in float64 of features (N, D), with a check on N."""
    feats = torch.as_tensor(np.asarray(feats, dtype=np.float64))
    sums = Sums(len(feats), dim=feats.shape[1])
    sums.add(feats)
    return sums.statistics()

@torch.inference_mode()
def accumulate(source, model, logits=True):
    """Sums of every rank's share of a Source through the network, reduced over the ranks. A rank
    that meets an unreadable file stops, and every rank then exits with its message."""
    rank, world = _dist()
    device = next(model.parameters()).device
    sums, error, t0 = Sums(source.n, min(10, max(source.n, 1)), device), None, time.time()
    with _fp32():
        for i, x, *why in tqdm(source.batches, desc="inception", disable=rank != 0, leave=False):
            if why and any(why[0]):
                error = f"cannot read image {next(w for w in why[0] if w)}: fix or remove it"
                break
            _check_batch(x)
            if device.type == "cuda" and x.device.type == "cpu":  # from pinned memory the copy
                x = x.pin_memory()  # does not wait for the GPU
            x = x.to(device, non_blocking=True).float().div(255).expand(-1, 3, -1, -1)
            f, l = model(x)
            sums.add(f, l if logits else None, i)
            THROUGHPUT["images"] += len(x)
    THROUGHPUT["seconds"] += time.time() - t0
    _raise_on_any(error)
    return sums.reduce()

def compute_statistics(images, model, batch_size=200, num_workers=0, score=True):
    """(mu (2048,), sigma (2048, 2048), n, Inception Score (mean, std) or None without `score`) of
    an input: a path (see load_input), uint8 images (N, C, H, W) or a Source; a statistics file
    gives its own mu and sigma. Under torch.distributed every rank must call it."""
    x = _checked(images)
    if isinstance(x, tuple):
        return (*x, None)
    source = x if isinstance(x, Source) else Source(x, batch_size, num_workers)
    sums = accumulate(source, model, logits=score)
    return (*sums.statistics(), int(sums.count.item()), sums.inception_score() if score else None)

# ----------------------------------------------------------------------------
# Frechet distance and Inception Score

def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), computed as pytorch-fid does."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimensions: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # nearly singular product: regularise both covariances
        print(f"fid: singular product of covariances; adding {eps} to their diagonals")
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"fid: imaginary component {np.max(np.abs(covmean.imag))} in "
                             f"sqrt(S1 S2)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))

def inception_score(logits, splits=10):
    """(mean, std) over `splits` consecutive chunks of exp(E_x KL(p(y|x) || p(y)))."""
    logits = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    sums = Sums(len(logits), splits, dim=1)
    sums.add(torch.zeros(len(logits), 1), logits, torch.arange(len(logits)))
    return sums.inception_score()

# ----------------------------------------------------------------------------
# Inputs: checked before anything is decoded, and before the network is built

def _npz_arrays(path):
    """{name: (shape, dtype)} of an .npz from its members' headers alone: nothing is loaded (the
    arr_0 of 50k 256x256 samples is 9.8 GB)."""
    read = {(1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0}
    arrays = {}
    try:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if name.endswith(".npy"):
                    with z.open(name) as f:
                        shape, _, dtype = read[np.lib.format.read_magic(f)](f)
                    arrays[name[:-4]] = shape, dtype
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise SystemExit(f"{path}: not a readable .npz ({type(e).__name__}: {e}); give an "
                         f"intact samples or statistics .npz")
    return arrays

def _enough(n, name):
    if n < 3:
        raise SystemExit(f"FID needs at least 3 images, {name} has {n} (the covariance would be "
                         f"degenerate)")

def _inspect(spec):
    """(kind, detail) of an input path, or one line naming what is wrong with it: ("folder",
    image files), ("samples", arr_0's shape) or ("statistics", None)."""
    if not os.path.exists(spec):
        name = os.sep not in spec and not os.path.splitext(spec)[1]  # cifar10, in1k ...
        hint = "; a training set by name is sample.py --fid's" if name else ""
        raise SystemExit(f"{spec}: no such file or folder (give an .npz or a folder of "
                         f"images{hint})")
    if os.path.isdir(spec):
        files = sorted(str(p) for p in Path(spec).rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise SystemExit(f"{spec}: no images ({', '.join(sorted(IMAGE_EXTS))}) in this folder")
        _enough(len(files), spec)
        return "folder", files
    if not spec.endswith(".npz"):
        raise SystemExit(f"{spec}: not an .npz or a folder; give samples (arr_0 uint8 NHWC), "
                         f"statistics (mu, sigma) or a folder of images")
    arrays = _npz_arrays(spec)
    if "mu" in arrays and "sigma" in arrays:  # ADM's reference batches hold images too: unread
        (mu, mu_type), (sigma, sigma_type) = arrays["mu"], arrays["sigma"]
        if len(mu) != 1 or sigma != (*mu, *mu) or mu_type.kind != "f" or sigma_type.kind != "f":
            raise SystemExit(f"{spec}: statistics must be float mu (D,) and sigma (D, D), got "
                             f"{mu_type} {mu} and {sigma_type} {sigma}")
        return "statistics", None
    if "arr_0" not in arrays:
        raise SystemExit(f"{spec}: expected 'arr_0' (ADM samples, uint8 NHWC) or 'mu' and "
                         f"'sigma' (statistics), found {', '.join(arrays) or 'no arrays'}")
    shape, dtype = arrays["arr_0"]
    if dtype != np.uint8 or len(shape) != 4 or shape[3] not in (1, 3):
        raise SystemExit(f"{spec}: arr_0 must be uint8 (N, H, W, 3), got {dtype} {shape}")
    _enough(shape[0], spec)
    return "samples", shape

def check_input(spec):
    """One line (SystemExit) unless path `spec` is a samples .npz, a statistics .npz or a folder of
    images, readable and of at least 3 images; only file headers and names are read."""
    _inspect(spec)

def load_input(spec):
    """An input path, checked as check_input does, then read: a samples .npz -> uint8 (N, C, H,
    W); a folder -> its image files (decoded a batch at a time); a statistics .npz -> (mu, sigma,
    n or None)."""
    kind, detail = _inspect(spec)
    if kind == "folder":
        return detail
    with np.load(spec) as f:
        if kind == "statistics":
            return f["mu"], f["sigma"], int(f["n"]) if "n" in f else None
        return torch.from_numpy(f["arr_0"]).permute(0, 3, 1, 2)  # (N, C, H, W)

def _checked(x):
    """An input path loaded (load_input), or images, a Source or statistics as they are, with at
    least 3 images where they can be counted."""
    if isinstance(x, str):
        return load_input(x)
    if not isinstance(x, tuple):
        _enough(x.n if isinstance(x, Source) else len(x), "the input")
    return x

def _check_writable(path):
    """Fail before any work when `path` cannot be written (a folder, a parent that is a file, no
    rights)."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # save_statistics creates the missing folders
        parent = os.path.dirname(parent)
    writable = os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK)
    if os.path.isdir(path) or not writable:
        why = "a folder" if os.path.isdir(path) else f"{parent} is not a writable folder"
        raise SystemExit(f"--stats-out {path}: cannot write a file there ({why})")

def cache_file(name, key, cache_dir=None):
    """Where a reference's statistics are cached: <cache_dir>/<name>-<hash of key>.npz, the key
    saying what they are of (a path made absolute, or a dataset with its settings); nothing is
    read. cache_dir defaults to CACHE_DIR."""
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return os.path.join(cache_dir or CACHE_DIR, f"{name}-{digest}.npz")

def save_statistics(path, mu, sigma, n):
    """Write mu, sigma (pytorch-fid's keys) and the count n (when known) atomically, or exit with
    one line."""
    tmp = f"{path}.{os.getpid()}.tmp"  # unique: two jobs may write the same cache entry
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, mu=mu, sigma=sigma, **({} if n is None else dict(n=n)))
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise SystemExit(f"could not write the statistics to {path}: {e}")

# ----------------------------------------------------------------------------
# FID

def fid_from_samples(samples, ref, model, batch_size=200, num_workers=0, cache=None):
    """FID of samples vs ref, and the samples' Inception Score. samples: an input path, uint8
    images (N, C, H, W) or a Source; ref: the same, statistics (mu, sigma[, n]), or a function
    returning one of them, called only when file `cache` (where ref's statistics are kept, see
    cache_file) does not exist yet. Both are checked before the network runs. Only rank 0 reads
    or writes the cache (other nodes may not share its folder). Under torch.distributed every
    rank must call it (images are sharded); only rank 0 gets the numbers."""
    rank = _dist()[0]
    x = _checked(samples)
    cached = cache is not None and _rank0(os.path.exists(cache))
    if not cached:
        ref = _checked(ref() if callable(ref) else ref)
    mu1, sigma1, n, score = compute_statistics(x, model, batch_size, num_workers)
    if cached:
        if rank != 0:
            return None
        with np.load(cache) as f:
            mu2, sigma2, n_ref = f["mu"], f["sigma"], int(f["n"])
    else:
        mu2, sigma2, n_ref, _ = compute_statistics(ref, model, batch_size, num_workers,
                                                   score=False)
        if rank != 0:
            return None
        if cache and not isinstance(ref, tuple):
            try:
                save_statistics(cache, mu2, sigma2, n_ref)
            except SystemExit as e:  # the FID can still be reported
                print(f"fid: {e}; the reference statistics are not cached")
    is_mean, is_std = score or (float("nan"), float("nan"))  # statistics files hold no logits
    return dict(fid=frechet_distance(mu1, sigma1, mu2, sigma2), is_mean=is_mean, is_std=is_std,
                n=n, n_ref=n_ref)

def report(result, world, device):
    """Rank 0's lines: FID and IS, then the Inception throughput of this process."""
    print(f"FID {result['fid']:.4f}  IS {result['is_mean']:.3f} +- {result['is_std']:.3f}  "
          f"({result['n']} samples, {result['n_ref'] or '?'} ref)")
    if THROUGHPUT["seconds"] > 0:
        print(f"inception: {THROUGHPUT['images'] / THROUGHPUT['seconds']:.1f} images/s "
              f"on {world} x {device.type} ({THROUGHPUT['images']} images)")

# Benchmark

def benchmark(rounds, batch=50):
    """--bench: images/s of this file's feature extraction and, when pytorch-fid is installed (in a
    scratch environment: a reference for this benchmark only, never a dependency), of pytorch-fid's
    on the same random weights, in interleaved rounds of `batch` 32x32 images resized to 299 as
    both do; then the largest pool3 difference between the two."""
    import statistics
    import tempfile
    torch.manual_seed(0)
    net = InceptionV3()  # random weights with BatchNorm statistics away from the identity
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            for t, (lo, hi) in zip((m.weight, m.bias, m.running_mean, m.running_var),
                                   ((0.5, 1.5), (-0.2, 0.2), (-0.2, 0.2), (0.5, 2))):
                t.data.uniform_(lo, hi)
    with tempfile.TemporaryDirectory() as tmp:  # loaded from a file, as the official weights are
        torch.save(net.state_dict(), os.path.join(tmp, FID_WEIGHTS))
        ours = load_inception(os.path.join(tmp, FID_WEIGHTS))
    runs = {"fid.py": lambda x: compute_features(x, ours, batch_size=len(x))[0]}
    try:
        from pytorch_fid import inception as pfid
        pfid.load_state_dict_from_url = lambda *a, **k: net.state_dict()  # no download
        theirs = pfid.InceptionV3([3], resize_input=True, normalize_input=True).eval()
        runs["pytorch-fid"] = lambda x: theirs(x.float() / 255)[0].flatten(1).double().numpy()
    except ImportError:
        print("pytorch-fid is not installed: timing fid.py alone")
    g = torch.Generator().manual_seed(0)
    times, feats = {k: [] for k in runs}, {k: [] for k in runs}
    with torch.no_grad():
        for r in range(rounds + 1):  # round 0 warms up
            x = torch.randint(0, 256, (batch, 3, 32, 32), generator=g, dtype=torch.uint8)
            for name, run in runs.items():
                t = time.perf_counter()
                f = run(x)
                if r:
                    times[name].append(time.perf_counter() - t)
                    feats[name].append(f)
    rec = {f"{k}_img_per_s": batch / statistics.median(v) for k, v in times.items()}
    if len(runs) == 2:
        rec["ratio"] = statistics.median(b / a for a, b in zip(*times.values()))
        a, b = (np.concatenate(v) for v in feats.values())
        rec["max_rel_feature_diff"] = float(np.abs(a - b).max() / np.abs(b).max())
    print(f"{torch.get_num_threads()} threads, median of {rounds} interleaved rounds of {batch} "
          f"images: " + ", ".join(f"{k} {v:.3g}" for k, v in rec.items()))
    print(json.dumps(rec))
    return rec

# ----------------------------------------------------------------------------
# Main

def main(argv=None):
    p = argparse.ArgumentParser(description="FID (vs REF) and Inception Score of SAMPLES")
    p.add_argument("samples", nargs="?",
                   help="samples .npz (arr_0 uint8 NHWC), statistics .npz or image folder")
    p.add_argument("ref", nargs="?",
                   help="reference: statistics .npz (mu, sigma), samples .npz or image folder "
                        "(a training set by name: sample.py --fid)")
    p.add_argument("--batch-size", type=int, default=200, help="per process")
    p.add_argument("--inception", default=None,
                   help=f"path to {FID_WEIGHTS} (default: torch hub cache)")
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="image-folder decoding")
    p.add_argument("--cache-dir", default=CACHE_DIR, help="reference statistics")
    p.add_argument("--stats-out", default=None, help="save the statistics of SAMPLES here")
    p.add_argument("--bench", type=int, metavar="ROUNDS",
                   help="time the feature extraction (against pytorch-fid's, if installed), "
                        "then exit")
    args = p.parse_args(argv)
    if args.bench:
        return benchmark(args.bench)
    if args.samples is None:
        p.error("give SAMPLES")
    if args.ref is None and args.stats_out is None:
        p.error("give REF to compute FID, or --stats-out PATH to save the statistics of SAMPLES")
    if args.ref and args.stats_out:
        p.error("--stats-out saves the statistics of SAMPLES alone: drop REF or --stats-out")
    if args.stats_out:
        _check_writable(args.stats_out)
    own_pg = "RANK" in os.environ and not dist.is_initialized()
    if own_pg:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        return _run(args)
    finally:  # also on SystemExit: no leaked process group warnings after the one-line error
        if own_pg:
            dist.destroy_process_group()

def _run(args):
    """main() once the process group (if any) is up: inputs checked, then the network built."""
    rank, world = _dist()
    check_input(args.samples)
    cache = None
    if args.ref:  # a path's statistics are cached by its absolute path
        cache = cache_file(Path(args.ref).stem, os.path.abspath(args.ref), args.cache_dir)
        if not _rank0(os.path.exists(cache)) or not os.path.exists(args.ref):
            check_input(args.ref)
    device = torch.device(f"cuda:{_local_rank()}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = load_inception(args.inception, device)
    if args.stats_out:
        mu, sigma, n, _ = compute_statistics(args.samples, model, args.batch_size,
                                             args.num_workers, score=False)
        if rank != 0:
            return None
        save_statistics(args.stats_out, mu, sigma, n)
        print(f"saved statistics of {n} images to {args.stats_out}")
        return dict(n=n)
    result = fid_from_samples(args.samples, args.ref, model, args.batch_size, args.num_workers,
                              cache)
    if rank == 0:
        report(result, world, device)
    return result

if __name__ == "__main__":
    main()
