"""On one CUDA GPU: prove the CUDA path and measure the monitor's overhead at the real size.

    PYTHONUNBUFFERED=1 bash scripts/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log   # the GPU run
    python scripts/gpu_check.py --cpu      # tiny widths, a few steps (tests/test_gpu_check.py)

One call, at most 8 minutes on one H200 (a global deadline, ``--deadline-s``, 420 s by
default, cuts the overhead loop short and says so). Prints one table and writes the same
figures to ``gpu-check-results.json`` (``$OUT/`` when that is set; ``--out`` to choose;
``--cpu`` writes ``gpu-check-results-cpu.json``). Each section reports ``ok``, ``failed``
or ``skipped`` with the reason; a failing section does not stop the others, and the JSON
is rewritten after every section (a killed run keeps what it had).

Sections:

cuda_tests      ``pytest -m cuda`` of the suite in a subprocess (the tests marked ``cuda``).
sync            The CogVLA stand-in trained for several steps under bf16 autocast with every
                part of ``CogVLAMonitoring`` on and nothing due between the flushes, after
                one warm-up step (and validation forward):
                ``torch.cuda.set_sync_debug_mode("error")`` inside the monitor's hooks and
                its ``log_step``/``step`` calls (the stand-in's own forward syncs, as the real
                CogVLA code does, so the mode is on in monitor code only), plus
                ``HostSyncSpy`` over the whole steps. Only the flushes may sync. In ``--cpu``
                mode the spy alone (sync debug mode needs CUDA).
nccl_one_rank   A one-rank NCCL world: CUDA tensors of float64/float32/bfloat16, NaN and Inf
                mixed in, logged for 12 steps; every record equals a float64 numpy reference
                (count, non-finite count, min and max equal; mean and std to 1e-9
                relative). One process reduces nothing: its collectives are counted (0);
                the group's own ``all_reduce`` is checked once.
gloo_two_ranks  The same with two gloo ranks (two processes on the one GPU, CUDA tensors;
                CPU tensors in ``--cpu`` mode), values reduced over both ranks: same
                comparison, collectives per flush counted (3 at the first, then 2).
overhead        The stand-in at the real widths and depths (Llama 4096 x 32 layers with LFP
                on 8..31, DINOv2 1024 x 24 and SigLIP 1152 x 27 FiLMed blocks, K = 64
                aggregation tokens, 2 images of 224 px, 30 prompt tokens, 8 x 7 action
                tokens, proprio; batch 16 or the largest that fits), bf16 weights and
                autocast; trained in full (fp32): FiLM scale/shift, LFP and MoE routers,
                projectors, aggregation tokens and the proprio projector, plus LoRA r = 32
                on every other Linear (but the LM head) when peft is importable (else the
                rest is frozen); AdamW. ONE model: the monitor's hooks are registered for the
                steps with the monitor on and removed for the steps without it, alternated,
                on the same weights and optimizer. Median (and mean) step-time ratio, the
                monitor's extra kernels per forward and per step's bookkeeping
                (``torch.profiler``), each flush's wall time, peak memory with and without.
                ``--cpu``: tiny widths, batch 2, a few steps (CPU ops counted, not kernels).

Time on the GPU (caps are in the code; the rest are guesses until the first run): the
pytest subprocess at most 180 s (~30 s expected), each world at most 150 s (~20 s: two
spawned processes importing torch), sync ~20 s, overhead what is left (building ~9 B
parameters, ~66 steps, two profiled forwards, finalize). The overhead loop stops early,
and says so, when the deadline leaves less than 30 s plus 10 steps; no section starts with
under 5 s left (the overhead section with under 60 s).

Wall-clock figures depend on the machine: the ratio is measured side by side in one process.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.util
import json
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))  # harness (gloo/NCCL worlds), reference (numpy stats)

from bench import _train_step, bench_config, machine  # noqa: E402

SECTIONS = ("cuda_tests", "sync", "nccl_one_rank", "gloo_two_ranks", "overhead")
LORA_RANK = 32
GOAL_RATIO = 1.01


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.start, self.seconds = time.monotonic(), seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)


# -- the monitor's hooks, held: on/off on one model, sync debug mode inside them ---------------

class MonitorHooks:
    """Every module hook registered while :meth:`capture` is active (the monitor's, during
    ``attach``), wrapped so that CUDA's sync debug mode can be on inside them alone, and
    kept so that a step runs with them (:meth:`set` True) or without any of them (False:
    removed from the modules, not skipped)."""

    METHODS = ("register_forward_hook", "register_forward_pre_hook",
               "register_full_backward_hook", "register_full_backward_pre_hook")

    def __init__(self) -> None:
        self.entries: list[list] = []  # [register, module, hook, args, kwargs, handle]
        self.sync_mode: str | None = None
        self.registered = True

    @contextlib.contextmanager
    def capture(self, scoped: bool = True):
        """``scoped=False`` keeps the hooks as they are (no wrapper frame: the overhead
        run times them exactly); the sync scope then never applies inside them."""
        originals = {name: getattr(torch.nn.Module, name) for name in self.METHODS}

        def make(original):
            def register(module, hook, *args, **kwargs):
                wrapped = self._wrap(hook) if scoped else hook
                handle = original(module, wrapped, *args, **kwargs)
                self.entries.append([original, module, wrapped, args, kwargs, handle])
                return handle
            return register

        for name, original in originals.items():
            setattr(torch.nn.Module, name, make(original))
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(torch.nn.Module, name, original)

    def _wrap(self, hook):
        @functools.wraps(hook)
        def wrapped(*args, **kwargs):
            with self.sync_scope():
                return hook(*args, **kwargs)
        return wrapped

    @contextlib.contextmanager
    def sync_scope(self):
        """CUDA sync debug mode ``self.sync_mode`` inside the block (nothing when None)."""
        if self.sync_mode is None:
            yield
            return
        before = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(self.sync_mode)
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(before)

    def set(self, registered: bool) -> None:
        if registered == self.registered:
            return
        for entry in self.entries:
            if registered:
                register, module, hook, args, kwargs, _ = entry
                entry[5] = register(module, hook, *args, **kwargs)
            else:
                entry[5].remove()
        self.registered = registered


class ScopedMonitor:
    """The facade's ``log_step``/``step`` with the hooks' sync scope around them, and each
    call's wall time (synchronised around the calls of steps in ``timed``: the flushes)."""

    def __init__(self, mon, hooks: MonitorHooks, cuda: bool, due=lambda step: False) -> None:
        self.mon, self.hooks, self.cuda, self.due = mon, hooks, cuda, due
        self.flushes: list[dict] = []
        self.bookkeeping_ms: list[float] = []
        self._pending: dict | None = None  # the due step whose record the next call may write

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def log_step(self, step: int) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self._sync()
        t0 = time.perf_counter()
        with self.hooks.sync_scope():
            self.mon.log_step(step)
        if pending is not None:
            self._sync()
            pending["next_log_step_ms"] = (time.perf_counter() - t0) * 1e3
            pending["ms"] = pending["context_ms"] + pending["next_log_step_ms"]
            self.flushes.append(pending)
        else:
            self.bookkeeping_ms.append((time.perf_counter() - t0) * 1e3)

    @contextlib.contextmanager
    def step(self, step: int, mode: str = "train"):
        due = self.due(step)
        if due:
            self._sync()
        t0 = time.perf_counter()
        with self.hooks.sync_scope(), self.mon.step(step, mode) as handle:
            yield handle
        if due:
            self._sync()
            self._pending = {"step": step, "context_ms": (time.perf_counter() - t0) * 1e3}
        else:
            self.bookkeeping_ms.append((time.perf_counter() - t0) * 1e3)


