"""Every YAML under experiments/configs parses (what ``--print_config`` does) in the stack it is documented with, and
every paper table row (``experiments/paper_tables.py``), composed at both scales and every stage, parses and passes
``experiments/validate.py`` with the paper's p and sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from experiments import dit_tables, paper_tables
from experiments.cli import RecapCLI, cli_main
from experiments.paper_tables import row_args, run_args
from experiments.validate import validate_config
from lightning_modules.components.clip_sizes import TEXT_SIZES, VISION_SIZES, parse_model_name

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


def stack_for(path: Path) -> tuple[str, list[str]]:
    """The subcommand and arguments a YAML is documented with (its header's command line)."""
    rel = path.relative_to(CONFIGS)
    parts = rel.parts

    def configs(*paths: Path) -> list[str]:
        return [a for c in paths for a in ("--config", str(c))]

    if parts[0] == "trainer":  # an overlay goes last, on its family's config (tests/test_multinode.py: all families)
        family = {
            "ddp.yaml": ["clip/stage1.yaml"],
            "fsdp_clip.yaml": ["clip/stage1.yaml"],
            "fsdp_dit.yaml": ["dit/base.yaml"],
            "fsdp.yaml": ["captioner/stage1.yaml", "captioner/stage2.yaml", "captioner/stage2_full.yaml"],
        }.get(parts[1])
        if family is None:
            return "fit", configs(path, CONFIGS / "debug/tiny_clip.yaml")
        return "fit", configs(*[CONFIGS / f for f in family], path)
    if parts[0] == "debug":
        return "fit", configs(CONFIGS / "trainer/cpu.yaml", path)
    if parts[0] == "eval":
        model = {
            "paper.yaml": "clip/stage2.yaml",
            "long_captions.yaml": "clip/stage2.yaml",
            "tiny_world.yaml": "tiny/clip/stage2.yaml",
        }.get(parts[1])
        if model is None:  # a model-only eval config: layered on the paper's evaluation
            return "test", configs(CONFIGS / "eval/paper.yaml", path)
        return "test", configs(CONFIGS / model, path)
    if parts[0] == "captioner" or parts[:2] == ("tiny", "captioner"):
        below = {
            "stage2": ["stage1"],
            "stage2_full": ["stage1", "stage2"],
            "caption_tune": ["stage1", "stage2"],
            "stage1_caption_mix": ["stage1"],
        }
        stack = [path.parent / f"{name}.yaml" for name in below.get(path.stem, [])] + [path]
        if path.stem == "stage2_full":
            stack.append(CONFIGS / "trainer/fsdp.yaml")
        return "fit", configs(*stack)
    if parts[0] == "dit" or parts[:2] == ("tiny", "dit"):
        scale = "tiny" if parts[0] == "tiny" else "paper"
        if path.name == "sample.yaml":
            return "predict", row_args("table7", "p0.0", 1, scale) + configs(path)
        if path.name == "cached.yaml":
            return "fit", row_args("table7", "p0.5", 1, scale) + configs(path)
        return "fit", configs(path)
    if "objectives" in parts:  # a Table 8 objective goes after a CLIP row's settings
        return "fit", row_args("table3", "p0.8", 1, "tiny" if parts[0] == "tiny" else "paper") + configs(path)
    if path.name == "baselines.yaml":
        return "test", configs(CONFIGS / "eval/paper.yaml", path)
    if parts[0] == "logging":  # a logger overlay goes last, here on a table row
        return "fit", row_args("table3", "p0.8", 1, "tiny") + configs(path)
    return "fit", configs(path)  # the CLIP stage recipes


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


ROWS = [
    (table, row, stage, scale)
    for scale in ("tiny", "paper")
    for table in ("table1", "table2", *paper_tables.TABLES, "table7")
    for row in paper_tables.ROWS[table]
    for stage in {"table1": (1, 2, 3), "table7": (1,)}.get(table, (1, 2))
    if not (row == dit_tables.L2.id and scale == "tiny")  # DiT-L/2 is a paper-scale run only
]


def test_every_table_row_has_both_stages_at_both_scales():
    for scale in ("tiny", "paper"):
        for name, table in [*paper_tables.TABLES.items(), ("table2", paper_tables.TABLE2)]:
            for row in table.rows:
                for stage in (1, 2):
                    assert (name, row.id, stage, scale) in ROWS
                    assert f"clip/stage{stage}.yaml" in row_args(name, row.id, stage, scale)[1]


def test_a_bad_row_names_the_table_and_row_and_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown paper table 'table9'; valid: table1, table2, .*table7"):
        row_args("table9", "p0.8", 1)
    with pytest.raises(ValueError, match=r"table3 has no row 'p0.85'; valid: p0.0, p0.1, .*concat"):
        row_args("table3", "p0.85", 1)
    with pytest.raises(ValueError, match="table3/p0.8 has stages 1, 2, got 3"):
        row_args("table3", "p0.8", 3)
    with pytest.raises(ValueError, match="scale must be one of tiny, paper"):
        row_args("table3", "p0.8", 1, "huge")
    with pytest.raises(ValueError, match="no tiny-world row"):
        row_args("table7", "l2_p0.0", 1, "tiny")


def _objectives(row: paper_tables.Row, stage: int, scale: str) -> dict[str, dict]:
    """The model / data init_args that a row's objective configs set (Table 8), later files winning."""
    root = CONFIGS / ("tiny" if scale == "tiny" else "") / "clip" / "objectives"
    out: dict[str, dict] = {"model": {}, "data": {}}
    for name in row.objectives:
        cfg = yaml.safe_load((root / f"{name.format(stage=stage)}.yaml").read_text())
        for group, values in out.items():
            values.update((cfg.get(group) or {}).get("init_args") or {})
    return out


def _logger(dumped: dict) -> dict:
    logger = dumped["trainer"]["logger"]  # paper-scale rows log to [CSV, W&B]: the CSV logger (first) is the run dir
    return logger[0] if isinstance(logger, list) else logger


@pytest.mark.parametrize(("table", "row", "stage", "scale"), ROWS, ids=lambda x: str(x))
def test_every_row_composes_and_validates(parser, table, row, stage, scale):
    """A row at a scale and stage: the stage recipe with the row's p / mix / sizes (the paper's), the run's logger and
    the previous stage's start; every rule of experiments/validate.py holds (only absent inputs are reported)."""
    command = "fit"
    cfg = parser.parse_args([command, *row_args(table, row, stage, scale), *run_args(table, row, stage, scale)])
    errors = validate_config(cfg[command], [])
    assert all("missing" in e or "must name an existing" in e for e in errors), errors
    dumped = yaml.safe_load(parser.dump(cfg))[command]
    model, data = dumped["model"]["init_args"], dumped["data"]["init_args"]
    save_dir = "runs/tiny" if scale == "tiny" else "runs"
    family = {"table1": "captioner", "table7": "dit"}.get(table, "clip")
    logger = _logger(dumped)["init_args"]
    assert (logger["save_dir"], logger["name"]) == (save_dir, f"{family}/{table}/{row}")
    if scale == "paper":  # real-scale runs log to CSV, then W&B under the same name
        wandb = dumped["trainer"]["logger"][1]
        assert wandb["class_path"] == "experiments.loggers.RecapWandbLogger"
        assert wandb["init_args"]["name"] == f"{logger['name']}/{logger['version']}"
    run = f"{save_dir}/{family}/{table}/{row}"
    if family == "captioner":
        version = ("stage1", "stage2", "caption_tune")[stage - 1]
        assert logger["version"] == version
        start = {2: ("init_from", "stage1/checkpoints/last.ckpt")}
        start[3] = ("init_from", "stage2/checkpoints/last.ckpt") if scale == "tiny" else ("pretrained", "stage2/hf")
        if stage in start:
            key, where = start[stage]
            assert model[key] == f"{run}/{where}"
        return
    if family == "dit":
        r = paper_tables.ROWS[table][row]
        assert data["p_original"] == r.p
        base = yaml.safe_load((CONFIGS / ("tiny/dit" if scale == "tiny" else "dit") / "base.yaml").read_text())
        assert model["size"] == ("DiT-L/2" if r is dit_tables.L2 else base["model"]["init_args"]["size"])
        assert model["sample_dir"] == f"{run}/samples"
        return
    r = paper_tables.ROWS[table][row]
    objectives = _objectives(r, stage, scale)
    assert data.get("p_original") == objectives["data"].get("p_original", r.p)  # None (concat) is not dumped
    for group, values in objectives.items():  # every setting of the row's objectives, in place after the row's own
        assert {k: dumped[group]["init_args"].get(k) for k in values} == values, group
    assert data.get("mix", "sample") == r.mix
    assert model["model"] == f"recap-clip:{r.vision}:{r.text}" + (":tiny" if scale == "tiny" else "")
    built = parse_model_name(model["model"])
    if scale == "paper":  # the paper's Table 2 sizes, as built
        v, t = VISION_SIZES[r.vision], TEXT_SIZES[r.text]
        assert built["embed_dim"] == v["embed_dim"]
        assert (built["vision_cfg"]["layers"], built["vision_cfg"]["width"]) == (v["layers"], v["width"])
        assert [built["text_cfg"][k] for k in ("layers", "width", "heads")] == [t["layers"], t["width"], t["heads"]]
        if table == "table2":
            assert built["embed_dim"] == r.paper["embed_dim"]
            assert built["text_cfg"]["width"] == r.paper["text_width"]
    else:
        assert built == paper_tables.tiny_model(r.vision, r.text)
    assert logger["version"] == f"stage{stage}"
    assert model.get("init_from") == (f"{run}/stage1/checkpoints/last.ckpt" if stage == 2 else None)


@pytest.mark.parametrize("config", ALL, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_parses_in_its_stack(parser, config):
    command, args = stack_for(config)
    cfg = parser.parse_args([command, *args])
    dumped = yaml.safe_load(parser.dump(cfg))[command]
    assert dumped["model"]["class_path"].startswith("lightning_modules.")
    assert dumped["data"]["class_path"].startswith("datamodules.")
    if config.name == "cached.yaml":  # swapping in the cache keeps the row's p
        assert dumped["data"]["init_args"]["p_original"] == 0.5
        assert dumped["data"]["class_path"] == "datamodules.latent_cache.LatentCacheDataModule"


def test_table8_p_schedule_spans_stage_1_and_stage_2_holds_its_end():
    for scale in ("tiny", "paper"):
        root = CONFIGS / ("tiny" if scale == "tiny" else "") / "clip"
        stage1 = yaml.safe_load((root / "stage1.yaml").read_text())["model"]["init_args"]
        schedule = yaml.safe_load((root / "objectives/p_schedule_stage1.yaml").read_text())["data"]["init_args"]
        hold = yaml.safe_load((root / "objectives/p_schedule_stage2.yaml").read_text())["data"]["init_args"]
        assert schedule["p_schedule"]["total_samples"] == stage1["total_samples"], scale
        assert (schedule["p_schedule"]["start"], hold["p_original"]) == (1.0, schedule["p_schedule"]["end"])


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
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "--row", "table5/p0.6", "--stage", "2", "--scale", "paper", "--print_config"])
    assert exc.value.code in (None, 0)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["model"] == "recap-clip:B-16:large"
    assert printed["data"]["init_args"]["p_original"] == 0.6
    assert printed["model"]["init_args"]["init_from"] == "runs/clip/table5/p0.6/stage1/checkpoints/last.ckpt"
