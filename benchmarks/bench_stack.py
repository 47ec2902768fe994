"""Time and size one 16-page stack through the container, against the organisers' reference shape.

    python benchmarks/bench_stack.py --input ../shared/data/midog25-track2-sample --weights weights \
        --repeats 5 --out results.json

Each repeat starts three fresh Python processes, so every run pays the imports and the weight loading
as the container does:

* ``process.py``: the container's entry point, timed from spawn to exit and to the moment its JSON
  file was written.
* ``ours``: this file in harness mode. It calls the functions ``process.py`` calls, in the same order,
  and reports the time of each part: imports, reading the stack, weight loading, inference, writing.
* ``reference``: the MIDOG 2025 track-2 reference container's shape, as this benchmark assumes it.
  One timm ``efficientnetv2_m`` with a single output, its state dict loaded from a checkpoint file,
  each page resized to 224x224 and scored alone (batch of 1). Reading and writing use the same code
  as ours. The checkpoint contains random weights, which cost the same time as trained ones.

The two harness runs swap order on every repeat so that a slow drift of the machine hits both.
Peak RSS and CPU time come from ``os.wait4`` for each child. The result is a markdown table on
stdout with median [min-max] per measure and the ratio ours/reference, then the targets. Logs go to
stderr, and ``--out`` also writes every run's numbers as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("bench_stack")

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_ARCH = "efficientnetv2_m"
REFERENCE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KINDS = ("process", "ours", "reference")

# Targets on a 2-core CPU machine: inference time relative to the reference, seconds, bytes.
MAX_INFERENCE_RATIO = 0.5
MAX_IMPORTS_AND_WEIGHTS_S = 1.5
MAX_PEAK_RSS_BYTES = 1.5e9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", type=Path, required=True, help="input folder as process.py reads it (inputs.json and images/)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="weights folder for ours (default: the folder process.py picks without --weights)")
    parser.add_argument("--threads", type=int, default=0,
                        help="OMP_NUM_THREADS for every child (0: leave the environment as it is)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each kind")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each kind first, to fill the page cache")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="device for both networks")
    parser.add_argument("--out", type=Path, default=None, help="write every run and the summary to this JSON file")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "bench_stack",
                        help="folder for the reference checkpoint, made once and reused")
    parser.add_argument("--harness", choices=("ours", "reference", "checkpoint"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--spawned-at", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 0:
        parser.error(f"--repeats must be >= 1, --warmup and --threads >= 0; got {args.repeats}, {args.warmup}, {args.threads}")
    return args


# ---------------------------------------------------------------- harness (runs inside a child)


class PartTimer:
    """``perf_counter`` durations of named parts, in seconds."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        started = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - started


def harness_ours(args: argparse.Namespace, timer: PartTimer) -> dict:
    """Run the steps of ``process.run`` one by one and time them."""
    with timer("imports"):
        import torch

        import process
        from model.io import OUTPUT_FILE, find_stack, read_stack
        from model.predict import Predictor, resolve_weights_dir

    with timer("reading"):
        process.check_writable(args.output)
        pages = read_stack(find_stack(args.input))

    with timer("weights"):
        weights_dir, _ = resolve_weights_dir(args.weights)
        predictor = Predictor(weights_dir, device=args.device)

    with timer("inference"):
        prediction = predictor.predict(pages)

    with timer("writing"):
        result = process.build_result(prediction.p_atypical, prediction.classes)
        process.write_json_atomic(result, args.output / OUTPUT_FILE)

    return {"pages": len(pages), "folds": len(predictor.nets), "views": len(predictor.views),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def harness_reference(args: argparse.Namespace, timer: PartTimer) -> dict:
    """Score every page alone with one EfficientNetV2-M at 224x224 (the reference shape), timing each part."""
    with timer("imports"):
        import numpy as np
        import timm
        import torch
        import torch.nn.functional as F

        import process
        from model.io import OUTPUT_FILE, find_stack, read_stack

    with timer("reading"):
        process.check_writable(args.output)
        pages = read_stack(find_stack(args.input))

    with timer("weights"):
        device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
        network = timm.create_model(REFERENCE_ARCH, pretrained=False, num_classes=1)
        network.load_state_dict(torch.load(reference_checkpoint(args.cache), map_location="cpu", weights_only=True))
        network = network.to(device).eval()
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    with timer("inference"):
        p_atypical = []
        with torch.inference_mode():
            for page in pages:
                image = torch.from_numpy(np.ascontiguousarray(page.transpose(2, 0, 1))).to(device).float()[None] / 255.0
                image = F.interpolate(image, size=(REFERENCE_SIZE, REFERENCE_SIZE), mode="bilinear", align_corners=False)
                logit = network((image - mean) / std)  # (1, 1)
                p_atypical.append(torch.sigmoid(logit).item())

    with timer("writing"):
        classes = ["atypical" if p >= 0.5 else "normal" for p in p_atypical]
        result = process.build_result(p_atypical, classes)
        process.write_json_atomic(result, args.output / OUTPUT_FILE)

    return {"pages": len(pages), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def reference_checkpoint(cache: Path) -> Path:
    return cache / f"{REFERENCE_ARCH}-random.pt"


def make_reference_checkpoint(cache: Path) -> None:
    """Save a randomly initialised reference network's state dict, once per cache folder."""
    import torch
    import timm

    path = reference_checkpoint(cache)
    cache.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    network = timm.create_model(REFERENCE_ARCH, pretrained=False, num_classes=1)
    temporary = path.with_suffix(".tmp")
    torch.save(network.state_dict(), temporary)
    temporary.replace(path)


def run_harness(args: argparse.Namespace) -> int:
    """Child side: time the parts, then print them as one JSON line on stdout."""
    startup = time.time() - args.spawned_at if args.spawned_at else float("nan")
    sys.path.insert(0, str(ROOT))
    if args.harness == "checkpoint":
        make_reference_checkpoint(args.cache)
        return 0

    import process

    process.offline_environment()
    timer = PartTimer()
    timer.seconds["startup"] = startup
    details = (harness_ours if args.harness == "ours" else harness_reference)(args, timer)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"parts": timer.seconds, "peak_rss_bytes": peak_rss, **details}))
    return 0


