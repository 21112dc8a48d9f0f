"""
Sample images from a DDAE++ checkpoint (train_unet.py, train_uvit.py or train_dit.py) with the
paper's samplers.

    python sample.py --ckpt runs/X/ckpt.pt --n 50000 --out runs/X/samples    # one process
    torchrun --nproc_per_node=8 sample.py --ckpt runs/X/ckpt.pt --num-samples 50000   # 8 GPUs
    python sample.py --ckpt runs/X/ckpt-*.pt --fid cifar10   # snapshots: the FID of each, the best

Samplers (paper Table 8): DDPM -> DDIM (Euler, eta 0, 100 steps); EDM -> Heun (18 steps, 35 NFE);
pixel RF -> adaptive RK45 (scipy); latent RF -> Euler 250 steps, timestep shift 3.3, CFG 1.5 on
t <= 0.89. Image i's noise (and class label) depends only on (--seed, i), and every batch is one
fixed shard of indices, so the output is the same for any number of ranks, and an interrupted run
resumes at the first missing shard. Every --ckpt and flag is checked before the first image is
sampled. Output: <out>/samples.npz (ADM evaluator format: arr_0 uint8 NHWC, arr_1 labels when
class-conditional) and <out>/grid.png (first 64 images).
"""
import argparse
import datetime
import importlib
import json
import math
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from scipy.integrate import solve_ivp
from tqdm import tqdm

import fid

# ----------------------------------------------------------------------------
# Samplers: pure functions of a prediction fn(x, t) with t a python scalar in native units.
# Each takes unit Gaussian `noise` and returns the sample in model space; NFE = calls of fn.

