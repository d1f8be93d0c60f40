"""Bytes the Ray driver receives, driver-side vs replica-side writing, at 10x the rows.

One two-raylet local Ray cluster (`ray.cluster_utils.Cluster`, one CPU per raylet, so the two
replica actors run on different nodes) and one moto S3 server, both started here. The input
is a Parquet file in S3 (row groups of `--batch-size` rows, so the read tasks are distributed
too); each job runs `vbatch run --runner ray --replicas 2` with a tiny random LLaMA (the tests'
`save_tiny_model`), `--max-tokens` output tokens per row (EOS ignored), greedy, float32:

- driver-side writing: `--output` a local directory; every output row reaches the driver;
- replica-side writing: `--output s3://...`; replicas write their parts to the bucket and the
  driver receives only part entries (jobs/ray_parts.py);
- `driver-s3`: `--output s3://...` with `--preserve-order`, which keeps driver-side writing:
  the same uploads to the same store as replica-side writing, done by the driver (on a small
  machine the in-process moto server's CPU cost lands on the same cores either way, so this is
  the fair baseline for rows/s/replica).

For `--rows` (default 10,000 and 100,000) each mode reports the bytes the driver received
from the pool, counted by the pool as blocks arrive (the sum of their `nbytes`, the summary's
"transfer"), the blocks, and input rows written per second per replica: each replica's rows
over the seconds from the start of its first block to the end of its last (generation, and
writing its parts when it writes them; the summary's per-replica `active_s`; `busy_s` is its
engine's time, `write_s` its part uploads), averaged over the two. Ratios: bytes
at the largest vs the smallest size per mode, replica-side vs driver-side bytes and
rows/s/replica. Replica-side, the driver still receives one part entry (~200 bytes) per part,
so its bytes follow the number of parts (rows / `--batch-size`), not the rows' bytes.

Run from the repository root after `pip install -e .`:

    python benchmarks/ray_driver_bytes.py                # ~10 min on 2 cores
    python benchmarks/ray_driver_bytes.py --rows 2000 20000 --max-tokens 1

Prints a readable table and, as the last stdout line, one JSON object.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
WORDS = ["The quick brown fox", "Paris is the capital of", "def add(a, b):", "Once upon a time",
         "Batch inference turns", "Berlin is"]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() \
            else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def tiny_model(workdir: Path) -> str:
    """A tiny random LLaMA (GQA) with its tokenizer, as in the tests."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from conftest import save_tiny_model  # noqa: PLC0415 (the tests' helper)
    return str(save_tiny_model(workdir / "tiny-llama", "llama-gqa-tied"))


def start_s3() -> tuple[object, dict[str, str]]:
    """moto's S3 server on a free loopback port; the AWS_* variables that reach it."""
    from moto.server import ThreadedMotoServer  # noqa: PLC0415 (benchmark-only dependency)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)       # before the cluster starts: its workers inherit them
    return server, env


def upload_prompts(client, bucket: str, key: str, num_rows: int, row_group_rows: int) -> None:
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415
    table = pa.table({"prompt": [f"{WORDS[i % len(WORDS)]} {i}" for i in range(num_rows)]})
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=row_group_rows)
    client.put_object(Bucket=bucket, Key=key, Body=sink.getvalue())


def run_job(source: str, output: str, model: str, args, env: dict[str, str],
            *extra: str) -> dict:
    exe = shutil.which("vbatch")
    command = ([exe] if exe else [sys.executable, "-m", "vbatch"]) + [
        "run", source, "--model", model, "--output", output, "--runner", "ray",
        "--replicas", "2", "--max-tokens", str(args.max_tokens), "--ignore-eos",
        "--temperature", "0", "--dtype", "float32", "--batch-size", str(args.batch_size),
        "--rows-per-file", str(args.batch_size), "--quiet", *extra]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    wall_s = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"job {output} failed:\n{result.stderr[-3000:]}")
    return {"wall_s": round(wall_s, 2)}


def read_summary(output: str, client, bucket: str) -> dict:
    if output.startswith("s3://"):
        key = output.split("/", 3)[3] + "_run_summary.json"
        return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    return json.loads((Path(output) / "_run_summary.json").read_text())


