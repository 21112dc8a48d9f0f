"""DDAE++ latent-space DiT: a DiT-B/1 in LightningDiT style trained with rectified flow on VA-VAE
latents (Tables 5, 6), optionally self-conditioned: the pooled feature of a designated block k
conditions the blocks after it, emb' = emb + TimeMLP_sc(t) * Linear(GAP(h_k)) (Sec. 4.1).

    torchrun --nproc_per_node=4 train_dit.py --dataset in1k --data-path <imagenet> --self-cond
    python train_dit.py --dataset shapes --latent none --net tiny     # pixel space, CPU, no VAE
    python train_dit.py --no-class-cond --self-cond --dry-run     # config + parameter counts

Each training image (ADM centre crop to 256) and its flip are encoded once by the VA-VAE f16d32
into a memory-mapped cache.
"""
import argparse
import copy
import functools
import json
import math
import os
import pickle
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

# ------------------------------------------------------------------------------------------------
# Tool interface: what sample.py, probe.py, fid.py and .ci/*.py call here (test_smoke.py checks)

TOOL_INTERFACE = (
    "get_args",  # argv -> args: the paper's defaults; a checkpoint's "args" then update them
    "build_model",  # args -> the denoiser, random weights; checkpoints hold its state_dict
    "build_diffusion",  # (args, model=None) -> the formulation: loss, add_noise, pred, level
    "build_optimizer", "train_step", "fake_batch",  # one training step, as --bench times it
    "load_pixels",  # (args, split) -> uint8 images (N, 3, H, W), int64 labels (N,)
    "shapes_split",  # (args, split) -> the toy's images, labels, masks (N, H, W), nuisance (N, 8)
    "image_files", "ImageFiles",  # (args, split) -> [(path, label)]; -> (i, uint8 image, error)
    "center_crop",  # (PIL image, res, labels=False) -> ADM's centre crop (labels: nearest)
    "autocast", "use_bf16", "memory_format", "sync",  # (device[, precision]): as training runs
    "setup_distributed",  # (timeout=None) -> rank, world, device, as torchrun starts it
    "raise_on_any", "fetch_once",  # (error): any rank's ends every rank; one download a node
    "atomic_save", "check_out_dir",  # (obj, path[, save]): never half a file; (out) -> error
    "save_grid",  # (uint8 (N, 3, H, W), path, cols=8): one PNG
    "LossSums",  # sums of per-sample losses by noise level; read(world) all-reduces them
    "SHAPES", "DATASETS",  # the toy's variants; datasets by name -> (classes, resolution)
    "IMAGE_SIZE",  # the side of the images a latent cache encodes: 256 -> 16x16 latents
    "latent_cache",  # (args, split, source=None) -> the folder of the split's keyed latent cache
    "build_vae", "load_vae",  # args -> the VA-VAE, random; (args, device) -> with its weights
    "decode",  # (vae, normalised latents (N, 32, 16, 16), latent_stats) -> images in [-1, 1]
)

# ------------------------------------------------------------------------------------------------
# Self-conditioning (Sec. 4.1, Fig. 1): pool the designated block, add it back into `emb`

class SelfCond(nn.Module):
    """emb' = emb + TimeMLP_sc(t) * Linear(GAP(h_k)), TimeMLP_sc a copy of the time MLP (Sec. 4.1,
    Fig. 1b); "add" drops it (Table 7a). Call reset_parameters() after re-initialising Linears."""
    def __init__(self, feat_dim, emb_dim, freq_dim, mode="adaptive"):
        super().__init__()
        self.scale = time_mlp(freq_dim, emb_dim) if mode == "adaptive" else None
        self.proj = nn.Linear(feat_dim, emb_dim)
        self.reset_parameters()

    def reset_parameters(self):
        """The paper states no init; a zero projection starts the net as exactly its baseline."""
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, emb, feat, t_freq):  # (N, D), GAP(h_k) (N, C_k) fp32, sinusoid (N, F)
        f = self.proj(feat)  # (N, D)
        return emb + (f if self.scale is None else self.scale(t_freq) * f)

# ------------------------------------------------------------------------------------------------
# Model: DiT in LightningDiT's layout (RMSNorm, SwiGLU, qkv bias, 2D RoPE, AdaLN-zero)

def timestep_embedding(t, dim, max_period=10_000):
    """Sinusoid of a float tensor (N,): (N, dim), cos half first (DiT's and U-ViT's layout)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs  # (N, half)
    return torch.cat([angles.cos(), angles.sin()], dim=1)

def time_mlp(freq_dim, dim):
    """Sinusoid (N, freq_dim) -> Linear -> SiLU -> Linear: the conditioning `emb` (N, dim)."""
    return nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

def sincos_pos_embed(dim, grid):
    """Fixed 2D sin-cos position embedding (grid^2, dim): first half the row, second the column."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def emb(p):  # (T,) -> (T, dim/2)
        out = p.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)
    return torch.cat([emb(rows), emb(cols)], dim=1).float()

class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain, computed in fp32."""
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * \
            self.weight

class Rope2D(nn.Module):
    """2D RoPE of patch tokens: a head's first half turns with the row, the second the column."""
    def __init__(self, head_dim, grid, theta=10000.0):
        super().__init__()
        quarter = head_dim // 4  # rotation pairs per axis
        freqs = 1.0 / theta ** (torch.arange(quarter, dtype=torch.float32) / quarter)
        pos = torch.arange(grid, dtype=torch.float32)
        rows, cols = torch.meshgrid(pos, pos, indexing="ij")
        angles = torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=1)
        # derived from the grid, never trained: kept out of the state dict
        cos, sin = (f(angles).repeat_interleave(2, dim=1) for f in (torch.cos, torch.sin))
        self.register_buffer("cos", cos, persistent=False)  # (T, head_dim)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x):  # (N, H, T, head_dim)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        rotated = torch.stack([-x2, x1], dim=-1).flatten(-2)  # pairs (a, b) -> (-b, a)
        return x * self.cos.to(x.dtype) + rotated * self.sin.to(x.dtype)