@torch.no_grad()
def ddim(eps_fn, noise, alphas_cumprod, steps=100, clip=False):
    """DDIM (eta 0) for an eps-prediction DDPM; alphas_cumprod is (T+1,) with index 0 == 1
    (DDAE)."""
    T = len(alphas_cumprod) - 1
    if not 1 <= steps <= T:
        raise ValueError(f"DDIM needs 1 <= steps <= T={T}, got {steps}")
    # DDAE's grid: t = 1 + i*T/steps (991, 981, ..., 1 for 100 steps), then a last step to t=0
    # (ab=1)
    ts = [1 + i * T // steps for i in reversed(range(steps))] + [0]
    ab = alphas_cumprod.double().tolist()
    x = noise
    for t, t_next in zip(ts[:-1], ts[1:]):
        eps = eps_fn(x, t)
        x0 = (x - math.sqrt(1 - ab[t]) * eps) / math.sqrt(ab[t])
        if clip:  # DDAE clips the pixel estimate and re-derives eps from it
            x0 = x0.clamp(-1, 1)
            eps = (x - math.sqrt(ab[t]) * x0) / math.sqrt(1 - ab[t])
        x = math.sqrt(ab[t_next]) * x0 + math.sqrt(1 - ab[t_next]) * eps
    return x

def edm_sigmas(steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM's rho-spaced noise levels, sigma_max -> sigma_min, plus a final 0."""
    i = torch.arange(steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    s = (hi + i / max(steps - 1, 1) * (lo - hi)) ** rho
    return s.tolist() + [0.0]

@torch.no_grad()
def heun(denoise_fn, noise, steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0, clip=False):
    """EDM Algorithm 1 (deterministic 2nd-order Heun) for an x0-prediction D(x; sigma):
    2*steps-1 NFE."""
    sigmas = edm_sigmas(steps, sigma_min, sigma_max, rho)
    # clip: as DDAE, pixels only
    D = (lambda x, s: denoise_fn(x, s).clamp(-1, 1)) if clip else denoise_fn
    x = noise * sigmas[0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - D(x, s)) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:  # the last step to sigma=0 stays Euler: D at sigma=0 is undefined
            d_next = (x_next - D(x_next, s_next)) / s_next
            x_next = x + (s_next - s) * (d + d_next) / 2
        x = x_next
    return x

@torch.no_grad()
def rk45(v_fn, noise, rtol=1e-5, atol=1e-5, t_end=1e-3):
    """Adaptive RK45 (scipy) of dx/dt = v(x, t) from t=1 (noise) to t_end, the whole batch as one
    system."""
    shape, device, dtype = noise.shape, noise.device, noise.dtype

    def f(t, y):
        x = torch.from_numpy(y).reshape(shape).to(device, dtype)
        return v_fn(x, float(t)).reshape(-1).double().cpu().numpy()

    # t_end = 1e-3 as in the Rectified Flow code: the field is stiffest at t -> 0, and the step
    # left out, t_end * v ~ 0.003, is below one 8-bit level (2/255)
    sol = solve_ivp(f, (1.0, t_end), noise.reshape(-1).double().cpu().numpy(), method="RK45",
                    rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"RK45 failed: {sol.message}")
    return torch.from_numpy(sol.y[:, -1]).reshape(shape).to(device, dtype)

def shifted_times(steps=250, shift=3.3):
    """Uniform grid 1 -> 0 warped by t' = s t / (1 + (s-1) t): s > 1 spends more steps at high
    noise."""
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).tolist()

@torch.no_grad()
def euler(v_fn, noise, steps=250, shift=3.3):
    """Euler for a velocity (eps - x0) RF model on the shifted grid: `steps` NFE, ends exactly at
    t=0."""
    ts = shifted_times(steps, shift)
    x = noise
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * v_fn(x, t)
    return x

def cfg(pred_fn, y, null, scale=1.5, max_level=0.89, level=lambda t: t):
    """Classifier-free guidance on all channels, only where level(t) <= max_level (paper: t=1 is
    noise)."""
    def guided(x, t):
        if scale == 1 or level(t) > max_level:
            return pred_fn(x, t, y)  # guidance off: the plain conditional prediction, one forward
        c, u = pred_fn(torch.cat([x, x]), t, torch.cat([y, torch.full_like(y, null)])).chunk(2)
        return u + scale * (c - u)
    return guided

def noise_level(diffusion):
    """Native t -> the RF noise level sigma/(1+sigma) of the same signal-to-noise ratio (= t for
    RF)."""
    if diffusion.kind == "RF":
        return lambda t: t
    if diffusion.kind == "EDM":
        return lambda s: s / (1 + s)
    ab = diffusion.alphas_cumprod.tolist()
    return lambda t: math.sqrt(1 - ab[t]) / (math.sqrt(ab[t]) + math.sqrt(1 - ab[t]))

# ------------------------------------------------------------------------------------------------
# Checkpoints

SCRIPTS = ("train_unet.py", "train_uvit.py", "train_dit.py")

def read_checkpoint(path):
    """(trainer module, args, checkpoint dict) of a train_*.py checkpoint, memory-mapped: only
    its metadata is read here, and only the tensors used ever are. One line if it is missing,
    corrupt or names no trainer."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"checkpoint {path} not found: pass the ckpt.pt of a training run "
                         f"(runs/<name>/ckpt.pt) or one of its ckpt-<images>.pt snapshots")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise SystemExit(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}); "
                         f"use an intact copy")
    script = ckpt.get("script") if isinstance(ckpt, dict) else None
    if script not in SCRIPTS:
        raise SystemExit(f"checkpoint {path} names script {script!r}; "
                         f"expected one of {', '.join(SCRIPTS)}")
    if not {"args", "ema"} <= set(ckpt):
        raise SystemExit(f"checkpoint {path} lacks {' and '.join({'args', 'ema'} - set(ckpt))}: "
                         f"not one that {script} wrote")
    mod = import_trainer(script)
    args = mod.get_args([])
    vars(args).update(ckpt["args"])
    return mod, args, ckpt

def weights(ckpt, path, raw, model):
    """The EMA weights (the online ones with `raw`) of a checkpoint, checked against `model`'s
    keys and shapes (a model on the meta device will do): one line where they differ."""
    if raw and "model" not in ckpt:
        raise SystemExit(f"--raw: {path} is a snapshot holding the EMA weights only; use the "
                         f"run's ckpt.pt")
    state, want = ckpt["model" if raw else "ema"], model.state_dict()
    bad = sorted(set(want) ^ set(state))
    bad += [k for k in want if k in state and want[k].shape != state[k].shape]
    if bad:  # one line naming the keys instead of torch's multi-line report
        raise SystemExit(f"checkpoint {path} does not match the {ckpt['script']} model it names: "
                         f"keys {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} differ; "
                         f"was it edited or written by another version?")
    return state

def load_checkpoint(path, raw=False, device="cpu"):
    """Rebuild (module, args, model in eval mode, diffusion, ckpt) from a train_*.py checkpoint:
    the script it names builds the model; `raw` takes the online weights instead of the EMA."""
    mod, args, ckpt = read_checkpoint(path)
    model = mod.build_model(args)
    model.load_state_dict(weights(ckpt, path, raw, model))
    return mod, args, for_inference(model, device), mod.build_diffusion(args), ckpt

def for_inference(model, device):
    """The model frozen for sampling or feature extraction. channels_last on any device: the
    tiny UNet's inference convolutions ran 1.2-1.3x faster on CPU too (batch 256), while
    training gains nothing there and stays contiguous on CPU."""
    return model.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)

def import_trainer(script):
    """The training script (train_unet.py ...) as a module; they live next to this file."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module(Path(script).stem)

def ckpt_name(path):
    """A checkpoint's name among several: its run folder's, and the snapshot's (ckpt-<images>)."""
    path = Path(path)
    return path.parent.name + ("" if path.stem == "ckpt" else f"-{path.stem}")

# ------------------------------------------------------------------------------------------------
# Flags, checked against every checkpoint before any work

DEFAULT_SAMPLER = {"DDPM": "ddim", "EDM": "heun", "RF": "rk45"}  # latent RF: euler (Table 8)
DEFAULT_STEPS = {"ddim": 100, "heun": 18, "euler": 250}
VALID = {"ddim": "DDPM", "heun": "EDM", "rk45": "RF", "euler": "RF"}
# ranks wait at barriers while others finish a slow shard or rank 0 merges 50k images
DIST_TIMEOUT = datetime.timedelta(hours=2)

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, nargs="+",
                   help="ckpt.pt or ckpt-<images>.pt snapshots written by train_unet.py, "
                        "train_uvit.py or train_dit.py; several: each into a folder of its own, "
                        "with --fid the FID of each and the best")
    p.add_argument("--out", help="output folder (default: <ckpt dir>/samples-<sampler>[-raw])")
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=50_000,
                   help="number of images (under torchrun spell it --num-samples: torchrun's "
                        "own parser claims --n)")
    p.add_argument("--batch-size", type=int, default=250,
                   help="images per forward and per shard (part of the result: RK45 steps a "
                        "batch together)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true",
                   help="use the online weights, not the EMA (ckpt.pt only: snapshots hold the "
                        "EMA alone)")
    p.add_argument("--sampler", choices=list(VALID),
                   help="default: ddim (DDPM), heun (EDM), rk45 (pixel RF), euler (latent RF)")
    p.add_argument("--steps", type=int, help="default: 100 ddim, 18 heun (35 NFE), 250 euler")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True,
                   help="ddim/heun: clip the denoised estimate to [-1, 1] at every step, as DDAE")
    p.add_argument("--rtol", type=float, default=1e-5, help="rk45 relative tolerance")
    p.add_argument("--atol", type=float, default=1e-5, help="rk45 absolute tolerance")
    p.add_argument("--shift", type=float,
                   help="euler timestep shift (default: 3.3 latent, 1 pixel)")
    p.add_argument("--cfg-scale", type=float,
                   help="guidance scale (default 1.5 if class-conditional)")
    p.add_argument("--cfg-interval", type=float, default=0.89,
                   help="guide at noise levels <= this (t=1: noise)")
    p.add_argument("--class", dest="cls", type=int,
                   help="only this class (default: image i gets class i %% C)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="bf16 autocast (auto: on CUDA) or fp32")
    p.add_argument("--vae", help="VA-VAE weights for latent models (default: the training run's)")
    p.add_argument("--fid", metavar="REF",
                   help="then the FID (fid.py) of the samples vs REF: a dataset the checkpoint's "
                        "trainer reads (cifar10, shapes, its own class folders ...), at the "
                        "samples' size, or a folder of images or .npz as fid.py takes them")
    a = p.parse_args(argv)
    for name, value in (("--n", a.n), ("--batch-size", a.batch_size), ("--steps", a.steps)):
        if value is not None and value < 1:
            raise SystemExit(f"{name} {value}: give a positive number")
    if a.fid and a.n < 3:
        raise SystemExit(f"--fid needs at least 3 samples, --n is {a.n} (the paper uses 50,000)")
    if a.vae and not Path(a.vae).is_file():
        raise SystemExit(f"--vae {a.vae}: no such file; give the VA-VAE weights, or drop --vae "
                         f"to use the training run's")
    return a

def resolve(a, args, model, diffusion):
    """Fill the defaults that depend on the checkpoint; reject combinations that cannot work.
    Returns (latent, classes)."""
    latent = getattr(args, "latent", "none") != "none"
    classes = getattr(model, "num_classes", 0)
    a.sampler = a.sampler or ("euler" if latent else DEFAULT_SAMPLER[diffusion.kind])
    if VALID[a.sampler] != diffusion.kind:
        raise SystemExit(f"--sampler {a.sampler} needs a {VALID[a.sampler]} model; "
                         f"{a.ckpt} is {diffusion.kind}")
    if a.sampler == "rk45" and a.steps is not None:
        raise SystemExit("--steps does not apply to rk45 (adaptive): set --rtol/--atol, "
                         "or use --sampler euler")
    if a.sampler == "rk45":  # bf16's rounding (~4e-3) would never meet its 1e-5 tolerances
        if a.precision == "bf16":
            raise SystemExit("--sampler rk45 needs fp32: drop --precision bf16")
        a.precision = "fp32"
    a.steps = a.steps or DEFAULT_STEPS.get(a.sampler)
    a.shift = a.shift if a.shift is not None else (3.3 if latent else 1.0)
    a.cfg_scale = a.cfg_scale if a.cfg_scale is not None else (1.5 if classes else 1.0)
    if not classes and (a.cfg_scale != 1 or a.cls is not None):
        raise SystemExit(f"{a.ckpt} is unconditional: drop --class and --cfg-scale")
    if a.cls is not None and not 0 <= a.cls < classes:
        raise SystemExit(f"--class {a.cls} is out of range: {a.ckpt} has {classes} "
                         f"classes (0..{classes - 1})")
    if a.vae and not latent:
        raise SystemExit(f"--vae: {a.ckpt} is a pixel-space model; drop --vae")
    snapshot = "" if Path(a.ckpt).stem == "ckpt" else f"-{Path(a.ckpt).stem}"  # ckpt-<images>
    a.out = a.out or str(Path(a.ckpt).parent / f"samples-{a.sampler}{'-raw' * a.raw}{snapshot}")
    return latent, classes

@dataclass
class Job:
    """One --ckpt to sample: its flags resolved against it, and what they were resolved from."""
    a: argparse.Namespace  # sample.py's flags, defaults filled for this checkpoint
    mod: object  # the trainer the checkpoint names
    args: argparse.Namespace  # its training flags
    latent: bool
    classes: int
    size: int  # of the images: a dataset-name --fid reference is read at this size
    step: int
    images: int
    ref: object = None  # --fid's reference as fid.fid_from_samples takes it
    cache: str = None  # where the reference's statistics are cached

def plan(a):
    """A Job per --ckpt, every checkpoint read (metadata only) and every flag checked against it:
    one line on the first that does not fit, before anything is sampled or written."""
    jobs = []
    for path in a.ckpt:
        mod, args, ckpt = read_checkpoint(path)
        with torch.device("meta"):  # shapes only, no weights: DiT-L's random init takes 20 s
            model = mod.build_model(args)
        weights(ckpt, path, a.raw, model)
        out = a.out and (str(Path(a.out) / ckpt_name(path)) if len(a.ckpt) > 1 else a.out)
        job = argparse.Namespace(**{**vars(a), "ckpt": path, "out": out})
        latent, classes = resolve(job, args, model, mod.build_diffusion(args))
        size = mod.IMAGE_SIZE if latent else args.resolution  # a latent DiT decodes to 256
        jobs.append(Job(job, mod, args, latent, classes, size, ckpt.get("step"),
                        ckpt.get("images") or 0))
    return jobs

def config(job, device):
    """The settings a shard depends on: shards of another checkpoint or setting must not be mixed
    into a run."""
    a = job.a
    c = {k: getattr(a, k) for k in ("raw", "sampler", "steps", "clip", "rtol", "atol", "shift",
                                    "cfg_scale", "cfg_interval", "cls", "seed", "batch_size")}
    c.update(ckpt=str(Path(a.ckpt).resolve()), ckpt_step=job.step,
             bf16=job.mod.use_bf16(device, a.precision),
             vae=(a.vae or job.args.vae) if job.latent else None)
    return c

def check_outputs(job, rank, device):
    """Before anything is written: --out can be created, and holds no samples of other settings
    (rank 0 looks; every rank gets its verdict)."""
    out = Path(job.a.out)
    error = job.mod.check_out_dir(out) if rank == 0 else None
    if rank == 0 and error is None and (out / "config.json").exists():
        old, new = json.loads((out / "config.json").read_text()), config(job, device)
        if old != new:
            diff = ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in new.items() if old.get(k) != v)
            error = (f"{out} holds samples made with other settings ({diff}): use another "
                     f"--out or delete it")
    job.mod.raise_on_any(error)

