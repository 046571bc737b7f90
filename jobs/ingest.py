r"""Read and validate the corpus into `<run dir>/data/{clean,quarantine}/`.

    ray job submit --address http://HEAD:8265 --runtime-env jobs/runtime_env.yaml -- \
        python jobs/ingest.py --config configs/smoke.yaml [--set key=value ...]
"""

import sys

from _entry import main  # jobs/ is on sys.path when run as `python jobs/<name>.py`


def ingest(cfg, args, console):
    from leaf_ray.data.ingest import run_ingest

    return run_ingest(cfg)


if __name__ == "__main__":
    sys.exit(main("jobs/ingest.py", __doc__, ingest))
