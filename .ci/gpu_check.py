"""The GPU check behind `.ci/gpu`: the GPU tests, the training benchmarks at the paper's per-GPU
batch, FID feature and sampling throughput, and the compile/DDP order, then one JSON line on stdout
(progress goes to stderr). Nothing in it has run on a GPU before the first GPU it meets, so every
part runs on its own: one that fails is recorded as an error and the others still measure.

    .ci/gpu                    # everything, under 8 minutes on one H100/H200
    .ci/gpu bench sample       # only these parts (a rerun after a failure, in the little
                               # GPU time there is)
"""
import argparse
import contextlib
import copy
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PARTS = ("tests", "bench", "fid", "sample", "ddp-order")
BENCH_STEPS = 20  # 5 interleaved rounds of 4 steps, self-conditioning on and off: seconds per net

# The paper's per-GPU batch: Table 11's global batch over the paper's GPU count. DiT-B/1's 1024
# over 6 GPUs is 170.7, so 4 of them ran 171 and 2 ran 170; 170 is what every GPU ran at least.
BENCHES = {
    "ddpm": ("train_unet.py", ["--net", "ddpm", "--batch-size", "128"]),      # 512 / 4
    "ddpmpp": ("train_unet.py", ["--net", "ddpmpp", "--batch-size", "64"]),   # 256 / 4
    "uvit_s": ("train_uvit.py", ["--batch-size", "64"]),                      # 256 / 4
    "dit_b1": ("train_dit.py", ["--no-class-cond", "--batch-size", "170"]),   # 1024 / 6
}
# What the compile/DDP order is timed on: the paper's most-run net at its per-GPU batch.
DDP_ORDER_NET = ["--net", "ddpm", "--self-cond", "--batch-size", "128"]

def log(msg):
    print(f"gpu check: {msg}", file=sys.stderr, flush=True)

def datasheet_bf16_tflops(gpu):
    """Dense bf16 TFLOP/s of NVIDIA's datasheet for the cards this check was written for, else
    None. 'NVIDIA H100 80GB HBM3' is the SXM card; the PCIe and NVL variants have lower peaks."""
    if "NVL" in gpu or "PCIe" in gpu:
        return None
    return 989.0 if "H100" in gpu or "H200" in gpu else None

def last_json(text):
    """The last line of `text` that is a JSON object: what --bench and pytest's tail end with."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")

def run(cmd, timeout):
    """A subprocess in the repository root; its output, or an error carrying the output's tail."""
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"exit {p.returncode}: {(p.stdout + p.stderr)[-2000:]}")
    return p.stdout

# ------------------------------------------------------------------------------------------------
# The parts: each returns a dict of figures or raises

def gpu_tests(tmp):
    """test_smoke.py's `-m gpu` set: counts, and the names of the tests that failed."""
    try:
        import pytest  # noqa: F401  (not a runtime dependency: the machine may lack it)
    except ImportError:
        return {"not_run": "pytest is not installed"}
    xml = Path(tmp) / "gpu-tests.xml"
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu",
                        "-p", "no:cacheprovider", f"--junitxml={xml}", "test_smoke.py"],
                       cwd=ROOT, capture_output=True, text=True, timeout=360)
    print(p.stdout[-6000:], file=sys.stderr)  # pytest's own report, failures included
    return junit_counts(xml.read_text())

def junit_counts(text):
    suite = ET.fromstring(text)
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return {"passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"],
            "failed": n["failures"] + n["errors"], "skipped": n["skipped"], "failed_tests": failed}

def bench(script, argv, steps=BENCH_STEPS):
    """The trainer's own --bench with self-conditioning on (it times it off too): its JSON
    record."""
    out = run([sys.executable, script, *argv, "--self-cond", "--bench", str(steps)], timeout=300)
    return last_json(out)

def bench_part(script, argv, peak):
    return bench_figures(bench(script, argv), peak)

def bench_figures(rec, peak):
    """The figures of one --bench record, MFU also against the datasheet peak when it is known."""
    keys = ("batch", "img_per_s", "ms_per_step", "peak_mem_gib", "gflop_per_img", "tflops", "mfu",
            "matmul_peak_tflops", "self_cond_overhead")
    out = {k: rec[k] for k in keys}
    if peak:
        out["mfu_datasheet"] = rec["tflops"] / peak
    return out

def fid_speed(device, n=1000, batch=200, rounds=5):
    """fid.py's feature extraction in images/s: random Inception weights loaded from a file as the
    official ones are, 32x32 uint8 images on the host (resized to 299 inside the network), so on a
    GPU the pinned-memory copies are part of what is timed (fid.py --bench builds its network on
    the CPU, on a GPU machine too)."""
    import fid
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(fid.InceptionV3().state_dict(), Path(tmp) / fid.FID_WEIGHTS)
        model = fid.load_inception(str(Path(tmp) / fid.FID_WEIGHTS), device)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    times = []
    for r in range(rounds + 1):  # round 0 warms up (cuDNN's algorithm search)
        t = time.perf_counter()
        f = fid.compute_features(x, model, batch_size=batch)[0]  # on the host: the work is done
        times.append(time.perf_counter() - t)
    assert f.shape == (n, 2048)
    return {"fid_features_per_s": n / statistics.median(times[1:]), "batch": batch}

