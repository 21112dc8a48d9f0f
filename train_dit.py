"""
Train a latent-space DiT-B/1 (LightningDiT style) with rectified flow on VA-VAE latents, optionally with
DDAE++ self-conditioning (paper Tables 5, 6). One file, read top to bottom.

    torchrun --nproc_per_node=4 train_dit.py --dataset in1k --data-path /data/imagenet --self-cond
    python train_dit.py --dataset shapes --latent none --net tiny        # pixel space, CPU, no VAE

Latent mode encodes every training image (ADM center crop to 256) and its horizontal flip once with the
VA-VAE f16d32 into a memory-mapped cache (resumable, sharded over ranks), then trains on the cache.
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
# Config: presets, paper defaults (Tables 9-11), command line

NETS = {  # DiT widths; 'B' is DiT-B (paper Table 9), 'tiny' is for CPU tests
    "B": dict(width=768, depth=12, heads=12),
    "tiny": dict(width=64, depth=4, heads=4),
}
VAES = {  # LDM AutoencoderKL configs; 'f16d32' is the official VA-VAE, 'tiny' has its layout with few channels
    "f16d32": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), z_channels=32),
    "tiny": dict(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(16,), z_channels=32),
}
VAVAE_URL = "https://huggingface.co/hustvl/vavae-imagenet256-f16d32-dinov2/resolve/main/vavae-imagenet256-f16d32-dinov2.pt"
IMAGE_SIZE = 256  # latent datasets are 256x256 images -> 16x16x32 latents
EPOCHS = {  # paper Appendix A; IN1k: 90 as in Tables 5, 6 and 11 (the text says 100)
    ("in100", False): 1400, ("in100", True): 1000, ("in1k", False): 90, ("in1k", True): 90,
}
SC_LAYER = {  # Table 10: the best linear-probe block of the baseline, also where self-conditioning taps
    ("in100", False): 8, ("in100", True): 8, ("in1k", False): 9, ("in1k", True): 10,
}

ARCH_KEYS = ("net", "latent", "dataset", "resolution", "class_cond", "self_cond", "sc_mode", "sc_layer")  # resume refuses changes


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--net", choices=list(NETS), default="B")
    p.add_argument("--dataset", default="in1k", help="in1k, in100 or any class-folder name; shapes/cifar10/cifar100 with --latent none")
    p.add_argument("--data-path", default="data", help="dataset root (class folders, or train/ and val/ of class folders)")
    p.add_argument("--latent", choices=["vavae", "none"], default="vavae", help="'none': pixel space, patch 2 on 32x32")
    p.add_argument("--vae", default=None, help="VA-VAE checkpoint (default: downloaded once to ~/.cache/ddae)")
    p.add_argument("--vae-config", choices=list(VAES), default="f16d32", help="'tiny' only for tests")
    p.add_argument("--cache-dir", default=None, help="latent cache of this dataset (default runs/cache/<dataset>)")
    p.add_argument("--extract-batch", type=int, default=64, help="images per VA-VAE encode call while caching")
    p.add_argument("--workers", type=int, default=8 if torch.cuda.is_available() else 0, help="image decoding processes")
    p.add_argument("--resolution", type=int, default=32, help="pixel mode image size")
    p.add_argument("--out", default=None, help="run directory (default runs/dit-<dataset>-<net>-RF[-pixel][-cond][-sc])")
    p.add_argument("--class-cond", action=argparse.BooleanOptionalAction, default=None,
                   help="label-conditional with a null class for CFG (default: on for in1k/in100, off otherwise)")
    p.add_argument("--label-dropout", type=float, default=0.1, help="fraction of labels replaced by the null class")
    p.add_argument("--self-cond", action="store_true", help="condition later blocks on a pooled block feature")
    p.add_argument("--sc-mode", choices=["adaptive", "add"], default="adaptive", help="Table 7a: time-scaled or direct add")
    p.add_argument("--sc-layer", default=None, help="block read by self-conditioning, 'block_9' or '9' (default: Table 10)")
    p.add_argument("--cos-loss", action=argparse.BooleanOptionalAction, default=True, help="LightningDiT's cosine term")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default 1024; tiny 128)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--beta2", type=float, default=0.95, help="Adam beta2 (LightningDiT's recipe)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema", type=float, default=0.9999)
    p.add_argument("--train-images", type=int, default=None, help="training length (default: paper epochs x dataset)")
    p.add_argument("--warmup-images", type=int, default=0, help="linear lr warm-up (the latent recipe has none)")
    p.add_argument("--log-every", type=int, default=None, help="images between log lines (default 100k; ten lines in shorter runs)")
    p.add_argument("--ckpt-every", type=int, default=2_000_000, help="images between checkpoints")
    p.add_argument("--sample-every", type=int, default=10_000_000, help="images between preview grids (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--dry-run", action="store_true", help="print the config and parameter counts, then exit")
    p.add_argument("--bench", type=int, nargs="?", const=20, default=0, metavar="STEPS",
                   help="time STEPS training steps on synthetic data, with and without --self-cond, then exit")
    args = p.parse_args(argv)

    imagenet = args.dataset in ("in1k", "in100")
    args.class_cond = imagenet if args.class_cond is None else args.class_cond  # the paper reports both; cond by default
    args.num_classes = {"in1k": 1000, "in100": 100, "cifar10": 10, "cifar100": 100, "shapes": 10}.get(args.dataset)
    args.batch_size = args.batch_size or (128 if args.net == "tiny" else 1024)
    depth = NETS[args.net]["depth"]
    # Table 10 for DiT-B on ImageNet; elsewhere block 8 of 12 (the IN100 choice, the smaller-data setting), scaled
    # to the net's depth
    default_layer = round(SC_LAYER.get((args.dataset, args.class_cond), 8) * depth / 12)
    layer = args.sc_layer or str(default_layer)
    args.sc_layer = f"block_{layer}" if layer.isdigit() else layer
    if args.sc_layer not in [f"block_{i}" for i in range(1, depth + 1)]:
        p.error(f"--sc-layer {layer}: DiT-{args.net} has block_1 .. block_{depth}")
    args.probe_t = 0.25 if args.latent != "none" else 0.06  # Table 10 (DiT-B latent; pixel RF on CIFAR)
    if args.latent == "none" and args.resolution % 2:
        p.error("--resolution must be even (patch 2)")
    args.out = args.out or (f"runs/dit-{args.dataset}-{args.net}-RF{'-pixel' if args.latent == 'none' else ''}"
                            f"{'-cond' if args.class_cond else ''}{'-sc' if args.self_cond else ''}")
    return args


# ----------------------------------------------------------------------------------------------------------
# DiT building blocks (LightningDiT layout: RMSNorm, SwiGLU, qkv bias, 2D RoPE, AdaLN-zero)

def sinusoid(t, dim=256, max_period=10000):
    """Sinusoidal embedding of a float tensor t (N,) -> (N, dim), cos half first (DiT convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed(dim, grid):
    """Fixed 2D sin-cos position embedding (grid*grid, dim): first half encodes the row, second the column."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def emb(p):  # (T,) -> (T, dim/2)
        out = p.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)
    return torch.cat([emb(rows), emb(cols)], dim=1).float()


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain, computed in float32."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Rope2D(nn.Module):
    """2D rotary embedding: the first half of each head rotates with the token's row, the second with its column."""

    def __init__(self, head_dim, grid, theta=10000.0):
        super().__init__()
        quarter = head_dim // 4  # rotation pairs per axis
        freqs = 1.0 / theta ** (torch.arange(quarter, dtype=torch.float32) / quarter)
        pos = torch.arange(grid, dtype=torch.float32)
        rows, cols = torch.meshgrid(pos, pos, indexing="ij")
        angles = torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=1)  # (T, head_dim/2)
        # derived from the grid, never trained: kept out of the state dict so checkpoints stay size-agnostic
        self.register_buffer("cos", angles.cos().repeat_interleave(2, dim=1), persistent=False)  # (T, head_dim)
        self.register_buffer("sin", angles.sin().repeat_interleave(2, dim=1), persistent=False)

    def forward(self, x):  # x (N, H, L, head_dim)
        # Rotate only the trailing grid tokens: any leading extra tokens (none in this DiT) stay
        # position-free, and a table built for T patches can never be misaligned by them.
        n_extra = x.shape[-2] - self.cos.shape[0]
        if n_extra < 0:
            raise ValueError(f"RoPE table has {self.cos.shape[0]} positions but got {x.shape[-2]} tokens")
        extra, x = x[..., :n_extra, :], x[..., n_extra:, :]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        rotated = torch.stack([-x2, x1], dim=-1).flatten(-2)  # pairs (a, b) -> (-b, a)
        x = x * self.cos.to(x.dtype) + rotated * self.sin.to(x.dtype)
        return torch.cat([extra, x], dim=-2)


