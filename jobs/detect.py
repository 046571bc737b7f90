r"""Stage 1: gradient-based confounder detection and span-pruned counterfactuals (needs ingested data).

    ray job submit --address http://HEAD:8265 --runtime-env jobs/runtime_env.yaml -- \
        python jobs/detect.py --config configs/paper-llama3.2-1b-math.yaml [--set key=value ...]
"""

import sys

from _entry import main  # jobs/ is on sys.path when run as `python jobs/<name>.py`


def detect(cfg, args, console):
    from leaf_ray.detect.pipeline import run_detection

    return run_detection(cfg, console=console)


if __name__ == "__main__":
    sys.exit(main("jobs/detect.py", __doc__, detect))
