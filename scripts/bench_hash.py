"""Integrity-hash throughput of a file through the snapshot store's reader: SHA-256 (older
snapshots) against XXH3-128 (new ones). python scripts/bench_hash.py FILE"""
import sys
import time

from superlinear.sessions import tensorfile

path = sys.argv[1]
tensorfile.file_digest(path, "sha256")  # page cache warm
for algorithm in ("sha256", "xxh3_128"):
    t = time.perf_counter()
    e = tensorfile.file_digest(path, algorithm)
    s = time.perf_counter() - t
    print(f"{algorithm}: {e['bytes'] / s / 1e9:.2f} GB/s ({s:.2f} s for {e['bytes'] / 2**30:.1f} GiB)")