class DiTAttention(nn.Module):
    """Multi-head self-attention with qkv bias and RoPE on q and k, through SDPA."""
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope):
        N, L, D = x.shape
        qkv = self.qkv(x).reshape(N, L, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (N, H, L, d) each
        x = F.scaled_dot_product_attention(rope(q), rope(k), v)
        return self.proj(x.transpose(1, 2).reshape(N, L, D))

class SwiGLU(nn.Module):
    """SwiGLU MLP, hidden int(2/3 * 4 * dim); w12 holds the gate and value projections."""
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

class DiTBlock(nn.Module):
    """AdaLN-zero modulated attention and SwiGLU, both pre-normed with RMSNorm."""
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.attn = DiTAttention(dim, heads)
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

class DiT(nn.Module):
    """LightningDiT-style DiT of (C, S, S) inputs, patch p, blocks named block_1 .. block_depth."""
    def __init__(self, in_ch, size, patch, width, depth, heads, num_classes=0, sc_layer=0,
                 sc_mode="adaptive"):
        super().__init__()
        self.in_ch, self.patch, self.num_classes = in_ch, patch, num_classes
        grid = size // patch
        self.patch_embed = nn.Conv2d(in_ch, width, patch, stride=patch)
        # The fixed sin-cos table is a frozen Parameter, as in LightningDiT: the parameter count
        # (129,787,424 for DiT-B) then matches the paper's 129.8M, which counts it.
        self.pos_embed = nn.Parameter(sincos_pos_embed(width, grid)[None], requires_grad=False)
        self.rope = Rope2D(width // heads, grid)
        self.t_embed = time_mlp(256, width)
        # num_classes + 1 rows: the last is the null class of label dropout and CFG
        self.y_embed = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.blocks = nn.ModuleList(DiTBlock(width, heads) for _ in range(depth))
        self.final = FinalLayer(width, patch * patch * in_ch)
        self.feature_layers = [f"block_{i}" for i in range(1, depth + 1)]
        self.sc_layer = sc_layer  # 1-based block index, 0 = no self-conditioning
        self.self_cond = SelfCond(width, width, 256, sc_mode) if sc_layer else None
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        scale = getattr(self.self_cond, "scale", None)  # TimeMLP_sc: as the backbone's
        for mlp in [m for m in (self.t_embed, scale) if m is not None]:
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.weight, std=0.02)
        for ada in [b.ada for b in self.blocks] + [self.final.ada]:  # AdaLN-zero: identity blocks
            nn.init.zeros_(ada[-1].weight)
            nn.init.zeros_(ada[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)
        if self.self_cond is not None:  # after the Linear loop above
            self.self_cond.reset_parameters()

    def forward(self, x, t, y=None, feats=(), pool=True):
        """x (N, C, S, S), t (N,) in [0, 1] (1 = noise), labels y (N,) or None (null) -> velocity,
        {block: GAP (N, D) fp32} of feats (pool=False: tokens as a grid (N, D, S/p, S/p))."""
        unknown = set(feats) - set(self.feature_layers)
        if unknown:
            raise ValueError(f"unknown feature layers {sorted(unknown)}; "
                             f"choose from block_1 .. block_{len(self.blocks)}")
        N, C, S, _ = x.shape
        p, g = self.patch, S // self.patch
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (N, T, D)
        t_freq = timestep_embedding(t, 256)  # (N, 256)
        emb = self.t_embed(t_freq)  # (N, D)
        if self.y_embed is not None:
            null = torch.full((N,), self.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.y_embed(null if y is None else y)
        pooled, out_feats = {}, {}
        for i, block in enumerate(self.blocks, 1):
            h = block(h, emb, self.rope)
            if f"block_{i}" in feats or i == self.sc_layer:
                pooled[f"block_{i}"] = h.float().mean(1)  # (N, D): GAP over tokens, in fp32
            if f"block_{i}" in feats:
                grid = h.float().transpose(1, 2).reshape(N, -1, g, g)
                out_feats[f"block_{i}"] = pooled[f"block_{i}"] if pool else grid
            if i == self.sc_layer:  # later blocks and the final layer read emb'
                emb = self.self_cond(emb, pooled[f"block_{i}"], t_freq)
        h = self.final(h, emb)  # (N, T, p*p*C)
        x = h.reshape(N, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(N, C, S, S)
        return x, out_feats

def build_model(args):
    """DiT of the resolved args: 16x16x32 latents with patch 1, or pixels with patch 2."""
    latent = args.latent != "none"
    classes = (args.num_classes or 0) if args.class_cond else 0  # folders: known from the data
    return DiT(32 if latent else 3, 16 if latent else args.resolution, 1 if latent else 2,
               **NETS[args.net], num_classes=classes, sc_mode=args.sc_mode,
               sc_layer=int(args.sc_layer.split("_")[1]) if args.self_cond else 0)

# ------------------------------------------------------------------------------------------------
# Rectified flow, latent recipe (Table 8). Paper convention: t=0 data, t=1 noise,
# x_t = (1 - t) x0 + t eps; the net predicts the velocity v = dx_t/dt = eps - x0.

class LatentRF:
    """Logit-normal t, velocity MSE (+ LightningDiT's cosine term), label dropout for CFG."""
    kind = "RF"

    def __init__(self, num_classes=0, label_dropout=0.1, cos_loss=True):
        self.num_classes, self.label_dropout, self.cos_loss = num_classes, label_dropout, cos_loss

    def add_noise(self, x0, t, noise):
        t = t.view(-1, *[1] * (x0.dim() - 1)).to(x0.dtype)
        return (1 - t) * x0 + t * noise

    def level(self, t):
        return t.float()

    def drop_labels(self, y):
        """Replace a label_dropout fraction of the labels by the null class (num_classes)."""
        drop = torch.rand(y.shape, device=y.device) < self.label_dropout
        return torch.where(drop, torch.full_like(y, self.num_classes), y)

    def pred(self, model, x_t, t, y=None, feats=(), pool=True):
        """Velocity and features; t is the paper's (LightningDiT's 0 = noise is a relabelling)."""
        return model(x_t, t, y, feats, pool)

    def loss(self, model, x0, y=None):
        """Per-sample loss (N,) and noise level (N,)."""
        t = torch.sigmoid(torch.randn(len(x0), device=x0.device))  # logit-normal(0, 1)
        noise = torch.randn_like(x0)
        if self.num_classes:
            y = self.drop_labels(y)
        v = self.pred(model, self.add_noise(x0, t, noise), t, y)[0].float()
        target = noise - x0
        loss = (v - target).square().mean(dim=(1, 2, 3))
        if self.cos_loss:  # LightningDiT's released recipe (use_cosine_loss), as the paper uses:
            # 1 - cosine similarity over channels, averaged over positions, added to the MSE
            loss = loss + (1 - F.cosine_similarity(v, target, dim=1)).mean(dim=(1, 2))
        return loss, self.level(t)

    @torch.no_grad()
    def sample(self, model, noise, y=None, steps=50, shift=3.3):
        """Euler on the shifted grid t' = s t / (1 + (s-1) t), t: 1 -> 0 (previews; sample.py)."""
        ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
        ts, x = (shift * ts / (1 + (shift - 1) * ts)).tolist(), noise
        for t, t_next in zip(ts[:-1], ts[1:]):
            tt = torch.full((len(x),), t, device=x.device)
            x = x + (t_next - t) * self.pred(model, x, tt, y)[0].float()
        return x

def build_diffusion(args, model=None):
    return LatentRF(args.num_classes if args.class_cond else 0, args.label_dropout, args.cos_loss)

# ------------------------------------------------------------------------------------------------
# Training step (Sec. 4): the flow loss, one optimizer step and the EMA; the preview

def build_optimizer(model, args):
    """Adam with LightningDiT's beta2; the frozen sin-cos table is not optimised."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=args.lr, betas=(0.9, args.beta2), fused=params[0].is_cuda)

def train_step(net, model, ema, opt, diffusion, batch, step, args):
    """One step (training's, --bench's) on a (flipped) batch (x, y) -> loss (B,), level (B,)."""
    x, y = batch
    with autocast(x.device, args.precision):
        loss, level = diffusion.loss(net, x, y)
    opt.zero_grad(set_to_none=True)
    loss.mean().backward()
    nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)  # the frozen table: no grad
    opt.step()
    update_ema(ema, model, step, args.ema)
    return loss.detach(), level, {}

def sample_preview(ema, diffusion, args, device):
    """16 samples of the EMA model from the same noise and labels each time (no CFG)."""
    g = torch.Generator().manual_seed(args.seed)
    shape = (32, 16, 16) if args.latent != "none" else (3, args.resolution, args.resolution)
    noise = torch.randn(16, *shape, generator=g).to(device)
    y = torch.arange(16, device=device) % args.num_classes if args.class_cond else None
    with autocast(device, args.precision):
        return diffusion.sample(ema, noise, y)

# ------------------------------------------------------------------------------------------------
# Recipe: DiT and VA-VAE presets (Table 9), training length (App. A), designated blocks (Table 10)

NETS = {  # width, blocks, heads: 'B' is DiT-B (Table 9), 'tiny' is for the CPU tests
    "B": dict(width=768, depth=12, heads=12),
    # DiT-L/1, which the authors' repository also trains with self-conditioning; the designated
    # block scales with the depth (Table 10's 9 of 12 -> 18 of 24)
    "L": dict(width=1024, depth=24, heads=16),
    "tiny": dict(width=64, depth=4, heads=4),
}
VAES = {  # LDM AutoencoderKL configs: 'f16d32' is the official VA-VAE, 'tiny' its layout, narrow
    "f16d32": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,)),
    "tiny": dict(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(16,)),
}
VAVAE_URL = ("https://huggingface.co/hustvl/vavae-imagenet256-f16d32-dinov2/resolve/main/"
             "vavae-imagenet256-f16d32-dinov2.pt")
IMAGE_SIZE = 256  # latent datasets are 256x256 images -> 16x16x32 latents
IMAGENET = {"in1k": 1000, "in100": 100}  # classes of the latent datasets known by name
# epochs by (dataset, class-cond) (App. A; IN1k: 90 as in Tables 5, 6 and 11, the text says 100)
EPOCHS = {("in100", False): 1400, ("in100", True): 1000, ("in1k", False): 90, ("in1k", True): 90}
# Table 10: the baseline's best probe block, where self-conditioning reads
SC_LAYER = {("in100", False): 8, ("in100", True): 8, ("in1k", False): 9, ("in1k", True): 10}
ARCH_KEYS = ("net", "latent", "resolution", "class_cond", "num_classes", "self_cond", "sc_mode",
             "sc_layer")  # what a resumed run may not change (num_classes: the label table)

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--net", choices=list(NETS), default="B")
    p.add_argument("--dataset", default="in1k",
                   help="in1k, in100 or a class-folder name; --latent none: the shapes toy")
    p.add_argument("--latent", choices=["vavae", "none"], default="vavae",
                   help="'none': pixel space, patch 2, on the shapes toy (CPU tests)")
    p.add_argument("--vae", help="VA-VAE weights (default: downloaded once to ~/.cache/ddae)")
    p.add_argument("--vae-config", choices=list(VAES), default="f16d32", help="'tiny': tests")
    p.add_argument("--cache-dir", help="latent cache of the dataset (default: runs/cache/DATASET)")
    p.add_argument("--extract-batch", type=int, default=64, help="images per VA-VAE encode call")
    p.add_argument("--resolution", type=int, default=32, help="pixel mode image size")
    p.add_argument("--class-cond", action=argparse.BooleanOptionalAction,
                   help="labels, with a null class for CFG (default: on for in1k/in100)")
    p.add_argument("--label-dropout", type=float, default=0.1, help="labels made the null class")
    p.add_argument("--self-cond", action="store_true", help="self-conditioning (Sec. 4.1)")
    p.add_argument("--sc-mode", choices=["adaptive", "add"], default="adaptive",
                   help="time-scaled or direct addition (Table 7a)")
    p.add_argument("--sc-layer", help="block read by self-conditioning, 9 or block_9 (Table 10)")
    p.add_argument("--probe-t", type=float, help="noise level of the probe (Table 10)")
    p.add_argument("--cos-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="LightningDiT's cosine term")
    p.add_argument("--batch-size", type=int, help="global batch: 1024 (Table 11), tiny 128")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--beta2", type=float, default=0.95, help="Adam beta2 (LightningDiT's recipe)")
    p.add_argument("--ema", type=float, default=0.9999)
    p.add_argument("--warmup-images", type=int, help="linear lr warm-up (default: none, Table 11)")
    add_training_args(p)
    args = p.parse_args(argv)
    if (args.latent == "none") != (args.dataset in SHAPES):  # the paper's DiT: latents only
        p.error(f"--dataset {args.dataset} --latent {args.latent}: pixel space (--latent none) "
                f"is for the shapes toy, other data trains as latents")

    imagenet = args.dataset in IMAGENET
    args.class_cond = imagenet if args.class_cond is None else args.class_cond  # Tables 5, 6
    args.num_classes = IMAGENET.get(args.dataset) or DATASETS.get(args.dataset, (None,))[0] \
        or folder_classes(args)
    if args.batch_size is None:
        args.batch_size = 128 if args.net == "tiny" else 1024
    # shapes: minutes on a CPU; other folders train as long as ImageNet-100
    args.epochs = 40 if args.dataset in SHAPES else \
        EPOCHS.get((args.dataset, args.class_cond), EPOCHS[("in100", args.class_cond)])
    args.keep_epochs = 0 if args.dataset in SHAPES else 20  # kept: Table 6's evaluation epochs
    args.warmup_epochs = 0  # Table 11 lists no warm-up for latent pre-training
    depth = NETS[args.net]["depth"]
    # Table 10 for DiT-B on ImageNet, elsewhere IN100's block 8 of 12; scaled to the net's depth
    default = round(SC_LAYER.get((args.dataset, args.class_cond), 8) * depth / 12)
    layer = args.sc_layer or str(default)
    args.sc_layer = f"block_{layer}" if layer.isdigit() else layer
    if args.sc_layer not in [f"block_{i}" for i in range(1, depth + 1)]:
        p.error(f"--sc-layer {layer}: DiT-{args.net} has block_1 .. block_{depth}")
    # Table 10: DiT-B; pixel space: RF on CIFAR
    args.probe_t = args.probe_t or (0.25 if args.latent != "none" else 0.06)
    if args.latent == "none" and args.resolution % 2:
        p.error("--resolution must be even (patch 2)")
    kind = ("-pixel" if args.latent == "none" else "") + ("-cond" if args.class_cond else "")
    sc = "-sc" if args.self_cond else ""
    args.out = args.out or f"runs/dit-{args.dataset}-{args.net}-RF{kind}{sc}"
    return args

def folder_classes(args):
    """Class folders of the training split, else the latent cache's labels, else None (no data)."""
    root = Path(args.data_path)
    root = root / "train" if (root / "train").is_dir() else root
    if root.is_dir():
        return sum(d.is_dir() for d in root.iterdir()) or None
    labels = cache_dir(args, "train") / "labels.npy"
    return int(np.load(labels, mmap_mode="r").max()) + 1 if labels.exists() else None

def param_report(model):
    """One line: the total and what each option adds."""
    return (f"parameters: {count_params(model):,} total, {count_params(model.self_cond):,} "
            f"self-conditioning, {count_params(model.y_embed):,} label table")

def load_train_data(args, device):
    """batch(idx) -> (x, y or None): latents gather rows of the memory-mapped (N, 2 flips, 32, 16,
    16) float16 cache, the flip picking a copy; pixels index one uint8 tensor on the device."""
    latent = args.latent != "none"
    if latent:
        cache = latent_cache(args, "train")
        data = np.load(cache / "latents.npy", mmap_mode="r")
        labels = torch.from_numpy(np.load(cache / "labels.npy"))
        stats = latent_stats(args)
        mean, std = (stats[k].to(device)[None, :, None, None] for k in ("mean", "std"))
    else:
        data, labels = load_pixels(args, "train")
        data = data.to(device)
    if args.class_cond and not args.num_classes:
        raise SystemExit(f"the classes of {args.dataset!r} are unknown: point --data-path at its "
                         f"class folders, or pass --no-class-cond")
    labels, layout = labels.to(device), memory_format(device)

    def batch(idx):  # non_blocking copies: the host does not wait for the GPU's queue
        flip = (torch.rand(len(idx)) < 0.5) & args.flip  # --no-flip: the draws stay, all False
        on_device = idx.to(device, non_blocking=True)
        if latent:
            x = torch.from_numpy(data[idx.numpy(), flip.long().numpy()])
            x = (x.to(device, non_blocking=True).float() - mean) / std  # (B, 32, 16, 16)
        else:
            x = data[on_device].float() / 127.5 - 1  # (B, 3, H, W) in [-1, 1]
            flip = flip.to(device, non_blocking=True)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        y = labels[on_device] if args.class_cond else None
        return x.contiguous(memory_format=layout), y

    if not latent:
        return SimpleNamespace(n=len(labels), batch=batch, to_pixels=lambda x: x, state={})
    # the decoder of preview grids, loaded at the start: a missing VA-VAE fails now, not hours in
    path = vae_file(args) if args.sample_every else None  # a collective: every rank calls
    rank = dist.get_rank() if dist.is_initialized() else 0
    vae = load_vae(args, device, path) if path and rank == 0 else None
    return SimpleNamespace(n=len(labels), batch=batch, to_pixels=lambda z: decode(vae, z, stats),
                           state={"latent_stats": stats})

def fake_batch(args, device):
    """A synthetic batch of the training shape, for --bench."""
    c, s = (32, 16) if args.latent != "none" else (3, args.resolution)
    x = torch.randn(args.batch_size, c, s, s, device=device)
    y = torch.randint(0, args.num_classes or 1000, (args.batch_size,), device=device)
    return x.contiguous(memory_format=memory_format(device)), y if args.class_cond else None

# ------------------------------------------------------------------------------------------------
# Autoencoder: the VA-VAE tokenizer (LDM AutoencoderKL; module names follow the official keys)

def group_norm(ch):
    return nn.GroupNorm(32, ch, eps=1e-6)

class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; a 1x1 shortcut when the width changes."""
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
        q, k, v = (m(h).reshape(N, 1, C, H * W).transpose(-1, -2)
                   for m in (self.q, self.k, self.v))  # (N, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(N, C, H, W)
        return x + self.proj_out(h)

class VAEResample(nn.Module):
    """LDM's 2x resampling: a stride-2 conv, or nearest-neighbour upsampling and a conv."""
    def __init__(self, ch, down):
        super().__init__()
        self.down, self.conv = down, nn.Conv2d(ch, ch, 3, stride=1 + down, padding=1 - down)

    def forward(self, x):
        if self.down:
            return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM pads right and bottom only
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

def _level(cin, cout, n, attn, resample=None):
    """LDM's level: n ResnetBlocks to cout, attention after each if attn, then "down"/"up"."""
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(), nn.ModuleList()
    for i in range(n):
        level.block.append(ResnetBlock(cin if i == 0 else cout, cout))
        if attn:
            level.attn.append(AttnBlock(cout))
    if resample:
        setattr(level, f"{resample}sample", VAEResample(cout, resample == "down"))
    return level

def _mid(ch):
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(ch, ch), AttnBlock(ch), ResnetBlock(ch, ch)
    return mid

def _run_level(level, h):
    """The level's blocks, each followed by its attention if it has one, then its resampling."""
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    for name in ("downsample", "upsample"):
        h = getattr(level, name)(h) if hasattr(level, name) else h
    return h

class Encoder(nn.Module):
    """Image (3, R, R) -> posterior moments (2z, R/16, R/16), for a ch_mult of length 5."""
    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, z_channels,
                 resolution=IMAGE_SIZE):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down, cin, res = nn.ModuleList(), ch, resolution
        for i, mult in enumerate(ch_mult):
            last = i == len(ch_mult) - 1
            self.down.append(_level(cin, ch * mult, num_res_blocks, res in attn_resolutions,
                                    None if last else "down"))
            cin, res = ch * mult, res if last else res // 2
        self.mid = _mid(cin)
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, 2 * z_channels, 3, padding=1)  # double_z: mean, log-var

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))

