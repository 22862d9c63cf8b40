"""A directory tree copied to and from a bucket one file at a time against ``COPY_THREADS``
side by side (``pipeline.core.storage.Loc.upload`` / ``download``): what a universal
checkpoint's node copy, a rank's checkpoint part and a model export go through.

The bucket is an S3-compatible server on this machine (moto's, as the tests use), so the
ratio is a floor: a real bucket's per-stream latency is higher than a local socket's, and
side-by-side streams gain more there.

Usage: python bench/storage_copy.py [--files 32] [--mb 8]
"""

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=32)
    parser.add_argument("--mb", type=int, default=8)
    args = parser.parse_args()

    from moto.server import ThreadedMotoServer
    from pyarrow import fs

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ENDPOINT_URL_S3": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    filesystem, bucket = fs.FileSystem.from_uri("s3://bench?allow_bucket_creation=true")
    filesystem.create_dir(bucket)

    from pipeline.core import storage
    from pipeline.core.storage import Loc

    work = Path(tempfile.mkdtemp())
    src = work / "tree"
    for i in range(args.files):
        (src / f"part-{i // 8}").mkdir(parents=True, exist_ok=True)
        (src / f"part-{i // 8}" / f"file-{i:03d}.bin").write_bytes(os.urandom(args.mb << 20))
    total = args.files * args.mb / 1024
    rows = []
    for threads in (1, storage.COPY_THREADS):
        storage.COPY_THREADS = threads
        remote = Loc(f"s3://bench/tree-{threads}")
        t0 = time.perf_counter()
        remote.upload(src)
        up = time.perf_counter() - t0
        t0 = time.perf_counter()
        remote.download(work / f"back-{threads}")
        down = time.perf_counter() - t0
        same = all((work / f"back-{threads}" / f.relative_to(src)).read_bytes() == f.read_bytes()
                   for f in src.rglob("*.bin"))
        rows.append((threads, up, down, same))
    print(f"{args.files} files x {args.mb} MB = {total:.2f} GB, moto S3 server on this machine ({os.cpu_count()} cores)")
    print("threads  upload s  GB/s   download s  GB/s   identical")
    for threads, up, down, same in rows:
        print(f"{threads:7d}  {up:8.2f}  {total / up:5.2f}  {down:10.2f}  {total / down:5.2f}   {same}")
    (_, up1, down1, _), (threads, upn, downn, _) = rows
    print(f"ratio {threads} threads / 1: upload {up1 / upn:.2f}x faster, download {down1 / downn:.2f}x faster")
    shutil.rmtree(work)
    server.stop()


if __name__ == "__main__":
    main()
