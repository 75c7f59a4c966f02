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


def test_the_attention_benchmark_times_both_routes_on_cpu_and_writes_each_row_as_measured(capsys, tmp_path):
    from benchmarks.attention import main as attention

    rows = tmp_path / "rows.jsonl"
    attention(["--sessions", "1", "--fills", "0.03,1", "--reps", "2", "--json", "--rows", str(rows)])
    result = json.loads(capsys.readouterr().out)
    lines = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [line["row"] for line in lines] == ["setup", "attention", "attention"] and lines[0]["heads"] == 32
    assert [line["filled"] for line in lines[1:]] == [r["filled"] for r in result["rows"]] == [90, 3000]
    assert all(r["masked_ms"] > 0 and r["prefix_ms"] > 0 for r in result["rows"])
    assert all(0 < r["masked_kernel_ms"] and 0 < r["prefix_kernel_ms"] for r in result["rows"])  # by the profiler


def test_the_benchmarks_and_the_engine_run_without_the_audio_and_web_packages(tmp_path):
    """A GPU machine lent for a few minutes may have torch and little else: the engine, the step
    and attention benchmarks import none of PyAV, soxr, pyloudnorm, sphn, gradio or fastrtc."""
    import subprocess
    import sys

    from .helpers import ROOT

    blocked = ("av", "soxr", "pyloudnorm", "sphn", "gradio", "fastrtc")
    script = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None  # import name -> ImportError\n"
        "from benchmarks.step import main as step\n"
        "from benchmarks.attention import main as attention\n"
        "import personaplex, personaplex.runtime.engine, personaplex.runtime.worker, personaplex.runtime.session\n"
        "step(['--device', 'cpu', '--preset', 'tiny', '--sessions', '1', '--ticks', '2', '--warmup', '1', '--repeats', '1',"
        " '--json'])\n"
        "attention(['--sessions', '1', '--fills', '1', '--reps', '1', '--json'])\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=str(ROOT), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


def test_the_gpu_script_help_prints_its_usage_and_runs_nothing():
    import subprocess

    from .helpers import ROOT

    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--help"], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0 and "--quick" in run.stdout and "== " not in run.stdout  # no step ran
    bad = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--bogus"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown option" in bad.stderr


def test_the_step_benchmark_writes_each_figure_as_it_is_measured_and_a_run_cut_short_keeps_them(tmp_path):
    import subprocess
    import sys
    import time

    from .helpers import ROOT

    rows = tmp_path / "rows.jsonl"
    main(["--device", "cpu", "--preset", "tiny", "--sessions", "1,2", "--ticks", "3", "--warmup", "1", "--repeats", "1",
          "--rows", str(rows)])
    kinds = [json.loads(line)["row"] for line in rows.read_text().splitlines()]
    assert kinds == ["engine", "tick", "tick", "time_to_first_audio", "full_rings"]  # the engine's start first
    engine = json.loads(rows.read_text().splitlines()[0])
    assert engine["start_s"] >= 0 and engine["compiled"] is False

    cut = tmp_path / "cut.jsonl"  # a long run, stopped as a lease's time limit stops it
    run = subprocess.Popen([sys.executable, "-m", "benchmarks.step", "--device", "cpu", "--preset", "tiny", "--sessions",
                            "1,2,3,4", "--ticks", "3000", "--rows", str(cut)], cwd=str(ROOT))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not cut.exists() or '"row": "tick"' not in cut.read_text()):
        time.sleep(0.2)
    run.kill()
    run.wait()
    kept = [json.loads(line)["row"] for line in cut.read_text().splitlines()]
    assert kept[:2] == ["engine", "tick"]
