"""Scale benchmark of the hypergraph core: kNN hyperedge construction and one HypergraphConv forward.

For each bank size N (default 10k, 50k, 100k; 768-d features, K=10):

(a) ``SoftHypergraph.from_knn`` (exact chunked kNN + soft incidence), and
(b) one ``HypergraphConv(768, 768)`` forward over that hypergraph (inference, ``torch.no_grad``).

Each measurement runs in a fresh subprocess; memory is the growth of the process's peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) across the measured call, after inputs exist, so torch allocations are
included (tracemalloc does not see them). A dense N x N float32 distance matrix would add 4 N^2 bytes (40 GB at 100k).

    python benchmarks/hypergraph_scale.py --sizes 10000 50000 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def features_for(num_vertices: int, channels: int):
    import torch

    return torch.randn(num_vertices, channels, generator=torch.Generator().manual_seed(0))


def measure_build(args: argparse.Namespace) -> dict:
    import torch

    from anomalib_hypergraph.hypergraph import SoftHypergraph

    features = features_for(args.num_vertices, args.channels)
    before = peak_rss_bytes()
    start = time.perf_counter()
    hypergraph = SoftHypergraph.from_knn(features, args.k, chunk_size=args.chunk_size)
    seconds = time.perf_counter() - start
    growth = peak_rss_bytes() - before
    torch.save(
        {
            "vertex_index": hypergraph.vertex_index,
            "edge_index": hypergraph.edge_index,
            "incidence": hypergraph.incidence,
            "edge_weight": hypergraph.edge_weight,
        },
        args.structure,
    )
    return {"seconds": seconds, "peak_growth": growth}


def measure_conv(args: argparse.Namespace) -> dict:
    import torch

    from anomalib_hypergraph.hypergraph import HypergraphConv, SoftHypergraph

    features = features_for(args.num_vertices, args.channels)
    hypergraph = SoftHypergraph(num_vertices=args.num_vertices, **torch.load(args.structure))
    conv = HypergraphConv(args.channels, args.channels).eval()
    before = peak_rss_bytes()
    start = time.perf_counter()
    with torch.no_grad():
        output = conv(features, hypergraph)
    seconds = time.perf_counter() - start
    growth = peak_rss_bytes() - before
    assert output.shape == features.shape
    return {"seconds": seconds, "peak_growth": growth}


def run_child(args: argparse.Namespace, phase: str, num_vertices: int, structure: Path) -> dict:
    command = [
        sys.executable,
        __file__,
        "--phase",
        phase,
        "--num-vertices",
        str(num_vertices),
        "--structure",
        str(structure),
        "--channels",
        str(args.channels),
        "--k",
        str(args.k),
        "--chunk-size",
        str(args.chunk_size),
        "--threads",
        str(args.threads),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000], help="bank sizes N")
    parser.add_argument("--channels", type=int, default=768)
    parser.add_argument("--k", type=int, default=10, help="neighbours per hyperedge")
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--phase", choices=["build", "conv"], help=argparse.SUPPRESS)
    parser.add_argument("--num-vertices", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--structure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase is not None:
        import torch

        torch.set_num_threads(args.threads)
        measure = measure_build if args.phase == "build" else measure_conv
        print(json.dumps(measure(args)))
        return

    print(
        f"C={args.channels}, K={args.k}, chunk={args.chunk_size}, threads={args.threads}; memory = growth of peak RSS "
        "(resource.getrusage ru_maxrss) across the call, fresh subprocess per measurement\n"
    )
    columns = ["N", "build time (s)", "build peak RSS growth (MiB)", "dense N x N (MiB)", "conv time (s)"]
    print("| " + " | ".join([*columns, "conv peak RSS growth (MiB)"]) + " |")
    print("|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for num_vertices in args.sizes:
            structure = Path(tmp) / f"structure_{num_vertices}.pt"
            build = run_child(args, "build", num_vertices, structure)
            conv = run_child(args, "conv", num_vertices, structure)
            dense = 4 * num_vertices**2 / 2**20
            print(
                f"| {num_vertices} | {build['seconds']:.2f} | {build['peak_growth'] / 2**20:.0f} | {dense:.0f} | "
                f"{conv['seconds']:.3f} | {conv['peak_growth'] / 2**20:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
