"""spark-submit entry point: the same job as `adrec job run`, with the same options.

    spark-submit --master local[2] jobs/main.py --data DIR --redis URL

On a cluster, add ``--py-files adrec.zip`` (from `adrec job package`) unless the
executors' image has adrec installed, and set ``--job-work-dir`` to shared storage.
"""

import sys

from adrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["job", "run", *sys.argv[1:]]))
