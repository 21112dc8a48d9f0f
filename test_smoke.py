"""DDAE++ tests: small CPU configs, fake data, random weights; nothing touches the network.

    python -m pytest -q test_smoke.py        # what CI runs; `.ci/gpu` runs the `-m gpu` tests

Project modules are imported at first use, not at collection. The evaluation's memory benchmark
is .ci/memory.py.
"""
import argparse, ast, datetime, functools, hashlib, importlib.util, io, json, math, os, pickle
import re, shlex, shutil, socket, subprocess, sys, tarfile, tempfile, time, types, warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT / ".ci")]  # .ci: gpu_check's spawned workers import it by name
torch.set_num_threads(1)  # as a torchrun worker: its float sums; on a busy box no OpenMP spinning

def lazy(name):
    """Module `name`, imported at its first attribute access (collection imports none of them)."""
    if name not in sys.modules:
        spec = importlib.util.find_spec(name)
        spec.loader = importlib.util.LazyLoader(spec.loader)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]

fid, gpu_check, memory, probe, sample, train_dit, train_unet, train_uvit = map(lazy, (
    "fid", "gpu_check", "memory", "probe", "sample", "train_dit", "train_unet", "train_uvit"))
Image = lazy("PIL.Image")
TRAINERS = ("train_unet.py", "train_uvit.py", "train_dit.py")
PIXEL = ("train_unet.py", "train_uvit.py")
CPU = torch.device("cpu")

def module(script):
    """The trainer or tool module of a script name ("train_unet.py" or "train_unet")."""
    return sys.modules[Path(script).stem]

# ------------------------------------------------------------------------------------------------
# Helpers: processes and ranks, runs and checkpoints, files, errors

def _run(*argv, timeout=600, env=None):
    """`python *argv` in the repository, as a user runs it: the completed process."""
    p = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, cwd=ROOT,
                       timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert p.returncode == 0, f"{argv[:4]} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p

def _proc(script, *argv):
    """A script in a process of its own (what a scheduler kills), on one OpenMP thread."""
    return subprocess.Popen([sys.executable, script, *map(str, argv)], cwd=ROOT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

def _wait_for_step(out, step, proc):
    """Until the run in `out` logs `step`; read once a poll: the file may hold a part of a line."""
    text = ""
    while not text.endswith("\n") or json.loads(text.splitlines()[-1])["step"] < step:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)
        text = (out / "metrics.jsonl").read_text() if (out / "metrics.jsonl").exists() else ""

def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]

def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)

def _same(a, b, keys=("model", "ema")):
    """Two checkpoints (or state dicts under `keys`) hold bitwise equal weights."""
    return all(torch.equal(a[k][n], b[k][n]) for k in keys for n in a[k])

def _raises(msg, fn, *args, exc=SystemExit, **kwargs):
    """fn(*args, **kwargs) raises exc matching msg: its message."""
    with pytest.raises(exc, match=msg or None) as e:
        fn(*args, **kwargs)
    return str(e.value)

def _one_line(msg, fn, *args, **kwargs):
    """fn(...) exits with a one-line message matching msg: the message."""
    text = _raises(msg, fn, *args, **kwargs)
    assert "\n" not in text, text
    return text

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def _rank_main(rank, world, port, result, fn, args, gloo):
    """One rank as torchrun starts it (its env:// variables, one thread): fn's return to result."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if gloo:
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=gloo))
    out = fn(rank, world, *args)
    if gloo:
        torch.distributed.destroy_process_group()
    Path(f"{result}.{rank}").write_bytes(pickle.dumps(out))

def _timed(rank, world, fn, *args):
    """fn's return and its seconds on this rank, not counting the rank's start."""
    t0 = time.time()
    return fn(rank, world, *args), time.time() - t0

def ranks(world, fn, *args, gloo=None):
    """fn(rank, world, *args) on spawned ranks: their returns. gloo: a process group's timeout."""
    with tempfile.TemporaryDirectory() as tmp:
        args = (world, free_port(), f"{tmp}/r", fn, args, gloo)
        torch.multiprocessing.spawn(_rank_main, args=args, nprocs=world)
        return [pickle.loads(Path(f"{tmp}/r.{r}").read_bytes()) for r in range(world)]

TINY = ["--net", "tiny", "--dataset", "shapes", "--resolution", "16"]  # every trainer's CPU preset

def _flags(images, *extra, log=64):
    """The tiny net on 16x16 shapes, 32 a batch, for `images` images (any trainer takes them)."""
    return [*TINY, "--batch-size", "32", "--sample-every", "10000000", "--train-images",
            str(images), "--log-every", str(log), "--warmup-images", "64", *map(str, extra)]

def _unet(out, images, *extra, log=64):
    """A tiny train_unet.py run in `out`, or its resume: (model, ema)."""
    return train_unet.main([*_flags(images, *extra, log=log), "--out", str(out)])

def _toy(sizes, args, split):
    """The shapes toy's split with sizes[0] train / sizes[1] test images, not its 10k / 2k."""
    n, seed = (sizes[0], 0) if split == "train" else (sizes[1], 1)
    return train_unet.make_shapes(n, seed, args.resolution, args.dataset)

@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """tiny_run(*flags, toy=(train, test)): train_unet.py's run, once a session; its folder."""
    runs = {}

    def run(*flags, toy=None):
        if (flags, toy) not in runs:
            out = tmp_path_factory.mktemp("tiny") / "run"
            with pytest.MonkeyPatch.context() as m:
                if toy:
                    m.setattr(train_unet, "shapes_split", functools.partial(_toy, toy))
                train_unet.main([*flags, "--out", str(out)])
            runs[flags, toy] = out
        return runs[flags, toy]
    return run

def _copy_run(run, tmp):
    return Path(shutil.copytree(run, tmp / "run"))

def _ckpt(folder, *argv, script="train_unet.py", seed=None, **extra):
    """folder/ckpt.pt in the checkpoint contract: random weights of the tiny net of argv, args."""
    mod = module(script)
    args = mod.get_args(["--net", "tiny", *map(str, argv)])
    vars(args).update(extra)
    if seed is not None:
        torch.manual_seed(seed)
    sd = mod.build_model(args).state_dict()
    ckpt = {"script": script, "args": vars(args), "model": sd, "ema": sd, "step": 0, "images": 0}
    if getattr(args, "latent", "none") != "none":
        ckpt["latent_stats"] = {"mean": torch.zeros(32), "std": torch.ones(32)}
    Path(folder).mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, Path(folder) / "ckpt.pt")
    return Path(folder) / "ckpt.pt"

def _png(path, image):
    """A uint8 image array saved (png: lossless), its folders made."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(image)).save(path)

def _class_folders(root, n, size=(40, 50), classes=("cat", "dog"), seed=0):
    """root/<class>/<i>.png: n random images of (height, width) `size` per class."""
    rng = np.random.default_rng(seed)
    for c in classes:
        for i in range(n):
            _png(root / c / f"{i}.png", rng.integers(0, 256, (*size, 3), dtype=np.uint8))

def _cifar_batches():
    """The official CIFAR-10 pickles' (file name, content): 4 images per batch file."""
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        yield name, pickle.dumps({b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                                  b"labels": [0, 1, 2, 3]})

def _half_written(error):
    """A torch.save / np.savez that writes half a file, then raises `error`."""
    def save(obj, f=None, **arrays):
        (f or obj).write(b"PK\x03\x04 half a file")
        raise error
    return save

def _stub_fid(monkeypatch, cache):
    """fid.py with .ci/memory.py's stub Inception and a stand-in distance (0 iff the statistics
    agree; a 2048-d sqrtm takes a minute), its reference statistics cached in `cache`."""
    warnings.simplefilter("ignore")  # a handful of images: rank-deficient covariances
    monkeypatch.setattr(fid, "CACHE_DIR", str(cache))
    monkeypatch.setattr(fid, "frechet_distance", _distance_stand_in)
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: memory.StubInception())

def _distance_stand_in(mu1, sigma1, mu2, sigma2):
    return float(abs(mu1 - mu2).sum() + abs(sigma1 - sigma2).sum())

def _fid_images(n, size=32, seed=0, hwc=False):
    """n random uint8 images, (N, 3, H, W), or hwc: (N, H, W, 3) numpy as in ADM's npz files."""
    x = torch.randint(0, 200, (n, 3, size, size), generator=torch.Generator().manual_seed(seed))
    return x.permute(0, 2, 3, 1).numpy().astype(np.uint8) if hwc else x.to(torch.uint8)

def _image_folder(folder, n, size=32, seed=0):
    """n of _fid_images as png files in folder: the (N, H, W, 3) array it holds."""
    x = _fid_images(n, size, seed=seed, hwc=True)
    for i, im in enumerate(x):
        _png(folder / f"{i}.png", im)
    return x
# ------------------------------------------------------------------------------------------------
# The copy rule: each train_*.py stands alone, so the blocks they share are copies, held identical

SHARED = {  # top-level definition -> the trainers that hold a copy of it, character for character
    **dict.fromkeys([  # the plumbing: main, processes, checkpoints, logs, toy, image files, bench
        "SHAPES", "IMG_EXT", "make_shapes", "shapes_split", "local_rank", "raise_on_any",
        "fetch_once", "center_crop", "ImageFiles", "add_training_args", "setup_distributed",
        "use_bf16", "autocast", "memory_format", "epoch_order", "batch_indices", "update_ema",
        "count_params", "save_grid", "atomic_save", "check_out_dir", "resume", "Log", "LossSums",
        "sync", "timed", "matmul_tflops", "benchmark", "main", "crossed", "is_gate", "agree",
        "check_finite", "log_metrics", "snapshot_plan", "timestep_embedding"], TRAINERS),
    **dict.fromkeys(["time_mlp", "SelfCond"], ("train_unet.py", "train_dit.py")),  # adaptive norm
    **dict.fromkeys([  # the pixel trainers: their data, DDPM, augmentation, contrastive, step
        "TOOL_INTERFACE", "DATASETS", "CIFAR", "load_cifar", "image_files", "decode_images",
        "load_pixels", "add_aug_args", "DDPM", "SYM6", "_affine", "_rotate", "_scale",
        "_sym6_operator", "_apply_matrix", "AugmentPipe", "AUGMENT", "AUGMENT_NO_FLIP", "ProjHead",
        "contrastive_loss", "contrastive_step", "load_train_data", "fake_batch", "train_step",
        "sample_preview"], PIXEL),
}
# Each trainer's own: what the shared main and the tools call by name (DiT's data, step, preview)
PER_SCRIPT = {"NETS", "ARCH_KEYS", "get_args", "build_model", "build_diffusion", "build_optimizer",
              "param_report", "load_train_data", "fake_batch", "train_step", "sample_preview",
              "TOOL_INTERFACE", "DATASETS", "image_files", "load_pixels"}

def _top_level(path):
    """{name: source} of the top-level functions, classes and assignments of a file."""
    text = path.read_text()
    lines, out = text.splitlines(), {}
    for node in ast.parse(text).body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        out.update({n: "\n".join(lines[start - 1:node.end_lineno]) for n in names})
    return out

def _copy_rule_breaks(root):
    """What breaks the copy rule in the trainers under root: a list of messages."""
    defs = {f: _top_level(root / f) for f in TRAINERS}
    broken = []
    for name, files in SHARED.items():
        copies = {f: defs[f].get(name) for f in files}
        if None in copies.values() or len(set(copies.values())) > 1:
            broken.append(f"{name} differs among {', '.join(files)} (or is missing)")
    for name in set().union(*defs.values()) - PER_SCRIPT:
        holders = tuple(f for f in TRAINERS if name in defs[f])
        if len(holders) > 1 and holders != SHARED.get(name):
            broken.append(f"{name} is defined in {', '.join(holders)} but not declared shared")
    return broken

def _copies(tmp, files, edits=()):
    """The repository's files copied under tmp, then each (file, old, new) of edits applied."""
    for f in files:
        (tmp / f).parent.mkdir(exist_ok=True)
        (tmp / f).write_text((ROOT / f).read_text())
    for f, old, new in edits:
        (tmp / f).write_text((ROOT / f).read_text().replace(old, new))

def test_copy_rule_shared_blocks_are_identical_and_read_only_what_get_args_defines(tmp_path):
    assert _copy_rule_breaks(ROOT) == []
    # each trainer's get_args defines every args.<name> the shared code reads (DiT lacked one)
    for f in TRAINERS:
        defs = _top_level(ROOT / f)
        tree = ast.parse("\n".join(s for n, s in defs.items() if SHARED.get(n) == TRAINERS))
        uses = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                and isinstance(n.value, ast.Name) and n.value.id == "args"]
        written = {n.attr for n in uses if isinstance(n.ctx, ast.Store)}
        argv = ["--dataset", "shapes", "--latent", "none"] if f == "train_dit.py" else []
        assert {n.attr for n in uses} - written - set(vars(module(f).get_args(argv))) == set(), f
    # the test bites: one edited character in one copy breaks it, and so does an undeclared twin
    _copies(tmp_path, TRAINERS, [("train_uvit.py", "decay = min(rate, 1 - (1 + step) ** (-2 / 3))",
                                  "decay = min(rate, 1 - (1 + step) ** (-3 / 4))")])
    with open(tmp_path / "train_dit.py", "a") as f:
        f.write("\n\ndef norm(ch):\n    return ch\n")
    assert _copy_rule_breaks(tmp_path) == [
        "update_ema differs among train_unet.py, train_uvit.py, train_dit.py (or is missing)",
        "norm is defined in train_unet.py, train_dit.py but not declared shared"]

# The tool interface: each trainer's TOOL_INTERFACE names what the tools (sample.py, probe.py,
# fid.py, .ci/*.py) may call in it; `mod` (a checkpoint's trainer) reaches LATENT_ONLY names for
# train_dit.py alone, every other name in every trainer.
CI_TOOLS = sorted(f".ci/{p.name}" for p in ROOT.glob(".ci/*.py"))
TOOLS = ("sample.py", "probe.py", "fid.py", *CI_TOOLS)
LATENT_ONLY = {"IMAGE_SIZE", "latent_cache", "build_vae", "load_vae", "decode"}
REACH = {"mod": TRAINERS, "_trainer()": ("train_unet.py",), **{f[:-3]: (f,) for f in TRAINERS}}

def _interface_breaks(root):
    """What breaks the tool interface under root: a declared name a trainer does not define, a
    name a tool reaches (mod.X, train_unet.X, getattr(mod, "X")) that it does not declare."""
    declared, broken = {}, []
    for f in TRAINERS:
        tree = ast.parse((root / f).read_text())
        node = next((n for n in tree.body if isinstance(n, ast.Assign)
                     and [getattr(t, "id", None) for t in n.targets] == ["TOOL_INTERFACE"]), None)
        declared[f] = set(ast.literal_eval(node.value)) if node else set()
        broken += [f"{f} declares {n} but does not define it"
                   for n in sorted(declared[f] - set(_top_level(root / f)))]
    for tool in TOOLS:
        text = (root / tool).read_text()
        pattern = r"\b(mod|train_unet|train_uvit|train_dit|_trainer\(\))\.([A-Za-z_]\w*)"
        uses = set(re.findall(pattern, text))
        uses |= {("mod", n) for n in re.findall(r"getattr\(mod, [\"'](\w+)[\"']", text)}
        # neither a file name (train_unet.py) nor a module's own attribute (__name__)
        for via, name in sorted(u for u in uses if u[1] != "py" and not u[1].startswith("__")):
            for f in REACH[via]:
                latent_only = via == "mod" and name in LATENT_ONLY and f != "train_dit.py"
                if name not in declared[f] and not latent_only:
                    broken.append(f"{tool} calls {via}.{name}, which {f} does not declare")
    return broken

def test_tool_interface_is_declared_defined_and_all_the_tools_use(tmp_path):
    assert _interface_breaks(ROOT) == []
    for f in TRAINERS:  # a block near the top: after the imports, before the method
        text = (ROOT / f).read_text()
        assert text.index("\nimport torch\n") < text.index("\nTOOL_INTERFACE = (") < \
            text.index("\n# Self-conditioning")
    # the test bites: a trainer that drops a name it declares, or one the tools call, breaks it
    _copies(tmp_path, (*TRAINERS, *TOOLS), [("train_uvit.py", "def center_crop(", "def centre_(")])
    assert _interface_breaks(tmp_path) == [
        "train_uvit.py declares center_crop but does not define it"]
    _copies(tmp_path, (), [("train_uvit.py", '    "build_model",  #', "    #")])
    broken = _interface_breaks(tmp_path)
    assert "sample.py calls mod.build_model, which train_uvit.py does not declare" in broken
    assert all(m.endswith(" calls mod.build_model, which train_uvit.py does not declare")
               for m in broken)

# ------------------------------------------------------------------------------------------------
# The README's commands

README_SCRIPTS = ("train_unet", "train_uvit", "train_dit", "sample", "probe", "fid", "memory")

def _readme_commands(text):
    """(line, command, script, argv or why it is skipped) of each python or torchrun command of a
    README_SCRIPTS script in the ``` blocks: continuations joined, comments and the launcher
    dropped, $var the first value of the block's `for var in a b; do`, globs kept."""
    found, block, loops, lines, i = [], False, {}, text.splitlines(), 0
    while i < len(lines):
        number, line = i + 1, lines[i]
        while line.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line.rstrip()[:-1] + " " + lines[i]
        i += 1
        if line.lstrip().startswith("```"):
            block, loops = not block, {}
        loop = re.match(r"\s*for (\w+) in (\S+).*?; *do\b", line)
        if loop:
            loops[loop[1]], line = loop[2], line[loop.end():]
        if not block or not re.search(rf"\b({'|'.join(README_SCRIPTS)})\.py\b", line):
            continue
        try:
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            words = list(lexer)
        except ValueError as e:  # an unclosed quote
            found.append((number, line.strip(), None, f"the shell cannot split it ({e})"))
            continue
        while words:  # each command of `a && b; c | d`
            n = next((k for k, w in enumerate(words) if w[0] in "();<>|&"), len(words))
            cmd, words = words[:n], words[n + 1:]
            while cmd and re.fullmatch(r"\w+=\S*", cmd[0]):  # OMP_NUM_THREADS=1 python ...
                cmd = cmd[1:]
            script = next((k for k, w in enumerate(cmd) if w.endswith(".py")), None)
            if script is None or Path(cmd[script]).stem not in README_SCRIPTS or \
                    not re.fullmatch(r"python[\d.]*|torchrun", Path(cmd[0]).name):
                continue
            unset = [v for v in re.findall(r"\$\{?(\w+)", " ".join(cmd)) if v not in loops]
            argv = [re.sub(r"\$\{?(\w+)\}?", lambda m: loops[m[1]], w) for w in cmd[script + 1:]]
            found.append((number, " ".join(cmd), Path(cmd[script]).stem, argv if not unset else
                          f"${unset[0]} is set by no `for {unset[0]} in ...; do` before it"))
    return found

def _parse_only(name, argv):
    """argv through script `name`'s own parser, nothing run: get_args(argv), or main(argv) stopped
    at its parse (fid.py builds its parser in main)."""
    mod = module(name)
    if hasattr(mod, "get_args"):
        return mod.get_args(argv)

    class Parsed(Exception):
        pass
    parse = argparse.ArgumentParser.parse_args

    def parse_and_stop(parser, *args, **kwargs):
        raise Parsed(parse(parser, *args, **kwargs))

    with pytest.MonkeyPatch.context() as m, pytest.raises(Parsed) as parsed:
        m.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
        mod.main(argv)
    return parsed.value.args[0]

def _readme_failures(text, capsys):
    """The commands of README text that their script's parser refuses: line, command and why."""
    failed = []
    for number, command, name, argv in _readme_commands(text):
        if isinstance(argv, str):
            warnings.warn(f"README.md line {number} not checked, {argv}: {command}")
            continue
        try:
            _parse_only(name, argv)
        except SystemExit as e:  # argparse's usage error (exit 2) or the script's own check
            if e.code:
                why = e.code if isinstance(e.code, str) else capsys.readouterr().err.strip()
                failed.append(f"README.md line {number}: {command}\n    {why.splitlines()[-1]}")
    return failed

def test_readme_commands_parse_with_their_scripts_own_parsers(capsys):
    text = (ROOT / "README.md").read_text()
    assert _readme_commands(text), "README.md runs none of the scripts in a ``` block"
    failed = _readme_failures(text, capsys)
    assert not failed, "README commands that their script's parser refuses:\n" + "\n".join(failed)
    # the test bites: a refused flag names its line and command, loop variables and globs expanded
    bad = ("```\nfor n in 4 8; do\n  OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 sample.py \\\n"
           "    --ckpt r/ckpt-*.pt --n $n --bogus  # a comment\ndone\n```\npython probe.py --x\n")
    command = "torchrun --nproc_per_node=2 sample.py --ckpt r/ckpt-*.pt --n $n --bogus"
    argv = "--ckpt r/ckpt-*.pt --n 4 --bogus".split()
    assert _readme_commands(bad) == [(3, command, "sample", argv)]
    (msg,) = _readme_failures(bad, capsys)
    assert msg.startswith(f"README.md line 3: {command}\n")
    assert msg.endswith(": error: unrecognized arguments: --bogus")
