"""The analytic cost model against steps worked out by hand, its invariants, presets and CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mars.core.errors import UsageError
from mars.sim.costmodel import (
    GPUS,
    MODELS,
    CostModel,
    GPUSpec,
    StepCostModel,
    batch_totals,
    load_model_shape,
    resolve_gpu,
    resolve_model,
)
from mars.sim.costmodel_cli import add_costmodel_parser

H100 = GPUS["h100"]
LLAMA = MODELS["llama-3.1-8b"]
QWEN = MODELS["qwen3-coder-30b-a3b"]

# Llama-3.1-8B by hand: attention 4096*4096 + 2*4096*(8*128) + 4096*4096, MLP 3*4096*14336.
LLAMA_LAYER = 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096 + 3 * 4096 * 14336
LLAMA_LM_HEAD = 128256 * 4096
LLAMA_KV_PER_TOKEN = 2 * 32 * 8 * 128 * 2
LLAMA_ATTN_PER_PAIR = 4 * 32 * 32 * 128
# H100 SXM roofline rates with the default efficiencies (989 TFLOP/s x 0.6, 3.35 TB/s x 0.8).
FLOPS_RATE = 989e12 * 0.6
BYTES_RATE = 3.35e12 * 0.8


def by_hand(flops: float, bytes_: float) -> float:
    return max(flops / FLOPS_RATE, bytes_ / BYTES_RATE) + 1e-3


def test_llama_prefill_1024_matches_hand_computation() -> None:
    step = CostModel(H100, LLAMA).predict([(1024, 0)])
    pairs = 1024 * 1025 // 2  # token i of the prompt attends to i keys
    flops = 2 * 32 * LLAMA_LAYER * 1024 + 2 * LLAMA_LM_HEAD + LLAMA_ATTN_PER_PAIR * pairs
    weights = (32 * LLAMA_LAYER + LLAMA_LM_HEAD) * 2
    kv = LLAMA_KV_PER_TOKEN * (1024 + 1024)  # attention reads the 1024 new keys, then writes them
    assert step.flops == pytest.approx(flops, rel=1e-12)
    assert step.weight_bytes == pytest.approx(weights, rel=1e-12)
    assert step.kv_bytes == pytest.approx(kv, rel=1e-12)
    assert step.step_s == pytest.approx(by_hand(flops, weights + kv), rel=1e-12)
    assert step.compute_bound
    assert 0.015 < step.step_s < 0.035  # ~15 TFLOP at ~590 TFLOP/s


def test_llama_decode_batch_8_at_context_2000_matches_hand_computation() -> None:
    step = CostModel(H100, LLAMA).predict([(1, 2000)] * 8)
    flops = 2 * 32 * LLAMA_LAYER * 8 + 2 * LLAMA_LM_HEAD * 8 + LLAMA_ATTN_PER_PAIR * 8 * 2001
    weights = (32 * LLAMA_LAYER + LLAMA_LM_HEAD) * 2
    kv = LLAMA_KV_PER_TOKEN * (8 * 2001 + 8)
    assert step.flops == pytest.approx(flops, rel=1e-12)
    assert step.bytes_moved == pytest.approx(weights + kv, rel=1e-12)
    assert step.step_s == pytest.approx(by_hand(flops, weights + kv), rel=1e-12)
    assert not step.compute_bound
    assert step.overhead_s == 1e-3


def test_expected_distinct_experts() -> None:
    cost = CostModel(H100, QWEN)
    assert cost.expected_experts(1) == pytest.approx(8)
    assert cost.expected_experts(8) == pytest.approx(128 * (1 - (120 / 128) ** 8))
    assert cost.expected_experts(10_000) == pytest.approx(128)
    assert CostModel(H100, LLAMA).expected_experts(64) == 0
    # The step reads exactly that many experts per layer, 48 layers, 3*2048*768 params of 2 bytes.
    one, eight = cost.predict([(1, 0)]), cost.predict([(1, 0)] * 8)
    expert_bytes = 48 * 3 * 2048 * 768 * 2
    extra = (cost.expected_experts(8) - 8) * expert_bytes
    assert eight.weight_bytes - one.weight_bytes == pytest.approx(extra, rel=1e-9)


def test_moe_batch_1_decode_reads_active_weights_not_all() -> None:
    step = CostModel(H100, QWEN).predict([(1, 0)])
    assert step.bytes_moved == pytest.approx(6.6e9, rel=0.2)
    assert step.bytes_moved < QWEN.weight_bytes / 5


def test_preset_shapes() -> None:
    assert QWEN.total_params == pytest.approx(30.5e9, rel=0.01)
    assert QWEN.active_params == pytest.approx(3.3e9, rel=0.03)
    assert QWEN.kv_bytes_per_token == 96 * 1024
    assert LLAMA.total_params == LLAMA.active_params == 32 * LLAMA_LAYER + 2 * LLAMA_LM_HEAD
    assert LLAMA.kv_bytes_per_token == 128 * 1024
    oss = MODELS["gpt-oss-120b"]
    assert oss.total_params == pytest.approx(116.8e9, rel=0.01)
    assert oss.active_params - oss.embedding_params == pytest.approx(5.1e9, rel=0.02)
    assert oss.weight_bytes == pytest.approx(60.8 * 2**30, rel=0.03)  # the MXFP4 checkpoint
    assert set(GPUS) == {"h100", "h100-nvl", "h200"}
    assert set(MODELS) == {"qwen3-coder-30b-a3b", "llama-3.1-8b", "gpt-oss-120b"}


@pytest.mark.parametrize("gpu", sorted(GPUS))
@pytest.mark.parametrize("model", sorted(MODELS))
def test_kv_capacity_of_every_preset(gpu: str, model: str) -> None:
    spec, shape = GPUS[gpu], MODELS[model]
    cost = CostModel(spec, shape)
    free = 0.9 * spec.memory_bytes - shape.weight_bytes
    assert cost.kv_capacity_tokens == int(free / shape.kv_bytes_per_token)
    assert cost.kv_capacity_tokens > 50_000
    assert CostModel(spec, shape, kv_scale=0.5).kv_capacity_tokens == pytest.approx(
        cost.kv_capacity_tokens / 2, abs=1
    )


def test_kv_capacity_sanity_qwen_on_h100() -> None:
    # 0.9 * 80 GB - 61 GB of bf16 weights = ~11 GB, at 96 KiB per token.
    assert CostModel(H100, QWEN).kv_capacity_tokens == pytest.approx(11e9 / 98304, rel=0.02)


def test_model_that_does_not_fit_is_a_clear_error() -> None:
    small = dataclasses.replace(H100, name="small", memory_bytes=40 * 10**9)
    with pytest.raises(ValueError, match=r"gpt-oss-120b does not fit on gpu small"):
        CostModel(small, MODELS["gpt-oss-120b"])
    with pytest.raises(ValueError, match="kv_scale"):
        CostModel(H100, LLAMA, kv_scale=0)


batches = st.lists(
    st.tuples(st.integers(1, 4096), st.integers(0, 100_000)), min_size=1, max_size=40
)


@settings(max_examples=200, deadline=None)
@given(batch=batches, model=st.sampled_from(sorted(MODELS)), gpu=st.sampled_from(sorted(GPUS)))
def test_predict_agrees_with_totals_and_fast_path(
    batch: list[tuple[int, int]], model: str, gpu: str
) -> None:
    cost: StepCostModel = CostModel(GPUS[gpu], MODELS[model])
    totals = batch_totals(batch)
    step = cost.predict(batch)
    assert step == cost.predict_totals(*totals)
    assert step.step_s == cost.step_seconds(*totals)  # bit for bit
    assert step.step_s == max(step.compute_s, step.memory_s) + step.overhead_s


@settings(max_examples=200, deadline=None)
@given(batch=batches, extra=st.tuples(st.integers(1, 4096), st.integers(0, 100_000)))
def test_bigger_batch_or_longer_context_is_never_faster(
    batch: list[tuple[int, int]], extra: tuple[int, int]
) -> None:
    for model in MODELS.values():
        cost = CostModel(H100, model)
        base = cost.predict(batch).step_s
        assert cost.predict([*batch, extra]).step_s >= base
        longer = [(new, ctx + extra[1]) for new, ctx in batch]
        assert cost.predict(longer).step_s >= base


def test_batch_totals_and_edge_cases() -> None:
    assert batch_totals([(3, 10), (1, 5)]) == (2, 4, 3 * 10 + 6 + 5 + 1, 13 + 6)
    cost = CostModel(H100, LLAMA)
    assert cost.predict([]).step_s == 0 == cost.step_seconds(0, 0, 0, 0)
    with pytest.raises(ValueError, match="new_tokens must be >= 1"):
        cost.predict([(0, 5)])
    with pytest.raises(ValueError, match="num_seqs <= new_tokens"):
        cost.predict_totals(3, 2, 0, 0)
    assert cost.transfer_seconds(1000) == pytest.approx(1000 * 131072 / 55e9)
    assert cost.max_model_len == 131072


def test_shape_file_round_trip(tmp_path: Path) -> None:
    for shape in MODELS.values():
        path = tmp_path / f"{shape.name}.json"
        path.write_text(json.dumps(dataclasses.asdict(shape)))
        assert load_model_shape(path) == shape
        assert resolve_model(str(path)) == shape
    minimal = {k: v for k, v in dataclasses.asdict(LLAMA).items() if k != "name"}
    for key in ("num_experts", "num_active_experts", "moe_intermediate_size", "kv_bytes_per_elem"):
        minimal.pop(key)
    path = tmp_path / "my-llama.json"
    path.write_text(json.dumps(minimal))
    assert load_model_shape(path) == dataclasses.replace(LLAMA, name="my-llama")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"hidden_size": 1}', "missing field 'num_layers'"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ("LLAMA|num_heads=0", "field 'num_heads' must be >= 1, got 0"),
        ('LLAMA|num_layers="32"', "field 'num_layers' must be of type int, got '32'"),
        ("LLAMA|num_layers=true", "field 'num_layers' must be of type int"),
        ("LLAMA|weight_bytes_per_param=NaN", "'weight_bytes_per_param' must be > 0"),
        ("LLAMA|layers=32", "unknown field 'layers'"),
        ("LLAMA|num_experts=8", "'num_active_experts' must be between 1 and num_experts"),
    ],
)
def test_shape_file_errors_name_file_field_and_required_fields(
    tmp_path: Path, content: str, problem: str
) -> None:
    if content.startswith("LLAMA|"):
        key, value = content[6:].split("=")
        raw = dataclasses.asdict(LLAMA) | {key: json.loads(value)}
        content = json.dumps(raw)
    path = tmp_path / "shape.json"
    path.write_text(content)
    with pytest.raises(ValueError) as info:
        load_model_shape(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and problem in message
    assert "required integer fields: num_layers, hidden_size" in message


def test_shape_values_are_checked_on_construction() -> None:
    with pytest.raises(ValueError, match="'num_kv_heads' must be >= 1"):
        dataclasses.replace(LLAMA, num_kv_heads=0)


def test_unknown_names_list_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"gpt-oss-120b, llama-3\.1-8b, qwen3-coder-30b-a3b"):
        resolve_model("llama-70b")
    with pytest.raises(ValueError, match="cannot read it"):
        resolve_model(str(tmp_path / "absent.json"))
    with pytest.raises(ValueError, match="h100, h100-nvl, h200"):
        resolve_gpu("a100")
    assert isinstance(resolve_gpu("h200"), GPUSpec)


def cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mars")
    add_costmodel_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["costmodel", *argv])


def test_cli_json_is_one_object(capsys: pytest.CaptureFixture[str]) -> None:
    args = cli("--gpu", "h100", "--model", "llama-3.1-8b", "--decode", "8", "--context", "2000")
    args.json = True
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    expected = CostModel(H100, LLAMA).predict([(1, 2000)] * 8)
    assert out["step_s"] == expected.step_s and out["memory_s"] == expected.memory_s
    assert (out["gpu"], out["model"]) == ("h100", "llama-3.1-8b")
    assert out["kv_capacity_tokens"] == CostModel(H100, LLAMA).kv_capacity_tokens


def test_cli_text(capsys: pytest.CaptureFixture[str]) -> None:
    args = cli("--gpu", "h200", "--model", "qwen3-coder-30b-a3b", "--prefill", "4096")
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "compute-bound" in text and "prefill 4096 tokens" in text and "kv cache" in text


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (("--gpu", "a100", "--model", "llama-3.1-8b", "--prefill", "8"), "h100, h100-nvl, h200"),
        (("--gpu", "h100", "--model", "gpt-3", "--prefill", "8"), "llama-3.1-8b"),
        (("--gpu", "h100", "--model", "missing.json", "--prefill", "8"), "missing.json"),
        (("--gpu", "h100", "--model", "llama-3.1-8b", "--decode", "8"), "needs --context"),
    ],
)
def test_cli_bad_input_is_a_usage_error(argv: tuple[str, ...], problem: str) -> None:
    args = cli(*argv)
    with pytest.raises(UsageError, match=problem):
        args.func(args)


@pytest.mark.parametrize("bad", [("--prefill", "0"), ("--decode", "-1"), ("--kv-scale", "nan")])
def test_cli_rejects_non_positive_numbers(
    bad: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--gpu", "h100", "--model", "llama-3.1-8b", *bad]
    if bad[0] == "--kv-scale":
        argv += ["--prefill", "8"]
    with pytest.raises(SystemExit) as info:
        cli(*argv)
    assert info.value.code == 2
    assert "expected a positive" in capsys.readouterr().err
    args = cli("--gpu", "h100", "--model", "llama-3.1-8b", "--prefill", "8")
    args.prefill = 0
    with pytest.raises(UsageError, match="--prefill must be an integer >= 1"):
        args.func(args)
