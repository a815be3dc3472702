"""Every YAML under experiments/configs parses (what ``--print_config`` does) in the stack it is documented with, and
the generated paper-table rows are up to date with ``experiments/paper_tables.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from experiments import dit_tables, paper_tables
from experiments.cli import RecapCLI, cli_main

CONFIGS = Path(paper_tables.CONFIG_ROOT)


class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


class _ParserOnly(RecapCLI):
    """Build the suite's LightningCLI parser once, without parsing or instantiating anything."""

    def parse_arguments(self, parser, args):
        raise _Parsed(parser)


@pytest.fixture(scope="module")
def parser():
    try:
        _ParserOnly(
            __import__("lightning").LightningModule,
            __import__("lightning").LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=[],
        )
    except _Parsed as p:
        return p.parser
    raise AssertionError("parser was not built")


def stack_for(path: Path) -> tuple[str, list[Path]]:
    """The subcommand and config stack a YAML is documented with (its header's command line)."""
    rel = path.relative_to(CONFIGS)
    parts = rel.parts
    if parts[0] == "trainer":  # an overlay goes last, on its family's config (tests/test_multinode.py: all families)
        family = {
            "ddp.yaml": ["clip/stage1.yaml"],
            "fsdp_clip.yaml": ["clip/stage1.yaml"],
            "fsdp_dit.yaml": ["dit/base.yaml"],
            "fsdp.yaml": ["captioner/stage1.yaml", "captioner/stage2.yaml", "captioner/stage2_full.yaml"],
        }.get(parts[1])
        if family is None:
            return "fit", [path, CONFIGS / "debug/tiny_clip.yaml"]
        return "fit", [CONFIGS / f for f in family] + [path]
    if parts[0] == "debug":
        return "fit", [CONFIGS / "trainer/cpu.yaml", path]
    if parts[0] == "eval":
        model = {"paper.yaml": "clip/stage2.yaml", "tiny_world.yaml": "tiny/clip/stage2.yaml"}.get(parts[1])
        if model is None:  # a model-only eval config: layered on the paper's evaluation
            return "test", [CONFIGS / "eval/paper.yaml", path]
        return "test", [CONFIGS / model, path]
    if parts[0] == "captioner" or parts[:2] == ("tiny", "captioner"):
        below = {
            "stage2": ["stage1"],
            "stage2_full": ["stage1", "stage2"],
            "caption_tune": ["stage1", "stage2"],
            "stage1_caption_mix": ["stage1"],
        }
        if path.parent.name == "table1":  # ROW.STAGE.yaml on that stage's own stack (paper Table 1)
            stage = path.stem.rsplit(".", 1)[1]
            stages = [*below.get(stage, []), stage]
            return "fit", [path.parent.parent / f"{name}.yaml" for name in stages] + [path]
        stack = [path.parent / f"{name}.yaml" for name in below.get(path.stem, [])] + [path]
        if path.stem == "stage2_full":
            stack.append(CONFIGS / "trainer/fsdp.yaml")
        return "fit", stack
    if parts[0] == "dit" or parts[:2] == ("tiny", "dit"):
        dit = CONFIGS / ("tiny/dit" if parts[0] == "tiny" else "dit")
        if path.name == "base.yaml":
            return "fit", [path]
        if path.name == "sample.yaml":
            return "predict", [dit / "base.yaml", dit / "table7/p0.0.yaml", path]
        if path.name == "cached.yaml":
            return "fit", [dit / "base.yaml", dit / "table7/p0.5.yaml", path]
        return "fit", [dit / "base.yaml", path]
    base = CONFIGS / ("tiny/clip" if parts[0] == "tiny" else "clip")
    if path.parent == base:
        return "fit", [path]
    if path.name == "baselines.yaml":
        return "test", [CONFIGS / "eval/paper.yaml", path]
    stage = 2 if path.name.endswith(".stage2.yaml") else 1
    return "fit", [base / f"stage{stage}.yaml", path]


# Not LightningCLI configs: recaption/*.yaml (`python -m experiments recaption`; tests/test_recaption.py loads them),
# reproduce/*.yaml (`python -m experiments reproduce` profiles; tests/test_reproduce.py) and tiny/world/*.yaml
# (`python -m experiments world --config`; test_world_configs_build_a_world_config below).
NOT_LIGHTNING = {("recaption",), ("reproduce",), ("tiny", "world")}
ALL = sorted(
    p
    for p in CONFIGS.rglob("*.yaml")
    if not any(p.relative_to(CONFIGS).parts[: len(prefix)] == prefix for prefix in NOT_LIGHTNING)
)


@pytest.mark.parametrize("config", sorted((CONFIGS / "tiny/world").glob("*.yaml")), ids=lambda p: p.name)
def test_world_configs_build_a_world_config(config):
    from datamodules.tiny_world import WorldConfig
    from experiments.world import build_parser

    args = build_parser().parse_args(["--config", str(config), "--out", "unused"])
    cfg = WorldConfig(**args.world.as_dict())
    stated = yaml.safe_load(config.read_text())["world"]
    assert cfg.scene.object_count_probs == tuple(stated["scene"]["object_count_probs"])
    assert cfg.scene.large_size == stated["scene"]["large_size"]
    assert cfg.n_t2i == stated["n_t2i"]


def test_generated_rows_are_current():
    stale = paper_tables.write(check=True)
    assert not stale, f"run `python -m experiments.paper_tables`: out of date: {stale[:5]}"
    stale = dit_tables.write(check=True)
    assert not stale, f"run `python -m experiments.dit_tables`: out of date: {stale[:5]}"


