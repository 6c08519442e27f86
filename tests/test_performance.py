"""What is countable about performance (issue 4): host syncs, memory that stays flat, the
benchmark itself. Collectives per flush at every number of metrics are in
test_distributed.py; one fused reduction per step with every part on in
test_cogvla_distributed.py. Wall-clock times are measured by scripts/bench.py, never here.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch

from monitor import Monitor, MonitorSession
from monitor.observer import _JOINED_NAMES
from monitor.pruning import AggregationObserver, FiLMObserver, MoERouterObserver, PruningObserver
from monitor.pruning.adapters.cogvla import CogVLAMonitoring, CogVLAMonitoringConfig
from monitor.testing import TinyCogVLAConfig, build_tiny_cogvla, synthetic_batch
from monitor.testing.probes import HostSyncSpy

ROOT = Path(__file__).resolve().parent.parent


def observers(session):
    lfp = PruningObserver(session, [f"layer_{i:02d}" for i in range(8, 32)], event_interval=5,
                          detailed_interval=20)
    film = FiLMObserver(session, ["dino/layer_00", "siglip/layer_00"], event_interval=5,
                        detailed_interval=20)
    moe = MoERouterObserver(session, experts=["dino", "siglip"], event_interval=5,
                            detailed_interval=20)
    aggr = AggregationObserver(session, ["dino"], event_interval=5, detailed_interval=20)
    return lfp, film, moe, aggr


def one_forward(parts, gen):
    lfp, film, moe, aggr = parts
    for c in lfp.components:
        p = torch.rand(4, 16, generator=gen)
        lfp.observe(c, p, p > 0.5, torch.rand(4, 3, generator=gen))
    for c in film.components:
        film.observe(c, gamma=torch.randn(4, 8, generator=gen))
        film.observe(c, beta=torch.randn(4, 8, generator=gen))
    moe.observe_logits(torch.randn(4, 2, generator=gen))
    aggr.observe("dino", 64, 8, 4, torch.randn(4, 8, 6, generator=gen))


def footprint(parts, train) -> dict:
    """Everything the monitor keeps between steps, as sizes."""
    sizes = {"joined_names": len(_JOINED_NAMES), "meta_keys": len(train.session.meta)}
    for obs in parts:
        for kind in ("events", "detailed"):
            slots = getattr(obs, kind).slots
            sizes[f"{obs.part}/{kind}/rows"] = sum(
                a.numel() for a in (*slots._acc.values(), *slots._next.values()))
            sizes[f"{obs.part}/{kind}/indexes"] = len(slots._name_index) + len(
                slots._index_cache)
        sizes[f"{obs.part}/deferred"] = len(obs._deferred)
        sizes[f"{obs.part}/constants"] = len(obs._constants)
        sizes[f"{obs.part}/alerts"] = len(obs.alerts)
        sizes[f"{obs.part}/summary"] = sum(len(t) for t in obs.writer.summary.modes.values())
    for mode, stream in train._streams.items():
        sizes[f"train/{mode}/rows"] = sum(a.numel() for a in stream.slots._acc.values())
    return sizes


@pytest.mark.slow
def test_memory_kept_between_steps_does_not_grow_with_the_number_of_steps(tmp_path):
    tracemalloc.start()  # before anything exists: every object the monitor keeps is traced
    session = MonitorSession(tmp_path / "run", "mem", participation="local")
    parts = observers(session)
    train = Monitor(session=session, log_interval=5)
    gen = torch.Generator().manual_seed(0)

    def run(first, last):
        for step in range(first, last):
            one_forward(parts, gen)
            train.log_step(step)
            with train.step(step) as h:
                h.log(loss=torch.rand((), generator=gen), lr=1e-4)

    run(0, 100)  # caches, accumulators and the summaries' entries have settled
    gc.collect()
    before = footprint(parts, train)
    start = tracemalloc.get_traced_memory()[0]
    run(100, 300)  # 40 compact and 10 detailed flushes of each observer, 40 train records
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - start
    tracemalloc.stop()
    assert footprint(parts, train) == before
    # 200 steps make ~6,000 observe calls: a leak of one small object per call would be
    # >= 180 kB. What remains is bounded noise of Python's and torch's own small-object
    # pools (measured 5-20 kB here, flat after a few thousand steps); what the monitor
    # keeps per flush is checked exactly by the footprint above.
    assert grown < 64 * 1024, grown
    for obs in parts:
        obs.finalize()
    train.finalize()


def test_a_step_makes_no_host_sync_from_monitor_code_with_every_part_on_and_eval(tmp_path):
    cfg = TinyCogVLAConfig(image_size=16)
    model = build_tiny_cogvla(cfg, seed=0)
    mon = CogVLAMonitoring(run_dir=tmp_path / "r", run_id="r", cfg=CogVLAMonitoringConfig(
        monitor_log_interval=100, pruning_event_log_interval=100, detailed_log_interval=100))
    mon.attach(model)  # the released film_sample_layers: no warning
    gen = torch.Generator().manual_seed(0)
    model(**synthetic_batch(cfg, batch_size=2, generator=gen)).loss.backward()
    mon.log_step(0)
    model(**synthetic_batch(cfg, batch_size=2, generator=gen)).loss.backward()
    mon.log_step(1)  # step 0 was due: flushed here, outside the spy
    with HostSyncSpy(only_from="monitor") as spy:
        for step in range(2, 5):
            out = model(**synthetic_batch(cfg, batch_size=2, generator=gen, pad_tokens=2))
            out.loss.backward()
            mon.log_step(step)
            with mon.step(step) as h:
                h.log(loss=out.loss.detach(), lr=1e-4, extra={"l1": out.loss.detach() * 2})
            with torch.no_grad():  # a validation forward between training steps
                model(**synthetic_batch(cfg, batch_size=2, generator=gen))
    assert spy.calls == []
    mon.finalize()


def test_host_sync_spy_sees_a_sync_made_by_monitor_code(tmp_path):
    """The spy is not blind: an injected .item() in a hook is counted."""
    session = MonitorSession(tmp_path / "run", "spy", participation="local")
    film = FiLMObserver(session, ["c"])
    module = torch.nn.Linear(2, 2)
    film.hook(module, lambda mod, args, kwargs, out: out.sum().item(), name="bad")
    with HostSyncSpy(only_from="monitor") as spy:
        module(torch.ones(1, 2))
    assert spy.calls == ["item"]
    with HostSyncSpy(only_from="monitor") as spy:
        torch.ones(()).item()  # not monitor code
    assert spy.calls == []
    film.finalize()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_hooks_on_cuda_tensors_never_sync_between_flushes(tmp_path):
    session = MonitorSession(tmp_path / "run", "cuda", participation="local")
    parts = observers(session)
    train = Monitor(session=session, log_interval=50)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def forward_on_cuda():
        lfp, film, moe, aggr = parts
        for c in lfp.components:
            p = torch.rand(4, 16, device="cuda", generator=gen)
            lfp.observe(c, p, p > 0.5, torch.rand(4, 3, device="cuda", generator=gen))
        for c in film.components:
            film.observe(c, gamma=torch.randn(4, 8, device="cuda", generator=gen),
                         beta=torch.randn(4, 8, device="cuda", generator=gen))
        moe.observe_logits(torch.randn(4, 2, device="cuda", generator=gen))
        aggr.observe("dino", 64, 8, 4, torch.randn(4, 8, 6, device="cuda", generator=gen))

    forward_on_cuda()
    train.log_step(0)
    forward_on_cuda()
    train.log_step(1)  # flushes step 0: syncs allowed here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(2, 20):
            forward_on_cuda()
            train.log_step(step)
            with train.step(step) as h:
                h.log(loss=torch.rand((), device="cuda", generator=gen), lr=1e-4)
            for obs in parts:
                obs.drain()  # the batched statistics too
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for obs in parts:
        obs.finalize()
    train.finalize()
    lfp, film = parts[0], parts[1]
    assert lfp.last_metrics["overall/p_keep"]["count"] > 0  # the CUDA values were reduced
    assert film.last_metrics["overall/modulation_strength"]["count"] > 0


@pytest.mark.slow
def test_the_benchmark_runs_and_its_countable_targets_hold(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--ranks", "2",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    assert {r["monitor_collectives"] for r in res["flush"]} == {2}
    assert {r["monitor_collectives_first_flush"] for r in res["flush"]} == {3}
    assert all(r["per_key_collectives"] == r["K"] for r in res["flush"])
    # the rank fields cost no collective; every value carries them (2 more keys per metric)
    assert {(r["before_collectives"], r["forensics_collectives"])
            for r in res["forensics"]} == {(2, 2)}
    assert all(r["forensics_bytes_per_line"] > r["before_bytes_per_line"]
               for r in res["forensics"])
    assert res["syncs"]["host_syncs_between_flushes"] == 0
    assert res["overhead"]["hook_ms_per_step_median"] > 0
    assert res["overhead"]["real_widths"]["ms_per_step"] > 0
    assert "after_60" in res["memory"]
    assert "flush:" in proc.stdout and "overhead:" in proc.stdout
