"""Banks at scale: coreset build, kNN time and memory, faiss backends, cost growth with the bank size. One command.

    python benchmarks/bank_scale.py                # the README tables (about 25 minutes on a loaded 2-core box)
    python benchmarks/bank_scale.py --tables knn   # only the kNN memory table (10 processes per method)
    python benchmarks/bank_scale.py --quick        # smaller sizes, a few minutes

Every measurement runs in a fresh Python subprocess (``--worker``), so that timings and memory peaks do not carry
allocator or thread-pool state from one to the next. ``OMP_WAIT_POLICY=PASSIVE`` is set for the workers: on a shared
box, OpenMP threads that spin after a parallel region (faiss's and torch's) steal the cores from the next operation.

Data: seeded synthetic 768-d rows with the low intrinsic dimension of patch features (a 200-component Gaussian
mixture in a 32-d latent space, mapped to 768-d by a fixed random matrix, plus 0.05 isotropic noise). Queries are
784 new rows from the same mixture (one image's 28 x 28 patch grid). Banks are written once to ``--cache-dir`` and
read by the workers with one allocation (``numpy.load``), so the memory baseline is clean.

Tables:

1. Coreset: greedy k-center (ours: ``greedy_coreset`` with its default 256-column projection, and without
   projection; anomalib: ``KCenterGreedy``, seeded) at 50k and 200k rows.
   anomalib's time for the full 10 % coreset is extrapolated linearly from ``--anomalib-picks`` picks (its cost per pick
   is constant: one pass over the projected bank), marked "extrap.". Coverage radius = max over rows of the Euclidean
   distance to the nearest selected row, in the original 768-d space, at the number of picks both methods ran.
2. kNN, 784 queries against 200k x 768, k = 1, in ``--knn-runs`` (10) fresh processes per method, interleaved
   (run 1 of every method, then run 2, ..., each run starting one method later): min / median / max over the processes
   of the peak extra memory (peak RSS during three consecutive searches minus RSS before the first, Linux ``VmHWM``
   reset through ``/proc/self/clear_refs``) and of the time of one search (the fastest of the three). Methods: ours
   with the memory bank's cached norms, ours without them, the same search with the code before the block buffers
   (``--knn-baseline``, a git revision whose ``knn.py`` is written to the cache directory and loaded from there),
   anomalib's ``PatchcoreModel.nearest_neighbors`` and the faiss flat index. The spread over processes is the point: a
   peak that depends on the allocator's state shows as a large max. On a shared machine a process's time carries the
   load of its moment, so ours and the baseline are also timed alternately in one process (8 rounds each).
3. Growth: per bank size and backend, index build time and time per image (784 queries, k = 14 = HyperTrans'
   num_neighbors + shortlist margin), recall@1 against exact search; our 10 % coreset time at that size.
4. Bottle (``--bottle``, on by default unless ``--quick``): HyperTrans image / pixel AUROC and time per image with each
   search backend on the bottle cross-domain benchmark of ``hypertrans_ablation.py``, in a small setting (see the
   table title).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

KNN_BASELINE = "7f4857a"  # the revision before the kNN block buffers (issue 20)
PAIRED_ROUNDS = 8  # alternating searches of ours and the baseline in one process (kNN table)

CHANNELS = 768
LATENT = 32
COMPONENTS = 200
QUERIES = 784
SEARCH_K = 14  # HyperTrans: num_neighbors 10 + SHORTLIST_MARGIN 4
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------------ data
def synthetic_rows(rows: int, seed: int, block: int = 8192) -> np.ndarray:
    """Seeded rows of the benchmark mixture, float32 ``(rows, 768)``, generated block by block."""
    structure = torch.Generator().manual_seed(1234)  # the same mixture for banks and queries
    basis = torch.randn(LATENT, CHANNELS, generator=structure) / LATENT**0.5
    centres = torch.randn(COMPONENTS, LATENT, generator=structure) * 2.0
    generator = torch.Generator().manual_seed(seed)
    out = np.empty((rows, CHANNELS), dtype=np.float32)
    for start in range(0, rows, block):
        stop = min(start + block, rows)
        labels = torch.randint(COMPONENTS, (stop - start,), generator=generator)
        latent = centres[labels] + torch.randn(stop - start, LATENT, generator=generator)
        noise = 0.05 * torch.randn(stop - start, CHANNELS, generator=generator)
        out[start:stop] = (latent @ basis + noise).numpy()
    return out


def bank_file(cache: Path, rows: int) -> Path:
    path = cache / f"bank_{rows}.npy"
    if not path.exists():
        np.save(path, synthetic_rows(rows, seed=rows))
    return path


def query_file(cache: Path) -> Path:
    path = cache / "queries.npy"
    if not path.exists():
        np.save(path, synthetic_rows(QUERIES, seed=1))
    return path


# --------------------------------------------------------------------------------------------------------- workers
def _rss_kib(field: str) -> int:
    with Path("/proc/self/status").open() as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    msg = f"{field} not in /proc/self/status"
    raise RuntimeError(msg)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def worker_coreset(job: dict) -> dict:
    from anomalib_hypergraph.hypergraph import greedy_coreset, greedy_k_center
    from anomalib_hypergraph.hypergraph.coreset import coverage_radius

    features = torch.from_numpy(np.load(job["bank"]))
    picks = job["picks"]
    started = time.perf_counter()
    if job["method"] == "ours" and job.get("projection") == "none":
        indices = greedy_k_center(features, picks, seed=0, projection_dim=None)
        seconds = time.perf_counter() - started
    elif job["method"] == "ours":
        if picks == int(features.shape[0] * job["ratio"]) and not job["radius"]:
            greedy_coreset(features, job["ratio"], seed=0)  # the very call the memory bank makes
            indices = None
        else:
            indices = greedy_k_center(features, picks, seed=0)
        seconds = time.perf_counter() - started
    else:
        from anomalib.models.components.sampling import KCenterGreedy

        torch.manual_seed(0)
        np.random.seed(0)
        sampler = KCenterGreedy(embedding=features, sampling_ratio=picks / features.shape[0])
        sampler.coreset_size = picks
        indices = torch.as_tensor(sampler.select_coreset_idxs())
        seconds = time.perf_counter() - started
    radius = coverage_radius(features, indices) if job["radius"] else None
    return {"seconds": seconds, "radius": radius}


def _module_from_file(name: str, path: str) -> object:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker_knn(job: dict) -> dict:
    from anomalib_hypergraph.hypergraph import BankIndex, HypergraphMemoryBank, chunked_knn, squared_row_norms

    bank = torch.from_numpy(np.load(job["bank"]))
    query = torch.from_numpy(np.load(job["queries"]))
    method, k = job["method"], job["k"]
    memory = None
    if method == "ours_cached":
        memory = HypergraphMemoryBank(domains=("source",))
        memory.set("source", bank)  # contiguous already: stores the tensor itself plus its (rows,) norms

        def search() -> torch.Tensor:
            return memory.nearest(query, "source", k=k)[1]
    elif method == "before":  # the baseline revision's chunked_knn (a module file), with cached norms as ours
        before = _module_from_file("knn_before", job["module"])
        norms = squared_row_norms(bank)

        def search() -> torch.Tensor:
            return before.chunked_knn(query, bank, k, reference_squared_norm=norms)[1]
    elif method == "ours_uncached":

        def search() -> torch.Tensor:
            return chunked_knn(query, bank, k)[1]
    elif method == "anomalib":
        from types import SimpleNamespace

        from anomalib.models.image.patchcore.torch_model import PatchcoreModel

        patchcore = SimpleNamespace(memory_bank=bank, euclidean_dist=PatchcoreModel.euclidean_dist)

        def search() -> torch.Tensor:
            locations = PatchcoreModel.nearest_neighbors(patchcore, query, n_neighbors=k)[1]
            return locations.reshape(query.shape[0], -1)
    else:
        index = BankIndex(method, seed=0)
        build_started = time.perf_counter()
        index.build(bank)
        job["build_seconds"] = time.perf_counter() - build_started

        def search() -> torch.Tensor:
            return index.search(query, bank, k)[1]

    with torch.no_grad():
        baseline = _rss_kib("VmRSS")
        _reset_peak()
        started = time.perf_counter()
        indices = search()
        seconds = time.perf_counter() - started
        for _ in range(job.get("repeat", 1)):  # more searches in the same process: the allocator now has a history
            started = time.perf_counter()
            search()
            seconds = min(seconds, time.perf_counter() - started)
        peak = _rss_kib("VmHWM") - baseline
    result = {"seconds": seconds, "peak_mib": peak / 1024, "build_seconds": job.get("build_seconds", 0.0)}
    if job.get("save_indices"):
        np.save(job["save_indices"], indices[:, 0].numpy())
    if job.get("truth") and Path(job["truth"]).exists():
        truth = torch.from_numpy(np.load(job["truth"]))
        result["recall"] = float((indices[:, 0] == truth).float().mean())
    return result


def worker_knn_paired(job: dict) -> dict:
    """Time ours and the baseline revision alternately in one process: both see the same load, round after round."""
    from anomalib_hypergraph.hypergraph import HypergraphMemoryBank

    bank = torch.from_numpy(np.load(job["bank"]))
    query = torch.from_numpy(np.load(job["queries"]))
    memory = HypergraphMemoryBank(domains=("source",))
    memory.set("source", bank)
    norms = memory.squared_norm("source")
    before = _module_from_file("knn_before", job["module"])
    searches = {
        "ours_cached": lambda: memory.nearest(query, "source", k=job["k"]),
        "before": lambda: before.chunked_knn(query, bank, job["k"], reference_squared_norm=norms),
    }
    seconds: dict[str, list[float]] = {name: [] for name in searches}
    with torch.no_grad():
        for round_index in range(job["rounds"]):
            order = list(searches) if round_index % 2 == 0 else list(reversed(searches))
            for name in order:
                started = time.perf_counter()
                searches[name]()
                seconds[name].append(time.perf_counter() - started)
    return seconds


def worker_bottle(job: dict) -> dict:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import hypertrans_ablation as ablation

    from anomalib_hypergraph.data import select_shots
    from anomalib_hypergraph.data.domains import SOURCE, TARGET
    from anomalib_hypergraph.models.hypertrans.torch_model import HyperTransModel

    args = argparse.Namespace(coreset_ratio=job["coreset_ratio"], epochs_perturbation=0)
    split = ablation.bottle_split(job["source_images"])
    prepared = ablation.prepare(split, use_dp=False, args=args)
    shots = select_shots(split.target_pool_paths, job["shots"], strategy="random", seed=0)
    results = {}
    for backend in job["backends"]:
        model = HyperTransModel(
            backbone=ablation.BACKBONE,
            layers=ablation.LAYERS,
            pretrained=True,
            use_domain_perturbation=False,
            search_backend=backend,
            seed=0,
        ).eval()
        model.memory_bank.set(SOURCE, prepared.source_bank)
        model.memory_bank.set(TARGET, ablation.shot_rows(prepared, model, split, shots))
        model.fit_banks(iterations=job["iterations"], lr=1e-3)
        model.eval()
        features = prepared.test_features
        outputs = []
        started = time.perf_counter()
        with torch.no_grad():
            for start in range(0, features.shape[0], 8):
                outputs.append(model.score_features(features[start : start + 8], (ablation.IMAGE_SIZE,) * 2))
        seconds = (time.perf_counter() - started) / features.shape[0]
        scores = torch.cat([o.pred_score for o in outputs])
        maps = torch.cat([o.anomaly_map for o in outputs])
        metric = ablation.metrics(split, scores, maps)
        results[backend] = {
            "image_auroc": metric["image_AUROC"],
            "pixel_auroc": metric["pixel_AUROC"],
            "seconds": seconds,
            "source_rows": int(prepared.source_bank.shape[0]),
            "target_rows": int(model.memory_bank.get(TARGET).shape[0]),
        }
    return results


WORKERS = {"coreset": worker_coreset, "knn": worker_knn, "knn_paired": worker_knn_paired, "bottle": worker_bottle}


def run_worker(job: dict) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(REPO))
    completed = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(job)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if completed.returncode != 0:
        print(completed.stderr[-3000:], file=sys.stderr)
        msg = f"worker failed: {job}"
        raise RuntimeError(msg)
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------------ main
def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _rows_label(rows: int) -> str:
    return f"{rows // 1_000_000}M" if rows >= 1_000_000 and rows % 1_000_000 == 0 else f"{rows // 1000}k"


def coreset_table(
    cache: Path, sizes: list[int], ratio: float, anomalib_picks: int, radius_picks: int
) -> dict[int, float]:
    print(f"\n### Greedy k-center coreset, {ratio:.0%} of the rows, 768-d\n")
    print(
        "| rows | method | picks | time (s) | speed-up vs anomalib | coverage radius at "
        f"{radius_picks} picks | radius vs anomalib |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    ours_seconds = {}
    for rows in sizes:
        bank = str(bank_file(cache, rows))
        picks = int(rows * ratio)
        compare_picks = min(radius_picks, picks)
        theirs_picks = min(anomalib_picks, picks)
        base = {"kind": "coreset", "bank": bank, "ratio": ratio}
        theirs = run_worker(
            {**base, "method": "anomalib", "picks": theirs_picks, "radius": theirs_picks == compare_picks}
        )
        theirs_time = theirs["seconds"] * picks / theirs_picks
        if theirs["radius"] is None:
            theirs["radius"] = run_worker({**base, "method": "anomalib", "picks": compare_picks, "radius": True})[
                "radius"
            ]
        label = (
            f"{theirs_time:.1f}"
            if theirs_picks == picks
            else (f"{theirs_time:.1f} (extrap. from {theirs_picks} picks in {theirs['seconds']:.1f} s)")
        )
        print(
            f"| {_rows_label(rows)} | anomalib KCenterGreedy | {picks} | {label} | 1x | "
            f"{theirs['radius']:.3f} | 1.000 |"
        )
        for method, projection, name in (
            ("ours", None, "ours, greedy_coreset (projection 256)"),
            ("ours", "none", "ours, no projection"),
        ):
            extra = {"projection": projection} if projection else {}
            ours = run_worker({**base, "method": method, "picks": picks, "radius": False, **extra})
            small = run_worker({**base, "method": method, "picks": compare_picks, "radius": True, **extra})
            if projection is None:
                ours_seconds[rows] = ours["seconds"]
            print(
                f"| {_rows_label(rows)} | {name} | {picks} | {ours['seconds']:.1f} | "
                f"{theirs_time / ours['seconds']:.0f}x | {small['radius']:.3f} | "
                f"{small['radius'] / theirs['radius']:.3f} |"
            )
        sys.stdout.flush()
    return ours_seconds


def baseline_module(cache: Path, revision: str) -> Path | None:
    """Write ``knn.py`` of ``revision`` (``git show``) to the cache directory; None without git or that revision."""
    shown = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{revision}:anomalib_hypergraph/hypergraph/knn.py"],
        capture_output=True,
        text=True,
        check=False,
    )
    if shown.returncode != 0:
        print(f"(no kNN baseline row: git show {revision} failed: {shown.stderr.strip()})")
        return None
    path = cache / f"knn_{revision}.py"
    path.write_text(shown.stdout)
    return path


def _spread(values: list[float], digits: int) -> str:
    ordered = sorted(values)
    median = float(np.median(ordered))
    return f"{ordered[0]:.{digits}f} / {median:.{digits}f} / {ordered[-1]:.{digits}f}"


def knn_table(cache: Path, rows: int, methods: list[str], runs: int, baseline: str) -> None:
    module = baseline_module(cache, baseline) if "before" in methods else None
    methods = [method for method in methods if method != "before" or module is not None]
    load_start = os.getloadavg()[0]
    results: dict[str, list[dict]] = {method: [] for method in methods}
    for run in range(runs):  # interleaved and rotated, so that changes of the machine's load hit every method alike
        for method in methods[run % len(methods) :] + methods[: run % len(methods)]:
            job = {
                "kind": "knn",
                "bank": str(bank_file(cache, rows)),
                "queries": str(query_file(cache)),
                "method": method,
                "k": 1,
                "repeat": 2,
            }
            if method == "before":
                job["module"] = str(module)
            results[method].append(run_worker(job))
    load_end = os.getloadavg()[0]
    print(
        f"\n### kNN: {QUERIES} queries (one image) against {_rows_label(rows)} x 768, k = 1, {runs} fresh processes "
        f"per method (load average {load_start:.1f} before, {load_end:.1f} after)\n"
    )
    print(
        "| method | peak extra memory (MiB), min / median / max | max vs anomalib's median | "
        "time per search (s), min / median / max |"
    )
    print("|---|---:|---:|---:|")
    reference = float(np.median([r["peak_mib"] for r in results["anomalib"]])) if "anomalib" in results else None
    names = {
        "ours_cached": "ours, memory bank with cached norms",
        "ours_uncached": "ours, chunked_knn computing the norms (block by block)",
        "before": f"before the block buffers ({baseline}), cached norms",
        "anomalib": "anomalib PatchcoreModel.nearest_neighbors",
        "faiss_flat": "faiss IndexFlatL2 (BankIndex)",
    }
    for method, measured in results.items():
        peaks = [r["peak_mib"] for r in measured]
        ratio = "-" if not reference else f"{max(peaks) / reference:.2f}"
        print(
            f"| {names.get(method, method)} | {_spread(peaks, 0)} | {ratio} | "
            f"{_spread([r['seconds'] for r in measured], 2)} |"
        )
    if module is not None:  # times of separate processes carry the load of their moment: pair them in one process
        paired = run_worker(
            {
                "kind": "knn_paired",
                "bank": str(bank_file(cache, rows)),
                "queries": str(query_file(cache)),
                "module": str(module),
                "k": 1,
                "rounds": PAIRED_ROUNDS,
            }
        )
        ours, theirs = (float(np.median(paired[name])) for name in ("ours_cached", "before"))
        print(
            f"\nPaired timing, one process, {PAIRED_ROUNDS} rounds alternating ours (memory bank) and {baseline}: "
            f"median {ours:.2f} s against {theirs:.2f} s (ours / before = {ours / theirs:.3f}); "
            f"fastest {min(paired['ours_cached']):.2f} s against {min(paired['before']):.2f} s."
        )
        results["paired"] = paired
    raw = cache / "knn_runs.json"
    raw.write_text(json.dumps(results, indent=1))
    print(f"\n(every process's peak and time, in run order: {raw})")
    sys.stdout.flush()


def growth_table(
    cache: Path, sizes: list[int], backends_by_size: dict[int, list[str]], ratio: float, coreset_seconds: dict
) -> None:
    print(f"\n### Cost growth: time per image ({QUERIES} queries, k = {SEARCH_K}) and build time\n")
    print("| rows | backend | index build (s) | time per image (s) | recall@1 | 10 % coreset, ours (s) |")
    print("|---:|---|---:|---:|---:|---:|")
    for rows in sizes:
        bank = str(bank_file(cache, rows))
        truth = str(cache / f"truth_{rows}.npy")
        seconds = coreset_seconds.get(rows)
        if seconds is None and rows <= 200_000:
            seconds = run_worker(
                {
                    "kind": "coreset",
                    "bank": bank,
                    "method": "ours",
                    "picks": int(rows * ratio),
                    "ratio": ratio,
                    "radius": False,
                }
            )["seconds"]
        for position, backend in enumerate(backends_by_size[rows]):
            job = {
                "kind": "knn",
                "bank": bank,
                "queries": str(query_file(cache)),
                "method": "ours_cached" if backend == "exact" else backend,
                "k": SEARCH_K,
                "truth": truth,
                "repeat": int(rows < 1_000_000),
            }
            if backend == "exact":
                job["save_indices"] = truth
            result = run_worker(job)
            recall = 1.0 if backend in {"exact", "faiss_flat"} and "recall" not in result else result.get("recall")
            print(
                f"| {_rows_label(rows)} | {backend} | {_fmt(result['build_seconds'])} | {result['seconds']:.3f} | "
                f"{_fmt(recall, 3)} | {_fmt(seconds, 1) if position == 0 else ''} |"
            )
            sys.stdout.flush()


def bottle_table(args: argparse.Namespace) -> None:
    job = {
        "kind": "bottle",
        "source_images": args.bottle_source_images,
        "coreset_ratio": args.bottle_coreset_ratio,
        "shots": 1,
        "iterations": args.bottle_iterations,
        "backends": ["exact", "faiss_flat", "faiss_ivf", "faiss_hnsw"],
    }
    results = run_worker(job)
    exact = results["exact"]
    print(
        f"\n### Bottle cross-domain (hypertrans_ablation.py data), small setting: {args.bottle_source_images} source "
        f"images, coreset {args.bottle_coreset_ratio:.0%} ({exact['source_rows']} source rows), 1 shot x 8 views "
        f"({exact['target_rows']} target rows), seed 0, no DP (stage 1 skipped), {args.bottle_iterations} HDR "
        "iterations, Lite0 256 px, 83 test images\n"
    )
    print("| backend | image AUROC | pixel AUROC | change vs exact (image / pixel) | time per image (s) |")
    print("|---|---:|---:|---:|---:|")
    for backend, result in results.items():
        change = (
            f"{result['image_auroc'] - exact['image_auroc']:+.4f} / {result['pixel_auroc'] - exact['pixel_auroc']:+.4f}"
        )
        print(
            f"| {backend} | {result['image_auroc']:.4f} | {result['pixel_auroc']:.4f} | {change} | "
            f"{result['seconds']:.3f} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (10k/50k), no 1M row, no bottle")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/bank_scale_cache"))
    parser.add_argument("--ratio", type=float, default=0.1, help="coreset ratio")
    parser.add_argument("--anomalib-picks", type=int, default=1000, help="picks anomalib runs before extrapolating")
    parser.add_argument("--radius-picks", type=int, default=1000, help="picks at which both radii are compared")
    parser.add_argument("--million", action=argparse.BooleanOptionalAction, default=True, help="1M-row growth row")
    parser.add_argument("--bottle", action=argparse.BooleanOptionalAction, default=None)
    tables = ["coreset", "knn", "growth", "bottle"]
    parser.add_argument("--tables", nargs="+", choices=tables, default=tables, help="which tables to run (default all)")
    parser.add_argument("--knn-runs", type=int, default=10, help="fresh processes per method in the kNN table")
    parser.add_argument(
        "--knn-baseline", default=KNN_BASELINE, help="git revision whose chunked_knn is the kNN table's 'before' row"
    )
    parser.add_argument("--bottle-source-images", type=int, default=30)
    parser.add_argument("--bottle-coreset-ratio", type=float, default=0.1)
    parser.add_argument("--bottle-iterations", type=int, default=20)
    args = parser.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(WORKERS[job.pop("kind")](job)))
        return

    args.cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.quick:
        coreset_sizes, knn_rows, growth_sizes = [10_000, 50_000], 50_000, [10_000, 50_000]
        args.anomalib_picks, args.radius_picks = min(args.anomalib_picks, 300), min(args.radius_picks, 300)
    else:
        coreset_sizes, knn_rows, growth_sizes = [50_000, 200_000], 200_000, [10_000, 50_000, 200_000]
        if args.million:
            growth_sizes.append(1_000_000)
    all_backends = ["exact", "faiss_flat", "faiss_ivf", "faiss_hnsw"]
    backends_by_size = {rows: list(all_backends) for rows in growth_sizes}
    if 1_000_000 in backends_by_size:
        backends_by_size[1_000_000] = ["exact", "faiss_ivf"]  # HNSW build at 1M x 768 takes too long on 2 cores

    load = os.getloadavg()
    print("## Banks at scale (benchmarks/bank_scale.py)\n")
    libc, libc_version = platform.libc_ver()
    print(
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {libc} {libc_version}, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), load average {load[0]:.1f} at start (a shared "
        "machine: other jobs ran beside this one). Synthetic 768-d rows (32-d latent Gaussian mixture), seeded; each "
        "number from a fresh subprocess with OMP_WAIT_POLICY=PASSIVE."
    )
    coreset_seconds = {}
    if "coreset" in args.tables:
        coreset_seconds = coreset_table(
            args.cache_dir, coreset_sizes, args.ratio, args.anomalib_picks, args.radius_picks
        )
    if "knn" in args.tables:
        knn_table(
            args.cache_dir,
            knn_rows,
            ["ours_cached", "ours_uncached", "before", "anomalib", "faiss_flat"],
            args.knn_runs,
            args.knn_baseline,
        )
    if "growth" in args.tables:
        growth_table(args.cache_dir, growth_sizes, backends_by_size, args.ratio, coreset_seconds)
    if "bottle" in args.tables and (args.bottle if args.bottle is not None else not args.quick):
        bottle_table(args)
    print(f"\nTotal {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
