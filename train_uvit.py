"""DDAE++ pixel-space UViT diffusion: U-ViT-S (every input a token, long skips) trained as DDPM,
optionally self-conditioned by a learnable [CLS] token that attends to the image tokens and they
to it, so its pooled semantics condition the decoding (Sec. 4.1, Fig. 2), with non-leaky
augmentation and contrastive self-distillation.

    python train_uvit.py --dataset shapes --net tiny                         # CPU quickstart
    torchrun --nproc_per_node=4 train_uvit.py --dataset cifar10 --self-cond  # Table 2
    torchrun --nproc_per_node=4 train_uvit.py --dataset cifar100 --self-cond --aug --cl  # Table 3
    python train_uvit.py --self-cond --dry-run                  # config + parameter counts
"""
import argparse
import copy
import functools
import hashlib
import json
import math
import os
import pickle
import signal
import statistics
import sys
import tarfile
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
)

# ------------------------------------------------------------------------------------------------
# Self-conditioning (Sec. 4.1, Fig. 2): a [CLS] token with no loss of its own; through attention
# it gathers global semantics from the image tokens and conditions them in return, so the net picks
# its own "designated layer": UViT.cls_token, the mask below, the feature "cls" (UViT.forward).

def attention_mask(n_tok, self_cond, aug):
    """(S, S) bool, True = may attend, or None (flash attention): [CLS] and the augment label must
    not see each other (Fig. 2b: it hurts); both still see, and are seen by, the other tokens."""
    if not (self_cond and aug):
        return None
    mask = torch.ones(n_tok, n_tok, dtype=torch.bool)
    mask[1, 2] = mask[2, 1] = False  # token 1 is the augment label, token 2 the [CLS]
    return mask

# ------------------------------------------------------------------------------------------------
# Model: U-ViT (time, conditions and patches are tokens; out-blocks fuse long skips)

