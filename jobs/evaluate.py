r"""Evaluate one model on the configured benchmarks and log it to MLflow.

    ray job submit --address http://HEAD:8265 --runtime-env jobs/runtime_env.yaml -- \
        python jobs/evaluate.py --config configs/paper-llama3.2-1b-math.yaml \
        --model /mnt/runs/paper-llama3.2-1b-math/distill/leaf_instr/model --label leaf_instr

`--model` is `student` (default), `teacher` (the models.* entries of the config) or a local model directory.
"""

import sys

from _entry import main  # jobs/ is on sys.path when run as `python jobs/<name>.py`


def add_arguments(p):
    p.add_argument("--model", default="student",
                   help="`student`, `teacher`, or a local directory written by save_pretrained.")
    p.add_argument("--label", default=None,
                   help="Name of this model in MLflow and the comparison table (default: pre_kd, teacher, "
                        "or the directory name).")


def evaluate(cfg, args, console):
    from pathlib import Path

    from leaf_ray.config import ModelRef
    from leaf_ray.evaluate.runner import run_evaluation

    if args.model in ("student", "teacher"):
        ref = getattr(cfg.models, args.model)
        label = args.label or {"student": "pre_kd", "teacher": "teacher"}[args.model]
    else:
        ref = ModelRef(path=args.model, dtype=cfg.models.student.dtype)
        label = args.label or Path(args.model).name
    return run_evaluation(cfg, ref, label=label)


if __name__ == "__main__":
    sys.exit(main("jobs/evaluate.py", __doc__, evaluate, add_arguments))
