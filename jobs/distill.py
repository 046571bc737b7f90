r"""Stage 2: hybrid-KL distillation of one variant on Ray Train + DeepSpeed (needs detection outputs for the
LeaF variants).

    ray job submit --address http://HEAD:8265 --runtime-env jobs/runtime_env.yaml -- \
        python jobs/distill.py --config configs/paper-llama3.2-1b-math.yaml --variant leaf_instr
"""

import sys
import typing

from _entry import main  # jobs/ is on sys.path when run as `python jobs/<name>.py`


def variants() -> list[str]:
    """The variant names the config accepts in `pipeline.variants` (one source of truth)."""
    from leaf_ray.config import PipelineConfig

    (literal,) = typing.get_args(PipelineConfig.model_fields["variants"].annotation)
    return list(typing.get_args(literal))


def add_arguments(p):
    p.add_argument("--variant", choices=variants(), default=None,
                   help="kd = KD w/o mask; default: leaf_instr, or kd when distill.use_counterfactuals is false.")


def distill(cfg, args, console):
    from leaf_ray.distill.driver import run_distillation

    return run_distillation(cfg, variant=args.variant, console=console)


if __name__ == "__main__":
    sys.exit(main("jobs/distill.py", __doc__, distill, add_arguments))
