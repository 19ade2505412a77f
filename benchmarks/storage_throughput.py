"""The vaejob loader reading shards from an S3-protocol endpoint vs the same shards on local disk.

    python benchmarks/storage_throughput.py                   # 20k synthetic 64x64 npy, 2 workers
    python benchmarks/storage_throughput.py --num 2000 --repeats 1   # quick (CI): a smoke test

Starts moto's S3 server on 127.0.0.1 (the one the tests use; a real HTTP endpoint reached through s3fs, as
MinIO or Ceph would be), writes one synthetic shard set locally and the same set straight to s3:// with
``vaejob.shard``, then times interleaved epochs (same workers, batch, shuffle buffer, float32 output) of:

  local          the loader on the local directory
  s3             the loader on s3:// (vaejob.storage.RangeReader: 4 MiB ranges fetched 2 ahead by a thread)
  s3-fsspec      the loader on s3:// through a plain fsspec file object (s3fs's own read-ahead cache, no
                 background prefetch): what reading was before the RangeReader

and prints s3 / local as a ratio. A local endpoint has no network latency; it measures the client path
(HTTP, signing, s3fs, the copies) that a remote store adds to, not a remote store's bandwidth.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import fsspec

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from data_throughput import VaejobEpochs, interleaved, print_header, print_rates  # noqa: E402  (the sibling benchmark)

from tests.s3server import S3Server  # noqa: E402  (the tests' S3 server)
from vaejob import shard, storage  # noqa: E402
from vaejob.shards import open_shards  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=20000, help="images (default 20000; 2000 = quick)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--shuffle-buffer", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    args = p.parse_args(argv)
    print_header(argv, f"images {args.size}x{args.size} npy", args)
    server = S3Server(auth=False, bucket="vaejob-bench").start()
    os.environ.update(server.env())
    root = Path(tempfile.mkdtemp(prefix="vaejob-storage-"))
    try:
        common = ["--source", f"synthetic:{args.num}", "--size", str(args.size), "--train-only"]
        common += ["--shard-size", str(max(1, args.num // 16)), "--workers", str(args.workers)]
        t0 = time.perf_counter()
        url = "s3://vaejob-bench/set"
        for out in (str(root / "set"), url):
            if shard.main([*common, "--out", out]) != 0:
                raise SystemExit(f"vaejob.shard failed for {out}")
        print(f"data ready in {time.perf_counter() - t0:.1f} s (local {root / 'set'}, {url})")
        b, w, buf = args.batch_size, args.workers, args.shuffle_buffer
        methods = {
            "local": VaejobEpochs(open_shards(str(root / "set")), b, w, buf),
            "s3": VaejobEpochs(open_shards(url), b, w, buf),
        }
        reader = storage.open_read
        storage.open_read = lambda path: (
            fsspec.open(path, "rb").open() if storage.is_url(path) else reader(path)
        )
        try:
            methods["s3-fsspec"] = VaejobEpochs(open_shards(url), b, w, buf)
            methods["s3-fsspec"](0)  # its workers fork now, with the plain reader
        finally:
            storage.open_read = reader
        rates, per_cpu = interleaved(methods, args.repeats)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    print_rates(rates, per_cpu)
    med = statistics.median
    for name in ("s3", "s3-fsspec"):
        print(
            f"{name} / local: {med(rates[name]) / med(rates['local']):.2f}x img/s (median), "
            f"{med(per_cpu[name]) / med(per_cpu['local']):.2f}x img per CPU-s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