# ------------------------------------------------------------------------------------------------
# The trainers' models and arguments

SC_UNET = 128 * 512 + 512 + 512 * 512 + 512 + 256 * 512 + 512  # time MLP, its output, projection

@pytest.mark.parametrize("script,flags,total,sc,add,dry_run", [  # dry_run: its sc_layer, or True
    ("train_unet.py", "--net ddpm", 35_746_307, SC_UNET, 256 * 512 + 512, "out_6"),  # Table 9
    ("train_unet.py", "--net ddpmpp", 56_524_291, SC_UNET, 256 * 512 + 512, None),
    ("train_uvit.py", "--dataset cifar10", 44_255_328, 1_024, None, True),  # U-ViT-S (CIFAR)
    ("train_dit.py", "--no-class-cond", 129_787_424, 1_378_560, 768 * 768 + 768, "block_9"),
    ("train_dit.py", "--net L --no-class-cond", 457_127_936, 2_362_368, None, None)])  # DiT-L/1
def test_param_counts_match_the_paper_and_dry_run_prints_them(script, flags, total, sc, add,
                                                              dry_run):
    """Self-conditioning: +460,288 in both UNets, a [CLS] token and its position row in the U-ViT,
    +1.38M in DiT-B/1 (paper: 129.8M); --sc-mode add costs the projection only. --dry-run (at the
    trainer's default dataset: CIFAR, Table 10's layer) prints the counts."""
    mod = module(script)

    def count(*extra):
        with torch.device("meta"):  # no memory, no init cost
            return mod.count_params(mod.build_model(mod.get_args([*flags.split(), *extra])))
    assert count() == total and count("--self-cond") - total == sc and SC_UNET == 460_288
    assert add is None or count("--self-cond", "--sc-mode", "add") - total == add
    if dry_run:
        argv = [] if script == "train_uvit.py" else flags.split()
        p = _run(script, *argv, "--self-cond", "--dry-run")
        args = json.loads(p.stdout[:p.stdout.rindex("}") + 1])
        assert f"parameters: {total + sc:,} total, {sc:,} self-conditioning" in p.stdout
        assert args["self_cond"] and dry_run in (True, args["sc_layer"])

def test_unet_table10_defaults_feature_layers_and_resolutions():
    get = lambda *a: train_unet.get_args(list(a))
    edm, tin = get("--model", "EDM"), get("--model", "EDM", "--dataset", "tiny-imagenet")
    assert (edm.sc_layer, edm.probe_t, edm.dropout, edm.ema) == ("out_7", 0.06, 0.13, 0.9993)
    assert get("--model", "EDM", "--dataset", "cifar100").sc_layer == "out_6"
    assert get("--net", "ddpmpp", "--model", "DDPM", "--dataset", "cifar100").sc_layer == "out_8"
    assert (tin.sc_layer, tin.probe_t, tin.resolution) == ("out_5", 0.2964, 64)
    assert get("--sc-layer", "3").sc_layer == "out_3"
    tiny = get("--net", "tiny", "--model", "RF")  # not in the paper: the CPU quickstart's settings
    assert (tiny.dropout, tiny.ema, tiny.batch_size, tiny.lr, tiny.sc_layer) == \
        (0.0, 0.9999, 16, 2e-3, "out_3")
    assert get("--net", "tiny", "--dropout", "0.1").dropout == 0.1  # overridable
    _raises("", get, "--sc-layer", "out_13")
    model = train_unet.build_model(get("--net", "ddpm"))
    assert model.feature_layers == [f"out_{i}" for i in range(1, 13)]
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    with torch.no_grad():
        out, feats = model(x, t, feats=("out_1", "out_4", "out_7", "out_10"))
    assert out.shape == x.shape and {k: v.shape[1] for k, v in feats.items()} == \
        {"out_1": 256, "out_4": 256, "out_7": 256, "out_10": 128}

def test_unet_self_cond_starts_as_baseline_and_zero_label_is_no_label():
    base, sc = (train_unet.build_model(train_unet.get_args(["--net", "tiny", "--aug", *f])).eval()
                for f in ([], ["--self-cond"]))
    missing, unexpected = sc.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("self_cond.") for k in missing)
    x, t = torch.randn(4, 3, 32, 32), torch.rand(4)
    with torch.no_grad():
        assert torch.equal(sc(x, t)[0], base(x, t)[0])  # zero-init projection: a no-op at first
        assert torch.equal(base(x, t, aug=torch.zeros(4, 9))[0], base(x, t)[0])
        assert not torch.equal(base(x, t, aug=torch.randn(4, 9))[0], base(x, t)[0])
        sc.self_cond.proj.weight.normal_()
        assert not torch.allclose(sc(x, t)[0], base(x, t)[0])

@pytest.mark.parametrize("script", ["train_unet", "train_dit"])
def test_self_cond_owns_its_zero_init_after_any_model_init(script):
    # after every Linear is re-initialised (as DiT's own init does), reset_parameters() restores it
    torch.manual_seed(0)
    mod = module(script)
    model = mod.build_model(mod.get_args([*TINY[:4], "--self-cond", *(
        ["--latent", "none"] if mod is train_dit else [])]))
    zero = lambda: not model.self_cond.proj.weight.any() and not model.self_cond.proj.bias.any()
    assert zero()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
    assert not zero()
    model.self_cond.reset_parameters()
    assert zero()

def test_snapshot_plan_counts_the_final_weights_once():
    # ImageNet-1k: 90 epochs kept every 20 keep 20/40/60/80 and 90; the final step counted once
    ema, n = nn.Linear(10, 10), 1_281_167
    size = sum(v.nbytes for v in ema.state_dict().values())
    plan = lambda images, batch, every: train_dit.snapshot_plan(types.SimpleNamespace(
        train_images=images, batch_size=batch, keep_every=every, out="run"), ema)
    assert plan(90 * n, 1024, 20 * n).startswith(f"snapshots: 5 kept (every {20 * n:,} images and")
    assert plan(320, 32, 160).startswith("snapshots: 2 kept")
    assert plan(330, 32, 160).startswith("snapshots: 3 ") and plan(320, 32, 1).startswith(
        "snapshots: 10 kept") and plan(320, 32, 0) == "snapshots: none kept (--keep-every 0)"
    assert plan(320, 32, 160).endswith(f"2 x {size / 1e6:.3g} MB = {2 * size / 1e9:.3g} GB in run")

def test_no_flip_steps_see_unflipped_images_and_the_default_still_flips(monkeypatch):
    """--no-flip: train_step's flip, and with --aug the pipe's x-flip, are off; the random draws
    stay a flipping run's (its unflipped rows alike)."""
    batch = torch.linspace(-1, 1, 16).expand(8, 3, 16, 16).contiguous()  # a flip reverses a ramp
    seen = {}
    for flags in ([], ["--no-flip"], ["--aug"], ["--aug", "--no-flip"]):
        args = train_unet.get_args([*TINY, *flags])
        model = train_unet.build_model(args)
        diffusion = train_unet.build_diffusion(args, model)
        loss = diffusion.loss
        monkeypatch.setattr(diffusion, "loss", lambda net, x, aug, feats: seen.__setitem__(
            " ".join(flags), (x, aug)) or loss(net, x, aug, feats))
        torch.manual_seed(0)
        train_unet.train_step(model, model, train_unet.build_model(args),
                              train_unet.build_optimizer(model, args), diffusion, batch, 0, args)
        seen[" ".join(flags)] += (torch.rand(4),)  # the draws after the step
    flipped = (seen[""][0] == batch.flip(3)).flatten(1).all(1)
    assert 0 < flipped.sum() < 8 and torch.equal(seen[""][0][~flipped], batch[~flipped])
    assert torch.equal(seen["--no-flip"][0], batch) and torch.equal(seen["--no-flip"][2],
                                                                    seen[""][2])
    xflip, both = seen["--aug"][1][:, 0] > 0, seen["--aug --no-flip"]  # the label: rows flipped
    assert 0 < xflip.sum() < 8 and not both[1][:, 0].any()
    assert torch.equal(both[1][:, 1:], seen["--aug"][1][:, 1:])  # the other ops alike
    assert torch.equal(both[0][~xflip], seen["--aug"][0][~xflip])
    assert torch.equal(both[2], seen["--aug"][2])

# ------------------------------------------------------------------------------------------------
# Training runs: formulations, resume, snapshots, several ranks, signals, failures

@pytest.mark.parametrize("model,sc_mode", [(m, s) for m in ("DDPM", "EDM", "RF")
                                           for s in ("adaptive", "add")])
def test_unet_formulations_train_and_reload(tmp_path, model, sc_mode):
    _, ema = _unet(tmp_path, 256, "--model", model, "--self-cond", "--sc-mode", sc_mode, log=128)
    m, ckpt = _metrics(tmp_path), _load(tmp_path / "ckpt.pt")
    assert m[-1]["loss"] < 0.9 * m[0]["loss"], m
    assert ckpt["script"] == "train_unet.py" and ckpt["step"] == 8 and ckpt["images"] == 256
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    args = train_unet.get_args([])
    vars(args).update(ckpt["args"])
    rebuilt = train_unet.build_model(args)
    rebuilt.load_state_dict(ckpt["ema"], strict=True)
    assert _same({"ema": rebuilt.state_dict()}, {"ema": ema.state_dict()}, ["ema"])

def _ref(images=384, *extra):  # 12 steps: the session's reference run (tiny_run), or half
    return _flags(images, "--keep-every", 160, *extra, log=32)

def test_unet_resume_is_exact_and_keep_every_keeps_snapshots_and_the_final_weights(tmp_path,
                                                                                  tiny_run):
    """A run stopped half way and rerun longer ends bitwise equal to an uninterrupted run.
    --keep-every keeps ckpt-<images>.pt (EMA and args, loadable weights-only) beside ckpt.pt, the
    final weights too; the run's start says how many it keeps and their size."""
    ref = tiny_run(*_ref())
    train_unet.main([*_ref(192), "--out", str(tmp_path)])  # stops at step 6
    assert _load(tmp_path / "ckpt.pt")["step"] == 6
    train_unet.main([*_ref(), "--out", str(tmp_path)])
    assert "resumed from" in (tmp_path / "log.txt").read_text()
    assert _same(_load(tmp_path / "ckpt.pt"), _load(ref / "ckpt.pt"))
    names = sorted(p.name for p in ref.glob("ckpt-*.pt"))
    assert names == [f"ckpt-{i:09d}.pt" for i in (160, 320, 384)]
    snap, last = _load(ref / "ckpt-000000384.pt"), _load(ref / "ckpt.pt")
    assert set(snap) == {"script", "args", "ema", "step", "images"} and snap["step"] == 12
    assert snap["images"] == 384 and _same(snap, last, ["ema"]) and last.keys() >= {"model", "opt"}
    size = sum(v.nbytes for v in last["ema"].values())  # EMA parameters x 4 bytes
    assert size < (ref / "ckpt-000000160.pt").stat().st_size < 1.05 * size  # on disk: +2%
    assert (f"snapshots: 3 kept (every 160 images and the final weights), 3 x {size / 1e6:.3g} MB "
            f"= {3 * size / 1e9:.3g} GB in {ref}") in (ref / "log.txt").read_text()
    assert sample.load_checkpoint(ref / "ckpt-000000160.pt")[4]["images"] == 160  # sampling
    assert train_unet.get_args(["--dataset", "shapes"]).keep_epochs == 0  # the quickstart: none
    assert train_unet.get_args([]).keep_epochs == 200  # App. A: FID every 200 epochs

def _train_rank(rank, world, script, argv):
    return module(script).main(argv)[0].state_dict()

def test_unet_two_ranks_hold_identical_weights(tmp_path):
    # two gloo ranks as torchrun --nproc_per_node=2 starts them: DDP keeps the replicas equal
    r0, r1 = ranks(2, _train_rank, "train_unet.py", [*_flags(192), "--out", str(tmp_path)])
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert "world 2" in (tmp_path / "log.txt").read_text()
    assert _metrics(tmp_path)[-1]["images"] == 192

def test_unet_quickstart_loss_falls_grid_and_resume(tmp_path):
    # the README quickstart, shortened: loss falls, a preview grid is written, a rerun resumes
    argv = ["train_unet.py", "--net", "tiny", "--dataset", "shapes-fixed", "--model", "RF",
            "--self-cond", "--out", tmp_path, "--batch-size", "64", "--log-every", "640",
            "--sample-every", "1280", "--ckpt-every", "1280", "--warmup-images", "128"]
    _run(*argv, "--train-images", "1280")
    assert (tmp_path / "grid-000001280.png").exists()
    p = _run(*argv, "--train-images", "1920")
    assert "resumed from" in p.stdout + p.stderr + (tmp_path / "log.txt").read_text()
    m = _metrics(tmp_path)
    assert [r["step"] for r in m] == [10, 20, 30] and m[-1]["loss"] < 0.6 * m[0]["loss"]

def test_unet_aug_cl_losses_fall(tmp_path):
    _unet(tmp_path, 640, "--model", "EDM", "--aug", "--cl", "--self-cond", log=160)
    m, chance = _metrics(tmp_path), 2 * 0.2 * np.log(32)
    assert m[0]["cl_loss"] < 1.2 * chance and m[-1]["cl_loss"] < 0.6 * chance, m
    assert m[-1]["loss"] < m[0]["loss"]

def test_checkpoints_by_wall_clock_and_no_previews(tmp_path, monkeypatch):
    saves, save = [], train_unet.atomic_save
    monkeypatch.setattr(train_unet, "atomic_save",
                        lambda obj, path: saves.append(obj["step"]) or save(obj, path))
    _unet(tmp_path / "a", 128, "--ckpt-every", "1000000", "--sample-every", "0")  # 4 steps, 1 save
    assert saves == [4] and not list((tmp_path / "a").glob("grid-*"))
    saves.clear()  # the clock is always due; ranks read it at gates, here each step (a log line)
    _unet(tmp_path / "b", 128, "--ckpt-every", "1000000", "--ckpt-minutes", "0", log=32)
    assert saves == [1, 2, 3, 4]

