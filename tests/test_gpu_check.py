"""benchmarks/gpu_check.sh on CPU at toy size: one valid JSON line per check with the keys the GPU run
reports (the GPU-only checks say "skipped"), the time limit, and the two GPU-only checks' code run on
the CPU against itself. The GPU run itself is never a test's business (issue 20).

    pytest tests/test_gpu_check.py
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
spec = importlib.util.spec_from_file_location("gpu_check", BENCH / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)

KEYS = {  # what each check's line carries when it ran
    "scale_small_packed": {"tokens_per_s", "mfu", "flops_formula", "n_active", "peak_mem_gib", "step_s", "steps",
                           "tokens_per_rank", "image_sides", "attention", "rows_per_step", "finite"},
    "shapes_steps": {"steps_per_s", "steps_per_s_with_data", "data_s_per_batch", "tokens_per_s", "peak_mem_gib"},
}


def test_script_prints_one_line_per_check_on_cpu():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PY": sys.executable}
    done = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--device", "cpu", "--tiny"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(x) for x in done.stdout.strip().splitlines()]  # every stdout line is JSON
    assert [x["check"] for x in lines] == list(gpu_check.CHECKS)
    for x in lines:
        assert "seconds" in x and "error" not in x, x
        if x["check"] in gpu_check.GPU_ONLY:
            assert x["skipped"] == "no CUDA"
        else:
            assert x["ok"] is True and KEYS[x["check"]] <= set(x), x
    scale = lines[1]
    assert scale["attention"] == "sdpa" and scale["mfu"] > 0 and scale["tokens_per_s"] > 0
    assert scale["peak_mem_gib"] is None  # no CUDA allocator to ask


def test_check_over_its_limit_is_killed_and_reported():
    """The isolated path the GPU run takes: the child is killed at its limit and the line says so."""
    done = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--device", "cpu", "--tiny", "--isolate",
                           "--only", "shapes_steps", "--limit-scale", "0.004"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [json.loads(x) for x in done.stdout.strip().splitlines()]
    assert line["check"] == "shapes_steps" and "limit" in line["error"] and line["limit_s"] == 0.3


def test_flops_count_packed_samples_apart():
    """Attention FLOPs are per packed sample (sum of L_d^2), not per row."""
    m = SimpleNamespace(dim=8, head_dim=4, n_heads=2, n_kv_heads=1, ffn_hidden=16, moe_experts=0, moe_top_k=0,
                        n_layers=3)
    assert gpu_check.n_active(m) == 3 * (8 * 4 * 6 + 3 * 8 * 16)
    doc = torch.tensor([[0, 0, 0, 1, 1, -1], [2, 2, 2, 2, -1, -1]])  # samples of 3, 2 and 4 positions
    expect = 6 * gpu_check.n_active(m) * 9 + 12 * 3 * 2 * 4 * (9 + 4 + 16)
    assert gpu_check.step_flops(m, {"doc": doc}) == expect
    moe = SimpleNamespace(**{**vars(m), "moe_experts": 4, "moe_top_k": 2})
    assert gpu_check.n_active(moe) == 3 * (8 * 4 * 6 + 3 * 8 * 16 * 2 + 8 * 4)


def test_gpu_only_checks_run_on_the_cpu_against_itself(tmp_path, world_tok):
    """cuda_parity's and moe_grouped_cuda's code with the CPU in the device's place: every parity
    difference is exactly 0, and the grouped bank equals the loop."""
    world_tok.save(tmp_path)
    args = SimpleNamespace(tok=str(tmp_path), tiny=True)
    cpu = torch.device("cpu")
    par = gpu_check.cuda_parity(args, cpu)
    assert par["ok"] and par["loss_max_rel_diff"] == 0 and par["grad_max_rel_l2_diff"] == 0
    assert par["image_max_abs_diff"] == 0 and par["rep_ids_equal"]
    assert set(par["losses_cpu"]) >= {"loss", "loss_lm", "loss_rep", "loss_fm"}
    moe = gpu_check.moe_grouped_cuda(args, cpu)
    assert moe["rel_l2"]["grouped_vs_loop"] <= gpu_check.MOE_TOL
    assert moe["no_host_sync"] == {"forward": None, "backward": None}  # asked on CUDA only
    assert moe["grouped_train_tokens_per_s"] > 0
