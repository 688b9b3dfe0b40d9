"""``tandem.pipeline`` as MII's users call ``mii.pipeline``: prompts, every generate option,
validation, lifecycle, the GIL and Ctrl-C."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import tandem
import tandem as mii
from tandem import GenerationFinishReason, Response

GREEDY = {"do_sample": False}


def test_single_prompt(pipe):
    out = pipe("DeepSpeed is", max_new_tokens=8, **GREEDY)
    assert isinstance(out, list) and len(out) == 1
    r = out[0]
    assert isinstance(r, Response)
    assert r.generated_length == 8 and r.finish_reason == GenerationFinishReason.LENGTH
    assert r.prompt_length == len(pipe._engine.tokenize("DeepSpeed is"))
    assert str(r) == r.generated_text and repr(r) == r.generated_text
    assert r.to_msg_dict() == {
        "generated_text": r.generated_text,
        "prompt_length": r.prompt_length,
        "generated_length": 8,
        "finish_reason": "length",
    }


def test_several_prompts_in_order(pipe):
    prompts = ["DeepSpeed is", "Seattle is", "The capital of France is"]
    together = pipe(prompts, max_new_tokens=12, **GREEDY)
    assert [r.prompt_length for r in together] == [len(pipe._engine.tokenize(p)) for p in prompts]
    assert all(r.generated_length == 12 for r in together)
    assert together[2].generated_text.strip().startswith("Paris")


def test_length_options(pipe):
    r = pipe("Once upon a time", max_new_tokens=5, **GREEDY)[0]
    assert (r.generated_length, r.finish_reason) == (5, "length")
    plen = r.prompt_length
    r = pipe("Once upon a time", max_length=plen + 3, **GREEDY)[0]
    assert (r.generated_length, r.finish_reason) == (3, "length")
    # max_length takes precedence over max_new_tokens.
    r = pipe("Once upon a time", max_length=plen + 2, max_new_tokens=10, **GREEDY)[0]
    assert r.generated_length == 2


def test_eos_options(pipe):
    # A question the model answers briefly and then ends at every SIMD level (open-ended
    # prompts such as "Say hi." end or ramble depending on near-ties in the kernels' rounding).
    chat = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    r = pipe(chat, max_new_tokens=64, **GREEDY)[0]
    assert r.finish_reason == "stop" and r.generated_length < 64
    stopped_at = r.generated_length
    r = pipe(chat, max_new_tokens=stopped_at + 5, ignore_eos=True, **GREEDY)[0]
    assert (r.generated_length, r.finish_reason) == (stopped_at + 5, "length")
    r = pipe(chat, max_new_tokens=stopped_at + 5, min_new_tokens=stopped_at + 3, **GREEDY)[0]
    assert r.generated_length >= stopped_at + 3


def test_sampling_options(pipe):
    p = "The best thing about Rust is"
    greedy = pipe(p, max_new_tokens=10, **GREEDY)[0]
    assert pipe(p, max_new_tokens=10, top_k=1)[0] == greedy
    a = pipe(p, max_new_tokens=10, seed=7, temperature=1.3, top_p=0.95)[0]
    b = pipe(p, max_new_tokens=10, seed=7, temperature=1.3, top_p=0.95)[0]
    assert a == b
    outs = {pipe(p, max_new_tokens=10, seed=s, temperature=1.5, top_p=1.0)[0].generated_text for s in range(4)}
    assert len(outs) > 1
    r = pipe(p, max_new_tokens=10, repetition_penalty=1.3, **GREEDY)[0]
    assert r.generated_length == 10


def test_stop_and_full_text(pipe):
    p = "The capital of France is"
    full = pipe(p, max_new_tokens=8, return_full_text=True, **GREEDY)[0]
    assert full.generated_text.startswith(p)
    plain = pipe(p, max_new_tokens=8, **GREEDY)[0]
    assert full.generated_text == p + plain.generated_text
    r = pipe(p, max_new_tokens=8, stop=".", **GREEDY)[0]
    assert r.finish_reason == "stop" and "." not in r.generated_text
    assert plain.generated_text.startswith(r.generated_text)
    assert pipe(p, max_new_tokens=8, stop=["."], **GREEDY)[0] == r


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": "high"}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"temperature": -1.0}, "temperature"),
        ({"max_new_tokens": -3}, "max_new_tokens"),
        ({"do_sample": "yes"}, "do_sample"),
        ({"stop": [1, 2]}, "stop"),
        ({"max_tokens": 5}, "max_tokens"),
    ],
)
def test_bad_generate_options_name_the_option(pipe, kwargs, option):
    with pytest.raises(tandem.ValidationError, match=option):
        pipe("Hello", **kwargs)


def test_max_length_must_exceed_the_prompt(pipe):
    n = len(pipe._engine.tokenize("one two three four"))
    with pytest.raises(tandem.ValidationError, match="max_length"):
        pipe("one two three four", max_length=n)


def test_unknown_pipeline_arguments():
    with pytest.raises(mii.errors.UnknownArgument):
        mii.pipeline("SmolLM2-135M-Instruct", no_such_field=1)
    with pytest.raises(ValueError, match="inference_engine_config"):
        mii.pipeline("SmolLM2-135M-Instruct", inference_engine_config={"bogus": 1})
    with pytest.raises(RuntimeError, match="KV heads"):
        mii.pipeline("SmolLM2-135M-Instruct", tensor_parallel=64)
    with pytest.raises(RuntimeError):
        mii.pipeline("/no/such/model.gguf")


def test_tensor_parallel_pipeline():
    # Rank 1 is a `python -m tandem tp-rank` process; the ranks add the one rank's sums in
    # the same parts and order, so the sharded output is the one-rank output.
    config = {"num_blocks": 64}
    one = mii.pipeline("SmolLM2-135M-Instruct", inference_engine_config=config)
    two = mii.pipeline("SmolLM2-135M-Instruct", tensor_parallel=2, inference_engine_config=config)
    prompts = ["DeepSpeed is", "Seattle is"]
    want = [r.generated_text for r in one(prompts, max_new_tokens=8, do_sample=False)]
    assert [r.generated_text for r in two(prompts, max_new_tokens=8, do_sample=False)] == want
    one.destroy()
    two.destroy()


def test_destroy():
    p = mii.pipeline("SmolLM2-135M-Instruct", inference_engine_config={"num_blocks": 64})
    assert p("Hi", max_new_tokens=2, do_sample=False)[0].generated_length == 2
    p.destroy()
    with pytest.raises(RuntimeError, match="destroyed"):
        p("Hi")
    p.destroy()  # idempotent


def test_gil_is_released_while_generating(pipe):
    counter = [0]
    done = threading.Event()

    def spin():
        while not done.is_set():
            counter[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    before = counter[0]
    pipe("Tell me a long story.", max_new_tokens=48, ignore_eos=True, **GREEDY)
    during = counter[0] - before
    done.set()
    t.join()
    assert during > 10_000, f"the Python thread barely ran ({during} increments)"


def test_ctrl_c_interrupts_a_long_call():
    script = textwrap.dedent(
        """
        import signal, sys, time
        import tandem
        # As at a terminal: a parent started in the background (CI under nohup, `cmd &`) hands
        # its children SIGINT ignored, and then no Ctrl-C reaches Python at all.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        pipe = tandem.pipeline("SmolLM2-135M-Instruct")
        print("ready", flush=True)
        t = time.time()
        try:
            pipe("Write forever:", max_new_tokens=100000, max_length=8192, ignore_eos=True, do_sample=False)
            print("finished", flush=True)
        except KeyboardInterrupt:
            print(f"interrupted {time.time() - t:.2f}", flush=True)
            pipe("Hi", max_new_tokens=2, do_sample=False)
            print("still works", flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(1.5)
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 10
    lines = out.split("\n")
    assert lines[0].startswith("interrupted"), out
    assert "still works" in out
    assert proc.returncode == 0
