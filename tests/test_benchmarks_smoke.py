"""The benchmark suite still runs: ``python benchmarks/run.py --smoke`` (tiny sizes, no timing).

Speed is never asserted here; this only proves that every kind of benchmark case builds,
that capsnet and the straightforward reference implementation agree, and that the report
is written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_smoke_mode(tmp_path):
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    for section in ("Routing alone", "Training step", "Inference"):
        assert section in text
    assert "smoke_matrix" in text and "smoke_capsnet" in text and "smoke_conv_em" in text


def test_models_throughput_measures_a_model():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import models_throughput
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    train, infer, params = models_throughput.measure(
        "hinton_cnn", {}, batch=4, steps=1, device="cpu"
    )
    assert train > 0 and infer > 0
    assert params == 3_274_634
    assert {name for name, _, _ in models_throughput.CASES} == {
        "capsnet", "matrix_capsnet", "sabour_cnn", "hinton_cnn"
    }  # fmt: skip


def _bench_modules():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import cases
        import contention
        import run
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return cases, contention, run


def test_contention_case_with_a_short_competitor(one_thread):
    """The contention worker times idle and loaded steps, logs the policy and reaps the
    competitor (tiny model, one thread: plumbing, not speed)."""
    C, CT, run = _bench_modules()
    case = {**C.smoke_contention_cases()[1], "repeats": 1}
    res = CT.run_case(
        case, timeit=run._timeit, competitors=1, budget_s=1.0, settle_s=0.05, late_steps=3
    )
    for phase in ("idle", "loaded"):
        med = res[phase]["median_s"]
        assert med["capsnet_default"] > 0 and med["capsnet_policy"] > 0
        assert res[phase]["policy_events"][0]["kind"] == "threads"
    (pid,) = res["competitors"]["pids"]
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped
    assert res["competitors"]["cpu_s"][0] >= 0
    late = res["late"]  # the competitor that arrives after the policy's check
    assert len(late["threads"]) == len(late["times_s"]) == 3 and late["mean_s"] > 0
    assert late["settled_threads"] == 1 and late["steps_before_move"] is None  # 1 core only
    res["case_spec"] = case
    text = "\n".join(CT.table([res, {"case": "broken", "error": "timeout", "case_spec": case}]))
    assert "smoke_contention_matrix" in text and "| broken | timeout |" in text
    assert "| smoke_contention_matrix | 1 | never | 3 |" in text


def test_competitor_exits_by_itself():
    _, CT, _ = _bench_modules()
    proc = subprocess.run([sys.executable, "-c", CT.COMPETITOR, "0.2"], timeout=30)
    assert proc.returncode == 0


def test_contention_targets():
    C, CT, _ = _bench_modules()
    targets = [CT.target_for(c) for c in C.contention_cases()]
    assert targets == [2.2, 1.5, None]


def test_device_plumbing_on_the_cpu(one_thread):
    """The --device code path (cases built on a device, synchronised timing, device memory
    and profile) run with device "cpu"; the GPU block renders from a fake GPU's meta."""
    C, _, run = _bench_modules()
    gpu = C.with_device(C.gpu_cases(), "cuda")
    assert {c["device"] for c in gpu} == {"cuda"}
    names = [c["name"] for c in gpu]
    assert len(set(names)) == len(names)
    assert {"matrix_small_28_it3_b64_train", "matrix_paper_32_it3_b64_train"} <= set(names)
    assert "capsnet_mnist_b128_train" in names
    case = {**C.with_device(C.smoke_cases(), "cpu")[6], "repeats": 1}  # smoke_matrix
    assert case["name"] == "smoke_matrix"
    timed = run.worker_time(case, budget_s=1.0)
    assert timed["max_abs_diff"] < 1e-4 and timed["profile"]
    memory = run.worker_memory(case, "capsnet")
    assert memory["kind"] == "max_rss" and memory["peak_rss_mib"] > 0
    timed.update(case_spec=case, memory={"capsnet": memory})
    meta = run.machine_info(run.argparse.Namespace(mem_limit_gb=0, device="cpu"))
    assert meta["device"] == "cpu" and "gpu" not in meta
    meta.update(gpu="Fake GPU 80GB", gpu_memory_gib=80.0, cuda="12.8", gpu_count=1)
    block = run.tables(meta, [timed], section="gpu")
    assert block.startswith(run.markers("gpu")[0]) and block.endswith(run.markers("gpu")[1])
    assert "Fake GPU 80GB" in block and "max_memory_allocated" in block
    assert "smoke_matrix" in block


def test_results_md_keeps_each_block(tmp_path):
    """The CPU, GPU and contention blocks of RESULTS.md are replaced independently."""
    _, _, run = _bench_modules()
    path = tmp_path / "RESULTS.md"
    cpu_b, cpu_e = run.markers("cpu")
    gpu_b, gpu_e = run.markers("gpu")
    path.write_text(
        f"# r\n\n{cpu_b}\nold cpu\n{cpu_e}\n\nprose\n\n{gpu_b}\nold gpu\n{gpu_e}\nend\n"
    )
    meta = run.machine_info(run.argparse.Namespace(mem_limit_gb=0, device="cpu"))
    run.write_results_md(path, meta, [], section="gpu")
    text = path.read_text()
    assert "old cpu" in text and "old gpu" not in text and text.endswith("end\n")
    run.write_results_md(path, meta, [], section="contention")
    text = path.read_text()
    assert "prose" in text and text.count(run.markers("contention")[0]) == 1
    with pytest.raises(ValueError, match="section must be one of"):
        run.write_results_md(path, meta, [], section="tpu")


@pytest.mark.slow
def test_contention_smoke_mode(tmp_path):
    out, js = tmp_path / "RESULTS.md", tmp_path / "c.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--contention", "--smoke",
         "--output", str(out), "--json", str(js)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "A busy machine" in out.read_text()
    assert len(json.loads(js.read_text())["results"]) == 2


@pytest.mark.slow
def test_benchmark_smoke_mode_device_cpu(tmp_path):
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--device", "cpu",
         "--output", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "smoke_matrix" in out.read_text()


@pytest.mark.slow
def test_suite_path_with_a_device(tmp_path, monkeypatch):
    """run.py's suite path (worker subprocesses for time and memory, results file and
    block) with ``--device cpu``, on one tiny case."""
    C, _, run = _bench_modules()
    tiny = next(c for c in C.smoke_cases() if c["name"] == "smoke_matrix")
    monkeypatch.setattr(C, "full_cases", lambda: [tiny])
    out, js = tmp_path / "RESULTS.md", tmp_path / "r.json"
    argv = ["--device", "cpu", "--budget", "1", "--timeout", "120", "--output", str(out)]
    assert run.main([*argv, "--json", str(js)]) == 0
    (res,) = json.loads(js.read_text())["results"]
    assert res["case_spec"]["device"] == "cpu"
    assert res["impls"]["capsnet"]["median_s"] > 0
    assert res["memory"]["capsnet"]["kind"] == "max_rss"
    assert "smoke_matrix" in out.read_text()


def test_chunk_sweep_times_each_size_and_names_the_rule(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import chunk_sweep
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from capsnet.functional._kernels import em as EM_KERNEL

    before = EM_KERNEL.EM_CHUNK_BYTES
    chunk_sweep.main(["--batch", "2", "--reps", "1", "--sizes-mib", "0.5,1", "--no-chunks"])
    out = capsys.readouterr().out
    assert EM_KERNEL.EM_CHUNK_BYTES == before  # the forced size is put back
    for row in ("0.5 MiB", "1 MiB", "one chunk", "fastest:", "the rule gives"):
        assert row in out