def fid_reference(ref, mod, args, size, workers=min(8, os.cpu_count() or 1)):
    """--fid REF as fid.fid_from_samples takes it, the file caching its statistics (see
    fid.cache_file), and a check of it that reads no pixels. A folder or .npz is passed on as
    its path. A dataset name is read through the checkpoint's trainer `mod` at the samples' size:
    shapes and CIFAR in memory (load_pixels), class folders (the checkpoint's own dataset at its
    --data-path) streamed a batch at a time by `workers` processes, each rank its own share
    (ImageFiles, ADM-centre-cropped as training reads them); the function returned for a
    dataset reads nothing until it is called."""
    if os.path.exists(ref) or os.sep in ref or os.path.splitext(ref)[1]:
        cache = fid.cache_file(Path(ref).stem, os.path.abspath(ref))
        return ref, cache, lambda: fid.check_input(ref)
    if ref not in mod.DATASETS and ref != args.dataset:
        raise SystemExit(f"--fid {ref}: not a file or folder, nor a dataset that "
                         f"{mod.__name__}.py reads for this checkpoint (its own {args.dataset}, "
                         f"or {', '.join(sorted(mod.DATASETS))}); give a folder or .npz")
    data = argparse.Namespace(**{**vars(args), "dataset": ref, "resolution": size})
    cache = fid.cache_file(ref, f"{ref}:{os.path.abspath(data.data_path)}:{size}")
    if ref in mod.DATASETS and ref != "tiny-imagenet":  # in memory: CIFAR is 150 MB of pixels
        return lambda: mod.load_pixels(data, "train")[0], cache, lambda: None  # (N, 3, H, W)
    # the check lists the files and the reading lists them again: ImageNet's 1.28M paths are
    # not held while sampling
    files = lambda: mod.image_files(data, "train")
    stream = lambda: fid.Source(mod.ImageFiles(files(), size), num_workers=workers)
    return stream, cache, files