def sample_speed(tmp, net_argv=("--net", "B", "--dataset", "in1k"), vae_config="f16d32", batch=100,
                 steps=250):
    """sample.py's images/s for a class-conditional latent DiT with the paper's sampler (Euler,
    CFG 1.5), VA-VAE decoding included, random weights in the checkpoint contract. Timed as the
    difference of runs of 2 and 1 batches, so loading and start-up cancel."""
    import sample
    import train_dit
    tmp = Path(tmp)
    args = train_dit.get_args([*net_argv, "--vae-config", vae_config,
                               "--vae", str(tmp / "vae.pt")])
    torch.save(train_dit.build_vae(args).state_dict(), tmp / "vae.pt")
    model = train_dit.build_model(args)
    torch.save({"script": "train_dit.py", "args": vars(args), "model": model.state_dict(),
                "ema": model.state_dict(), "step": 0, "images": 0,
                "latent_stats": {"mean": torch.zeros(model.in_ch),
                                 "std": torch.ones(model.in_ch)}},
               tmp / "ckpt.pt")
    common = ["--ckpt", str(tmp / "ckpt.pt"), "--batch-size", str(batch), "--sampler", "euler"]
    sample.main([*common, "--num-samples", str(batch), "--steps", "2", "--out", str(tmp / "warm")])
    secs = []
    for n in (batch, 2 * batch):
        t = time.perf_counter()
        sample.main([*common, "--num-samples", str(n), "--steps", str(steps),
                     "--out", str(tmp / f"n{n}")])
        secs.append(time.perf_counter() - t)
    cfg = json.loads((tmp / f"n{2 * batch}" / "config.json").read_text())["cfg_scale"]
    return {"img_per_s": batch / (secs[1] - secs[0]), "batch": batch, "steps": steps,
            "cfg_scale": cfg, "seconds_per_batch": secs[1] - secs[0]}

def _ddp_order_worker(rank, world, port, argv, backend, steps, result):
    """One rank: the same training step under torch.compile(DDP(model)) and
    DDP(torch.compile(model)) (the trainers' order), timed in interleaved rounds after the
    compilation."""
    import torch.distributed as dist
    import train_unet as mod
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    args = mod.get_args(argv)  # --batch-size here is per rank: what one GPU of the paper ran

    def build(order):
        torch.manual_seed(args.seed)
        model = mod.build_model(args).to(device, memory_format=mod.memory_format(device))
        ema = copy.deepcopy(model).requires_grad_(False).eval()
        opt, diffusion = mod.build_optimizer(model, args), mod.build_diffusion(args, model)
        batch, ids = mod.fake_batch(args, device), [rank] if cuda else None
        ddp = torch.nn.parallel.DistributedDataParallel
        net = (torch.compile(ddp(model, device_ids=ids), backend=backend)
               if order == "compile(DDP)"
               else ddp(torch.compile(model, backend=backend), device_ids=ids))
        return lambda i: mod.train_step(net, model, ema, opt, diffusion, batch, i, args)

    def timed(step, n):
        mod.sync(device)
        t = time.perf_counter()
        for i in range(n):
            step(i)
        mod.sync(device)
        return (time.perf_counter() - t) / n

    orders = {o: build(o) for o in ("compile(DDP)", "DDP(compile)")}
    for step in orders.values():
        timed(step, 2)  # compilation
    rows = [{o: timed(step, steps) for o, step in orders.items()} for _ in range(3)]
    if rank == 0:
        ms = {o: 1e3 * statistics.median(r[o] for r in rows) for o in orders}
        Path(result).write_text(json.dumps({
            "world": world, "net": " ".join(argv), "ms_per_step": ms,
            "faster": min(ms, key=ms.get),
            "ratio_compile_ddp_over_ddp_compile": ms["compile(DDP)"] / ms["DDP(compile)"]}))
    dist.destroy_process_group()

def ddp_order(gpus, tmp, argv=DDP_ORDER_NET, backend="inductor", steps=10, world=2, timeout=400):
    """Which order is faster, over 2 ranks. The trainers wrap DDP(torch.compile(model))."""
    if gpus < world and torch.cuda.is_available():
        return {"not_measured": f"{gpus} GPU: the order needs {world} ranks"}
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = Path(tmp) / "ddp-order.json"
    ranks = mp.spawn(_ddp_order_worker,
                     args=(world, port, list(argv), backend, steps, str(result)),
                     nprocs=world, join=False)
    deadline = time.time() + timeout
    # join raises if a rank failed; a hang (a collective) must not stall the check
    while not ranks.join(timeout=5):
        if time.time() > deadline:
            for p in ranks.processes:
                p.kill()
            raise TimeoutError(f"no result within {timeout} s")
    return json.loads(result.read_text())

