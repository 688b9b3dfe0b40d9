#!/usr/bin/env python3
"""Compatibility check: Python gRPC stubs generated from MII's modelresponse.proto against
`tandem serve`, the way MII's own client calls it.

Installs grpcio + grpcio-tools into a venv under $TANDEM_HOME (default ~/.cache/tandem/compat-grpc-venv)
the first time, generates the stubs from crates/tandem-server/proto/modelresponse.proto (MII's
proto, verbatim), starts `tandem serve` on free 127.0.0.1 ports, then checks GeneratorReply
(options in query_kwargs, typed as MII's kwarg_dict_to_proto types them), GeneratorReplyStream,
INVALID_ARGUMENT on bad options, and that Terminate stops the deployment.
Usage: python3 scripts/compat_grpc.py        (exits non-zero on the first failure)
"""
import os, pathlib, socket, subprocess, sys, tempfile, time, venv

ROOT = pathlib.Path(__file__).resolve().parent.parent
HOME = pathlib.Path(os.environ.get("TANDEM_HOME") or pathlib.Path.home() / ".cache" / "tandem")
VENV = HOME / "compat-grpc-venv"
PROTO = ROOT / "crates/tandem-server/proto"


def ensure_grpc():
    py = VENV / "bin" / "python"
    if not py.exists():
        venv.create(VENV, with_pip=True)
    if subprocess.run([py, "-c", "import grpc, grpc_tools"], capture_output=True).returncode != 0:
        subprocess.check_call([py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "grpcio", "grpcio-tools"])
    return py


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    py = ensure_grpc()
    if os.environ.get("TANDEM_COMPAT_INNER") != "1":
        sys.exit(subprocess.call([py, __file__], env=dict(os.environ, TANDEM_COMPAT_INNER="1")))
    out = tempfile.mkdtemp(prefix="tandem-grpc-stubs-")
    subprocess.check_call([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO}", f"--python_out={out}",
                           f"--grpc_python_out={out}", str(PROTO / "modelresponse.proto")])
    sys.path.insert(0, out)
    subprocess.check_call(["cargo", "build", "--release", "-q", "--bin", "tandem"], cwd=ROOT)
    port = free_port()
    server = subprocess.Popen([ROOT / "target/release/tandem", "serve", "--port", str(port), "--no-restful-api"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        run_checks(port, server)
    finally:
        if server.poll() is None:
            server.kill()
    print("MII gRPC stub compatibility: all checks passed")


def kwargs_to_proto(pb, kwargs):
    """MII's kwarg_dict_to_proto: each option typed by its Python type."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, bool):
            out[k] = pb.Value(bvalue=v)
        elif isinstance(v, int):
            out[k] = pb.Value(ivalue=v)
        elif isinstance(v, float):
            out[k] = pb.Value(fvalue=v)
        elif isinstance(v, str):
            out[k] = pb.Value(svalue=v)
        else:
            raise TypeError(k)
    return out


def run_checks(port, server):
    import grpc
    import modelresponse_pb2 as pb
    import modelresponse_pb2_grpc as pbg
    from google.protobuf import empty_pb2

    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[
        ("grpc.max_send_message_length", 2**27), ("grpc.max_receive_message_length", 2**27)])
    grpc.channel_ready_future(channel).result(timeout=120)
    stub = pbg.ModelResponseStub(channel)

    req = pb.MultiStringRequest(request=["The capital of France is", "def fibonacci(n):"],
                                query_kwargs=kwargs_to_proto(pb, {"max_new_tokens": 8, "do_sample": False}))
    r = stub.GeneratorReply(req)
    assert len(r.response) == 2 and r.response[0].finish_reason == "length", r
    assert r.response[0].generated_tokens == 8 and r.response[0].prompt_tokens == 5, r
    print("GeneratorReply:", [x.response for x in r.response])

    one = pb.MultiStringRequest(request=["The capital of France is"],
                                query_kwargs=kwargs_to_proto(pb, {"max_new_tokens": 8, "do_sample": False}))
    msgs = [m.response[0] for m in stub.GeneratorReplyStream(one)]
    assert msgs[-1].finish_reason == "length" and msgs[-1].response == "", msgs[-1]
    assert all(m.finish_reason == "none" for m in msgs[:-1])
    assert "".join(m.response for m in msgs[:-1]) == r.response[0].response

    sampled = pb.MultiStringRequest(request=["Once upon a time"], query_kwargs=kwargs_to_proto(
        pb, {"max_new_tokens": 10, "top_p": 0.9, "temperature": 0.8, "seed": 3, "stop": "\n"}))
    assert stub.GeneratorReply(sampled).response[0].finish_reason in ("stop", "length")

    for bad in [{"bogus": 1}, {"top_p": 2.0}, {"max_new_tokens": "many"}]:
        try:
            stub.GeneratorReply(pb.MultiStringRequest(request=["x"], query_kwargs=kwargs_to_proto(pb, bad)))
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
        else:
            raise AssertionError(f"{bad} was accepted")

    stub.Terminate(empty_pb2.Empty())
    server.wait(timeout=30)
    assert server.returncode == 0, server.returncode


if __name__ == "__main__":
    main()