class Attention(nn.Module):
    """Multi-head self-attention with qkv bias, RoPE on q and k, SDPA kernel."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope):
        N, L, D = x.shape
        q, k, v = self.qkv(x).reshape(N, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (N, H, L, d)
        x = F.scaled_dot_product_attention(rope(q), rope(k), v)
        return self.proj(x.transpose(1, 2).reshape(N, L, D))


class SwiGLU(nn.Module):
    """SwiGLU MLP, hidden int(2/3 * 4 * dim); w12 holds the gate and value projections side by side."""

    def __init__(self, dim):
        super().__init__()
        hidden = int(2 / 3 * 4 * dim)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """DiT block: AdaLN-zero modulated attention and SwiGLU, both pre-normed with RMSNorm."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = SwiGLU(dim)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, emb, rope):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(emb).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """Norm -> modulate -> linear to patch pixels."""

    def __init__(self, dim, out_dim):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x, emb):
        shift, scale = self.ada(emb).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


def time_mlp(dim, freq_dim=256):
    return nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))


# ----------------------------------------------------------------------------------------------------------
# Self-conditioning (DDAE++ section 4.1, SPEC section 2)

class SelfCond(nn.Module):
    """emb' = emb + TimeMLP_sc(t) * Linear(f): the pooled block-k feature f, time-adaptively scaled."""

    def __init__(self, dim, mode="adaptive"):
        super().__init__()
        # 'adaptive' (paper default) learns a per-channel, time-dependent scale with a second copy of the
        # time MLP; 'add' is the direct-addition ablation of Table 7a
        self.scale = time_mlp(dim) if mode == "adaptive" else None
        self.proj = nn.Linear(dim, dim)
        # zero-init the projection: the model starts exactly as the baseline DiT and learns how much
        # of its own semantics to feed back (the paper does not state an init)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, emb, feat, t_freq):  # emb (N, D), feat (N, D) pooled block-k output, t_freq (N, 256)
        f = self.proj(feat)
        return emb + (f if self.scale is None else self.scale(t_freq) * f)


