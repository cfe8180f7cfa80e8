"""Constrained decoding with llguidance: a grammar (JSON schema, GBNF or Lark) becomes a token mask.

Why llguidance: it computes a mask over the whole vocabulary in tens of microseconds from a grammar
it compiles lazily (llama.cpp's own grammar sampler walks every candidate token through its stacks,
which is what makes "every token slow" there), it ships as a dependency-free wheel with a llama.cpp
tokenizer bridge, and it implements JSON schema itself, so a schema is never silently turned into
free text. vLLM and llama.cpp (``--llguidance``) use it too.

A ``Constraint`` is compiled once per request, off the worker thread; each sequence gets its own
matcher (a cheap deep copy). The sampler writes -inf into the disallowed logits of that sequence's
row, samples as usual, and advances the matcher with the token it picked. End-of-generation tokens
are allowed only where the grammar is complete.
"""

from __future__ import annotations

import json
import threading
import warnings
from typing import Any

import llguidance
import llguidance.llamacpp
import numpy as np

NEG_INF = np.float32(-np.inf)


class ConstraintError(ValueError):
    """The grammar or schema cannot be compiled; the message says why."""


class Constraint:
    """A compiled grammar. ``matcher()`` gives a fresh matcher for one sequence.

    A lazy constraint (``trigger``) lets the sequence write freely until its output ends with the
    trigger text, and constrains it from there: tool calls under tool_choice "auto"."""

    __slots__ = ("_prototype", "_tokenizer", "source", "trigger")

    def __init__(self, prototype: llguidance.LLMatcher, tokenizer: llguidance.LLTokenizer, source: str,
                 trigger: bytes | None = None) -> None:
        self._prototype = prototype
        self._tokenizer = tokenizer
        self.source = source  # "json_schema", "grammar", "tools" ... for messages
        self.trigger = trigger

    def matcher(self) -> ConstraintState:
        return ConstraintState(self._prototype.deep_copy(), self._tokenizer, self.trigger)


class ConstraintState:
    """One sequence's position in its grammar (or, while lazy, in its free text before the trigger)."""

    __slots__ = ("_matcher", "_tokenizer", "_trigger", "_tail")

    def __init__(self, matcher: llguidance.LLMatcher, tokenizer: llguidance.LLTokenizer,
                 trigger: bytes | None) -> None:
        self._matcher = matcher
        self._tokenizer = tokenizer
        self._trigger = trigger
        self._tail = b""

    @property
    def active(self) -> bool:
        return self._trigger is None

    def mask_logits(self, logits: np.ndarray) -> None:
        """Set every token the grammar does not allow next to -inf, in place."""
        if not self.active:
            return
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: logits.shape[0]].astype(bool)
        logits[~allowed] = NEG_INF

    def accept(self, token: int) -> None:
        if self.active:
            self._matcher.consume_token(token)
            return
        self._tail += self._tokenizer.decode_bytes([token])
        at = self._tail.find(self._trigger)
        if at < 0:
            self._tail = self._tail[-len(self._trigger):]
            return
        rest = self._tail[at + len(self._trigger):]  # a token may run past the trigger
        self._trigger, self._tail = None, b""
        if rest:
            self._matcher.consume_tokens(self._tokenizer.tokenize_bytes(rest))

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() if self._matcher.is_error() else None


class ConstraintCompiler:
    """Compiles grammars for one model. The llguidance tokenizer is built on first use (about a second
    for a 50k vocabulary) and shared; compiling runs on the caller's thread, never the worker's."""

    def __init__(self, vocab_ptr: Any, n_vocab: int, eog_tokens: list[int]) -> None:
        self._vocab = vocab_ptr
        self._n_vocab = n_vocab
        self._eog = eog_tokens
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def json_schema(self, schema: dict[str, Any]) -> Constraint:
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults={"whitespace_flexible": False})
        except (ValueError, TypeError) as exc:
            raise ConstraintError(f"invalid JSON schema: {exc}") from exc
        return self._compile(grammar, "json_schema")

    def any_json_object(self) -> Constraint:
        return self.json_schema({"type": "object"})

    def gbnf(self, text: str) -> Constraint:
        try:
            grammar = llguidance.grammar_from("gbnf", text)
        except ValueError as exc:
            raise ConstraintError(str(exc)) from exc
        return self._compile(grammar, "grammar")

    def lark(self, text: str, source: str = "lark", trigger: str | None = None) -> Constraint:
        """A Lark grammar (llguidance's dialect, with ``%json {schema}``); lazy after ``trigger``."""
        return self._compile(llguidance.LLMatcher.grammar_from_lark(text), source, trigger)

    def _compile(self, grammar: str, source: str, trigger: str | None = None) -> Constraint:
        tokenizer = self._tokenizer_once()
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ConstraintError(_first_line(matcher.get_error()))
        return Constraint(matcher, tokenizer, source, trigger.encode() if trigger else None)

    def _tokenizer_once(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                with warnings.catch_warnings():  # it reads token attributes through a deprecated binding
                    warnings.simplefilter("ignore", DeprecationWarning)
                    self._tokenizer = llguidance.llamacpp.lltokenizer_from_vocab(
                        self._vocab, n_vocab=self._n_vocab, eos_token=self._eog)
            return self._tokenizer


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "the grammar could not be compiled"