# ------------------------------------------------------------------------------------------------
# Assembly

def environment():
    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if cuda else "none"
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "gpu": gpu, "gpus": torch.cuda.device_count() if cuda else 0,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "datasheet_bf16_tflops": datasheet_bf16_tflops(gpu)}

def rounded(obj):
    """Floats to 4 significant digits, so the one line stays readable."""
    if isinstance(obj, float):
        return float(f"{obj:.4g}")
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    return [rounded(v) for v in obj] if isinstance(obj, list) else obj

def measure(figures, name, fn, *args):
    """figures[name] = fn(*args), or the error that stopped it: one broken part costs only
    itself."""
    log(f"{name} ...")
    t = time.perf_counter()
    try:
        # sample.py's lines: stdout is for the JSON line alone
        with contextlib.redirect_stdout(sys.stderr):
            figures[name] = fn(*args)
    # a subprocess's exit, a timeout, a CUDA error: all the same here
    except Exception as e:  # noqa: BLE001
        figures[name] = {"error": f"{type(e).__name__}: {e}"[-2000:]}
    log(f"{name} done in {time.perf_counter() - t:.0f} s")

def failed(figures):
    """The parts that errored, and a GPU test set with failures: what makes the exit status 1."""
    bad = [k for k, v in figures.items() if isinstance(v, dict) and "error" in v]
    bad += [f"bench {k}" for k, v in figures.get("bench", {}).items() if "error" in v]
    return bad + (["tests"] if figures.get("tests", {}).get("failed") else [])

def readme_table(figures):
    """The README performance table's GPU figures, in its own units, ready to paste."""
    peak = figures["datasheet_bf16_tflops"]
    mfu = (f"MFU (of {peak:g} TFLOP/s bf16 dense)" if peak
           else "MFU (of the measured bf16 matmul peak)")
    lines = [f"{figures['gpu']}, {figures['date'][:10]}, torch {figures['torch']}, "
             f"--bench {BENCH_STEPS}:",
             f"| net | batch per GPU | img/s per GPU | {mfu} | self-cond step time |",
             "|---|---|---|---|---|"]
    for name, r in figures.get("bench", {}).items():
        if "error" not in r:
            lines.append(f"| {name} | {r['batch']} | {r['img_per_s']:.0f} | "
                         f"{100 * r.get('mfu_datasheet', r['mfu']):.1f}% | "
                         f"x{r['self_cond_overhead']:.3f} |")
    if "fid_features_per_s" in figures.get("fid", {}):
        lines.append(f"FID features: {figures['fid']['fid_features_per_s']:.0f} images/s")
    if "img_per_s" in figures.get("sample_dit_b1", {}):
        lines.append("DiT-B/1 sampling, Euler-250 + CFG: "
                     f"{figures['sample_dit_b1']['img_per_s']:.1f} images/s")
    return "\n".join(lines)

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("parts", nargs="*", metavar="PART",
                   help=f"only these: {', '.join(PARTS)} (default: all)")
    args = p.parse_args(argv)
    unknown = [x for x in args.parts if x not in PARTS]
    if unknown:  # argparse's choices cannot check a list that may be empty
        p.error(f"unknown part {', '.join(unknown)}: choose from {', '.join(PARTS)}")
    args.parts = args.parts or list(PARTS)
    return args

def main(argv=None):
    args = get_args(argv)
    if not torch.cuda.is_available():
        print("gpu check: no CUDA device (torch.cuda.is_available() is False); nothing to run")
        return 0
    t0, env = time.perf_counter(), environment()
    figures = {**env}
    log(f"{env['gpus']} x {env['gpu']}, torch {env['torch']}, parts: {' '.join(args.parts)}")
    with tempfile.TemporaryDirectory() as tmp:
        if "tests" in args.parts:
            measure(figures, "tests", gpu_tests, tmp)
        if "bench" in args.parts:
            figures["bench"] = {}
            for name, (script, net) in BENCHES.items():
                measure(figures["bench"], name, bench_part, script, net,
                        env["datasheet_bf16_tflops"])
        if "fid" in args.parts:
            measure(figures, "fid", fid_speed, torch.device("cuda"))
        if "sample" in args.parts:
            measure(figures, "sample_dit_b1", sample_speed, tmp)
        if "ddp-order" in args.parts:
            measure(figures, "ddp_order", ddp_order, env["gpus"], tmp)
    figures["seconds"] = round(time.perf_counter() - t0)
    print(readme_table(figures), file=sys.stderr)
    print(json.dumps(rounded(figures)))
    bad = failed(figures)
    if bad:
        log(f"failed: {', '.join(bad)}")
    return 1 if bad else 0

if __name__ == "__main__":
    sys.exit(main())