def timestep_embedding(t, dim, max_period=10_000):
    """Sinusoid of a float tensor (N,): (N, dim), cos half first (DiT's and U-ViT's layout)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs  # (N, half)
    return torch.cat([angles.cos(), angles.sin()], dim=1)

class Attention(nn.Module):
    """Multi-head self-attention through SDPA (flash kernels whenever no mask is needed)."""
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)  # qkv_bias=False, as U-ViT
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        n, s, d = x.shape
        qkv = self.qkv(x).view(n, s, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (N, H, S, Dh) each
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask (S, S): may attend
        return self.proj(x.transpose(1, 2).reshape(n, s, d))

class Block(nn.Module):
    """Pre-LN transformer block; an out-block first fuses its long skip by Linear(2D, D)."""
    def __init__(self, dim, heads, mlp_ratio, skip=False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = mlp_ratio * dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x, skip=None, mask=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))

class UViT(nn.Module):
    """U-ViT denoiser; tokens [time, (augment label), ([CLS]), patches]; out-blocks out_1 .. out_N
    (image tokens, pooled) and, with the [CLS] token, cls_1 .. cls_N (its output there)."""
    def __init__(self, patch, dim, depth, heads, mlp_ratio, resolution=32, self_cond=False,
                 aug=False, sc_layer="out_2"):
        super().__init__()
        self.patch, self.dim = patch, dim
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        # The augment label is a token of its own; bias-free (as EDM's label embedding), so the
        # zero label of sampling and probing leaves only its position embedding.
        self.aug_embed = nn.Linear(AUG_DIM, dim, bias=False) if aug else None
        # Self-conditioning: one learnable [CLS] token with its own position row (+2 x dim).
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if self_cond else None
        self.extras = 1 + aug + self_cond  # tokens in front of the patches; [CLS] is the last
        n_tok = self.extras + (resolution // patch) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tok, dim))  # learnable, a row per token
        self.in_blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth // 2)])
        self.mid_block = Block(dim, heads, mlp_ratio)
        self.out_blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, skip=True)
                                         for _ in range(depth // 2)])
        self.norm = nn.LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, patch * patch * 3)
        self.final_layer = nn.Conv2d(3, 3, 3, padding=1)  # U-ViT's conv smooths patch seams
        self.feature_layers = [f"out_{i + 1}" for i in range(depth // 2)]
        self.cls_layers = [f"cls_{i + 1}" for i in range(depth // 2)] if self_cond else []
        self.sc_layer = sc_layer  # the feature "cls" is the [CLS] output of this out-block
        self.register_buffer("attn_mask", attention_mask(n_tok, self_cond, aug), persistent=False)
        self.initialize_weights()

    def initialize_weights(self):
        """U-ViT's init: trunc-normal(0.02) linears and embeddings, zero biases; convs: torch's."""
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
            nn.init.trunc_normal_(self.cls_token, std=0.02)  # a small random start, as a position

    def forward(self, x, t, aug=None, feats=(), pool=True):
        """x (N, 3, H, W), t (N,) = DDPM step / T, aug (N, 9) or None -> eps (N, 3, H, W), {name:
        (N, dim) fp32} of feats (pool=False: an out-block's image tokens, grid (N, dim, h, w))."""
        want = {f: f"cls_{self.sc_layer[4:]}" if f == "cls" else f for f in feats}
        unknown = set(want.values()) - set(self.feature_layers + self.cls_layers)
        if unknown:
            raise ValueError(f"unknown UViT feature {sorted(unknown)}: choose from "
                             f"{self.feature_layers + self.cls_layers}")
        n, _, hh, ww = x.shape
        h = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, L, D)
        # U-ViT's discrete-time models take the step in 1..1000 as is; t = step / T, T = 1000.
        tokens = [timestep_embedding(1000 * t, self.dim)[:, None]]  # raw sinusoid, no MLP
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
        for i, blk in enumerate(self.out_blocks, 1):
            h = blk(h, skips.pop(), mask=self.attn_mask)
            for name, layer in want.items():
                if layer == f"out_{i}":  # image tokens only
                    tok = h[:, self.extras:].float()  # (N, L, D)
                    grid = tok.transpose(1, 2).reshape(n, -1, hh // self.patch, ww // self.patch)
                    pooled[name] = tok.mean(1) if pool else grid
                elif layer == f"cls_{i}":
                    pooled[name] = h[:, self.extras - 1].float()
        h = self.decoder_pred(self.norm(h))[:, self.extras:]  # (N, L, p*p*3): patches only
        p = self.patch
        h = h.view(n, hh // p, ww // p, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(n, 3, hh, ww)
        return self.final_layer(h), pooled

def build_model(args):
    model = UViT(**NETS[args.net], resolution=args.resolution, self_cond=args.self_cond,
                 aug=args.aug, sc_layer=args.sc_layer)
    if args.cl:  # in the model: optimizer, DDP, EMA (the teacher's head) and checkpoint cover it
        model.cl_head = ProjHead(model.dim, mode=args.cl_head)
    return model

# ------------------------------------------------------------------------------------------------
# Diffusion: DDPM (Table 8; the paper found EDM and RF unstable with UViT). Paper convention: t=0
# is data, t=T is noise; data in [-1, 1]. sample() draws previews (sample.py has the paper's).

class DDPM:
    """Linear betas 1e-4..0.02, T=1000, eps-prediction, plain MSE; t in 1..T, the net sees t/T."""
    kind, T, t_min = "DDPM", 1000, 1

    def __init__(self):
        betas = torch.cat([torch.zeros(1), torch.linspace(1e-4, 0.02, self.T)]).double()
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)  # (T+1,), index 0 = clean data

    def _ab(self, t, x):  # alpha-bar of each t (N,), shaped to broadcast against x
        if self.alphas_cumprod.device != x.device:  # moved once: a copy each step would sync
            self.alphas_cumprod = self.alphas_cumprod.to(x.device)
        return self.alphas_cumprod[t].to(x.dtype).view(-1, 1, 1, 1)

    def add_noise(self, x0, t, noise):
        ab = self._ab(t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def level(self, t):  # in [0, 1]: for the loss log and the contrastive head
        return t.float() / self.T

    def pred(self, model, x, t, aug=None, feats=(), pool=True):
        """The noise eps (N, C, H, W) and the features of feats (pooled, or maps)."""
        return model(x, self.level(t), aug, feats, pool)

    def loss(self, model, x0, aug=None, feats=()):
        t = torch.randint(1, self.T + 1, (len(x0),), device=x0.device)
        noise = torch.randn_like(x0)
        eps, pooled = self.pred(model, self.add_noise(x0, t, noise), t, aug, feats)
        return (eps.float() - noise).square().mean(dim=(1, 2, 3)), self.level(t), pooled

    @torch.no_grad()
    def sample(self, model, noise, steps=50):
        """DDIM (eta 0) from t=T to clean; clips x0 and re-derives eps from it, as DDAE does."""
        ts, x = torch.linspace(self.T, 0, steps + 1).round().long().tolist(), noise
        for t, s in zip(ts[:-1], ts[1:]):
            tt = torch.full((len(x),), t, device=x.device)
            eps = self.pred(model, x, tt)[0].float()
            ab_t, ab_s = self.alphas_cumprod[t].item(), self.alphas_cumprod[s].item()
            x0 = ((x - (1 - ab_t) ** 0.5 * eps) / ab_t**0.5).clamp(-1, 1)
            eps = (x - ab_t**0.5 * x0) / (1 - ab_t) ** 0.5
            x = ab_s**0.5 * x0 + (1 - ab_s) ** 0.5 * eps
        return x

def build_diffusion(args, model=None):
    return DDPM()

# ------------------------------------------------------------------------------------------------
# Non-leaky augmentation (Sec. 4.2): EDM's AugmentPipe, CIFAR setting; the net sees the warp

# Low-pass decomposition filter of the sym6 wavelet (12 taps, sum sqrt(2)). It is orthogonal, so
# upsampling and downsampling with it is the identity: only the warp in between moves pixels.
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)

def _affine(a, b, c, d, tx, ty):
    """Batch of 3x3 matrices [[a, b, tx], [c, d, ty], [0, 0, 1]] from (N,) tensors."""
    z = torch.zeros_like(a)
    return torch.stack([a, b, tx, c, d, ty, z, z, z + 1], dim=-1).view(-1, 3, 3)

def _rotate(theta):
    c, s, z = theta.cos(), theta.sin(), 0 * theta
    return _affine(c, -s, s, c, z, z)

def _scale(sx, sy):
    z = 0 * sx
    return _affine(sx, z, z, sy, z, z)

def _sym6_operator(n, up, device):
    """Sym6 2x up- (n, 2n) or downsampling (n, n // 2) along one axis as a matrix: x @ M."""
    # a small matmul beats a depthwise (transposed) convolution ~10x on CPU, free on GPU
    eye = torch.eye(n, device=device)[:, None]
    k = torch.tensor(SYM6, device=device).view(1, 1, -1)
    conv = F.conv_transpose1d if up else F.conv1d
    return conv(eye, k, stride=2, padding=len(SYM6) // 2 - 1)[:, 0]

def _apply_matrix(x, G):
    """Resample x (N, C, H, W) so that output pixel p reads input pixel G p (pixels, centred)."""
    N, C, H, W = x.shape
    pad = len(SYM6) // 4  # canvas margin (pixels) kept around the output until decimation
    one = torch.ones(N, device=x.device)
    # Reflect-pad just enough to cover what the warped canvas (plus filter support) reads.
    cx, cy = (W - 1) / 2, (H - 1) / 2
    corners = torch.tensor([[-cx, cx, cx, -cx], [-cy, -cy, cy, cy], [1.0, 1, 1, 1]],
                           device=x.device)
    reach = (G @ corners)[:, :2]  # (N, 2, 4): where the output corners land in the input
    reach = torch.stack([-reach, reach], dim=1).amax(dim=(0, 3)).flatten()  # left top right bottom
    lo = torch.tensor([2 * pad - cx, 2 * pad - cy] * 2, device=x.device)
    hi = torch.tensor([W - 1.0, H - 1.0] * 2, device=x.device)  # reflect at most the image
    ml, mt, mr, mb = (reach + lo).clamp(min=0).minimum(hi).ceil().int().tolist()
    x = F.pad(x, [ml, mr, mt, mb], mode="reflect")
    G = _affine(one, 0 * one, 0 * one, one, (ml - mr) / 2 * one, (mt - mb) / 2 * one) @ G
    # 2x oversampling keeps bilinear interpolation from blurring; u = 2p - 0.5 maps the pixels.
    up_h, up_w = (_sym6_operator(n, True, x.device) for n in x.shape[2:])
    x = up_h.t() @ x @ up_w
    up = _affine(2 * one, 0 * one, 0 * one, 2 * one, -0.5 * one, -0.5 * one)
    G = up @ G @ torch.linalg.inv(up)
    # affine_grid works in [-1, 1] (align_corners=False: pixel i -> (2i + 1) / size - 1).
    Ho, Wo = 2 * (H + 2 * pad), 2 * (W + 2 * pad)
    G = _scale(2 / x.shape[3] * one, 2 / x.shape[2] * one) @ G @ _scale(Wo / 2 * one, Ho / 2 * one)
    grid = F.affine_grid(G[:, :2].to(x.dtype), [N, C, Ho, Wo], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    down_h, down_w = _sym6_operator(Ho, False, x.device), _sym6_operator(Wo, False, x.device)
    return down_h[:, pad:-pad].t() @ x @ down_w[:, pad:-pad]  # decimate, crop the margin

class AugmentPipe(nn.Module):
    """EDM's geometric augmentation (CIFAR setting), returning the 9-d label the net is given.
    Label slots in EDM's order (w ~ N(0, 1); output pixel p reads the input at G p, centred):
      0 xflip (0/1)   1 yflip (0/1)   2 scale w: G = 2^(-scale_std w)
      3-4 rotation cos(a) - 1, sin(a), a ~ U[-pi, pi): G = R(a)
      5-6 aniso w cos(r), w sin(r): G = R(-r) diag(2^(-aniso_std w), 2^(aniso_std w)) R(r)
          (r = 0 half of the time)
      7-8 translation wx, wy: G p = p - translate_std (wx W, wy H)
    All zero = not augmented (sampling, probing). The x-flip is a plain 50% flip (EDM: xflip=1e8);
    each other op is on per image with probability p (a yflip then flips half); randomness comes
    only from `generator`."""
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
        # Draw everything up front in a fixed layout: enabling one op never shifts another's draws.
        u = torch.rand(N, 10, generator=generator, device=dev).to(x.device)
        n = torch.randn(N, 4, generator=generator, device=dev).to(x.device)
        on = lambda col, mult: (u[:, col] < mult * self.p).float()  # per-image gate of one op
        pi, one = math.pi, torch.ones(N, device=x.device)
        xf = (u[:, 0] < 0.5).float() * float(bool(self.xflip))
        yf = (u[:, 1] < 0.5).float() * on(2, self.yflip)
        s = n[:, 0] * on(3, self.scale)
        a = (2 * u[:, 4] - 1) * pi * on(5, self.rotate)
        w = n[:, 1] * on(7, self.aniso)
        r = (2 * u[:, 6] - 1) * pi * (u[:, 8] < 0.5).float()
        t = n[:, 2:4] * on(9, self.translate)[:, None]
        x = torch.where(xf.view(N, 1, 1, 1) > 0, x.flip(3), x)
        x = torch.where(yf.view(N, 1, 1, 1) > 0, x.flip(2), x)
        labels = torch.stack([xf, yf, s, a.cos() - 1, a.sin(), w * r.cos(), w * r.sin(),
                              t[:, 0], t[:, 1]], 1)
        if self.scale or self.rotate or self.aniso or self.translate:  # all or nothing, as EDM
            with torch.autocast(x.device.type, enabled=False):  # warps stay fp32 under autocast
                G = _scale(2 ** (-self.scale_std * s), 2 ** (-self.scale_std * s)) @ _rotate(a)
                sa = 2 ** (self.aniso_std * w)
                G = G @ _rotate(-r) @ _scale(1 / sa, sa) @ _rotate(r)
                G = G @ _affine(one, 0 * one, 0 * one, one, -t[:, 0] * W * self.translate_std,
                                -t[:, 1] * H * self.translate_std)
                x = _apply_matrix(x, G)
        return x, labels  # (N, C, H, W), (N, 9)

AUGMENT = AugmentPipe()  # the paper's setting (EDM's CIFAR pipe, App. A); it holds no state
AUGMENT_NO_FLIP = AugmentPipe(xflip=False)  # --no-flip: the other ops as the paper's

# ------------------------------------------------------------------------------------------------
# Contrastive self-distillation (Sec. 4.2): MoCo v3 against the EMA model as the teacher

class ProjHead(nn.Module):
    """MoCo v3 projector (+ predictor) on a pooled feature (N, C); 'time' gates it by level."""
    def __init__(self, in_dim, hidden=1024, out=256, mode="time", t_dim=128):
        super().__init__()
        # BN on batch statistics only: online and EMA heads behave alike in train and eval mode,
        # and a target at the probe level is not normalised with the training levels' statistics
        bn = lambda d, affine=True: nn.BatchNorm1d(d, affine=affine, track_running_stats=False)
        self.fc1, self.bn1 = nn.Linear(in_dim, hidden, bias=False), bn(hidden)
        self.fc2, self.bn2 = nn.Linear(hidden, out, bias=False), bn(out, affine=False)
        # A conditional-BN gain per hidden unit, as features of different noise levels need
        # different weighting (Table 7b). Zero-init: 'time' starts as the 'mocov3' projector.
        self.time = nn.Linear(t_dim, hidden) if mode == "time" else None
        if self.time is not None:
            nn.init.zeros_(self.time.weight)
            nn.init.zeros_(self.time.bias)
        self.predictor = nn.Sequential(nn.Linear(out, hidden, bias=False), bn(hidden), nn.ReLU(),
                                       nn.Linear(hidden, out, bias=False))

    def project(self, f, level):  # (N, C), (N,) in [0, 1] -> (N, out); the EMA branch stops here
        h = self.bn1(self.fc1(f.float()))
        if self.time is not None:  # the level on the usual 0..1000 time scale
            h = h * (1 + self.time(timestep_embedding(1000 * level, self.time.in_features)))
        return self.bn2(self.fc2(F.relu(h)))

    def forward(self, f, level):  # online branch: projector, then predictor
        return self.predictor(self.project(f, level))

def contrastive_loss(q, k, T=0.2):
    """InfoNCE of online q (N, D) against targets k (N, D) from all ranks, x 2T as MoCo v3."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.detach().float(), dim=1)
    rank = 0
    if dist.is_initialized() and dist.get_world_size() > 1:
        ks = [torch.empty_like(k) for _ in range(dist.get_world_size())]
        dist.all_gather(ks, k.contiguous())  # no gradient flows through the targets
        k, rank = torch.cat(ks), dist.get_rank()
    labels = torch.arange(len(q), device=q.device) + rank * len(q)  # positives: own slice
    with torch.autocast(q.device.type, enabled=False):  # logits / T need more than bf16 holds
        return F.cross_entropy(q @ k.t() / T, labels) * (2 * T)

def contrastive_step(model, ema, diffusion, x, f, level, args):
    """The contrastive term: online feature f (N, C) of the training view at its own level
    against the EMA's feature of a second view of the clean batch x, noised at the target level."""
    t = args.probe_t if args.cl_target_t == "probe" else diffusion.t_min  # Table 7c
    t = torch.full((len(x),), t, device=x.device)  # int64 for DDPM steps, float otherwise
    with torch.no_grad():  # the teacher: one EMA forward, in the training precision
        x2, aug2 = (AUGMENT if args.flip else AUGMENT_NO_FLIP)(x)
        x2 = diffusion.add_noise(x2, t, torch.randn_like(x2))
        f2 = diffusion.pred(ema, x2, t, aug2, (args.cl_layer,))[1][args.cl_layer]
        k = ema.cl_head.project(f2, diffusion.level(t))  # the EMA head projects the target
    return contrastive_loss(model.cl_head(f, level), k)

# ------------------------------------------------------------------------------------------------
# Training step (Sec. 4): the loss, optionally augmented and contrastive; the preview sampler

def param_groups(model, weight_decay):
    """AdamW groups: decay on all but biases and position embeddings (App. A), so the [CLS]
    token and the LayerNorm gains are decayed (the official U-ViT decays every parameter)."""
    decay, no_decay = [], []
    for name, prm in model.named_parameters():
        (no_decay if name.endswith("bias") or name == "pos_embed" else decay).append(prm)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]

def build_optimizer(model, args):
    """AdamW with U-ViT's CIFAR betas (0.99, 0.999), which the paper inherits (Table 11)."""
    return torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                             betas=(0.99, 0.999), fused=next(model.parameters()).is_cuda)

def train_step(net, model, ema, opt, diffusion, batch, step, args):
    """One step (training's, --bench's) on a clean batch (B, 3, H, W) in [-1, 1]: flip or augment,
    loss (+ gamma x contrastive), backward, clip, Adam, EMA -> loss (B,), level (B,), {term: v}."""
    if args.aug:  # the pipe flips too (not with --no-flip), and says so in the label
        x, aug = (AUGMENT if args.flip else AUGMENT_NO_FLIP)(batch)
    else:  # --no-flip draws the flips too: the later draws stay those of a flipping run
        flip = torch.rand(len(batch), 1, 1, 1, device=batch.device) < 0.5
        x, aug = torch.where(flip & args.flip, batch.flip(3), batch), None
    extra = {}
    with autocast(x.device, args.precision):
        loss, level, f = diffusion.loss(net, x, aug, (args.cl_layer,) if args.cl else ())
        if args.cl:
            f = f[args.cl_layer]
            extra["cl_loss"] = contrastive_step(model, ema, diffusion, batch, f, level, args)
    opt.zero_grad(set_to_none=True)
    (loss.mean() + args.cl_weight * extra.get("cl_loss", 0)).backward()
    nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    opt.step()
    update_ema(ema, model, step, args.ema)
    return loss.detach(), level, {k: v.detach() for k, v in extra.items()}

def sample_preview(ema, diffusion, args, device):
    """64 samples of the EMA model from the same noise each time, so a run's grids compare."""
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(64, 3, args.resolution, args.resolution, generator=g).to(device)
    with autocast(device, args.precision):
        return diffusion.sample(ema, noise)

# ------------------------------------------------------------------------------------------------
# Recipe: backbones (Table 9), DDPM settings (Tables 8, 11), designated layer and step (Table 10)

NETS = {  # patch size, width, transformer blocks (in + mid + out), heads, MLP ratio
    "uvit_s": dict(patch=2, dim=512, depth=13, heads=8, mlp_ratio=4),  # U-ViT's CIFAR config
    "tiny": dict(patch=4, dim=64, depth=5, heads=4, mlp_ratio=2),  # CPU quickstart and tests
}
PROBE = {  # Table 10, DDPM UViT-S: probe step and out-block
    "cifar10": (11, "out_2"), "cifar100": (11, "out_2"),
    "tiny-imagenet": (66, "out_1"), "in100": (66, "out_1"),
}
AUG_DIM = 9  # the augment label of the non-leaky pipe
ARCH_KEYS = ("net", "self_cond", "aug", "cl", "cl_head", "resolution")  # a resume may not change

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--net", choices=list(NETS), default="uvit_s")
    p.add_argument("--model", default="DDPM", help="diffusion formulation: DDPM only for UViT")
    p.add_argument("--dataset", default="cifar10",
                   help="cifar10, cifar100, tiny-imagenet, shapes, or a class-folder name")
    p.add_argument("--resolution", type=int, help="default: the dataset's (folders: 64)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images of folders")
    p.add_argument("--self-cond", action="store_true", help="the [CLS] token (Sec. 4.1, Fig. 2a)")
    p.add_argument("--sc-layer", help="out-block of the probe and contrastive features (Table 10)")
    p.add_argument("--probe-t", type=int, help="probe and contrastive-target step (Table 10)")
    add_aug_args(p)
    p.add_argument("--cl-feature", choices=["cls", "pool"], default="cls", help="Table 7e")
    p.add_argument("--batch-size", type=int, help="global batch: 256 uvit_s (Table 11), 128 tiny")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--weight-decay", type=float, default=0.03,
                   help="AdamW; not on biases and position embeddings")
    p.add_argument("--ema", type=float, default=0.9999, help="EMA decay (Table 8)")
    p.add_argument("--warmup-images", type=int, help="lr warm-up (Table 11: 13 epochs, <= 1/10)")
    add_training_args(p)
    args = p.parse_args(argv)
    if args.model != "DDPM":
        p.error(f"--model {args.model}: UViT trains as DDPM only (the paper found EDM and RF "
                f"unstable with UViT); use train_unet.py for EDM and RF")
    if args.cl and not args.aug:
        p.error("--cl needs --aug: the contrastive views come from the augment pipe")
    if args.cl and args.cl_feature == "cls" and not args.self_cond:
        p.error("--cl-feature cls needs --self-cond (the [CLS] token); or use --cl-feature pool")

    patch = NETS[args.net]["patch"]
    args.resolution = args.resolution or DATASETS.get(args.dataset, (0, 64))[1]
    if args.resolution % patch:
        p.error(f"--resolution {args.resolution} is not a multiple of the patch size {patch}")
    if args.batch_size is None:
        args.batch_size = {"uvit_s": 256, "tiny": 128}[args.net]
    args.epochs = 40 if args.dataset in SHAPES else 2000  # shapes: minutes on a CPU
    args.warmup_epochs = 13  # Table 11, DDPM
    args.keep_epochs = 0 if args.dataset in SHAPES else 200  # kept: App. A's evaluation epochs
    n_out = NETS[args.net]["depth"] // 2
    probe_t, layer = PROBE.get(args.dataset, (11, "out_2"))  # out_2 exists in every preset
    args.probe_t = args.probe_t or probe_t
    layer = args.sc_layer or layer
    args.sc_layer = f"out_{layer}" if layer.isdigit() else layer
    if args.sc_layer not in [f"out_{i}" for i in range(1, n_out + 1)]:
        p.error(f"--sc-layer {args.sc_layer}: the {args.net} decoder has out_1 .. out_{n_out}")
    # Table 7e: the contrastive feature is the [CLS] token or the pooled image tokens, at sc_layer
    args.cl_layer = f"cls_{args.sc_layer[4:]}" if args.cl_feature == "cls" else args.sc_layer
    suffix = "-sc" * args.self_cond + "-aug" * args.aug + "-cl" * args.cl
    args.out = args.out or f"runs/uvit-{args.dataset}-{args.net}-DDPM{suffix}"
    return args