# -- the stand-in ----------------------------------------------------------------------------------

def real_config(layers: int = 32):
    """The real CogVLA (LIBERO recipe) as the stand-in builds it. The one difference: both
    ViTs use MLP ratio 4 (SigLIP's is 3.74: 4608 instead of 4304 hidden, 0.2 % of the
    parameters)."""
    from monitor.testing import TinyCogVLAConfig

    return TinyCogVLAConfig(
        num_vision_aggr=64, num_images_in_input=2, image_size=224, patch_size=14,
        dino_width=1024, dino_depth=24, siglip_width=1152, siglip_depth=27, vit_heads=16,
        vit_mlp_ratio=4.0, hidden_size=4096, intermediate_size=11008,
        num_hidden_layers=layers, num_attention_heads=32, base_vocab_size=32000,
        pad_to_multiple_of=64, n_action_bins=256, num_actions_chunk=8, action_dim=7,
        proprio_dim=8, prompt_len=30)


def cpu_config():
    """``--cpu``: toy widths and shallow stacks (LFP on layers 8 and 9, 4 ViT blocks each),
    2 images; a step in well under a second on one core."""
    from monitor.testing import TinyCogVLAConfig

    return TinyCogVLAConfig(image_size=16, dino_depth=4, siglip_depth=4, num_hidden_layers=10)


def full_train_parts(vla) -> tuple[list[torch.nn.Module], list[torch.nn.Parameter]]:
    """What CogVLA trains in full: FiLM scale/shift of every ViT block, the LFP routers, the
    MoE router, the two projectors (modules) and the aggregation tokens (parameters)."""
    from monitor.testing import FiLMedVisionTransformerBlock, LlamaDecoderLFPLayer

    modules = []
    for m in vla.modules():
        if isinstance(m, FiLMedVisionTransformerBlock):
            modules += [m.scale, m.shift]
        elif isinstance(m, LlamaDecoderLFPLayer):
            modules.append(m.router)
    for name in ("aggregation_router", "featurizer_proj", "fused_featurizer_proj"):
        if getattr(vla, name, None) is not None:
            modules.append(getattr(vla, name))
    params = [p for name in ("vision_aggr_featurizer", "vision_aggr_fused_featurizer")
              if isinstance(p := getattr(vla.vision_backbone, name, None), torch.nn.Parameter)]
    return modules, params


def lora_targets(vla) -> list[tuple[str, torch.nn.Linear]]:
    """Every Linear that is not trained in full, but the LM head (peft's "all-linear")."""
    modules, _ = full_train_parts(vla)
    full = {id(sub) for m in modules for sub in m.modules()}
    head = vla.get_output_embeddings()
    return [(name, m) for name, m in vla.named_modules()
            if isinstance(m, torch.nn.Linear) and id(m) not in full and m is not head]


def estimate(cfg, lora: bool) -> dict:
    """Parameter counts and the static GPU memory of training (weights, grads, AdamW), from
    the model built on the meta device (nothing allocated)."""
    from monitor.testing import build_proprio_projector, build_tiny_cogvla

    with torch.device("meta"):
        vla = build_tiny_cogvla(cfg, seed=0)
        proprio = build_proprio_projector(cfg, seed=0)
    modules, params = full_train_parts(vla)
    full = {id(p): p for m in modules for p in m.parameters()}
    full.update({id(p): p for p in params})
    n_full = sum(p.numel() for p in full.values()) + sum(p.numel() for p in proprio.parameters())
    n_model = sum(p.numel() for p in vla.parameters())
    n_frozen = n_model - sum(p.numel() for p in full.values())
    n_lora = sum(LORA_RANK * (m.in_features + m.out_features)
                 for _, m in lora_targets(vla)) if lora else 0
    # bf16 frozen weights; fp32 trained weights + grads + AdamW's two moments
    static = 2 * n_frozen + 16 * (n_full + n_lora)
    return {"params": n_model + n_lora + sum(p.numel() for p in proprio.parameters()),
            "trained_in_full": n_full, "lora": n_lora, "frozen": n_frozen,
            "static_gb": static / 1e9,
            "note": "static = weights, grads and AdamW state; activations come on top (the "
                    "warm-up halves the batch until a step fits)"}


