r"""The whole chain as one job: (teacher responses) -> ingest -> detection -> distillation per variant ->
evaluation -> comparison table, all under one run directory; a rerun resumes at the first unfinished stage.

    ray job submit --address http://HEAD:8265 --runtime-env jobs/runtime_env.yaml -- \
        python jobs/run.py --config configs/paper-llama3.2-1b-math.yaml
"""

import sys

from _entry import main  # jobs/ is on sys.path when run as `python jobs/<name>.py`


def run(cfg, args, console):
    from leaf_ray.pipeline import run_pipeline

    result = run_pipeline(cfg, console=console)
    console.print(f"run directory: {result.run_dir}")


if __name__ == "__main__":
    sys.exit(main("jobs/run.py", __doc__, run))