def test_nan_loss_failed_writes_and_refused_resumes_keep_the_last_good_checkpoint(
        tmp_path, tiny_run, monkeypatch):
    """A nan loss and a failed or killed write keep the last good checkpoint and say so; changed
    settings are a warning; another architecture, another trainer's checkpoint and a truncated
    one are refused, the file left as it was; the tools refuse mismatched shapes."""
    out = _copy_run(tiny_run(*_flags(64)), tmp_path)
    ckpt, before = out / "ckpt.pt", (out / "ckpt.pt").read_bytes()
    with monkeypatch.context() as m:
        loss = train_unet.DDPM.loss
        m.setattr(train_unet.DDPM, "loss", lambda self, *a, **k: (
            lambda r: (r[0] * float("nan"), *r[1:]))(loss(self, *a, **k)))
        _raises(r"loss is nan at step 4 \(128 images\); the last good checkpoint", _unet, out, 128)
        assert ckpt.read_bytes() == before
        msg = r"loss is nan at step 1 \(32 images\); no checkpoint was written"
        _raises(msg + "; lower --lr", _unet, tmp_path / "new", 64, log=32)
        assert re.search(msg, (tmp_path / "new" / "log.txt").read_text())
        assert not (tmp_path / "new" / "ckpt.pt").exists()
    monkeypatch.setattr(torch, "save", _half_written(KeyboardInterrupt()))  # a kill mid-write
    _raises("", _unet, out, 128, exc=KeyboardInterrupt)
    assert ckpt.read_bytes() == before
    pos = "[enforce fail at inline_container.cc:672] . unexpected pos 1935744 vs 1935632"
    monkeypatch.setattr(torch, "save", _half_written(RuntimeError(pos + "\nframe #0")))  # full
    assert _raises("", _unet, out, 128) == \
        f"cannot write {ckpt} ({pos}); the previous {ckpt} is intact"
    assert ckpt.read_bytes() == before and not (out / "ckpt.pt.tmp").exists()
    monkeypatch.undo()
    with monkeypatch.context() as m:
        m.setattr(np, "savez", _half_written(OSError(28, "No space left on device")))
        _raises(r"cannot write .*shard-0000000.npz \(\[Errno 28\] No space left on device\); "
                "nothing was written", sample.main, ["--ckpt", str(ckpt), "--num-samples", "2",
                                                     "--steps", "2", "--out", str(tmp_path / "s")])
    assert os.listdir(tmp_path / "s" / "shards") == []
    _unet(out, 96, "--grad-clip", "0.5")
    log = (out / "log.txt").read_text()
    assert "warning: resuming with changed settings: " in log and "grad_clip 1.0 -> 0.5" in log
    saved, before = _load(ckpt), ckpt.read_bytes()
    _raises("another architecture.*self_cond", _unet, out, 128, "--self-cond")
    assert ckpt.read_bytes() == before
    torch.save({**saved, "script": "train_dit.py"}, ckpt)
    before = ckpt.read_bytes()
    _raises("was written by train_dit.py, not train_unet.py", _unet, out, 128)
    assert ckpt.read_bytes() == before
    ckpt.write_bytes(before[: len(before) // 2])
    _raises("truncated or corrupt", _unet, out, 128)
    assert ckpt.read_bytes() == before[: len(before) // 2]  # left for the user to inspect
    saved["ema"]["conv_out.weight"] = torch.zeros(3, 1, 3, 3)
    torch.save(saved, tmp_path / "edited.pt")
    _raises(r"does not match the train_unet.py model .*conv_out.weight", sample.load_checkpoint,
            tmp_path / "edited.pt")

KILLS = {  # script -> a tiny run checkpointing every step, the steps it is killed at
    "train_unet.py": (_ref(384, "--ckpt-every", 32),  # 12 steps; then a SIGTERM
                      sorted(np.random.default_rng(0).choice(np.arange(2, 9), 3, replace=False))),
    "train_uvit.py": (_flags(256, "--ckpt-every", 32, log=32), [3]),  # 8 steps
    "train_dit.py": (_flags(256, "--ckpt-every", 32, "--sample-every", 0, "--latent", "none",
                            log=32), [3])}

@pytest.mark.parametrize("script", TRAINERS)
def test_sigkill_or_sigterm_then_resume_is_exact(tmp_path, tiny_run, script):
    """Killed with SIGKILL mid-run (the UNet at three random steps, then stopped by SIGTERM, which
    saves and exits 0) and rerun with the same command, a run ends bitwise equal to an
    uninterrupted one (the UNet's: the session's tiny_run, trained in-process on one thread)."""
    flags, kills = KILLS[script]
    run = lambda name, *f: _proc(script, *(f or flags), "--out", tmp_path / name)
    ref = tiny_run(*_ref()) / "ckpt.pt" if script == "train_unet.py" else run("ref")
    for step in kills:
        killed = run("killed")
        _wait_for_step(tmp_path / "killed", int(step), killed)
        killed.kill()
        killed.wait()
        _load(tmp_path / "killed" / "ckpt.pt")  # whatever instant it died at, the checkpoint loads
    if script == "train_unet.py":  # no --ckpt-every: the checkpoint past the kills is SIGTERM's
        proc = run("killed", *_ref())
        _wait_for_step(tmp_path / "killed", kills[-1] + 2, proc)
        proc.terminate()
        assert proc.wait() == 0, proc.stderr.read()[-2000:]
        assert "stopped by signal" in (tmp_path / "killed" / "log.txt").read_text()
        assert kills[-1] + 2 <= _load(tmp_path / "killed" / "ckpt.pt")["step"] < 12
    for p in (run("killed"), ref):
        assert isinstance(p, Path) or p.wait() == 0, p.stderr.read()[-2000:]
    a, b = (_load(p) for p in (tmp_path / "killed" / "ckpt.pt", ref if isinstance(ref, Path) else
                                tmp_path / "ref" / "ckpt.pt"))
    assert a["step"] == b["step"] == int(flags[flags.index("--train-images") + 1]) // 32
    assert _same(a, b)

@pytest.mark.parametrize("script,extra", [("train_unet.py", ["--model", "EDM"]),
                                          ("train_uvit.py", []),
                                          ("train_dit.py", ["--latent", "none"])])
def test_bench_reports_speed_flops_and_self_cond_overhead(script, extra, capsys):
    argv = [*TINY, "--batch-size", "8", "--self-cond", "--bench", "1", *extra]
    rec = module(script).main(argv)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == rec  # the final line
    assert rec["self_cond"] and rec["batch"] == 8 and rec["img_per_s"] > 0
    assert rec["gflop_per_img"] > 0 and 0 < rec["mfu"] < 1
    assert rec["self_cond_overhead"] > 0 and rec["peak_mem_gib"] > 0
    if script == "train_unet.py":  # --bench times train_step: --cl adds the EMA forward of the
        cl = train_unet.main([*argv, "--aug", "--cl"])  # second view (4/3 of 3F; 1.43 measured)
        assert 1.3 < cl["gflop_per_img"] / rec["gflop_per_img"] < 1.6

# ------------------------------------------------------------------------------------------------
# First runs: downloads under several ranks, the GPU branches on CPU, bad input; data

def _fetch_rank(rank, world, tmp):
    """A rank fetching CIFAR and the VA-VAE twice each: the first fetch fails, the second works."""
    tmp = Path(tmp)
    os.environ["XDG_CACHE_HOME"] = str(tmp / "cache")

    def fetch(url, dst, *args, **kwargs):  # torch.hub.download_url_to_file, as trainers call it
        with open(tmp / "fetches", "a") as f:
            f.write(f"{rank} {Path(url).name}\n")
        time.sleep(0.5)  # a slow network: the others must wait, not read a half-made file
        if sum(Path(url).name in line for line in (tmp / "fetches").read_text().splitlines()) == 1:
            raise OSError("Network is unreachable")
        Path(dst).write_bytes((tmp / ("vae.pt" if url == train_dit.VAVAE_URL else "cifar.tar.gz"))
                              .read_bytes())
    torch.hub.download_url_to_file = fetch
    url, _, *rest = train_unet.CIFAR["cifar10"]
    train_unet.CIFAR["cifar10"] = (url, hashlib.md5((tmp / "cifar.tar.gz").read_bytes())
                                   .hexdigest(), *rest)
    args, results = train_dit.get_args(["--vae-config", "tiny"]), []
    for load in [lambda: train_unet.load_cifar("cifar10", tmp / "data", "train")[0].shape] * 2 + \
            [lambda: train_dit.load_vae(args, CPU).quant_conv.weight.shape] * 2:
        try:
            results.append(f"loaded {tuple(load())}")
        except SystemExit as e:
            results.append(f"exit {e}")
    return results

def test_downloads_under_three_ranks_fetch_once_or_fail_alike(tmp_path):
    # one fetch per node (local rank 0) while the others wait; a failure ends every rank alike
    with tarfile.open(tmp_path / "cifar.tar.gz", "w:gz") as tar:  # the official layout
        for name, data in _cifar_batches():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    torch.save(train_dit.build_vae(train_dit.get_args(["--vae-config", "tiny"])).state_dict(),
               tmp_path / "vae.pt")
    t0 = time.time()
    results = ranks(3, _fetch_rank, str(tmp_path), gloo=1800)
    assert results[0] == results[1] == results[2] and time.time() - t0 < 120
    cifar_fail, cifar_ok, vae_fail, vae_ok = results[0]
    assert cifar_fail.startswith("exit cifar10 is not in") and "\n" not in cifar_fail
    assert "Network is unreachable" in cifar_fail and "--data-path" in cifar_fail
    assert vae_fail.startswith("exit cannot download the VA-VAE") and "--vae PATH" in vae_fail
    assert cifar_ok == "loaded (20, 3, 32, 32)" and vae_ok == "loaded (64, 64, 1, 1)"
    fetches = (tmp_path / "fetches").read_text().splitlines()
    assert [f.split()[0] for f in fetches] == ["0"] * 4  # one fetch per attempt, by local rank 0
    assert sorted(os.listdir(tmp_path / "data")) == ["cifar-10-batches-py"]  # no partial archive
    assert os.listdir(tmp_path / "cache" / "ddae") == [Path(train_dit.VAVAE_URL).name]
    # nodes on one file system may fetch at once: the loser's rename fails, the data is there
    def lost_the_race(path):
        path.mkdir()  # another node's folder landed first
        raise OSError("[Errno 39] Directory not empty")

    def offline(path):
        raise OSError("no network")
    assert train_unet.fetch_once(tmp_path / "a", lost_the_race, "cannot fetch a") == tmp_path / "a"
    assert _raises("", train_unet.fetch_once, tmp_path / "b", offline, "cannot fetch b") == \
        "cannot fetch b (OSError: no network)"

GPU_STYLE = {"train_unet": ["--model", "RF", "--self-cond"],  # what the GPU check trains too
             "train_uvit": ["--self-cond", "--aug", "--cl"],
             "train_dit": ["--latent", "none", "--self-cond", "--class-cond"]}

def _gpu_style(out, extra):
    """The argv of a 4-step tiny run with --compile, no previews, in `out`."""
    return [*TINY, "--batch-size", "8", "--train-images", "32", "--log-every", "16",
            "--sample-every", "0", "--compile", "--out", str(out), *extra]

@pytest.mark.parametrize("name", list(GPU_STYLE))
def test_bf16_and_compile_run_on_cpu_and_sample(tmp_path, monkeypatch, name):
    """What a GPU run takes, on CPU: bf16 autocast and torch.compile (its graph capture: dynamo and
    AOT autograd; inductor's code generation costs minutes on 2 cores), then sampling in bf16."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    argv = _gpu_style(tmp_path / "run", ["--precision", "bf16", *GPU_STYLE[name]])
    _check_gpu_style_run(tmp_path / "run", module(name).main(argv)[1], f"{name}.py",
                         tmp_path / "samples", ["--precision", "bf16"])

def _check_gpu_style_run(out, ema, script, samples, flags):
    """A 2-step run's figures and checkpoint, then 4 samples of it (bf16)."""
    m, ckpt = _metrics(out), _load(out / "ckpt.pt")
    assert len(m) == 2 and all(math.isfinite(v) for r in m for k, v in r.items()
                               if "loss" in k and v is not None)
    assert all(v.dtype == torch.float32 for k in ("model", "ema") for v in ckpt[k].values()
               if v.is_floating_point())
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])  # clean names
    assert ema is None or set(ckpt["model"]) == set(ema.state_dict())
    assert not list(out.glob("grid-*"))  # --sample-every 0
    # euler: the RF UNet's default rk45 is fp32 only
    steps = "--steps 3" if script == "train_uvit.py" else "--sampler euler --steps 3"
    sample.main(["--ckpt", str(out / "ckpt.pt"), "--num-samples", "4", "--batch-size", "4",
                 "--out", str(samples), *steps.split(), *flags])
    assert json.loads((samples / "config.json").read_text())["bf16"] is True
    x = np.load(samples / "samples.npz")["arr_0"]
    assert x.shape == (4, 16, 16, 3) and x.std() > 0

def test_bad_input_is_one_line_before_anything_is_written(tmp_path, tiny_run, capsys):
    (tmp_path / "afile").write_text("")
    common = ["--net", "tiny", "--dataset", "shapes", "--resolution", "16", "--train-images", "32"]
    for mod, argv, msg in [
            (train_unet, ["--out", str(tmp_path / "afile" / "r")], "afile is a file, not a fold"),
            (train_uvit, ["--out", "/proc/ddae/run"], "cannot write in /proc"),
            (train_dit, ["--latent", "none", "--batch-size", "0", "--out", str(tmp_path / "r0")],
             "--batch-size 0"),
            (train_unet, ["--batch-size", "20000", "--out", str(tmp_path / "r1")],
             "at most the 10,000 training"),
            (train_unet, ["--dataset", "mine", "--data-path", str(tmp_path / "none"), "--out",
                          str(tmp_path / "r2")], "no images found for dataset 'mine'")]:
        _one_line(msg, mod.main, common + argv)
    for mod in (train_unet, train_uvit, train_dit):  # argparse's usage error: exit 2, one line
        e = _raises("", mod.main, [*TINY[:2], "--keep-every", "-5", "--out", str(tmp_path / "r")])
        assert e == "2" and capsys.readouterr().err.splitlines()[-1].endswith(
            ": error: argument --keep-every: -5 is negative: give a count of images, >= 0")
    assert sorted(os.listdir(tmp_path)) == ["afile"]  # a run that fails to start leaves no folder
    out = tiny_run(*_flags(64))
    for argv, msg in ((["--n", "0"], "--n 0"), (["--num-samples", "-3"], "--n -3"),
                      (["--batch-size", "0"], "--batch-size 0"),
                      (["--out", str(tmp_path / "afile" / "s")], "afile is a file")):
        _one_line(msg, sample.main, ["--ckpt", str(out / "ckpt.pt"), *argv])
    assert not [p for p in os.listdir(out) if p.startswith("samples")]  # nothing written

def test_shapes_deterministic_and_balanced():
    x, y, masks, nuisance = train_unet.make_shapes(200, seed=3)
    x2, y2 = train_unet.make_shapes.__wrapped__(200, seed=3)[:2]
    assert x.shape == (200, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x, x2) and torch.equal(y, y2) and torch.bincount(y).tolist() == [20] * 10
    means = torch.stack([x[y == c].float().std(dim=0).mean() for c in range(10)])
    assert (means > 10).all()  # varied within a class: pose, size and colour change
    # a dot's pixels carry 1 + its class, the rest 0; 8 nuisance draws per image (0 in -fixed)
    assert masks.shape == (200, 32, 32) and ((masks == 0) | (masks == y[:, None, None] + 1)).all()
    assert 0.03 < (masks > 0).float().mean() < 0.2
    assert nuisance.shape == (200, 8) and nuisance.std(0).min() > 0
    xf, yf, _, fixed = train_unet.make_shapes(200, seed=3, name="shapes-fixed")
    assert torch.equal(yf, y) and np.ptp(fixed, 0).max() == 0
    assert len(xf.flatten(1).unique(dim=0)) == 200

def test_pixel_loaders_read_cifar_pickles_and_class_folders_in_worker_processes(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    for name, data in _cifar_batches():
        (tmp_path / "cifar-10-batches-py" / name).write_bytes(data)
    args = train_unet.get_args(["--dataset", "cifar10", "--data-path", str(tmp_path)])
    x, y = train_unet.load_pixels(args, "train")
    assert x.shape == (20, 3, 32, 32) and y.tolist() == [0, 1, 2, 3] * 5
    assert train_unet.load_pixels(args, "test")[0].shape == (4, 3, 32, 32)
    _class_folders(tmp_path / "train", 5)  # decoded alike in worker processes, a bad image named
    args = train_unet.get_args(["--dataset", "pets", "--data-path", str(tmp_path), "--resolution",
                                "16", "--workers", "0"])
    ref = train_unet.load_pixels(args, "train")
    args.workers = 2
    x, y = train_unet.load_pixels(args, "train")
    assert x.shape == (10, 3, 16, 16) and torch.equal(x, ref[0])
    assert y.tolist() == [0] * 5 + [1] * 5
    (tmp_path / "train" / "dog" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    _raises("cannot read image .*bad.png.*--skip-bad", train_unet.load_pixels, args, "train")
    args.skip_bad = True
    assert len(train_unet.load_pixels(args, "train")[0]) == 10
    _raises("no images found", train_unet.load_pixels, train_unet.get_args([
        "--dataset", "x", "--data-path", str(tmp_path / "none")]))

# ------------------------------------------------------------------------------------------------
# train_unet.py: non-leaky augmentation, uncertainty, contrastive head

AUG_OPS = {"scale": [2], "rotate": [3, 4], "aniso": [5, 6], "translate": [7, 8]}

def _aug_images(n=6, size=32, smooth=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if not smooth:
        return torch.rand(n, 3, size, size, generator=g) * 2 - 1
    low = torch.rand(n, 3, size // 8, size // 8, generator=g) * 2 - 1  # band-limited: resampling
    return F.interpolate(low, size=size, mode="bicubic", align_corners=False)  # is near-exact

def _aug_only(op, p=1.0):
    """Pipe with the flip off and only `op` on."""
    kw = dict(xflip=False, yflip=0, scale=0, rotate=0, aniso=0, translate=0)
    return train_unet.AugmentPipe(p=p, **{**kw, op: 1})

def test_augment_label_layout_p0_identity_and_determinism():
    x, g = _aug_images(16), lambda s=3: torch.Generator().manual_seed(s)
    for op, slots in {**AUG_OPS, "yflip": [1]}.items():
        _, lab = _aug_only(op)(x, generator=g())
        assert (lab != 0).any(0).nonzero().flatten().tolist() == slots, op
    assert set(lab[:, 1].tolist()) == {0.0, 1.0}
    # p gates each op per image: at the CIFAR p=0.12 most images carry no geometric label
    _, lab = train_unet.AugmentPipe()(_aug_images(400, size=8), generator=g())
    frac = (lab[:, 2:] != 0).any(1).float().mean().item()
    assert abs(frac - (1 - 0.88 ** 4)) < 0.08  # 4 geometric ops, each on with probability p
    x = x[:8]  # p=0: the identity apart from the flip (sym6 resampling still runs: float eps)
    y, lab = train_unet.AugmentPipe(p=0)(x, generator=g(1))
    assert lab.shape == (8, 9) and lab.dtype == torch.float32 and (lab[:, 1:] == 0).all()
    flipped = lab[:, 0] == 1
    assert 0 < flipped.sum() < 8 and ((lab[:, 0] == 0) | flipped).all()
    assert torch.allclose(y, torch.where(flipped.view(-1, 1, 1, 1), x.flip(3), x), atol=1e-4)
    pipe = train_unet.AugmentPipe(p=1)  # deterministic given the generator
    a, b, c = (pipe(x, generator=g(s)) for s in (7, 7, 8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])

def test_augment_labels_describe_the_transform():
    # each image's warp rebuilt from its label alone (docstring formulas), resampled independently
    x, one = _aug_images(8, smooth=True), torch.ones(8)
    for op in AUG_OPS:
        y, lab = _aug_only(op)(x, generator=torch.Generator().manual_seed(5))
        if op == "scale":
            s = 2 ** (-0.2 * lab[:, 2])
            cands = [train_unet._scale(s, s)]
        elif op == "rotate":
            cands = [train_unet._rotate(torch.atan2(lab[:, 4], lab[:, 3] + 1))]
        elif op == "translate":
            cands = [train_unet._affine(one, 0 * one, 0 * one, one, -lab[:, 7] * 32 / 8,
                                        -lab[:, 8] * 32 / 8)]
        else:  # (w cos r, w sin r) fixes (w, r) only up to (-w, r + pi): EDM's label, kept as is
            w, r = lab[:, 5:7].norm(dim=1), torch.atan2(lab[:, 6], lab[:, 5])
            rot, scale, cands = train_unet._rotate, train_unet._scale, []
            for sign, shift in ((1, 0), (-1, math.pi)):
                sa = 2 ** (0.2 * sign * w)
                cands.append(rot(-(r + shift)) @ scale(1 / sa, sa) @ rot(r + shift))
        err = torch.stack([(train_unet._apply_matrix(x, G) - y).abs().amax(dim=(1, 2, 3))
                           for G in cands]).amin(0)
        assert err.max() < 1e-4, (op, err)
        assert (lab[:, AUG_OPS[op][0]] != 0).all()  # p=1: every image got the op

def test_augment_integer_translation_and_rot90_match_roll_and_rot90():
    x, one = _aug_images(4), torch.ones(4)
    shift = train_unet._affine(one, 0 * one, 0 * one, one, -3.0 * one, 2.0 * one)
    y = train_unet._apply_matrix(x, shift)  # output p reads input p + (-3, 2)
    ref = torch.roll(x, shifts=(-2, 3), dims=(2, 3))
    assert torch.allclose(y[..., 6:-6, 6:-6], ref[..., 6:-6, 6:-6], atol=1e-4)
    x = _aug_images(4, smooth=True)
    y = train_unet._apply_matrix(x, train_unet._rotate(torch.full((4,), math.pi / 2)))
    err = (y - torch.rot90(x, 1, dims=(2, 3)))[..., 4:-4, 4:-4].abs()
    # not bit-exact: sym6 is only nearly symmetric (as in EDM)
    assert err.max() < 0.1 and err.mean() < 0.01
    assert (y - torch.rot90(x, -1, dims=(2, 3))).abs().mean() > 0.1  # and the direction is pinned

def test_augment_uncertainty_learns_log_loss():
    # closed form: d/du (L e^-u + u) = 1 - L e^-u vanishes at u = ln L, pushing u to it both ways
    L = torch.tensor(0.3)
    for u0 in (-2.0, 2.0):
        u = torch.tensor(u0, requires_grad=True)
        (L / u.exp() + u).backward()
        assert (u.grad > 0) == (u0 > math.log(0.3))
    unc = train_unet.Uncertainty()
    sigma = torch.exp(torch.linspace(-4, 2, 64))
    assert torch.equal(unc(sigma), torch.zeros(64))  # zero-init: training starts with the EDM loss
    target = 0.5 * sigma ** 0.3 / (1 + sigma)  # some smooth per-sigma loss level
    for _ in range(300):  # plain gradient descent (convex in the linear layer's weights)
        u = unc(sigma)
        unc.zero_grad()
        (target / u.exp() + u).mean().backward()
        with torch.no_grad():
            for p in unc.parameters():
                p -= 0.05 * p.grad
    assert (unc(sigma) - target.log()).abs().max() < 0.1

def test_augment_contrastive_loss_chance_perfect_and_gathered_across_ranks(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(64, 128, generator=g), torch.randn(64, 128, generator=g)
    chance = 2 * 0.2 * math.log(64)
    assert abs(train_unet.contrastive_loss(q, k, 0.2) - chance) < 0.1 * chance
    # only q.k scale-invariance and temperature left
    assert train_unet.contrastive_loss(q, 3 * q, 0.2) < 0.15 * chance
    # a fake 2-rank world: each rank's positives sit at rank * N_local in the gathered targets
    q, k = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    k[:4] = q[:4] + 0.1 * k[:4]
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).t() / 0.2
    full = F.cross_entropy(logits, torch.arange(8), reduction="none")
    kn = F.normalize(k, dim=1)  # what each rank contributes
    for rank in (0, 1):
        for name, value in (("is_initialized", lambda: True), ("get_world_size", lambda: 2),
                            ("get_rank", lambda: rank), ("all_gather", lambda out, t: [
                                o.copy_(s) for o, s in zip(out, kn.chunk(2))])):
            monkeypatch.setattr(train_unet.dist, name, value)
        loss = train_unet.contrastive_loss(q[4 * rank:4 * rank + 4], k[4 * rank:4 * rank + 4])
        assert torch.allclose(loss, full[4 * rank:4 * rank + 4].mean() * 0.4, atol=1e-5)

def test_augment_proj_head_params_and_time_mode():
    time_, moco = train_unet.ProjHead(256, mode="time"), train_unet.ProjHead(256, mode="mocov3")
    count = lambda m: sum(p.numel() for p in m.parameters())
    # ddpm: a 256-channel feature, hidden 1024, out 256
    assert count(time_) == 1_184_768 and count(moco) == 1_052_672
    moco.load_state_dict({k: v for k, v in time_.state_dict().items() if k[:5] != "time."})
    f, level = torch.randn(16, 256), torch.rand(16)
    assert torch.allclose(time_(f, level), moco(f, level))  # zero-init gate: MoCo v3 at first
    assert time_(f, level).shape == (16, 256) and time_.project(f, level).shape == (16, 256)

def test_augment_contrastive_training_falls():
    # two noisy views of the same instances; online head trained, target a frozen EMA copy of it
    torch.manual_seed(0)
    z = torch.randn(64, 32)
    head, ema = (train_unet.ProjHead(32, hidden=64, out=32) for _ in range(2))
    ema.load_state_dict(head.state_dict())
    losses = []
    for _ in range(60):  # hand-written SGD: torch.optim's first use imports dynamo (seconds)
        v1, v2 = z + 0.5 * torch.randn(64, 32), z + 0.5 * torch.randn(64, 32)
        with torch.no_grad():
            k = ema.project(v2, torch.full((64,), 0.01))
        loss = train_unet.contrastive_loss(head(v1, torch.rand(64)), k)
        head.zero_grad()
        loss.backward()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), head.parameters()):
                p -= 0.3 * p.grad
                pe.lerp_(p, 0.1)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]

# ------------------------------------------------------------------------------------------------
# train_uvit.py (tiny runs: 16x16 shapes, 16 patch tokens)

def _uvit_tiny(*flags):
    args = train_uvit.get_args(["--dataset", "shapes", "--net", "tiny", *flags])
    torch.manual_seed(0)
    return args, train_uvit.build_model(args).eval()

def test_uvit_attention_mask_blocks_cls_and_augment_label_both_ways():
    for bad in (["--model", "EDM"], ["--model", "RF"], ["--cl"], ["--aug", "--cl"]):
        _raises("", train_uvit.get_args, bad)  # and the U-ViT refuses other formulations
    args, model = _uvit_tiny("--self-cond", "--aug")
    blk, mask = model.in_blocks[0], model.attn_mask
    time_i, aug_i, cls_i, img_i = 0, 1, 2, 3  # token order [time, aug, cls, patches]
    h, kick = torch.randn(2, model.pos_embed.shape[1], model.dim), 3 * torch.randn(model.dim)

    def delta(i, m):  # how far each token's block output moves when token i is perturbed: (S,)
        h2 = h.clone()
        h2[:, i] += kick  # not a constant: LayerNorm would remove that
        with torch.no_grad():
            return (blk(h2, mask=m) - blk(h, mask=m)).abs().amax(dim=(0, 2))
    d = delta(aug_i, mask)
    assert d[cls_i] == 0 and d[time_i] > 1e-5 and d[img_i] > 1e-5
    d = delta(cls_i, mask)
    assert d[aug_i] == 0 and d[time_i] > 1e-5 and d[img_i] > 1e-5
    d = delta(img_i + 5, mask)  # both still read the image tokens
    assert d[aug_i] > 1e-5 and d[cls_i] > 1e-5
    assert delta(aug_i, None)[cls_i] > 1e-5  # without the mask the leak shows: the test bites
    # with only one of the two tokens there is nothing to mask (flash-attention path)
    assert _uvit_tiny("--self-cond")[1].attn_mask is _uvit_tiny("--aug")[1].attn_mask is None

def test_uvit_output_depends_on_cls_token_and_features():
    args, model = _uvit_tiny("--self-cond", "--aug")
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.011, 0.5])
    with torch.no_grad():
        eps = model(x, t)[0]
        assert torch.equal(eps, model(x, t, aug=torch.zeros(2, 9))[0])  # no label: the zero label
        model.cls_token.add_(0.5)
        assert (model(x, t)[0] - eps).abs().max() > 1e-5
    eps, f = model(x, t, feats=("out_1", "cls", "cls_1", args.sc_layer))
    assert eps.shape == x.shape and set(f) == {"out_1", "cls", "cls_1", args.sc_layer}
    assert f["cls"].shape == (2, model.dim) and f["cls"].dtype == torch.float32
    assert args.sc_layer == "out_2" and not torch.allclose(f["cls_1"], f["cls"])
    assert torch.equal(f["cls"], model(x, t, feats=("cls_2",))[1]["cls_2"])
    _raises("cls", _uvit_tiny()[1], x, t, feats=("cls",), exc=ValueError)

