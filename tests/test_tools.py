"""Tool calling on the real model: tools, tool_choice, streamed tool_calls, and the clients agents use."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import pytest
from openai import OpenAI
from serving import live_server

from parallama.server.tools import CallStream, parse_calls

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string", "maxLength": 30},
                                          "unit": {"enum": ["celsius", "fahrenheit"]}},
                                          "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "create_event", "description": "Put an event in the calendar.",
                                      "parameters": {"type": "object", "properties": {
                                          "title": {"type": "string", "maxLength": 30},
                                          "when": {"type": "object", "properties": {
                                              "day": {"type": "integer", "minimum": 1, "maximum": 31},
                                              "month": {"type": "integer", "minimum": 1, "maximum": 12}},
                                              "required": ["day", "month"], "additionalProperties": False}},
                                          "required": ["title", "when"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "tag_items", "description": "Tag a list of items.",
                                      "parameters": {"type": "object", "properties": {
                                          "items": {"type": "array", "minItems": 1, "maxItems": 3,
                                                    "items": {"type": "string", "maxLength": 12}},
                                          "tag": {"enum": ["red", "green", "blue"]}},
                                          "required": ["items", "tag"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers.",
                                      "parameters": {"type": "object", "properties": {
                                          "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                                          "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
                                          "required": ["a", "b"], "additionalProperties": False}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASKS = ["What's the weather in Oslo?", "Book lunch with Ana on May 3.", "Tag apples and pears green.",
        "What is 12 plus 30?", "Help me with this."]


def test_calls_are_parsed_and_streamed_in_one_format():
    text = 'Let me check.\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n' \
           '<tool_call>{"name": "add", "arguments": {"a": 3, "b": 4}}</tool_call>'
    content, calls = parse_calls(text)
    assert content == "Let me check." and [c.name for c in calls] == ["add", "add"]
    assert [json.loads(c.arguments) for c in calls] == [{"a": 1, "b": 2}, {"a": 3, "b": 4}]
    assert parse_calls("plain <tool_call>{broken") == ("plain <tool_call>{broken", [])  # never half a call
    stream, out, streamed = CallStream(), "", []
    for i in range(0, len(text), 5):  # any split of the text
        piece, done = stream.feed(text[i:i + 5])
        out += piece
        streamed += done
    assert out + stream.finish() == "Let me check.\n" and [c.arguments for c in streamed] == [c.arguments for c in calls]




@pytest.fixture(scope="module")
def server():
    with live_server(parallel=8, ctx_size=2048, memory_reserve="1GiB", model_alias="smol,*") as srv:
        yield srv


def chat(base_url: str, body: dict) -> dict:
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


async def chat_all(base_url: str, bodies: list[dict]) -> list[dict]:
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        responses = await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text for r in responses]
    return [r.json() for r in responses]


def assert_valid_calls(message: dict, only: str | None = None) -> None:
    assert message["tool_calls"], message
    for call in message["tool_calls"]:
        assert call["type"] == "function" and call["id"].startswith("call_")
        name = call["function"]["name"]
        assert only is None or name == only
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])


@pytest.mark.model
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_and_named_calls_always_validate(server, temperature):
    bodies = []
    for i, ask in enumerate(ASKS * 2):  # 10 required + 10 named per temperature
        choice = "required" if i < len(ASKS) else {"type": "function", "function": {"name": TOOLS[i % 4]["function"]["name"]}}
        bodies.append({"messages": [{"role": "user", "content": ask}], "tools": TOOLS, "tool_choice": choice,
                       "max_tokens": 400, "temperature": temperature, "seed": i})  # room for 4 parallel calls
    for body, out in zip(bodies, asyncio.run(chat_all(server.base_url, bodies))):
        choice = out["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        named = body["tool_choice"]["function"]["name"] if isinstance(body["tool_choice"], dict) else None
        assert_valid_calls(choice["message"], only=named)


@pytest.mark.model
def test_auto_gives_text_or_a_valid_call_never_half_a_call(server):
    bodies = [{"messages": [{"role": "user", "content": ask}], "tools": TOOLS, "tool_choice": "auto",
               "max_tokens": 80, "temperature": 0.8, "seed": i} for i, ask in enumerate(ASKS)]
    for out in asyncio.run(chat_all(server.base_url, bodies)):
        choice = out["choices"][0]
        if choice["finish_reason"] == "tool_calls":
            assert_valid_calls(choice["message"])
        else:
            assert "<tool_call>" not in (choice["message"]["content"] or "") or choice["finish_reason"] == "length"
            assert "tool_calls" not in choice["message"]


@pytest.mark.model
def test_none_is_plain_text(server):
    out = chat(server.base_url, {"messages": [{"role": "user", "content": ASKS[0]}], "tools": TOOLS,
                                 "tool_choice": "none", "max_tokens": 16, "temperature": 0})
    assert out["choices"][0]["finish_reason"] in ("stop", "length") and "tool_calls" not in out["choices"][0]["message"]


def _reassemble(chunks) -> tuple[list[dict], str | None]:
    """What an OpenAI client does with streamed tool_calls deltas: concatenate them per index."""
    assembled: dict[int, dict] = {}
    finish = None
    for chunk in chunks:
        choice = chunk.choices[0] if chunk.choices else None
        for tc in (choice.delta.tool_calls or []) if choice else []:
            entry = assembled.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
            entry["name"] += (tc.function.name or "") if tc.function else ""
            entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish = choice.finish_reason if choice and choice.finish_reason else finish
    assert sorted(assembled) == list(range(len(assembled)))  # indices 0..n-1, none skipped
    return [assembled[i] for i in sorted(assembled)], finish


@pytest.mark.model
def test_openai_client_streamed_parallel_tool_calls_reassemble_into_valid_calls(server):
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="none")
    stream = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": ASKS[1]}],
                                            tools=TOOLS, tool_choice="required", max_tokens=400, temperature=0,
                                            stream=True)
    calls, finish = _reassemble(stream)
    assert finish == "tool_calls" and calls
    assert len({c["id"] for c in calls}) == len(calls) and all(c["id"] for c in calls)
    for call in calls:
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


@pytest.mark.model
def test_openai_client_streamed_tool_call_equals_the_non_streamed_call(server):
    # The schema leaves one possible call, so the two answers must be byte-equal whatever the kernels' numeric
    # noise (llama.cpp's CPU kernels are not batch-invariant; a free greedy choice may tip between two runs).
    pinned = {"type": "function", "function": {"name": "book", "parameters": {
        "type": "object", "properties": {"who": {"const": "Ana"}, "day": {"const": 3}, "month": {"const": "May"}},
        "required": ["who", "day", "month"], "additionalProperties": False}}}
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="none")
    args = dict(model="smol", messages=[{"role": "user", "content": ASKS[1]}], tools=[pinned],
                tool_choice={"type": "function", "function": {"name": "book"}}, parallel_tool_calls=False,
                max_tokens=100, temperature=0)
    whole = client.chat.completions.create(**args)
    assert whole.choices[0].finish_reason == "tool_calls"
    calls, finish = _reassemble(client.chat.completions.create(**args, stream=True))
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in whole.choices[0].message.tool_calls] == \
        [("book", {"who": "Ana", "day": 3, "month": "May"})]


@pytest.mark.model
def test_a_conversation_with_tool_results_continues(server):
    first = chat(server.base_url, {"messages": [{"role": "user", "content": ASKS[3]}], "tools": TOOLS,
                                   "tool_choice": {"type": "function", "function": {"name": "add"}},
                                   "max_tokens": 60, "temperature": 0})
    message = first["choices"][0]["message"]
    call = message["tool_calls"][0]
    history = [{"role": "user", "content": ASKS[3]}, message,
               {"role": "tool", "tool_call_id": call["id"], "content": "42"}]
    second = chat(server.base_url, {"messages": history, "tools": TOOLS, "max_tokens": 24, "temperature": 0,
                                    "tool_choice": "none"})
    assert second["choices"][0]["message"]["content"]
    assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"]


@pytest.mark.model
def test_tool_calls_and_free_requests_share_the_steps(server):
    bodies = [{"messages": [{"role": "user", "content": ASKS[i % 4]}], "tools": TOOLS, "tool_choice": "required",
               "max_tokens": 400, "temperature": 0.7, "seed": i, "parallel_tool_calls": False} for i in range(8)]
    bodies += [{"messages": [{"role": "user", "content": f"Say something about {i}."}], "max_tokens": 20,
                "temperature": 0.7, "seed": i} for i in range(8)]
    outs = asyncio.run(chat_all(server.base_url, bodies))
    for out in outs[:8]:
        assert_valid_calls(out["choices"][0]["message"])
    assert all(out["choices"][0]["message"]["content"] for out in outs[8:])


@pytest.mark.model
def test_langchain_bind_tools_and_function_calling_structured_output(server):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    llm = ChatOpenAI(base_url=f"{server.base_url}/v1", api_key="none", model="smol", temperature=0, max_tokens=400)
    reply = llm.bind_tools([TOOLS[0]], tool_choice="required").invoke("What's the weather in Rome?")
    assert reply.tool_calls and reply.tool_calls[0]["name"] == "get_weather"
    jsonschema.validate(reply.tool_calls[0]["args"], SCHEMAS["get_weather"])

    class Sum(BaseModel):
        """Two numbers to add."""

        a: int = Field(ge=0, le=100)
        b: int = Field(ge=0, le=100)

    result = llm.with_structured_output(Sum, method="function_calling").invoke("Add 2 and 3.")
    assert isinstance(result, Sum)


@pytest.mark.model
def test_openai_agents_sdk_runs_an_agent_with_a_function_tool_over_two_rounds(server):
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, RunConfig, Runner, function_tool
    from agents import set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    seen: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        seen.append(city)
        return f"It is sunny in {city}."

    model = OpenAIChatCompletionsModel(model="smol", openai_client=AsyncOpenAI(base_url=f"{server.base_url}/v1",
                                                                                api_key="none"))
    agent = Agent(name="weather", instructions="Use the tool, then answer in one sentence.", tools=[get_weather],
                  model=model, model_settings=ModelSettings(tool_choice="required", max_tokens=300, temperature=0,
                                                 parallel_tool_calls=False),
                  reset_tool_choice=True)
    result = asyncio.run(Runner.run(agent, "What's the weather in Lisbon?", max_turns=4,
                                    run_config=RunConfig(tracing_disabled=True)))
    assert seen  # round 1: the tool was called with arguments that parsed
    assert isinstance(result.final_output, str) and result.final_output  # round 2: the final answer


@pytest.mark.model
@pytest.mark.parametrize(("change", "param"), [
    ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "call_x", "content": "1"}]},
     "messages.1.tool_call_id"),
])
def test_bad_tool_requests_are_400s_naming_the_field(server, change, param):
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4, **change}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
