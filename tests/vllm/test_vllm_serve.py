"""End to end: vLLM's OpenAI server on SmolLM2-135M with `--scheduler-cls MarsScheduler`, agent
sessions sending their markers through `vllm_xargs`. Slow (a server start, ~1 min): run by
scripts/test_vllm.sh, which converts the model first; skipped without vLLM or the model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip(
    "vllm.v1.core.sched.scheduler", reason="vLLM is not installed: run scripts/test_vllm.sh"
)
httpx = pytest.importorskip("httpx")

MODEL = Path(os.environ.get("MARS_VLLM_MODEL", Path.home() / ".cache" / "mars" / "smollm2-135m-hf"))
START_S = 300  # a cold start on 2 cores (imports, weights, KV allocation)

pytestmark = pytest.mark.skipif(
    not (MODEL / "config.json").exists(),
    reason=f"no model at {MODEL}: scripts/test_vllm.sh converts it (scripts/convert_smollm2.py)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    log = (tmp / "server.log").open("w")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
        "MARS_POLICY": "mars",
        "MARS_VLLM_EVENTS": str(tmp / "events.jsonl"),
    }
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(MODEL), "--served-model-name", "smollm2",
        "--host", "127.0.0.1", "--port", str(port),
        "--enforce-eager", "--max-model-len", "2048",
        "--scheduler-cls", "mars.vllm.scheduler.MarsScheduler",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited ({proc.returncode}):\n{_tail(tmp / 'server.log')}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM not up in {START_S} s:\n{_tail(tmp / 'server.log')}")
            time.sleep(1)
        yield base, tmp
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def _tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def complete(base: str, prompt: str, **xargs: object) -> dict:
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": 16, "temperature": 0}
    if xargs:
        body["vllm_xargs"] = xargs
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_sessions_complete_through_the_plugin(server):
    base, tmp = server
    transcripts = {}
    for sid in ("agent-a", "agent-b"):
        prompt = f"You are {sid}, a coding agent. List the files in the repository."
        out = complete(base, prompt, session_id=sid, this_func_call="bash")
        transcripts[sid] = prompt + out["choices"][0]["text"]
        assert out["usage"]["completion_tokens"] > 0
    for sid, text in transcripts.items():
        nxt = text + "\nObservation: README.md setup.py src/\nThought:"
        out = complete(base, nxt, session_id=sid, last_func_call="bash", is_last_step="true")
        assert out["choices"][0]["finish_reason"] in ("length", "stop")
    complete(base, "A call with no session metadata.")

    log = (tmp / "server.log").read_text(errors="replace")
    assert "MarsScheduler: policy mars" in log
    events = [json.loads(line) for line in (tmp / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds.count("request_emit") == 5 and kinds.count("gpu_end") == 5
    ended = [e for e in events if e["event"] == "tool_end"]
    assert {e["session_id"] for e in ended} == {"agent-a", "agent-b"}
    assert all(e["category"] == "bash" for e in ended)
    assert all(e["output_tokens"] > 0 for e in events if e["event"] == "gpu_end")