def add_aug_args(p):
    """The command line of augmentation and contrastive self-distillation (Sec. 4.2)."""
    p.add_argument("--aug", action="store_true",
                   help="EDM's non-leaky augmentation, CIFAR setting; the net sees its label")
    p.add_argument("--cl", action="store_true", help="contrastive self-distillation (needs --aug)")
    p.add_argument("--cl-weight", type=float, default=0.01, help="gamma (Table 7d)")
    p.add_argument("--cl-head", choices=["time", "mocov3"], default="time", help="head (Table 7b)")
    p.add_argument("--cl-target-t", choices=["probe", "min"], default="probe",
                   help="noise level of the target view (Table 7c)")

def param_report(model):
    """One line: the total and what each option adds (a token counts with its position row)."""
    n_sc = 2 * model.dim if model.cls_token is not None else 0
    n_aug = count_params(model.aug_embed) + (model.dim if model.aug_embed is not None else 0)
    return (f"parameters: {count_params(model):,} total, {n_sc:,} self-conditioning, "
            f"{n_aug:,} augment label, {count_params(getattr(model, 'cl_head', None)):,} "
            f"contrastive head")

def load_train_data(args, device):
    """The training split, kept whole on the device: a batch is an index gather, no loader."""
    images = load_pixels(args, "train")[0].to(device)  # (N, 3, H, W) uint8
    layout = memory_format(device)

    def batch(idx):  # (B,) -> (B, 3, H, W) in [-1, 1]; non_blocking: no wait for the GPU
        x = images[idx.to(device, non_blocking=True)].float() / 127.5 - 1
        return x.contiguous(memory_format=layout)
    return SimpleNamespace(n=len(images), batch=batch, to_pixels=lambda x: x, state={})