def test_uvit_weight_decay_groups_by_name():
    args, model = _uvit_tiny("--self-cond", "--aug", "--cl")
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = train_uvit.param_groups(model, 0.03)
    assert decay["weight_decay"] == 0.03 and no_decay["weight_decay"] == 0.0
    no_decay = sorted(names[id(p)] for p in no_decay["params"])
    decay = sorted(names[id(p)] for p in decay["params"])
    assert no_decay == sorted(n for n in names.values() if n.endswith(".bias") or n == "pos_embed")
    assert "pos_embed" in no_decay and "in_blocks.0.attn.proj.bias" in no_decay
    # the [CLS] token, LayerNorm gains, the augment embedding and all weights are decayed
    assert {"cls_token", "norm.weight", "in_blocks.0.norm1.weight", "aug_embed.weight",
            "patch_embed.weight", "out_blocks.0.skip_linear.weight",
            "in_blocks.0.attn.qkv.weight"} <= set(decay)
    assert len(decay) + len(no_decay) == len(names)

def test_uvit_loss_falls_resume_is_exact_and_checkpoint_reloads_strictly(tmp_path):
    run = [*TINY, "--batch-size", "32", "--warmup-images", "64"]
    train_uvit.main(run + ["--self-cond", "--train-images", "1920", "--log-every", "480",
                           "--out", str(tmp_path / "long")])
    loss = [r["loss"] for r in _metrics(tmp_path / "long")]
    assert len(loss) == 4 and loss[-1] < 0.9 * loss[0], loss  # typically 0.96 -> 0.81 in 60 steps
    assert list((tmp_path / "long").glob("grid-*.png"))
    flags = run + ["--self-cond", "--aug", "--cl", "--log-every", "64"]
    train_uvit.main(flags + ["--train-images", "256", "--out", str(tmp_path / "a")])  # 8 steps
    train_uvit.main(flags + ["--train-images", "128", "--out", str(tmp_path / "b")])  # 4, then
    _run("train_uvit.py", *flags, "--train-images", "256", "--out", tmp_path / "b")  # the CLI
    assert "resumed from" in (tmp_path / "b" / "log.txt").read_text()               # resumes
    a, b = (_load(tmp_path / d / "ckpt.pt") for d in "ab")
    assert a["step"] == b["step"] == 8 and a["images"] == b["images"] == 256 and _same(a, b)
    assert [m["cl_loss"] for m in _metrics(tmp_path / "a")] == pytest.approx(
        [m["cl_loss"] for m in _metrics(tmp_path / "b")])
    args = train_uvit.get_args([])  # the contract's rebuild: defaults, then the saved args
    vars(args).update(b["args"])
    model = train_uvit.build_model(args)
    model.load_state_dict(b["ema"])  # strict, both weight sets
    model.load_state_dict(b["model"])
    assert b["script"] == "train_uvit.py" and "cls_token" in b["model"]
    assert "cl_head.fc1.weight" in b["model"]

# ------------------------------------------------------------------------------------------------
# train_dit.py

def _dit_args(*argv):
    return train_dit.get_args(list(argv))

def test_dit_table10_defaults_sc_layer_parsing_and_label_table(tmp_path):
    assert [_dit_args(*a.split()).sc_layer for a in (
        "--dataset in1k", "--dataset in1k --no-class-cond", "--dataset in100", "--sc-layer 7",
        "--sc-layer block_7")] == ["block_10", "block_9", "block_8", "block_7", "block_7"]
    assert _dit_args("--dataset", "in1k").class_cond and not _dit_args("--dataset", "x").class_cond
    assert _dit_args().probe_t == 0.25
    _raises("", _dit_args, "--sc-layer", "13")
    # DiT-L/1 (24 blocks, width 1024, 16 heads): Table 10's designated block scaled by depth
    assert [_dit_args("--net", "L", *f).sc_layer for f in (["--no-class-cond"], [],
                                                          ["--dataset", "in100"])] == \
        ["block_18", "block_20", "block_16"]
    # get_args counts the training split's class folders: build_model needs no data loading
    for c in ("cat", "dog", "owl"):
        (tmp_path / "train" / c).mkdir(parents=True)
    args = _dit_args("--dataset", "toy", "--data-path", str(tmp_path), *TINY[:2], "--class-cond")
    assert args.num_classes == 3
    assert train_dit.build_model(args).y_embed.weight.shape == (4, 64)  # + the null class
    assert _dit_args("--dataset", "toy", "--data-path", str(tmp_path / "nil")).num_classes is None
    with torch.device("meta"):  # ImageNet-1k: 1000 classes + the null class
        counts = [train_dit.count_params(train_dit.build_model(_dit_args(*a)))
                  for a in (["--no-class-cond"], ["--dataset", "in1k"])]
    assert counts[1] - counts[0] == 1001 * 768

def test_dit_rope_is_a_relative_2d_rotation_of_the_patch_tokens():
    with torch.device("meta"):
        base = train_dit.build_model(_dit_args("--no-class-cond"))
    assert base.feature_layers == [f"block_{i}" for i in range(1, 13)]
    assert tuple(base.rope.cos.shape) == (256, 64)  # one row per 16x16 patch token, head dim 64
    torch.manual_seed(0)
    rope = train_dit.Rope2D(head_dim=16, grid=16)
    assert rope.cos.shape == (256, 16)  # one row per patch token: this DiT has no extra tokens
    patches = torch.randn(2, 3, 256, 16)
    out = rope(patches)
    assert torch.allclose(out[:, :, 0], patches[:, :, 0])  # position (0, 0): the identity
    assert torch.allclose(out.norm(dim=-1), patches.norm(dim=-1), atol=1e-5)  # a rotation
    # relative: the q.k score of two tokens depends only on their offset
    q, k = torch.randn(16), torch.randn(16)
    rq, rk = rope(q.expand(1, 1, 256, 16))[0, 0], rope(k.expand(1, 1, 256, 16))[0, 0]
    assert torch.allclose(rq[0] @ rk[17], rq[18] @ rk[35], atol=1e-4)  # (0,0)-(1,1) vs (1,2)-(2,3)
    assert not torch.allclose(rq[0] @ rk[17], rq[0] @ rk[18], atol=1e-4)  # and on the offset
    _raises("", rope, torch.randn(1, 1, 255, 16), exc=RuntimeError)  # another length: no fit

def test_dit_self_cond_starts_as_noop_and_returns_features():
    torch.manual_seed(0)
    args = _dit_args("--net", "tiny", "--latent", "none", "--dataset", "shapes", "--class-cond")
    base = train_dit.build_model(args)
    args.self_cond = True
    sc = train_dit.build_model(args)
    assert sc.sc_layer == 3 and sc.self_cond.scale is not None
    missing = sc.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("self_cond.") for k in missing)
    for p in list(base.final.parameters()) + [b.ada[-1].weight for b in base.blocks]:
        p.data.normal_(0, 0.1)  # leave AdaLN-zero
    sc.load_state_dict(base.state_dict(), strict=False)
    x, t, y = torch.randn(4, 3, 32, 32), torch.rand(4), torch.tensor([0, 3, 10, 9])
    out, feats = sc(x, t, y, feats=("block_1", "block_3"))
    assert torch.allclose(out, base(x, t, y)[0], atol=1e-6)  # zero-init projection: the baseline
    assert feats["block_3"].shape == (4, 64) and feats["block_3"].dtype == torch.float32
    v, f = train_dit.build_diffusion(args).pred(sc, x, t, y, feats=("block_2",))
    assert v.shape == x.shape and set(f) == {"block_2"}
    _raises("", sc, x, t, y, feats=("out_1",), exc=ValueError)

def test_dit_pixels_are_the_shapes_toy_only_other_data_trains_as_latents(capsys):
    # train_dit.py keeps the data its model trains on: latents, or the shapes toy in pixels
    for argv in (["--latent", "none", "--dataset", "cifar10"], ["--dataset", "shapes"]):
        _raises("", _dit_args, *argv)
        assert "pixel space (--latent none) is for the shapes toy" in capsys.readouterr().err
    args = _dit_args("--latent", "none", "--dataset", "shapes-fixed")
    assert (args.num_classes, args.epochs, args.keep_epochs) == (10, 40, 0)
    assert train_dit.load_pixels(args, "test")[0].shape == (2000, 3, 32, 32)
    assert train_dit.DATASETS == {"shapes": (10, 32), "shapes-fixed": (10, 32)}
    assert not hasattr(train_dit, "load_cifar") and hasattr(train_unet, "load_cifar")
    _raises("shapes toy only, not of 'mydata': encode those with latent_cache",
            train_dit.load_pixels, _dit_args("--dataset", "mydata"))

def _fake_cache(out, key, latents, labels=None):
    """A complete latent cache folder: latents.npy, labels.npy (if given), key.json."""
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "latents.npy", latents)
    if labels is not None:
        np.save(out / "labels.npy", labels)
    (out / "key.json").write_text(json.dumps(key))
    (out / "complete").write_text("{}")

def test_dit_no_flip_takes_the_unflipped_view_latent_and_pixel(tmp_path):
    common = ["--dataset", "toy", "--data-path", str(tmp_path), "--cache-dir",
              str(tmp_path / "cache"), "--net", "tiny", "--sample-every", "0"]
    out = train_dit.cache_dir(_dit_args(*common), "train")
    lat = np.zeros((8, 2, 32, 16, 16), np.float16)
    lat[:, 1] = 1  # the flipped copy
    _fake_cache(out, train_dit.cache_key(_dit_args(*common), 8), lat, np.arange(8) % 2)
    torch.save({"mean": torch.zeros(32), "std": torch.ones(32)}, out / "stats.pt")
    idx = torch.arange(8)
    for extra in ([], ["--no-flip"]):
        torch.manual_seed(0)
        views = train_dit.load_train_data(_dit_args(*common, *extra), CPU).batch(idx)[0]
        views = views.flatten(1).mean(1)
        assert 0 < views.sum() < 8 if not extra else not views.any()
        p = _dit_args("--latent", "none", "--dataset", "shapes", "--net", "tiny", *extra)
        x = train_dit.load_train_data(p, CPU).batch(idx)[0]
        flipped = ~(x == train_dit.load_pixels(p)[0][:8].float() / 127.5 - 1).flatten(1).all(1)
        assert 0 < flipped.sum() < 8 if not extra else not flipped.any()

def test_dit_label_dropout_rate_and_null_class():
    torch.manual_seed(0)
    rf = train_dit.LatentRF(num_classes=1000, label_dropout=0.1)
    y = torch.randint(0, 1000, (200_000,))
    dropped = rf.drop_labels(y)
    null = dropped == 1000
    assert abs(null.float().mean().item() - 0.1) < 0.005  # 0.1 +- 7 sigma
    assert torch.equal(dropped[~null], y[~null])
    seen = []
    model = lambda x, t, y, feats=(), pool=True: seen.append(y) or (torch.zeros_like(x), {})
    loss, level = rf.loss(model, torch.randn(4000, 2, 2, 2), torch.zeros(4000, dtype=torch.long))
    assert loss.shape == level.shape == (4000,) and 0 < level.min() and level.max() < 1
    assert abs((seen[0] == 1000).float().mean().item() - 0.1) < 0.03
    noised = rf.add_noise(torch.zeros(2, 1, 1, 1), torch.tensor([0.0, 1]), torch.ones(2, 1, 1, 1))
    assert torch.allclose(noised.flatten(), torch.tensor([0.0, 1.0]))  # t=1: pure noise (paper)

