"""The files detection writes, and the rows flowing between its stages (one schema each)."""

from __future__ import annotations

import pyarrow as pa


class DetectionError(RuntimeError):
    """A detection run cannot start or finish (missing input, bad config for this cluster, broken output)."""


# --------------------------------------------------------------------------- schemas (the files on disk)

SCORES_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("scope", pa.string()),
    ("token_texts", pa.list_(pa.string())),
    ("token_char_offsets", pa.list_(pa.list_(pa.int32()))),  # relative to the scored text
    ("student_grad_norm", pa.list_(pa.float32())),  # raw ||dL/de_i||, before normalisation
    ("teacher_grad_norm", pa.list_(pa.float32())),  # raw; projected onto student tokens if tokenizers differ
    ("delta", pa.list_(pa.float32())),
    ("threshold", pa.float64()),
    ("confounder_mask", pa.list_(pa.bool_())),
    ("spans", pa.list_(pa.list_(pa.int32()))),  # [first_token, last_token_exclusive]
    ("student_loss", pa.float64()),
    ("teacher_loss", pa.float64()),
])

COUNTERFACTUALS_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("scope", pa.string()),
    ("span_index", pa.int32()),  # -1 = collective pruning
    ("char_start", pa.int32()),  # in the instruction (instruction scope) or the response prefix
    ("char_end", pa.int32()),
    ("removed_text", pa.string()),
    ("instruction", pa.string()),
    ("response_prefix", pa.string()),  # "" at instruction level
    ("output", pa.string()),  # the loss target: the response, or the continuation after the prefix
    ("split", pa.string()),
])

QUARANTINE_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("scope", pa.string()),
    ("stage", pa.string()),  # tokenise | student | teacher | score
    ("reason", pa.string()),
])

# What flows between stages: one unit per row. The actors add `<role>_grad_norm` and `<role>_loss`.
UNITS_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("scope", pa.string()),
    ("split", pa.string()),
    ("instruction", pa.string()),
    ("output", pa.string()),
    ("scored_text", pa.string()),  # the instruction, or the response prefix
    ("continuation", pa.string()),  # the loss target text
    ("input_ids", pa.list_(pa.int32())),  # the student's tokens of the rendered unit
    ("target_mask", pa.list_(pa.int8())),
    ("scored_token_idx", pa.list_(pa.int32())),
    ("token_char_offsets", pa.list_(pa.list_(pa.int32()))),
    ("quarantine_stage", pa.string()),
    ("quarantine_reason", pa.string()),
])

RESULTS_SCHEMA = pa.schema(
    list(SCORES_SCHEMA) + [("split", pa.string()), ("quarantine_stage", pa.string()),
                           ("quarantine_reason", pa.string()),
                           ("counterfactuals", pa.list_(pa.struct(list(COUNTERFACTUALS_SCHEMA))))]
)

CLEAN_COLUMNS = ["sample_id", "instruction", "output", "split"]