def fake_batch(args, device):
    """A synthetic batch of the training shape, for --bench."""
    x = torch.rand(args.batch_size, 3, args.resolution, args.resolution, device=device)
    return (x * 2 - 1).contiguous(memory_format=memory_format(device))

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
# Data: the shapes toy and this model's datasets in the paper: CIFAR, Tiny-ImageNet, class folders

SHAPES = {  # the toy's variants: ranges of background and dot colour, dot radius, constellation
    # size (x res); a range (v, v) fixes the value but keeps its draws, so labels and poses agree
    "shapes": ((0, 0.45), (0.55, 1), (0.07, 0.09), (0.22, 0.30)),
    "shapes-fixed": ((0.225, 0.225), (0.775, 0.775), (0.08, 0.08), (0.26, 0.26)),  # no nuisances
}
DATASETS = {  # pixel datasets known by name: classes, resolution
    "cifar10": (10, 32), "cifar100": (100, 32), "tiny-imagenet": (200, 64),
    **dict.fromkeys(SHAPES, (10, 32)),
}
CIFAR = {  # the official python pickles: url, md5, folder, train files, test files, label key
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py",
                [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python",
                 ["train"], ["test"], b"fine_labels"),
}
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

def load_cifar(name, root, split):
    """CIFAR's official pickles, fetched once: md5-checked, extracted under a temporary name."""
    url, md5, folder, train_files, test_files, key = CIFAR[name]
    root = Path(root)
    root = root.parent if root.name == folder else root

    def download(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".fetch-") as tmp:
            archive = Path(tmp) / url.rsplit("/", 1)[1]
            torch.hub.download_url_to_file(url, archive)
            if hashlib.md5(archive.read_bytes()).hexdigest() != md5:
                raise ValueError(f"wrong md5 checksum of {url}")
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
            os.replace(Path(tmp) / folder, path)
    fetch_once(root / folder, download, f"{name} is not in {root / folder} and could not be "
                                        f"downloaded; extract {url} there, or pass --data-path")
    xs, ys = [], []
    for f in train_files if split == "train" else test_files:
        with open(root / folder / f, "rb") as fh:
            d = pickle.load(fh, encoding="bytes")
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

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
    """[(path, label)] of a folder dataset split ('train' or 'test'): Tiny-ImageNet's layout, or
    class folders <root>/<class>/*, or <root>/train/<class>/* and <root>/val/<class>/*."""
    root = Path(args.data_path)
    if args.dataset == "tiny-imagenet":
        root = root if (root / "wnids.txt").exists() else root / "tiny-imagenet-200"
        if not (root / "wnids.txt").exists():
            raise SystemExit(f"tiny-imagenet not found under {args.data_path}: "
                             f"unzip tiny-imagenet-200.zip there")
        wnids = (root / "wnids.txt").read_text().split()
        if split == "train":
            return [(f, i) for i, w in enumerate(wnids)
                    for f in sorted((root / "train" / w / "images").iterdir())]
        rows = (root / "val" / "val_annotations.txt").read_text().splitlines()
        index = {w: i for i, w in enumerate(wnids)}
        return [(root / "val" / "images" / f, index[w]) for f, w, *_ in map(str.split, rows)]
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

def decode_images(files, res, workers, skip_bad):
    """Decode (path, label) pairs with `workers` processes into uint8 (N, 3, res, res), labels."""
    xs = torch.empty(len(files), 3, res, res, dtype=torch.uint8)
    ok = torch.ones(len(files), dtype=torch.bool)
    loader = torch.utils.data.DataLoader(ImageFiles(files, res), 64, num_workers=workers)
    for idx, img, errors in tqdm(loader, desc="decoding images", disable=local_rank() > 0):
        xs[idx] = img
        for i, error in zip(idx.tolist(), errors):
            if error and not skip_bad:
                raise SystemExit(f"cannot read image {error}: fix or remove it or pass --skip-bad")
            ok[i] = not error
    if not ok.all():
        print(f"skipped {int((~ok).sum())} unreadable images")
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return xs[ok], labels[ok]

def load_pixels(args, split="train"):
    """(uint8 images (N, 3, H, W), labels (N,)) of a pixel dataset's 'train' or 'test' split."""
    if args.dataset in SHAPES:
        return shapes_split(args, split)[:2]
    if args.dataset in CIFAR:
        return load_cifar(args.dataset, args.data_path, split)
    return decode_images(image_files(args, split), args.resolution, args.workers, args.skip_bad)

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