# ----------------------------------------------------------------------------------------------------------
# DiT

class DiT(nn.Module):
    """LightningDiT-style DiT on a (C, S, S) input with patch p; optional label table and self-conditioning."""

    def __init__(self, in_ch, size, patch, width, depth, heads, num_classes=0, sc_layer=0, sc_mode="adaptive"):
        super().__init__()
        self.in_ch, self.patch, self.num_classes = in_ch, patch, num_classes
        grid = size // patch
        self.patch_embed = nn.Conv2d(in_ch, width, patch, stride=patch)
        # the fixed sin-cos table is a frozen Parameter as in LightningDiT, so the parameter count
        # (129,787,424 for DiT-B) matches the paper's 129.8M, which includes its 196,608 entries
        self.pos_embed = nn.Parameter(sincos_pos_embed(width, grid)[None], requires_grad=False)  # (1, T, D)
        self.rope = Rope2D(width // heads, grid)
        self.t_embed = time_mlp(width)
        # num_classes + 1 rows: the last row is the null class used by label dropout and CFG
        self.y_embed = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.final = FinalLayer(width, patch * patch * in_ch)
        self.feature_layers = [f"block_{i}" for i in range(1, depth + 1)]
        self.sc_layer = sc_layer  # 1-based block index, 0 = no self-conditioning
        self.sc = SelfCond(width, sc_mode) if sc_layer else None
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear) and not (self.sc is not None and m is self.sc.proj):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        mlps = [self.t_embed] + ([self.sc.scale] if self.sc is not None and self.sc.scale is not None else [])
        for mlp in mlps:
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.weight, std=0.02)
        for ada in [b.ada for b in self.blocks] + [self.final.ada]:  # AdaLN-zero: every block starts as identity
            nn.init.zeros_(ada[-1].weight)
            nn.init.zeros_(ada[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def forward(self, x, t, y=None, aug=None, feats=()):
        """x (N, C, S, S), t (N,) in [0, 1] with t=1 noise; y (N,) labels, num_classes = null, None = all null."""
        if aug is not None:
            raise ValueError("train_dit.py has no augmentation conditioning: pass aug=None")
        unknown = set(feats) - set(self.feature_layers)
        if unknown:
            raise ValueError(f"unknown feature layers {sorted(unknown)}; choose from block_1..block_{len(self.blocks)}")
        N, C, S, _ = x.shape
        p, g = self.patch, S // self.patch
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (N, T, D)
        t_freq = sinusoid(t)  # (N, 256)
        emb = self.t_embed(t_freq)  # (N, D)
        if self.y_embed is not None:
            y = torch.full((N,), self.num_classes, device=x.device, dtype=torch.long) if y is None else y
            emb = emb + self.y_embed(y)
        out = {}
        for i, block in enumerate(self.blocks, 1):
            h = block(h, emb, self.rope)
            if f"block_{i}" in feats:
                out[f"block_{i}"] = h.float().mean(1)  # (N, D) global average pool over tokens
            if i == self.sc_layer:  # later blocks and the final layer see emb'
                emb = self.sc(emb, h.mean(1), t_freq)
        h = self.final(h, emb)  # (N, T, p*p*C)
        x = h.reshape(N, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(N, C, S, S)
        return (x, out) if feats else x


def build_model(args):
    """DiT from the resolved args: latent 16x16x32 with patch 1, or pixel 32x32x3 with patch 2."""
    latent = args.latent != "none"
    sc_layer = int(args.sc_layer.split("_")[1]) if args.self_cond else 0
    return DiT(32 if latent else 3, 16 if latent else args.resolution, 1 if latent else 2, **NETS[args.net],
               num_classes=args.num_classes if args.class_cond else 0, sc_layer=sc_layer, sc_mode=args.sc_mode)


# ----------------------------------------------------------------------------------------------------------
# Rectified flow, latent recipe (paper Table 8). Paper convention: t=0 data, t=1 noise,
# x_t = (1 - t) x0 + t eps, the net predicts the velocity v = dx_t/dt = eps - x0.

class RF:
    """Logit-normal t, velocity MSE (+ LightningDiT's cosine term), label dropout for CFG."""

    kind = "RF"

    def __init__(self, num_classes=0, label_dropout=0.1, cos_loss=True):
        self.num_classes, self.label_dropout, self.cos_loss = num_classes, label_dropout, cos_loss

    def add_noise(self, x0, t, noise):
        t = t.view(-1, *[1] * (x0.dim() - 1))
        return (1 - t) * x0 + t * noise

    def drop_labels(self, y):
        """Replace a label_dropout fraction of labels by the null class (num_classes) for CFG."""
        drop = torch.rand(y.shape, device=y.device) < self.label_dropout
        return torch.where(drop, torch.full_like(y, self.num_classes), y)

    def pred(self, model, x_t, t, y=None, aug=None, feats=()):
        # The net sees the paper's t in [0, 1] directly (LightningDiT feeds its own t in [0, 1], where 0 is
        # noise, into the same 256-d sinusoid without a x1000 scale): the same embedding up to relabelling.
        return model(x_t, t, y, aug, feats)

    def loss(self, model, x0, y=None, aug=None):
        N = x0.shape[0]
        t = torch.sigmoid(torch.randn(N, device=x0.device))  # logit-normal, mean 0 std 1 (LightningDiT)
        noise = torch.randn_like(x0)
        if self.num_classes:
            y = self.drop_labels(y)
        v = self.pred(model, self.add_noise(x0, t, noise), t, y, aug).float()
        target = noise - x0
        loss = (v - target).pow(2).mean(dim=(1, 2, 3))
        if self.cos_loss:
            # LightningDiT's released recipe (use_cosine_loss: true), which the paper adopts for its latent
            # models: 1 - cosine similarity over channels, averaged over positions, added to the MSE
            loss = loss + (1 - F.cosine_similarity(v, target, dim=1)).mean(dim=(1, 2))
        return loss, t

    @torch.no_grad()
    def sample(self, model, noise, y=None, steps=50, shift=3.3):
        """Euler on the shifted grid t' = s t / (1 + (s-1) t), t: 1 -> 0, for preview grids (see sample.py)."""
        ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
        ts = (shift * ts / (1 + (shift - 1) * ts)).tolist()
        x = noise
        for t, t_next in zip(ts[:-1], ts[1:]):
            x = x + (t_next - t) * self.pred(model, x, torch.full((x.shape[0],), t, device=x.device), y).float()
        return x


def build_diffusion(args):
    return RF(args.num_classes if args.class_cond else 0, args.label_dropout, args.cos_loss)


# ----------------------------------------------------------------------------------------------------------
# VA-VAE tokenizer (LDM AutoencoderKL layout; module names follow the official checkpoint's keys)

def group_norm(ch):
    return nn.GroupNorm(32, ch, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, 1x1 shortcut when the width changes."""

    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections."""

    def __init__(self, ch):
        super().__init__()
        self.norm = group_norm(ch)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        N, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).reshape(N, 1, C, H * W).transpose(-1, -2) for m in (self.q, self.k, self.v))  # (N, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(N, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM pads right/bottom only


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks, attns, resample=None, resample_name=None):
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
    if resample is not None:
        setattr(level, resample_name, resample)
    return level


def _mid(ch):
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(ch, ch), AttnBlock(ch), ResnetBlock(ch, ch)
    return mid


def _run_level(level, h):
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


class Encoder(nn.Module):
    """Image (3, R, R) -> posterior moments (2z, R/16, R/16) for ch_mult of length 5."""

    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, resolution=IMAGE_SIZE):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down, cin, res = nn.ModuleList(), ch, resolution
        for i, mult in enumerate(ch_mult):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(cin, ch * mult))
                cin = ch * mult
                if res in attn_resolutions:
                    attns.append(AttnBlock(cin))
            last = i == len(ch_mult) - 1
            self.down.append(_level(blocks, attns, None if last else Downsample(cin), "downsample"))
            res = res if last else res // 2
        self.mid = _mid(cin)
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, 2 * z_channels, 3, padding=1)  # double_z: mean and log-variance

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (z, r, r) -> image (3, 16r, 16r); num_res_blocks+1 blocks per level as in LDM."""

    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, resolution=IMAGE_SIZE):
        super().__init__()
        cin, res = ch * ch_mult[-1], resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, cin, 3, padding=1)
        self.mid = _mid(cin)
        levels = []
        for i in reversed(range(len(ch_mult))):  # built from the lowest resolution up, stored by level index
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(cin, ch * ch_mult[i]))
                cin = ch * ch_mult[i]
                if res in attn_resolutions:
                    attns.append(AttnBlock(cin))
            levels.insert(0, _level(blocks, attns, Upsample(cin) if i else None, "upsample"))
            res = res * 2 if i else res
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """VA-VAE: encoder -> quant_conv -> (mean, logvar); post_quant_conv -> decoder."""

    VAE_KEYS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")

    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, embed_dim=32):
        super().__init__()
        cfg = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
                   z_channels=z_channels)
        self.encoder, self.decoder = Encoder(**cfg), Decoder(**cfg)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    @torch.no_grad()
    def encode(self, x):
        """Images in [-1, 1] (N, 3, 256, 256) -> posterior mean (N, 32, 16, 16)."""
        # The posterior mean, not a sample: VA-VAE is trained with a tiny KL weight (1e-6), so the
        # posterior std is far below the latent scale, and the mean makes the cache deterministic
        # (a resumed or repeated extraction writes bit-identical rows). LightningDiT samples instead.
        return self.quant_conv(self.encoder(x)).chunk(2, dim=1)[0]

    @torch.no_grad()
    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


def build_vae(args):
    """The VA-VAE named by args.vae_config ('f16d32' official, 'tiny' for tests) with random weights."""
    return AutoencoderKL(**VAES[args.vae_config])


def vae_state_dict(path):
    """Autoencoder weights from an official VA-VAE file: keep encoder/decoder/quant convs, drop the rest."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code from a downloaded file
    except Exception as e:
        raise SystemExit(f"VA-VAE file {path} cannot be loaded as plain weights ({type(e).__name__}): it is truncated, "
                         f"or a pickle with code in it; re-save its state_dict with torch.save and pass that to --vae")
    sd = sd.get("state_dict", sd)
    keep = {k: v for k, v in sd.items() if k.startswith(AutoencoderKL.VAE_KEYS)}
    # the official file also holds the training loss (LPIPS, discriminator) and the DINOv2 foundation model
    print(f"VA-VAE {path}: kept {len(keep)} autoencoder tensors, dropped {len(sd) - len(keep)} other keys")
    return keep


