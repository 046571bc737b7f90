"""Generation scoring: math answers (`answers`), sandboxed code execution (`sandbox`), benchmark loaders
(`benchmarks`). The generation backends, evaluation runner and `compare` build on these."""