# ---------------------------------------------------------------- driver (spawns the children)


def child_environment(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        env["MKL_NUM_THREADS"] = str(threads)
    return env


def spawn(command: list[str], env: dict[str, str], log_dir: Path, name: str) -> dict:
    """Run one child to its end and return its wall time, spawn time, resource usage and stdout.

    A ``{spawned_at}`` argument in ``command`` becomes the spawn's ``time.time()``, so that the child
    can measure its own interpreter start.
    """
    stdout_path, stderr_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
    with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
        spawned_at = time.time()
        started = time.perf_counter()
        argv = [repr(spawned_at) if part == "{spawned_at}" else part for part in command]
        child = subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=env, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)  # wait4 reaped the child, so Popen must not wait again
    if child.returncode != 0:
        tail = stderr_path.read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"{name} failed with exit code {child.returncode}: {' | '.join(tail)}")
    return {
        "spawned_at": spawned_at,
        "total_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux reports KiB
        "stdout": stdout_path.read_text(),
    }


def run_once(kind: str, args: argparse.Namespace, env: dict[str, str], work: Path, name: str) -> dict:
    """Run one child of ``kind`` into a fresh output folder and return its measurements."""
    from model.io import OUTPUT_FILE

    output = work / name
    output.mkdir()
    if kind == "process":
        command = [sys.executable, str(ROOT / "process.py"), "--input", str(args.input), "--output", str(output),
                   "--device", args.device]
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--harness", kind, "--input", str(args.input),
                   "--output", str(output), "--device", args.device, "--cache", str(args.cache),
                   "--spawned-at", "{spawned_at}"]
    if kind != "reference" and args.weights is not None:
        command += ["--weights", str(args.weights)]
    run = spawn(command, env, work, name)

    written = output / OUTPUT_FILE
    if not written.is_file():
        raise RuntimeError(f"{name}: exited 0 but wrote no {OUTPUT_FILE} in {output}")
    run["to_json_s"] = written.stat().st_mtime_ns / 1e9 - run["spawned_at"]
    run["pages"] = len(json.loads(written.read_text(encoding="utf-8")))
    if kind != "process":
        report = json.loads(run["stdout"].strip().splitlines()[-1])
        run["parts"] = report.pop("parts")
        run["child_peak_rss_bytes"] = report.pop("peak_rss_bytes")
        run.update(report)
    del run["stdout"]
    return run


def run_all(args: argparse.Namespace, work: Path) -> list[dict]:
    """Warm up, then run every kind ``--repeats`` times. The two harness kinds swap order on each repeat."""
    env = child_environment(args.threads)
    if not reference_checkpoint(args.cache).is_file():
        logger.info("saving a random %s checkpoint to %s (once)", REFERENCE_ARCH, args.cache)
        spawn([sys.executable, str(Path(__file__).resolve()), "--harness", "checkpoint", "--input", str(args.input),
               "--cache", str(args.cache)], env, work, "checkpoint")

    for index in range(args.warmup):
        for kind in KINDS:
            logger.info("warm-up %d/%d: %s", index + 1, args.warmup, kind)
            run_once(kind, args, env, work, f"warmup{index}-{kind}")

    runs = []
    for repeat in range(args.repeats):
        order = ("process", "ours", "reference") if repeat % 2 == 0 else ("process", "reference", "ours")
        for kind in order:
            run = run_once(kind, args, env, work, f"run{repeat}-{kind}")
            run.update(kind=kind, repeat=repeat)
            runs.append(run)
            parts = ", ".join(f"{name} {seconds:.2f}" for name, seconds in run.get("parts", {}).items())
            logger.info("repeat %d/%d %-9s total %.2f s, peak RSS %.0f MiB%s", repeat + 1, args.repeats, kind,
                        run["total_s"], run["peak_rss_bytes"] / 2**20, f" ({parts})" if parts else "")
    return runs


# ---------------------------------------------------------------- summary


