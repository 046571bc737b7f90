"""The focus experiment (`leaf-ray bench focus`, `leaf-ray demo`): word problems with inserted distractor
sentences whose character spans are known, so detection and distillation can be scored against the truth.

- `task`: the problems, their distractors and splits;
- `prepare`: the from-scratch teacher (with distractors) and student (without); `demo_models/` ships one pair;
- `controls`: oracle / random-span counterfactuals, FLOP matching, the paired bootstrap;
- `run`: the chain (ingest, detection, distillation of every variant, evaluation) and its MLflow records;
- `results`: the method and detection tables; `report`: the run's report.html; `demo`: `leaf-ray demo`.
"""