def check_reference(name, mod, cache, check, rank):
    """--fid REF before any sampling, unless its statistics are cached (then nothing is read):
    check() on rank 0, its one line on every rank."""
    error = None
    if rank == 0 and not os.path.exists(cache):
        try:
            check()
        except SystemExit as e:
            error = f"--fid {name}: {e}"
    mod.raise_on_any(error)

# ------------------------------------------------------------------------------------------------
# Generation

def initial_state(a, start, end, shape, classes):
    """Noise and labels of images start..end-1: image i depends on (seed, i) alone, never on
    the rank layout."""
    noise, labels = [], []
    for i in range(start, end):
        g = torch.Generator().manual_seed(a.seed * 1_000_003 + i)
        noise.append(torch.randn(shape, generator=g))
        # labels cycle through the classes (balanced, as FID protocols expect) unless --class
        labels.append(a.cls if a.cls is not None else i % max(classes, 1))
    return torch.stack(noise), torch.tensor(labels)

def generate(a, model, diffusion, noise, labels, classes, autocast):
    """One batch: model-space samples and the number of network evaluations used."""
    def pred(x, t, y):
        tt = torch.full((len(x),), t, device=x.device)  # int64 DDPM steps, float otherwise
        with autocast:
            return diffusion.pred(model, x, tt, **({"y": y} if classes else {}))[0].float()

    fn = cfg(pred, labels, classes, a.cfg_scale, a.cfg_interval, noise_level(diffusion))
    nfe = 0

    def counted(x, t):
        nonlocal nfe
        nfe += 1
        return fn(x, t)
    if a.sampler == "ddim":
        x = ddim(counted, noise, diffusion.alphas_cumprod, a.steps, a.clip)
    elif a.sampler == "heun":
        x = heun(counted, noise, a.steps, clip=a.clip)
    elif a.sampler == "rk45":
        x = rk45(counted, noise, a.rtol, a.atol)
    else:
        x = euler(counted, noise, a.steps, a.shift)
    return x, nfe

