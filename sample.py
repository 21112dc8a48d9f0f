"""
Sample images from a DDAE++ checkpoint (train_unet.py, train_uvit.py or train_dit.py) with the paper's samplers.

    python sample.py --ckpt runs/X/ckpt.pt --n 50000 --out runs/X/samples           # one process
    torchrun --nproc_per_node=8 sample.py --ckpt runs/X/ckpt.pt --num-samples 50000   # same images, 8 GPUs
    python sample.py --ckpt runs/X/ckpt-*.pt --fid cifar10      # snapshots: the FID of each, the best

Samplers (paper Table 8): DDPM -> DDIM (Euler, eta 0, 100 steps); EDM -> Heun (18 steps, 35 NFE);
pixel RF -> adaptive RK45 (scipy); latent RF -> Euler 250 steps, timestep shift 3.3, CFG 1.5 on t <= 0.89.
Image i's noise (and class label) depends only on (--seed, i), and every batch is one fixed shard of
indices, so the output is the same for any number of ranks, and an interrupted run resumes at the first
missing shard. Output: <out>/samples.npz (ADM evaluator format: arr_0 uint8 NHWC, arr_1 labels when
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
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from scipy.integrate import solve_ivp
from tqdm import tqdm

# ----------------------------------------------------------------------------
# Samplers: pure functions of a prediction fn(x, t) with t a python scalar in native units.
# Each takes unit Gaussian `noise` and returns the sample in model space; NFE = calls of fn.


@torch.no_grad()
def ddim(eps_fn, noise, alphas_cumprod, steps=100, clip=False):
    """DDIM (eta 0) for an eps-prediction DDPM; alphas_cumprod is (T+1,) with index 0 == 1 (DDAE)."""
    T = len(alphas_cumprod) - 1
    if not 1 <= steps <= T:
        raise ValueError(f"DDIM needs 1 <= steps <= T={T}, got {steps}")
    # DDAE's grid: t = 1 + i*T/steps (991, 981, ..., 1 for 100 steps), then a last step to t=0 (ab=1)
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
    s = (sigma_max ** (1 / rho) + i / max(steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return s.tolist() + [0.0]


@torch.no_grad()
def heun(denoise_fn, noise, steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0, clip=False):
    """EDM Algorithm 1 (deterministic 2nd-order Heun) for an x0-prediction D(x; sigma): 2*steps-1 NFE."""
    sigmas = edm_sigmas(steps, sigma_min, sigma_max, rho)
    D = (lambda x, s: denoise_fn(x, s).clamp(-1, 1)) if clip else denoise_fn  # clip: as DDAE, pixels only
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
    """Adaptive RK45 (scipy) of dx/dt = v(x, t) from t=1 (noise) to t_end, the whole batch as one system."""
    shape, device, dtype = noise.shape, noise.device, noise.dtype

    def f(t, y):
        x = torch.from_numpy(y).reshape(shape).to(device, dtype)
        return v_fn(x, float(t)).reshape(-1).double().cpu().numpy()

    # t_end = 1e-3 as in the Rectified Flow code: the field is stiffest at t -> 0, and the step left out,
    # t_end * v ~ 0.003, is below one 8-bit level (2/255)
    sol = solve_ivp(f, (1.0, t_end), noise.reshape(-1).double().cpu().numpy(), method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"RK45 failed: {sol.message}")
    return torch.from_numpy(sol.y[:, -1]).reshape(shape).to(device, dtype)


def shifted_times(steps=250, shift=3.3):
    """Uniform grid 1 -> 0 warped by t' = s t / (1 + (s-1) t): s > 1 spends more steps at high noise."""
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).tolist()


@torch.no_grad()
def euler(v_fn, noise, steps=250, shift=3.3):
    """Euler for a velocity (eps - x0) RF model on the shifted grid: `steps` NFE, ends exactly at t=0."""
    ts = shifted_times(steps, shift)
    x = noise
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * v_fn(x, t)
    return x