def build(cfg, device: torch.device, lora: bool, seed: int = 0):
    """The stand-in on ``device``: bf16 weights, the parts trained in full in fp32, LoRA
    (peft) or frozen for the rest. Returns ``(model, proprio_projector, trainable, info)``."""
    from monitor.testing import build_proprio_projector, build_tiny_cogvla

    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.bfloat16)  # never holds a full fp32 copy
        with torch.device(device):
            vla = build_tiny_cogvla(cfg, seed=seed)
    finally:
        torch.set_default_dtype(default)
    with torch.device(device):
        proprio = build_proprio_projector(cfg, seed=seed)  # fp32, trained in full
    modules, params = full_train_parts(vla)
    for m in modules:
        m.float()
    for p in params:
        p.data = p.data.float()
    vla.requires_grad_(False)
    model, info = vla, {"lora": None}
    if lora:
        try:
            import peft

            names = [name for name, _ in lora_targets(vla)]
            config = peft.LoraConfig(r=LORA_RANK, lora_alpha=16, lora_dropout=0.0,
                                     target_modules="|".join(re.escape(n) for n in names))
            model = peft.get_peft_model(vla, config)
            info["lora"] = {"r": LORA_RANK, "modules": len(names), "peft": peft.__version__}
        except Exception as exc:  # noqa: BLE001 - measure without LoRA rather than not at all
            vla.requires_grad_(False)
            model = vla
            info["lora"] = f"failed, trained without LoRA: {type(exc).__name__}: {exc}"[:300]
    for m in modules:
        m.requires_grad_(True)
    for p in params:
        p.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad] + list(proprio.parameters())
    info["trainable_params"] = sum(p.numel() for p in trainable)
    return model, proprio, trainable, info


def make_batch(cfg, batch_size: int, proprio, device: torch.device) -> dict:
    from monitor.testing import synthetic_batch

    batch = synthetic_batch(cfg, batch_size=batch_size, pad_tokens=4 if cfg.prompt_len > 4 else 0,
                            generator=torch.Generator().manual_seed(0), proprio_projector=proprio)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def autocast_forward(model, device_type: str, **batch):
    """The model's forward under bf16 autocast (the loss is computed inside, in fp32)."""
    with torch.autocast(device_type, dtype=torch.bfloat16):
        return model(**batch)


def monitoring(run_dir: str, run_id: str, **cfg):
    from monitor.pruning.adapters.cogvla import CogVLAMonitoring, CogVLAMonitoringConfig

    return CogVLAMonitoring(run_dir=run_dir, run_id=run_id, config_name="gpu_check",
                            cfg=CogVLAMonitoringConfig(**cfg))


def attach(mon, model, hooks: MonitorHooks, scoped: bool = True) -> tuple[dict, list[str]]:
    with hooks.capture(scoped), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # film_sample_layers' 26 is past DINOv2's 24 blocks
        counts = mon.attach(model)
    return counts, [str(w.message) for w in caught]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def part_records(run_dir: Path, run_id: str) -> dict[str, list[dict]]:
    folders = {"train": "monitor_logs", "lfp": "lfp_logs", "film": "film_logs",
               "moe": "moe_logs", "aggr": "aggr_logs"}
    return {part: [r for r in jsonl(run_dir / folder / f"{run_id}.jsonl") if "metrics" in r]
            for part, folder in folders.items()}


def counted(record: dict) -> int:
    """The largest value count of any metric in a record (0: the record holds nothing)."""
    return max((v.get("count", 0) for v in record["metrics"].values()
                if isinstance(v, dict) and isinstance(v.get("count"), int)), default=0)


# -- sections --------------------------------------------------------------------------------------

def check_cuda_tests(args, dl: Deadline, cuda: bool) -> dict:
    if not cuda:
        return {"status": "skipped", "reason": "no CUDA"}
    if importlib.util.find_spec("pytest") is None:
        return {"status": "skipped", "reason": "pytest is not importable here"}
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        # only the files with cuda tests: a module that cannot import here (an extra the
        # GPU machine lacks) must not stop the collection of the others
        files = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").glob("test_*.py")
                       if "mark.cuda" in f.read_text())
        if not files:
            return {"status": "failed", "reason": "no test file is marked cuda"}
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
               f"--junitxml={xml}", *files]
        if importlib.util.find_spec("xdist") is not None:
            cmd += ["-n", "0"]
        if importlib.util.find_spec("pytest_timeout") is None:  # pyproject sets `timeout`
            cmd += ["-W", "ignore::pytest.PytestConfigWarning"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        timeout = max(30.0, min(180.0, dl.left() - 120))
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "reason": f"pytest -m cuda ran past {timeout:.0f} s"}
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        if not xml.exists():
            return {"status": "failed", "reason": f"pytest exited {proc.returncode}, no report",
                    "output_tail": tail}
        cases = []
        for case in ET.parse(xml).iter("testcase"):
            outcome, message = "passed", None
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    outcome = "skipped" if tag == "skipped" else "failed"
                    message = ((el.get("message") or "").splitlines() or [""])[0][:300]
                    break
            cases.append({"test": f"{case.get('classname')}::{case.get('name')}",
                          "outcome": outcome, "message": message})
    n = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "skipped")}
    out = {"command": " ".join(["python", *cmd[1:]]).replace(str(xml), "junit.xml"),
           "returncode": proc.returncode, **n, "tests": cases}
    if proc.returncode != 0 or n["failed"]:
        out.update(status="failed", reason=f"pytest exited {proc.returncode}: "
                   f"{n['passed']} passed, {n['failed']} failed, {n['skipped']} skipped",
                   output_tail=tail)
    elif not n["passed"]:
        out.update(status="failed", reason="no cuda test ran on a CUDA machine (all skipped?)")
    else:
        out["status"] = "ok"
    return out


