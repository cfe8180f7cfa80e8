"""The loaded GGUF: weights, vocabulary, tokenizer and the facts sizing needs.

Loaded once. A llama context (``LlamaBackend``) is built on top of it and may be rebuilt with
another size while the model stays loaded.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import llama_cpp

from parallama.sequences.backend import ModelFacts
from parallama.sequences.constraint import ConstraintCompiler
from parallama.sequences.config import CACHE_TYPES, ModelConfig

log = logging.getLogger(__name__)
_llama_log = logging.getLogger("llama.cpp")


@llama_cpp.llama_log_callback
def _forward_llama_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # llama.cpp's chatter (and its warnings, such as n_ctx_seq > n_ctx_train, which a unified cache
    # trips on purpose) goes to the "llama.cpp" logger at DEBUG; its errors (ggml level 4) stay visible.
    if level == 4:
        _llama_log.error(text.decode("utf-8", "replace").rstrip())
    elif _llama_log.isEnabledFor(logging.DEBUG):
        _llama_log.debug(text.decode("utf-8", "replace").rstrip())


llama_cpp.llama_log_set(_forward_llama_log, ctypes.c_void_p(0))
llama_cpp.llama_backend_init()


class ModelLoadError(RuntimeError):
    pass


def gpu_offload_supported() -> bool:
    """True when this llama.cpp build has a GPU backend (CUDA, Metal, Vulkan...)."""
    return bool(llama_cpp.llama_supports_gpu_offload())


class LlamaModel:
    def __init__(self, config: ModelConfig) -> None:
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = config.n_gpu_layers if config.n_gpu_layers >= 0 else 1 << 30
        # Extra CPU buffer types repack weights for AMX and friends. ggml's AMX matmul crashes on
        # multi-token batches of this Q4_1 model on Sapphire Rapids (seen here, llama-cpp-python 0.3.36),
        # so it is opt-in.
        params.use_extra_bufts = config.use_extra_bufts
        self.path = Path(config.path)
        self.ptr = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.ptr:
            raise ModelLoadError(f"llama.cpp could not load {self.path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self._pieces: dict[int, bytes] = {}
        eog = [t for t in range(self.n_vocab) if self.is_eog(t)]
        self.constraints = ConstraintCompiler(self.vocab, self.n_vocab, eog)

    def close(self) -> None:
        if self.ptr:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None

    # --- tokens -------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        size = len(data) + 8
        buf = (llama_cpp.llama_token * size)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, size, add_special, parse_special)
        if n < 0:  # the buffer was too small; -n is the size it needs
            size = -n
            buf = (llama_cpp.llama_token * size)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, size, add_special, parse_special)
        return list(buf[:n])

    def token_bytes(self, token: int) -> bytes:
        """The raw bytes of a token (special tokens render as nothing). Cached: pieces never change."""
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
            piece = self._pieces[token] = buf.raw[:n]
        return piece

    def token_text(self, token: int) -> str:
        text = llama_cpp.llama_vocab_get_text(self.vocab, token)
        return text.decode("utf-8", "replace") if text else ""

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    # --- facts --------------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buf, 256)
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def kv_bytes_per_token(self, cache_type_k: str, cache_type_v: str) -> int:
        """K and V bytes of one token over all layers: n_layer x n_head_kv x head size x type size."""
        arch = self.meta("general.architecture") or ""
        n_embd = llama_cpp.llama_model_n_embd(self.ptr)
        n_head = max(1, llama_cpp.llama_model_n_head(self.ptr))
        n_head_kv = llama_cpp.llama_model_n_head_kv(self.ptr)
        head_k = int(self.meta(f"{arch}.attention.key_length") or n_embd // n_head)
        head_v = int(self.meta(f"{arch}.attention.value_length") or n_embd // n_head)
        per_layer = n_head_kv * (head_k * CACHE_TYPES[cache_type_k][1] + head_v * CACHE_TYPES[cache_type_v][1])
        return int(llama_cpp.llama_model_n_layer(self.ptr) * per_layer)

    def facts(self, cache_type_k: str = "f16", cache_type_v: str = "f16") -> ModelFacts:
        template = llama_cpp.llama_model_chat_template(self.ptr, None)
        return ModelFacts(
            name=self.meta("general.name") or self.path.stem,
            path=str(self.path),
            n_vocab=self.n_vocab,
            n_ctx_train=llama_cpp.llama_model_n_ctx_train(self.ptr),
            n_layer=llama_cpp.llama_model_n_layer(self.ptr),
            n_head=max(1, llama_cpp.llama_model_n_head(self.ptr)),
            weights_bytes=llama_cpp.llama_model_size(self.ptr),
            kv_bytes_per_token=self.kv_bytes_per_token(cache_type_k, cache_type_v),
            chat_template=template.decode("utf-8") if template else None,
            bos_token=self.token_text(llama_cpp.llama_vocab_bos(self.vocab)),
            eos_token=self.token_text(llama_cpp.llama_vocab_eos(self.vocab)),
        )