VAE_SHAPES = {  # the official VA-VAE's: attention at 16x16, 3 blocks per decoder level
    "encoder.conv_in.weight": (128, 3, 3, 3), "quant_conv.weight": (64, 64, 1, 1),
    "post_quant_conv.weight": (32, 32, 1, 1), "decoder.conv_out.weight": (3, 128, 3, 3),
    "encoder.down.4.attn.1.proj_out.weight": (512, 512, 1, 1),
    "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3)}

def test_dit_vae_official_layout_strict_load_and_round_trip(tmp_path):
    with torch.device("meta"):
        official = train_dit.build_vae(_dit_args()).state_dict()
    assert {k: tuple(official[k].shape) for k in VAE_SHAPES} == VAE_SHAPES
    assert len(official) == 342 and {k.split(".")[0] for k in official} == \
        {"encoder", "decoder", "quant_conv", "post_quant_conv"}
    torch.manual_seed(0)
    args = _dit_args("--vae-config", "tiny", "--vae", str(tmp_path / "vavae.pt"))
    sd = dict(train_dit.build_vae(args).state_dict())
    sd.update({"loss.discriminator.main.0.weight": torch.zeros(2), "loss.logvar": torch.zeros(()),
               "foundation_model.model.cls_token": torch.zeros(3)})  # what the file also holds
    torch.save({"state_dict": sd}, tmp_path / "vavae.pt")
    vae = train_dit.load_vae(args, CPU)  # strict after dropping the 3 extra keys
    z = vae.encode(torch.rand(1, 3, 256, 256) * 2 - 1)
    img = train_dit.decode(vae, z, {"mean": torch.zeros(32), "std": torch.ones(32)})
    assert z.shape == (1, 32, 16, 16) and img.shape == (1, 3, 256, 256) and img.abs().max() <= 1

class _CountingVAE:
    """Wraps a VAE, counting encoded images; optionally fails on the n-th call (a killed run)."""

    def __init__(self, vae, fail_on=None):
        self.vae, self.fail_on, self.calls, self.images = vae, fail_on, 0, 0

    def encode(self, x):
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt
        self.images += len(x)
        return self.vae.encode(x)

def _dit_source(files):
    """What latent_cache encodes of class folders: their images at 256 and their labels."""
    return train_dit.ImageFiles(files, train_dit.IMAGE_SIZE), torch.tensor([y for _, y in files])

def _tiny_vae(*paths):
    """A random tiny VA-VAE saved at each of paths."""
    for path in paths:
        torch.save(train_dit.build_vae(_dit_args("--vae-config", "tiny")).state_dict(), path)

def _dit_cache_rank(rank, world, args, what="extract", batch=2, workers=2):
    """A rank that extracts (the rows it encoded) or builds a latent cache; or its one line."""
    if what == "own folder":
        args.cache_dir = str(Path(args.cache_dir) / f"node{rank}")
    try:
        if what == "extract":
            files = train_dit.image_files(args, "train")  # decoded by `workers` processes a rank
            return train_dit.extract_latents(
                *_dit_source(files), train_dit.cache_dir(args, "train"),
                train_dit.cache_key(args, len(files)), train_dit.load_vae(args, CPU),
                CPU, batch, workers, rank, world)
        train_dit.latent_cache(args, "test" if what == "cache test" else "train")
        return "no error"
    except SystemExit as e:
        return str(e)

def test_dit_latent_cache_two_ranks_resumes_and_is_reused(tmp_path, monkeypatch):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        for i, size in enumerate([(200, 300), (80, 64), (256, 256)]):
            _png(tmp_path / "data" / "train" / c / f"{i}.png", rng.integers(0, 256, (*size, 3),
                                                                            dtype=np.uint8))
    _tiny_vae(tmp_path / "vae.pt")
    args = _dit_args("--dataset", "toy", "--data-path", str(tmp_path / "data"), "--cache-dir",
                     str(tmp_path / "cache"), "--vae", str(tmp_path / "vae.pt"), "--vae-config",
                     "tiny", "--net", "tiny", "--extract-batch", "2")
    files, out = train_dit.image_files(args, "train"), train_dit.cache_dir(args, "train")
    vae = train_dit.load_vae(args, CPU)
    # 1) a single-process extraction killed during its second batch: images 0 and 1 are done
    _raises("", train_dit.extract_latents, *_dit_source(files), out, train_dit.cache_key(args, 6),
            _CountingVAE(vae, fail_on=2), CPU, batch=2, exc=KeyboardInterrupt)
    assert np.load(out / "done.rank0.npy").tolist() == [True, True, False, False, False, False]
    # 2) two gloo ranks finish the rest, each writing only its own rows
    r0, r1 = ranks(2, _dit_cache_rank, args, gloo=1800)
    assert sorted(r0 + r1) == [2, 3, 4, 5] and not set(r0) & set(r1) and r0 and r1
    # 3) the cache is complete: finishing it encodes nothing, a later run does not load the VA-VAE
    counter = _CountingVAE(vae)
    monkeypatch.setattr(train_dit, "load_vae", lambda a, d: counter)
    train_dit.latent_cache(args, "train")
    assert counter.calls == 0 and (out / "complete").exists()
    monkeypatch.setattr(train_dit, "load_vae", lambda a, d: pytest.fail("cache not reused"))
    d, stats = train_dit.latent_cache(args, "train"), train_dit.latent_stats(args)
    norm = lambda z: (torch.from_numpy(z.astype(np.float32)) - stats["mean"][:, None, None]) / \
        stats["std"][:, None, None]
    lat = np.load(d / "latents.npy", mmap_mode="r")
    x, xf, y = norm(lat[:, 0]), norm(lat[:, 1]), torch.from_numpy(np.load(d / "labels.npy"))
    assert x.shape == (6, 32, 16, 16) and x.dtype == torch.float32
    assert y.tolist() == [0] * 3 + [1] * 3
    assert abs(x.mean().item()) < 0.2 and abs(torch.cat([x, xf]).std().item() - 1) < 0.05
    # a valid .npy whose header is padded to a page: every 32 KiB row starts on a page boundary
    assert lat.offset == 4096 and lat[0].nbytes == 32768
    assert np.array_equal(np.load(d / "latents.npy"), lat)  # also read without a memory map
    # every row holds its own image (unflipped, flipped), whichever process wrote it
    lat = np.load(out / "latents.npy", mmap_mode="r")
    for i in (1, 4):
        img = train_dit.center_crop(Image.open(files[i][0]).convert("RGB"), 256)
        img = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 127.5 - 1
        ref = vae.encode(torch.cat([img, img.flip(3)])).numpy()
        assert np.allclose(lat[i].astype(np.float32), ref, atol=2e-2, rtol=1e-2)
    assert np.abs(lat.astype(np.float32)).sum(axis=(2, 3, 4)).min() > 0  # no row left empty
    # 4) a latent-space training run reads the cache (both flips) and stores the normalisation in
    # its checkpoint; the cache is of this VA-VAE file, which need not be there any more
    (tmp_path / "vae.pt").rename(tmp_path / "vae.moved")
    _run("train_dit.py", "--dataset", "toy", "--data-path", tmp_path / "data", "--cache-dir",
         tmp_path / "cache", "--vae", tmp_path / "vae.pt", "--vae-config", "tiny", "--net", "tiny",
         "--self-cond", "--class-cond", "--batch-size", "4", "--train-images", "8",
         "--sample-every", "0", "--out", tmp_path / "run")
    ckpt, stats = _load(tmp_path / "run" / "ckpt.pt"), _load(out / "stats.pt")
    assert torch.equal(ckpt["latent_stats"]["mean"], stats["mean"])
    assert ckpt["latent_stats"]["std"].shape == (32,) and ckpt["args"]["num_classes"] == 2
    assert ckpt["model"]["y_embed.weight"].shape == (3, 64)

def test_dit_bad_or_unshared_latent_cache_ends_every_rank_with_one_line(tmp_path):
    # a truncated latents.npy, and an old (64-byte header) cache that must still load: two gloo
    # ranks end promptly with the same line, none waits at a barrier; so do ranks whose cache
    # folders differ (no shared disk)
    args = _dit_args("--dataset", "toy", "--data-path", str(tmp_path / "absent"), "--cache-dir",
                     str(tmp_path / "cache"))
    out = train_dit.cache_dir(args, "train")
    old = np.zeros((3, 2, 32, 16, 16), np.float16)  # np.save's header, as the old code wrote it
    _fake_cache(out, train_dit.cache_key(args, 3), old)
    assert train_dit.latent_cache(args, "train") == out  # one process: the old layout reads
    with open(out / "latents.npy", "r+b") as f:
        f.truncate(5000)
    (m0, t0), (m1, t1) = ranks(2, _timed, _dit_cache_rank, args, "cache", gloo=60)
    assert m0 == m1 and "is unreadable" in m0 and "\n" not in m0
    assert max(t0, t1) < 50  # the group's timeout is 60 s
    (out / "latents.npy").write_bytes(b"garbage" * 100)  # garbage: the same one line
    _raises("is unreadable", train_dit.latent_cache, args, "train")
    msgs = ranks(2, _dit_cache_rank, args, "own folder", gloo=60)
    assert msgs[0] == msgs[1] and "do not share the latent cache" in msgs[0]

def test_dit_unreadable_image_ends_every_rank_during_extraction(tmp_path):
    # rank 1's first image is damaged: both ranks stop within a batch with the same line
    _class_folders(tmp_path / "data" / "train", 3, (32, 32))
    (tmp_path / "data" / "train" / "cat" / "1.png").write_bytes(b"not a png")
    _tiny_vae(tmp_path / "vae.pt")
    args = _dit_args("--dataset", "toy", "--data-path", str(tmp_path / "data"), "--cache-dir",
                     str(tmp_path / "cache"), "--vae", str(tmp_path / "vae.pt"), "--vae-config",
                     "tiny")
    msgs = ranks(2, _dit_cache_rank, args, "extract", 1, 0, gloo=60)
    assert msgs[0] == msgs[1] and msgs[0].startswith("cannot read image") and "1.png" in msgs[0]
    # rank 0 encoded at most its first image before stopping
    assert train_dit.done_mask(train_dit.cache_dir(args, "train"), 6).sum() <= 2

class _TensorImages(torch.utils.data.Dataset):
    """Images in memory, as another dataset reaches the latent cache: (index, uint8 image, "")."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return i, self.images[i], ""

def test_dit_latent_cache_encodes_any_source_and_refuses_another_key(tmp_path):
    """latent_cache(args, split, source): a tensor-backed dataset (a transfer dataset to probe)
    encodes as class folders do. A cache of another key (dataset, data folder, VA-VAE file and
    layout, images), complete or partial, is refused on every rank with one line naming both."""
    torch.manual_seed(0)
    _tiny_vae(tmp_path / "vae.pt", tmp_path / "other.pt")
    common = ["--cache-dir", str(tmp_path / "cache"), "--vae-config", "tiny", "--net", "tiny",
              "--extract-batch", "3"]
    cifar = ["--dataset", "cifar10", "--data-path", str(tmp_path / "cifar")]
    args = _dit_args(*cifar, "--vae", str(tmp_path / "vae.pt"), *common)
    images = torch.randint(0, 256, (5, 3, 256, 256), dtype=torch.uint8)
    source = (_TensorImages(images), torch.arange(5) % 2)
    out = train_dit.latent_cache(args, "test", source)
    assert out == tmp_path / "cache" / "val" and (out / "complete").exists()
    key = {"dataset": "cifar10", "data_path": str(tmp_path / "cifar"),
           "vae": str(tmp_path / "vae.pt"), "vae_config": "tiny", "images": 5}
    assert json.loads((out / "key.json").read_text()) == key == train_dit.cache_key(args, 5)
    x = images[[3]].float() / 127.5 - 1
    ref = train_dit.load_vae(args, CPU).encode(torch.cat([x, x.flip(3)])).numpy()
    got = np.load(out / "latents.npy")[3].astype(np.float32)
    assert np.allclose(got, ref, atol=2e-2, rtol=1e-2)
    assert np.load(out / "labels.npy").tolist() == [0, 1, 0, 1, 0]
    assert train_dit.latent_cache(args, "test") == out  # complete, of this key: no source needed
    before = (out / "latents.npy").read_bytes()
    for i, argv in enumerate((["--dataset", "cifar100", "--data-path", str(tmp_path / "cifar")],
                              [*cifar[:3], str(tmp_path / "elsewhere")],
                              [*cifar, "--vae", str(tmp_path / "other.pt")])):
        if i == 2:  # a partial cache is refused too
            (out / "complete").unlink()
        other = _dit_args(*argv, *common)
        other.vae = other.vae or str(tmp_path / "vae.pt")
        msg = _one_line("", train_dit.latent_cache, other, "test", source)
        assert msg.startswith(f"latent cache {out} holds {json.dumps(key)}, not ")
        assert json.dumps(train_dit.cache_key(other)) in msg
        assert msg.endswith("pass another --cache-dir, or delete it to encode afresh")
    assert (out / "latents.npy").read_bytes() == before and not (out / "complete").exists()
    (out / "key.json").unlink()  # a cache that records no key is never taken for this one
    _raises("records no key", train_dit.latent_cache, args, "test")
    (out / "key.json").write_text(json.dumps({**key, "dataset": "in100"}))  # on every rank:
    msgs = ranks(2, _dit_cache_rank, args, "cache test", gloo=60)  # the same line
    assert msgs[0] == msgs[1] and '"dataset": "in100"' in msgs[0] and "\n" not in msgs[0]

def test_dit_tiny_pixel_run_trains_and_resumes_exactly(tmp_path):
    def train(out, images, *extra):
        _run("train_dit.py", "--latent", "none", *TINY, *"--batch-size 32 --log-every 160 "
             "--ckpt-every 320".split(), "--train-images", images, "--out", out, *extra)
    train(tmp_path / "a", 320)
    rec = _metrics(tmp_path / "a")
    assert [r["images"] for r in rec] == [160, 320] and rec[-1]["loss"] < rec[0]["loss"]
    assert (tmp_path / "a" / "grid-000000320.png").exists()
    train(tmp_path / "a", 480, "--sample-every", "0")  # same command, longer: resumes at 320
    assert "resumed from" in (tmp_path / "a" / "log.txt").read_text()
    train(tmp_path / "b", 480, "--sample-every", "0")  # one uninterrupted run
    a, b = _load(tmp_path / "a" / "ckpt.pt"), _load(tmp_path / "b" / "ckpt.pt")
    assert a["step"] == b["step"] == 15 and a["images"] == 480 and a["script"] == "train_dit.py"
    assert _same(a, b, ["model"])  # randomness is a function of (seed, rank, step)
    assert "latent_stats" not in a and a["args"]["sc_layer"] == "block_3"

# ------------------------------------------------------------------------------------------------
# fid.py

def _fid_random_inception(seed=0):
    """InceptionV3 with random weights scaled so activations neither vanish nor explode."""
    torch.manual_seed(seed)
    model = fid.InceptionV3()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model.eval().requires_grad_(False)

@pytest.fixture(scope="module")
def _fid_model():
    return _fid_random_inception()

@pytest.fixture(scope="module")
def _fid_weights(tmp_path_factory, _fid_model):
    """The random model in the official file's layout (with torchvision's num_batches_tracked)."""
    sd = dict(_fid_model.state_dict())
    for k in [k for k in sd if k.endswith(".bn.running_var")]:
        sd[k.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    path = tmp_path_factory.mktemp("weights") / fid.FID_WEIGHTS
    torch.save(sd, path)
    return path

FID_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_1a_3x3.bn.running_var": (32,),
    "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1), "fc.weight": (1008, 2048),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7), "fc.bias": (1008,),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1)}

def test_fid_official_key_layout_output_shapes_and_strict_load(_fid_model, _fid_weights,
                                                                tmp_path):
    sd = _fid_model.state_dict()
    assert {k: tuple(sd[k].shape) for k in FID_SHAPES} == FID_SHAPES
    assert not any(k.startswith("AuxLogits") for k in sd)
    assert _fid_model.Mixed_5b.branch_pool.bn.eps == 0.001
    # torchvision inception_v3 without aux (23,834,568 with 1000 classes) + 8 more classes of TF's
    assert sum(p.numel() for p in _fid_model.parameters()) == 23_850_960
    with torch.inference_mode():
        pool3, logits = _fid_model(torch.rand(1, 3, 75, 75))  # 32x32 inputs run in the CLI test
    assert pool3.shape == (1, 2048) and logits.shape == (1, 1008)
    assert torch.isfinite(pool3).all() and (pool3 >= 0).all()  # pool3 averages ReLU outputs
    # load_inception folds BatchNorm into the convs: its weights are checked through its features
    # (test_fid_fast_forward_matches_plain_forward); a file of another layout must not load
    assert not fid.load_inception(str(_fid_weights)).training
    sd = _load(_fid_weights)
    sd["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    torch.save(sd, tmp_path / "bad.pth")
    _raises("AuxLogits", fid.load_inception, str(tmp_path / "bad.pth"), exc=RuntimeError)
    _raises("no such file", fid.load_inception, str(tmp_path / "missing.pth"))

def test_fid_distance_matches_eigenvalues_and_grows_with_shift():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 200, 8))
    b = b @ rng.normal(size=(8, 8)) + 0.5
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    # S1 S2 is similar to S1^1/2 S2 S1^1/2, so its eigenvalues are real and >= 0
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()
    direct = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-8)
    assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-8)
    assert fid.frechet_distance(mu1, s1, mu1 + 1, s1) == pytest.approx(8, rel=1e-8)
    # random features stand in for pool3 (a 2048-d sqrtm costs tens of seconds on 2 cores)
    f = rng.normal(size=(500, 64)) @ rng.normal(size=(64, 64))
    stats = [fid.statistics(f + s)[:2] for s in (0.0, 0.1, 0.3)] + [fid.statistics(1.5 * f)[:2]]
    d = [fid.frechet_distance(*st, *stats[0]) for st in stats]
    assert abs(d[0]) < 1e-6 * np.trace(stats[0][1]) and d[3] > d[1]
    assert 0 < d[1] < d[2] and d[1] == pytest.approx(64 * 0.1 ** 2, rel=1e-4)

def test_fid_inception_score_and_too_few_images(_fid_model):
    assert fid.inception_score(np.zeros((50, 1008))) == pytest.approx((1.0, 0.0))
    onehot = 50.0 * np.eye(1008)[np.arange(200) % 10]  # each of 10 splits: 2 of each of 10 classes
    assert fid.inception_score(onehot) == pytest.approx((10, 0), rel=1e-6, abs=1e-6)
    _raises("at least 10", fid.inception_score, np.zeros((5, 1008)), exc=ValueError)
    _raises("at least 3 images", fid.compute_statistics, _fid_images(2), _fid_model)
    _raises("at least 3 images", fid.Sums(2).statistics, exc=ValueError)
    with pytest.warns(UserWarning, match="2049"):
        fid.statistics(np.random.default_rng(0).normal(size=(10, 2048)))

def test_fid_running_sums_equal_numpy_statistics_and_inception_score():
    rng = np.random.default_rng(0)
    f = rng.gamma(2.0, 0.3, size=(300, 2048))  # non-negative as pool3 features
    logits = rng.normal(0, 3, size=(300, 1008))
    s = fid.Sums(300, splits=7)
    for i in range(0, 300, 64):  # batches that straddle the splits
        s.add(torch.from_numpy(f[i:i + 64]), torch.from_numpy(logits[i:i + 64]),
              torch.arange(i, min(i + 64, 300)))
    with pytest.warns(UserWarning, match="2049"):
        mu, sigma = s.statistics()
    assert np.abs(mu - f.mean(0)).max() <= 1e-10 * np.abs(f.mean(0)).max()
    cov = np.cov(f, rowvar=False)
    assert np.abs(sigma - cov).max() <= 1e-10 * np.abs(cov).max()
    scores = []  # the textbook IS over 7 consecutive chunks, from all the logits at once
    for i in range(7):
        logp = logits[i * 300 // 7:(i + 1) * 300 // 7]
        logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
        p = np.exp(logp)
        scores.append(np.exp((p * (logp - np.log(p.mean(0)))).sum(1).mean()))
    assert s.inception_score() == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-10)
    assert fid.inception_score(logits, 7) == pytest.approx(s.inception_score(), rel=1e-12)

def test_fid_cli_npz_folder_stats_and_adm_reference_batch(_fid_weights, tmp_path, capsys,
                                                          monkeypatch):
    # the plumbing is under test, not the distance: a cheap stand-in, 0 iff the statistics agree
    monkeypatch.setattr(fid, "frechet_distance",
                        lambda m1, s1, m2, s2: max(abs(m1 - m2).max(), abs(s1 - s2).max()))
    warnings.simplefilter("ignore")  # 3 images: rank-deficient covariance (tested above)
    x = _fid_images(3, hwc=True)
    np.savez(tmp_path / "samples.npz", arr_0=x)
    for i, im in enumerate(x):  # png is lossless: the folder holds the same images
        _png(tmp_path / "imgs" / ("sub" if i % 2 else "") / f"{i}.png", im)
    common = ["--inception", str(_fid_weights), "--num-workers", "0", "--cache-dir",
              str(tmp_path / "cache")]
    fid.main([str(tmp_path / "imgs"), "--stats-out", str(tmp_path / "s.npz")] + common)
    with np.load(tmp_path / "s.npz") as f:
        assert f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048) and int(f["n"]) == 3
    capsys.readouterr()
    r = fid.main([str(tmp_path / "samples.npz"), str(tmp_path / "s.npz")] + common)
    out = capsys.readouterr().out
    assert "FID" in out and "IS" in out and "(3 samples, 3 ref)" in out and "images/s" in out
    assert r["fid"] < 1e-5 and r["n"] == 3 and r["n_ref"] == 3
    # a reference folder is computed once (3 samples + 3 reference images), then read from cache
    seen = fid.THROUGHPUT["images"]
    first, again = (fid.main([str(tmp_path / "samples.npz"), str(tmp_path / "imgs")] + common)
                    for _ in range(2))
    assert fid.THROUGHPUT["images"] == seen + 3 + 3 + 3 and first == again and again["n_ref"] == 3
    assert [p.name.startswith("imgs-") for p in (tmp_path / "cache").iterdir()] == [True]
    for argv, msg in (([tmp_path / "nope.npz", tmp_path / "s.npz"], "nope.npz: no such file"),
                      ([tmp_path / "samples.npz", "cifar10"], "cifar10: no such .* sample.py --")):
        _raises(msg, fid.main, [str(a) for a in argv] + common)
    # ADM's VIRTUAL_imagenet256_labeled.npz holds images and their statistics: the statistics are
    # the reference (Tables 5-6 follow ADM's evaluator), and no image is decoded
    mu, sigma = np.random.default_rng(0).normal(size=2048), np.eye(2048)
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=mu, sigma=sigma,
             mu_s=mu[:7], sigma_s=np.eye(7))
    got = fid.load_input(str(tmp_path / "ref.npz"))
    assert np.array_equal(got[0], mu) and np.array_equal(got[1], sigma) and got[2] is None

def test_fid_between_two_folders_imports_no_trainer(_fid_weights, tmp_path):
    for name, seed in (("a", 0), ("b", 1)):
        _image_folder(tmp_path / name, 4, seed=seed)
    p = _run("-c", "\n".join([
        "import json, sys, warnings, torch, fid",
        "warnings.simplefilter('ignore')  # 4 images: a rank-deficient covariance",
        "fid.frechet_distance = lambda m1, s1, m2, s2: float(abs(m1 - m2).sum())  # fast",
        "torch.hub.download_url_to_file = None  # no network: the weights are given",
        "r = fid.main([*sys.argv[1:3], '--inception', sys.argv[3], '--num-workers', '0',",
        "              '--cache-dir', sys.argv[4]])",
        "print(json.dumps({**r, 'trainers': [m for m in sys.modules if m[:5] == 'train']}))"]),
        tmp_path / "a", tmp_path / "b", _fid_weights, tmp_path / "cache", timeout=300)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["trainers"] == [] and r["n"] == r["n_ref"] == 4 and r["fid"] > 0

def test_fid_bad_input_is_one_line_before_any_download_or_network(_fid_weights, tmp_path,
                                                                  monkeypatch):
    # missing, small, malformed or unwritable inputs: one line before the weights are fetched,
    # the network built or anything written (no statistics, no cache)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))  # no weights there: they'd be fetched

    def never(*a, **k):
        raise AssertionError("downloaded the weights or built the network before checking inputs")
    monkeypatch.setattr(torch.hub, "download_url_to_file", never)
    monkeypatch.setattr(fid, "InceptionV3", never)
    x = _fid_images(3, hwc=True)
    for name, arrays in (("good", dict(arr_0=x)), ("two", dict(arr_0=x[:2])),
                         ("other", dict(images=x)), ("float", dict(arr_0=x.astype(np.float32))),
                         ("stats", dict(mu=np.zeros(4), sigma=np.zeros((4, 3))))):
        np.savez(tmp_path / f"{name}.npz", **arrays)
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 half a file")
    (tmp_path / "empty").mkdir()
    _png(tmp_path / "one" / "0.png", x[0])
    (tmp_path / "file").write_text("")
    (tmp_path / "ro").mkdir(mode=0o555)
    if os.geteuid() == 0:  # root writes through permission bits: os.access answers as for a user
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, m: p != str(tmp_path / "ro") and access(p, m))
    good, seen = tmp_path / "good.npz", fid.THROUGHPUT["images"]
    weights = ["--inception", _fid_weights, "--num-workers", "0"]
    for argv, msg in (
            ([good, tmp_path / "missing"], "missing: no such file or folder"),
            ([tmp_path / "two.npz", good], "at least 3 images, .*two.npz has 2"),
            ([tmp_path / "float.npz", good], "arr_0 must be uint8 .* float32"),
            ([good, tmp_path / "other.npz"], "expected 'arr_0' .* found images"),
            ([good, tmp_path / "stats.npz"], r"statistics must be float mu \(D,\) and sigma"),
            ([good, tmp_path / "broken.npz"], "not a readable .npz"),
            ([good, tmp_path / "empty"], "empty: no images"),
            ([good, tmp_path / "file"], "file: not an .npz or a folder"),
            ([tmp_path / "two.npz", "--stats-out", tmp_path / "s.npz", *weights], "two.npz has 2"),
            ([good, tmp_path / "one", *weights], "at least 3 images, .*one has 1"),  # first
            *(([good, "--stats-out", tmp_path / out], "--stats-out .*cannot write")
              for out in ("file/s.npz", "file/sub/s.npz", "ro/s.npz", "ro/new/s.npz", "."))):
        _one_line(msg, fid.main, [*map(str, argv), "--cache-dir", str(tmp_path / "cache")])
    assert not (tmp_path / "home").exists() and not (tmp_path / "cache").exists()
    assert fid.THROUGHPUT["images"] == seen and os.listdir(tmp_path / "ro") == []
    assert not (tmp_path / "s.npz").exists()

def test_fid_fast_forward_matches_plain_forward(tmp_path, monkeypatch):
    model = _fid_random_inception(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # statistics far from the identity: folding is exercised
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    fast = fid.load_inception(str(tmp_path / "w.pth"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert fast.Mixed_7c.branch_pool.conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = _fid_images(3)
    got = fid.compute_features(x, fast, batch_size=2)  # two batches, as fid.py runs them
    # the plain forward of the same weights, as pytorch-fid runs it
    monkeypatch.setattr(fid.BasicConv2d, "forward",
                        lambda self, x: F.relu(self.bn(self.conv(x.contiguous()))))
    with torch.inference_mode():
        want = model(x.float() / 255)
    for a, b in zip(got, want):
        assert np.abs(a - b.double().numpy()).max() <= 1e-5 * b.abs().max().item()

def test_fid_failed_stats_write_leaves_no_temp_file(_fid_model, tmp_path, monkeypatch):
    np.savez(tmp_path / "three.npz", arr_0=_fid_images(3, hwc=True))
    monkeypatch.setattr(np, "savez", _half_written(OSError(28, "No space left on device")))
    _one_line(r"s\.npz: .*No space left", fid.save_statistics, str(tmp_path / "out" / "s.npz"),
              np.zeros(3), np.eye(3), 5)
    assert os.listdir(tmp_path / "out") == []
    # a reference cache that cannot be written costs the cache, not the FID
    warnings.simplefilter("ignore")  # 3 images: rank-deficient covariance (tested above)
    monkeypatch.setattr(fid, "frechet_distance", _distance_stand_in)
    three = str(tmp_path / "three.npz")
    r = fid.fid_from_samples(three, three, _fid_model, 3, cache=str(tmp_path / "c" / "three.npz"))
    assert r["fid"] == 0 and r["n_ref"] == 3 and os.listdir(tmp_path / "c") == []

def test_fid_bench_times_the_extraction_alone_without_pytorch_fid(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)  # as on CI: the reference not installed
    rec = fid.benchmark(1, batch=2)
    assert list(rec) == ["fid.py_img_per_s"] and rec["fid.py_img_per_s"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == rec

def _fid_fetch_rank(rank, world, tmp, weights):
    """A rank loading the weights twice (torchrun's LOCAL_RANK set); the first fetch fails."""
    os.environ["TORCH_HOME"] = str(Path(tmp) / "home")

    def fetch(url, dst, hash_prefix=None, progress=True):  # as torch's: a temp file moved in place
        first = not (Path(tmp) / "fetches").exists()
        with open(Path(tmp) / "fetches", "a") as f:
            f.write(f"{rank}\n")
        time.sleep(0.5)  # a slow network: the other rank must wait, not read a missing file
        if first:
            raise OSError("no network")
        Path(dst + ".partial").write_bytes(Path(weights).read_bytes())
        os.replace(dst + ".partial", dst)
    torch.hub.download_url_to_file, results = fetch, []
    for _ in range(2):
        try:
            results.append(f"loaded {fid.load_inception().fc.weight.sum().item():.4f}")
        except SystemExit as e:
            results.append(f"exit {e}")
    return results

def test_fid_weights_fetched_once_per_node_and_a_failed_fetch_is_one_line(
        _fid_model, _fid_weights, tmp_path, monkeypatch):
    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "alone"))  # one process, no process group
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    msg = _one_line("no network", fid.load_inception)
    assert fid.FID_WEIGHTS_URL in msg and "--inception PATH" in msg
    r0, r1 = ranks(2, _fid_fetch_rank, str(tmp_path), str(_fid_weights), gloo=1800)
    assert r1 == r0  # the same one-line error on both ranks, then the same weights
    failed, loaded = r0
    assert failed.startswith("exit could not download") and "\n" not in failed
    assert all(s in failed for s in ("no network", fid.FID_WEIGHTS_URL, "--inception PATH"))
    assert loaded == f"loaded {_fid_model.fc.weight.sum().item():.4f}"
    assert (tmp_path / "fetches").read_text() == "0\n0\n"  # one fetch per attempt, by local rank 0
    assert os.listdir(tmp_path / "home" / "hub" / "checkpoints") == [fid.FID_WEIGHTS]  # no temp