class Decoder(nn.Module):
    """Latent (z, r, r) -> image (3, 16r, 16r); num_res_blocks + 1 blocks per level, as LDM."""
    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, z_channels,
                 resolution=IMAGE_SIZE):
        super().__init__()
        cin, res = ch * ch_mult[-1], resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, cin, 3, padding=1)
        self.mid = _mid(cin)
        levels = []
        for i in reversed(range(len(ch_mult))):  # built lowest resolution first, stored by index
            levels.insert(0, _level(cin, ch * ch_mult[i], num_res_blocks + 1,
                                    res in attn_resolutions, "up" if i else None))
            cin, res = ch * ch_mult[i], res * 2 if i else res
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            h = _run_level(level, h)
        return self.conv_out(F.silu(self.norm_out(h)))

class AutoencoderKL(nn.Module):
    """VA-VAE: encoder -> quant_conv -> (mean, logvar); post_quant_conv -> decoder."""
    VAE_KEYS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")

    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, z_channels=32, embed_dim=32):
        super().__init__()
        cfg = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                   attn_resolutions=attn_resolutions, z_channels=z_channels)
        self.encoder, self.decoder = Encoder(**cfg), Decoder(**cfg)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    @torch.no_grad()
    def encode(self, x):
        """Images in [-1, 1] (N, 3, 256, 256) -> posterior mean (N, 32, 16, 16)."""
        # The mean, not a sample (LightningDiT samples): VA-VAE's KL weight (1e-6) leaves the
        # posterior std far below the latent scale, and a resumed extraction writes the same rows.
        return self.quant_conv(self.encoder(x)).chunk(2, dim=1)[0]

    @torch.no_grad()
    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