def spread(values: list[float]) -> dict:
    """Return the median, min, max and quartiles of ``values``."""
    values = sorted(values)
    quartiles = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "min": values[0], "max": values[-1],
            "q1": quartiles[0], "q3": quartiles[2], "n": len(values)}


def measures(run: dict) -> dict[str, float]:
    """Flatten one run into named numbers: seconds, bytes."""
    values = {"total_s": run["total_s"], "to_json_s": run["to_json_s"], "cpu_s": run["cpu_s"],
              "peak_rss_bytes": run["peak_rss_bytes"]}
    for part, seconds in run.get("parts", {}).items():
        values[f"{part}_s"] = seconds
    if "parts" in run:
        values["imports_and_weights_s"] = run["parts"]["imports"] + run["parts"]["weights"]
    return values


def summarise(runs: list[dict]) -> dict[str, dict[str, dict]]:
    summary = {}
    for kind in KINDS:
        per_run = [measures(run) for run in runs if run["kind"] == kind]
        summary[kind] = {name: spread([values[name] for values in per_run]) for name in per_run[0]}
    return summary


def check_targets(summary: dict) -> list[dict]:
    ours, reference, container = summary["ours"], summary["reference"], summary["process"]
    inference_ratio = ours["inference_s"]["median"] / reference["inference_s"]["median"]
    return [
        {"target": "inference time, ours / reference", "measured": inference_ratio, "limit": MAX_INFERENCE_RATIO,
         "text": f"{inference_ratio:.2f}x", "limit_text": f"<= {MAX_INFERENCE_RATIO}x"},
        {"target": "imports + weight loading (ours)", "measured": ours["imports_and_weights_s"]["median"],
         "limit": MAX_IMPORTS_AND_WEIGHTS_S, "text": f"{ours['imports_and_weights_s']['median']:.2f} s",
         "limit_text": f"<= {MAX_IMPORTS_AND_WEIGHTS_S} s"},
        {"target": "peak RSS of process.py", "measured": container["peak_rss_bytes"]["max"], "limit": MAX_PEAK_RSS_BYTES,
         "text": f"{container['peak_rss_bytes']['max'] / 1e9:.2f} GB (largest run)", "limit_text": f"<= {MAX_PEAK_RSS_BYTES / 1e9} GB"},
    ]


ROWS = (
    ("total_s", "spawn to exit (s)"),
    ("to_json_s", "spawn to JSON written (s)"),
    ("startup_s", "interpreter start (s)"),
    ("imports_s", "imports (s)"),
    ("reading_s", "reading the stack (s)"),
    ("weights_s", "weight loading (s)"),
    ("inference_s", "inference (s)"),
    ("writing_s", "writing the JSON (s)"),
    ("imports_and_weights_s", "imports + weight loading (s)"),
    ("cpu_s", "CPU time, user + system (s)"),
    ("peak_rss_bytes", "peak RSS (MiB)"),
)


def format_cell(stats: dict | None, name: str) -> str:
    if stats is None:
        return "-"
    if name == "peak_rss_bytes":
        scale, digits = 2**20, 0
    else:
        scale, digits = 1.0, 2 if stats["median"] >= 0.1 else 3
    return f"{stats['median'] / scale:.{digits}f} [{stats['min'] / scale:.{digits}f}-{stats['max'] / scale:.{digits}f}]"


def markdown(summary: dict, targets: list[dict]) -> str:
    lines = ["| measure | process.py | ours (harness) | reference (harness) | ours / reference |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, label in ROWS:
        cells = [format_cell(summary[kind].get(name), name) for kind in KINDS]
        ours, reference = summary["ours"].get(name), summary["reference"].get(name)
        ratio = f"{ours['median'] / reference['median']:.2f}" if ours and reference and reference["median"] > 0 else "-"
        lines.append(f"| {label} | {' | '.join(cells)} | {ratio} |")
    lines += ["", "| target | measured | limit | met |", "| --- | ---: | ---: | --- |"]
    for target in targets:
        met = "yes" if target["measured"] <= target["limit"] else "no"
        lines.append(f"| {target['target']} | {target['text']} | {target['limit_text']} | {met} |")
    return "\n".join(lines)


def machine() -> dict:
    model_name = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model_name = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                           if line.startswith("model name")), "")
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": model_name,
            "cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "load_average": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.harness:
        return run_harness(args)

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.path.insert(0, str(ROOT))
    args.input = args.input.resolve()
    args.weights = args.weights.resolve() if args.weights else None
    before = machine()
    work = Path(tempfile.mkdtemp(prefix="bench_stack-"))
    try:
        runs = run_all(args, work)
    except RuntimeError as error:
        logger.error("%s (child logs kept in %s)", error, work)
        return 1
    shutil.rmtree(work)

    summary = summarise(runs)
    targets = check_targets(summary)
    print(markdown(summary, targets))
    if args.out:
        report = {"command": [sys.executable, *sys.argv], "machine": before, "load_average_after": os.getloadavg(),
                  "threads": args.threads or os.environ.get("OMP_NUM_THREADS", "default"),
                  "summary": summary, "targets": targets, "runs": runs}
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
