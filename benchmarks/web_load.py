"""Decode latency of the web explorer under load: a real `vaedraw serve` process on 127.0.0.1 and a fixed
number of POST /api/decode requests from a bounded pool of concurrent clients (threads, one httpx client
each, keep-alive). Prints the median and 99th percentile and writes them into docs/WEB.md.

    python benchmarks/web_load.py RUN_DIR [--requests 2000] [--clients 20] [--data-dir D] [--no-write]

Latency is measured per request from send to the parsed response, so it includes queueing in the server
(the model is called under one lock) and the PNG encoding.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, free_port, machine, vaedraw_command, write_block  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

DOC = REPO / "docs" / "WEB.md"


def start_server(run_dir: str, port: int, data_dir: str | None) -> subprocess.Popen:
    cmd, env = vaedraw_command("serve", run_dir, "--port", str(port), "--device", "cpu",
                               *(["--data-dir", data_dir] if data_dir else []))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("server did not come up within 120 s")


def run_load(base: str, info: dict, n_requests: int, n_clients: int, seed: int = 0) -> tuple[list[float], float]:
    """-> (per-request latencies in seconds, wall time of the whole load)."""
    rng = np.random.default_rng(seed)
    d = info["latent_dim"]
    bodies = [{"z": rng.standard_normal(d).round(4).tolist(),
               "digit": int(rng.integers(info["n_classes"])) if info["conditional"] else None} for _ in range(n_requests)]
    local = threading.local()
    latencies = [0.0] * n_requests

    def one(i: int) -> None:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=base, timeout=60)
        t0 = time.perf_counter()
        r = local.client.post("/api/decode", json=bodies[i])
        r.json()
        latencies[i] = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"request {i}: {r.status_code} {r.text}")

    with ThreadPoolExecutor(n_clients) as pool:  # warm-up: connections, first calls
        list(pool.map(one, range(min(n_clients * 2, n_requests))))
        t0 = time.perf_counter()
        list(pool.map(one, range(n_requests)))
        wall = time.perf_counter() - t0
    return latencies, wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--data-dir", default=os.environ.get("VAEDRAW_DATA_DIR"))
    ap.add_argument("--note", default="", help="how the machine was shared during the run, for the record")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/WEB.md alone")
    args = ap.parse_args()

    port = free_port()
    proc = start_server(args.run_dir, port, args.data_dir)
    base = f"http://127.0.0.1:{port}"
    try:
        info = httpx.get(f"{base}/api/info").json()
        load_before = os.getloadavg()[0]
        lat, wall = run_load(base, info, args.requests, args.clients)
        load_after = os.getloadavg()[0]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    ms = np.array(lat) * 1000
    p50, p99 = float(np.percentile(ms, 50)), float(np.percentile(ms, 99))
    lines = [
        f"- {args.requests} POST /api/decode requests, {args.clients} concurrent clients, run "
        f"`{info['preset']}` ({info['latent_dim']}-d latent, step {info['step']}), CPU decoding",
        f"- median **{p50:.1f} ms**, 99th percentile **{p99:.1f} ms**, mean {statistics.fmean(ms):.1f} ms, "
        f"max {ms.max():.1f} ms; {args.requests / wall:.0f} requests/s",
        f"- machine: {machine(torch.device('cpu'))}, {os.cpu_count()} cores, {platform.python_implementation()} "
        f"{platform.python_version()}; 1-minute load average {load_before:.1f} before, {load_after:.1f} after"
        + (f"; {args.note}" if args.note else ""),
        f"- command: `python benchmarks/web_load.py {args.run_dir} --requests {args.requests} "
        f"--clients {args.clients}`",
    ]
    print("\n".join(lines))
    if not args.no_write and DOC.exists():
        write_block(DOC, "web_load", "\n".join(lines), begin="begin")
        print(f"written into {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