def build_vae(args):
    """The VA-VAE of args.vae_config ('f16d32' official, 'tiny' for tests), random weights."""
    return AutoencoderKL(**VAES[args.vae_config])

def vae_state_dict(path):
    """The autoencoder's weights in an official VA-VAE file (not its loss's or DINOv2's)."""
    try:  # weights only: never unpickle code from a downloaded file
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"VA-VAE file {path} cannot be loaded as plain weights "
                         f"({type(e).__name__}): it is truncated, or a pickle with code in it; "
                         f"re-save its state_dict with torch.save and pass that to --vae")
    sd = sd.get("state_dict", sd)
    return {k: v for k, v in sd.items() if k.startswith(AutoencoderKL.VAE_KEYS)}

def download_vae(path, config):
    """Fetch the VA-VAE under a temporary name; no checksum is published, so load it strictly."""
    print(f"downloading the VA-VAE from {VAVAE_URL} to {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".fetch-") as tmp:
        part = Path(tmp) / path.name
        torch.hub.download_url_to_file(VAVAE_URL, part)
        with torch.device("meta"):  # shapes only: every tensor of the file is checked
            AutoencoderKL(**VAES[config]).load_state_dict(vae_state_dict(part), assign=True)
        os.replace(part, path)

def vae_file(args):
    """--vae, or the official file in ~/.cache/ddae, downloaded on first use (all ranks call)."""
    if args.vae:
        if not Path(args.vae).exists():
            raise SystemExit(f"--vae {args.vae} does not exist")
        return Path(args.vae)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddae"
    return fetch_once(cache / Path(VAVAE_URL).name, lambda p: download_vae(p, args.vae_config),
                      f"cannot download the VA-VAE from {VAVAE_URL}; fetch it by hand and "
                      f"pass --vae PATH")

def load_vae(args, device, path=None):
    """The VA-VAE with the weights of `path` (default: vae_file(args), a collective)."""
    vae = build_vae(args)
    vae.load_state_dict(vae_state_dict(path or vae_file(args)))
    return vae.to(device).eval().requires_grad_(False)

@torch.no_grad()
def decode(vae, z, latent_stats):
    """Normalised latents (N, 32, 16, 16) -> images in [-1, 1] (N, 3, 256, 256)."""
    mean, std = (latent_stats[k].to(z.device)[None, :, None, None] for k in ("mean", "std"))
    return vae.decode(z.float() * std + mean).clamp(-1, 1)

# ------------------------------------------------------------------------------------------------
# Latents: each training image and its flip encoded once: memory-mapped, resumable, sharded, keyed

def cache_dir(args, split):
    root = Path(args.cache_dir or Path("runs") / "cache" / args.dataset)
    return root / {"train": "train", "test": "val"}[split]

def cache_key(args, images=None):
    """What a cache holds: dataset, folder, VA-VAE file and layout, image count (None: any)."""
    vae = str(Path(args.vae).absolute()) if args.vae else Path(VAVAE_URL).name
    return {"dataset": args.dataset, "data_path": str(Path(args.data_path).absolute()),
            "vae": vae, "vae_config": args.vae_config, "images": images}

def key_error(out, key):
    """None if the cache in `out` is one of `key` or not begun, else the line refusing it."""
    if not (out / "key.json").exists():
        return None if not (out / "latents.npy").exists() else (
            f"latent cache {out} records no key (an older version made it): delete it or pass "
            f"another --cache-dir")
    held = json.loads((out / "key.json").read_text())
    if all(held.get(k) == v for k, v in key.items() if v is not None):
        return None
    return (f"latent cache {out} holds {json.dumps(held)}, not {json.dumps(key)}: pass another "
            f"--cache-dir, or delete it to encode afresh")

def done_mask(out, n):
    """Which of the n rows of the cache in `out` are encoded, from every rank's mask file."""
    done = np.zeros(n, dtype=bool)
    for f in out.glob("done.rank*.npy"):
        done |= np.load(f)
    return done

def create_cache_file(path, shape):
    """An empty float16 .npy of `shape` whose header is padded to 4096 bytes: every row of
    32 KiB then starts on a page boundary, so ranks writing their own rows share no page."""
    header = repr({"descr": "<f2", "fortran_order": False, "shape": shape}).encode("latin1")
    with open(path, "wb") as f:  # format 1.0: magic, uint16 header length, header + spaces + \n
        f.write(b"\x93NUMPY\x01\x00" + (4096 - 10).to_bytes(2, "little"))
        f.write(header.ljust(4096 - 10 - 1) + b"\n")
        f.truncate(4096 + 2 * math.prod(shape))  # sparse until written

def open_cache(out, n=None, mode="r"):
    """(out/latents.npy memory-mapped, None), or (None, why it is unreadable or not n images)."""
    try:
        lat = np.load(out / "latents.npy", mmap_mode=mode)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError) as e:
        return None, (f"latent cache {out / 'latents.npy'} is unreadable ({e}): delete the "
                      f"folder and rerun")
    if n is not None and len(lat) != n:
        return None, (f"latent cache {out} holds {len(lat)} images, the dataset {n}: "
                      f"delete the folder")
    return lat, None

