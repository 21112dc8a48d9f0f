"""
DDAE++ pixel-space UViT diffusion: U-ViT-S (all inputs as tokens, long skips) trained as DDPM, optionally with
the [CLS] self-conditioning token, non-leaky augmentation and contrastive self-distillation (paper Fig. 2).

    python train_uvit.py --dataset shapes --net tiny                           # CPU quickstart, a few minutes
    torchrun --nproc_per_node=4 train_uvit.py --dataset cifar10 --self-cond    # Table 2, UViT-S + 1 token
    torchrun --nproc_per_node=4 train_uvit.py --dataset cifar100 --self-cond --aug --cl   # Table 3, last row
    python train_uvit.py --self-cond --dry-run                                 # config + parameter counts

Standalone on purpose: model, self-conditioning, diffusion, data, augmentation and training loop live in this file.
"""
import argparse
import copy
import functools
import hashlib
import json
import math
import os
import random
import signal
import statistics
import sys
import tarfile
import time
import urllib.request
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------------------
# Config: backbone presets, DDPM defaults (paper Table 8), feature layer and probe step (Table 10)

NETS = {  # patch size, width, transformer blocks (in + mid + out), heads, MLP ratio
    "uvit_s": dict(patch=2, dim=512, depth=13, heads=8, mlp_ratio=4),  # official U-ViT CIFAR config: 44,255,328
    "tiny":   dict(patch=4, dim=64, depth=5, heads=4, mlp_ratio=2),    # CPU tests and quickstart
}
DATASETS = {  # classes, resolution, default training epochs (the paper trains every pixel model 2000 epochs)
    "cifar10": (10, 32, 2000), "cifar100": (100, 32, 2000), "tiny-imagenet": (200, 64, 2000),
    "shapes": (10, 32, 40),  # small enough that the tiny CPU quickstart finishes in minutes
}
WARMUP_EPOCHS = 13  # Table 11, DDPM
# Table 10, DDPM UViT-S: (probe step t, layer) on CIFAR-10/100, and on Tiny-ImageNet / ImageNet100-64
PROBE = {"cifar10": (11, "out_2"), "cifar100": (11, "out_2"), "tiny-imagenet": (66, "out_1"), "in100": (66, "out_1")}
AUG_DIM = 9  # the augment label of the non-leaky pipe
ARCH_KEYS = ("net", "model", "self_cond", "aug", "cl", "cl_head", "resolution", "dataset")  # resume refuses changes


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--net", choices=list(NETS), default="uvit_s")
    p.add_argument("--model", default="DDPM", help="diffusion formulation (UViT: DDPM only)")
    p.add_argument("--dataset", default="cifar10", help="cifar10, cifar100, tiny-imagenet, shapes, or a class-folder name")
    p.add_argument("--data-path", default="data", help="folder holding the dataset")
    p.add_argument("--resolution", type=int, default=None, help="image size (default: the dataset's; folders: 64)")
    p.add_argument("--out", default=None, help="run directory (default runs/uvit-<dataset>-<net>-DDPM[-sc][-aug][-cl])")
    p.add_argument("--self-cond", action="store_true", help="add the learnable [CLS] token (paper Fig. 2a)")
    p.add_argument("--sc-layer", default=None, help="out-block for probing and contrastive features (default: Table 10)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default 256 uvit_s, 128 tiny)")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--weight-decay", type=float, default=0.03, help="AdamW; not on biases and position embeddings")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema", type=float, default=0.9999, help="EMA decay (Table 8)")
    p.add_argument("--train-images", type=int, default=None, help="training length (default: paper epochs x dataset)")
    p.add_argument("--warmup-images", type=int, default=None, help="lr warm-up (default: Table 11 epochs x dataset)")
    p.add_argument("--log-every", type=int, default=None, help="images between log lines (default 50k; ten lines in shorter runs)")
    p.add_argument("--ckpt-every", type=int, default=1_000_000, help="images between checkpoints")
    p.add_argument("--sample-every", type=int, default=5_000_000, help="images between preview grids")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aug", action="store_true", help="non-leaky augmentation; its label enters as its own token")
    p.add_argument("--cl", action="store_true", help="contrastive self-distillation from the EMA model (needs --aug)")
    p.add_argument("--cl-weight", type=float, default=0.01, help="gamma, Table 7d")
    p.add_argument("--cl-feature", choices=["cls", "pool"], default="cls",
                   help="[CLS] token or pooled image tokens (Table 7e)")
    p.add_argument("--cl-head", choices=["time", "mocov3"], default="time", help="projection head (Table 7b)")
    p.add_argument("--cl-target-t", choices=["probe", "min"], default="probe", help="target noise level (Table 7c)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images in folder datasets")
    p.add_argument("--dry-run", action="store_true", help="print the config and parameter counts, then exit")
    p.add_argument("--bench", type=int, nargs="?", const=20, default=0, metavar="STEPS",
                   help="time STEPS training steps on synthetic data, with and without --self-cond, then exit")
    args = p.parse_args(argv)

    if args.model != "DDPM":
        p.error(f"--model {args.model}: UViT trains as DDPM only (the paper found EDM and RF unstable with UViT); "
                f"use train_unet.py for EDM/RF")
    if args.cl and not args.aug:
        p.error("--cl needs --aug: the contrastive views come from the augment pipe")
    if args.cl and args.cl_feature == "cls" and not args.self_cond:
        p.error("--cl-feature cls needs --self-cond (the [CLS] token); or use --cl-feature pool")
    ncls, res, _ = DATASETS.get(args.dataset, (None, 64, 2000))
    args.resolution = args.resolution or res
    if args.resolution % NETS[args.net]["patch"]:
        p.error(f"--resolution {args.resolution} is not a multiple of the {args.net} patch {NETS[args.net]['patch']}")
    args.num_classes = ncls  # folders: filled in from the data when it is loaded
    args.batch_size = args.batch_size or {"uvit_s": 256, "tiny": 128}[args.net]
    n_out = NETS[args.net]["depth"] // 2
    probe_t, layer = PROBE.get(args.dataset, (11, "out_2"))
    args.sc_layer = args.sc_layer or layer  # out_1 / out_2 exist in every preset
    if args.sc_layer.isdigit():
        args.sc_layer = f"out_{args.sc_layer}"
    if args.sc_layer not in [f"out_{i}" for i in range(1, n_out + 1)]:
        p.error(f"--sc-layer {args.sc_layer}: the {args.net} decoder has out_1 .. out_{n_out}")
    args.probe_t = probe_t
    suffix = "-sc" * args.self_cond + "-aug" * args.aug + "-cl" * args.cl
    args.out = args.out or f"runs/uvit-{args.dataset}-{args.net}-{args.model}{suffix}"
    return args