def check_sync(args, dl: Deadline, device: torch.device) -> dict:
    from monitor.testing import build_tiny_cogvla
    from monitor.testing.probes import HostSyncSpy

    cuda = device.type == "cuda"
    # on a GPU: bench's stand-in (2 images, K = 64 tokens per encoder and image, real
    # depths, toy widths); on a CPU a shallower one
    cfg = bench_config() if cuda else cpu_config()
    steps = args.sync_steps
    torch.manual_seed(0)
    vla = build_tiny_cogvla(cfg, seed=0).to(device)
    opt = torch.optim.AdamW(vla.parameters(), lr=1e-4)
    batch = make_batch(cfg, 4 if cuda else 2, None, device)
    fwd = functools.partial(autocast_forward, vla, device.type)
    out: dict = {"steps_checked": steps, "batch_size": batch["input_ids"].shape[0],
                 "sync_debug_mode": "error (inside the monitor's hooks and calls)" if cuda
                 else "skipped: no CUDA (HostSyncSpy only)"}
    hooks = MonitorHooks()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "sync"
        # nothing is due between step 0 and finalize: only those two flushes may sync
        mon = monitoring(str(run_dir), "sync", monitor_log_interval=1000,
                         pruning_event_log_interval=1000, detailed_log_interval=1000,
                         console=False)
        out["hooks"], out["attach_warnings"] = attach(mon, vla, hooks)
        if cuda:  # the check is not blind: a sync inside the scope raises
            hooks.sync_mode = "error"
            try:
                with hooks.sync_scope():
                    torch.ones(1, device=device).item()
                out["sync_debug_detects_item"] = False
            except RuntimeError:
                out["sync_debug_detects_item"] = True
            hooks.sync_mode = None
        scoped = ScopedMonitor(mon, hooks, cuda)
        _train_step(fwd, opt, batch, mon, 0)  # step 0 is due everywhere
        with torch.no_grad():  # the validation path warmed up too (cached constants)
            fwd(**batch)
        mon.log_step(1)  # step 0 is flushed here, outside the check
        if cuda:
            torch.cuda.synchronize()
        errors = []
        with warnings.catch_warnings(record=True) as caught, \
                HostSyncSpy(only_from="monitor") as spy:
            warnings.simplefilter("always")
            hooks.sync_mode = "error" if cuda else None
            try:
                for step in range(1, steps + 1):
                    _train_step(fwd, opt, batch, scoped, step)
                    with torch.no_grad():  # a validation forward between training steps
                        fwd(**batch)
            except RuntimeError as exc:  # a sync in log_step()/step() raises here
                errors.append(f"{type(exc).__name__}: {exc}"[:500])
            finally:
                hooks.sync_mode = None
        try:
            mon.finalize()  # flushes steps 1..N: syncs allowed
        except Exception as exc:  # noqa: BLE001 - report it with what the steps found
            errors.append(f"finalize: {type(exc).__name__}: {exc}"[:500])
        hooks.set(False)
        records = part_records(run_dir, "sync")
    monitor_warnings = [str(w.message)[:300] for w in caught if "monitor" in str(w.message)]
    out.update({
        "host_syncs_from_monitor": len(spy.calls), "by_method": dict(spy.counts),
        "errors": errors, "monitor_warnings": monitor_warnings,
        "records": {p: len(r) for p, r in records.items()},
        # the record finalize wrote holds steps 1..N: N losses, and every part saw values
        "values_in_last_record": {p: counted(r[-1]) if r else 0 for p, r in records.items()},
    })
    problems = []
    if spy.calls:
        problems.append(f"{len(spy.calls)} host syncs by monitor code ({dict(spy.counts)})")
    if errors or monitor_warnings:
        problems.append("a sync or error in monitor code: "
                        + "; ".join((errors + monitor_warnings)[:3]))
    if cuda and not out.get("sync_debug_detects_item"):
        problems.append("sync debug mode did not raise on .item()")
    if out["values_in_last_record"]["train"] != steps:
        problems.append(f"the last train record holds {out['values_in_last_record']['train']} "
                        f"losses, not {steps}")
    empty = [p for p, n in out["values_in_last_record"].items() if n == 0]
    if empty:
        problems.append(f"parts with nothing recorded: {empty}")
    out["status"] = "failed" if problems else "ok"
    if problems:
        out["reason"] = "; ".join(problems)
    return out


# one plan, one reference: both worlds
WORLD_STEPS, WORLD_INTERVAL = 12, 5
DTYPES = {"x64": "float64", "x32": "float32", "xbf16": "bfloat16"}


def world_plan(world_size: int, seed: int = 0) -> list[list]:
    """Per rank: ``(step, {name: (dtype, values)})``; uneven sizes, NaN and Inf mixed in."""
    rng = np.random.default_rng(seed)
    plan = []
    for rank in range(world_size):
        items = []
        for step in range(WORLD_STEPS):
            values = {}
            for j, (name, dtype) in enumerate(DTYPES.items()):
                v = rng.normal(1.0 + rank, 2.0, size=rank + 2 + (step + j) % 3)
                if (rank + step + j) % 5 == 2:
                    v[0] = np.nan
                if (rank + step + j) % 7 == 3:
                    v[-1] = -np.inf
                values[name] = (dtype, v.tolist())
            items.append((step, values))
        plan.append(items)
    return plan