def extract_latents(dataset, labels, out, key, vae, device, batch=64, workers=0, rank=0, world=1):
    """Encode each image of `dataset` ((index, uint8 (3, 256, 256), error) as ImageFiles yields)
    and its flip once into out/latents.npy (N, 2, 32, 16, 16) float16, beside labels and key. Rank
    r encodes r::world of the rows not done, marked in out/done.rank<r>.npy after each batch (a
    killed run resumes, any world size); returns them. Any rank's error ends all in one batch."""
    n, shape, error = len(labels), (len(labels), 2, 32, 16, 16), None
    if rank == 0 and not (out / "latents.npy").exists():
        out.mkdir(parents=True, exist_ok=True)
        need, free = 2 * math.prod(shape), shutil.disk_usage(out).free  # float16 rows
        if need > free:  # a memory-mapped write to a full disk would kill the process
            error = (f"the latent cache needs {need / 2**30:.1f} GiB in {out}, "
                     f"{free / 2**30:.1f} GiB are free: free some or pass --cache-dir")
        else:
            (out / "key.json").write_text(json.dumps(key))
            np.save(out / "labels.npy", np.asarray(labels, dtype=np.int64))
            create_cache_file(out / "latents.tmp.npy", shape)
            os.replace(out / "latents.tmp.npy", out / "latents.npy")
    elif rank == 0:
        error = key_error(out, key)
    raise_on_any(error)  # also the barrier: the file exists before any rank opens it
    lat, error = open_cache(out, n, "r+")
    raise_on_any(error)
    done = done_mask(out, n)
    todo = np.flatnonzero(~done)
    rounds = math.ceil(len(todo[0::world]) / batch)  # rank 0 has the most rows: every rank's count
    todo = todo[rank::world]
    raise_on_any(None)  # everyone has read the masks before anyone rewrites its own
    images = torch.utils.data.Subset(dataset, todo)
    loader = iter(torch.utils.data.DataLoader(images, batch_size=batch, num_workers=workers))
    for _ in tqdm(range(rounds), desc=f"encoding {out}", disable=rank or not len(todo)):
        idx, img, errors = next(loader, (None, None, ()))
        error = next((f"cannot read image {e}: fix or remove it, then rerun" for e in errors if e),
                     None)
        if idx is not None and not error:
            x = img.to(device).float() / 127.5 - 1  # (B, 3, 256, 256)
            z = vae.encode(torch.cat([x, x.flip(3)])).float().cpu().numpy()  # (2B, 32, 16, 16)
            idx = idx.numpy()
            lat[idx, 0], lat[idx, 1] = z[:len(idx)], z[len(idx):]
            lat.flush()  # the rows reach the file before the mask says they are done
            done[idx] = True
            atomic_save(done, out / f"done.rank{rank}.npy", lambda a, f: np.save(f, a))
        raise_on_any(error)  # once a batch: a bad image stops every rank within one batch
    return todo.tolist()

@torch.no_grad()
def channel_stats(lat, chunk=1024):
    """Per-channel mean and std of (N, 2, C, h, w) latents, both flips, summed in float64."""
    s = ss = count = 0
    for i in range(0, len(lat), chunk):
        z = torch.from_numpy(np.asarray(lat[i:i + chunk], dtype=np.float64))
        z = z.transpose(0, 2).flatten(1)  # (C, rest)
        s, ss, count = s + z.sum(1), ss + z.square().sum(1), count + z.shape[1]
    mean = s / count
    std = (ss / count - mean.square()).clamp(min=0).sqrt()
    return {"mean": mean.float(), "std": std.float()}

def same_cache(out, rank, world):
    """Stop every rank unless all read back the token rank 0 wrote (the cache must be shared)."""
    if world == 1:
        return
    token, error = os.urandom(8).hex(), None
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "world.token").write_text(token)
        except OSError as e:
            error = f"cannot write the latent cache {out} ({e}): pass a writable --cache-dir"
    raise_on_any(error)
    sent = [token]
    dist.broadcast_object_list(sent, src=0)
    seen = (out / "world.token").read_text() if (out / "world.token").exists() else None
    raise_on_any(None if seen == sent[0] else
                 f"the ranks do not share the latent cache {out}: put it on a file system every "
                 f"node sees (--cache-dir)")

def latent_cache(args, split, source=None):
    """The split's latent cache folder, first encoded if unfinished (a collective) from the class
    folders, or source = (dataset, labels); a bad or foreign cache ends every rank in one line."""
    out = cache_dir(args, split)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    same_cache(out, rank, world)  # before any rank branches on the folder's content
    raise_on_any(key_error(out, cache_key(args)) if rank == 0 else None)
    if not (out / "complete").exists():
        if source is None:
            files = image_files(args, split)
            source = ImageFiles(files, IMAGE_SIZE), torch.tensor([y for _, y in files])
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        extract_latents(*source, out, cache_key(args, len(source[1])), load_vae(args, device),
                        device, args.extract_batch, args.workers, rank, world)
        error = None
        if rank == 0:
            lat, error = open_cache(out)
            missing = 0 if error else int((~done_mask(out, len(lat))).sum())
            if missing:
                error = f"latent cache {out}: {missing} images were not encoded; rerun to finish"
            elif not error:
                atomic_save(channel_stats(lat), out / "stats.pt")
                (out / "complete").write_text(json.dumps({"images": len(lat)}))
        raise_on_any(error)  # also the barrier: the cache is complete before any rank reads it
    raise_on_any(open_cache(out)[1])  # a truncated or garbage file: one line, every rank
    return out

def latent_stats(args):
    """Per-channel mean and std of the training cache: the normalisation of every split."""
    return torch.load(latent_cache(args, "train") / "stats.pt", weights_only=True)

# ------------------------------------------------------------------------------------------------
# Main: EDM's loop; the events (log, checkpoint, snapshot, preview, stop) are helpers below. From
# here on every trainer holds the same plumbing, character for character, beside its own loaders.