def cfg(pred_fn, y, null, scale=1.5, max_level=0.89, level=lambda t: t):
    """Classifier-free guidance on all channels, only where level(t) <= max_level (paper: t=1 is noise)."""
    def guided(x, t):
        if scale == 1 or level(t) > max_level:
            return pred_fn(x, t, y)  # guidance off: the plain conditional prediction, one forward
        c, u = pred_fn(torch.cat([x, x]), t, torch.cat([y, torch.full_like(y, null)])).chunk(2)
        return u + scale * (c - u)
    return guided


def noise_level(diffusion):
    """Native t -> the RF noise level sigma/(1+sigma) of the same signal-to-noise ratio (= t for RF)."""
    if diffusion.kind == "RF":
        return lambda t: t
    if diffusion.kind == "EDM":
        return lambda s: s / (1 + s)
    ab = diffusion.alphas_cumprod.tolist()
    return lambda t: math.sqrt(1 - ab[t]) / (math.sqrt(ab[t]) + math.sqrt(1 - ab[t]))

# ------------------------------------------------------------------------------------------------
# Checkpoints

SCRIPTS = ("train_unet.py", "train_uvit.py", "train_dit.py")


def load_checkpoint(path, raw=False, device="cpu"):
    """Rebuild (module, args, model in eval mode, diffusion, ckpt) from a train_*.py checkpoint:
    the script it names builds the model; `raw` takes the online weights instead of the EMA."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"checkpoint {path} not found: pass the ckpt.pt of a training run "
                         f"(runs/<name>/ckpt.pt)")
    try:
        # memory-mapped: only the tensors used are read (the EMA, not the online weights or Adam)
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise SystemExit(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}); "
                         f"use an intact copy")
    script = ckpt.get("script") if isinstance(ckpt, dict) else None
    if script not in SCRIPTS:
        raise SystemExit(f"checkpoint {path} names script {script!r}; "
                         f"expected one of {', '.join(SCRIPTS)}")
    mod = import_trainer(script)
    args = mod.get_args([])
    vars(args).update(ckpt["args"])
    model = mod.build_model(args)
    state = ckpt["model" if raw else "ema"]
    want = model.state_dict()
    bad = sorted(set(want) ^ set(state))
    bad += [k for k in want if k in state and want[k].shape != state[k].shape]
    if bad:  # one line naming the keys instead of torch's multi-line report
        raise SystemExit(f"checkpoint {path} does not match the {script} model it names: keys "
                         f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} differ; "
                         f"was it edited or written by another version?")
    model.load_state_dict(state)
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


# ------------------------------------------------------------------------------------------------
# Generation

DEFAULT_SAMPLER = {"DDPM": "ddim", "EDM": "heun", "RF": "rk45"}  # latent RF: euler (Table 8)
DEFAULT_STEPS = {"ddim": 100, "heun": 18, "euler": 250}
VALID = {"ddim": "DDPM", "heun": "EDM", "rk45": "RF", "euler": "RF"}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, nargs="+",
                   help="ckpt.pt or ckpt-<images>.pt snapshots written by train_unet.py, train_uvit.py "
                        "or train_dit.py; several: each into a folder of its own, with --fid the FID of "
                        "each and the best")
    p.add_argument("--out", help="output folder (default: <ckpt dir>/samples-<sampler>[-raw])")
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=50_000,
                   help="number of images (under torchrun spell it --num-samples: torchrun's "
                        "own parser claims --n)")
    p.add_argument("--batch-size", type=int, default=250,
                   help="images per forward and per shard (part of the result: RK45 steps a "
                        "batch together)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="use the online weights, not the EMA")
    p.add_argument("--sampler", choices=list(VALID),
                   help="default: ddim (DDPM), heun (EDM), rk45 (pixel RF), euler (latent RF)")
    p.add_argument("--steps", type=int, help="default: 100 ddim, 18 heun (35 NFE), 250 euler")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True,
                   help="ddim/heun: clip the denoised estimate to [-1, 1] at every step, as DDAE")
    p.add_argument("--rtol", type=float, default=1e-5, help="rk45 relative tolerance")
    p.add_argument("--atol", type=float, default=1e-5, help="rk45 absolute tolerance")
    p.add_argument("--shift", type=float, help="euler timestep shift (default: 3.3 latent, 1 pixel)")
    p.add_argument("--cfg-scale", type=float, help="guidance scale (default 1.5 if class-conditional)")
    p.add_argument("--cfg-interval", type=float, default=0.89,
                   help="guide at noise levels <= this (t=1: noise)")
    p.add_argument("--class", dest="cls", type=int,
                   help="only this class (default: image i gets class i %% C)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="bf16 autocast (auto: on CUDA) or fp32")
    p.add_argument("--vae", help="VA-VAE weights for latent models (default: the training run's)")
    p.add_argument("--fid", metavar="REF", help="then run fid.py on the samples vs REF (cifar10 ...)")
    a = p.parse_args(argv)
    for name, value in (("--n", a.n), ("--batch-size", a.batch_size), ("--steps", a.steps)):
        if value is not None and value < 1:
            raise SystemExit(f"{name} {value}: give a positive number")
    return a


def resolve(a, args, model, diffusion):
    """Fill the defaults that depend on the checkpoint; reject combinations that cannot work."""
    latent = getattr(args, "latent", "none") != "none"
    classes = getattr(model, "num_classes", 0)
    a.sampler = a.sampler or ("euler" if latent else DEFAULT_SAMPLER[diffusion.kind])
    if VALID[a.sampler] != diffusion.kind:
        raise SystemExit(f"--sampler {a.sampler} needs a {VALID[a.sampler]} model; "
                         f"this checkpoint is {diffusion.kind}")
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
        raise SystemExit("this checkpoint is unconditional: drop --class and --cfg-scale")
    if a.cls is not None and not 0 <= a.cls < classes:
        raise SystemExit(f"--class {a.cls} is out of range: this checkpoint has {classes} "
                         f"classes (0..{classes - 1})")
    snapshot = "" if Path(a.ckpt).stem == "ckpt" else f"-{Path(a.ckpt).stem}"  # ckpt-<images>.pt
    a.out = a.out or str(Path(a.ckpt).parent / f"samples-{a.sampler}{'-raw' * a.raw}{snapshot}")
    return latent, classes


def setup_distributed():
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; plain `python` is a world of one."""
    if "RANK" in os.environ and not dist.is_initialized():
        # a long timeout: ranks wait at barriers while others finish a slow shard or rank 0
        # merges 50k images
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=datetime.timedelta(hours=2))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # multi-node safe
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return rank, world, device


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