def test_every_table_row_has_both_stages_at_both_scales():
    for scale in ("clip", "tiny/clip"):
        for name, table in [*paper_tables.TABLES.items(), ("table2", paper_tables.TABLE2)]:
            stems = {p.name for p in (CONFIGS / scale / name).glob("*.yaml")}
            for row in table.rows:
                assert {f"{row.id}.yaml", f"{row.id}.stage2.yaml"} <= stems, (scale, name, row.id)


@pytest.mark.parametrize("config", ALL, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_parses_in_its_stack(parser, config):
    command, stack = stack_for(config)
    args = [command] + [a for c in stack for a in ("--config", str(c))]
    cfg = parser.parse_args(args)
    dumped = yaml.safe_load(parser.dump(cfg))[command]
    assert dumped["model"]["class_path"].startswith("lightning_modules.")
    assert dumped["data"]["class_path"].startswith("datamodules.")
    if config.name == "cached.yaml":  # swapping in the cache keeps the row's p
        assert dumped["data"]["init_args"]["p_original"] == 0.5
        assert dumped["data"]["class_path"] == "datamodules.latent_cache.LatentCacheDataModule"
    if "/dit/" in str(config) and "/table7/" in str(config):
        row_cfg = yaml.safe_load(config.read_text())
        assert dumped["data"]["init_args"]["p_original"] == row_cfg["data"]["init_args"]["p_original"]
        assert dumped["model"]["init_args"]["size"] == ("DiT-L/2" if "l2_" in config.name else
                                                        yaml.safe_load((config.parents[1] / "base.yaml").read_text())
                                                        ["model"]["init_args"]["size"])  # fmt: skip
    elif "/table1/" in str(config):  # captioner rows: the run directory and the previous stage of the same row
        row_cfg = yaml.safe_load(config.read_text())
        for cfg in (row_cfg, dumped):  # real-scale rows log to [CSV, W&B]: the CSV logger (first) is the run dir
            if isinstance(cfg["trainer"]["logger"], list):
                cfg["trainer"]["logger"] = cfg["trainer"]["logger"][0]
        name = row_cfg["trainer"]["logger"]["init_args"]["name"]
        assert dumped["trainer"]["logger"]["init_args"]["name"] == name
        save_dir = row_cfg["trainer"]["logger"]["init_args"]["save_dir"]
        start = {"stage2": "init_from", "caption_tune": "init_from" if "/tiny/" in str(config) else "pretrained"}
        key = start.get(config.stem.rsplit(".", 1)[1])
        if key is not None:
            assert dumped["model"]["init_args"][key].startswith(f"{save_dir}/{name}/"), dumped["model"]["init_args"]
    elif "/table" in str(config) and config.name != "baselines.yaml":
        row_cfg = yaml.safe_load(config.read_text())
        for cfg in (row_cfg, dumped):  # real-scale rows log to [CSV, W&B]: the CSV logger (first) is the run dir
            if isinstance(cfg["trainer"]["logger"], list):
                cfg["trainer"]["logger"] = cfg["trainer"]["logger"][0]
        # the row's own settings survive the stacking (last config wins)
        assert dumped["data"]["init_args"].get("p_original") == row_cfg["data"]["init_args"]["p_original"]
        assert dumped["trainer"]["logger"]["init_args"]["name"] == row_cfg["trainer"]["logger"]["init_args"]["name"]
        if config.name.endswith(".stage2.yaml"):
            init_from = dumped["model"]["init_args"]["init_from"]
            assert init_from.endswith(
                f"{row_cfg['trainer']['logger']['init_args']['name']}/stage1/checkpoints/last.ckpt"
            )
            stage1 = yaml.safe_load((config.parent / config.name.replace(".stage2", "")).read_text())
            assert stage1["model"]["init_args"].get("init_from") is None


def test_stage_recipes_follow_the_paper(parser):
    """The real-scale stage configs carry PAPER.md §5's numbers: peak lr = base lr x global batch / 256."""
    for stage, (samples, warmup, batch, base_lr, size, peak) in {
        1: (2_560_000_000, 51_200_000, 32768, 8e-6, 112, 1.024e-3),
        2: (128_000_000, 25_600_000, 16384, 4e-7, 224, 2.56e-5),
    }.items():
        cfg = yaml.safe_load((CONFIGS / f"clip/stage{stage}.yaml").read_text())
        t, m, d = cfg["trainer"], cfg["model"]["init_args"], cfg["data"]["init_args"]
        global_batch = d["batch_size"] * t["devices"] * t["num_nodes"]
        assert global_batch == batch
        assert (m["total_samples"], m["warmup_samples"], m["image_size"]) == (samples, warmup, size)
        assert m["lr_per_256"] == base_lr
        assert m["lr_per_256"] * global_batch / 256 == pytest.approx(peak)
        assert (m["context_length"], m["weight_decay"], m["betas"]) == (128, 0.2, [0.9, 0.95])


def test_cli_print_config_of_a_row(capsys):
    """The full --print_config path once (the parametrized test above reuses one parser for speed)."""
    args = [
        "fit",
        "--config",
        str(CONFIGS / "clip/stage2.yaml"),
        "--config",
        str(CONFIGS / "clip/table5/p0.6.stage2.yaml"),
    ]
    with pytest.raises(SystemExit) as exc:
        cli_main(args + ["--print_config"])
    assert exc.value.code in (None, 0)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["model"] == "recap-clip:B-16:large"
    assert printed["data"]["init_args"]["p_original"] == 0.6
    assert printed["model"]["init_args"]["init_from"] == "runs/clip/table5/p0.6/stage1/checkpoints/last.ckpt"
