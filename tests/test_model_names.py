"""--model-alias: which names a request's ``model`` may use. No model needed."""

from __future__ import annotations

import pytest

from parallama.server.errors import ModelNotFound
from parallama.server.state import ModelNames, Served


def check(names: ModelNames, requested: str | None) -> None:
    Served(engine=None, names=names, ctx_size=1, plan="", template=None, created=0).check_model(requested)  # type: ignore[arg-type]


def test_default_is_the_file_stem_and_other_names_are_404():
    names = ModelNames.from_alias(None, "SmolLM2-135M")
    assert names.model_id == "SmolLM2-135M"
    check(names, "SmolLM2-135M")
    check(names, None)  # no model field: the loaded one
    with pytest.raises(ModelNotFound, match="'gpt-4o' does not exist; this server serves 'SmolLM2-135M'"):
        check(names, "gpt-4o")


def test_several_aliases_are_accepted_and_the_first_is_the_id():
    names = ModelNames.from_alias("smol, gpt-4o-mini", "SmolLM2-135M")
    assert names.model_id == "smol"
    for name in ("smol", "gpt-4o-mini"):
        check(names, name)
    with pytest.raises(ModelNotFound):
        check(names, "SmolLM2-135M")  # an alias replaces the file name, as before


def test_star_answers_any_name_with_the_loaded_model():
    names = ModelNames.from_alias("*", "SmolLM2-135M")
    assert names.model_id == "SmolLM2-135M"  # responses still say which model answered
    for name in ("gpt-4o", "claude-whatever", "SmolLM2-135M"):
        check(names, name)
    assert ModelNames.from_alias("smol,*", "x").model_id == "smol"
