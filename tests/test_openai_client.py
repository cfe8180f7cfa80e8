"""The official openai client against a live server: what application code actually does."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest
from serving import live_server

pytestmark = pytest.mark.model

MESSAGES = [{"role": "user", "content": "List three fruits."}]


@pytest.fixture(scope="module")
def server():
    with live_server() as srv:
        yield srv


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def test_chat_and_stream_agree(client, server):
    model = server.served.model_id
    whole = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=20)
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 20 and whole.usage.prompt_tokens > 0
    parts = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=20, stream=True,
                                           stream_options={"include_usage": True})
    chunks = list(parts)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_and_models(client, server):
    model = server.served.model_id
    out = client.completions.create(model=model, prompt="1, 2, 3,", max_tokens=6, temperature=0)
    assert out.choices[0].text and out.usage.completion_tokens == 6
    assert [m.id for m in client.models.list()] == [model]
    assert client.models.retrieve(model).id == model


def test_errors_arrive_as_openai_exceptions(client, server):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(model=server.served.model_id, messages=MESSAGES, max_tokens=10_000)
    assert excinfo.value.code == "context_length_exceeded"


def test_eight_concurrent_streams_overlap(server):
    """8 streaming clients at once all finish, and they really run together: the 8th client's first
    token arrives before the 1st client's last."""
    client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)

    async def one(i: int) -> tuple[float, float, str]:
        stream = await client.chat.completions.create(
            model=server.served.model_id, messages=[{"role": "user", "content": f"Count from {i} to {i + 30}."}],
            temperature=0, max_tokens=48, stream=True)
        first = last = None
        text = ""
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                now = time.monotonic()
                first = first or now
                last = now
                text += chunk.choices[0].delta.content
        return first, last, text

    async def run() -> list[tuple[float, float, str]]:
        tasks = []
        for i in range(8):
            tasks.append(asyncio.create_task(one(i)))
            await asyncio.sleep(0.01)  # keep the submission order, so "1st" and "8th" mean something
        return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    assert all(text for _, _, text in results)
    first_of_8th = results[7][0]
    last_of_1st = results[0][1]
    assert first_of_8th < last_of_1st