def main(argv=None):
    """Train; --dry-run and --bench instead. Rerunning the same command resumes exactly."""
    args = get_args(argv)
    if args.dry_run:
        with torch.device("meta"):  # shapes only: even DiT-B builds at once
            model = build_model(args)
        return print(json.dumps(vars(args), indent=2) + "\n" + param_report(model))
    if args.bench:
        return benchmark(args)
    rank, world, device = setup_distributed()
    out, log, ckpt_path = Path(args.out), Log(args.out, rank), Path(args.out, "ckpt.pt")
    raise_on_any(check_out_dir(out) if rank == 0 else None)

    # Data, and the run's length and event spacing in images (the paper's epochs by default)
    data = load_train_data(args, device)
    if not world <= args.batch_size <= data.n or args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size}: use a multiple of the {world} "
                         f"processes, at most the {data.n:,} training images")
    args.train_images = args.train_images or args.epochs * data.n
    args.log_every = args.log_every or min(50_000, max(args.train_images // 10, 1))
    if args.warmup_images is None:  # Table 11's warm-up, at most a tenth of the run
        args.warmup_images = min(args.warmup_epochs * data.n, args.train_images // 10)
    if args.keep_every is None:
        args.keep_every = args.keep_epochs * data.n

    # Model, EMA and optimizer; resumed from <out>/ckpt.pt when there is one
    log(f"building {Path(__file__).name} --net {args.net} ...")  # DiT-L: a silent minute on CPU
    torch.manual_seed(args.seed)  # the initial weights depend on --seed alone
    model = build_model(args).to(device, memory_format=memory_format(device))
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = build_optimizer(model, args)
    diffusion = build_diffusion(args, model)
    step, images = resume(ckpt_path, args, log, model, ema, opt) if ckpt_path.exists() else (0, 0)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)  # only now: a run that fails to start leaves none
    command = argv if argv is not None else sys.argv[1:]
    log(f"{Path(__file__).name} {' '.join(map(str, command))}\n{json.dumps(vars(args))}")
    log(f"{param_report(model)}; {data.n:,} training images; world {world}")
    log(snapshot_plan(args, ema))
    net = torch.compile(model) if args.compile else model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)

    stop = []  # SIGTERM / SIGINT: save at the next gate, exit
    handlers = {s: signal.signal(s, lambda signum, frame: stop.append(signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    sums, local_bs = LossSums(), args.batch_size // world
    clock = SimpleNamespace(log=time.time(), images=images, save=time.time())  # img/s, saves
    bar = tqdm(total=args.train_images, initial=images, unit="img", unit_scale=True,
               disable=rank != 0)
    model.train()
    try:
        while images < args.train_images:
            # One step; its randomness is a function of (seed, step, rank): resume is exact
            torch.manual_seed(args.seed * 1_000_003 + step * 1_009 + rank)
            idx = batch_indices(images + rank * local_bs, local_bs, data.n, args.seed)
            for group in opt.param_groups:
                group["lr"] = args.lr * min(1.0, (images + 1) / max(args.warmup_images, 1))
            batch = data.batch(idx)
            loss, level, extra = train_step(net, model, ema, opt, diffusion, batch, step, args)
            sums.add(loss, level, extra)
            step, images = step + 1, images + args.batch_size
            bar.update(args.batch_size)
            if not is_gate(step, images, args):
                continue  # the hot path: no host sync, no collective

            # Events, at a gate every rank computes alike: ranks agree on signals and the clock
            due = time.time() - clock.save > 60 * args.ckpt_minutes
            halt, due = agree([bool(stop), due], world, device)
            at = lambda every: crossed(images, args.batch_size, every)
            done = images >= args.train_images
            log_now = at(args.log_every) or done
            keep_now = at(args.keep_every) or (done and args.keep_every > 0)  # the final one too
            save_now = at(args.ckpt_every) or done or halt or due or keep_now
            if log_now or save_now:  # a non-finite loss or weight stops before saving
                rec = sums.read(world)
                check_finite(rec, model if save_now else None, ckpt_path, step, images, log)
            if log_now:
                log_metrics(rec, step, images, opt, clock, out, log, bar, extra)
                sums = LossSums()
            if save_now:  # one self-describing file; a kept snapshot: what evaluation reads
                state = {"script": Path(__file__).name, "args": vars(args),
                         "model": model.state_dict(), "ema": ema.state_dict(),
                         "opt": opt.state_dict(), "step": step, "images": images, **data.state}
                if rank == 0:
                    atomic_save(state, ckpt_path)
                    if keep_now:
                        atomic_save({k: v for k, v in state.items() if k not in ("model", "opt")},
                                    ckpt_path.with_name(f"ckpt-{images:09d}.pt"))
                clock.save = time.time()
            if rank == 0 and args.sample_every and (at(args.sample_every) or done):
                x = data.to_pixels(sample_preview(ema, diffusion, args, device))  # in [-1, 1]
                save_grid(((x.float().clamp(-1, 1) + 1) * 127.5).round().byte(),
                          out / f"grid-{images:09d}.png")
            if halt:
                log(f"stopped by signal {stop[0] if stop else 'on another rank'} at step {step}; "
                    f"checkpoint saved, rerun the same command to resume")
                break
    finally:
        bar.close()
        for s, h in handlers.items():
            signal.signal(s, h)
    if world > 1:
        dist.destroy_process_group()
    return model, ema

def crossed(images, batch, every):
    """Whether the step that brought the count to `images` passed a multiple of `every`."""
    return bool(every) and images // every > (images - batch) // every

def is_gate(step, images, args):
    """Where ranks meet, from (step, images) alone: every 10th step, the last, each event's."""
    events = (args.log_every, args.ckpt_every, args.keep_every, args.sample_every)
    return step % 10 == 0 or images >= args.train_images or any(
        crossed(images, args.batch_size, every) for every in events)

def agree(flags, world, device):
    """The flags, true on every rank if true on any (a collective: call at gates only)."""
    if world > 1:
        t = torch.tensor(flags, device=device, dtype=torch.float32)
        dist.all_reduce(t)
        flags = (t > 0).tolist()
    return flags

def check_finite(rec, model, ckpt_path, step, images, log):
    """Stop every rank if a loss (or, given a model, a weight) is not finite, before a save."""
    terms = [v for k, v in rec.items() if not k.startswith("loss_bin")]
    bad = None if all(map(math.isfinite, terms)) else f"loss is {rec['loss']}"
    if model is not None and not all(p.isfinite().all() for p in model.parameters()):
        bad = bad or "the weights are not finite"
    if bad:
        kept = (f"the last good checkpoint {ckpt_path} is kept" if ckpt_path.exists()
                else "no checkpoint was written")
        log.fail(f"{bad} at step {step} ({images:,} images); {kept}; lower --lr or check the data")

def log_metrics(rec, step, images, opt, clock, out, log, bar, extra):
    """The losses (overall, by noise level, extra terms) and img/s: log.txt, metrics.jsonl."""
    now = time.time()
    rec = {"step": step, "images": images, **rec, "lr": opt.param_groups[0]["lr"],
           "img_per_s": (images - clock.images) / (now - clock.log)}
    clock.log, clock.images = now, images
    if log.rank == 0:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        bar.set_postfix(loss=f"{rec['loss']:.4f}")
    bins = " ".join("-" if rec[f"loss_bin{i}"] is None else f"{rec[f'loss_bin{i}']:.3f}"
                    for i in range(LossSums.BINS))
    more = "".join(f" {k} {rec[k]:.4f}" for k in extra)
    log(f"step {step} images {images:,} loss {rec['loss']:.4f} (by noise level "
        f"{bins}){more} {rec['img_per_s']:.0f} img/s")

def snapshot_plan(args, ema):
    """The line announcing the snapshots the run keeps and the disk they take (EMA weights)."""
    if not args.keep_every:
        return "snapshots: none kept (--keep-every 0)"
    steps, every = -(-args.train_images // args.batch_size), args.keep_every
    final = steps * args.batch_size  # the image count after the last step
    count = steps if every <= args.batch_size else \
        final // every + (not crossed(final, args.batch_size, every))
    size = sum(v.nbytes for v in ema.state_dict().values())
    return (f"snapshots: {count} kept (every {every:,} images and the final weights), {count} x "
            f"{size / 1e6:.3g} MB = {count * size / 1e9:.3g} GB in {args.out}")

# ------------------------------------------------------------------------------------------------
# Run plumbing: flags, processes, precision, batch order, EMA, checkpoints, logs

def add_training_args(p):
    """The command line of the training loop: the same in every trainer."""
    def count(text):  # an image count: a negative one is a one-line error
        if int(text) < 0:
            raise argparse.ArgumentTypeError(f"{text} is negative: give a count of images, >= 0")
        return int(text)
    p.add_argument("--data-path", default="data", help="folder holding the dataset")
    p.add_argument("--out", help="run directory (default: runs/<script>-<dataset>-<config>)")
    p.add_argument("--no-flip", dest="flip", action="store_false",
                   help="no horizontal flips, for classes that are not mirror-symmetric (digits)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--train-images", type=count, help="training length (default: the paper's)")
    p.add_argument("--log-every", type=count, help="images between log lines (50k, or a tenth)")
    p.add_argument("--ckpt-every", type=count, default=10**6, help="images between checkpoints")
    p.add_argument("--keep-every", type=count, help="images between kept snapshots "
                   "ckpt-<images>.pt, the final one too (default: App. A's, Table 6; 0: none)")
    p.add_argument("--ckpt-minutes", type=float, default=10,
                   help="also checkpoint after this many minutes: what a SIGKILL may cost")
    p.add_argument("--sample-every", type=count, default=5_000_000,
                   help="images between preview grids of the EMA model (0: no previews)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="bf16 autocast (auto: on CUDA) or fp32; weights stay fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="image decoding processes per rank")
    p.add_argument("--dry-run", action="store_true", help="print the config and parameter counts")
    p.add_argument("--bench", type=int, nargs="?", const=20, default=0, metavar="STEPS",
                   help="time STEPS training steps on a synthetic batch, self-cond on and off")

def setup_distributed(timeout=None):
    """(rank, world, device) of a process torchrun started (plain python: a world of one)."""
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                **({} if timeout is None else {"timeout": timeout}))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank())  # LOCAL_RANK, not RANK: multi-node safe
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return rank, world, device

def local_rank():
    """This process's index on its node: torchrun's LOCAL_RANK, else the global rank."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    return int(os.environ.get("LOCAL_RANK", rank))

def raise_on_any(error):
    """Collective: when any rank has an error message, every rank exits with the first one."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise SystemExit(error)

def fetch_once(path, fetch, failed):
    """Collective: one process per node runs fetch(path) unless it exists; failing ends all."""
    error = None
    if local_rank() == 0 and not path.exists():
        try:
            fetch(path)
        except (Exception, SystemExit) as e:  # network, disk, checksum: one line for all ranks
            if not path.exists():  # else another node's copy landed first (rename failed)
                error = f"{failed} ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})"
    raise_on_any(error)  # also the barrier: nobody reads `path` before it is in place
    return path

def use_bf16(device, precision):
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")

def autocast(device, precision):
    return torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(device, precision))

def memory_format(device):
    # channels_last lets cuDNN use its NHWC tensor-core convolutions; on CPU it gains little
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format

@functools.lru_cache(maxsize=2)  # a batch spans at most two epochs
def epoch_order(seed, epoch, size):
    """The dataset's order in an epoch, seeded by (seed, epoch); cached: 15 ms on ImageNet-1k."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))

def batch_indices(start, n, size, seed):
    """Dataset indices of stream positions start .. start+n: a function of the seed alone."""
    idx, pos = [], start
    while pos < start + n:
        epoch, off = divmod(pos, size)
        take = min(size - off, start + n - pos)
        idx.append(epoch_order(seed, epoch, size)[off:off + take])
        pos += take
    return torch.cat(idx)

@torch.no_grad()
def update_ema(ema, model, step, rate):
    decay = min(rate, 1 - (1 + step) ** (-2 / 3))  # DDAE's warm-up: an early EMA tracks the model
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)

def count_params(module):
    return sum(p.numel() for p in module.parameters()) if module is not None else 0

def save_grid(images, path, cols=8):
    """uint8 images (N, 3, H, W) -> one PNG, `cols` per row: previews and sample.py's grids."""
    x = torch.as_tensor(images).cpu()
    n, c, h, w = x.shape
    cols = min(cols, n)
    grid = torch.zeros(c, math.ceil(n / cols) * h, cols * w, dtype=torch.uint8)
    for i, im in enumerate(x):
        grid[:, i // cols * h:(i // cols + 1) * h, i % cols * w:(i % cols + 1) * w] = im
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)

def atomic_save(obj, path, save=None):
    """save(obj, file) to a temporary name, then rename: a kill or full disk keeps the old file."""
    path, tmp = Path(path), Path(f"{path}.tmp")
    try:
        with open(tmp, "wb") as f:
            (save or torch.save)(obj, f)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if not isinstance(e, (OSError, RuntimeError)):  # a kill or Ctrl-C: not ours to report
            raise
        kept = f"the previous {path} is intact" if path.exists() else "nothing was written"
        raise SystemExit(f"cannot write {path} ({str(e).splitlines()[0]}); {kept}") from None

def check_out_dir(out):
    """One line, before anything is written, if folder `out` can be neither found nor created."""
    p = Path(out).absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        return f"--out {out}: {p} is a file, not a folder; choose another --out"
    try:
        tempfile.TemporaryFile(dir=p).close()
    except OSError as e:
        return f"--out {out}: cannot write in {p} ({e.strerror}); choose another --out"
    return None

def resume(path, args, log, model, ema, opt):
    """(step, images) of <out>/ckpt.pt, loaded into model, EMA and optimizer if this run's."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}); "
                         f"restore it from a copy or delete it to start afresh")
    if ckpt.get("script") != Path(__file__).name:
        raise SystemExit(f"{path} was written by {ckpt.get('script')}, not "
                         f"{Path(__file__).name}: use another --out")
    old = ckpt["args"]
    arch = [f"{k}: {old.get(k)} -> {getattr(args, k)}" for k in ARCH_KEYS
            if old.get(k) != getattr(args, k)]
    if arch:
        raise SystemExit(f"{path} has another architecture ({', '.join(arch)}); use another --out")
    changed = [f"{k} {old[k]} -> {v}" for k, v in vars(args).items() if old.get(k, v) != v]
    if changed:
        log("warning: resuming with changed settings: " + ", ".join(changed))
    for module, key in ((model, "model"), (ema, "ema"), (opt, "opt")):
        module.load_state_dict(ckpt[key])
    log(f"resumed from {path} at step {ckpt['step']} ({ckpt['images']:,} images)")
    return ckpt["step"], ckpt["images"]

class Log:
    """Rank 0's log: printed at once, appended to <out>/log.txt once the run folder exists."""
    def __init__(self, out, rank):
        self.out, self.rank, self.held = Path(out), rank, []

    def __call__(self, msg, echo=True):
        if self.rank != 0:
            return
        if echo:
            tqdm.write(msg)
        self.held.append(msg)
        if self.out.is_dir():
            with open(self.out / "log.txt", "a") as f:
                f.write("".join(line + "\n" for line in self.held))
            self.held = []

    def fail(self, msg):
        """Stop every rank with one line, which log.txt keeps too."""
        self(msg, echo=False)
        raise SystemExit(msg)

class LossSums:
    """Each rank's loss sums since the last log line: overall, per noise-level bin, per term."""
    BINS = 5  # equal-width bins of the noise level in [0, 1]

    def __init__(self):
        self.sums = {}

    def add(self, loss, level, extra):  # (N,), (N,), {name: scalar}
        # index_add, not bincount: on CUDA bincount reads its input's max back to the host
        b = (level * self.BINS).long().clamp(max=self.BINS - 1)
        loss, zeros = loss.float(), torch.zeros(self.BINS, device=loss.device)  # sums in fp32
        new = {"loss": loss.sum()[None], "bin_count": zeros.index_add(0, b, torch.ones_like(loss)),
               "bin_loss": zeros.index_add(0, b, loss),
               **{k: v.float()[None] * len(loss) for k, v in extra.items()}}
        self.sums = {k: self.sums[k] + v if k in self.sums else v for k, v in new.items()}

    def read(self, world):
        """{name: mean over all ranks} with loss_bin0.. (None for an empty bin); a collective."""
        flat = torch.cat(list(self.sums.values()))
        if world > 1:
            dist.all_reduce(flat)
        s = dict(zip(self.sums, flat.cpu().split([len(v) for v in self.sums.values()])))
        counts = s.pop("bin_count")
        count = counts.sum().item()
        bins = zip(counts.tolist(), s.pop("bin_loss").tolist())
        out = {k: v.item() / count for k, v in s.items()}  # the loss and each extra term
        out.update({f"loss_bin{i}": total / n if n else None for i, (n, total) in enumerate(bins)})
        return out

# ------------------------------------------------------------------------------------------------
# Data: the shapes toy (a pixel DiT's data) and the class folders the latent cache encodes

SHAPES = {  # the toy's variants: ranges of background and dot colour, dot radius, constellation
    # size (x res); a range (v, v) fixes the value but keeps its draws, so labels and poses agree
    "shapes": ((0, 0.45), (0.55, 1), (0.07, 0.09), (0.22, 0.30)),
    "shapes-fixed": ((0.225, 0.225), (0.775, 0.775), (0.08, 0.08), (0.26, 0.26)),  # no nuisances
}
DATASETS = dict.fromkeys(SHAPES, (10, 32))  # pixel datasets known by name: classes, resolution
IMG_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # the image files of class folders

@functools.lru_cache(maxsize=4)
def make_shapes(n, seed, res=32, name="shapes"):
    """10 classes told apart by geometry alone: four dots whose constellation is the class, under
    random pose and colours. Returns uint8 images (n, 3, res, res), labels (n,), uint8 masks
    (n, res, res) (1 + label on a dot, else 0), nuisance draws (n, 8): colours, size, radius."""
    bg_range, fg_range, radius_range, size_range = SHAPES[name]
    # four dots per class, in units of the dot spacing: square, line, T, L, diamond, Y (a centre
    # and three arms), arc, zigzag, trapezoid, triangle with a tail
    constellations = np.array([
        [(-1, -1), (1, -1), (1, 1), (-1, 1)], [(-3, 0), (-1, 0), (1, 0), (3, 0)],
        [(-2, 1), (0, 1), (2, 1), (0, -1.2)], [(-0.8, 2), (-0.8, 0), (-0.8, -2), (1.2, -2)],
        [(0, 1.9), (1.1, 0), (0, -1.9), (-1.1, 0)], [(0, 0), (0, 2), (1.73, -1), (-1.73, -1)],
        [(-2.2, -0.8), (-1, 0.9), (1, 0.9), (2.2, -0.8)],
        [(-3, -0.6), (-1, 0.6), (1, -0.6), (3, 0.6)], [(-2.2, -1), (2.2, -1), (-1, 1), (1, 1)],
        [(-1.2, 0), (0.8, 0), (-0.2, 1.73), (2.4, -1.2)],
    ])
    p = constellations - constellations.mean(1, keepdims=True)
    p = p / np.sqrt((p**2).sum(2).mean(1))[:, None, None]  # the same spread in every class
    g = np.random.default_rng(seed)
    y = g.permutation(np.arange(n) % 10)
    p = p[y]  # (n, 4, 2)
    p[g.random(n) < 0.5, :, 0] *= -1  # mirrored: a flipped L is still an L
    a = g.uniform(0, 2 * np.pi, n)
    rot = np.stack([np.cos(a), -np.sin(a), np.sin(a), np.cos(a)], 1).reshape(n, 2, 2)
    size = g.uniform(*size_range, n) * res
    centre = g.uniform(0.42, 0.58, (n, 1, 2)) * res
    p = np.einsum("nij,nkj->nki", rot, p) * size[:, None, None] + centre  # (n, 4, 2) pixels
    radius = g.uniform(*radius_range, (n, 1, 1)) * res
    yy, xx = np.mgrid[:res, :res].astype(np.float32) + 0.5
    d = np.min([np.hypot(xx - p[:, k, 0, None, None], yy - p[:, k, 1, None, None])
                for k in range(4)], axis=0)  # (n, res, res): distance to the nearest dot centre
    alpha = np.clip(0.5 - (d - radius), 0, 1)[:, None]  # (n, 1, res, res) anti-aliased coverage
    bg, fg = g.uniform(*bg_range, (n, 3, 1, 1)), g.uniform(*fg_range, (n, 3, 1, 1))
    img = np.round((bg * (1 - alpha) + fg * alpha) * 255).astype(np.uint8)
    masks = np.where(alpha[:, 0] >= 0.5, y[:, None, None] + 1, 0).astype(np.uint8)
    nuisance = np.concatenate([bg[:, :, 0, 0], fg[:, :, 0, 0], size[:, None], radius[:, 0]], 1)
    return (torch.from_numpy(img), torch.from_numpy(y.astype(np.int64)), torch.from_numpy(masks),
            nuisance)

def shapes_split(args, split):
    """A toy split (10k train, 2k test): make_shapes' images, labels, masks and nuisance draws."""
    n, seed = (10_000, 0) if split == "train" else (2_000, 1)
    return make_shapes(n, seed, args.resolution, args.dataset)

def center_crop(img, res, labels=False):
    """ADM's centre crop: box-halve while >= 2x, bicubic, crop (labels=True: nearest, no blend)."""
    down, up = (Image.NEAREST, Image.NEAREST) if labels else (Image.BOX, Image.BICUBIC)
    while min(img.size) >= 2 * res:
        img = img.resize(tuple(s // 2 for s in img.size), down)
    scale = res / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), up)
    x, y = (img.size[0] - res) // 2, (img.size[1] - res) // 2
    return img.crop((x, y, x + res, y + res))

def image_files(args, split):
    """[(path, label)] of a class-folder split ('train' or 'test'): <root>/<class>/*, or
    <root>/train/<class>/* and <root>/val/<class>/* (ImageNet's layout)."""
    root = Path(args.data_path)
    sub = {"train": "train", "test": "val"}[split]
    if (root / sub).is_dir():
        root = root / sub
    elif split == "test":
        raise SystemExit(f"dataset {args.dataset!r} has no test split: "
                         f"expected class folders under {root / sub}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).rglob("*"))
             if f.suffix.lower() in IMG_EXT]
    if not files:
        raise SystemExit(f"no images found for dataset {args.dataset!r} under {root}: point "
                         f"--data-path at class folders (ImageNet: train/<wnid>/*.JPEG, val/...)")
    return files

class ImageFiles(torch.utils.data.Dataset):
    """(index, ADM-cropped uint8 (3, res, res), "" or why it could not be read) of each file."""
    def __init__(self, files, res):
        self.files, self.res = files, res

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = self.files[i][0]
        try:
            with Image.open(path) as im:
                img = np.asarray(center_crop(im.convert("RGB"), self.res)).transpose(2, 0, 1)
            return i, torch.from_numpy(img.copy()), ""
        except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for a damaged file
            return i, torch.zeros(3, self.res, self.res, dtype=torch.uint8), f"{path} ({e})"

def load_pixels(args, split="train"):
    """(uint8 images (N, 3, H, W), labels (N,)) of the shapes toy: other data are latents here."""
    if args.dataset not in SHAPES:
        raise SystemExit(f"train_dit.py holds the pixels of the shapes toy only, not of "
                         f"{args.dataset!r}: encode those with latent_cache")
    return shapes_split(args, split)[:2]

# ------------------------------------------------------------------------------------------------
# Benchmark: --bench times the real training step

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)

def timed(step, n, device):
    """Seconds per call of step(i), i = 0 .. n - 1, the device's queue drained before and after."""
    sync(device)
    t = time.perf_counter()
    for i in range(n):
        step(i)
    sync(device)
    return (time.perf_counter() - t) / n

def matmul_tflops(device, dtype):
    """Dense matmul TFLOP/s in the training dtype, measured here and now: MFU's denominator."""
    n, reps = (8192, 20) if device.type == "cuda" else (1024, 8)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up
    return 2 * n**3 / timed(lambda i: a @ b, reps, device) / 1e12

def benchmark(args, rounds=5):
    """--bench: speed, memory, FLOPs, MFU of train_step, self-cond on/off in interleaved rounds."""
    import resource
    from torch.utils.flop_counter import FlopCounterMode
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dtype = torch.bfloat16 if use_bf16(device, args.precision) else torch.float32

    def setup(a):  # the model and one step, built as training builds them
        torch.manual_seed(a.seed)
        model = build_model(a).to(device, memory_format=memory_format(device))
        ema = copy.deepcopy(model).requires_grad_(False).eval()
        opt = build_optimizer(model, a)
        diffusion, batch = build_diffusion(a, model), fake_batch(a, device)
        net = torch.compile(model) if a.compile else model
        return model, lambda i, m=net: train_step(m, model, ema, opt, diffusion, batch, i, a)

    model, step = setup(args)
    with FlopCounterMode(display=False) as counter:  # one whole step, uncompiled
        step(0, model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed(step, 3, device)  # warm-up (and compilation)
    mem = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # CPU: process peak
    other = setup(argparse.Namespace(**{**vars(args), "self_cond": not args.self_cond}))[1]
    timed(other, 3, device)
    rounds, n = min(rounds, args.bench), max(args.bench // rounds, 1)
    rows = []  # (s/step, s/step toggled, matmul TFLOP/s): the peak is the higher of before, after
    for _ in range(rounds):
        peak = matmul_tflops(device, dtype)
        rows.append((timed(step, n, device), timed(other, n, device),
                     max(peak, matmul_tflops(device, dtype))))
    flops = counter.get_total_flops() / args.batch_size
    sec = statistics.median(r[0] for r in rows)
    on_off = [(r[0] / r[1]) if args.self_cond else (r[1] / r[0]) for r in rows]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu x{torch.get_num_threads()} threads"
    rec = {"script": Path(__file__).name, "net": args.net, "self_cond": args.self_cond,
           "batch": args.batch_size, "device": name, "dtype": str(dtype)[6:],
           "compile": args.compile, "img_per_s": args.batch_size / sec, "ms_per_step": 1e3 * sec,
           "peak_mem_gib": mem / 2**30, "gflop_per_img": flops / 1e9,
           "tflops": flops * args.batch_size / sec / 1e12,
           "matmul_peak_tflops": statistics.median(r[2] for r in rows),
           "mfu": statistics.median(flops * args.batch_size / r[0] / r[2] / 1e12 for r in rows),
           "self_cond_overhead": statistics.median(on_off)}
    print(f"{rec['script']} --net {args.net} batch {args.batch_size} on {name} ({rec['dtype']}): "
          f"{rec['img_per_s']:.1f} img/s, {rec['ms_per_step']:.1f} ms/step, "
          f"peak {rec['peak_mem_gib']:.2f} GiB, {rec['gflop_per_img']:.2f} GFLOP/img, "
          f"MFU {100 * rec['mfu']:.1f}% of {rec['matmul_peak_tflops']:.2f} TFLOP/s (matmul)")
    print(f"self-conditioning on/off step time x{rec['self_cond_overhead']:.4f} "
          f"(median of {rounds} interleaved rounds of {n} steps)")
    print(json.dumps(rec))
    return rec

if __name__ == "__main__":
    main()
