"""``parallama serve``: flags generated from Settings, so each flag, its env variable and its help agree."""

from __future__ import annotations

import argparse
import logging
import sys
import typing

from pydantic import ValidationError

from parallama import __version__
from parallama.server.settings import Settings

log = logging.getLogger("parallama")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parallama", description="A local OpenAI-compatible LLM server "
                                     "that runs many sequences at once.")
    parser.add_argument("--version", action="version", version=f"parallama {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="load a model and serve the OpenAI API",
                                description="Every flag can also be set with the environment variable shown.")
    for name, field in Settings.model_fields.items():
        env = f"PARALLAMA_{name.upper()}"
        default = "" if field.default is None else f"; default {field.default}"
        choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else None
        serve.add_argument(_flag(name), dest=name, default=argparse.SUPPRESS, choices=choices, metavar=name.upper(),
                           help=f"{field.description} [env {env}{default}]")
    return parser


def settings_errors(exc: ValidationError) -> str:
    """Pydantic's errors in the user's terms: the flag (or variable) and what it accepts."""
    parts = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else ""
        parts.append(f"{_flag(name)} (PARALLAMA_{name.upper()}): {error['msg']}" if name else error["msg"])
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        settings = Settings(**given)  # flags win over PARALLAMA_* variables, which win over defaults
    except ValidationError as exc:
        print(f"parallama: {settings_errors(exc)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from parallama.server.serve import serve

    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
