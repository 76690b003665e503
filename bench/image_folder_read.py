"""Time to read an image folder: the first read (listing + Pillow decoding + writing the cache) and a read from
the cache, each in a fresh process as a user's run would, with a temporary cache directory.

    python bench/image_folder_read.py CIFAR10_IMAGE_FOLDER          # e.g. the 60,000 CIFAR-10 JPEGs

Prints the seconds of each read (the reader's own clock, from listing to the arrays) and the process wall time.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ONE_READ = """
import json, sys, time
from jem_tf.data import read_image_folder
arrays, info = read_image_folder(sys.argv[1], log=None, progress=False)
print(json.dumps({"seconds": info.seconds, "from_cache": info.from_cache, "counts": info.counts,
                  "image_shape": info.image_shape}))
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--repeats", type=int, default=3, help="reads from the cache (the median is printed)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "XDG_CACHE_HOME": cache, "TF_CPP_MIN_LOG_LEVEL": "3"}
        records = []
        for i in range(1 + args.repeats):
            start = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", ONE_READ, args.folder], env=env, capture_output=True,
                                 text=True, check=True).stdout
            record = json.loads(out.strip().splitlines()[-1])
            record["process_seconds"] = time.perf_counter() - start
            records.append(record)
            kind = "from the cache" if record["from_cache"] else "first read (decode + cache)"
            print(f"{kind:<28} {record['seconds']:6.1f} s   (process {record['process_seconds']:5.1f} s)  "
                  f"{record['counts']} images of {record['image_shape']}")
    cached = sorted(r["seconds"] for r in records[1:])
    if cached:
        print(f"median from the cache: {cached[len(cached) // 2]:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