# ------------------------------------------------------------------------------------------------
# sample.py: the solvers on data x0 ~ N(MU, S^2) per dimension. Every marginal is Gaussian, so the
# exact predictors are linear in x and the probability-flow ODE maps N(0, I) onto the data. At the
# paper's settings the solver error is a few percent of the std (the denoiser turns from "predict
# the mean" to "identity" within an octave of sigma around S); refining the grid must shrink it.

MU, S = 0.3, 0.5

def _ddpm_ab():
    betas = torch.cat([torch.zeros(1), torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)])
    return torch.cumprod(1 - betas, 0)  # (T+1,), index 0 == 1

def _eps_ddpm(x, t, ab=_ddpm_ab()):  # x_t = a x0 + b eps
    a, b = math.sqrt(ab[t]), math.sqrt(1 - ab[t])
    return b * (x - a * MU) / (a * a * S * S + b * b)

def _denoise_edm(x, sigma):  # x = x0 + sigma n
    return MU + S * S / (S * S + sigma * sigma) * (x - MU)

def _v_rf(x, t):  # x_t = (1-t) x0 + t eps, v = eps - x0
    var, r = (1 - t) ** 2 * S * S + t * t, x - (1 - t) * MU
    return t * r / var - (MU + (1 - t) * S * S * r / var)

@pytest.mark.parametrize("solver,fn,kw,nfe,grid", [  # (steps, tolerance) at the paper's and finer
    ("ddim", _eps_ddpm, {"alphas_cumprod": _ddpm_ab()}, lambda n: n,
     ((100, 0.03), (1000, 0.003))),
    ("heun", _denoise_edm, {}, lambda n: 2 * n - 1, ((18, 0.03), (72, 0.003))),  # 2nd order
    ("euler", _v_rf, dict(shift=3.3), lambda n: n, ((250, 0.01), (2500, 0.002))),
    ("rk45", _v_rf, {}, None, ((None, 0.002),))])
def test_sample_solvers_reach_the_gaussian_and_count_nfe(solver, fn, kw, nfe, grid):
    for steps, tol in grid:
        z = torch.randn(4000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        calls = []
        counted = lambda *a: calls.append(1) or fn(*a)
        steps_kw = {} if steps is None else {"steps": steps}
        x = getattr(sample, solver)(counted, (z - z.mean(0)) / z.std(0), **kw, **steps_kw)
        assert abs(x.mean().item() - MU) < 0.005 and abs(x.std(0).mean().item() - S) < tol, x.std()
        assert len(calls) == nfe(steps) if nfe else 0 < len(calls) < 400
    if solver == "euler":
        ts = sample.shifted_times(250, 3.3)
        assert ts[0] == 1 and ts[-1] == 0 and ts[125] > 0.5  # shift > 1: more steps at high noise

def test_sample_clip_keeps_pixel_estimates_in_range():
    ab, noise = _ddpm_ab(), torch.randn(64, 3)
    assert sample.ddim(lambda x, t: torch.zeros_like(x), noise, ab, 10, clip=True).abs().max() <= 1
    assert sample.heun(lambda x, s: 5 * x, noise, 6, clip=True).abs().max() <= 1
    assert sample.heun(lambda x, s: 5 * x, noise, 6).abs().max() > 1

def test_sample_cfg_scale_interval_and_batching():
    calls = []

    def pred(x, t, y):  # a label-dependent toy prediction over several channels
        calls.append(len(x))
        return x * (1 + y.view(-1, 1, 1, 1)) + t
    x, y, null = torch.randn(3, 4, 2, 2), torch.tensor([0, 1, 2]), 5
    assert torch.equal(sample.cfg(pred, y, null, scale=1.0)(x, 0.5), pred(x, 0.5, y))
    calls.clear()
    guided = sample.cfg(pred, y, null, scale=1.5, max_level=0.89)
    assert torch.equal(guided(x, 0.9), pred(x, 0.9, y)) and calls == [3, 3]  # above: cond only
    calls.clear()
    c, u = pred(x, 0.89, y), pred(x, 0.89, torch.full_like(y, null))
    torch.testing.assert_close(guided(x, 0.89), u + 1.5 * (c - u))  # all 4 channels guided
    assert calls == [3, 3, 6]  # one batched cond+uncond forward

# ------------------------------------------------------------------------------------------------
# sample.py end to end, on tiny random-weight checkpoints (sampling needs no training)

def _npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}

def _sample_rank(rank, world, argv):
    sample.main(argv)

def test_sample_ranks_and_resume_identical(tmp_path):
    ckpt = _ckpt(tmp_path, "--dataset", "shapes", "--model", "DDPM")
    common = ["--ckpt", str(ckpt), "--num-samples", "10", "--batch-size", "4", "--steps", "4"]
    sample.main(common + ["--out", str(tmp_path / "one")])
    one = _npz(tmp_path / "one" / "samples.npz")
    assert one["arr_0"].shape == (10, 32, 32, 3) and one["arr_0"].dtype == np.uint8
    assert "arr_1" not in one
    grid = np.asarray(Image.open(tmp_path / "one" / "grid.png"))  # 8 a row: two rows
    assert grid.shape == (64, 256, 3) and np.array_equal(grid[32:, 32:64], one["arr_0"][9])
    ranks(2, _sample_rank, common + ["--out", str(tmp_path / "two")])  # env://, as under torchrun
    np.testing.assert_array_equal(_npz(tmp_path / "two" / "samples.npz")["arr_0"], one["arr_0"])
    (tmp_path / "one" / "shards" / "shard-0000004.npz").unlink()  # interrupted: a shard missing
    sample.main(common + ["--out", str(tmp_path / "one")])
    np.testing.assert_array_equal(_npz(tmp_path / "one" / "samples.npz")["arr_0"], one["arr_0"])
    sample.main([*common[:2], "--num-samples", "12", *common[4:], "--out", str(tmp_path / "one")])
    more = _npz(tmp_path / "one" / "samples.npz")["arr_0"]  # the short last shard: regenerated
    assert len(more) == 12 and np.abs(more[:10].astype(int) - one["arr_0"]).max() <= 1
    _raises("other settings", sample.main, common[:-1] + ["5", "--out", str(tmp_path / "one")])

def test_sample_dit_labels_class_and_latent_decode(tmp_path):
    ckpt = _ckpt(tmp_path, "--dataset", "shapes", "--latent", "none", "--class-cond",
                 script="train_dit.py")
    common = ["--ckpt", str(ckpt), "--num-samples", "4", "--batch-size", "4", "--sampler", "euler",
              "--steps", "2"]
    sample.main(common + ["--out", str(tmp_path / "all")])
    assert _npz(tmp_path / "all" / "samples.npz")["arr_1"].tolist() == [0, 1, 2, 3]  # i % classes
    sample.main(common + ["--class", "7", "--out", str(tmp_path / "seven")])
    assert _npz(tmp_path / "seven" / "samples.npz")["arr_1"].tolist() == [7] * 4
    _raises(r"10 classes \(0\.\.9\)", sample.main, common + ["--class", "10"])
    _raises("needs a DDPM model", sample.main, common[:-4] + ["--sampler", "ddim"])
    # latent: a tiny random VA-VAE stands in for the official weights (no download in tests)
    _tiny_vae(tmp_path / "vae.pt")
    ckpt = _ckpt(tmp_path, "--dataset", "in100", "--vae-config", "tiny", script="train_dit.py",
                 vae=str(tmp_path / "vae.pt"))
    sample.main(["--ckpt", str(ckpt), "--num-samples", "2", "--steps", "2",
                 "--out", str(tmp_path / "latent")])
    out = _npz(tmp_path / "latent" / "samples.npz")
    assert out["arr_0"].shape == (2, 256, 256, 3) and out["arr_1"].tolist() == [0, 1]

@pytest.mark.parametrize("script,argv,nfe", [
    ("train_unet.py", ["--model", "EDM"], 2 * 3 - 1),  # heun, 3 steps
    ("train_unet.py", ["--model", "RF"], None),        # rk45, adaptive
    ("train_uvit.py", [], 3)])                         # ddim, 3 steps
def test_sample_each_formulation_end_to_end(tmp_path, capsys, script, argv, nfe):
    ckpt = _ckpt(tmp_path, "--dataset", "shapes", *argv, script=script)
    steps = [] if nfe is None else ["--steps", "3"]
    sample.main(["--ckpt", str(ckpt), "--num-samples", "2", *steps, "--out", str(tmp_path / "s")])
    assert _npz(tmp_path / "s" / "samples.npz")["arr_0"].shape == (2, 32, 32, 3)
    if nfe is not None:
        assert f"NFE per batch {nfe}.0" in capsys.readouterr().out
    else:  # rk45's 1e-5 tolerances are below bf16's rounding: auto is fp32, bf16 is refused
        assert json.loads((tmp_path / "s" / "config.json").read_text())["bf16"] is False
        _raises("^--sampler rk45 needs fp32: drop --precision bf16$", sample.main,
                ["--ckpt", str(ckpt), "--precision", "bf16", "--out", str(tmp_path / "s2")])

def test_sample_checks_every_checkpoint_and_flag_before_sampling(tmp_path):
    ckpt = _ckpt(tmp_path / "run", "--dataset", "shapes", "--model", "DDPM")
    rf = _ckpt(tmp_path / "rf", "--dataset", "shapes", "--model", "RF")
    snapshot = tmp_path / "run" / "ckpt-000000100.pt"  # what evaluation reads, no online weights
    torch.save({k: v for k, v in _load(ckpt).items() if k != "model"}, snapshot)
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 truncated")
    torch.save({"script": "os.py", "args": {}}, tmp_path / "other.pt")
    for argv, msg in (
            ([ckpt, tmp_path / "run" / "missing.pt"], "missing.pt not found"),
            ([ckpt, snapshot, "--raw"], "--raw: .*ckpt-000000100.pt is a snapshot holding"),
            ([ckpt, rf, "--sampler", "ddim"], "--sampler ddim needs a DDPM model; .*rf/ckpt"),
            ([ckpt, snapshot, "--fid", "cifar"], "--fid cifar: not a file or folder, nor a"),
            ([ckpt, "--fid", tmp_path / "nope"], "--fid .*nope: .*nope: no such file or fol"),
            ([ckpt, "--fid", "shapes", "--n", "2"], "--fid needs at least 3 samples")):
        t = time.time()
        _one_line(msg, sample.main, ["--ckpt", *map(str, argv)])
        assert time.time() - t < 10
    assert not list(tmp_path.rglob("samples-*"))  # nothing written
    for path, msg in ((tmp_path / "nope.pt", "not found"), (tmp_path / "bad.pt", "truncated or "
                      "corrupt"), (tmp_path / "other.pt", "expected one of train_unet.py")):
        _raises(msg, sample.load_checkpoint, path)

def test_sample_merge_streams_the_shards_into_what_savez_writes(tmp_path):
    g, paths = np.random.default_rng(0), [tmp_path / f"shard-{i}.npz" for i in range(3)]
    for i, (path, m) in enumerate(zip(paths, (4, 4, 3))):
        np.savez(path, images=g.integers(0, 256, (m, 8, 8, 3), dtype=np.uint8),
                 labels=g.integers(0, 9, m), nfe=np.array(10 + i))
    with open(tmp_path / "merged.npz", "wb") as f:
        assert sample.merge(paths, f, 11, classes=9) == [10, 11, 12]
    shards = [np.load(p) for p in paths]
    with np.load(tmp_path / "merged.npz") as got:
        assert got.files == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(got["arr_0"], np.concatenate([s["images"] for s in shards]))
        np.testing.assert_array_equal(got["arr_1"], np.concatenate([s["labels"] for s in shards]))

def test_sample_fid_reads_a_dataset_reference_through_the_checkpoints_trainer(tmp_path, tiny_run,
                                                                              monkeypatch):
    out = tiny_run(*_flags(64))  # a 16x16 run of shapes (native 32x32)
    _stub_fid(monkeypatch, tmp_path / "cache")
    calls, load_pixels = [], train_unet.load_pixels
    monkeypatch.setattr(train_unet, "load_pixels", lambda args, split: calls.append(
        (args.dataset, args.resolution, split)) or [x[:20] for x in load_pixels(args, split)])
    common = ["--ckpt", str(out / "ckpt.pt"), *"--num-samples 4 --steps 2 --fid shapes".split()]
    first, = sample.main(common + ["--out", str(tmp_path / "s")])
    assert calls == [("shapes", 16, "train")] and first["n"] == 4 and first["n_ref"] == 20
    again, = sample.main(common + ["--out", str(tmp_path / "s2")])  # the reference from its cache
    assert calls == [("shapes", 16, "train")]
    assert again["fid"] == pytest.approx(first["fid"], rel=1e-9)

def test_sample_fid_class_folder_reference_streams_and_its_cache_is_read_before_listing(
        tmp_path, monkeypatch):
    # a class-folder reference is streamed from its files; its cached statistics are found before
    # anything is listed or decoded; an unreadable file is a one-line error naming it
    _stub_fid(monkeypatch, tmp_path / "cache")
    for i, im in enumerate(_fid_images(6, size=20, hwc=True)):
        _png(tmp_path / "data" / f"c{i % 2}" / f"{i}.png", im)
    args = train_unet.get_args(["--dataset", "folders", "--data-path", str(tmp_path / "data")])
    _raises("--fid cifar: not a file or folder, nor a dataset .* folders, or cifar10",
            sample.fid_reference, "cifar", train_unet, args, 16)
    ref, cache, check = sample.fid_reference("folders", train_unet, args, 16, workers=0)
    assert len(check()) == 6 and not os.path.exists(cache)  # the check lists, reads no pixel
    samples, model = _fid_images(5, size=16, seed=1), memory.StubInception()
    first = fid.fid_from_samples(samples, ref, model, batch_size=4, cache=cache)
    assert first["n_ref"] == 6 and first["fid"] > 0
    assert os.listdir(tmp_path / "cache") == [Path(cache).name]

    def no(*a, **k):
        raise AssertionError("decoded or listed the dataset although its statistics are cached")
    with monkeypatch.context() as m:
        for name in ("image_files", "load_pixels", "decode_images"):
            m.setattr(train_unet, name, no)
        m.setattr(train_unet.ImageFiles, "__getitem__", no)
        again = fid.fid_from_samples(samples, ref, model, batch_size=4, cache=cache)
    assert again == pytest.approx(first, rel=1e-12)
    (tmp_path / "data" / "c1" / "bad.png").write_bytes(b"not a png")
    ref, other, _ = sample.fid_reference("folders", train_unet, args, 8, workers=0)
    assert other != cache  # another size is another entry
    _one_line(r"cannot read image .*bad.png .*fix or remove it", fid.fid_from_samples,
              _fid_images(5, size=8), ref, model, batch_size=4, cache=other)

def _sample_fid_rank(rank, world, argv, cache):
    """A rank of sample.py --fid: the shard files it read, and the FID report."""
    _stub_fid(pytest.MonkeyPatch(), cache)  # a spawned process: nothing to undo
    read, result, shard_images = [], {}, sample.shard_images
    sample.shard_images = lambda path: read.append(Path(path).name) or shard_images(path)
    fid.report = lambda r, *_: result.update(r)
    sample.main(argv)
    return {"read": read, **result}

def test_sample_fid_on_two_ranks_reads_each_rank_its_own_shards(tmp_path):
    ckpt = _ckpt(tmp_path, "--dataset", "shapes", "--model", "DDPM")
    _image_folder(tmp_path / "ref", 5)
    results = {world: ranks(world, _sample_fid_rank, [
        "--ckpt", str(ckpt), "--num-samples", "12", "--batch-size", "3", "--steps", "2", "--out",
        str(tmp_path / f"s{world}"), "--fid", str(tmp_path / "ref")], tmp_path / f"cache-{world}")
        for world in (1, 2)}  # the reference computed on `world` ranks
    grid = [f"shard-{s:07d}.npz" for s in (0, 3, 6, 9)]  # rank 0: the first 64 images for grid.png
    assert results[1][0]["read"] == grid + grid
    assert [r["read"] for r in results[2]] == [grid + ["shard-0000000.npz", "shard-0000006.npz"],
                                               ["shard-0000003.npz", "shard-0000009.npz"]]
    one, two = results[1][0], results[2][0]
    assert two["n"] == one["n"] == 12 and two["fid"] == pytest.approx(one["fid"], rel=1e-6)
    assert two["is_mean"] == pytest.approx(one["is_mean"], rel=1e-6)

def test_sample_snapshots_of_a_run_each_get_a_folder_and_fid_names_the_best(tmp_path, monkeypatch,
                                                                            capsys):
    _stub_fid(monkeypatch, tmp_path / "cache")
    _image_folder(tmp_path / "ref", 5)
    run, paths = tmp_path / "run", [str(tmp_path / "run" / f"ckpt-{i:09d}.pt") for i in (100, 200)]
    for path, images, seed in zip(paths, (100, 200), (0, 1)):  # two snapshots: other weights
        ckpt = _load(_ckpt(run / "x", "--dataset", "shapes", "--model", "DDPM", seed=seed))
        del ckpt["model"]  # the EMA alone, as the trainers keep
        torch.save({**ckpt, "images": images}, path)
    results = sample.main(["--ckpt", *paths, "--num-samples", "6", "--batch-size", "3", "--steps",
                           "2", "--fid", str(tmp_path / "ref")])
    assert [r["images"] for r in results] == [100, 200] and results[0]["fid"] != results[1]["fid"]
    for i in (100, 200):  # each in a folder of its own beside ckpt.pt's samples-ddim
        assert (run / f"samples-ddim-ckpt-{i:09d}" / "samples.npz").exists()
    best, out = min(results, key=lambda r: r["fid"]), capsys.readouterr().out
    assert f"{paths[0]} (100 images): FID {results[0]['fid']:.4f}" in out
    assert f"best FID {best['fid']:.4f}: {best['ckpt']} ({best['images']:,} images)" in out

# ------------------------------------------------------------------------------------------------
# probe.py

