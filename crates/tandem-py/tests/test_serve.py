"""``tandem.serve`` / ``tandem.client`` as MII's users call ``mii.serve`` / ``mii.client``: a
persistent deployment in its own process, found by name from other processes, streaming,
the REST route, replicas, termination and bad arguments."""

import json
import subprocess
import sys
import textwrap
import urllib.request

import pytest

import tandem as mii
from conftest import MODEL, unique_name

GREEDY = {"do_sample": False}


def _post(url: str, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status, json.loads(r.read())


def test_generate_stream_and_terminate(deployments):
    client = deployments.serve()
    name = client.mii_config.deployment_name
    out = client.generate(["DeepSpeed is", "Seattle is"], max_new_tokens=16, **GREEDY)
    assert [r.generated_length for r in out] == [16, 16]
    assert all(r.finish_reason == "length" for r in out)
    assert client("DeepSpeed is", max_new_tokens=16, **GREEDY)[0] == out[0]

    chunks = []
    assert client.generate("DeepSpeed is", streaming_fn=chunks.append, max_new_tokens=16, **GREEDY) is None
    assert all(len(c) == 1 for c in chunks)
    reasons = [c[0].finish_reason for c in chunks]
    assert all(r == "none" for r in reasons[:-1]) and reasons[-1] == "length"
    assert "".join(c[0].generated_text for c in chunks) == out[0].generated_text

    full = client.generate("DeepSpeed is", max_new_tokens=4, return_full_text=True, **GREEDY)[0]
    assert full.generated_text.startswith("DeepSpeed is")

    with pytest.raises(RuntimeError, match="single prompt"):
        client.generate(["a", "b"], streaming_fn=print)
    with pytest.raises(mii.ValidationError, match="top_p"):
        client.generate("x", top_p=2.0)
    with pytest.raises(mii.ValidationError, match="bogus"):
        client.generate("x", bogus=1)
    with pytest.raises(mii.ValidationError, match="max_length"):
        client.generate("one two three four five", max_length=2)

    # Another process finds the deployment by name and generates the same text.
    script = textwrap.dedent(
        f"""
        import tandem
        c = tandem.client({name!r})
        print(c.generate("DeepSpeed is", max_new_tokens=16, do_sample=False)[0].generated_text, end="")
        """
    )
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert other.returncode == 0, other.stderr
    assert other.stdout == out[0].generated_text

    client.terminate_server()
    with pytest.raises(mii.DeploymentNotFoundError):
        mii.client(name)


def test_tensor_parallel(deployments):
    # Two rank processes (the reference model's 3 KV heads split 2 + 1); greedy and repeatable.
    client = deployments.serve(tensor_parallel=2)
    out = client.generate(["DeepSpeed is", "Seattle is"], max_new_tokens=8, **GREEDY)
    assert [r.generated_length for r in out] == [8, 8]
    assert client.generate("Seattle is", max_new_tokens=8, **GREEDY)[0].generated_text == out[1].generated_text


def test_rest_route_and_replicas(deployments):
    client = deployments.serve(enable_restful_api=True, replica_num=2)
    cfg = client.mii_config
    assert cfg.enable_restful_api and cfg.restful_api_port
    base = f"http://127.0.0.1:{cfg.restful_api_port}"
    status, body = _post(f"{base}/mii/{cfg.deployment_name}", {"prompts": ["DeepSpeed is", "Seattle is"], "max_length": 128})
    assert status == 200 and len(body) == 2
    for r in body:
        assert r["generated_text"] and r["finish_reason"] in ("stop", "length")
        assert r["prompt_length"] + r["generated_length"] <= 128
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as m:
        assert "tandem_replicas_up 2" in m.read().decode()
    # Both replicas answer alike.
    outs = {client.generate("Seattle is", max_new_tokens=8, **GREEDY)[0].generated_text for _ in range(4)}
    assert len(outs) == 1


def test_client_by_model_name(deployments):
    name = mii.api._native.default_deployment_name(MODEL)
    assert name == f"{MODEL}-mii-deployment"
    try:
        mii.client(MODEL)
        pytest.skip("a default deployment of the model is already running here")
    except mii.DeploymentNotFoundError:
        pass
    client = deployments.serve(deployment_name="")
    assert client.mii_config.deployment_name == name
    assert mii.client(MODEL).mii_config.deployment_name == name


def test_bad_serve_arguments():
    with pytest.raises(mii.UnknownArgument):
        mii.serve(MODEL, no_such_field=3)
    with pytest.raises(mii.UnknownArgument):
        mii.serve(MODEL, mii_config={"bogus": 1})
    with pytest.raises(ValueError, match="deployment_type"):
        mii.serve(MODEL, deployment_type="aml")
    with pytest.raises(RuntimeError, match="KV heads"):
        mii.serve(MODEL, tensor_parallel=64, deployment_name=unique_name("tp"), port_number=0)
    with pytest.raises(mii.DeploymentNotFoundError):
        mii.client(unique_name("nobody"))
