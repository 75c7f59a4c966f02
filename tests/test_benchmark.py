"""The benchmark runs on CPU in seconds and prints one JSON object (figures live in BENCHMARKS.md)."""

from __future__ import annotations

import json

from benchmarks.step import main


def test_benchmark_json(capsys):
    main(["--device", "cpu", "--preset", "tiny", "--sessions", "1,3", "--ticks", "3", "--warmup", "1", "--repeats", "1", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert [r["sessions"] for r in result["rows"]] == [1, 3] and [r["bucket"] for r in result["rows"]] == [1, 3]
    for row in result["rows"]:
        assert row["median_ms"] > 0 and row["p99_ms"] >= row["median_ms"] and row["naive_median_ms"] > 0
    assert result["time_to_first_audio"]["prefill_ms"] > 0 and result["cuda_graphs"] is False


def test_the_op_count_of_a_tick_runs_on_cpu_and_the_tick_never_reads_the_device(capsys):
    main(["--count-ops", "--sessions", "1", "--no-compile", "--json"])  # compiled: tests/test_compile.py
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["path"] == "eager"
    assert row["host_syncs"] == 0  # no .item() / .cpu() inside a tick: it could not be a CUDA graph
    assert row["ops"] == sum(row["by_part"].values()) and {"temporal transformer", "depformer", "sampling"} <= set(row["by_part"])


def test_the_attention_benchmark_times_both_routes_on_cpu(capsys):
    from benchmarks.attention import main as attention

    attention(["--sessions", "1", "--fills", "0.03,1", "--reps", "2", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert [r["filled"] for r in result["rows"]] == [90, 3000]
    assert all(r["masked_ms"] > 0 and r["prefix_ms"] > 0 for r in result["rows"])
