"""Logprobs in OpenAI's two shapes: chat's list of token objects, and completions' parallel lists."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from parallama.sequences.backend import TokenLogprob

TokenBytes = Callable[[int], bytes]


def chat_logprobs(logprobs: list[TokenLogprob], token_bytes: TokenBytes) -> dict[str, Any]:
    return {"content": [_chat_token(lp, token_bytes) for lp in logprobs], "refusal": None}


def _chat_token(lp: TokenLogprob, token_bytes: TokenBytes) -> dict[str, Any]:
    return {**_token(lp.token, lp.logprob, token_bytes),
            "top_logprobs": [_token(token, logprob, token_bytes) for token, logprob in lp.top]}


def _token(token: int, logprob: float, token_bytes: TokenBytes) -> dict[str, Any]:
    piece = token_bytes(token)
    return {"token": piece.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(piece)}


def completion_logprobs(logprobs: list[TokenLogprob], token_bytes: TokenBytes, offset: int) -> dict[str, Any]:
    """``offset``: where the first token's text starts in the choice's text (after an echo)."""
    tokens, offsets = [], []
    for lp in logprobs:
        offsets.append(offset)
        text = token_bytes(lp.token).decode("utf-8", "replace")
        tokens.append(text)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{token_bytes(t).decode("utf-8", "replace"): v for t, v in lp.top} for lp in logprobs],
            "text_offset": offsets}
