"""Render chat messages with the model's own template (from the GGUF), in Jinja's sandbox.

Templates come from model files, which may come from anywhere: the sandbox keeps them from reaching
Python internals, and nothing a request sends is ever used as a template or a path.
"""

from __future__ import annotations

from datetime import datetime

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from parallama.server.errors import InvalidRequest

# ChatML, used when a GGUF carries no template.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _raise(message: str) -> None:
    raise InvalidRequest(f"chat template: {message}", param="messages")


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
        self._template = env.from_string(source or CHATML)
        self._specials = {"bos_token": bos_token, "eos_token": eos_token}
        # Templates of the Hermes / Qwen family render tools, tool calls and tool results themselves.
        self.takes_tools = bool(source) and "tools" in source and "tool_call" in source

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        extra = {"tools": tools} if tools else {}
        try:
            return self._template.render(messages=messages, add_generation_prompt=True, **self._specials, **extra)
        except InvalidRequest:
            raise
        except TemplateError as exc:
            raise InvalidRequest(f"the model's chat template failed on these messages: {exc}", "messages") from exc
