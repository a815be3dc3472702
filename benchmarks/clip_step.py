"""Training-step time: ``ClipModule`` under a Lightning ``Trainer`` against open_clip's own training loop.

Both train the same open_clip model from the same weights on the same batches; ms/step from optimizer post-step
timestamps, split into forward / backward / update / other. What is held equal, figures: ``benchmarks/README.md``.

    python -m benchmarks.clip_step                        # tiny CLIP, batch 64, 60 steps/run, 3 rounds
    python -m benchmarks.clip_step --steps 100 --batch-size 128 --repeats 5 --threads 2 --json out.json
    python -m benchmarks.clip_step --profile 40           # cProfile one run of each instead (where the time goes)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import inspect
import io
import json
import os
import pstats
import statistics
import time
from argparse import Namespace
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import torch

from benchmarks.common import fit, free_memory, loader, machine, parser, quiet, summarize, write_json

IMPLS = ("ours", "open_clip")
# The suite's tiny CLIP (experiments/configs/debug/tiny_clip.yaml): ViT w64 L2 at 64 px + text w64 L2, ~3.4M params.
TINY_CLIP: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
LR, WEIGHT_DECAY, BETAS = 1e-3, 0.1, (0.9, 0.98)  # the tiny config's optimizer


# ------------------------------------------------------------------------------------------------------------ inputs
def make_batches(cfg: dict[str, Any], batch_size: int, n_distinct: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """``n_distinct`` fixed (images, tokens) batches: normalised-image-like noise and EOT-terminated token rows."""
    g = torch.Generator().manual_seed(seed)
    size, ctx = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"]
    vocab = cfg["text_cfg"]["vocab_size"]
    batches = []
    for _ in range(n_distinct):
        images = torch.randn(batch_size, 3, size, size, generator=g)
        lengths = torch.randint(4, ctx, (batch_size,), generator=g)
        text = torch.randint(1, vocab - 2, (batch_size, ctx), generator=g)
        text[:, 0] = vocab - 2  # SOT
        text[torch.arange(batch_size), lengths] = vocab - 1  # EOT: the highest id, where the text tower pools
        text[torch.arange(ctx)[None, :] > lengths[:, None]] = 0  # padding
        batches.append((images, text))
    return batches


def reference_state(cfg: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    import open_clip

    torch.manual_seed(seed)
    return {k: v.clone() for k, v in open_clip.CLIP(**cfg, output_dict=True).state_dict().items()}


# ------------------------------------------------------------------------------------------------------------ timing
class StepClock:
    """Under ``phases(model)``, a post-step hook of every optimizer: wall and CPU time after every step (stamp 0: its
    creation) and the running sums of the time in the model's forward, ``Tensor.backward`` and the AdamW update.
    The rest of a step (loss, data, scheduler, logging, the loop's own Python) is the **other** time, where the two
    loops can differ."""

    PHASES = ("forward", "backward", "update")

    def __init__(self):
        self.wall, self.cpu = [time.perf_counter()], [time.process_time()]
        self._acc = dict.fromkeys(self.PHASES, 0.0)
        self.sums = [tuple(self._acc.values())]
        self._fwd_t0 = 0.0
        self.threads: int | None = None

    def __call__(self, optimizer, args, kwargs) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.sums.append(tuple(self._acc.values()))
        if self.threads is None:
            self.threads = torch.get_num_threads()

    @contextlib.contextmanager
    def phases(self, model: torch.nn.Module):
        import torch.optim.adam as adam_mod
        from torch.optim.optimizer import register_optimizer_step_post_hook

        def fwd_pre(module, args):
            self._fwd_t0 = time.perf_counter()

        def fwd_post(module, args, out):
            self._acc["forward"] += time.perf_counter() - self._fwd_t0

        def timed(name, fn):
            def wrapper(*args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self._acc[name] += time.perf_counter() - t0

            return wrapper

        handles = [model.register_forward_pre_hook(fwd_pre), model.register_forward_hook(fwd_post)]
        handles.append(register_optimizer_step_post_hook(self))
        backward, adam = torch.Tensor.backward, adam_mod.adam
        torch.Tensor.backward, adam_mod.adam = timed("backward", backward), timed("update", adam)
        try:
            yield self
        finally:
            torch.Tensor.backward, adam_mod.adam = backward, adam
            for h in handles:
                h.remove()

    def summary(self, t_end: float, skip: int) -> dict[str, Any]:
        steps = len(self.wall) - 1
        if steps <= skip:
            raise RuntimeError(f"only {steps} optimizer steps ran; need more than --skip-steps {skip}")
        timed = steps - skip
        intervals = [b - a for a, b in zip(self.wall[skip:-1], self.wall[skip + 1 :], strict=True)]
        ms_per_step = 1e3 * (self.wall[-1] - self.wall[skip]) / timed
        phases = {
            f"{name}_ms": 1e3 * (self.sums[-1][i] - self.sums[skip][i]) / timed for i, name in enumerate(self.PHASES)
        }
        return {
            "steps": steps,
            "timed_steps": timed,
            "ms_per_step": ms_per_step,
            "median_interval_ms": 1e3 * statistics.median(intervals),
            "cpu_ms_per_step": 1e3 * (self.cpu[-1] - self.cpu[skip]) / timed,
            **phases,
            "other_ms": ms_per_step - sum(phases.values()),
            "first_step_s": self.wall[1] - self.wall[0],
            "total_s": t_end - self.wall[0],
            "threads_in_step": self.threads,
        }


# ------------------------------------------------------------------------------------------------------------- ours
def run_ours(cfg, state, batches, steps: int, warmup: int, clock: StepClock) -> torch.nn.Module:
    """``ClipModule`` fitted by a Lightning ``Trainer`` for ``steps`` steps; returns the trained open_clip model."""
    from lightning_modules.clip import ClipModule

    module = ClipModule(model=cfg, lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS, warmup_steps=warmup)
    module.model.load_state_dict(state)
    with clock.phases(module.model):
        fit(module, [{"image": i, "text": t} for i, t in batches], steps, [], accelerator="cpu")
    return module.model


# -------------------------------------------------------------------------------------------------------- open_clip
def open_clip_optimizer(model: torch.nn.Module, lr: float, wd: float, betas, eps: float) -> torch.optim.Optimizer:
    """open_clip_train.main's AdamW param groups."""

    def exclude(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = list(model.named_parameters())
    gain_or_bias = [p for n, p in named if exclude(n, p) and p.requires_grad]
    rest = [p for n, p in named if not exclude(n, p) and p.requires_grad]
    groups = [{"params": gain_or_bias, "weight_decay": 0.0}, {"params": rest, "weight_decay": wd}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def run_open_clip(cfg, state, batches, steps: int, warmup: int, clock: StepClock, eps: float) -> torch.nn.Module:
    """One epoch of ``open_clip_train.train.train_one_epoch`` over ``steps`` batches; returns the trained model."""
    import open_clip
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch

    model = open_clip.CLIP(**cfg, output_dict=True)
    model.load_state_dict(state)
    optimizer = open_clip_optimizer(model, LR, WEIGHT_DECAY, BETAS, eps)
    scheduler = cosine_lr(optimizer, LR, warmup, steps)
    batches_of = loader(batches, steps)
    batches_of.num_batches, batches_of.num_samples = steps, steps * len(batches[0][0])  # as open_clip_train.data does
    data = {"train": SimpleNamespace(dataloader=batches_of, set_epoch=lambda epoch: None)}
    # what train_one_epoch reads from open_clip's argparse namespace (open_clip_train.params defaults)
    off = dict.fromkeys(("distill", "skip_scheduler", "horovod", "wandb", "distributed"), False)
    loop = {"accum_freq": 1, "grad_clip_norm": None, "log_every_n_steps": 100, "batch_size": len(batches[0][0])}
    args = Namespace(device="cpu", precision="fp32", rank=0, local_rank=0, world_size=1, **off, **loop)
    with clock.phases(model):
        train_one_epoch(model, data, open_clip.ClipLoss(), 0, optimizer, None, scheduler, None, args)
    return model


# -------------------------------------------------------------------------------------------------------------- runs
def time_run(impl: str, cfg, state, batches, steps: int, skip: int, eps: float) -> tuple[dict[str, Any], Any]:
    warmup = max(1, steps // 10)  # lr warm-up (10 %, as the tiny config): the same schedule on both sides
    free_memory()
    clock = StepClock()
    if impl == "ours":
        model = run_ours(cfg, state, batches, steps, warmup, clock)
    else:
        model = run_open_clip(cfg, state, batches, steps, warmup, clock, eps)
    t1 = time.perf_counter()
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return clock.summary(t1, skip), final


def _max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def format_table(result: dict[str, Any]) -> str:
    columns = {"median": "ms/step (median)", "min": "min", "max": "max", "median_interval_ms": "median step"}
    columns |= {"cpu_ms_per_step": "CPU ms/step", "forward_ms": "forward", "backward_ms": "backward"}
    columns |= {"update_ms": "update", "other_ms": "other", "first_step_s": "first step s"}
    table = pd.DataFrame(result["summary"]).T[list(columns)].rename(columns=columns).rename_axis("impl")
    paired = ", ".join(f"{r:.3f}" for r in result["paired_ratios"])
    moved, steps = min(result["weights_moved"]), result["settings"]["steps"]
    return "\n".join(
        [
            table.to_markdown(floatfmt=".2f"),
            f"ratio (ours/open_clip): {result['ratio']:.3f}",
            f"other time (step minus model forward, backward and AdamW update), ours - open_clip: "
            f"{result['other_ms_diff']:+.2f} ms/step (median of paired differences)",
            f"paired ratio per round: {paired} (median {result['paired_ratio_median']:.3f})",
            f"same work: max |weight difference| after {steps} steps, ours vs open_clip: "
            f"{max(result['weight_diffs']):.2e} (training moved them by up to {moved:.2e})",
        ]
    )


# ----------------------------------------------------------------------------------------------------------- profile
def _package(filename: str) -> str:
    if filename.startswith(("~", "<")):
        return "builtins (C calls, incl. torch ops)"
    if "site-packages/" in filename:
        return filename.split("site-packages/")[1].split("/")[0]
    ours = [top for top in ("lightning_modules", "benchmarks", "datamodules") if top in Path(filename).parts]
    return ours[0] if ours else "python stdlib / other"


def profile_run(impl: str, cfg, state, batches, steps: int, eps: float, top: int = 25) -> str:
    """cProfile one run; own (tottime) seconds grouped by package, then the top functions by cumulative time."""
    prof = cProfile.Profile()
    prof.runcall(time_run, impl, cfg, state, batches, steps, 0, eps)
    stats = pstats.Stats(prof)
    by_pkg: dict[str, float] = collections.defaultdict(float)
    for (filename, _, _), (_, _, tottime, _, _) in stats.stats.items():
        by_pkg[_package(filename)] += tottime
    out = io.StringIO()
    out.write(f"=== {impl}: {steps} steps, {stats.total_tt:.2f} s under cProfile; own time by package ===\n")
    for pkg, t in sorted(by_pkg.items(), key=lambda kv: -kv[1])[:12]:
        out.write(f"  {t:7.3f} s  {pkg}\n")
    stats.stream = out
    stats.sort_stats("cumulative").print_stats(top)
    out.write(f"--- {impl}: the loop's own Python (lightning*, open_clip_train), by own time ---\n")
    stats.sort_stats("tottime").print_stats(r"lightning|open_clip_train", 15)
    return out.getvalue()


# -------------------------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table and return the result (``summary``, ``runs``, ``ratio``, settings)."""
    p = parser("clip_step", __doc__)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60)")
    p.add_argument("--skip-steps", type=int, help="steps left out of the timing (default min(10, steps // 3))")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="rounds; each runs both sides (order alternates)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads, both sides (0: torch's)")
    p.add_argument("--distinct-batches", type=int, default=8, help="pre-built batches, cycled (default 8)")
    p.add_argument("--model", default=None, help="JSON file with an open_clip config dict (default: the tiny CLIP)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", type=int, default=0, metavar="STEPS", help="cProfile one run of each instead")
    a = p.parse_args(argv)
    if a.skip_steps is None:
        a.skip_steps = min(10, a.steps // 3)
    if not 0 <= a.skip_steps < a.steps:
        p.error("need 0 <= --skip-steps < --steps")
    with quiet(a.threads):
        return _run(a, torch.get_num_threads())


def _run(a: argparse.Namespace, threads: int) -> dict[str, Any]:
    from lightning_modules.clip import ClipModule

    cfg = json.loads(Path(a.model).read_text()) if a.model else TINY_CLIP
    state = reference_state(cfg, a.seed)
    batches = make_batches(cfg, a.batch_size, a.distinct_batches, a.seed)
    eps = inspect.signature(ClipModule.__init__).parameters["eps"].default  # open_clip's side uses ours
    n_params = sum(v.numel() for k, v in state.items() if k != "attn_mask")
    if a.profile:
        for impl in IMPLS:
            print(profile_run(impl, cfg, state, batches, a.profile, eps), flush=True)
        return {"profile": True}
    timed = f"steps {a.skip_steps + 1}..{a.steps}" if a.skip_steps else f"all {a.steps} steps"
    print(
        f"CLIP {n_params / 1e6:.2f}M params | batch {a.batch_size} | fp32 | {threads} threads | {a.steps} steps/run, "
        f"timed {timed} (optimizer post-step timestamps) | {a.repeats} rounds | {os.cpu_count()} CPUs",
        flush=True,
    )
    runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in IMPLS}
    weight_diffs, moved = [], []
    for r in range(a.repeats):
        finals = {}
        for impl in IMPLS if r % 2 == 0 else tuple(reversed(IMPLS)):
            run, finals[impl] = time_run(impl, cfg, state, batches, a.steps, a.skip_steps, eps)
            runs[impl].append(run)
            step = f"median step {run['median_interval_ms']:.2f} ms, {run['cpu_ms_per_step']:.1f} CPU ms/step"
            rest = f"other {run['other_ms']:.2f} ms, first step {run['first_step_s']:.2f} s, run {run['total_s']:.2f} s"
            head = f"  round {r + 1}/{a.repeats} {impl:<9} {run['ms_per_step']:7.2f} ms/step"
            print(f"{head} ({step}, {rest}, {run['threads_in_step']} threads)", flush=True)
        weight_diffs.append(_max_weight_diff(finals["ours"], finals["open_clip"]))
        moved.append(_max_weight_diff(finals["ours"], state))
    medians = ("median_interval_ms", "cpu_ms_per_step", "forward_ms", "backward_ms", "update_ms", "other_ms")
    summary = {impl: summarize(runs[impl], "ms_per_step", (*medians, "first_step_s")) for impl in IMPLS}
    pairs = list(zip(runs["ours"], runs["open_clip"], strict=True))
    paired = [o["ms_per_step"] / c["ms_per_step"] for o, c in pairs]
    settings = {k: getattr(a, k) for k in ("steps", "skip_steps", "batch_size", "repeats", "distinct_batches", "seed")}
    result = {"settings": settings | {"threads": threads, "model": cfg, "params": n_params}}
    result |= {"machine": machine() | {"torch": torch.__version__}, "runs": runs, "summary": summary}
    result["ratio"] = summary["ours"]["median"] / summary["open_clip"]["median"]
    result |= {"paired_ratios": paired, "paired_ratio_median": statistics.median(paired)}
    result["other_ms_diff"] = statistics.median(o["other_ms"] - c["other_ms"] for o, c in pairs)
    result |= {"weight_diffs": weight_diffs, "weights_moved": moved}
    print(format_table(result), flush=True)
    write_json(a.json, result)
    return result


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