def save_grid(images, path, cols=8):
    """(N, H, W, C) uint8 -> one PNG."""
    n, h, w, c = images.shape
    grid = np.zeros((math.ceil(n / cols) * h, cols * w, c), np.uint8)
    for i, im in enumerate(images):
        grid[i // cols * h:(i // cols + 1) * h, i % cols * w:(i % cols + 1) * w] = im
    Image.fromarray(grid.squeeze(-1) if c == 1 else grid).save(path)


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


def ckpt_name(path):
    """A checkpoint's name among several: its run folder's, and the snapshot's (ckpt-<images>)."""
    path = Path(path)
    return path.parent.name + ("" if path.stem == "ckpt" else f"-{path.stem}")


def main(argv=None):
    """Sample each --ckpt; several snapshots of a run with --fid: the FID of each and the best (App. A
    and Table 6 evaluate along the run)."""
    a = get_args(argv)
    rank, world, device = setup_distributed()
    results = []
    for path in a.ckpt:
        out = a.out and (str(Path(a.out) / ckpt_name(path)) if len(a.ckpt) > 1 else a.out)
        results.append(sample_checkpoint(argparse.Namespace(**{**vars(a), "ckpt": path, "out": out}),
                                         rank, world, device))
    if rank == 0 and a.fid and len(results) > 1:
        for r in results:
            print(f"{r['ckpt']} ({r['images']:,} images): FID {r['fid']:.4f}")
        best = min(results, key=lambda r: r["fid"])
        print(f"best FID {best['fid']:.4f}: {best['ckpt']} ({best['images']:,} images)")
    if world > 1:
        dist.destroy_process_group()
    return results


def sample_checkpoint(a, rank, world, device):
    """Sample one checkpoint into a.out; with --fid, rank 0 returns its FID and IS."""
    mod, args, model, diffusion, ckpt = load_checkpoint(a.ckpt, a.raw, device)
    latent, classes = resolve(a, args, model, diffusion)
    out, shards = Path(a.out), Path(a.out) / "shards"
    mod.raise_on_any(mod.check_out_dir(out) if rank == 0 else None)  # before anything is written
    if latent and a.vae:
        args.vae = a.vae
    vae = mod.load_vae(args, device) if latent else None
    autocast = mod.autocast(device, a.precision)
    savez = lambda arrays, f: np.savez(f, **arrays)

    # Shards from another checkpoint or sampler setting must not be mixed into this run.
    config = {k: getattr(a, k) for k in ("raw", "sampler", "steps", "clip", "rtol", "atol",
                                         "shift", "cfg_scale", "cfg_interval", "cls", "seed",
                                         "batch_size")}
    config.update(ckpt=str(Path(a.ckpt).resolve()), ckpt_step=ckpt.get("step"),
                  bf16=mod.use_bf16(device, a.precision), vae=args.vae if latent else None)
    if rank == 0:
        shards.mkdir(parents=True, exist_ok=True)
        if not (out / "config.json").exists():
            mod.atomic_save(config, out / "config.json",
                            lambda c, f: f.write(json.dumps(c, indent=1).encode()))
    barrier(world)
    old = json.loads((out / "config.json").read_text())
    if old != config:
        diff = ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in config.items() if old.get(k) != v)
        raise SystemExit(f"{out} holds samples made with other settings ({diff}): "
                         f"use another --out or delete it")

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
        mod.atomic_save(paths, out / "samples.npz", lambda p, f: nfes.extend(merge(p, f, a.n, classes)))
        with np.load(paths[0]) as f:
            save_grid(f["images"][:64], out / "grid.png")
        print(f"wrote {out / 'samples.npz'} ({a.n} images) and {out / 'grid.png'}; "
              f"NFE per batch {np.mean(nfes):.1f} (min {min(nfes)}, max {max(nfes)})")
    if a.fid:
        import fid  # lazily: only --fid needs the Inception network
        # a dataset-name REF is loaded at the samples' size (ImageNet for a latent DiT: 256)
        size = mod.IMAGE_SIZE if latent else args.resolution
        data = ["--data-path", args.data_path] if getattr(args, "data_path", None) else []
        own = ((torch.arange(i * a.batch_size, i * a.batch_size + len(x)), x)  # this rank's shards
               for i, x in ((i, shard_images(paths[i])) for i in range(rank, len(paths), world)))
        inception = fid.load_inception(device=device)
        result = fid.fid_from_samples(fid.Source(own, n=a.n), a.fid, inception,
                                      data_args=[*data, "--resolution", str(size)],
                                      cache_dir=fid.CACHE_DIR)
        if rank == 0:
            fid.report(result, world, device)
            return {**result, "ckpt": a.ckpt, "images": ckpt.get("images") or 0}
    return None


def shard_images(path):
    """A shard's images as uint8 (B, C, H, W)."""
    with np.load(path) as f:
        return torch.from_numpy(f["images"]).permute(0, 3, 1, 2)


def merge(paths, f, n, classes):
    """Write the shards into file f as the ADM evaluator's npz (arr_0 uint8 NHWC, arr_1 labels when
    class-conditional), as np.savez would, holding one shard at a time; returns each shard's NFE."""
    labels, nfes, pos = np.zeros(n, np.int64), [], 0
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        with z.open("arr_0.npy", "w", force_zip64=True) as member:
            for i, path in enumerate(paths):
                with np.load(path) as shard:
                    x = shard["images"]
                    if i == 0:
                        header = {"descr": np.lib.format.dtype_to_descr(x.dtype), "shape": (n, *x.shape[1:]),
                                  "fortran_order": False}
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
