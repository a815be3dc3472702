"""Multi-node configs and launch: the tiny CLIP as 2 nodes x 1 process on localhost equals one process.

* ``test_two_nodes_on_localhost_match_one_process`` (slow): two ``python -m experiments fit`` processes with the
  environment a cluster sets by hand (``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``; Lightning's ``LightningEnvironment``), ``trainer/ddp.yaml`` with ``num_nodes=2, devices=1`` (gloo).
  Each rank records its batches and losses; one process then trains from the same initial weights on the
  concatenated global batches, and its per-step losses must equal the mean of the ranks' losses (open_clip's
  ``local_loss`` + ``gather_with_grad``; tests/test_clip_distributed.py checks one step's gradients, this one checks
  several optimizer steps through Lightning's DDP).
* The trainer overlays keep each family's global batch (the paper's) and wrap each family's transformer blocks.

No GPU in the session that wrote this: the FSDP overlays are checked for their wrap classes against the families'
tiny models and with torch's FSDP on CPU (one process), not trained under Lightning's FSDPStrategy (GPU only).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import free_port, write_shards
from test_configs import parser  # noqa: F401 - the module-scoped LightningCLI parser fixture

from experiments.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments/configs"
PER_RANK_BATCH, STEPS = 4, 4
# ~15 s of CPU per node process (imports); generous because the test machines' 2 cores are often shared
NODE_TIMEOUT_S = 900


class RecordSteps(L.Callback):
    """Saves this rank's batches, losses and topology to ``out_dir/rank<R>.pt``, and rank 0's initial weights."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.steps: list[dict] = []

    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank == 0:
            torch.save(pl_module.model.state_dict(), self.out_dir / "init.pt")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append({"key": list(batch["key"]), "image": batch["image"].clone(), "text": batch["text"].clone()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[-1]["loss"] = float(outputs["loss"])

    def on_train_end(self, trainer, pl_module):
        topology = {
            "world_size": trainer.world_size,
            "global_rank": trainer.global_rank,
            "node_rank": trainer.node_rank,
        }
        env = type(getattr(trainer.strategy, "cluster_environment", None)).__name__  # NoneType: one process
        torch.save({"steps": self.steps, "env": env, **topology}, self.out_dir / f"rank{trainer.global_rank}.pt")


class ReplayGlobalBatches(L.LightningDataModule):
    """Step i yields rank 0's and rank 1's recorded batches of step i, concatenated: the global batch."""

    def __init__(self, recorded_dir: str):
        super().__init__()
        ranks = [torch.load(Path(recorded_dir) / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
        self.batches = [
            {
                "image": torch.cat([s0["image"], s1["image"]]),
                "text": torch.cat([s0["text"], s1["text"]]),
                "key": s0["key"] + s1["key"],
            }
            for s0, s1 in zip(ranks[0]["steps"], ranks[1]["steps"], strict=True)
        ]
        self.batch_size = len(self.batches[0]["key"])

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.batches, batch_size=None)


def _common_args(tmp_path: Path) -> list[str]:
    return [
        "fit",
        "--config",
        str(CONFIGS / "trainer/cpu.yaml"),
        "--config",
        str(CONFIGS / "debug/tiny_clip.yaml"),
        f"--trainer.max_steps={STEPS}",
        "--trainer.val_check_interval=null",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
    ]


@pytest.mark.slow
@pytest.mark.timeout(NODE_TIMEOUT_S + 300)
def test_two_nodes_on_localhost_match_one_process(tmp_path):
    write_shards(tmp_path / "web", [16, 16, 16, 16], image_size=64)
    (tmp_path / "record.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": [_recorder(tmp_path)]}}))
    node_args = _common_args(tmp_path) + [
        "--config",
        str(CONFIGS / "trainer/ddp.yaml"),
        "--config",
        str(tmp_path / "record.yaml"),  # replaces cpu.yaml's checkpoint callback
        "--trainer.accelerator=cpu",
        "--trainer.num_nodes=2",
        "--trainer.devices=1",
        f"--data.init_args.train_shards={tmp_path / 'web'}",
        "--data.init_args.val_shards=null",
        f"--data.init_args.batch_size={PER_RANK_BATCH}",
        "--data.init_args.num_workers=0",
    ]
    port = free_port()
    procs = []
    for node_rank in (0, 1):  # what a cluster's launcher exports on each node
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "NODE_RANK": str(node_rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": "0",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
        }
        cmd = [sys.executable, "-m", "experiments", *node_args]
        with (tmp_path / f"node{node_rank}.log").open("w") as log:
            procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=NODE_TIMEOUT_S) for p in procs]
    finally:
        for p in procs:  # a rank that died leaves the other waiting in a collective: never leave it running
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = {r: (tmp_path / f"node{r}.log").read_text()[-3000:] for r in (0, 1)}
    assert codes == [0, 0], logs

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for r, rec in enumerate(ranks):
        assert (rec["world_size"], rec["global_rank"], rec["node_rank"]) == (2, r, r)
        assert rec["env"] == "LightningEnvironment"
        assert len(rec["steps"]) == STEPS
        assert all(len(s["key"]) == PER_RANK_BATCH for s in rec["steps"])
    seen = [{k for s in rec["steps"] for k in s["key"]} for rec in ranks]
    assert not seen[0] & seen[1], "the two nodes read the same samples"
    assert seen[0]
    assert seen[1]  # (a rank's 32 samples repeat inside its shuffle buffer: fewer than 16 distinct keys)

    # One process, the same start, the global batches: the loss of step i is the mean of the ranks' step-i losses.
    (tmp_path / "single").mkdir()
    (tmp_path / "replay.yaml").write_text(
        yaml.safe_dump(
            {
                "trainer": {"callbacks": [_recorder(tmp_path / "single")]},
                "data": {
                    "class_path": "test_multinode.ReplayGlobalBatches",
                    "init_args": {"recorded_dir": str(tmp_path)},
                },
            }
        )
    )
    single = cli_main(
        _common_args(tmp_path)
        + ["--config", str(tmp_path / "replay.yaml"), f"--model.init_args.init_from={tmp_path / 'init.pt'}"]
    )
    assert single.trainer.world_size == 1
    replayed = torch.load(tmp_path / "single/rank0.pt", weights_only=True)["steps"]
    global_keys = [s0["key"] + s1["key"] for s0, s1 in zip(ranks[0]["steps"], ranks[1]["steps"], strict=True)]
    assert [s["key"] for s in replayed] == global_keys
    losses = [[s["loss"] for s in rec["steps"]] for rec in ranks]
    two_nodes = torch.tensor(losses, dtype=torch.float64).mean(0)
    reference = torch.tensor([s["loss"] for s in replayed], dtype=torch.float64)
    torch.testing.assert_close(reference, two_nodes, rtol=2e-5, atol=2e-6)
    # not trivially equal: each rank's own loss is not the global one, and the optimizer steps moved the loss
    assert abs(losses[0][0] - losses[1][0]) > 1e-3
    assert abs(reference[-1] - reference[0]) > 1e-4


