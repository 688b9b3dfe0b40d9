#!/usr/bin/env python3
"""Compatibility check: the official `openai` Python package against `tandem serve`.

Installs `openai` into a venv under $TANDEM_HOME (default ~/.cache/tandem/compat-venv) the
first time, builds and starts `tandem serve` on a free 127.0.0.1 port with an API key, then
drives it through the client: models, completions and chat (plain and streamed, with usage),
stop lists, seeds, logprobs in the completions shape, n, structured output parsed into a
pydantic model, a tool call, and typed errors for bad requests and a bad key.
Usage: python3 scripts/compat_openai.py        (exits non-zero on the first failure)
"""
import os, pathlib, socket, subprocess, sys, time, venv

ROOT = pathlib.Path(__file__).resolve().parent.parent
HOME = pathlib.Path(os.environ.get("TANDEM_HOME") or pathlib.Path.home() / ".cache" / "tandem")
VENV = HOME / "compat-venv"


def ensure_openai():
    py = VENV / "bin" / "python"
    if not py.exists():
        venv.create(VENV, with_pip=True)
    if subprocess.run([py, "-c", "import openai"], capture_output=True).returncode != 0:
        subprocess.check_call([py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "openai>=1.40", "pydantic>=2"])
    return py


def main():
    py = ensure_openai()
    if os.environ.get("TANDEM_COMPAT_INNER") != "1":
        # Re-run this script inside the venv that has `openai`.
        env = dict(os.environ, TANDEM_COMPAT_INNER="1")
        sys.exit(subprocess.call([py, __file__], env=env))
    subprocess.check_call(["cargo", "build", "--release", "-q", "--bin", "tandem"], cwd=ROOT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([ROOT / "target/release/tandem", "serve", "--restful-api-port", str(port), "--api-key", "compat-key"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        run_checks(port)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print("openai client compatibility: all checks passed")


def run_checks(port):
    import openai
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    client = openai.OpenAI(base_url=base, api_key="compat-key", max_retries=0, timeout=120)
    while True:
        try:
            models = client.models.list()
            break
        except openai.APIConnectionError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)
    model = models.data[0].id
    print("models:", [m.id for m in models.data])

    c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 8, c
    print("completion:", repr(c.choices[0].text))
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True) if ch.choices)
    assert streamed == c.choices[0].text, (streamed, c.choices[0].text)

    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=32, temperature=0)
    answer = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and answer, r
    print("chat:", repr(answer))
    chunks = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=32, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == answer, (text, answer)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == r.usage.completion_tokens

    stopped = client.completions.create(model=model, prompt="The capital of France is", max_tokens=16, temperature=0, stop=["."])
    assert "." not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop", stopped
    a = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=7)
    b = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=7)
    assert a.choices[0].text == b.choices[0].text, "same seed, same text"
    lp = client.completions.create(model=model, prompt="Hello", max_tokens=3, temperature=0, logprobs=2)
    assert len(lp.choices[0].logprobs.token_logprobs) == 3 and len(lp.choices[0].logprobs.text_offset) == 3
    many = client.completions.create(model=model, prompt="Hello", max_tokens=3, n=2, temperature=1.0)
    assert [c.index for c in many.choices] == [0, 1]

    # Structured output through the client's pydantic helper, and a tool call.
    from pydantic import BaseModel, Field

    class Answer(BaseModel):
        answer: int
        explanation: str = Field(max_length=80)

    parse = getattr(getattr(client, "beta", client).chat.completions, "parse", None) or client.chat.completions.parse
    parsed = parse(model=model, messages=msgs, response_format=Answer, temperature=0, max_tokens=200)
    assert isinstance(parsed.choices[0].message.parsed, Answer), parsed
    tools = [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}]
    call = client.chat.completions.create(model=model, messages=msgs, tools=tools, tool_choice="required", temperature=0)
    assert call.choices[0].finish_reason == "tool_calls", call
    assert call.choices[0].message.tool_calls[0].function.name == "add"
    print("tool call:", call.choices[0].message.tool_calls[0].function.arguments)

    # Extensions through extra_body, as vLLM users pass them.
    e = client.completions.create(model=model, prompt="Hi", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True, "top_k": 5, "min_tokens": 5, "repetition_penalty": 1.1})
    assert e.usage.completion_tokens == 5

    for bad in [dict(top_p=2.0), dict(n=0), dict(max_tokens=0), dict(extra_body={"bogus": 1}),
                dict(extra_body={"guided_regex": "(unclosed"})]:
        try:
            client.completions.create(model=model, prompt="x", **bad)
        except openai.BadRequestError as err:
            assert err.body and "message" in err.body, err.body
        else:
            raise AssertionError(f"{bad} was accepted")
    try:
        openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
    except openai.AuthenticationError:
        pass
    else:
        raise AssertionError("a wrong API key was accepted")
    try:
        client.completions.create(model="not-this-model", prompt="x")
    except openai.NotFoundError:
        pass
    else:
        raise AssertionError("an unknown model was accepted")


if __name__ == "__main__":
    main()
