"""A real Prometheus scrapes a real `mars serve` under a short agentic load (sessions of chat
calls and a tool run), and the PromQL of vLLM's published Grafana dashboard
(`examples/online_serving/prometheus_grafana/grafana.json`) and of every panel of
`deploy/grafana/mars.json` returns data."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "llama_cpp",
    reason="llama-cpp-python is not importable: run ./scripts/setup.sh --dev",
    exc_type=ImportError,
)
import httpx

from serving import ROOT, free_port, serve

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "mars.json"
M = 'model_name="$model_name"'
R = "$__rate_interval"


def hq(p: float, name: str) -> str:
    return f"histogram_quantile({p}, sum by(le) (rate({name}_bucket{{{M}}}[{R}])))"


def mean(name: str) -> str:
    return f"rate({name}_sum{{{M}}}[{R}])\n/\nrate({name}_count{{{M}}}[{R}])"


# vLLM's dashboard, expression for expression (its V0-only panels left out: swapped requests,
# CPU cache usage, the deprecated gpu_cache_usage_perc; max_num_generation_tokens, which needs a
# request's max_tokens the events do not carry). The KV panel reads the current name.
VLLM_PANELS = [
    *(hq(p, "vllm:e2e_request_latency_seconds") for p in (0.99, 0.95, 0.9, 0.5)),
    mean("vllm:e2e_request_latency_seconds"),
    f"rate(vllm:prompt_tokens_total{{{M}}}[{R}])",
    f"rate(vllm:generation_tokens_total{{{M}}}[{R}])",
    *(hq(p, "vllm:time_per_output_token_seconds") for p in (0.99, 0.95, 0.9, 0.5)),
    mean("vllm:time_per_output_token_seconds"),
    hq(0.99, "vllm:inter_token_latency_seconds"),
    f"vllm:num_requests_running{{{M}}}",
    f"vllm:num_requests_waiting{{{M}}}",
    *(hq(p, "vllm:time_to_first_token_seconds") for p in (0.99, 0.95, 0.9, 0.5)),
    mean("vllm:time_to_first_token_seconds"),
    f"vllm:kv_cache_usage_perc{{{M}}}",
    f"sum by(le) (increase(vllm:request_prompt_tokens_bucket{{{M}}}[{R}]))",
    f"sum by(le) (increase(vllm:request_generation_tokens_bucket{{{M}}}[{R}]))",
    f"sum by(finished_reason) (increase(vllm:request_success_total{{{M}}}[{R}]))",
    f"rate(vllm:request_queue_time_seconds_sum{{{M}}}[{R}])",
    f"rate(vllm:request_prefill_time_seconds_sum{{{M}}}[{R}])",
    f"rate(vllm:request_decode_time_seconds_sum{{{M}}}[{R}])",
    f"rate(vllm:prefix_cache_hits_total{{{M}}}[{R}])\n/\n"
    f"rate(vllm:prefix_cache_queries_total{{{M}}}[{R}])",
    f"rate(vllm:num_preemptions_total{{{M}}}[{R}])",
]
# Finite, not only present: the load happened between two scrapes.
FINITE = ("time_to_first_token", "e2e_request_latency", "prompt_tokens_total", "session_latency")


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def query(prom: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200, f"{expr}: {r.text}"
    body = r.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    names = {v["name"] for v in dash["templating"]["list"]}
    assert names == {"DS_PROMETHEUS", "model_name"}
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${DS_PROMETHEUS}"
    return exprs


def session(base: str, sid: str) -> None:
    """Two chat turns (the second ends an inferred tool phase) and, between them, a tool run."""
    messages = [{"role": "user", "content": f"Say hello to {sid}."}]
    for turn in range(2):
        body = {"messages": messages, "max_tokens": 8, "min_tokens": 8, "ignore_eos": True}
        r = httpx.post(f"{base}/v1/chat/completions", json=body,
                       headers={"x-session-id": sid}, timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text
        messages += [r.json()["choices"][0]["message"], {"role": "user", "content": "More."}]
        if turn == 0:
            tool = {"command": "echo hi", "timeout_s": 10}
            t = httpx.post(f"{base}/v1/sessions/{sid}/tools", json=tool, timeout=30)
            assert t.status_code == 200, t.text
    assert httpx.delete(f"{base}/v1/sessions/{sid}", timeout=30).status_code == 200


def test_prometheus_scrapes_mars_and_the_dashboards_have_data(tmp_path: Path) -> None:
    if not Path(PROMETHEUS).exists():
        pytest.skip("no Prometheus server (/usr/bin/prometheus): apt-get install prometheus")
    exprs = dashboard_exprs()
    server = serve("--policy", "mars", "--unsafe-tools")
    base = next(server)
    port = free_port()
    prom = f"http://127.0.0.1:{port}"
    target = base.removeprefix("http://")
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: mars\n    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]

        def scraped(expr: str) -> bool:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                return any(float(s["value"][1]) >= 1 for s in query(prom, expr))
            except httpx.HTTPError:  # not listening yet
                return False

        wait_for(lambda: scraped('up{job="mars"}'), "Prometheus to scrape mars serve")
        threads = [threading.Thread(target=session, args=(base, f"s{i}")) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        done = f'mars:sessions_finished_total{{outcome="done",model_name="{model}"}} >= 3'
        wait_for(lambda: bool(query(prom, done)), "the load's last scrape")
        time.sleep(2)  # two more scrapes: rate() over the load's increase
        empty, infinite = [], []
        for expr in VLLM_PANELS + exprs:
            promql = expr.replace("$model_name", model).replace("$__rate_interval", "1m")
            result = query(prom, promql)
            if not result:
                empty.append(promql)
            elif any(k in promql for k in FINITE) and not all(
                math.isfinite(float(s["value"][1])) for s in result
            ):
                infinite.append(promql)
        assert not empty, "no data for:\n" + "\n".join(empty)
        assert not infinite, "no finite value for:\n" + "\n".join(infinite)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        server.close()