def _recorder(out_dir: Path) -> dict:
    return {"class_path": "test_multinode.RecordSteps", "init_args": {"out_dir": str(out_dir)}}


# ------------------------------------------------------------------------------------- the trainer overlays
PAPER_GLOBAL_BATCH = {  # family config stack -> the global batch it must train with (PAPER.md)
    ("clip/stage1.yaml",): 32768,  # §5.1
    ("clip/stage2.yaml",): 16384,  # §5.1
    ("dit/base.yaml",): 2048,  # §6
    ("captioner/stage1.yaml",): 256,  # §3, LLaVA-1.5 (INFERRED)
    ("captioner/stage1.yaml", "captioner/stage2.yaml"): 128,  # §3, LLaVA-1.5 (INFERRED)
}
FSDP_OVERLAY = {"clip": "fsdp_clip.yaml", "dit": "fsdp_dit.yaml", "captioner": "fsdp.yaml"}


def _resolved(parser, stack: list[Path]) -> dict:  # noqa: F811 - the imported fixture
    cfg = parser.parse_args(["fit"] + [a for c in stack for a in ("--config", str(c))])
    return yaml.safe_load(parser.dump(cfg))["fit"]


def _global_batch(cfg: dict) -> int:
    t = cfg["trainer"]
    return cfg["data"]["init_args"]["batch_size"] * t["devices"] * t["num_nodes"] * (t["accumulate_grad_batches"] or 1)