def to_uint8(x):
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()

def shard_done(shards, start, size):
    """A shard counts when it holds `size` images: a changed --n regenerates the last one."""
    try:
        with np.load(shards / f"shard-{start:07d}.npz") as f:
            return len(f["labels"]) == size
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # missing or unreadable
        return False

def input_shape(mod, args, model, latent):
    """(C, H, W) the network denoises: RGB pixels, or the VA-VAE's f16 latents of train_dit.py."""
    if latent:
        return (model.in_ch, mod.IMAGE_SIZE // 16, mod.IMAGE_SIZE // 16)
    return (3, args.resolution, args.resolution)

def main(argv=None):
    """Sample each --ckpt; several snapshots of a run with --fid: the FID of each and the best
    (App. A and Table 6 evaluate along the run). Every checkpoint, flag, output folder and --fid
    reference is checked before the first image is sampled."""
    a = get_args(argv)
    jobs = plan(a)  # on every rank, before the process group: a bad flag ends each rank alone
    own_pg = not dist.is_initialized()
    rank, world, device = jobs[0].mod.setup_distributed(timeout=DIST_TIMEOUT)
    try:
        checked = set()  # the snapshots of a run share a reference: checked once
        for job in jobs:
            check_outputs(job, rank, device)
            if a.fid:
                job.ref, job.cache, check = fid_reference(a.fid, job.mod, job.args, job.size)
                if job.cache not in checked:
                    check_reference(a.fid, job.mod, job.cache, check, rank)
                    checked.add(job.cache)
        results = [sample_checkpoint(job, rank, world, device) for job in jobs]
    finally:  # also on SystemExit: no leaked process group after the one-line error
        if own_pg and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0 and a.fid and len(results) > 1:
        for r in results:
            print(f"{r['ckpt']} ({r['images']:,} images): FID {r['fid']:.4f}")
        best = min(results, key=lambda r: r["fid"])
        print(f"best FID {best['fid']:.4f}: {best['ckpt']} ({best['images']:,} images)")
    return results

def sample_checkpoint(job, rank, world, device):
    """Sample one checkpoint into its --out; with --fid, rank 0 returns its FID and IS."""
    a, latent, classes = job.a, job.latent, job.classes
    mod, args, model, diffusion, ckpt = load_checkpoint(a.ckpt, a.raw, device)
    out, shards = Path(a.out), Path(a.out) / "shards"
    if latent and a.vae:
        args.vae = a.vae
    vae = mod.load_vae(args, device) if latent else None
    autocast = mod.autocast(device, a.precision)
    savez = lambda arrays, f: np.savez(f, **arrays)
    if rank == 0:
        shards.mkdir(parents=True, exist_ok=True)
        if not (out / "config.json").exists():
            mod.atomic_save(config(job, device), out / "config.json",
                            lambda c, f: f.write(json.dumps(c, indent=1).encode()))

    # Shard k holds images [k B, (k+1) B). The missing ones are dealt round-robin over the
    # ranks, so a resumed run spreads the work; a shard's content never depends on its maker.
    starts = [s for s in range(0, a.n, a.batch_size)
              if not shard_done(shards, s, min(a.batch_size, a.n - s))]
    barrier(world)  # every rank has listed the missing shards before any is written
    shape = input_shape(mod, args, model, latent)
    if rank == 0:
        steps = "" if a.sampler == "rk45" else f" {a.steps} steps"
        print(f"{a.n} images from {a.ckpt} ({'raw' if a.raw else 'EMA'}, {diffusion.kind}, "
              f"{a.sampler}{steps}, cfg {a.cfg_scale}): {len(starts)} of "
              f"{math.ceil(a.n / a.batch_size)} shards to make on {world} x {device.type}")
    for start in tqdm(starts[rank::world], unit="shard", disable=rank != 0):
        noise, labels = initial_state(a, start, min(start + a.batch_size, a.n), shape, classes)
        x, nfe = generate(a, model, diffusion, noise.to(device), labels.to(device), classes,
                          autocast)
        if latent:  # the VA-VAE decoder runs 128 channels at 256x256: chunks bound its memory
            stats = ckpt["latent_stats"]
            images = np.concatenate([to_uint8(mod.decode(vae, z, stats)) for z in x.split(32)])
        else:
            images = to_uint8(x)
        arrays = dict(images=images, labels=labels.numpy(), nfe=np.array(nfe))
        mod.atomic_save(arrays, shards / f"shard-{start:07d}.npz", savez)
    barrier(world)

    paths = [shards / f"shard-{start:07d}.npz" for start in range(0, a.n, a.batch_size)]
    if rank == 0:  # the ADM evaluator's format (50k 256x256 images are 9.8 GB), a shard at a time
        nfes = []
        mod.atomic_save(paths, out / "samples.npz",
                        lambda p, f: nfes.extend(merge(p, f, a.n, classes)))
        first = paths[:math.ceil(64 / a.batch_size)]  # the shards holding the first 64 images
        mod.save_grid(torch.cat([shard_images(p) for p in first])[:64], out / "grid.png")
        print(f"wrote {out / 'samples.npz'} ({a.n} images) and {out / 'grid.png'}; "
              f"NFE per batch {np.mean(nfes):.1f} (min {min(nfes)}, max {max(nfes)})")
    if not a.fid:
        return None
    own = ((torch.arange(i * a.batch_size, i * a.batch_size + len(x)), x)  # this rank's shards
           for i, x in ((i, shard_images(paths[i])) for i in range(rank, len(paths), world)))
    inception = fid.load_inception(device=device)
    result = fid.fid_from_samples(fid.Source(own, n=a.n), job.ref, inception, cache=job.cache)
    if rank != 0:
        return None
    fid.report(result, world, device)
    return {**result, "ckpt": a.ckpt, "images": job.images}

def shard_images(path):
    """A shard's images as uint8 (B, C, H, W)."""
    with np.load(path) as f:
        return torch.from_numpy(f["images"]).permute(0, 3, 1, 2)

def merge(paths, f, n, classes):
    """Write the shards into file f as the ADM evaluator's npz (arr_0 uint8 NHWC, arr_1 labels
    when class-conditional), as np.savez would, holding one shard at a time; returns each shard's
    NFE."""
    labels, nfes, pos = np.zeros(n, np.int64), [], 0
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        with z.open("arr_0.npy", "w", force_zip64=True) as member:
            for i, path in enumerate(paths):
                with np.load(path) as shard:
                    x = shard["images"]
                    if i == 0:
                        header = {"descr": np.lib.format.dtype_to_descr(x.dtype),
                                  "shape": (n, *x.shape[1:]), "fortran_order": False}
                        np.lib.format.write_array_header_1_0(member, header)
                    member.write(np.ascontiguousarray(x).tobytes())
                    labels[pos:pos + len(x)], pos = shard["labels"], pos + len(x)
                    nfes.append(int(shard["nfe"]))
        if classes:
            with z.open("arr_1.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, labels)
    return nfes

def barrier(world):
    if world > 1:
        dist.barrier()

if __name__ == "__main__":
    main()