def world_worker(rank, world_size, *, run_dir, plan, device, backend=None, store_path=None):
    """One rank: log ``plan[rank]`` as tensors on ``device``; the collectives of each flush."""
    import torch.distributed as dist

    from monitor import Monitor
    from monitor.testing.probes import count_collectives

    logging.getLogger("monitor").setLevel(logging.ERROR)  # no alert lines from the workers
    if device == "cuda":
        torch.cuda.set_device(0)
    if backend == "nccl":
        dist.init_process_group("nccl", store=dist.FileStore(store_path, world_size),
                                rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
        probe = torch.arange(4.0, device=device)
        dist.all_reduce(probe)  # the group itself works (the monitor issues none in a world of 1)
        group_ok = bool((probe == torch.arange(4.0, device=device) * world_size).all())
    counter = count_collectives()
    try:
        mon = Monitor(run_dir=run_dir, run_id="world", log_interval=WORLD_INTERVAL,
                      console=False)
        deltas = []
        for step, values in plan[rank]:
            before = counter["n"]
            with mon.step(step) as h:
                h.log(extra={name: torch.tensor(v, dtype=getattr(torch, dtype), device=device)
                             for name, (dtype, v) in values.items()})
            deltas.append(counter["n"] - before)
        before = counter["n"]
        mon.finalize()
        deltas.append(counter["n"] - before)
    finally:
        counter["restore"]()
        if backend == "nccl":
            dist.destroy_process_group()
    out = {"collectives_per_call": deltas}
    if backend == "nccl":
        out["nccl_all_reduce_ok"] = group_ok
    return out


def compare_world(run_dir: Path, plan: list[list]) -> dict:
    """Every record against float64 numpy on the values as logged (after their dtype)."""
    from reference import bucket_of, due_labels, reference_stats

    steps = list(range(WORLD_STEPS))
    labels = due_labels(steps, WORLD_INTERVAL)
    want: dict = {}
    for items in plan:
        for step, values in items:
            bucket = want.setdefault(bucket_of(step, labels), {})
            for name, (dtype, v) in values.items():
                as_logged = torch.tensor(v, dtype=getattr(torch, dtype)).double().numpy()
                bucket.setdefault(name, []).append(as_logged)
    got = jsonl(run_dir / "monitor_logs" / "world.jsonl")
    got = [r for r in got if "metrics" in r]
    mismatches = []
    if [r["step"] for r in got] != labels:
        mismatches.append(f"record steps {[r['step'] for r in got]} != {labels}")
    worst = 0.0
    for rec in got:
        for name, values in want.get(rec["step"], {}).items():
            ref, value = reference_stats(values), rec["metrics"].get(name)
            if value is None:
                mismatches.append(f"step {rec['step']} {name}: missing")
                continue
            for key in ("count", "nonfinite", "min", "max"):
                if value[key] != ref[key]:
                    mismatches.append(f"step {rec['step']} {name}.{key}: {value[key]} != "
                                      f"{ref[key]}")
            for key in ("mean", "std"):
                if ref[key] is None or value[key] is None:
                    if ref[key] != value[key]:
                        mismatches.append(f"step {rec['step']} {name}.{key}: {value[key]}")
                    continue
                rel = abs(value[key] - ref[key]) / max(abs(ref[key]), 1e-300)
                worst = max(worst, rel)
                if rel > 1e-9:
                    mismatches.append(f"step {rec['step']} {name}.{key}: {value[key]} != "
                                      f"{ref[key]} (rel {rel:.2e})")
    meta = run_dir / "monitor_logs" / "world_meta.json"
    meta = json.loads(meta.read_text()) if meta.exists() else {}
    return {"records": len(got), "metrics_compared": sum(len(r["metrics"]) for r in got),
            "worst_rel_error_mean_std": worst, "mismatches": mismatches[:10],
            "backend": meta.get("backend"), "world_size": meta.get("world_size"),
            "participation": (meta.get("participation") or {}).get("decision")}


def check_world(args, dl: Deadline, device: torch.device, world_size: int,
                backend: str) -> dict:
    from harness import run_world

    cuda = device.type == "cuda"
    if backend == "nccl" and not (cuda and torch.distributed.is_nccl_available()):
        return {"status": "skipped", "reason": "no CUDA" if not cuda else "NCCL not available"}
    plan = world_plan(world_size)
    timeout = max(30.0, min(150.0, dl.left() - 60))
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "world"
        kwargs = {"run_dir": str(run_dir), "plan": plan, "device": device.type}
        if backend == "nccl":  # the worker joins the group itself (harness: gloo only)
            kwargs.update(backend="nccl", store_path=str(Path(tmp) / "nccl-store"))
        outs = run_world(world_worker, world_size, Path(tmp), timeout=timeout,
                         init=backend == "gloo", **kwargs)
        result = compare_world(run_dir, plan)
    flushes = [d for d in outs[0]["collectives_per_call"] if d]
    if "nccl_all_reduce_ok" in outs[0]:
        result["nccl_all_reduce_ok"] = outs[0]["nccl_all_reduce_ok"]
    result.update(ranks=world_size, tensors_on=device.type, steps=WORLD_STEPS,
                  log_interval=WORLD_INTERVAL, collectives_per_flush=flushes,
                  collectives_total=sum(outs[0]["collectives_per_call"]))
    problems = list(result["mismatches"])
    if result["records"] == 0:
        problems.append("no records written")
    if result["backend"] != backend:
        problems.append(f"meta says backend {result['backend']!r}, not {backend!r}")
    if backend == "gloo" and (not flushes or flushes[0] != 3 or set(flushes[1:]) - {2}):
        problems.append(f"collectives per flush {flushes}, expected 3 then 2")
    if backend == "nccl":
        result["note"] = ("one process reduces nothing (identity): values on CUDA under an "
                          "NCCL group, read back and compared; collectives counted; the "
                          "group's own all_reduce checked once")
        if not result.get("nccl_all_reduce_ok"):
            problems.append("the NCCL group's all_reduce gave a wrong result")
    result["status"] = "failed" if problems else "ok"
    if problems:
        result["reason"] = "; ".join(problems[:3])
    return result


def count_events(prof, cuda: bool) -> int:
    """CUDA device events (kernels, memcpy, memset) of a profile; CPU ops without CUDA."""
    from torch.autograd import DeviceType

    events = prof.events()
    if not cuda:
        return sum(1 for e in events if e.device_type == DeviceType.CPU)
    n = sum(1 for e in events if e.device_type == DeviceType.CUDA)
    return n or sum(len(getattr(e, "kernels", [])) for e in events)


def profiled(fn, cuda: bool):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        result = fn()
        if cuda:
            torch.cuda.synchronize()
    return result, count_events(prof, cuda)


def choose_size(args, device: torch.device, lora: bool) -> tuple[object, dict]:
    """The real size, or fewer Llama layers (labelled) when the static state (weights,
    grads, AdamW) would take more than 60 % of the GPU. Estimated on the meta device."""
    if args.cpu:
        return cpu_config(), {"size": "tiny widths and depths (--cpu): not the real size"}
    layers = args.layers
    est = estimate(real_config(layers), lora)
    total = torch.cuda.get_device_properties(device).total_memory / 1e9
    while est["static_gb"] > 0.6 * total and layers > 9:
        layers -= 1
        est = estimate(real_config(layers), lora)
    if layers != args.layers:
        size = (f"REDUCED: {layers} Llama layers instead of {args.layers} (LFP on 8.."
                f"{layers - 1}): {args.layers} need "
                f"~{estimate(real_config(args.layers), lora)['static_gb']:.0f} GB of static "
                f"state on a {total:.0f} GB GPU")
    else:
        size = "real (32 Llama layers)" if layers == 32 else f"{layers} Llama layers (--layers)"
    print(f"  size: {size}; static state ~{est['static_gb']:.1f} GB of {total:.0f} GB",
          flush=True)
    return real_config(layers), {"size": size, "estimate": {**est, "gpu_total_gb": total}}


def describe(cfg) -> dict:
    return {"llm": [cfg.hidden_size, cfg.num_hidden_layers],
            "dino": [cfg.dino_width, cfg.dino_depth],
            "siglip": [cfg.siglip_width, cfg.siglip_depth],
            "aggregation_tokens": cfg.num_vision_aggr, "images": cfg.num_images_in_input,
            "image_size": cfg.image_size, "visual_tokens": cfg.num_visual_tokens,
            "prompt_len": cfg.prompt_len, "action_tokens": cfg.num_action_tokens,
            "autocast": "bfloat16", "weights": "bf16 frozen, fp32 trained"}


class OverheadRun:
    """One model and optimizer; steps with the monitor's hooks and calls (on) and without
    any of them (off), on the same weights."""

    def __init__(self, cfg, device: torch.device, lora: bool, run_dir: Path) -> None:
        self.cfg, self.device, self.cuda = cfg, device, device.type == "cuda"
        t0 = time.perf_counter()
        self.model, self.proprio, trainable, self.info = build(cfg, device, lora)
        self.info["build_s"] = round(time.perf_counter() - t0, 1)
        self.opt = torch.optim.AdamW(trainable, lr=1e-4)
        self.fwd = functools.partial(autocast_forward, self.model, device.type)
        self.hooks = MonitorHooks()
        self.run_dir = run_dir
        self.mon = monitoring(str(run_dir), "overhead")  # every part on, default intervals
        intervals = (self.mon.cfg.monitor_log_interval, self.mon.cfg.pruning_event_log_interval,
                     self.mon.cfg.detailed_log_interval)
        self.info["hooks"], self.info["attach_warnings"] = attach(self.mon, self.model,
                                                                  self.hooks, scoped=False)
        self.info["hooks_registered"] = sum(o.num_hooks for o in self.mon.observers.values())
        self.info["hooks_captured"] = len(self.hooks.entries)
        self.scoped = ScopedMonitor(self.mon, self.hooks, self.cuda,
                                    due=lambda s: any(s % i == 0 for i in intervals))
        self.k = 0  # the monitor's step: one per step with the monitor on
        self.batch = None

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def step(self, on: bool) -> float:
        """One training step; its wall time (synchronised). Peak memory restarts here."""
        self.hooks.set(on)
        gc.collect()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self._sync()
        t = time.perf_counter()
        _train_step(self.fwd, self.opt, self.batch, self.scoped if on else None, self.k)
        self._sync()
        if on:
            self.k += 1
        return time.perf_counter() - t

    def warm_up(self, batch_size: int, pairs: int) -> tuple[int, list[int]]:
        """Pairs of steps at the largest batch (halving from ``batch_size``) that fits."""
        too_big = []
        while True:
            self.batch = make_batch(self.cfg, batch_size, self.proprio, self.device)
            try:
                for _ in range(pairs):
                    self.step(True)
                    self.step(False)
                return batch_size, too_big
            except torch.cuda.OutOfMemoryError:
                if batch_size == 1:
                    raise
            # out of the except block: the exception's frames (and tensors) are gone
            too_big.append(batch_size)
            self.opt.zero_grad(set_to_none=True)
            self.batch = None
            gc.collect()
            torch.cuda.empty_cache()
            batch_size //= 2

    def alternate(self, steps: int, dl: Deadline, reserve_s: float) -> dict:
        """``steps`` of each, alternated (on-off, off-on, ...), until the deadline leaves
        only ``reserve_s`` plus ~10 steps (the profiles and finalize)."""
        times: dict[str, list[float]] = {"on": [], "off": []}
        peaks: dict[str, list[float]] = {"on": [], "off": [], "on_flush": []}
        flushing: set[int] = set()  # indexes of on-steps that write a record
        stopped = None
        i = 0
        while min(len(times["on"]), len(times["off"])) < steps:
            if times["off"] and dl.left() < reserve_s + 10 * statistics.median(times["off"]):
                stopped = f"deadline: {dl.left():.0f} s left after {len(times['on'])} steps each"
                break
            for which in (("on", "off") if i % 2 == 0 else ("off", "on")):
                flush = which == "on" and self.scoped.due(self.k)
                if flush:
                    flushing.add(len(times["on"]))
                times[which].append(self.step(which == "on"))
                if self.cuda:
                    peaks["on_flush" if flush else which].append(
                        torch.cuda.max_memory_allocated() / 2**20)
            i += 1
            if i % 10 == 0:
                print(f"  {i} pairs: median off {statistics.median(times['off']):.3f} s, on "
                      f"{statistics.median(times['on']):.3f} s ({dl.left():.0f} s left)",
                      flush=True)
        on, off = times["on"], times["off"]
        steady = [t for j, t in enumerate(on) if j not in flushing and j - 1 not in flushing]
        out = {"steps_each": len(on), "stopped_early": stopped,
               "median_on_s": statistics.median(on), "median_off_s": statistics.median(off),
               "median_ratio": statistics.median(on) / statistics.median(off),
               "mean_ratio": statistics.mean(on) / statistics.mean(off),
               # without the on-steps that write a record and the ones after them
               "steady_median_ratio": statistics.median(steady) / statistics.median(off)
               if steady else None,
               "off_range_s": [min(off), max(off)], "on_range_s": [min(on), max(on)],
               "on_steps_with_a_flush": len(flushing)}
        if self.cuda:
            out["peak_memory_mb"] = {
                "off": max(peaks["off"]), "on": max(peaks["on"]),
                "extra_on": max(peaks["on"]) - max(peaks["off"]),
                "on_flush_steps": max(peaks["on_flush"]) if peaks["on_flush"] else None}
        else:
            out["peak_memory_mb"] = "skipped: no CUDA"
        return out

    def _finish_step(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def kernels(self) -> dict:
        """Kernels of one forward without the hooks and one with them (their drain of the
        previous forward's deferred statistics included), and of the bookkeeping calls
        (``log_step`` and the step context) of a step with nothing due."""
        while self.scoped.due(self.k) or self.scoped.due(self.k - 1):
            self.step(True)  # a step that neither writes nor completes a record
        batch, k = self.batch, self.k
        self.hooks.set(False)
        loss, n_off = profiled(lambda: self.fwd(**batch).loss, self.cuda)
        self._finish_step(loss)
        self.hooks.set(True)
        _, n_log_step = profiled(lambda: self.mon.log_step(k), self.cuda)
        loss, n_on = profiled(lambda: self.fwd(**batch).loss, self.cuda)
        self._finish_step(loss)

        def bookkeeping():
            with self.mon.step(k, mode="train") as h:
                h.log(loss=loss.detach(), lr=self.opt.param_groups[0]["lr"])

        _, n_ctx = profiled(bookkeeping, self.cuda)
        self.k += 1
        return {"kind": "CUDA kernels + memcpy/memset" if self.cuda else "CPU ops (no CUDA)",
                "forward_without": n_off, "forward_with": n_on,
                "extra_per_forward": n_on - n_off,
                "extra_per_step_bookkeeping": n_log_step + n_ctx}

    def flushes(self) -> dict:
        f, book = self.scoped.flushes, self.scoped.bookkeeping_ms
        return {"ms": [round(x["ms"], 2) for x in f], "steps": [x["step"] for x in f],
                "median_ms": statistics.median([x["ms"] for x in f]) if f else None,
                "bookkeeping_ms_median": statistics.median(book) if book else None,
                "note": "a flush: the due step's context exit and the next log_step, "
                        "synchronised before and after; the first (step 0, in the warm-up) "
                        "also decides participation"}

    def close(self) -> dict:
        t = time.perf_counter()
        self.mon.finalize()
        finalize_ms = (time.perf_counter() - t) * 1e3
        self.hooks.set(False)
        self.hooks.entries.clear()  # they hold the modules
        records = part_records(self.run_dir, "overhead")
        self.model = self.opt = self.batch = self.fwd = None
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        return {"finalize_ms": finalize_ms, "records": {p: len(r) for p, r in records.items()}}


def check_overhead(args, dl: Deadline, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    if not cuda and not args.cpu:
        return {"status": "skipped",
                "reason": "no CUDA: the real size needs a GPU (--cpu runs tiny widths)"}
    lora = args.lora == "on" or (args.lora == "auto" and importlib.util.find_spec("peft")
                                 is not None)
    cfg, out = choose_size(args, device, lora)
    out["config"] = describe(cfg)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = OverheadRun(cfg, device, lora, Path(tmp) / "overhead")
        out.update(run.info)
        lora_on = isinstance(run.info["lora"], dict)
        out["trained"] = ("FiLM scale/shift, LFP + MoE routers, projectors, aggregation "
                          "tokens, proprio projector in full" + (
                              f" + LoRA r={LORA_RANK}" if lora_on else
                              "; the rest frozen (no LoRA: " + (
                                  "peft failed)" if lora else "--lora off)" if args.lora == "off"
                                  else "peft not importable)")))
        pairs = 2 if cuda else 1
        out["batch_size"], out["out_of_memory_at_batch"] = run.warm_up(args.batch_size, pairs)
        out["warmup_pairs"] = pairs
        print(f"  batch {out['batch_size']}: alternating {args.steps} steps each", flush=True)
        out.update(run.alternate(args.steps, dl, reserve_s=10 if args.cpu else 30))
        try:
            out["kernels"] = run.kernels()
        except Exception as exc:  # noqa: BLE001 - keep the timings if the profiler fails
            out["kernels"] = {"failed": f"{type(exc).__name__}: {exc}"[:300]}
        out["flush"] = run.flushes()
        out.update(run.close())
    out["warnings"] = sorted({str(w.message)[:300] for w in caught})[:5]
    if cuda:
        out["goal"] = {"target_median_ratio": GOAL_RATIO,
                       "met": out["median_ratio"] <= GOAL_RATIO,
                       "at_batch_16": out["batch_size"] == 16}
    problems = []
    if out["hooks_captured"] != out["hooks_registered"]:
        problems.append(f"captured {out['hooks_captured']} hooks, the observers hold "
                        f"{out['hooks_registered']}: 'off' steps may not be monitor-free")
    if not all(out["records"].values()):
        problems.append(f"a part wrote no record: {out['records']}")
    if "failed" in out["kernels"]:
        problems.append(f"kernel count: {out['kernels']['failed']}")
    out["status"] = "failed" if problems else "ok"
    if problems:
        out["reason"] = "; ".join(problems)
    return out


# -- main ------------------------------------------------------------------------------------------

def environment(device: torch.device) -> dict:
    env = machine()
    env["torch_cuda"] = torch.version.cuda
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}")
        with contextlib.suppress(Exception):
            v = torch.cuda.nccl.version()
            env["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    from importlib import metadata

    for name in ("peft", "timm", "transformers", "pytest", "numpy"):
        try:
            env[name] = metadata.version(name)  # without importing it
        except metadata.PackageNotFoundError:
            env[name] = None
    return env


def summary(name: str, r: dict) -> str:
    if r.get("status") != "ok":
        return r.get("reason", "")
    if name == "cuda_tests":
        return f"{r['passed']} passed, {r['skipped']} skipped"
    if name == "sync":
        mode = "on" if r["sync_debug_mode"].startswith("error") else "skipped (no CUDA)"
        return (f"{r['steps_checked']} steps: {r['host_syncs_from_monitor']} host syncs from "
                f"monitor code; sync debug mode 'error': {mode}")
    if name in ("nccl_one_rank", "gloo_two_ranks"):
        return (f"{r['records']} records, {r['metrics_compared']} metrics = numpy (worst rel "
                f"{r['worst_rel_error_mean_std']:.1e}); collectives/flush "
                f"{r['collectives_per_flush']}")
    if name == "overhead":
        kern = r["kernels"]
        if "failed" in kern:
            kern = {"extra_per_forward": "?", "kind": ""}
        mem = r["peak_memory_mb"]
        mem = (f"peak {mem['off']:.0f} -> {mem['on']:.0f} MB" if isinstance(mem, dict) else mem)
        flush = r["flush"]["median_ms"]
        flush = f"{flush:.1f} ms" if flush is not None else "not measured"
        return (f"batch {r['batch_size']}, {r['steps_each']} steps each: median ratio "
                f"{r['median_ratio']:.4f} (mean {r['mean_ratio']:.4f}); "
                f"+{kern['extra_per_forward']} "
                f"{'CPU ops' if 'no CUDA' in kern['kind'] else 'kernels'}/forward; flush "
                f"{flush}; {mem}")
    return ""


def print_table(results: dict) -> None:
    print("\n" + "=" * 100)
    print(f"gpu_check ({results['mode']}): {results['environment'].get('gpu') or 'no GPU'}, "
          f"torch {results['environment']['torch']}, CUDA {results['environment']['torch_cuda']}"
          f", {results['seconds_total']:.0f} s")
    print(f"{'section':<16} {'status':<8} {'s':>6}  figures")
    for name, r in results["sections"].items():
        print(f"{name:<16} {r.get('status', '?'):<8} {r.get('seconds', 0):>6.1f}  "
              f"{summary(name, r)}")
    o = results["sections"].get("overhead", {})
    if o.get("status") == "ok":
        print(f"  overhead size: {o['size']}; {o['trained']}")
        if o.get("stopped_early"):
            print(f"  overhead loop stopped early: {o['stopped_early']}")
        if "goal" in o:
            print(f"  goal: median step ratio <= {GOAL_RATIO} at batch 16: "
                  f"{'MET' if o['goal']['met'] and o['goal']['at_batch_16'] else 'NOT MET'}")
    print("=" * 100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny widths, a few steps, no GPU needed")
    p.add_argument("--out", default=None, help="JSON path (default gpu-check-results.json "
                   "in $OUT or the repository; --cpu: gpu-check-results-cpu.json)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--deadline-s", type=float, default=None,
                   help="stop starting work after this (default 420 s; --cpu 50 s)")
    p.add_argument("--steps", type=int, default=None, help="overhead: steps each (30; --cpu 3)")
    p.add_argument("--batch-size", type=int, default=None, help="overhead: first try (16; --cpu 2)")
    p.add_argument("--layers", type=int, default=32, help="overhead: Llama layers (32 = real)")
    p.add_argument("--sync-steps", type=int, default=None, help="sync: steps checked (5; --cpu 2)")
    p.add_argument("--lora", choices=("auto", "on", "off"), default=None,
                   help="overhead: LoRA r=32 through peft (auto: when importable; --cpu: off, "
                        "importing peft costs more than the rest of a --cpu run)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    args.deadline_s = args.deadline_s or (50.0 if args.cpu else 420.0)
    args.steps = args.steps or (3 if args.cpu else 30)
    args.batch_size = args.batch_size or (2 if args.cpu else 16)
    args.sync_steps = args.sync_steps or (2 if args.cpu else 5)
    args.lora = args.lora or ("off" if args.cpu else "auto")
    if args.cpu:
        torch.set_num_threads(1)
    name = "gpu-check-results-cpu.json" if args.cpu else "gpu-check-results.json"
    out_path = Path(args.out) if args.out else Path(os.environ.get("OUT") or ROOT) / name
    dl = Deadline(args.deadline_s)
    # a hard timeout's SIGTERM unwinds like Ctrl-C: spawned ranks are killed, JSON kept
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
               "mode": "cpu" if args.cpu else ("gpu" if cuda else "no CUDA"),
               "time": time.time(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "deadline_s": args.deadline_s, "environment": environment(device),
               "sections": {}}
    print(f"gpu_check: mode {results['mode']}, device {device}, deadline {args.deadline_s:.0f} s,"
          f" writing {out_path}", flush=True)
    runners = {
        "cuda_tests": lambda: check_cuda_tests(args, dl, cuda),
        "sync": lambda: check_sync(args, dl, device),
        "nccl_one_rank": lambda: check_world(args, dl, device, 1, "nccl"),
        "gloo_two_ranks": lambda: check_world(args, dl, device, 2, "gloo"),
        "overhead": lambda: check_overhead(args, dl, device),
    }
    t_start = time.perf_counter()
    for section in SECTIONS:
        if section not in args.sections:
            continue
        t0 = time.perf_counter()
        if dl.left() <= (60 if section == "overhead" and not args.cpu else 5):
            r = {"status": "skipped", "reason": f"deadline: {dl.left():.0f} s left"}
        else:
            print(f"\n[{section}] ({dl.left():.0f} s left)", flush=True)
            try:
                r = runners[section]()
            except (KeyboardInterrupt, SystemExit):
                results["interrupted_in"] = section
                out_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
                raise
            except Exception as exc:  # noqa: BLE001 - one failing section must not stop the rest
                r = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:500],
                     "traceback": traceback.format_exc()[-3000:]}
            finally:
                if cuda:
                    with contextlib.suppress(Exception):
                        torch.cuda.set_sync_debug_mode(0)
        r["seconds"] = round(time.perf_counter() - t0, 1)
        results["sections"][section] = r
        results["seconds_total"] = round(time.perf_counter() - t_start, 1)
        print(f"[{section}] {r['status']} in {r['seconds']:.1f} s: {summary(section, r)}",
              flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    results["seconds_total"] = round(time.perf_counter() - t_start, 1)
    out_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print_table(results)
    print(f"wrote {out_path}")
    return 1 if any(r["status"] == "failed" for r in results["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
