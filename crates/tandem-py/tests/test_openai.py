"""The official ``openai`` package against a Tandem deployment: structured outputs (pydantic
``parse``, JSON schemas validated with ``jsonschema``), tool calling, ``n``, penalties,
``logit_bias``, content parts, completions logprobs and prompt scoring, and 400s for bad
schemas and tool definitions."""

import json
import re
import urllib.request
from typing import Iterator, List

import jsonschema
import openai
import pytest
from pydantic import BaseModel

from conftest import MODEL, QWEN, Deployments

# Strings are bounded (maxLength), so a strict schema also bounds how long the small model can
# ramble inside a string, whatever the kernels' rounding picks at near-ties.
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}, "population": {"type": "integer"},
     "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 3}},
     "required": ["city", "population", "landmarks"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"type": "number"}, "unit": {"enum": ["m", "km", "mi"]}},
     "required": ["answer", "unit"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "reason": {"type": ["string", "null"], "maxLength": 80}},
     "required": ["ok", "reason"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 5},
]
PROMPTS = [
    "Describe a person as JSON.",
    "Tell me about Paris.",
    "How far is the moon?",
    "Is water wet?",
    "List some prime numbers.",
    "Give me a made-up user.",
    "What is the capital of Japan?",
    "Convert 10 miles to kilometers.",
    "Can birds fly?",
    "Pick a few lucky numbers.",
]
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}]


def serve_openai(model: str) -> Iterator[tuple]:
    d = Deployments()
    c = d.serve(model, enable_restful_api=True)
    port = c.mii_config.restful_api_port
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
    yield client, f"http://127.0.0.1:{port}"
    d.close()


@pytest.fixture(scope="module")
def server() -> Iterator[tuple]:
    yield from serve_openai(MODEL)


@pytest.fixture(scope="module")
def qwen_server() -> Iterator[tuple]:
    yield from serve_openai(QWEN)


def metric(base: str, name: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise KeyError(name)


def chat(prompt: str) -> List[dict]:
    return [{"role": "user", "content": prompt}]


class Person(BaseModel):
    name: str
    age: int


def test_parse_with_a_pydantic_model(server):
    client, _ = server
    parse = getattr(getattr(client, "beta", client).chat.completions, "parse", None) or client.chat.completions.parse
    r = parse(model=MODEL, messages=chat("Describe a person."), response_format=Person, temperature=0, max_tokens=100)
    person = r.choices[0].message.parsed
    assert isinstance(person, Person) and isinstance(person.age, int)


@pytest.mark.parametrize("i", range(len(PROMPTS)))
def test_json_schema_outputs_validate(server, i):
    client, _ = server
    schema = SCHEMAS[i % len(SCHEMAS)]
    fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}
    stream = i % 2 == 1
    kwargs = dict(model=MODEL, messages=chat(PROMPTS[i]), response_format=fmt, temperature=0.8, seed=i, max_tokens=200)
    if stream:
        text = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(stream=True, **kwargs) if ch.choices)
    else:
        r = client.chat.completions.create(**kwargs)
        assert r.choices[0].finish_reason == "stop", r
        text = r.choices[0].message.content
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("which", ["server", "qwen_server"])
def test_tool_calling_round_trip(which, request):
    """On the reference model (generic tool format) and on Qwen2.5 (its own template's tool
    branches, Hermes-style <tool_call> output)."""
    client, _ = request.getfixturevalue(which)
    model = QWEN if which == "qwen_server" else MODEL
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = client.chat.completions.create(model=model, messages=chat("What's the weather in Paris?"),
                                           tools=WEATHER, tool_choice=choice, temperature=0)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls", r
        call = c.message.tool_calls[0]
        assert call.function.name == "get_weather"
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, WEATHER[0]["function"]["parameters"])
    # Streamed, the openai package assembles the tool_calls deltas.
    deltas = [ch.choices[0].delta for ch in client.chat.completions.create(
        model=model, messages=chat("Weather in Rome?"), tools=WEATHER, tool_choice="required", temperature=0, stream=True) if ch.choices]
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
    # The call and its result in the history; the final answer is text.
    messages = chat("What's the weather in Paris?") + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 22, "sky": "sunny"})},
    ]
    final = client.chat.completions.create(model=model, messages=messages, tools=WEATHER, temperature=0, max_tokens=40)
    assert final.choices[0].message.content


def test_n_choices_and_one_prefill(server):
    client, base = server
    prompt = "Once upon a time, in a village at the edge of a great forest, there lived a curious young fox. " * 3
    hits = metric(base, "tandem_prefix_cache_hits_total")
    r = client.completions.create(model=MODEL, prompt=prompt, n=3, max_tokens=8, temperature=1.0, seed=11)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 24
    blocks = (r.usage.prompt_tokens - 1) // 16
    assert metric(base, "tandem_prefix_cache_hits_total") - hits == 2 * blocks


def test_penalties_bias_and_content_parts(server):
    client, base = server
    plain = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    first = json.loads(urllib.request.urlopen(urllib.request.Request(
        f"{base}/tokenize", data=json.dumps({"prompt": plain.choices[0].text, "add_special_tokens": False}).encode(),
        headers={"content-type": "application/json"})).read())["tokens"][0]
    banned = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0,
                                       logit_bias={str(first): -100})
    assert banned.choices[0].text != plain.choices[0].text
    rep = dict(model=MODEL, prompt="one one one one one one", max_tokens=8, temperature=0)
    assert (client.completions.create(**rep).choices[0].text
            != client.completions.create(frequency_penalty=2.0, presence_penalty=2.0, **rep).choices[0].text)
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]
    a = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}], temperature=0, max_tokens=8)
    b = client.chat.completions.create(model=MODEL, messages=chat("What is 2+2?"), temperature=0, max_tokens=8)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_completions_logprobs_and_scoring(server):
    client, _ = server
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 3
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(len(t) == 2 for t in lp.top_logprobs)
    scored = client.completions.create(model=MODEL, prompt="The capital of France is Paris", max_tokens=0, echo=True, logprobs=1)
    s = scored.choices[0]
    assert s.text == "The capital of France is Paris"
    assert s.logprobs.token_logprobs[0] is None and s.logprobs.top_logprobs[0] is None
    assert all(x < 0 for x in s.logprobs.token_logprobs[1:])
    # A greedy token's score equals the logprob generation reported for it.
    prompt = "The capital of France is"
    gen = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logprobs=1)
    whole = client.completions.create(model=MODEL, prompt=prompt + gen.choices[0].text, max_tokens=0, echo=True, logprobs=1)
    assert abs(whole.choices[0].logprobs.token_logprobs[-1] - gen.choices[0].logprobs.token_logprobs[0]) < 1e-3


def test_bad_schemas_and_tools_are_400s(server):
    client, _ = server
    bad_calls = [
        dict(messages=chat("x"), response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "nope"}}}),
        dict(messages=chat("x"), tools=[{"type": "function", "function": {"name": "has spaces"}}]),
        dict(messages=chat("x"), tools=WEATHER, tool_choice={"type": "function", "function": {"name": "missing"}}),
        dict(messages=chat("x"), tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
             tool_choice="required"),
        dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]),
    ]
    for kwargs in bad_calls:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, **kwargs)
        assert re.search(r"\w", str(e.value))