def _blobs(n, dim=32, classes=10, noise=0.3, seed=0):
    """Gaussian blobs around well separated class means: separable up to rare outliers."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    y = torch.randint(classes, (n,), generator=g)
    return means[y] + noise * torch.randn(n, dim, generator=g), y

def _cell():
    return probe.Cell("trained", 0.1, "out_1")

def _probe_split(f, y):
    """Features (N, C) of _cell() in one view, as the Split one process holds."""
    store = probe.Features(len(y))
    store.put(slice(0, len(y)), 0, {"out_1": f})
    return probe.Split(y, {_cell(): (store, "out_1")}, 1, len(y))

def _probe_fit(head, x, y, xt, yt, **kw):
    """The head trained on (x, y) and scored on (xt, yt): test and train accuracy, train loss."""
    train, test, c = _probe_split(x, y), _probe_split(xt, yt), _cell()
    predict = probe.fit_lbfgs(train, c, 10, "cpu", 0, print)[0] if head == "lbfgs" else \
        probe.fit_table11(train, c, 10, "cpu", seed=0, flip=False,
                          **dict(lr=4e-3, epochs=10, batch_size=128) | kw)
    loss, acc = probe.evaluate(train, c, predict, "cpu")
    return types.SimpleNamespace(test=probe.evaluate(test, c, predict, "cpu")[1], train=acc,
                                 loss=loss)

def test_probe_heads_reach_100_on_separable_data_and_lbfgs_the_optimum_of_its_objective():
    """Both heads reach 100% on separable blobs. On overlapping ones, the converged L-BFGS head's
    objective, minimised independently by scipy's L-BFGS-B in float64 on the same standardised
    rows: the same minimum and predictions; Table 11's head stops well above that loss."""
    from scipy.optimize import minimize
    (x, y), (xt, yt) = _blobs(2000), _blobs(500, seed=1)
    for head in ("lbfgs", "table11"):
        score = _probe_fit(head, x, y, xt, yt)
        assert score.test >= 99.0 and score.train >= 99.0, (head, score)
    x, y = _blobs(1500, dim=16, noise=2.5)  # overlapping classes: the optimum is not 0 loss
    split, l2 = _probe_split(x, y), 1e-3
    mean, std = probe.moments(split.chunks(_cell()), 16)
    xs = ((split.feats(_cell(), torch.arange(1500), 0) - mean) / std).double()
    W, b, grad = probe.lbfgs(lambda: [(xs.float(), y)], 1500, 10, 16, l2, "cpu")
    assert grad <= probe.LBFGS["tolerance_grad"] * 10

    def objective(p):
        w = torch.from_numpy(p[:160]).view(10, 16).requires_grad_()
        c = torch.from_numpy(p[160:]).requires_grad_()
        loss = F.cross_entropy(xs @ w.t() + c, y) + l2 / 2 * w.square().sum()
        loss.backward()
        return loss.item(), torch.cat([w.grad.flatten(), c.grad]).numpy()
    ref = minimize(objective, np.zeros(170), jac=True, method="L-BFGS-B",
                   options=dict(gtol=1e-10, maxiter=10000))
    ours = objective(torch.cat([W.flatten(), b]).numpy())[0]
    assert abs(ours - ref.fun) < 1e-4, (ours, ref.fun)  # converged to sklearn's gradient tolerance
    w_ref, b_ref = torch.from_numpy(ref.x[:160]).view(10, 16), torch.from_numpy(ref.x[160:])
    same = (xs @ W.t() + b).argmax(1) == (xs @ w_ref.t() + b_ref).argmax(1)
    assert same.float().mean() >= 0.995
    short, converged = _probe_fit("table11", x, y, x, y, epochs=2), _probe_fit("lbfgs", x, y, x, y)
    assert short.loss > converged.loss + 0.05, (short, converged)

@pytest.fixture(scope="module")
def _probe_ckpt(tmp_path_factory):
    """A random-weight tiny UNet checkpoint (DDPM, 16x16 shapes): its path, args and model."""
    path = _ckpt(tmp_path_factory.mktemp("probe"), "--dataset", "shapes", "--model", "DDPM",
                 "--resolution", "16", seed=0)
    return path, *sample.load_checkpoint(path)[1:3]

@pytest.fixture
def _small_shapes(monkeypatch):
    """300/150 shapes instead of 10k/2k: the CLI tests exercise plumbing, not accuracy."""
    monkeypatch.setattr(train_unet, "load_pixels", functools.partial(_toy_pixels, (300, 150)))

def _toy_pixels(sizes, args, split):
    return _toy(sizes, args, split)[:2]

def _results(rec, net="trained"):
    return {(r["t"], r["layer"]): r["test"] for r in rec["results"] if r["net"] == net}

def test_probe_features_deterministic_and_pixel_features_pool_large_images(_probe_ckpt):
    _, args, model = _probe_ckpt
    diffusion = train_unet.build_diffusion(args)
    data = probe.Data(torch.randint(0, 256, (20, 3, 16, 16), dtype=torch.uint8),
                      torch.zeros(20, dtype=torch.long))
    layers, views = model.feature_layers[:2], [(torch.arange(20) % 2 == 0, 7)]

    def extract(ts, layers, views=views):  # {(t, layer): (20, C)} as the heads read them back
        out = {}
        for t in ts:
            f = probe.extract({"trained": model}, diffusion, data, t, layers, views,
                              batch_size=8)["trained"]
            out.update({(t, l): f.get(torch.arange(20), 0, l) for l in layers})
        return out
    f1, f2 = extract([11, 66], layers), extract([66], layers[1:])  # a cell alone, as in a grid
    assert set(f1) == {(t, l) for t in (11, 66) for l in layers}
    assert f1[(11, layers[0])].shape[0] == 20 and f1[(11, layers[0])].dtype == torch.float32
    assert torch.equal(f1[(66, layers[1])], f2[(66, layers[1])])
    assert not torch.equal(f1[(11, layers[1])], f1[(66, layers[1])])
    f3 = extract([11], layers[:1], [(views[0][0], 8)])
    assert not torch.equal(f1[(11, layers[0])], f3[(11, layers[0])])  # the view's seed is used
    data = probe.Data(torch.randint(0, 256, (4, 3, 256, 256), dtype=torch.uint8),
                      torch.zeros(4, dtype=torch.long))
    f = probe.pixel_features(data.batch(torch.arange(4), torch.tensor([True, False, True, False])))
    assert f.shape == (4, 3 * 64 * 64) and f.abs().max() <= 1
    assert probe.pixel_features(torch.zeros(2, 3, 32, 32)).shape == (2, 3072)

def test_probe_grid_matches_single_cells_and_prints_the_flags_of_its_best(
        _probe_ckpt, _small_shapes, tmp_path, capsys):
    common = ["--ckpt", str(_probe_ckpt[0]), "--limit", "120", "--extract-batch", "100"]
    rec = probe.main(common + [*"--grid --t 11 66 --layer 1 out_3 --raw-pixels".split(), "--out",
                               str(tmp_path / "g")])
    out, best, acc = capsys.readouterr().out, rec["best"], _results(rec)
    assert rec == json.loads((tmp_path / "g" / "probe.json").read_text())
    assert len(acc) == 4 and rec["layers"] == ["out_1", "out_3"] and rec["ts"] == [11, 66]
    assert rec["raw_pixels"] is not None and (tmp_path / "g" / "probe.png").stat().st_size > 1000
    assert all(r["train"] >= 0 and r["loss"] > 0 and r["l2"] in probe.L2_PATH
               for r in rec["results"])
    assert best["held_out"] == max(r["held_out"] for r in rec["results"])  # held-out tenth's best
    assert "chosen on the held-out tenth of train" in out
    flags = out.split("plus\n")[1].splitlines()[0].split()
    assert flags == ["--self-cond", "--sc-layer", best["layer"], "--probe-t", str(best["t"])]
    args = train_unet.get_args([*TINY[:4], *flags])
    assert (args.sc_layer, args.probe_t, args.self_cond) == (best["layer"], best["t"], True)
    t, layer = best["t"], best["layer"]
    single = probe.main(common + ["--t", str(t), "--layer", layer, "--out", str(tmp_path / "s")])
    assert _results(single)[(t, layer)] == acc[(t, layer)]

def _probe_rank(rank, world, argv):
    train_unet.load_pixels = functools.partial(_toy_pixels, (300, 150))
    return probe.main(argv)["results"]

@pytest.mark.parametrize("head", ["lbfgs", "table11"])
def test_probe_grid_on_two_ranks_equals_one(_probe_ckpt, _small_shapes, tmp_path, head):
    # each rank holds only its own rows, the heads train data-parallel: scores as in one process
    argv = ["--ckpt", str(_probe_ckpt[0]), *"--grid --t 11 66 --layer 1 4 --raw-pixels --limit "
            "120 --epochs 3 --extract-batch 16 --batch-size 32".split(), "--head", head, "--out",
            str(tmp_path / "p")]
    one = probe.main(argv)["results"]
    r0, r1 = ranks(2, _probe_rank, argv)
    assert r0 == r1 and len(r0) == len(one) == 5
    for a, b in zip(r0, one):
        assert a["test"] == pytest.approx(b["test"], abs=1e-9), (a, b)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3), (a, b)

def test_probe_reads_latents_by_memory_map_with_both_flips(tmp_path):
    """A latent DiT is probed from its VA-VAE cache: memory-mapped, normalised a batch at a time
    with the run's latent statistics, the cached flipped latent as the flipped view; Table 11's
    latent batch and lr for its head."""
    ckpt = _ckpt(tmp_path, "--dataset", "in100", "--vae-config", "tiny", "--no-class-cond",
                 script="train_dit.py", cache_dir=str(tmp_path / "cache"))
    mod, args, _, _, ck = sample.load_checkpoint(ckpt)
    g, lat = np.random.default_rng(0), {}
    for split, n in (("train", 40), ("val", 16)):
        y = np.arange(n) % 4
        lat[split] = (g.normal(size=(n, 2, 32, 16, 16)) + y[:, None, None, None, None]).astype(
            np.float16)
        _fake_cache(tmp_path / "cache" / split, train_dit.cache_key(args, n), lat[split], y)
    ck["latent_stats"] = {"mean": torch.full((32,), 0.5), "std": torch.full((32,), 2.0)}
    data = probe.load_split(mod, args, ck, "train")
    assert isinstance(data.x, np.memmap) and len(data) == 40
    assert data.y.tolist()[:5] == [0, 1, 2, 3, 0]
    z = data.batch(torch.tensor([3, 5]), torch.tensor([False, True]))
    want = torch.from_numpy(lat["train"][[3, 5], [0, 1]].astype(np.float32))
    assert torch.equal(z, (want - 0.5) / 2)
    rec = probe.main(["--ckpt", str(ckpt), *"--head table11 --epochs 2 --extract-batch 8".split(),
                      "--out", str(tmp_path / "p")])
    assert (rec["batch_size"], rec["lr"], rec["train_images"], rec["cell"]["layer"]) == \
        (1440, 2e-3, 40, "block_3")
    assert 0 <= rec["cell"]["test"] <= 100

def test_probe_sc_stats_measures_the_self_conditioning_term(tmp_path, _small_shapes):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g)
    assert probe.explained(x @ torch.randn(3, 5, generator=g) + 1, x) == pytest.approx(1, abs=1e-9)
    assert probe.explained(torch.randn(200, 5, generator=g), x) < 0.1
    ckpt = _load(_ckpt(tmp_path, "--dataset", "shapes", "--resolution", "16", "--self-cond"))
    w = ckpt["ema"]["self_cond.proj.weight"]
    ckpt["ema"]["self_cond.proj.weight"] = torch.randn_like(w)  # else the term is 0
    torch.save(ckpt, tmp_path / "ckpt.pt")
    sc = probe.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--sc-stats", "--limit", "60",
                     "--out", str(tmp_path / "p")])["sc_stats"]
    assert len(sc["norm_ratio_by_level"]) == 5
    assert all(r is None or r > 0 for r in sc["norm_ratio_by_level"])
    assert 0 <= sc["r2_class"] <= 1 and 0 <= sc["r2_nuisance"] <= 1

def test_probe_checks_every_checkpoint_and_flag_before_any_work(_probe_ckpt, tmp_path,
                                                                 monkeypatch):
    # a missing second --ckpt, --sc-stats without self-conditioning, a layer or t the model has
    # not, a flag --dense cannot honour: one line within seconds, before any feature is extracted
    path = _probe_ckpt[0]
    monkeypatch.setattr(probe, "extract", lambda *a, **k: pytest.fail("extracted before checks"))
    uvit = _ckpt(tmp_path / "u", "--dataset", "shapes", script="train_uvit.py")
    missing = tmp_path / "nope" / "ckpt.pt"
    for ckpts, flags, msg in [
            ([path, missing], "", f"checkpoint {missing} not found"),
            ([path], "--sc-stats", "--sc-stats: "),
            ([uvit], "--sc-stats", r"UViT's \[CLS\] token adds none"),
            ([path], "--layer 99", "unknown layer 'out_99'"),
            ([path], "--t 5000", r"--t \[5000\] out of range for DDPM"),
            ([path], "--dense --loss", "--dense does not take --loss"),
            ([path], "--dense --head lbfgs --limit 5", "--dense does not take --limit, --head"),
            ([path], "--data-path x", "--data-path needs --dataset"),
            ([path], "--draws 0", "--draws must be positive")]:
        start = time.time()
        _one_line(msg, probe.main, ["--ckpt", *map(str, ckpts), *flags.split(), "--out",
                                    str(tmp_path / "p")])
        assert time.time() - start < 10, flags
    assert not (tmp_path / "p").exists()

def _spy(monkeypatch, fn):
    """probe.extract, recording fn(its arguments) of each call: the list of records."""
    seen, extract = [], probe.extract
    monkeypatch.setattr(probe, "extract",
                        lambda *a, **k: seen.append(fn(*a, **k)) or extract(*a, **k))
    return seen

def test_probe_draws_and_no_flip_set_the_views_of_each_training_image(_probe_ckpt, _small_shapes,
                                                                      tmp_path, monkeypatch):
    seen = _spy(monkeypatch, lambda ms, d, data, t, layers, views, **k: views)
    for flags, n_views in (("", 2), ("--draws 2", 4), ("--no-flip", 1),
                           ("--draws 3 --no-flip", 3)):
        seen.clear()
        rec = probe.main(["--ckpt", str(_probe_ckpt[0]), *"--limit 60 --head table11 --epochs 4"
                          .split(), *flags.split(), "--out", str(tmp_path / "p")])
        train_views, test_views = seen
        assert rec["views"] == len(train_views) == n_views and len(test_views) == 1
        assert test_views[0][0] is None
        assert len({seed for _, seed in train_views}) == n_views // (1 + rec["flip"])  # one a draw
        assert all(f is None for f, _ in train_views) == (not rec["flip"])

def test_probe_init_probes_untrained_weights_of_the_right_architecture(_probe_ckpt, _small_shapes,
                                                                     tmp_path, monkeypatch):
    path, args, _ = _probe_ckpt
    ckpt = _load(path)
    ckpt["args"]["seed"] = 3
    ckpt["ema"] = {k: v + 0.01 * torch.randn_like(v) for k, v in ckpt["ema"].items()}  # "trained"
    torch.save(ckpt, tmp_path / "ckpt.pt")
    seen = _spy(monkeypatch, lambda ms, *a, **k: {
        name: {n: v.clone() for n, v in m.state_dict().items()} for name, m in ms.items()})
    rec = probe.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--init", "--limit", "60",
                      "--out", str(tmp_path / "p")])
    torch.manual_seed(3)
    fresh = train_unet.build_model(args).state_dict()
    trained, init = seen[0]["trained"], seen[0]["init"]  # the test features of both models
    assert all(torch.equal(trained[k], ckpt["ema"][k]) for k in trained)
    assert all(torch.equal(init[k], fresh[k]) for k in fresh) and set(init) == set(fresh)
    assert 0 <= rec["cell"]["init"] <= 100 and _results(rec, "init")

def test_probe_several_checkpoints_summarise_arms_over_seeds_and_pair_them(tmp_path, _small_shapes,
                                                                           capsys):
    paths = [_ckpt(tmp_path / f"{arm}{seed}", *TINY[2:], "--seed", seed, *flags)
             for arm, flags in (("base", []), ("sc", ["--self-cond"])) for seed in (0, 1)]
    recs = probe.main(["--ckpt", *map(str, paths), "--loss", "--raw-pixels", "--limit", "60",
                       "--out", str(tmp_path / "p")])
    assert len(recs) == 4
    rows = json.loads((tmp_path / "p" / "summary.json").read_text())["arms"]
    assert [(r["arm"], r["n"], r["seeds"]) for r in rows] == [("self_cond=False", 2, [0, 1]),
                                                             ("self_cond=True", 2, [0, 1])]
    acc = [r["cell"]["test"] for r in recs]
    assert rows[0]["test"][0] == pytest.approx((acc[0] + acc[1]) / 2)
    assert len(rows[0]["heldout_loss_by_level"]) == 5
    assert rows[1]["paired"]["vs"] == "self_cond=False"
    assert rows[1]["paired"]["diff"] == pytest.approx([acc[2] - acc[0], acc[3] - acc[1]])
    assert "minus self_cond=False, per seed" in capsys.readouterr().out
    assert (tmp_path / "p" / "layers.png").exists()
    assert (tmp_path / "p" / "base1" / "probe.json").exists()

def test_probe_snapshots_of_one_run_are_a_trajectory_and_app_a_names_the_one_that_stands(
        tmp_path, _small_shapes, capsys, monkeypatch):
    """ckpt-<images>.pt snapshots of one run are a trajectory, not seeds: each snapshot's figure,
    the one App. A's rule names (CIFAR: the best of epochs 800/1000/1200; else, or with none of
    those kept, the final) stands for the run; --init and --raw-pixels are measured once."""
    def rec(dataset, epoch, acc, n=50_000, batch=512):
        return {"dataset": dataset, "trained_on": dataset, "epoch": epoch, "train_size": n,
                "images": round(epoch * n), "args": {"batch_size": batch}, "cell": {"test": acc}}
    cifar = [rec("cifar10", e, a) for e, a in ((600, 99), (800.004, 90), (1000.003, 93),
                                               (1200, 91), (2000, 92))]
    assert probe.app_a(cifar)["epoch"] == 1000.003  # the best of 800/1000/1200, not 600 or final
    assert probe.app_a(cifar[:1] + cifar[-1:])["epoch"] == 2000  # none of those kept: the final
    assert probe.app_a([rec("cifar10", 800.5, 99), rec("cifar10", 2000, 90)])["epoch"] == 2000
    assert probe.app_a([rec("in1k", e, a, 1_281_167, 1024) for e, a in ((20, 95), (90, 60))])[
        "epoch"] == 90
    tied = [{**rec("cifar10", e, 93), "ckpt": f"c{e:.0f}", "head": "table11", "args": {
        "batch_size": 512}, "cell": {"test": 93, "t": 11, "layer": "out_1"}} for e in (800, 1000)]
    for order in (tied, tied[::-1]):  # a tie on the pick figure: the earliest snapshot stands
        stands, (run,) = probe.trajectories(order, lambda msg: None)
        assert stands[0]["ckpt"] == run["stands"] == "c800"
    torch.manual_seed(0)
    paths = [str(tmp_path / f"ckpt-{images:09d}.pt") for images in (64, 32, 96)]  # out of order
    for i, (path, images) in enumerate(zip(paths, (64, 32, 96))):
        ckpt = _load(_ckpt(tmp_path, "--dataset", "shapes", "--resolution", "16"))
        ckpt["ema"] = {k: v + 0.05 * i * torch.randn_like(v) for k, v in ckpt["ema"].items()}
        torch.save({**ckpt, "images": images}, path)
    nets = _spy(monkeypatch, lambda ms, *a, **k: (set(ms), k.get("pixels")))
    recs = probe.main(["--ckpt", *paths, "--init", "--raw-pixels", "--limit", "60",
                       "--out", str(tmp_path / "p")])
    assert nets == [({"trained", "init"}, True)] * 2 + [({"trained"}, False)] * 4  # test + train
    assert all(r["cell"]["init"] == recs[0]["cell"]["init"] and r["raw_pixels"] == recs[0][
        "raw_pixels"] for r in recs)
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    (run,), (arm,) = summary["runs"], summary["arms"]
    assert run["images"] == [32, 64, 96] and run["ckpts"] == [paths[1], paths[0], paths[2]]
    assert run["stands"] == paths[2] and arm["n"] == 1
    assert arm["test"][0] == recs[2]["cell"]["test"]
    out = capsys.readouterr().out
    assert "32 images" in out and f"else the final snapshot): {paths[2]}" in out

