"""The engine's front door for dense generation: open a model by name or path,
pick a backend, and stream an answer to a prompt or a chat.

    model = load_model("smollm2-135m-instruct")
    for token in model.chat([{"role": "user", "content": "Hi"}], SamplingParams()):
        print(token.text, end="")
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.config import ModelConfig
from engine.generate import (
    CancelCheck,
    GenerationStats,
    ProgressCallback,
    SamplingParams,
    Token,
    generate,
    generate_batch,
)
from engine.model_store import ModelFolder, open_model
from engine.tokenizer import StreamDecoder, Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

BACKENDS = ("torch", "mlx")


def _apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def resolve_backend(name: str = "auto") -> str:
    """'auto' → MLX on Apple Silicon where it is installed, else torch (on a CUDA GPU
    where there is one, else the CPU: engine.backends.torch.resolve_device).

    Only whether MLX is installed is checked (no import): importing a backend is the
    loader's job, and the app must start where only one of them exists.
    """
    if name == "auto":
        return "mlx" if _apple_silicon() and importlib.util.find_spec("mlx") is not None else "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend '{name}' (choose from: auto, {', '.join(BACKENDS)})")
    return name


def device_available(device: str, backend: str = "torch") -> bool:
    """Whether the backend can run on `device` here (imports the backend lazily):
    torch knows "cpu", "cuda", "mps"; MLX knows "cpu" and "gpu" (Metal)."""
    module = importlib.import_module(f"engine.backends.{resolve_backend(backend)}")
    return bool(module.device_available(device))


@dataclass
class LoadedModel:
    folder: ModelFolder
    config: ModelConfig
    tokenizer: Tokenizer
    backend: str
    model: object  # the backend's model: new_cache(), forward()

    def encode_chat(self, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        # Templates that write the BOS token themselves must not get a second one.
        ids = self.tokenizer.encode(text)
        bos = self.tokenizer.bos_id
        if self.tokenizer.add_bos_default and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def encode_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_bos=self.tokenizer.add_bos_default)

    def stream(
        self,
        prompt_tokens: list[int],
        params: SamplingParams,
        *,
        on_progress: ProgressCallback | None = None,
        cancel: CancelCheck | None = None,
        stats: GenerationStats | None = None,
        chunk_size: int = 8192,
        cache: object | None = None,
        logits: object | None = None,
    ) -> Iterator[Token]:
        """Stream tokens for a prompt; `cache` replaces the fresh dense KV cache
        (cached reading, engine/corpus/answerer.py `_read_cached`, passes one filled
        from the corpus cache, with the `logits` of its last prompt token)."""
        params = self._with_stops(params)
        yield from generate(
            self.model,
            prompt_tokens,
            StreamDecoder(self.tokenizer),
            params,
            cache=cache,
            chunk_size=chunk_size,
            on_progress=on_progress,
            cancel=cancel,
            stats=stats,
            logits=logits,
        )

    def chat(self, messages: list[dict], params: SamplingParams, **kwargs) -> Iterator[Token]:
        return self.stream(self.encode_chat(messages), params, **kwargs)

    def complete(self, text: str, params: SamplingParams, **kwargs) -> Iterator[Token]:
        return self.stream(self.encode_prompt(text), params, **kwargs)

    def chat_batch(self, conversations: list[list[dict]], params: SamplingParams, *, cancel: CancelCheck | None = None,
                   stats: list[GenerationStats] | None = None) -> list[str]:
        """The reply to each conversation, decoded together (`generate_batch`)."""
        return generate_batch(self.model, [self.encode_chat(m) for m in conversations],
                              [StreamDecoder(self.tokenizer) for _ in conversations], self._with_stops(params),
                              cancel=cancel, stats=stats)

    def _with_stops(self, params: SamplingParams) -> SamplingParams:
        """`params` with the tokenizer's end-of-turn ids as stop tokens unless it names its own."""
        stop_ids = tuple(params.stop_token_ids) or tuple(self.tokenizer.eos_ids)
        return dataclasses.replace(params, stop_token_ids=stop_ids)


def load_model(
    spec: str | Path,
    *,
    backend: str = "auto",
    dtype: str = "auto",
    threads: int | None = None,
    device: str = "auto",
) -> LoadedModel:
    """Open an installed model name, a .gguf file (converted once) or an HF folder.

    `backend` is "auto" (see `resolve_backend`), "torch" or "mlx"; both read the same
    converted safetensors and give the same logits (tests/mlx). `device` is torch's
    ("auto", "cpu", "cuda"); MLX picks its own. `dtype` "auto" is each backend's
    default; "quantised" keeps a converted GGUF's quantised matrices (torch, CPU or
    CUDA); a float dtype named reads the GGUF dequantised."""
    started = time.perf_counter()
    folder = open_model(spec)
    tokenizer = load_tokenizer(folder.path)
    backend = resolve_backend(backend)
    module = importlib.import_module(f"engine.backends.{backend}")
    extra = {"device": device} if backend == "torch" else {}
    weight_files = folder.weight_files
    if dtype not in ("auto", "quantised") and folder.source_gguf is not None:
        # A float dtype asked for by name: the GGUF dequantised by gguf-py, exactly
        # (the converted folder's int8 matrices are requantised, see engine/quant.py).
        weight_files = [folder.source_gguf]
    model = module.load(folder.config, weight_files, dtype=dtype, threads=threads, **extra)
    seconds = time.perf_counter() - started
    log.info("model %s ready in %.2f s", folder.name, seconds)
    return LoadedModel(folder, folder.config, tokenizer, backend, model)

# The model `quire generate` and the app use when none is chosen. Chosen by the
# measurements of `quire bench runtime` (docs/lab/runtime.md): see the README.
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