def default_vae_path():
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddae" / Path(VAVAE_URL).name


def download_vae(path):
    """Fetch the official VA-VAE checkpoint from its Hugging Face release (only when no --vae is given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, sha = path.with_suffix(".part"), hashlib.sha256()
    print(f"downloading VA-VAE from {VAVAE_URL} to {path}")
    try:
        with urllib.request.urlopen(VAVAE_URL, timeout=30) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length", 0))
            for chunk in iter(lambda: r.read(1 << 20), b""):
                f.write(chunk)
                sha.update(chunk)
    except OSError as e:
        raise SystemExit(f"cannot download the VA-VAE ({e}): fetch {VAVAE_URL} by hand into {path}, or pass --vae PATH")
    if total and tmp.stat().st_size != total:
        raise SystemExit(f"VA-VAE download truncated ({tmp.stat().st_size} of {total} bytes); rerun to retry")
    # No checksum is published next to the file; we print ours (compare it with the sha256 the Hugging Face
    # file page shows for the LFS object) and the strict state-dict load in load_vae checks every tensor shape.
    print(f"VA-VAE sha256 {sha.hexdigest()}")
    os.replace(tmp, path)


def load_vae(args, device):
    """The VA-VAE with weights from --vae (default: the cached official file, downloaded on first use)."""
    vae = build_vae(args)
    path = Path(args.vae) if args.vae else default_vae_path()
    if not path.exists():
        if args.vae:
            raise SystemExit(f"--vae {path} does not exist")
        download_vae(path)
    vae.load_state_dict(vae_state_dict(path), strict=True)
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def decode(vae, z, latent_stats):
    """Normalised latents (N, 32, 16, 16) -> images in [-1, 1] (N, 3, 256, 256)."""
    mean, std = (latent_stats[k].to(z.device, torch.float32)[None, :, None, None] for k in ("mean", "std"))
    return vae.decode(z.float() * std + mean).clamp(-1, 1)


# ----------------------------------------------------------------------------------------------------------
# Pixel datasets (--latent none): shapes and CIFAR, as in train_unet.py

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


# ----------------------------------------------------------------------------------------------------------
# Image folders and the VA-VAE latent cache

IMG_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def center_crop(img, res):
    """ADM's center crop: box-downsample while the short side is >= 2x, bicubic to res, crop the center."""
    while min(img.size) >= 2 * res:
        img = img.resize(tuple(s // 2 for s in img.size), Image.BOX)
    scale = res / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), Image.BICUBIC)
    x, y = (img.size[0] - res) // 2, (img.size[1] - res) // 2
    return img.crop((x, y, x + res, y + res))


