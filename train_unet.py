"""
DDAE++ pixel-space UNet diffusion: the `ddpm` and `ddpmpp` backbones of DDAE, trained as DDPM, EDM or RF,
optionally with self-conditioning (a pooled middle-layer feature fed back to condition the decoder).

    python train_unet.py --dataset shapes --net tiny --model RF --self-cond    # CPU quickstart, a few minutes
    torchrun --nproc_per_node=4 train_unet.py --dataset cifar10 --net ddpm --model EDM --self-cond
    python train_unet.py --net ddpmpp --self-cond --dry-run                     # config + parameter counts

Standalone on purpose: model, self-conditioning, diffusion, data and training loop all live in this file.
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
# Config: backbone presets, per-formulation defaults (paper Table 8), feature layers (Table 10)

NETS = {  # base channels, multipliers per resolution, res blocks per resolution, BigGAN-style up/down
    "ddpm":   dict(ch=128, mult=(1, 2, 2, 2), blocks=2, resample_res=False),  # 35.75M params
    "ddpmpp": dict(ch=128, mult=(2, 2, 2), blocks=4, resample_res=True),      # 56.52M params
    "tiny":   dict(ch=16, mult=(1, 2, 4), blocks=1, resample_res=False),      # 0.66M; CPU quickstart and tests
}
ATTN_RES = 16  # attention at 16x16 in every preset (Table 9)
FORMULATIONS = {  # dropout, EMA rate, warm-up epochs (Tables 8 and 11)
    "DDPM": dict(dropout=0.1, ema=0.9999, warmup_epochs=13),
    "EDM":  dict(dropout=0.13, ema=0.9993, warmup_epochs=200),
    "RF":   dict(dropout=0.1, ema=0.9999, warmup_epochs=13),
}
DATASETS = {  # classes, resolution, default training epochs (the paper trains every pixel model 2000 epochs)
    "cifar10": (10, 32, 2000), "cifar100": (100, 32, 2000), "tiny-imagenet": (200, 64, 2000),
    "shapes": (10, 32, 5),  # 50k images: the tiny CPU quickstart takes minutes
}
PROBE_T = {"DDPM": 11, "EDM": 0.06, "RF": 0.06}  # Table 10, CIFAR: DDPM step, EDM sigma, RF t
SC_LAYER = {  # Table 10: the best linear-probe layer of the baseline is where self-conditioning reads from
    ("DDPM", "ddpm", "cifar10"): "out_6", ("DDPM", "ddpm", "cifar100"): "out_6",
    ("EDM", "ddpm", "cifar10"): "out_7", ("EDM", "ddpm", "cifar100"): "out_6",
    ("RF", "ddpm", "cifar10"): "out_7", ("RF", "ddpm", "cifar100"): "out_7",
    ("DDPM", "ddpmpp", "cifar10"): "out_7", ("DDPM", "ddpmpp", "cifar100"): "out_8",
    ("EDM", "ddpmpp", "cifar10"): "out_9", ("EDM", "ddpmpp", "cifar100"): "out_8",
    ("RF", "ddpmpp", "cifar10"): "out_8", ("RF", "ddpmpp", "cifar100"): "out_8",
    ("EDM", "ddpm", "tiny-imagenet"): "out_5", ("EDM", "ddpm", "in100"): "out_5",
}
ARCH_KEYS = ("net", "model", "self_cond", "sc_mode", "sc_layer", "resolution", "dataset", "aug", "cl", "cl_head")  # resume refuses changes


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--net", choices=list(NETS), default="ddpm")
    p.add_argument("--model", choices=list(FORMULATIONS), default="DDPM", help="diffusion formulation")
    p.add_argument("--dataset", default="cifar10", help="cifar10, cifar100, tiny-imagenet, shapes, or a class-folder name")
    p.add_argument("--data-path", default="data", help="folder holding the dataset")
    p.add_argument("--resolution", type=int, default=None, help="image size (default: the dataset's; folders: 64)")
    p.add_argument("--out", default=None, help="run directory (default runs/unet-<dataset>-<net>-<model>[-sc])")
    p.add_argument("--self-cond", action="store_true", help="condition the decoder on its own pooled feature")
    p.add_argument("--sc-mode", choices=["adaptive", "add"], default="adaptive", help="Table 7a: time-scaled or direct add")
    p.add_argument("--sc-layer", default=None, help="decoder block read by self-conditioning (default: Table 10)")
    p.add_argument("--aug", action="store_true", help="EDM non-leaky augmentation (p=0.12, CIFAR setting)")
    p.add_argument("--cl", action="store_true", help="contrastive self-distillation against the EMA model (needs --aug)")
    p.add_argument("--cl-weight", type=float, default=0.01, help="gamma of Table 7d")
    p.add_argument("--cl-head", choices=["time", "mocov3"], default="time", help="Table 7b: projection head")
    p.add_argument("--cl-target-t", choices=["probe", "min"], default="probe", help="Table 7c: target noise level")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default 512 ddpm, 256 ddpmpp, 16 tiny)")
    p.add_argument("--lr", type=float, default=None, help="default 4e-4 (Table 11); 2e-3 for tiny")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--dropout", type=float, default=None, help="default per formulation (Table 8); 0 for tiny")
    p.add_argument("--ema", type=float, default=None, help="EMA decay, default per formulation (Table 8)")
    p.add_argument("--train-images", type=int, default=None, help="training length (default: paper epochs x dataset)")
    p.add_argument("--warmup-images", type=int, default=None, help="lr warm-up (default: Table 11 epochs x dataset)")
    p.add_argument("--log-every", type=int, default=None, help="images between log lines (default 50k; ten lines in shorter runs)")
    p.add_argument("--ckpt-every", type=int, default=1_000_000, help="images between checkpoints")
    p.add_argument("--sample-every", type=int, default=5_000_000, help="images between preview grids")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images in folder datasets")
    p.add_argument("--dry-run", action="store_true", help="print the config and parameter counts, then exit")
    p.add_argument("--bench", type=int, nargs="?", const=20, default=0, metavar="STEPS",
                   help="time STEPS training steps on synthetic data, with and without --self-cond, then exit")
    args = p.parse_args(argv)
    if args.cl and not args.aug:
        p.error("--cl needs --aug: the two contrastive views come from the augment pipe")

    ncls, res, _ = DATASETS.get(args.dataset, (None, 64, 2000))
    args.resolution = args.resolution or res
    args.num_classes = ncls  # folders: filled in from the data when it is loaded
    if args.net == "tiny" and args.dropout is None:  # tiny is not in the paper: tuned for minutes-long CPU runs,
        args.dropout = 0.0                           # where the net underfits and dropout only slows it down
    for k, v in FORMULATIONS[args.model].items():
        if k != "warmup_epochs" and getattr(args, k) is None:
            setattr(args, k, v)
    args.batch_size = args.batch_size or {"ddpm": 512, "ddpmpp": 256, "tiny": 16}[args.net]
    args.lr = args.lr or (2e-3 if args.net == "tiny" else 4e-4)  # tiny: small batches, as steps matter more there
    n_out = len(NETS[args.net]["mult"]) * (NETS[args.net]["blocks"] + 1)
    default_layer = SC_LAYER.get((args.model, args.net, args.dataset), f"out_{(n_out + 1) // 2}")
    args.sc_layer = args.sc_layer or default_layer
    if args.sc_layer.isdigit():
        args.sc_layer = f"out_{args.sc_layer}"
    if args.sc_layer not in [f"out_{i}" for i in range(1, n_out + 1)]:
        p.error(f"--sc-layer {args.sc_layer}: the {args.net} decoder has out_1 .. out_{n_out}")
    big = args.dataset in ("tiny-imagenet", "in100")
    args.probe_t = 0.2964 if (big and args.model == "EDM") else 66 if (big and args.model == "DDPM") else PROBE_T[args.model]
    args.out = args.out or f"runs/unet-{args.dataset}-{args.net}-{args.model}{'-sc' if args.self_cond else ''}"
    return args


# ----------------------------------------------------------------------------------------------------------
# Model: the DDAE UNet (ddpm = DDPM's CIFAR-10 net, ddpmpp = DDPM++-style deeper net with BigGAN up/down)

def timestep_embedding(t, dim, max_period=10_000):
    """Transformer sinusoid of a (N,) float tensor: (N, dim), sin half first (DDAE's layout)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class TimeMLP(nn.Module):
    """sinusoid(t) -> Linear -> SiLU -> Linear: the global conditioning vector `emb`."""

    def __init__(self, dim):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(dim // 4, dim), nn.Linear(dim, dim)

    def forward(self, t, extra=None):
        h = timestep_embedding(t, self.lin1.in_features)
        if extra is not None:
            h = h + extra  # the non-leaky augment label enters here, before the MLP
        return self.lin2(F.silu(self.lin1(h)))


def norm(ch):
    return nn.GroupNorm(min(32, ch // 4), ch)  # DDPM's 32 groups; fewer only in the narrow tiny preset


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv x2 with `emb` added as a per-channel bias; optional BigGAN-style resampling."""

    def __init__(self, cin, cout, emb_dim, dropout, resample=None):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2, self.drop, self.conv2 = norm(cout), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.resample = resample  # None, "up" or "down"

    def _resample(self, x):
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return F.avg_pool2d(x, 2) if self.resample == "down" else x

    def forward(self, x, emb):
        h = self.conv1(self._resample(F.silu(self.norm1(x))))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return h + self.skip(self._resample(x))


class Attention(nn.Module):
    """Single-head self-attention over pixels with a residual (DDPM's AttnBlock)."""

    def __init__(self, ch):
        super().__init__()
        self.norm, self.qkv, self.proj = norm(ch), nn.Linear(ch, 3 * ch), nn.Linear(ch, ch)

    def forward(self, x):
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x).flatten(2).transpose(1, 2)).unsqueeze(1).chunk(3, dim=-1)  # (N, 1, HW, C)
        a = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (N, HW, C)
        return x + self.proj(a).transpose(1, 2).reshape(n, c, h, w)


class Block(nn.Module):
    """ResBlock followed by attention at the attention resolution."""

    def __init__(self, cin, cout, emb_dim, dropout, attn):
        super().__init__()
        self.res, self.attn = ResBlock(cin, cout, emb_dim, dropout), Attention(cout) if attn else nn.Identity()

    def forward(self, x, emb):
        return self.attn(self.res(x, emb))


class Resample(nn.Module):
    """Between resolutions: a BigGAN residual block (ddpmpp) or a plain conv / nearest-up + conv (ddpm)."""

    def __init__(self, ch, emb_dim, dropout, mode, res_block):
        super().__init__()
        self.mode, self.res_block = mode, res_block
        if res_block:
            self.op = ResBlock(ch, ch, emb_dim, dropout, resample=mode)
        else:
            self.op = nn.Conv2d(ch, ch, 3, stride=2 if mode == "down" else 1, padding=1)

    def forward(self, x, emb):
        if self.res_block:
            return self.op(x, emb)
        return self.op(F.interpolate(x, scale_factor=2, mode="nearest") if self.mode == "up" else x)


# ----------------------------------------------------------------------------------------------------------
# Self-conditioning (the DDAE++ idea): pool the designated decoder layer, add it back into `emb`

class SelfCond(nn.Module):
    """emb' = emb + TimeMLP_sc(t) * Linear(GAP(h_k)); "add" mode drops the time-dependent scale (Table 7a)."""

    def __init__(self, feat_ch, emb_dim, mode):
        super().__init__()
        self.scale = TimeMLP(emb_dim) if mode == "adaptive" else None  # a second copy of the backbone's time MLP
        self.proj = nn.Linear(feat_ch, emb_dim)
        # Zero-init so a self-conditioned net starts exactly as its baseline and learns how much to use its feature.
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, emb, feat, t):
        f = self.proj(feat.float().mean(dim=(2, 3)))  # (N, C_k) -> (N, D); pooling in fp32 for bf16 runs
        return emb + (self.scale(t) * f if self.scale is not None else f)


class UNet(nn.Module):
    """The DDAE UNet; `feature_layers` names the decoder blocks out_1 .. out_N (lowest resolution first)."""

    def __init__(self, ch, mult, blocks, resample_res, resolution=32, dropout=0.1, self_cond=False,
                 sc_mode="adaptive", sc_layer=None, aug_dim=0):
        super().__init__()
        emb_dim = 4 * ch
        self.time_mlp = TimeMLP(emb_dim)
        # Bias-free, so a zero augment label (sampling, probing) is exactly "no label".
        self.aug_emb = nn.Linear(aug_dim, emb_dim // 4, bias=False) if aug_dim else None
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down, skips, cin, res = nn.ModuleList(), [ch], ch, resolution
        for i, m in enumerate(mult):
            for _ in range(blocks):
                self.down.append(Block(cin, ch * m, emb_dim, dropout, res == ATTN_RES))
                cin = ch * m
                skips.append(cin)
            if i < len(mult) - 1:
                self.down.append(Resample(cin, emb_dim, dropout, "down", resample_res))
                skips.append(cin)
                res //= 2
        self.mid = nn.ModuleList([Block(cin, cin, emb_dim, dropout, True), Block(cin, cin, emb_dim, dropout, False)])
        self.up, self.feature_layers, self.feature_ch = nn.ModuleList(), [], {}
        for i, m in reversed(list(enumerate(mult))):
            for _ in range(blocks + 1):  # one more than the encoder: it also consumes the resample skip
                self.up.append(Block(cin + skips.pop(), ch * m, emb_dim, dropout, res == ATTN_RES))
                cin = ch * m
                self.feature_layers.append(f"out_{len(self.feature_layers) + 1}")
                self.feature_ch[self.feature_layers[-1]] = cin
            if i > 0:
                self.up.append(Resample(cin, emb_dim, dropout, "up", resample_res))
                res *= 2
        self.norm_out, self.conv_out = nn.GroupNorm(8, cin), nn.Conv2d(cin, 3, 3, padding=1)
        self.sc_layer = sc_layer if self_cond else None
        self.self_cond = SelfCond(self.feature_ch[sc_layer], emb_dim, sc_mode) if self_cond else None

    def forward(self, x, t, y=None, aug=None, feats=()):
        """x (N, 3, H, W), t (N,) net time input; returns the raw output (and {layer: pooled (N, C)} if feats)."""
        extra = self.aug_emb(aug) if aug is not None and self.aug_emb is not None else None
        emb = self.time_mlp(t, extra)  # (N, D); y is unused: the pixel models are unconditional
        h, skips, pooled, n = self.conv_in(x), [], {}, 0
        skips.append(h)
        for blk in self.down:
            h = blk(h, emb)
            skips.append(h)
        for blk in self.mid:
            h = blk(h, emb)
        for blk in self.up:
            if isinstance(blk, Resample):
                h = blk(h, emb)
                continue
            h = blk(torch.cat([h, skips.pop()], dim=1), emb)
            n += 1
            name = f"out_{n}"
            if name in feats:
                pooled[name] = h.float().mean(dim=(2, 3))
            if name == self.sc_layer:
                emb = self.self_cond(emb, h, t)  # every later block decodes with the self-conditioned emb
        out = self.conv_out(F.silu(self.norm_out(h)))
        return (out, pooled) if feats else out


def build_model(args):
    model = UNet(**NETS[args.net], resolution=args.resolution, dropout=args.dropout, self_cond=args.self_cond,
                 sc_mode=args.sc_mode, sc_layer=args.sc_layer, aug_dim=9 if args.aug else 0)
    # Training-only heads live in the model so that the optimizer, DDP, EMA and checkpoints cover them for free;
    # sampling and probing never call them.
    if args.aug and args.model == "EDM":
        model.uncertainty = Uncertainty()
    if args.cl:
        model.cl_head = ProjHead(model.feature_ch[args.sc_layer], mode=args.cl_head)
    return model


# ----------------------------------------------------------------------------------------------------------
# Diffusion formulations (paper Table 8). Paper convention: t=0 is data, t=T is noise. Data lives in [-1, 1].
# Each exposes loss / add_noise / pred in its native units; sample() is a short deterministic sampler for
# preview grids only (sample.py holds the paper's samplers).

def _split(out, feats):
    return out if feats else (out, None)


def _loss_out(loss, level, pooled, feats):
    return (loss, level, pooled) if feats else (loss, level)


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

    def level(self, t):
        return t.float() / self.T

    def loss(self, model, x0, y=None, aug=None, feats=()):
        """Per-sample loss (N,), noise level (N,) in [0, 1] (and pooled features of the layers in feats)."""
        t = torch.randint(1, self.T + 1, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        eps, pooled = _split(self.pred(model, self.add_noise(x0, t, noise), t, y, aug, feats), feats)
        return _loss_out((eps.float() - noise).square().mean(dim=(1, 2, 3)), self.level(t), pooled, feats)

    @torch.no_grad()
    def sample(self, model, noise, steps=50):
        """DDIM (eta 0) from t=T to clean."""
        ts, x = torch.linspace(self.T, 0, steps + 1).round().long().to(noise.device), noise
        for t, s in zip(ts[:-1], ts[1:]):
            eps = self.pred(model, x, t.repeat(len(x))).float()
            ab_t, ab_s = self._ab(t.repeat(len(x)), x), self._ab(s.repeat(len(x)), x)
            x0 = ((x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()).clamp(-1, 1)
            eps = (x - ab_t.sqrt() * x0) / (1 - ab_t).sqrt()  # DDAE clips x0 and re-derives eps from it
            x = ab_s.sqrt() * x0 + (1 - ab_s).sqrt() * eps
        return x


class EDM:
    """VE, ln(sigma) ~ N(-1.2, 1.2^2), x0-prediction with EDM preconditioning and loss weighting."""

    kind, sigma_data, p_mean, p_std = "EDM", 0.5, -1.2, 1.2
    uncertainty = None  # EDM2's learned loss weighting, set by the training loop when --aug is on (Table 8)

    def add_noise(self, x0, sigma, noise):
        return x0 + sigma.view(-1, 1, 1, 1).to(x0.dtype) * noise

    def pred(self, model, x, sigma, y=None, aug=None, feats=()):
        s, sd = sigma.float().view(-1, 1, 1, 1), self.sigma_data
        c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (s**2 + sd**2).sqrt()
        out, pooled = _split(model(c_in * x, sigma.float().log() / 4, y, aug, feats), feats)
        denoised = c_skip * x + c_out * out.float()
        return (denoised, pooled) if feats else denoised

    def level(self, sigma):  # the sigma's quantile under the training distribution: uniform in [0, 1]
        return 0.5 * (1 + torch.erf((sigma.float().log() - self.p_mean) / (self.p_std * math.sqrt(2))))

    def loss(self, model, x0, y=None, aug=None, feats=()):
        sigma = (torch.randn(x0.shape[0], device=x0.device) * self.p_std + self.p_mean).exp()
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        x = self.add_noise(x0, sigma, torch.randn_like(x0))
        denoised, pooled = _split(self.pred(model, x, sigma, y, aug, feats), feats)
        loss = weight * (denoised - x0).square().mean(dim=(1, 2, 3))
        if self.uncertainty is not None:
            u = self.uncertainty(sigma)  # EDM2: the loss of each noise level normalised by its learned scale
            loss = loss / u.exp() + u
        return _loss_out(loss, self.level(sigma), pooled, feats)

    @torch.no_grad()
    def sample(self, model, noise, steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0):
        """EDM's deterministic Heun sampler."""
        i = torch.arange(steps, device=noise.device, dtype=torch.float64)
        sig = (sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
        sig = torch.cat([sig, torch.zeros(1, device=noise.device, dtype=torch.float64)])
        x = noise * sigma_max
        for s, s_next in zip(sig[:-1], sig[1:]):
            d = (x - self.pred(model, x, s.float().repeat(len(x)))) / s
            x_next = x + (s_next - s) * d
            if s_next > 0:
                d2 = (x_next - self.pred(model, x_next, s_next.float().repeat(len(x)))) / s_next
                x_next = x + (s_next - s) * (d + d2) / 2
            x = x_next.float()
        return x


class RF:
    """Rectified flow x_t = (1-t) x0 + t eps, t ~ U[0,1], v-prediction of eps - x0."""

    kind = "RF"

    def add_noise(self, x0, t, noise):
        t = t.view(-1, 1, 1, 1).to(x0.dtype)
        return (1 - t) * x0 + t * noise

    def pred(self, model, x, t, y=None, aug=None, feats=()):
        return model(x, t.float(), y, aug, feats)

    def level(self, t):
        return t.float()

    def loss(self, model, x0, y=None, aug=None, feats=()):
        t, noise = torch.rand(x0.shape[0], device=x0.device), torch.randn_like(x0)
        v, pooled = _split(self.pred(model, self.add_noise(x0, t, noise), t, y, aug, feats), feats)
        return _loss_out((v.float() - (noise - x0)).square().mean(dim=(1, 2, 3)), self.level(t), pooled, feats)

    @torch.no_grad()
    def sample(self, model, noise, steps=50):
        """Euler from t=1 to 0 (sample.py uses adaptive RK45 as the paper)."""
        ts, x = torch.linspace(1, 0, steps + 1, device=noise.device), noise
        for t, s in zip(ts[:-1], ts[1:]):
            x = x + (s - t) * self.pred(model, x, t.repeat(len(x))).float()
        return x


def build_diffusion(args):
    return {"DDPM": DDPM, "EDM": EDM, "RF": RF}[args.model]()


# ----------------------------------------------------------------------------------------------------------
# Non-leaky augmentation (EDM's AugmentPipe, CIFAR setting): the net is told how each image was warped

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


class Uncertainty(nn.Module):
    """EDM2 learned loss uncertainty u(sigma): per-sample loss -> loss / exp(u) + u, minimised at u = ln loss."""

    def __init__(self, channels=128):
        super().__init__()
        g = torch.Generator().manual_seed(0)  # fixed Fourier basis, identical on every rank and in every checkpoint
        self.register_buffer('freqs', 2 * math.pi * torch.randn(channels, generator=g))
        self.register_buffer('phases', 2 * math.pi * torch.rand(channels, generator=g))
        # EDM2 starts from a random unit-norm weight; zero-init makes training begin with the plain EDM loss.
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, sigma):  # (N,) -> (N,)
        c_noise = sigma.float().log() / 4  # EDM's c_noise
        feat = (c_noise[:, None] * self.freqs + self.phases).cos() * math.sqrt(2)  # (N, channels), unit RMS
        with torch.autocast(sigma.device.type, enabled=False):  # u enters exp(): keep it float32 under AMP
            return self.linear(feat).squeeze(1)


# ----------------------------------------------------------------------------------------------------------
# Contrastive self-distillation (MoCo v3 adapted): the EMA model is the teacher

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
    elif split == "test":
        raise SystemExit(f"dataset {args.dataset!r} has no test split: expected class folders under {root / sub}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).rglob("*")) if f.suffix.lower() in IMG_EXT]
    if not files:
        raise SystemExit(f"no images found for dataset {args.dataset!r} under {root}: "
                         f"point --data-path at a folder of class sub-folders")
    return load_images(files, args.resolution, args.skip_bad)


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
    return sum(p.numel() for p in m.parameters())


def contrastive_step(model, ema, diffusion, pipe, x_clean, f, level, args):
    """InfoNCE of the online feature (training view, its own t) against the EMA's feature of a second view."""
    t_min = {"DDPM": 1, "EDM": 0.002, "RF": 0.0}[args.model]  # Table 10's probe level, or the smallest (Table 7c)
    t = torch.full((len(x_clean),), args.probe_t if args.cl_target_t == "probe" else t_min, device=x_clean.device)
    t = t.long() if args.model == "DDPM" else t
    with torch.no_grad():  # the only extra cost of --cl: one EMA forward, in the training precision
        x2, aug2 = pipe(x_clean)
        _, f2 = diffusion.pred(ema, diffusion.add_noise(x2, t, torch.randn_like(x2)), t, aug=aug2, feats=(args.sc_layer,))
        k = ema.cl_head.project(f2[args.sc_layer], diffusion.level(t))  # the EMA head is the teacher's projector
    return contrastive_loss(model.cl_head(f, level), k)


def train_step(net, model, ema, opt, diffusion, pipe, x, step, args):
    """One optimisation step from a clean batch in [-1, 1]: flip or augment, loss, backward, clip, Adam, EMA.
    Training and --bench both run it, so the benchmark times what training does. Returns loss (N,), level (N,), cl."""
    if pipe is None:
        x_clean, x, aug = x, torch.where(torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5, x.flip(3), x), None
    else:
        x_clean, (x, aug) = x, pipe(x)  # the pipe flips too, and says so in the label
    with torch.autocast("cuda", dtype=torch.bfloat16) if x.is_cuda else nullcontext():
        if args.cl:
            loss, level, f = diffusion.loss(net, x, aug=aug, feats=(args.sc_layer,))
            cl = contrastive_step(model, ema, diffusion, pipe, x_clean, f[args.sc_layer], level, args)
        else:
            (loss, level), cl = diffusion.loss(net, x, aug=aug), x.new_zeros(())
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
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = build_model(args).to(device, memory_format=layout)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type == "cuda")
    diffusion = build_diffusion(args)
    diffusion.uncertainty = getattr(model, "uncertainty", None)
    pipe = AugmentPipe() if args.aug else None
    x = (torch.rand(args.batch_size, 3, args.resolution, args.resolution, device=device) * 2 - 1).contiguous(memory_format=layout)
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
    parts = {name: count_params(getattr(model, attr)) for name, attr in [("self-conditioning", "self_cond"),
             ("augment embedding", "aug_emb"), ("contrastive head", "cl_head"), ("uncertainty", "uncertainty")]
             if getattr(model, attr, None) is not None}
    return f"parameters: {count_params(model):,} total" + "".join(f", {n:,} {k}" for k, n in parts.items())


def main(argv=None):
    args = get_args(argv)
    torch.manual_seed(args.seed)  # the initial weights depend on --seed only
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
        FORMULATIONS[args.model]["warmup_epochs"] * n_data, args.train_images // 10)
    images = images.to(device)

    # channels_last lets cuDNN use its NHWC tensor-core convolutions under bf16; on CPU it gains little.
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model.to(device, memory_format=layout)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type == "cuda")
    diffusion = build_diffusion(args)
    diffusion.uncertainty = getattr(model, "uncertainty", None)
    pipe = AugmentPipe() if args.aug else None
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

    nbins = 5
    acc = torch.zeros(2 * nbins + 3, device=device)  # per-bin loss sums and counts, contrastive, total sum, count
    t_log, last_log = time.time(), images_seen
    bar = tqdm(total=args.train_images, initial=images_seen, unit="img", unit_scale=True, disable=rank != 0)
    model.train()
    while images_seen < args.train_images:
        # All randomness of this step is a function of (seed, rank, step): resuming reproduces it exactly.
        torch.manual_seed(args.seed * 1_000_003 + step * 1_009 + rank)
        idx = batch_indices(images_seen + rank * local_bs, local_bs, n_data, args.seed).to(device)
        x = (images[idx].float() / 127.5 - 1).contiguous(memory_format=layout)  # (B, 3, H, W) in [-1, 1]
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
            if not math.isfinite(a[-2]):
                raise SystemExit(f"loss is {a[-2]} at step {step} ({images_seen:,} images); the last good checkpoint "
                                 f"{out / 'ckpt.pt'} is kept; lower --lr or check the data")
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
                log(f"step {step} images {images_seen:,} loss {rec['loss']:.4f} (by noise level "
                    + " ".join(f"{rec[f'loss_bin{i}']:.3f}" for i in range(nbins)) + ")"
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
    return model, ema


if __name__ == "__main__":
    main()