def measure(mode: str, num_rows: int, source: str, model: str, workdir: Path, args,
            env: dict[str, str], client, bucket: str) -> dict:
    output = (f"s3://{bucket}/out-{mode}-{num_rows}/" if mode in ("replicas", "driver-s3")
              else str(workdir / f"out-{num_rows}"))
    extra = ("--preserve-order",) if mode == "driver-s3" else ()
    timing = run_job(source, output, model, args, env, *extra)
    summary = read_summary(output, client, bucket)
    transfer = summary["transfer"]
    assert transfer["parts_written_by"] == mode.removesuffix("-s3"), transfer
    rows = summary["counts"]["rows"]
    assert rows == num_rows, (rows, num_rows)
    replicas = summary["replicas"]
    # per replica: its rows over the seconds from its first block's start to its last block's
    # end (writing its parts included when it writes them), averaged over the replicas
    rates = [replica["num_rows"] / replica["active_s"] for replica in replicas
             if replica["active_s"]]
    return {"mode": mode, "rows": rows, "driver_bytes": transfer["driver_received_bytes"],
            "driver_blocks": transfer["driver_received_blocks"],
            "part_files": summary["counts"]["part_files"],
            "busy_s": [replica["busy_s"] for replica in replicas],
            "write_s": [replica["write_s"] for replica in replicas],
            "rows_per_s_per_replica": round(sum(rates) / len(rates), 1), **timing,
            "nodes": len({replica["node_id"] for replica in replicas})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--max-tokens", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1000)
    args = parser.parse_args()
    import boto3  # noqa: PLC0415 (benchmark-only dependency)
    import ray  # noqa: PLC0415
    from ray.cluster_utils import Cluster  # noqa: PLC0415

    server, _ = start_s3()
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    bucket = "vbatch-driver-bytes"
    client.create_bucket(Bucket=bucket)
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    results = []
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False, logging_level="warning")
        cluster.wait_for_nodes()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": cluster.address}
        with tempfile.TemporaryDirectory(prefix="vbatch-driver-bytes-") as tmp:
            workdir = Path(tmp)
            model = tiny_model(workdir)
            for num_rows in args.rows:
                key = f"in-{num_rows}/prompts.parquet"
                upload_prompts(client, bucket, key, num_rows, args.batch_size)
                for mode in ("driver", "driver-s3", "replicas"):
                    results.append(measure(mode, num_rows, f"s3://{bucket}/{key}", model,
                                           workdir, args, env, client, bucket))
                    print(f"  done: {mode} {num_rows} rows", file=sys.stderr)
    finally:
        ray.shutdown()
        cluster.shutdown()
        server.stop()
    report(results, args)


def report(results: list[dict], args) -> None:
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores); two raylets x 1 CPU, 2 replicas; "
          f"{args.max_tokens} tokens/row, batch {args.batch_size}, S3 input (moto)")
    print(f"  {'mode':>9} {'rows':>8} {'driver bytes':>13} {'blocks':>7} {'parts':>6} "
          f"{'bytes/row':>9} {'busy s':>13} {'write s':>11} {'rows/s/replica':>15} "
          f"{'wall s':>7} {'nodes':>5}")
    for row in results:
        print(f"  {row['mode']:>9} {row['rows']:>8} {row['driver_bytes']:>13,} "
              f"{row['driver_blocks']:>7} {row['part_files']:>6} "
              f"{row['driver_bytes'] / row['rows']:>9.2f} "
              f"{'/'.join(f'{v:.1f}' for v in row['busy_s']):>13} "
              f"{'/'.join(f'{v:.2f}' for v in row['write_s']):>11} "
              f"{row['rows_per_s_per_replica']:>15} {row['wall_s']:>7} {row['nodes']:>5}")
    ratios = {}
    for mode in ("driver", "driver-s3", "replicas"):
        runs = sorted((r for r in results if r["mode"] == mode), key=lambda r: r["rows"])
        if len(runs) >= 2:
            ratios[f"{mode}_bytes_growth"] = round(runs[-1]["driver_bytes"]
                                                   / runs[0]["driver_bytes"], 2)
    for num_rows in sorted({r["rows"] for r in results}):
        pair = {r["mode"]: r for r in results if r["rows"] == num_rows}
        if len(pair) == 3:
            ratios[f"replicas_vs_driver_s3_rows_per_s_{num_rows}"] = round(
                pair["replicas"]["rows_per_s_per_replica"]
                / pair["driver-s3"]["rows_per_s_per_replica"], 2)
            ratios[f"replicas_vs_driver_rows_per_s_{num_rows}"] = round(
                pair["replicas"]["rows_per_s_per_replica"]
                / pair["driver"]["rows_per_s_per_replica"], 2)
            ratios[f"replicas_vs_driver_bytes_{num_rows}"] = round(
                pair["replicas"]["driver_bytes"] / pair["driver"]["driver_bytes"], 4)
    rows = sorted({r["rows"] for r in results})
    print(f"  {rows[-1] // rows[0]}x the rows -> driver bytes x"
          f"{ratios.get('driver_bytes_growth')} (driver-side writing), "
          f"x{ratios.get('driver-s3_bytes_growth')} (driver-side, S3), "
          f"x{ratios.get('replicas_bytes_growth')} (replica-side: part entries only)")
    for key, value in ratios.items():
        if key.startswith("replicas_vs_driver"):
            print(f"  {key}: {value}")
    print(json.dumps({"cpu": cpu_name(), "results": results, "ratios": ratios}))


if __name__ == "__main__":
    main()