def image_files(args, split):
    """[(path, label)] of a class-folder dataset: <root>/<class>/*, or <root>/train/<class> and <root>/val/<class>."""
    root, sub = Path(args.data_path), {"train": "train", "test": "val"}[split]
    if (root / sub).is_dir():
        root = root / sub
    elif split == "test":
        raise SystemExit(f"no {root / 'val'} folder of class sub-folders for the test split of {args.dataset!r}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).rglob("*")) if f.suffix.lower() in IMG_EXT]
    if not files:
        raise SystemExit(f"no images found for dataset {args.dataset!r} ({split}) under {root}: point --data-path at "
                         f"a folder of class sub-folders (ImageNet: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG)")
    return files


class ImageList(torch.utils.data.Dataset):
    """Selected entries of a file list as ADM-cropped uint8 (3, res, res) tensors, with their index."""

    def __init__(self, files, indices, res):
        self.files, self.indices, self.res = files, indices, res

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = int(self.indices[i])
        with Image.open(self.files[j][0]) as im:
            img = np.asarray(center_crop(im.convert("RGB"), self.res)).transpose(2, 0, 1)
        return j, torch.from_numpy(img.copy())


def cache_dir(args, split):
    return Path(args.cache_dir or Path("runs") / "cache" / args.dataset) / {"train": "train", "test": "val"}[split]


def _save_npy_atomic(path, arr):
    tmp = path.with_name("." + path.name + ".tmp")  # hidden name: never matched by the done.rank*.npy glob
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def extract_latents(files, out, vae, device, batch=64, workers=0, rank=0, world=1):
    """Encode every image of `files` and its horizontal flip once into out/latents.npy (N, 2, 32, 16, 16).

    Rank r encodes r::world of the images not done yet and writes only those rows of the shared memmap;
    out/done.rank<r>.npy (saved atomically after every batch) marks finished rows, so a killed run
    resumes where it stopped, with any world size. Returns the indices this rank encoded.
    """
    sync = dist.barrier if world > 1 else (lambda: None)
    out.mkdir(parents=True, exist_ok=True)
    n = len(files)
    if rank == 0 and not (out / "latents.npy").exists():
        np.save(out / "labels.npy", np.array([label for _, label in files], dtype=np.int64))
        np.lib.format.open_memmap(out / "latents.tmp.npy", mode="w+", dtype=np.float16, shape=(n, 2, 32, 16, 16))
        os.replace(out / "latents.tmp.npy", out / "latents.npy")
    sync()
    lat = np.load(out / "latents.npy", mmap_mode="r+")
    if len(lat) != n:
        raise SystemExit(f"latent cache {out} holds {len(lat)} images but the dataset has {n}: delete the folder")
    done = np.zeros(n, dtype=bool)
    for f in out.glob("done.rank*.npy"):
        done |= np.load(f)
    todo = np.flatnonzero(~done)[rank::world]
    sync()  # everyone has read the masks before anyone rewrites its own
    loader = torch.utils.data.DataLoader(ImageList(files, todo, IMAGE_SIZE), batch_size=batch, num_workers=workers)
    for idx, img in tqdm(loader, desc=f"encoding {out}", disable=rank != 0 or len(todo) == 0):
        x = img.to(device).float() / 127.5 - 1  # (B, 3, 256, 256)
        z = vae.encode(torch.cat([x, x.flip(3)])).float().cpu().numpy()  # (2B, 32, 16, 16)
        idx = idx.numpy()
        lat[idx, 0], lat[idx, 1] = z[:len(idx)], z[len(idx):]
        lat.flush()  # rows reach the file before the mask says they are done
        done[idx] = True
        _save_npy_atomic(out / f"done.rank{rank}.npy", done)
    sync()
    return todo.tolist()


@torch.no_grad()
def channel_stats(lat, chunk=1024):
    """Per-channel mean and std of a (N, 2, C, h, w) latent array, both flips, accumulated in float64."""
    s = ss = 0
    count = 0
    for i in range(0, len(lat), chunk):
        z = torch.from_numpy(np.asarray(lat[i:i + chunk], dtype=np.float64)).transpose(0, 2).flatten(1)  # (C, rest)
        s, ss, count = s + z.sum(1), ss + z.square().sum(1), count + z.shape[1]
    mean = s / count
    return {"mean": mean.float(), "std": (ss / count - mean.square()).clamp(min=0).sqrt().float()}


def latent_cache(args, split):
    """The folder of the split's latent cache, encoding it first when missing or incomplete (all ranks join)."""
    out = cache_dir(args, split)
    if not (out / "complete").exists():
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        extract_latents(image_files(args, split), out, load_vae(args, device), device, args.extract_batch,
                        args.workers, rank, world)
        if rank == 0:
            lat = np.load(out / "latents.npy", mmap_mode="r")
            done = np.zeros(len(lat), dtype=bool)
            for f in out.glob("done.rank*.npy"):
                done |= np.load(f)
            if not done.all():
                raise SystemExit(f"latent cache {out}: {int((~done).sum())} images were not encoded; rerun to finish")
            torch.save(channel_stats(lat), out / "stats.pt")
            (out / "complete").write_text(json.dumps({"images": len(lat), "vae": args.vae or str(default_vae_path())}))
        if world > 1:
            dist.barrier()
    return out


def latent_stats(args):
    """Per-channel mean/std of the training cache: the normalisation of every split and of samples."""
    return torch.load(latent_cache(args, "train") / "stats.pt", weights_only=True)


def load_dataset(args, split="train", flip=False):
    """Pixel: (uint8 (N, 3, H, W), labels). Latent: (normalised float32 (N, 32, 16, 16) latents, labels).

    Latent mode returns the unflipped copy (flip=True: the flipped one); ImageNet-1k is 42 GB in float32.
    """
    if args.latent == "none":
        if args.dataset == "shapes":
            return make_shapes(10_000 if split == "train" else 2_000, seed=0 if split == "train" else 1, res=args.resolution)
        if args.dataset in ("cifar10", "cifar100"):
            return load_cifar(args.dataset, args.data_path, split)
        raise SystemExit(f"--latent none supports shapes, cifar10, cifar100; {args.dataset!r} needs --latent vavae")
    if args.dataset in ("shapes", "cifar10", "cifar100"):
        raise SystemExit(f"{args.dataset} is a 32x32 pixel dataset: train it with --latent none")
    d, stats = latent_cache(args, split), latent_stats(args)
    x = torch.from_numpy(np.load(d / "latents.npy", mmap_mode="r")[:, int(flip)].astype(np.float32))
    x = (x - stats["mean"][:, None, None]) / stats["std"][:, None, None]
    return x, torch.from_numpy(np.load(d / "labels.npy"))


# ----------------------------------------------------------------------------------------------------------
# Training

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
    return sum(p.numel() for p in m.parameters())


def train_step(net, model, ema, opt, diffusion, x, y, step, args):
    """One optimisation step on a (flipped) batch: loss, backward, clip, Adam, EMA. Training and --bench both run it,
    so the benchmark times what training does. Returns loss (N,) and level (N,)."""
    with torch.autocast("cuda", dtype=torch.bfloat16) if x.is_cuda else nullcontext():
        loss, level = diffusion.loss(net, x, y)
    opt.zero_grad(set_to_none=True)
    loss.mean().backward()
    nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)  # the frozen sin-cos table has no grad: skipped
    opt.step()
    update_ema(ema, model, step, args.ema)
    return loss.detach(), level


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
    """Model, EMA and optimizer as training builds them, on a synthetic batch: (model, step(i, net))."""
    torch.manual_seed(args.seed)
    model = build_model(argparse.Namespace(**{**vars(args), "num_classes": args.num_classes or 1000})).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]  # not the frozen sin-cos table
    opt = torch.optim.Adam(params, lr=args.lr, betas=(0.9, args.beta2), fused=device.type == "cuda")
    diffusion = build_diffusion(args)
    shape = (32, 16, 16) if args.latent != "none" else (3, args.resolution, args.resolution)  # latents or pixels
    x = torch.randn(args.batch_size, *shape, device=device)
    y = torch.randint(0, model.num_classes, (args.batch_size,), device=device) if model.num_classes else None
    return model, lambda i, net: train_step(net, model, ema, opt, diffusion, x, y, i, args)


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
    rec = {"script": Path(__file__).name, "net": args.net, "model": "RF", "self_cond": args.self_cond,
           "batch": args.batch_size, "device": name, "dtype": str(dtype).split(".")[1], "img_per_s": args.batch_size / sec,
           "ms_per_step": 1e3 * sec, "peak_mem_gib": mem / 2**30, "gflop_per_img": flops / 1e9,
           "tflops": flops * args.batch_size / sec / 1e12, "matmul_peak_tflops": peak_tflops,
           "self_cond_overhead": overhead}
    rec["mfu"] = rec["tflops"] / peak_tflops
    print(f"DiT-{args.net} batch {args.batch_size} on {name} ({rec['dtype']}): {rec['img_per_s']:.1f} img/s, "
          f"{rec['ms_per_step']:.1f} ms/step, peak {rec['peak_mem_gib']:.2f} GiB, {rec['gflop_per_img']:.2f} GFLOP/img, "
          f"{rec['tflops']:.3f} TFLOP/s = {100 * rec['mfu']:.1f}% of the measured matmul peak {peak_tflops:.2f} TFLOP/s")
    print(f"self-conditioning step time x{overhead:.4f} (median of {rounds} interleaved rounds of {args.bench // rounds} steps)")
    print(json.dumps(rec))
    return rec


