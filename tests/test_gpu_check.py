"""scripts/gpu_check.py, the prepared GPU check, kept from rotting: its ``--cpu`` mode runs
end to end here, and the pieces the GPU run relies on without a GPU to show them (hooks
removed for the steps without the monitor, what the overhead model trains) are checked
directly. Its figures are measured on a GPU, never asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402

from monitor import MonitorSession  # noqa: E402
from monitor.pruning import FiLMObserver  # noqa: E402


@pytest.mark.slow
def test_the_cpu_mode_runs_every_section_and_writes_plausible_figures(tmp_path):
    out = tmp_path / "gpu-check.json"
    # a generous deadline: the figures must be complete even on a loaded machine
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu", "--out", str(out),
         "--deadline-s", "170", "--steps", "2"],
        capture_output=True, text=True, timeout=200, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["mode"] == "cpu"
    sections = res["sections"]
    assert list(sections) == list(gpu_check.SECTIONS)
    for name in ("cuda_tests", "nccl_one_rank"):
        assert sections[name] == {"status": "skipped", "reason": "no CUDA",
                                  "seconds": sections[name]["seconds"]}

    sync = sections["sync"]
    assert sync["status"] == "ok", sync
    assert sync["host_syncs_from_monitor"] == 0 and sync["errors"] == []
    assert sync["values_in_last_record"]["train"] == sync["steps_checked"] == 2
    assert all(n > 0 for n in sync["values_in_last_record"].values())
    assert sync["sync_debug_mode"].startswith("skipped: no CUDA")

    gloo = sections["gloo_two_ranks"]
    assert gloo["status"] == "ok", gloo
    assert gloo["ranks"] == 2 and gloo["backend"] == "gloo" and gloo["mismatches"] == []
    assert gloo["records"] == 4 and gloo["metrics_compared"] == 12  # steps 0, 5, 10, 11
    assert gloo["collectives_per_flush"] == [3, 2, 2, 2]
    assert 0 <= gloo["worst_rel_error_mean_std"] <= 1e-9

    over = sections["overhead"]
    assert over["status"] == "ok", over
    assert over["batch_size"] == 2 and over["steps_each"] == 2 and over["stopped_early"] is None
    assert over["median_on_s"] > 0 and over["median_off_s"] > 0
    assert over["median_ratio"] > 0 and over["mean_ratio"] > 0
    assert over["hooks_captured"] == over["hooks_registered"] == sum(over["hooks"].values()) > 0
    kernels = over["kernels"]
    assert kernels["kind"] == "CPU ops (no CUDA)"
    for key in ("forward_without", "forward_with", "extra_per_forward",
                "extra_per_step_bookkeeping"):
        assert isinstance(kernels[key], int), key
    assert kernels["forward_with"] > kernels["forward_without"] > 0  # the hooks add work
    assert over["flush"]["steps"][0] == 0 and over["flush"]["median_ms"] > 0
    assert all(n >= 1 for n in over["records"].values())
    assert over["peak_memory_mb"] == "skipped: no CUDA"
    assert "LoRA" not in over["trained"] or "no LoRA" in over["trained"]  # --cpu: off

    for name in gpu_check.SECTIONS:  # the table names every section
        assert name in proc.stdout
    assert "wrote " + str(out) in proc.stdout


def test_hooks_captured_at_attach_are_removed_for_steps_without_the_monitor(tmp_path):
    session = MonitorSession(tmp_path / "run", "hooks", participation="local")
    film = FiLMObserver(session, ["c"])
    seen = []
    module = torch.nn.Linear(2, 2)
    hooks = gpu_check.MonitorHooks()
    with hooks.capture():
        film.hook(module, lambda mod, args, kwargs, out: seen.append(out.shape), name="c")
    assert len(hooks.entries) == film.num_hooks == 1
    module(torch.ones(1, 2))
    hooks.set(False)
    module(torch.ones(1, 2))
    assert not module._forward_hooks  # removed, not skipped
    hooks.set(True)
    module(torch.ones(1, 2))
    assert seen == [torch.Size([1, 2])] * 2
    film.finalize()


def test_the_overhead_model_trains_the_cogvla_parts_in_full_and_lora_on_the_rest():
    pytest.importorskip("peft")
    cfg = gpu_check.cpu_config()
    model, proprio, trainable, info = gpu_check.build(cfg, torch.device("cpu"), lora=True)
    vla = model.get_base_model()
    modules, params = gpu_check.full_train_parts(vla)
    full = {id(p) for m in modules for p in m.parameters()} | {id(p) for p in params}
    assert info["lora"]["modules"] > 0
    lora = {id(p) for n, p in vla.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * info["lora"]["modules"]  # A and B of each wrapped Linear
    for name, p in vla.named_parameters():
        if id(p) in full:
            assert p.requires_grad and p.dtype == torch.float32, name
        elif id(p) not in lora:
            assert not p.requires_grad and p.dtype == torch.bfloat16, name
    assert {id(p) for p in trainable} == full | lora | {id(p) for p in proprio.parameters()}
    batch = gpu_check.make_batch(cfg, 2, proprio, torch.device("cpu"))
    gpu_check.autocast_forward(model, "cpu", **batch).loss.backward()
    film_scale = modules[0]
    assert film_scale.weight.grad is not None and film_scale.weight.grad.abs().sum() > 0