def test_probe_transfer_reads_the_named_dataset_never_the_runs_folder(tmp_path, _small_shapes,
                                                                    capsys, monkeypatch):
    ckpt = _ckpt(tmp_path, *TINY[2:], data_path=str(tmp_path / "own"))
    common = ["--ckpt", str(ckpt), "--limit", "60"]
    home = probe.main(common)["cell"]["test"]  # in-domain: <run>/probe/probe.json
    served = []
    monkeypatch.setattr(train_unet, "load_pixels", lambda args, split: served.append(
        (args.dataset, args.data_path)) or train_unet.make_shapes(
        300 if split == "train" else 150, int(split != "train"), 32, args.dataset)[:2])  # resized
    rec = probe.main(common + ["--dataset", "shapes-fixed"])
    assert served == [("shapes-fixed", "data")] * 2  # its own default location, not the run's
    assert (rec["dataset"], rec["trained_on"]) == ("shapes-fixed", "shapes")
    assert rec == json.loads((tmp_path / "probe-shapes-fixed" / "probe.json").read_text())
    home_json = tmp_path / "probe" / "probe.json"
    assert f"in-domain (shapes, {home_json}): {home:.2f}% at the same cell" in \
        capsys.readouterr().out
    served.clear()
    probe.main(common + ["--dataset", "shapes-fixed", "--data-path", str(tmp_path / "there")])
    assert served == [("shapes-fixed", str(tmp_path / "there"))] * 2
    # a snapshot beside it is another checkpoint: ckpt.pt's in-domain figure is not its own
    snap = shutil.copy(ckpt, tmp_path / "ckpt-000000032.pt")
    capsys.readouterr()
    probe.main(["--ckpt", str(snap), "--limit", "60", "--dataset", "shapes-fixed"])
    assert "in-domain" not in capsys.readouterr().out

def test_probe_latent_dit_transfers_to_cifar_and_class_folders_through_its_vae(tmp_path,
                                                                               monkeypatch):
    # through its own VA-VAE, each encoded once into a cache keyed by dataset and autoencoder
    torch.manual_seed(0)
    _tiny_vae(tmp_path / "vae.pt")
    ckpt = _ckpt(tmp_path, "--dataset", "in100", "--vae-config", "tiny", "--no-class-cond",
                 script="train_dit.py", vae=str(tmp_path / "vae.pt"))
    monkeypatch.chdir(tmp_path)  # the transfer caches: runs/cache/<dataset>
    monkeypatch.setattr(train_unet, "load_pixels", lambda args, split: (torch.randint(
        0, 256, (12 if split == "train" else 6, 3, 32, 32), dtype=torch.uint8),
        torch.arange(12 if split == "train" else 6) % 3))
    rec = probe.main(["--ckpt", str(ckpt), "--extract-batch", "4", "--dataset", "cifar10"])
    assert (rec["dataset"], rec["train_images"], rec["test_images"], rec["classes"]) == \
        ("cifar10", 12, 6, 3)
    key = json.loads((tmp_path / "runs" / "cache" / "cifar10" / "train" / "key.json").read_text())
    assert (key["dataset"], key["vae"]) == ("cifar10", str(tmp_path / "vae.pt"))
    for split, n in (("train", 4), ("val", 2)):
        _class_folders(tmp_path / "flowers" / split, n, (40, 48), ("a", "b"))
    rec = probe.main(["--ckpt", str(ckpt), "--extract-batch", "4", "--dataset",
                      str(tmp_path / "flowers")])
    assert (rec["dataset"], rec["train_images"], rec["test_images"], rec["classes"]) == \
        ("flowers", 8, 4, 2)
    assert (tmp_path / "runs" / "cache" / "flowers" / "val" / "complete").exists()

def test_probe_dense_scores_ade20k_over_its_150_classes_label_0_ignored(tmp_path):
    # ADE20K's label 0 ('other') is not scored: label c becomes class c - 1 (reduce-zero-label);
    # mIoU over the classes present, by hand
    root = tmp_path / "ADEChallengeData2016"
    labels = np.array([[0, 1, 1, 2], [0, 1, 2, 2], [3, 3, 0, 0], [3, 3, 3, 0]], np.uint8)
    for sub in ("training", "validation"):
        _png(root / "images" / sub / "a.jpg", np.zeros((4, 4, 3), np.uint8))
        _png(root / "annotations" / sub / "a.png", labels)
    x, masks = probe.load_segmentation(train_unet, types.SimpleNamespace(
        dataset="ade20k", data_path=str(root)), "test", 4)
    assert x.shape == (1, 3, 4, 4)
    assert masks[0].tolist() == [[255, 0, 0, 1], [255, 0, 1, 1], [2, 2, 255, 255], [2, 2, 2, 255]]
    pred = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 1, 1]])  # 0 was: any
    logits = F.one_hot(pred, 150).permute(2, 0, 1)[None].float()
    split = _probe_split(torch.zeros(1, 3), torch.zeros(1))
    miou, acc, _ = probe.dense_scores(split, _cell(), lambda f: logits, masks, 150)
    # 11 scored pixels (5 ignored), 9 right. Class 0: 3 labelled, 2 right, none more predicted:
    # 2/3; class 1: 3 labelled, 3 right, 2 more predicted: 3/5; class 2: 5 labelled, 4 right: 4/5
    assert miou == pytest.approx(100 * (2 / 3 + 3 / 5 + 4 / 5) / 3)
    assert acc == pytest.approx(100 * 9 / 11)

def test_probe_dense_two_noise_levels_raw_pixels_and_init_each_get_a_head(_probe_ckpt, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setattr(train_unet, "shapes_split", functools.partial(_toy, (40, 20)))
    rec = probe.main(["--ckpt", str(_probe_ckpt[0]), *"--dense --t 11 66 --layer 1 2 --init "
                      "--raw-pixels --epochs 1 --batch-size 8".split(), "--out", str(tmp_path)])
    cells = [(r["net"], r["t"], r["layer"]) for r in rec["results"]]
    nets = [(n, l) for n in ("trained", "init") for l in ("out_1", "out_2")]
    assert cells == [(n, 11, l) for n, l in nets] + [("pixels", None, "pixels")] + \
        [(n, 66, l) for n, l in nets]
    assert (rec["resolution"], rec["classes"]) == (16, 11)
    assert all(0 <= r["miou"] <= 100 and r["train_loss"] > 0 for r in rec["results"])
    # the dense head flips as the pooled heads do: --no-flip (or a run without flips) takes none
    seen = _spy(monkeypatch, lambda ms, d, data, t, layers, views, **k: views)
    for flags, flipped in (([], [None, True]), (["--no-flip"], [None])):
        seen.clear()
        probe.main(["--ckpt", str(_probe_ckpt[0]), "--dense", "--epochs", "1", *flags,
                    "--out", str(tmp_path / "f")])
        assert [v if v is None else bool(v.all()) for v, _ in seen[0]] == flipped

def test_probe_dense_above_chance_after_a_short_run_near_chance_at_init(tmp_path, tiny_run,
                                                                        monkeypatch):
    # --dense on the toy's masks (0 background, 1 + class on a dot): a short run of the
    # quickstart's settings against the same network at init, which lands where labelling every
    # pixel background does
    out = _copy_run(tiny_run(*"--net tiny --dataset shapes-fixed --model RF --train-images 4000 "
                             "--batch-size 32 --warmup-images 500 --sample-every 0".split(),
                             toy=(800, 200)), tmp_path)
    monkeypatch.setattr(train_unet, "shapes_split", functools.partial(_toy, (800, 200)))
    rec = probe.main(["--ckpt", str(out / "ckpt.pt"), *"--dense --init --epochs 10 --batch-size "
                      "32 --lr 0.03".split()])  # 250 steps: a short probe, a higher lr
    assert rec == json.loads((out / "probe-dense" / "probe.json").read_text())
    trained, init = ({(r["t"], r["layer"]): r for r in rec["results"] if r["net"] == n}
                     for n in ("trained", "init"))
    assert list(trained) == [(0.4, "out_2")]
    masks = train_unet.make_shapes(200, 1, 32, "shapes-fixed")[2]
    background = (masks == 0).float().mean().item()
    chance = 100 * background / 11  # every pixel background: that class's IoU, over 11 labels
    assert abs(init[(0.4, "out_2")]["miou"] - chance) < 1, (rec, chance)
    assert trained[(0.4, "out_2")]["miou"] > chance + 3, (rec, chance)  # 13.1% vs 8.4% at first
    assert trained[(0.4, "out_2")]["pixel_acc"] > 100 * background

# ------------------------------------------------------------------------------------------------
# .ci/gpu: the GPU check. The `gpu` tests need CUDA (skipped here; `.ci/gpu` runs them with
# `-m gpu`) and run with the real GPU defaults: bf16 autocast, fused Adam, TF32, channels_last,
# torch.compile on inductor, flash attention, 1-rank nccl. The CPU tests after them cover the
# check's own logic and parts.

with warnings.catch_warnings():  # no conftest.py or pytest.ini registers it; -m gpu selects it
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    GPU = pytest.mark.gpu
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: see .ci/gpu")

# A trainer's main() in a process of its own, then what it left set: the backend, TF32, the
# optimizer's fused kernel and the weights' layout (world 1 keeps the process group after main()).
GPU_TRAIN = """import json, sys, torch, torch.distributed as dist
mod = __import__(sys.argv[1])
model, ema = mod.main(sys.argv[2:])
print(json.dumps({"backend": dist.get_backend(),
                  "tf32": torch.backends.cuda.matmul.allow_tf32
                  and torch.backends.cudnn.allow_tf32,
                  "fused_adam": mod.build_optimizer(model, mod.get_args(sys.argv[2:]))
                  .defaults["fused"],
                  "channels_last": all(p.is_contiguous(memory_format=torch.channels_last)
                                       for p in model.parameters() if p.dim() == 4)}))
dist.destroy_process_group()
"""

@pytest.fixture(scope="module")
def _gpu_runs(tmp_path_factory):
    """The GPU_STYLE runs with the GPU defaults, each a 1-rank nccl world, side by side."""
    procs, runs = {}, {}
    for name, extra in GPU_STYLE.items():
        out = tmp_path_factory.mktemp(name) / "run"
        procs[name] = out, subprocess.Popen(
            [sys.executable, "-c", GPU_TRAIN, name, *_gpu_style(out, extra)], cwd=ROOT, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    try:
        for name, (out, p) in procs.items():
            log = p.communicate(timeout=300)[0]
            runs[name] = out, p.returncode, log
    finally:  # a run past its time must not hold the GPU for the rest of the check
        for _, p in procs.values():
            p.kill()
    return runs

@GPU
@NEEDS_CUDA
@pytest.mark.parametrize("name", list(GPU_STYLE))
def test_gpu_trainers_train_with_gpu_defaults_and_sample(_gpu_runs, tmp_path, name):
    out, rc, log = _gpu_runs[name]
    assert rc == 0, log[-3000:]
    assert gpu_check.last_json(log) == {"backend": "nccl", "tf32": True, "fused_adam": True,
                                        "channels_last": True}
    _check_gpu_style_run(out, None, f"{name}.py", tmp_path / "samples", [])  # auto: bf16 on CUDA

# bf16 rounds each operand to 8 significant bits (steps of 0.4%); the four paper nets read 0.4-1.1%
# relative L2 error of their output on CPU (ddpm 0.99%, ddpmpp 1.07%, UViT-S 0.71%, DiT-B/1 0.41%),
# so 3% leaves room for the GPU's other kernels while a layer in the wrong dtype or a broken kernel
# shows as tens of percent.
BF16_TOL = 0.03

def _bf16_error(mod, argv, shape, device):
    """Relative L2 error of the bf16 autocast forward (flash attention kernels only) against the
    true fp32 forward (TF32 off) of the same weights. Zero-initialised tensors (adaLN-zero, output
    layers) get small random values: else the output is 0 and the error relative to nothing."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    mod, fmt = module(mod), module(mod).memory_format(device)
    torch.manual_seed(0)
    model = mod.build_model(mod.get_args([*argv, "--self-cond"])).to(device, memory_format=fmt)
    for p in model.parameters():
        if not p.detach().any():
            nn.init.normal_(p, std=0.02)
    x = torch.randn(4, *shape, device=device).contiguous(memory_format=fmt)
    t = torch.rand(4, device=device)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with torch.no_grad():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            ref = model.eval()(x, t)[0]
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            with torch.autocast(device.type, torch.bfloat16):
                low = model(x, t)[0]
    assert low.dtype == torch.bfloat16  # autocast reached the output layer
    return ((low.float() - ref).norm() / ref.norm()).item()

@GPU
@NEEDS_CUDA
@pytest.mark.parametrize("mod,argv,shape", [("train_unet", ["--net", "ddpm"], (3, 32, 32)),
                                            ("train_unet", ["--net", "ddpmpp"], (3, 32, 32)),
                                            ("train_uvit", [], (3, 32, 32)),
                                            ("train_dit", ["--no-class-cond"], (32, 16, 16))])
def test_gpu_bf16_forward_matches_fp32_on_flash_attention(mod, argv, shape):
    assert _bf16_error(mod, argv, shape, torch.device("cuda")) < BF16_TOL

def test_gpu_check_bf16_comparison_runs_on_cpu_tiny_nets():
    # the comparison above, on the tiny presets on CPU (flash attention has a CPU kernel)
    for mod, argv in [("train_unet", []), ("train_uvit", []), ("train_dit", ["--latent", "none"])]:
        err = _bf16_error(mod, [*TINY[:4], *argv], (3, 32, 32), CPU)
        assert 1e-4 < err < BF16_TOL  # not zero: bf16 did run

def test_gpu_check_without_cuda_says_so_and_exits_0():
    p = subprocess.run([str(ROOT / ".ci" / "gpu")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 0 and p.stdout == (
        "gpu check: no CUDA device (torch.cuda.is_available() is False); nothing to run\n")

def test_gpu_check_arguments_datasheet_peaks_and_the_papers_per_gpu_batch():
    assert gpu_check.get_args([]).parts == list(gpu_check.PARTS)
    assert gpu_check.get_args(["bench", "ddp-order"]).parts == ["bench", "ddp-order"]
    _raises("", gpu_check.get_args, ["bench", "speed"])  # argparse's usage error, before GPU work
    assert gpu_check.datasheet_bf16_tflops("NVIDIA H200") == 989
    assert gpu_check.datasheet_bf16_tflops("NVIDIA H100 80GB HBM3") == 989
    for other in ("NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200 NVL", "A100-SXM4-80GB"):
        assert gpu_check.datasheet_bf16_tflops(other) is None
    # the benchmarks: Table 11's global batch (the trainers' default) over the paper's GPUs
    gpus = {"ddpm": 4, "ddpmpp": 4, "uvit_s": 4, "dit_b1": 6}
    for name, (script, argv) in gpu_check.BENCHES.items():
        mod = module(script)
        args = mod.get_args([*argv, "--self-cond", "--bench", str(gpu_check.BENCH_STEPS)])  # flags
        assert argv[-2] == "--batch-size" and args.net == {"dit_b1": "B"}.get(name, name)
        assert args.batch_size == mod.get_args(argv[:-2]).batch_size // gpus[name]

def test_gpu_check_assembles_one_json_line(monkeypatch, capsys):
    """main() on fake parts: one line, MFU on the datasheet, a failed part recorded, exit 1."""
    for name, value in (("is_available", lambda: True), ("device_count", lambda: 1),
                        ("get_device_name", lambda i=0: "NVIDIA H100 80GB HBM3")):
        monkeypatch.setattr(torch.cuda, name, value)
    rec = {"batch": 128, "img_per_s": 2000.0, "ms_per_step": 64.0, "peak_mem_gib": 20.0,
           "gflop_per_img": 36.3, "tflops": 296.7, "mfu": 0.45, "matmul_peak_tflops": 659.3,
           "self_cond_overhead": 1.012, "device": "x"}

    def bench(script, argv):
        if "ddpmpp" in argv:
            raise RuntimeError("exit 1: CUDA error: an illegal memory access was encountered")
        return rec
    monkeypatch.setattr(gpu_check, "bench", bench)
    monkeypatch.setattr(gpu_check, "gpu_tests", lambda tmp: {
        "passed": 7, "failed": 0, "skipped": 0, "failed_tests": []})
    monkeypatch.setattr(gpu_check, "fid_speed", lambda device: {"fid_features_per_s": 4321.0,
                                                                "batch": 200})
    monkeypatch.setattr(gpu_check, "sample_speed", lambda tmp: {"img_per_s": 12.34567})
    assert gpu_check.main([]) == 1
    cap = capsys.readouterr()
    fig = json.loads(cap.out)  # one line
    assert len(cap.out.splitlines()) == 1 and fig["gpu"] == "NVIDIA H100 80GB HBM3"
    assert fig["gpus"] == 1 and fig["datasheet_bf16_tflops"] == 989 and fig["tests"]["passed"] == 7
    assert fig["fid"]["fid_features_per_s"] == 4321
    assert fig["sample_dit_b1"] == {"img_per_s": 12.35}  # 4 significant digits
    assert fig["bench"]["ddpm"]["mfu_datasheet"] == 0.3
    assert fig["bench"]["ddpm"]["self_cond_overhead"] == 1.012
    assert "device" not in fig["bench"]["ddpm"] and set(fig["bench"]) == set(gpu_check.BENCHES)
    assert fig["bench"]["ddpmpp"] == {
        "error": "RuntimeError: exit 1: CUDA error: an illegal memory access was encountered"}
    assert fig["ddp_order"] == {"not_measured": "1 GPU: the order needs 2 ranks"}
    # the README's table, the failed bench left out
    assert ("| ddpm | 128 | 2000 | 30.0% | x1.012 |\n| uvit_s | 128 | 2000 | 30.0% | x1.012 |\n"
            "| dit_b1 | 128 | 2000 | 30.0% | x1.012 |\nFID features: 4321 images/s\n"
            "DiT-B/1 sampling, Euler-250 + CFG: 12.3 images/s\n") in cap.err
    assert cap.err.endswith("gpu check: failed: bench ddpmpp\n")
    assert gpu_check.main(["fid", "sample"]) == 0  # the parts that work, alone
    assert set(json.loads(capsys.readouterr().out)) == {
        "date", "gpu", "gpus", "torch", "cuda", "datasheet_bf16_tflops", "fid", "sample_dit_b1",
        "seconds"}

def test_gpu_check_runs_the_gpu_tests_and_counts_them(tmp_path, monkeypatch, capfd):
    """The real `pytest -m gpu` of the check, here with CUDA hidden: it selects exactly the gpu
    tests (all skipped), with no unknown-marker warning; failures are counted and named from
    pytest's junit report."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_check.gpu_tests(tmp_path) == {"passed": 0, "failed": 0, "skipped": 7,
                                             "failed_tests": []}
    assert "PytestUnknownMarkWarning" not in capfd.readouterr().err
    junit = ('<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="2" tests="9">'
             '<testcase name="test_a"><failure message="x"/></testcase><testcase name="test_b"/>'
             '<testcase name="test_c"><error message="y"/></testcase></testsuite></testsuites>')
    assert gpu_check.junit_counts(junit) == {"passed": 5, "failed": 2, "skipped": 2,
                                             "failed_tests": ["test_a", "test_c"]}

def test_gpu_check_parts_measure_on_cpu(tmp_path):
    # each measuring part end to end on tiny configurations: the same calls the GPU run makes
    rec = gpu_check.bench_part("train_dit.py", [*TINY, "--latent", "none", "--batch-size", "4"],
                               None)
    assert rec["batch"] == 4 and rec["img_per_s"] > 0 and rec["self_cond_overhead"] > 0
    assert "mfu_datasheet" not in rec
    assert gpu_check.fid_speed(CPU, n=4, batch=2, rounds=1)["fid_features_per_s"] > 0
    s = gpu_check.sample_speed(tmp_path, ("--net", "tiny", "--dataset", "in100"), "tiny", batch=2,
                               steps=2)
    assert s["img_per_s"] > 0 and s["cfg_scale"] == 1.5  # class-conditional: guided by default
    assert np.load(tmp_path / "n4" / "samples.npz")["arr_0"].shape == (4, 256, 256, 3)  # VA-VAE
    # the DDP order: both train over 2 gloo ranks (eager backend: no code generation)
    r = gpu_check.ddp_order(0, tmp_path, [*TINY, "--self-cond", "--batch-size", "4"],
                            backend="eager", steps=1)
    assert r["world"] == 2 and set(r["ms_per_step"]) == {"compile(DDP)", "DDP(compile)"}
    assert r["faster"] in r["ms_per_step"] and r["ratio_compile_ddp_over_ddp_compile"] > 0

def test_memory_benchmark_sampler_sees_a_transient_allocation():
    """.ci/memory.py's sampler: a 200 MiB array freed inside fn raises the peak by that much."""
    base = memory.peak_anon(lambda: None)
    peak = memory.peak_anon(lambda: (np.ones(200 * 2**20, np.uint8), time.sleep(0.05)))
    assert 190 * 2**20 < peak - base < 260 * 2**20

if __name__ == "__main__":  # a test file, not a script: say how to run it and what else there is
    sys.exit("usage: python -m pytest -q test_smoke.py [pytest options]\n"
             "the memory benchmark of the evaluation: python .ci/memory.py --help")