# ----------------------------------------------------------------------------------------------------------
# Model: U-ViT (time, conditions and patches are all tokens; out-blocks fuse long skips from the in-blocks)

def timestep_embedding(t, dim, max_period=10_000):
    """U-ViT's sinusoid of a (N,) float tensor: (N, dim), cos half first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


class Attention(nn.Module):
    """Multi-head self-attention through SDPA (flash kernels whenever no mask is needed)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)  # qkv_bias=False as in U-ViT
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        n, s, d = x.shape
        q, k, v = self.qkv(x).view(n, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (N, H, S, Dh) each
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask (S, S) bool, True = may attend
        return self.proj(x.transpose(1, 2).reshape(n, s, d))


class Block(nn.Module):
    """Pre-LN transformer block; an out-block first fuses its long skip with Linear(2D, D) on the concat."""

    def __init__(self, dim, heads, mlp_ratio, skip=False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x, skip=None, mask=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    """U-ViT denoiser; token order [time, (augment label), ([CLS]), patches], out-blocks named out_1 .. out_N."""

    def __init__(self, patch, dim, depth, heads, mlp_ratio, resolution=32, self_cond=False, aug=False,
                 sc_layer="out_1"):
        super().__init__()
        self.patch, self.dim = patch, dim
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        # Non-leaky augmentation: the label becomes its own token; bias-free (as EDM's label embedding) so the
        # zero label used for sampling and probing leaves only the token's position embedding.
        self.aug_embed = nn.Linear(AUG_DIM, dim, bias=False) if aug else None
        # ------------------------------------------------------------------------------------------------------
        # Self-conditioning: one learnable [CLS] token with its own position-embedding row (+2 x dim parameters).
        # It has no loss of its own; through attention it gathers global semantics from the image tokens and
        # conditions them in return, so the net picks its own "designated layer" (paper Fig. 2a).
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if self_cond else None
        # ------------------------------------------------------------------------------------------------------
        self.extras = 1 + aug + self_cond  # tokens in front of the patches
        self.cls_index = self.extras - 1  # [CLS] comes last among them
        n_tok = self.extras + (resolution // patch) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tok, dim))  # learnable, one row per token
        self.in_blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth // 2)])
        self.mid_block = Block(dim, heads, mlp_ratio)
        self.out_blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, skip=True) for _ in range(depth // 2)])
        self.norm = nn.LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, patch * patch * 3)
        self.final_layer = nn.Conv2d(3, 3, 3, padding=1)  # U-ViT's conv after unpatchify smooths patch seams
        self.feature_layers = [f"out_{i + 1}" for i in range(depth // 2)]  # image tokens, pooled
        self.cls_layers = [f"cls_{i + 1}" for i in range(depth // 2)] if self_cond else []  # [CLS] per out-block
        self.sc_layer = sc_layer  # the feature name "cls" means the [CLS] output of this out-block
        # With both extra tokens, [CLS] and the augment label must not see each other (paper Fig. 2b: their
        # interaction hurts); both still attend to time and image tokens and are seen by them.
        mask = None
        if self_cond and aug:
            mask = torch.ones(n_tok, n_tok, dtype=torch.bool)
            mask[1, 2] = mask[2, 1] = False  # rows attend, columns are attended: [1] = augment label, [2] = [CLS]
        self.register_buffer("attn_mask", mask, persistent=False)
        self.initialize_weights()

    def initialize_weights(self):
        """U-ViT's init: trunc-normal(0.02) linears and embeddings, zero biases; convs keep torch defaults."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)  # like a position embedding: a small random start

    def forward(self, x, t, y=None, aug=None, feats=()):
        """x (N, 3, H, W), t (N,) = DDPM step / T; returns eps (and {name: (N, dim) float32} if feats)."""
        if y is not None:
            raise ValueError("the UViT here is unconditional, as in the paper: pass y=None")
        want = {f: f"cls_{self.sc_layer[4:]}" if f == "cls" else f for f in feats}
        unknown = set(want.values()) - set(self.feature_layers + self.cls_layers)
        if unknown:
            raise ValueError(f"unknown UViT feature {sorted(unknown)}: choose from {self.feature_layers}"
                             + (", cls, cls_1 .." if self.cls_layers else " (cls needs a --self-cond model)"))
        n, _, hh, ww = x.shape
        h = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, L, D)
        # Timestep scale: U-ViT's discrete-time models take the step n in 1..1000 as is (its CIFAR model takes
        # 999 * t, t in (0, 1]: the same range). We get t/T with t in 1..T = 1000, so 1000 * t is exactly the step.
        tokens = [timestep_embedding(1000 * t, self.dim)[:, None]]  # raw sinusoid token, no MLP (mlp_time_embed=False)
        if self.aug_embed is not None:
            aug = x.new_zeros(n, AUG_DIM) if aug is None else aug
            tokens.append(self.aug_embed(aug)[:, None])
        if self.cls_token is not None:
            tokens.append(self.cls_token.expand(n, -1, -1))
        h = torch.cat(tokens + [h.float()], dim=1) + self.pos_embed  # (N, S, D)
        skips = []
        for blk in self.in_blocks:
            h = blk(h, mask=self.attn_mask)
            skips.append(h)
        h = self.mid_block(h, mask=self.attn_mask)
        pooled = {}
        for i, blk in enumerate(self.out_blocks):
            h = blk(h, skips.pop(), mask=self.attn_mask)
            for name, layer in want.items():
                if layer == f"out_{i + 1}":
                    pooled[name] = h[:, self.extras:].float().mean(1)  # image tokens only
                elif layer == f"cls_{i + 1}":
                    pooled[name] = h[:, self.cls_index].float()
        h = self.decoder_pred(self.norm(h))[:, self.extras:]  # (N, L, p*p*3), the extra tokens are dropped
        p = self.patch
        h = h.view(n, hh // p, ww // p, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(n, 3, hh, ww)  # unpatchify
        out = self.final_layer(h)
        return (out, pooled) if feats else out


def build_model(args):
    model = UViT(**NETS[args.net], resolution=args.resolution, self_cond=args.self_cond, aug=args.aug,
                 sc_layer=args.sc_layer)
    if args.cl:  # part of the model, so optimizer, DDP, EMA (the teacher's head) and checkpoint cover it
        model.cl_head = ProjHead(model.dim, mode=args.cl_head)
    return model


def param_groups(model, weight_decay):
    """AdamW groups: decay on everything but biases and position embeddings (paper App. A), so the [CLS]
    token and LayerNorm gains are decayed (the official U-ViT decays every parameter)."""
    decay, no_decay = [], []
    for name, prm in model.named_parameters():
        (no_decay if name.endswith("bias") or name == "pos_embed" else decay).append(prm)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------------------------
# Diffusion: DDPM (paper Table 8). Paper convention: t=0 is data, t=T is noise. Data lives in [-1, 1].
# The paper found EDM and RF unstable with UViT, so only DDPM is here; train_unet.py has all three.
# sample() is a short deterministic sampler for preview grids only (sample.py holds the paper's samplers).

def _split(out, feats):
    return out if feats else (out, None)


class DDPM:
    """Linear betas 1e-4..0.02 over T=1000 steps, eps-prediction, unweighted MSE (DDAE's indexing: t in 1..T)."""

    kind = "DDPM"

    def __init__(self, T=1000):
        self.T = T
        betas = torch.cat([torch.zeros(1), torch.linspace(1e-4, 0.02, T)]).double()
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)  # (T+1,), index 0 = clean data

    def _ab(self, t, x):
        return self.alphas_cumprod.to(x.device)[t].to(x.dtype).view(-1, 1, 1, 1)

    def add_noise(self, x0, t, noise):
        ab = self._ab(t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def pred(self, model, x, t, y=None, aug=None, feats=()):
        return model(x, t.float() / self.T, y, aug, feats)  # DDAE feeds t/T to the network

    def loss(self, model, x0, y=None, aug=None, feats=()):
        """Per-sample loss (N,) and level t/T (N,); with feats also the training forward's features (with grad)."""
        t = torch.randint(1, self.T + 1, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        eps, pooled = _split(self.pred(model, self.add_noise(x0, t, noise), t, y, aug, feats), feats)
        loss = (eps.float() - noise).square().mean(dim=(1, 2, 3))
        return (loss, t.float() / self.T, pooled) if feats else (loss, t.float() / self.T)

    @torch.no_grad()
    def sample(self, model, noise, steps=50):
        """DDIM (eta 0) from t=T to clean."""
        ts, x = torch.linspace(self.T, 0, steps + 1).round().long().to(noise.device), noise
        for t, s in zip(ts[:-1], ts[1:]):
            eps = self.pred(model, x, t.repeat(len(x))).float()
            ab_t, ab_s = self._ab(t.repeat(len(x)), x), self._ab(s.repeat(len(x)), x)
            x0 = ((x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()).clamp(-1, 1)
            x = ab_s.sqrt() * x0 + (1 - ab_s).sqrt() * eps
        return x


def build_diffusion(args):
    return DDPM()


# ----------------------------------------------------------------------------------------------------------
# Data: every dataset is one uint8 tensor (N, 3, H, W) in memory (CIFAR is 150 MB, Tiny-ImageNet 1.2 GB)

@functools.lru_cache(maxsize=4)
def make_shapes(n, seed, res=32):
    """Deterministic toy dataset: 10 classes of anti-aliased shapes, random size, pose, colours; uint8 + labels."""
    g = np.random.default_rng(seed)
    y = g.permutation(np.arange(n) % 10)
    cx, cy = (g.uniform(0.35, 0.65, (2, n, 1, 1)) * res).astype(np.float32)
    r = (g.uniform(0.2, 0.33, (n, 1, 1)) * res).astype(np.float32)
    rot = g.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
    yy, xx = np.mgrid[:res, :res].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    u, v = dx * np.cos(rot) + dy * np.sin(rot), -dx * np.sin(rot) + dy * np.cos(rot)  # shape-aligned coords
    rho, th = np.hypot(u, v), np.arctan2(v, u)

    def polygon(r, th, k):  # distance from the center to the edge of a regular k-gon along each ray
        return r * np.cos(np.pi / k) / np.cos((th % (2 * np.pi / k)) - np.pi / k)

    sdf = [  # signed distance in pixels, negative inside; one per class
        lambda u, v, rho, th, r: rho - r,                                                  # 0 disc
        lambda u, v, rho, th, r: rho - polygon(r, th, 3),                                  # 1 triangle
        lambda u, v, rho, th, r: rho - polygon(r, th, 4),                                  # 2 square
        lambda u, v, rho, th, r: rho - r * (0.6 + 0.4 * np.cos(5 * th)),                   # 3 star
        lambda u, v, rho, th, r: np.abs(rho - 0.75 * r) - 0.25 * r,                        # 4 ring
        lambda u, v, rho, th, r: np.minimum(np.maximum(abs(u) - 0.3 * r, abs(v) - r),
                                            np.maximum(abs(v) - 0.3 * r, abs(u) - r)),     # 5 plus
        lambda u, v, rho, th, r: np.maximum(rho - r, 0.75 * r - np.hypot(u - 0.45 * r, v)),  # 6 crescent
        lambda u, v, rho, th, r: np.hypot(u, v / 0.45) - r,                                # 7 thin ellipse
        lambda u, v, rho, th, r: np.maximum(rho - r, -u),                                  # 8 half disc
        lambda u, v, rho, th, r: np.minimum(np.hypot(u - 0.55 * r, v), np.hypot(u + 0.55 * r, v)) - 0.42 * r,  # 9 dots
    ]
    d = np.empty((n, res, res), dtype=np.float32)
    for c, f in enumerate(sdf):
        i = y == c
        d[i] = f(u[i], v[i], rho[i], th[i], r[i])
    alpha = np.clip(0.5 - d, 0, 1)[:, None]  # (N, 1, H, W) anti-aliased coverage
    bg, fg = g.uniform(0, 0.45, (n, 3, 1, 1)), g.uniform(0.55, 1, (n, 3, 1, 1))
    img = bg * (1 - alpha) + fg * alpha
    return torch.from_numpy(np.round(img * 255).astype(np.uint8)), torch.from_numpy(y.astype(np.int64))


CIFAR = {  # official python pickle archives: url, md5, extracted folder, train files, test files, label key
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
                 "cifar-100-python", ["train"], ["test"], b"fine_labels"),
}


def _download_cifar(name, root):
    """Fetch and verify the official archive; without network, say where the files must go."""
    url, md5, folder = CIFAR[name][:3]
    archive = root / url.rsplit("/", 1)[1]
    try:
        root.mkdir(parents=True, exist_ok=True)
        urllib.request.urlretrieve(url, archive.with_suffix(".part"))
    except OSError as e:
        raise SystemExit(f"{name} not found at {root / folder} and the download failed ({e}): "
                         f"extract {url} there, or pass --data-path")
    if hashlib.md5(archive.with_suffix(".part").read_bytes()).hexdigest() != md5:
        raise SystemExit(f"{url} downloaded with a wrong checksum; delete {archive.with_suffix('.part')} and retry")
    os.replace(archive.with_suffix(".part"), archive)
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")


def load_cifar(name, root, split):
    import pickle
    url, md5, folder, train_files, test_files, key = CIFAR[name]
    root = Path(root)
    if root.name == folder:
        root = root.parent
    if not (root / folder).is_dir():
        _download_cifar(name, root)
    xs, ys = [], []
    for f in train_files if split == "train" else test_files:
        with open(root / folder / f, "rb") as fh:
            d = pickle.load(fh, encoding="bytes")
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def center_crop(img, res):
    """ADM's center crop: box-downsample while the short side is >= 2x, bicubic to res, crop the center."""
    while min(img.size) >= 2 * res:
        img = img.resize(tuple(s // 2 for s in img.size), Image.BOX)
    scale = res / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), Image.BICUBIC)
    x, y = (img.size[0] - res) // 2, (img.size[1] - res) // 2
    return img.crop((x, y, x + res, y + res))


def load_images(files, res, skip_bad):
    """Decode a list of (path, label) into one uint8 tensor; a corrupt file stops with its name unless skip_bad."""
    xs, ys, bad = [], [], 0
    for f, label in tqdm(files, desc="decoding images", disable=len(files) < 1000 or not _is_main()):
        try:
            with Image.open(f) as im:
                xs.append(np.asarray(center_crop(im.convert("RGB"), res)).transpose(2, 0, 1))
        except (OSError, SyntaxError) as e:
            if not skip_bad:
                raise SystemExit(f"cannot read image {f} ({e}); fix or remove it, or pass --skip-bad")
            bad += 1
            continue
        ys.append(label)
    if bad:
        print(f"skipped {bad} unreadable images")
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.int64)


IMG_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def load_dataset(args, split="train"):
    """Return (images uint8 (N, 3, H, W), labels int64 (N,)) for a split ('train' or 'test')."""
    if args.dataset == "shapes":
        return make_shapes(10_000 if split == "train" else 2_000, seed=0 if split == "train" else 1, res=args.resolution)
    if args.dataset in CIFAR:
        return load_cifar(args.dataset, args.data_path, split)
    root = Path(args.data_path)
    if args.dataset == "tiny-imagenet":
        root = root if (root / "wnids.txt").exists() else root / "tiny-imagenet-200"
        if not (root / "wnids.txt").exists():
            raise SystemExit(f"tiny-imagenet not found under {args.data_path}: unzip tiny-imagenet-200.zip there")
        wnids = (root / "wnids.txt").read_text().split()
        if split == "train":
            files = [(f, i) for i, w in enumerate(wnids) for f in sorted((root / "train" / w / "images").iterdir())]
        else:
            rows = [line.split("\t")[:2] for line in (root / "val" / "val_annotations.txt").read_text().splitlines()]
            files = [(root / "val" / "images" / f, wnids.index(w)) for f, w in rows]
        return load_images(files, args.resolution, args.skip_bad)
    # class folders: <root>/<class>/*.jpg, or <root>/train/<class> and <root>/val/<class>
    sub = {"train": "train", "test": "val"}[split]
    if (root / sub).is_dir():
        root = root / sub
    classes = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).rglob("*")) if f.suffix.lower() in IMG_EXT]
    if not files:
        raise SystemExit(f"no images found for dataset {args.dataset!r} under {root}: "
                         f"point --data-path at a folder of class sub-folders")
    return load_images(files, args.resolution, args.skip_bad)


# ----------------------------------------------------------------------------------------------------------
# Non-leaky augmentation

# Low-pass decomposition filter of the sym6 wavelet (12 taps, sum sqrt(2)). Being orthogonal, upsampling with it and
# downsampling with it again is the identity, so only the geometric warp in between changes the image.
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)


def _affine(a, b, c, d, tx, ty):
    """Batch of 3x3 matrices [[a, b, tx], [c, d, ty], [0, 0, 1]] from (N,) tensors."""
    z = torch.zeros_like(a)
    return torch.stack([a, b, tx, c, d, ty, z, z, z + 1], dim=-1).view(-1, 3, 3)


def _rotate(theta):
    return _affine(theta.cos(), -theta.sin(), theta.sin(), theta.cos(), 0 * theta, 0 * theta)


def _scale(sx, sy):
    return _affine(sx, 0 * sx, 0 * sx, sy, 0 * sx, 0 * sx)


def _apply_matrix(x, G):
    """Resample x (N, C, H, W) so that output pixel p reads input pixel G @ p (pixel units, origin at the centre)."""
    N, C, H, W = x.shape
    pad = len(SYM6) // 4  # canvas margin (pixels) kept around the output until decimation
    one = torch.ones(N, device=x.device)
    # Reflect-pad just enough to cover what the warped output canvas (plus filter support) reads.
    cx, cy = (W - 1) / 2, (H - 1) / 2
    corners = torch.tensor([[-cx, cx, cx, -cx], [-cy, -cy, cy, cy], [1.0, 1, 1, 1]], device=x.device)
    reach = (G @ corners)[:, :2]  # (N, 2, 4) where the output corners land in the input
    reach = torch.stack([-reach, reach], dim=1).amax(dim=(0, 3)).flatten()  # (4,) left, top, right, bottom
    lo = torch.tensor([2 * pad - cx, 2 * pad - cy] * 2, device=x.device)
    hi = torch.tensor([W - 1.0, H - 1.0] * 2, device=x.device)  # reflect padding cannot exceed the image
    ml, mt, mr, mb = (reach + lo).clamp(min=0).minimum(hi).ceil().int().tolist()
    x = F.pad(x, [ml, mr, mt, mb], mode='reflect')
    G = _affine(one, 0 * one, 0 * one, one, (ml - mr) / 2 * one, (mt - mb) / 2 * one) @ G
    # 2x oversampling keeps bilinear interpolation from blurring; u = 2p - 0.5 maps pixel to oversampled coordinates.
    x = _sym6_operator(x.shape[2], True, x.device).t() @ x @ _sym6_operator(x.shape[3], True, x.device)
    up = _affine(2 * one, 0 * one, 0 * one, 2 * one, -0.5 * one, -0.5 * one)
    G = up @ G @ torch.linalg.inv(up)
    # affine_grid works in [-1, 1] coordinates (align_corners=False: pixel index i -> (2i + 1) / size - 1).
    Ho, Wo = 2 * (H + 2 * pad), 2 * (W + 2 * pad)
    G = _scale(2 / x.shape[3] * one, 2 / x.shape[2] * one) @ G @ _scale(Wo / 2 * one, Ho / 2 * one)
    grid = F.affine_grid(G[:, :2].to(x.dtype), [N, C, Ho, Wo], align_corners=False)
    x = F.grid_sample(x, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
    down_h, down_w = _sym6_operator(Ho, False, x.device), _sym6_operator(Wo, False, x.device)
    return down_h[:, pad:-pad].t() @ x @ down_w[:, pad:-pad]  # decimate, then crop the canvas margin


def _sym6_operator(n, up, device):
    """Sym6 2x up- (n, 2n) or down-sampling (n, n // 2) along one axis as a dense matrix: x @ M filters rows."""
    # A small matmul beats a depthwise (transposed) convolution by ~10x on CPU and costs nothing on GPU.
    eye, k = torch.eye(n, device=device)[:, None], torch.tensor(SYM6, device=device).view(1, 1, -1)
    conv = F.conv_transpose1d if up else F.conv1d
    return conv(eye, k, stride=2, padding=len(SYM6) // 2 - 1)[:, 0]


class AugmentPipe(nn.Module):
    """EDM's geometric augmentation (CIFAR setting) returning the 9-d label the network is conditioned on.

    Label slots, EDM's order and meaning (w ~ N(0, 1); output pixel p samples the input at G p, origin at the centre):
      0 xflip (0/1)   1 yflip (0/1)   2 scale w: G = 2^(-scale_std w)
      3-4 rotation cos(a) - 1, sin(a), a ~ U[-pi, pi): G = R(a)
      5-6 aniso w cos(r), w sin(r): G = R(-r) diag(2^(-aniso_std w), 2^(aniso_std w)) R(r)  (r = 0 half of the time)
      7-8 translation wx, wy: G p = p - translate_std (wx W, wy H)
    All zero = not augmented (what sampling and probing pass). The flip is a plain 50% flip independent of p (EDM
    writes it xflip=1e8); every other op is switched on per image with probability p (a yflip then flips half of
    those). Randomness comes only from `generator`, so a seed per (rank, step) reproduces a batch exactly.
    """

    def __init__(self, p=0.12, xflip=True, yflip=1, scale=1, rotate=1, aniso=1, translate=1,
                 scale_std=0.2, aniso_std=0.2, translate_std=0.125):
        super().__init__()
        self.p, self.xflip, self.yflip, self.scale, self.rotate = p, xflip, yflip, scale, rotate
        self.aniso, self.translate = aniso, translate
        self.scale_std, self.aniso_std, self.translate_std = scale_std, aniso_std, translate_std

    def forward(self, x, generator=None):
        N, C, H, W = x.shape
        x = x.float()
        dev = generator.device if generator is not None else x.device
        # Draw everything up front in a fixed layout so enabling one op never shifts another op's randomness.
        u = torch.rand(N, 10, generator=generator, device=dev).to(x.device)
        n = torch.randn(N, 4, generator=generator, device=dev).to(x.device)
        on = lambda col, mult: (u[:, col] < mult * self.p).float()  # per-image gate of one op
        pi, one = math.pi, torch.ones(N, device=x.device)
        xf = (u[:, 0] < 0.5).float() * float(bool(self.xflip))
        yf = (u[:, 1] < 0.5).float() * on(2, self.yflip)
        s = n[:, 0] * on(3, self.scale)
        a = (2 * u[:, 4] - 1) * pi * on(5, self.rotate)
        w = n[:, 1] * on(7, self.aniso)
        r = (2 * u[:, 6] - 1) * pi * (u[:, 8] < 0.5).float()  # EDM rotates the aniso axis half of the time
        t = n[:, 2:4] * on(9, self.translate)[:, None]
        x = torch.where(xf.view(N, 1, 1, 1) > 0, x.flip(3), x)
        x = torch.where(yf.view(N, 1, 1, 1) > 0, x.flip(2), x)
        labels = torch.stack([xf, yf, s, a.cos() - 1, a.sin(), w * r.cos(), w * r.sin(), t[:, 0], t[:, 1]], 1)
        if self.scale or self.rotate or self.aniso or self.translate:  # all-or-nothing resampling, as EDM
            with torch.autocast(x.device.type, enabled=False):  # matrices and resampling stay float32 under AMP
                G = _scale(2 ** (-self.scale_std * s), 2 ** (-self.scale_std * s)) @ _rotate(a)  # output -> input
                sa = 2 ** (self.aniso_std * w)
                G = G @ _rotate(-r) @ _scale(1 / sa, sa) @ _rotate(r)
                G = G @ _affine(one, 0 * one, 0 * one, one, -t[:, 0] * W * self.translate_std,
                                -t[:, 1] * H * self.translate_std)
                x = _apply_matrix(x, G)
        return x, labels  # (N, C, H, W), (N, 9)


# ----------------------------------------------------------------------------------------------------------
# Contrastive self-distillation

def _level_embedding(level, dim=128):
    """Sinusoidal embedding (N, dim) of a noise level in [0, 1], on the usual 0..1000 time scale."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=level.device) / (dim // 2))
    angles = 1000 * level.float()[:, None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class ProjHead(nn.Module):
    """MoCo v3 projector (+ predictor) on a pooled feature (N, C); mode 'time' gates hidden units by the noise level."""

    def __init__(self, in_dim, hidden=1024, out=256, mode='time', t_dim=128):
        super().__init__()
        if mode not in ('time', 'mocov3'):
            raise ValueError(f"unknown projection head mode {mode!r}: use 'time' or 'mocov3'")
        # BN always normalises with the batch statistics (no running stats): online and EMA heads then behave the
        # same in train and eval mode, and a target at the probe noise level is not normalised with statistics
        # collected at the training noise levels.
        bn = lambda d, affine=True: nn.BatchNorm1d(d, affine=affine, track_running_stats=False)
        self.fc1, self.bn1 = nn.Linear(in_dim, hidden, bias=False), bn(hidden)
        self.fc2, self.bn2 = nn.Linear(hidden, out, bias=False), bn(out, affine=False)
        # A conditional-BN gain per hidden unit: features from different noise levels need different weighting.
        # Zero-init, so 'time' starts as exactly the 'mocov3' projector.
        self.time = nn.Linear(t_dim, hidden) if mode == 'time' else None
        if self.time is not None:
            nn.init.zeros_(self.time.weight)
            nn.init.zeros_(self.time.bias)
        self.predictor = nn.Sequential(nn.Linear(out, hidden, bias=False), bn(hidden), nn.ReLU(),
                                       nn.Linear(hidden, out, bias=False))

    def project(self, f, level):  # (N, C), (N,) in [0, 1] -> (N, out); the EMA (target) branch stops here
        h = self.bn1(self.fc1(f.float()))
        if self.time is not None:
            h = h * (1 + self.time(_level_embedding(level, self.time.in_features)))
        return self.bn2(self.fc2(F.relu(h)))

    def forward(self, f, level):  # online branch: projector then predictor
        return self.predictor(self.project(f, level))


def contrastive_loss(q, k, T=0.2):
    """InfoNCE of online q (N, D) against targets k (N, D) gathered from all ranks, scaled by 2T as in MoCo v3."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.detach().float(), dim=1)
    rank = 0
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        ks = [torch.empty_like(k) for _ in range(dist.get_world_size())]
        dist.all_gather(ks, k.contiguous())  # no gradient flows through the targets
        k, rank = torch.cat(ks), dist.get_rank()
    labels = torch.arange(len(q), device=q.device) + rank * len(q)  # the positive is this rank's own slice
    with torch.autocast(q.device.type, enabled=False):  # logits / T need more than bf16's 8 mantissa bits
        return F.cross_entropy(q @ k.t() / T, labels) * (2 * T)


# ----------------------------------------------------------------------------------------------------------
# Training

def _is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python` is a world of one."""
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # LOCAL_RANK, not RANK: multi-node safe
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    return rank, world, device


def batch_indices(start, n, size, seed):
    """Sample indices for stream positions start..start+n: epoch e is a fixed permutation seeded by (seed, e)."""
    idx, pos = [], start
    while pos < start + n:
        epoch, off = divmod(pos, size)
        perm = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        take = min(size - off, start + n - pos)
        idx.append(perm[off:off + take])
        pos += take
    return torch.cat(idx)


@torch.no_grad()
def update_ema(ema, model, step, rate):
    decay = min(rate, 1 - (1 + step) ** (-2 / 3))  # warm-up as DDAE's ema_pytorch: early EMA tracks the model
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def save_grid(images, path):
    """(N, 3, H, W) in [-1, 1] -> one PNG, 8 per row."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu()
    n, c, h, w = x.shape
    cols = min(8, n)
    rows = math.ceil(n / cols)
    grid = torch.zeros(c, rows * h, cols * w, dtype=torch.uint8)
    for i, im in enumerate(x):
        grid[:, (i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = im
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


def atomic_save(obj, path):
    """Write to a temporary name, then rename: a kill at any instant leaves the previous file intact."""
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state():
    return {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
            "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.zeros(0, dtype=torch.uint8)}


def load_checkpoint_for_resume(path, args, log):
    """Load <out>/ckpt.pt, refusing another script or architecture and listing changed hyper-parameters."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}); "
                         f"restore it from a copy or delete it to start afresh")
    if ckpt.get("script") != Path(__file__).name:
        raise SystemExit(f"{path} was written by {ckpt.get('script')}, not {Path(__file__).name}: use another --out")
    old = ckpt["args"]
    arch = [k for k in ARCH_KEYS if old.get(k) != getattr(args, k)]
    if arch:
        raise SystemExit(f"{path} has another architecture ({', '.join(f'{k}: {old.get(k)} -> {getattr(args, k)}' for k in arch)}); "
                         f"use another --out")
    changed = [k for k in vars(args) if k not in ("dry_run",) and old.get(k, getattr(args, k)) != getattr(args, k)]
    if changed:
        log("warning: resuming with changed settings: " + ", ".join(f"{k} {old.get(k)} -> {getattr(args, k)}" for k in changed))
    return ckpt


def count_params(m):
    return sum(p.numel() for p in m.parameters()) if m is not None else 0


def contrastive_step(model, ema, diffusion, pipe, x, f, level, feat, args):
    """Contrastive self-distillation: online feature f of the training view vs the EMA model's feature `feat` of a
    second view noised at the target step, both through their own copy of the head (EMA head: projector only)."""
    x2, aug2 = pipe(x)  # a second, independent view of the clean batch
    t2 = torch.full((len(x2),), args.probe_t if args.cl_target_t == "probe" else 1, device=x.device)  # Table 7c
    with torch.no_grad():
        _, f2 = diffusion.pred(ema, diffusion.add_noise(x2, t2, torch.randn_like(x2)), t2, aug=aug2, feats=(feat,))
        k = ema.cl_head.project(f2[feat], t2.float() / diffusion.T)
    return contrastive_loss(model.cl_head(f, level), k)


def train_step(net, model, ema, opt, diffusion, pipe, x, step, args):
    """One optimisation step from a clean batch in [-1, 1]: flip or augment, loss, backward, clip, AdamW, EMA.
    Training and --bench both run it, so the benchmark times what training does. Returns loss (N,), level (N,), cl."""
    if pipe is None:
        xa, aug = torch.where(torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5, x.flip(3), x), None
    else:
        xa, aug = pipe(x)  # the pipe does the 50% horizontal flip itself and reports it in the label (as EDM)
    # Table 7e: the contrastive feature is the [CLS] token or the pooled image tokens, both read at the designated
    # out-block (Table 10, where the probe reads too), so the two options differ only in which token carries it
    feat = "cls" if args.cl_feature == "cls" else args.sc_layer
    with torch.autocast("cuda", dtype=torch.bfloat16) if x.is_cuda else nullcontext():
        loss, level, *f = diffusion.loss(net, xa, aug=aug, feats=(feat,) if args.cl else ())
        cl = contrastive_step(model, ema, diffusion, pipe, x, f[0][feat], level, feat, args) if args.cl else x.new_zeros(())
    opt.zero_grad(set_to_none=True)
    (loss.mean() + args.cl_weight * cl).backward()
    nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    opt.step()
    update_ema(ema, model, step, args.ema)
    return loss.detach(), level, cl.detach()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device, dtype):
    """Measured dense matmul TFLOP/s in the training dtype on this machine: the denominator of MFU."""
    n, reps = (8192, 50) if device.type == "cuda" else (1024, 10)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def bench_setup(args, device):
    """Model, EMA, optimizer and augment pipe as training builds them, on a synthetic batch: (model, step(i, net))."""
    torch.manual_seed(args.seed)
    model = build_model(args).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.99, 0.999),
                            fused=device.type == "cuda")
    diffusion = build_diffusion(args)
    pipe = AugmentPipe() if args.aug else None
    x = torch.rand(args.batch_size, 3, args.resolution, args.resolution, device=device) * 2 - 1
    return model, lambda i, net: train_step(net, model, ema, opt, diffusion, pipe, x, i, args)


def benchmark(args, rounds=5):
    """--bench: img/s, ms/step, peak memory, model FLOPs, MFU, and the step-time cost of self-conditioning."""
    import resource
    from torch.utils.flop_counter import FlopCounterMode
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak_tflops = matmul_peak(device, dtype)

    def timed(step, net, n):
        _sync(device)
        t = time.perf_counter()
        for i in range(n):
            step(i, net)
        _sync(device)
        return (time.perf_counter() - t) / n

    runs = []  # the configuration asked for, then the same with self-conditioning toggled
    for a in (args, argparse.Namespace(**{**vars(args), "self_cond": not args.self_cond})):
        model, step = bench_setup(a, device)
        if not runs:
            with FlopCounterMode(display=False) as counter:  # one whole training step, counted uncompiled
                step(0, model)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        net = torch.compile(model) if args.compile else model
        timed(step, net, 3)  # warm-up (and compilation)
        if not runs:  # peak memory of the asked-for configuration alone; CPU: the process's peak RSS
            mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else \
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        runs.append((step, net))
    # Interleaved rounds, medians: a drifting clock or a neighbour's load hits both configurations alike.
    rounds = min(rounds, args.bench)
    times = [[timed(step, net, args.bench // rounds) for step, net in runs] for _ in range(rounds)]
    sec = statistics.median(t[0] for t in times)
    overhead = statistics.median(t[0] / t[1] if args.self_cond else t[1] / t[0] for t in times)
    flops = counter.get_total_flops() / args.batch_size
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    rec = {"script": Path(__file__).name, "net": args.net, "model": args.model, "self_cond": args.self_cond,
           "batch": args.batch_size, "device": name, "dtype": str(dtype).split(".")[1], "img_per_s": args.batch_size / sec,
           "ms_per_step": 1e3 * sec, "peak_mem_gib": mem / 2**30, "gflop_per_img": flops / 1e9,
           "tflops": flops * args.batch_size / sec / 1e12, "matmul_peak_tflops": peak_tflops,
           "self_cond_overhead": overhead}
    rec["mfu"] = rec["tflops"] / peak_tflops
    print(f"{args.net} {args.model} batch {args.batch_size} on {name} ({rec['dtype']}): {rec['img_per_s']:.1f} img/s, "
          f"{rec['ms_per_step']:.1f} ms/step, peak {rec['peak_mem_gib']:.2f} GiB, {rec['gflop_per_img']:.2f} GFLOP/img, "
          f"{rec['tflops']:.3f} TFLOP/s = {100 * rec['mfu']:.1f}% of the measured matmul peak {peak_tflops:.2f} TFLOP/s")
    print(f"self-conditioning step time x{overhead:.4f} (median of {rounds} interleaved rounds of {args.bench // rounds} steps)")
    print(json.dumps(rec))
    return rec


def param_report(model):
    """One line of parameter counts: total and what each option adds."""
    n_sc = 2 * model.cls_token.numel() if model.cls_token is not None else 0  # token + its position-embedding row
    n_aug = count_params(model.aug_embed) + (model.dim if model.aug_embed is not None else 0)  # + its position row
    return (f"parameters: {count_params(model):,} total, {n_sc:,} self-conditioning, {n_aug:,} augment label, "
            f"{count_params(getattr(model, 'cl_head', None)):,} contrastive head")


def main(argv=None):
    args = get_args(argv)
    torch.manual_seed(args.seed)  # the initial weights are a function of --seed too (DDP also broadcasts rank 0's)
    model = build_model(args)
    if args.dry_run:
        print(json.dumps(vars(args), indent=2))
        print(param_report(model))
        return
    if args.bench:
        return benchmark(args)

    rank, world, device = setup_distributed()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    logfile = open(out / "log.txt", "a") if rank == 0 else None

    def log(msg):
        if rank == 0:
            tqdm.write(msg)
            logfile.write(msg + "\n")
            logfile.flush()

    # Data, kept whole on the device: a step is an index gather, no loader processes.
    images, labels = load_dataset(args, "train")
    args.num_classes = args.num_classes or int(labels.max()) + 1
    n_data = len(images)
    epochs = DATASETS.get(args.dataset, (0, 0, 2000))[2]
    args.train_images = args.train_images or epochs * n_data
    args.log_every = args.log_every or min(50_000, max(args.train_images // 10, 1))
    # Table 11 warm-up in epochs, capped at 10% of the run so short runs still train (inactive at 2000 epochs).
    args.warmup_images = args.warmup_images if args.warmup_images is not None else min(
        WARMUP_EPOCHS * n_data, args.train_images // 10)
    images = images.to(device)

    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    # AdamW with U-ViT's CIFAR betas (0.99, 0.999) and weight decay 0.03 (the paper inherits U-ViT's settings)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.99, 0.999),
                            fused=device.type == "cuda")
    diffusion = build_diffusion(args)
    step = images_seen = 0
    if (out / "ckpt.pt").exists():
        ckpt = load_checkpoint_for_resume(out / "ckpt.pt", args, log)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        step, images_seen = ckpt["step"], ckpt["images"]
        if len(ckpt["rng"]) == world:
            torch.set_rng_state(ckpt["rng"][rank]["torch"])
        log(f"resumed from {out / 'ckpt.pt'} at step {step} ({images_seen:,} images)")
    log(f"{Path(__file__).name} {' '.join(sys.argv[1:])}\n{json.dumps(vars(args))}")
    log(f"{param_report(model)}; {n_data:,} training images; world {world}")

    net = model
    if args.compile:
        net = torch.compile(net)
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    local_bs = args.batch_size // world

    stop = {"signal": None}  # SIGTERM/SIGINT: finish the step, checkpoint, exit cleanly
    handlers = {s: signal.signal(s, lambda signum, frame: stop.__setitem__("signal", signum))
                for s in (signal.SIGTERM, signal.SIGINT)}

    def save():
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if rank == 0:
            atomic_save({"script": Path(__file__).name, "args": vars(args), "model": model.state_dict(),
                         "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step, "images": images_seen,
                         "rng": rngs}, out / "ckpt.pt")

    def preview():
        if rank == 0:
            g = torch.Generator().manual_seed(args.seed)  # the same noise every time: grids are comparable
            noise = torch.randn(64, 3, args.resolution, args.resolution, generator=g).to(device)
            with autocast:
                save_grid(diffusion.sample(ema, noise), out / f"grid-{images_seen:09d}.png")

    pipe = AugmentPipe() if args.aug else None
    nbins = 5
    acc = torch.zeros(2 * nbins + 3, device=device)  # per-bin loss sums and counts, contrastive sum, total sum, count
    t_log, last_log = time.time(), images_seen
    bar = tqdm(total=args.train_images, initial=images_seen, unit="img", unit_scale=True, disable=rank != 0)
    model.train()
    while images_seen < args.train_images:
        # All randomness of this step is a function of (seed, rank, step): resuming reproduces it exactly.
        torch.manual_seed(args.seed * 1_000_003 + step * 1_009 + rank)
        idx = batch_indices(images_seen + rank * local_bs, local_bs, n_data, args.seed).to(device)
        x = images[idx].float() / 127.5 - 1  # (B, 3, H, W) in [-1, 1]
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (images_seen + 1) / max(args.warmup_images, 1))
        loss, level, cl = train_step(net, model, ema, opt, diffusion, pipe, x, step, args)
        step += 1
        images_seen += args.batch_size
        bar.update(args.batch_size)
        b = (level * nbins).long().clamp(max=nbins - 1)
        acc += torch.cat([torch.bincount(b, loss, nbins), torch.bincount(b, minlength=nbins).float(),
                          cl[None] * len(loss), loss.sum()[None], acc.new_tensor([len(loss)])])

        crossed = lambda every: images_seen // every != (images_seen - args.batch_size) // every
        done = images_seen >= args.train_images
        if world > 1 and (step % 10 == 0 or done):  # agree on a stop signal without a sync every step
            flag = torch.tensor([stop["signal"] is not None], device=device, dtype=torch.float32)
            dist.all_reduce(flag)
            stop["signal"] = stop["signal"] or (signal.SIGTERM if flag.item() else None)
        if crossed(args.log_every) or done or stop["signal"] or crossed(args.ckpt_every):
            tot = acc.clone()
            if world > 1:
                dist.all_reduce(tot)  # a copy: acc keeps only this rank's sums until it is zeroed
            a = tot.tolist()
            if not math.isfinite(a[-2] + a[-3]):
                raise SystemExit(f"loss is {a[-2]} (contrastive {a[-3]}) at step {step} ({images_seen:,} images); "
                                 f"the last good checkpoint {out / 'ckpt.pt'} is kept; lower --lr or check the data")
            if crossed(args.log_every) or done:
                rec = {"step": step, "images": images_seen, "loss": a[-2] / a[-1], "lr": opt.param_groups[0]["lr"],
                       "img_per_s": (images_seen - last_log) / (time.time() - t_log)}
                rec.update({f"loss_bin{i}": a[i] / max(a[nbins + i], 1) for i in range(nbins)})
                if args.cl:
                    rec["cl_loss"] = a[-3] / a[-1]
                if rank == 0:
                    with open(out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    bar.set_postfix(loss=f"{rec['loss']:.4f}")
                log(f"step {step} images {images_seen:,} loss {rec['loss']:.4f} "
                    + " ".join(f"{rec[f'loss_bin{i}']:.3f}" for i in range(nbins))
                    + (f" cl {rec['cl_loss']:.4f}" if args.cl else "") + f" {rec['img_per_s']:.0f} img/s")
                acc.zero_()
                t_log, last_log = time.time(), images_seen
        if crossed(args.ckpt_every) or done or stop["signal"]:
            save()
        if crossed(args.sample_every) or done:
            preview()
        if stop["signal"]:
            log(f"stopped by signal {stop['signal']} at step {step}; checkpoint saved, rerun the same command to resume")
            break
    bar.close()
    for s, h in handlers.items():
        signal.signal(s, h)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