def main(argv=None):
    args = get_args(argv)
    if args.dry_run:
        known = args.num_classes is not None  # a folder dataset's class count is only known from its data
        with torch.device("meta"):  # shapes only: DiT-B builds instantly
            model = build_model(argparse.Namespace(**{**vars(args), "class_cond": args.class_cond and known}))
        print(json.dumps(vars(args), indent=2))
        n_sc = count_params(model.sc) if model.sc is not None else 0
        n_y = count_params(model.y_embed) if model.y_embed is not None else 0
        print(f"parameters: {count_params(model):,} total, {n_sc:,} self-conditioning, "
              f"{n_y:,} label table{'' if known or not args.class_cond else ' (not counted: classes unknown)'}")
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

    # Data. Latent: the (N, 2 flips, 32, 16, 16) float16 memmap stays on disk / in the page cache and a step
    # gathers its rows; pixel: one uint8 tensor on the device.
    latent = args.latent != "none"
    if latent:
        cache = latent_cache(args, "train")
        data = np.load(cache / "latents.npy", mmap_mode="r")
        labels = torch.from_numpy(np.load(cache / "labels.npy"))
        stats = latent_stats(args)
        mean, std = (stats[k].to(device)[None, :, None, None] for k in ("mean", "std"))
    else:
        data, labels = load_dataset(args, "train")
        data = data.to(device)
    labels = labels.to(device)
    args.num_classes = args.num_classes or int(labels.max()) + 1
    n_data = len(data)
    epochs = EPOCHS.get((args.dataset, args.class_cond), 40 if args.dataset == "shapes" else
                        2000 if not latent else EPOCHS[("in100", args.class_cond)])
    args.train_images = args.train_images or epochs * n_data
    args.log_every = args.log_every or min(100_000, max(args.train_images // 10, 1))

    torch.manual_seed(args.seed)  # the same initial weights for a given seed (and on every rank)
    model = build_model(args).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    params = [p for p in model.parameters() if p.requires_grad]  # not the frozen sin-cos table
    opt = torch.optim.Adam(params, lr=args.lr, betas=(0.9, args.beta2), fused=device.type == "cuda")
    diffusion = build_diffusion(args)
    step = images_seen = 0
    if (out / "ckpt.pt").exists():
        ckpt = load_checkpoint_for_resume(out / "ckpt.pt", args, log)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        step, images_seen = ckpt["step"], ckpt["images"]
        log(f"resumed from {out / 'ckpt.pt'} at step {step} ({images_seen:,} images)")
    log(f"{Path(__file__).name} {' '.join(sys.argv[1:])}\n{json.dumps(vars(args))}")
    n_sc = count_params(model.sc) if model.sc is not None else 0
    log(f"parameters: {count_params(model):,} total, {n_sc:,} self-conditioning; {n_data:,} training images; world {world}")

    net = torch.compile(model) if args.compile else model
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
            ckpt = {"script": Path(__file__).name, "args": vars(args), "model": model.state_dict(),
                    "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step, "images": images_seen, "rng": rngs}
            if latent:
                ckpt["latent_stats"] = stats
            atomic_save(ckpt, out / "ckpt.pt")

    # the decoder for latent preview grids, loaded now so a missing VA-VAE fails at start, not hours in
    vae = load_vae(args, device) if latent and args.sample_every and rank == 0 else None

    def preview():
        if rank != 0:
            return
        g = torch.Generator().manual_seed(args.seed)  # the same noise every time: grids are comparable
        shape = (32, 16, 16) if latent else (3, args.resolution, args.resolution)
        noise = torch.randn(16, *shape, generator=g).to(device)
        y = (torch.arange(16, device=device) % args.num_classes) if args.class_cond else None  # no CFG in previews
        with autocast:
            x = diffusion.sample(ema, noise, y)
        if latent:
            x = decode(vae, x, stats)
        save_grid(x, out / f"grid-{images_seen:09d}.png")

    nbins = 5
    acc = torch.zeros(2 * nbins + 2, device=device)  # per-bin loss sums and counts, total sum, total count
    t_log, last_log = time.time(), images_seen
    bar = tqdm(total=args.train_images, initial=images_seen, unit="img", unit_scale=True, disable=rank != 0)
    model.train()
    while images_seen < args.train_images:
        # All randomness of this step is a function of (seed, rank, step): resuming reproduces it exactly.
        torch.manual_seed(args.seed * 1_000_003 + step * 1_009 + rank)
        idx = batch_indices(images_seen + rank * local_bs, local_bs, n_data, args.seed)
        flip = torch.rand(local_bs) < 0.5  # horizontal flip: latent mode picks one of the two cached copies
        if latent:
            x = torch.from_numpy(data[idx.numpy(), flip.long().numpy()]).to(device).float()  # (B, 32, 16, 16)
            x = (x - mean) / std
        else:
            x = data[idx.to(device)].float() / 127.5 - 1  # (B, 3, H, W) in [-1, 1]
            x = torch.where(flip.to(device)[:, None, None, None], x.flip(3), x)
        y = labels[idx.to(device)] if args.class_cond else None
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (images_seen + 1) / max(args.warmup_images, 1))
        loss, level = train_step(net, model, ema, opt, diffusion, x, y, step, args)
        step += 1
        images_seen += args.batch_size
        bar.update(args.batch_size)
        b = (level * nbins).long().clamp(max=nbins - 1)
        acc += torch.cat([torch.bincount(b, loss, nbins), torch.bincount(b, minlength=nbins).float(),
                          loss.sum()[None], acc.new_tensor([len(loss)])])

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
            if not math.isfinite(a[-2]):
                raise SystemExit(f"loss is {a[-2]} at step {step} ({images_seen:,} images); the last good checkpoint "
                                 f"{out / 'ckpt.pt'} is kept; lower --lr or check the data")
            if crossed(args.log_every) or done:
                rec = {"step": step, "images": images_seen, "loss": a[-2] / a[-1], "lr": opt.param_groups[0]["lr"],
                       "img_per_s": (images_seen - last_log) / (time.time() - t_log)}
                rec.update({f"loss_bin{i}": a[i] / max(a[nbins + i], 1) for i in range(nbins)})
                if rank == 0:
                    with open(out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    bar.set_postfix(loss=f"{rec['loss']:.4f}")
                log(f"step {step} images {images_seen:,} loss {rec['loss']:.4f} "
                    + " ".join(f"{rec[f'loss_bin{i}']:.3f}" for i in range(nbins)) + f" {rec['img_per_s']:.0f} img/s")
                acc.zero_()
                t_log, last_log = time.time(), images_seen
        if crossed(args.ckpt_every) or done or stop["signal"]:
            save()
        if args.sample_every and (crossed(args.sample_every) or done):
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