@pytest.mark.parametrize("overlay", ["ddp", "fsdp"])
@pytest.mark.parametrize("family", list(PAPER_GLOBAL_BATCH), ids="+".join)
def test_overlay_keeps_the_paper_global_batch(parser, family, overlay):  # noqa: F811
    name = "ddp.yaml" if overlay == "ddp" else FSDP_OVERLAY[family[0].split("/")[0]]
    stack = [CONFIGS / f for f in family]
    cfg = _resolved(parser, stack + [CONFIGS / "trainer" / name])
    assert _global_batch(cfg) == PAPER_GLOBAL_BATCH[family]
    strategy = cfg["trainer"]["strategy"]
    assert strategy["class_path"].endswith("DDPStrategy" if overlay == "ddp" else "FSDPStrategy")
    base = yaml.safe_load(stack[0].read_text())["model"]
    assert cfg["model"]["class_path"] == base["class_path"]
    if name == "fsdp_clip.yaml":  # rank-0-only evaluation would hang under FSDP
        assert base["init_args"]["evaluation"]
        assert cfg["model"]["init_args"]["evaluation"] == []
    if name == "fsdp_dit.yaml":  # diffusers' EMAModel does not follow FSDP's sharded parameters
        assert base["init_args"]["ema_decay"]
        assert cfg["model"]["init_args"].get("ema_decay") is None  # the dump leaves out None


def _classes(paths: list[str]) -> tuple[type, ...]:
    out = []
    for path in paths:
        module, name = path.rsplit(".", 1)
        out.append(getattr(importlib.import_module(module), name))
    return tuple(out)


def _tiny_models() -> dict[str, tuple[torch.nn.Module, int]]:
    """Each family's network at test size and its number of transformer blocks."""
    import open_clip
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from lightning_modules.components.dit import build_dit

    clip_cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 2},
    }
    dit = build_dit({"num_layers": 3, "hidden_size": 32, "num_attention_heads": 2, "patch_size": 2}, 4, 8, 16)
    vis = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    txt = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    llava = LlavaForConditionalGeneration(LlavaConfig(vision_config=vis, text_config=txt, image_token_index=63))
    return {
        "clip": (open_clip.CLIP(**clip_cfg, output_dict=True), 3 + 2),
        "clip_nonscalar": (open_clip.CLIP(**clip_cfg, output_dict=True, nonscalar_logit_scale=True), 3 + 2),
        "dit": (dit, 3),
        "captioner": (llava, 2 + 3),
    }


def test_fsdp_overlays_wrap_every_transformer_block():
    """The wrap classes of each FSDP overlay are the family's blocks, one unit per block (no silent no-op wrap)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    models = _tiny_models()
    policies = {}
    for family, name in FSDP_OVERLAY.items():
        strategy = yaml.safe_load((CONFIGS / "trainer" / name).read_text())["trainer"]["strategy"]["init_args"]
        wrap = _classes(strategy["auto_wrap_policy"])
        assert set(_classes(strategy["activation_checkpointing_policy"])) <= set(wrap), name
        model, blocks = models[family]
        assert sum(isinstance(m, wrap) for m in model.modules()) == blocks, name
        policies[family] = wrap

    # torch's FSDP on CPU (one process, gloo): the policy makes one unit per block plus the root ...
    port = free_port()
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=timedelta(seconds=30)
    )
    try:
        for family in ("dit", "clip_nonscalar"):
            model, blocks = models[family]
            policy = ModuleWrapPolicy(set(policies[family.split("_")[0]]))
            wrapped = FSDP(model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
            assert sum(isinstance(m, FSDP) for m in wrapped.modules()) == blocks + 1, family
        # ... and refuses open_clip's default 0-dim logit_scale (the limit fsdp_clip.yaml documents)
        with pytest.raises(ValueError, match="scalar parameters"):
            FSDP(
                models["clip"][0],
                auto_wrap_policy=ModuleWrapPolicy(set(policies["clip"])),
                use_orig_params=True,
                device_id=torch.device("cpu"),
            )
    finally:
        torch.distributed.destroy_process_group()
