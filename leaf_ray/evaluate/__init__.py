"""Judging and scoring completions: math answers (`answers`), sandboxed code execution (`sandbox`), benchmark
loaders (`benchmarks`), one verdict per response (`judge`); and the passes built on generation and the judge:
the teacher-response filter (`teacher_responses`), the evaluation stage (`runner`) and `compare`."""
