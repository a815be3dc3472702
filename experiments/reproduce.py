r"""``python -m experiments reproduce``: the paper's whole chain in miniature on the tiny world, on CPU.

    python -m experiments reproduce                          # quick profile -> runs/reproduce/quick
    python -m experiments reproduce --profile full --seeds 2  # -> runs/reproduce/full
    python -m experiments reproduce --dry-run                 # the commands, with each step's state
    python -m experiments reproduce --from clip_p0.5_stage1   # rerun from a step (and everything after it)
    python -m experiments reproduce --only world web_clip     # a subset of the steps (names or prefixes)
    python -m experiments reproduce --profile table8 --out runs/reproduce/full  # Table 8 over a finished full run

world -> "web CLIP" on alt-text (the OpenAI CLIP analog) -> tokenizer + tiny LLM -> captioner (stage 1, 2, caption
tuning) on the web CLIP's frozen tower -> recaption ``web/`` -> caption analysis -> Recap-CLIP at several p (stage 1 +
2; ``--seeds N``) -> the DiT world recaptioned -> pinned judge -> DiT at p = 0 and 1 -> evaluation -> ``report``
tables -> ``OUT/report.md`` with the paper's claims (``experiments/claims.py``) checked on this run's numbers. The
``table8`` profile (``base: full``) trains Table 8's rows instead of Table 3's and the DiT, and checks each against
p = 0.8 (``OUT/table8/report.md``).

Each step is a ``python -m experiments ...`` run of the suite's step runner (``experiments/runner.py``) with the
profile's sizes (``experiments/configs/reproduce/<profile>.yaml``) and every path under ``--out``. ``--chain NAME``
runs one of the Makefile's chains (``make tiny-captioner`` ...) through the same runner instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from experiments import claims, runner
from experiments.paper_tables import CAPTIONER_STAGES, logger_arg, row_args, run_args
from experiments.runner import REPO, Launcher, Step
from experiments.tables import captioner_eval, last_metrics, markdown, prompt_set_metrics, realised_p

CONFIGS = REPO / "experiments" / "configs"
PROFILES = CONFIGS / "reproduce"
TINY_CAP = "experiments/configs/tiny/captioner"
TINY_DIT = "experiments/configs/tiny/dit"
DIT_WORLD_CONFIG = "experiments/configs/tiny/world/dit.yaml"
REQUIRED = ("world", "web_clip", "tiny_llm", "captioner", "recaption", "clip", "claims")
REQUIRED_DIT = ("dit_world", "judge")  # with a dit section


# ------------------------------------------------------------------------------------------------------ profile
def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on ``base`` key by key, mappings merged recursively; a null in ``over`` removes the key."""
    out = dict(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_profile(profile: str) -> dict[str, Any]:
    """A profile by name (``experiments/configs/reproduce/<name>.yaml``) or path, merged over its ``base: NAME``
    profile; an error names the file and the missing or wrong section."""
    from experiments.dit_tables import TABLE7
    from experiments.paper_tables import TABLES

    path = Path(profile) if profile.endswith((".yaml", ".yml")) else PROFILES / f"{profile}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES.glob("*.yaml"))
        raise FileNotFoundError(f"reproduce profile {profile!r}: no file {path} (known profiles: {known})")
    data = yaml.safe_load(path.read_text()) or {}
    if data.get("base"):
        data = merge({k: v for k, v in load_profile(data.pop("base")).items() if k != "_path"}, data)
    missing = [k for k in REQUIRED + (REQUIRED_DIT if "dit" in data else ()) if k not in data]
    if missing:
        raise KeyError(f"{path}: missing section(s) {missing}")
    t8 = data.get("table8")
    if t8 is not None:
        ids = [r.id for r in TABLES["table8"].rows]
        unknown = [r for r in [*t8.get("rows", []), *t8.get("row_overrides", {})] if r not in ids]
        if not t8.get("rows") or unknown:
            raise ValueError(f"{path}: table8.rows must list Table 8 rows (rows: {ids}; unknown: {unknown})")
        if t8.get("baseline", "p0.8") not in t8["rows"]:
            raise ValueError(f"{path}: table8.baseline {t8.get('baseline', 'p0.8')!r} is not one of table8.rows")
    sections = [("clip", "Table 3", TABLES["table3"].rows), ("dit", "Table 7", TABLE7)]
    for section, table, rows in sections if "dit" in data else sections[:1]:
        if not data[section].get("ps") and not (section == "clip" and t8):  # table8 may train no Table 3 row
            raise KeyError(f"{path}: {section}.ps must list at least one p")
        ids = [r.id for r in rows]
        unknown = [row_id(p) for p in data[section].get("ps") or [] if row_id(p) not in ids]
        if unknown:
            raise ValueError(f"{path}: {section}.ps names a row that {table} does not have ({unknown[0]}; rows: {ids})")
    worlds = ("world", "dit_world") if "dit" in data else ("world",)
    missing = [f"{s}.{k}" for s in worlds for k in ("n_web", "shard_size") if k not in data[s]]
    if missing:
        raise KeyError(f"{path}: {missing[0]} is required (it sets the train / val shard split)")
    recap_clip_p = data.get("dit", {}).get("recap_clip_p")
    if recap_clip_p is not None and float(recap_clip_p) not in map(float, data["clip"]["ps"]):
        raise ValueError(f"{path}: dit.recap_clip_p {recap_clip_p} is not one of clip.ps")
    data["_path"] = str(path)
    return data


def row_id(p: float) -> str:
    """The paper-table row id of a p: 0 -> p0.0, 0.05 -> p0.05, 1 -> p1.0."""
    text = f"{float(p):.2f}".rstrip("0")
    return "p" + (text + "0" if text.endswith(".") else text)


# -------------------------------------------------------------------------------------------------------- steps
def _value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)  # numbers, booleans, null, lists and dicts as JSON


def overrides(values: dict[str, Any] | None, prefix: str = "") -> list[str]:
    """``{"trainer.max_steps": 40}`` -> ``["--trainer.max_steps=40"]`` (LightningCLI dotted overrides)."""
    return [f"--{prefix}{k}={_value(v)}" for k, v in (values or {}).items()]


def flags(values: dict[str, Any] | None) -> list[str]:
    """``{"batch_size": 128, "max_new_tokens": 96}`` -> ``["--batch-size", "128", ...]`` (argparse flags)."""
    return [a for k, v in (values or {}).items() if v is not None for a in (f"--{k.replace('_', '-')}", _value(v))]


def shard_specs(world: dict[str, Any], root: str) -> tuple[str, str, str]:
    """(train, val, all) shard specs of a world generated with ``n_web`` / ``shard_size``: the last shard is val."""
    n = math.ceil(int(world["n_web"]) / int(world["shard_size"]))
    if n < 3:
        raise ValueError(f"world n_web {world['n_web']} / shard_size {world['shard_size']}: need >= 3 web shards")
    digits = int(world.get("oom_shard_count", 5))
    first, last, val = (f"{i:0{digits}d}" for i in (0, n - 2, n - 1))
    return f"{root}/web/{{{first}..{last}}}.tar", f"{root}/web/{val}.tar", f"{root}/web/*.tar"


def _clip_evaluation(world: str, tasks: int = 3) -> str:
    retrieval = {"karpathy_json": f"{world}/eval/retrieval/dataset.json", "image_root": f"{world}/eval/retrieval"}
    init = {
        "ZeroShotClassification": {"root": f"{world}/eval/classify", "name": "classify"},
        "Retrieval": {**retrieval, "split": "test", "name": "retrieval"},
        "LongRetrieval": {"root": f"{world}/eval/long_retrieval", "name": "long_retrieval"},
    }
    evaluation = [{"class_path": f"lightning_modules.evaluation.{k}", "init_args": v} for k, v in init.items()]
    return "--model.init_args.evaluation=" + json.dumps(evaluation[:tasks])


def repo_relative(args: Sequence[str]) -> list[str]:
    """Arguments with paths inside the repository made relative to it (commands and done-stamps stay readable)."""
    inside = lambda p: p.is_absolute() and p.resolve().is_relative_to(REPO)  # noqa: E731
    return [str(Path(a).resolve().relative_to(REPO)) if inside(Path(a)) else a for a in args]


def seed_root(out: str, seed: int) -> str:
    """A CLIP seed's runs: ``OUT`` for seed 0 (the configs' own seeds), else ``OUT/seed<N>`` (as ``clip-table``)."""
    return out if seed == 0 else f"{out}/seed{seed}"


def build_steps(profile: dict[str, Any], out: str, seeds: int | None = None) -> list[Step]:
    """The chain as a list of steps for ``profile`` with every path under ``out``."""
    o = out.rstrip("/")
    W, DW = f"{o}/world", f"{o}/world_dit"
    cap, rec, wc = f"{o}/captioner", f"{o}/recaption", f"{o}/captioner/web_clip"
    train, val, web = shard_specs(profile["world"], W)
    steps: list[Step] = []

    def add(name: str, title: str, argv: list[str], outputs: str | list[str], clean: str | list[str] = ()) -> None:
        as_list = lambda v: [v] if isinstance(v, str) else list(v)  # noqa: E731
        steps.append(Step(name, title, argv, as_list(outputs), as_list(clean)))

    def world(name: str, title: str, folder: str, config: list[str]) -> None:
        argv = ["world", *config, "--out", folder, "--overwrite", *overrides(profile[name], "world.")]
        add(name, title, argv, f"{folder}/world.json", folder)

    world("world", "tiny world (web, captioner data, eval sets)", W, [])
    if profile.get("dit"):
        world("dit_world", "DiT world (one larger object per image)", DW, ["--config", DIT_WORLD_CONFIG])

    # The OpenAI CLIP analog: alt-text only, its image tower becomes the captioner's, its text tower the DiT's.
    data = [f"--data.init_args.train_shards={train}", f"--data.init_args.val_shards={val}"]
    argv = ["fit", "--config", f"{TINY_CAP}/web_clip.yaml", logger_arg(o, "captioner", "web_clip"), *data]
    argv += [_clip_evaluation(W, tasks=1), *overrides(profile["web_clip"])]
    add("web_clip", "web CLIP on alt-text (OpenAI CLIP analog)", argv, f"{wc}/checkpoints/last.ckpt", wc)
    export, hf_vision = f"{wc}/export", f"{wc}/hf_vision"
    argv = ["export-clip", "--ckpt", f"{wc}/checkpoints/last.ckpt", "--out", export, "--hf-vision", hf_vision]
    outputs = [f"{export}/open_clip_config.json", f"{hf_vision}/config.json"]
    add("web_clip_export", "export web CLIP (open_clip + HF vision tower)", argv, outputs, [export, hf_vision])

    # The captioner: LLaVA-1.5 on the web CLIP's frozen tower + the LLaMA-3 analog.
    tok, llm = f"{cap}/tokenizer", f"{cap}/llm"
    argv = ["world-tokenizer", "--world", W, "--out", tok, "--overwrite"]
    add("tokenizer", "world tokenizer (LLaMA-3 special tokens)", argv, f"{tok}/tokenizer.json", tok)
    argv = ["tiny-llm", "--world", W, "--tokenizer", tok, "--out", llm, "--overwrite", *flags(profile["tiny_llm"])]
    add("tiny_llm", "tiny LLM (LLaMA-3 analog)", argv, f"{llm}/tiny_llm.json", llm)
    tune = f"{W}/caption_tune"
    title = "caption-tuning data (HQ-Edit analog)"
    add("caption_tune_data", title, ["caption-tune", "--world", W], f"{tune}/detail.json", tune)
    capcfg = profile["captioner"]
    cap_eval = {"prompts_parquet": f"{W}/eval/t2i_prompts/prompts.parquet", "limit": int(capcfg.get("eval_limit", 300))}
    cap_eval = [{"class_path": "lightning_modules.evaluation.CaptionAttributes", "init_args": cap_eval}]
    stage_data = {
        "stage1": (f"{W}/caption_pretrain/chat.json", f"{W}/caption_pretrain", "captioner stage 1 (projector)"),
        "stage2": (f"{W}/instruct/llava_instruct.json", f"{W}/instruct", "captioner stage 2 (projector + LLM)"),
        "caption_tune": (f"{W}/caption_tune/detail.json", W, "captioner caption tuning"),
    }
    configs: list[str] = []
    previous = None
    for stage, (train_json, image_folder, title) in stage_data.items():
        configs += ["--config", f"{TINY_CAP}/{stage}.yaml"]
        argv = ["fit", *configs, logger_arg(o, "captioner", stage), f"--data.init_args.train_json={train_json}"]
        argv += [f"--data.init_args.image_folder={image_folder}", f"--model.init_args.vision_tower={hf_vision}"]
        argv += [f"--model.init_args.llm={llm}", "--model.init_args.evaluation=" + json.dumps(cap_eval)]
        if previous:
            argv.append(f"--model.init_args.init_from={cap}/{previous}/checkpoints/last.ckpt")
        run = f"{cap}/{stage}"
        add(f"captioner_{stage}", title, argv + overrides(capcfg.get(stage)), f"{run}/checkpoints/last.ckpt", run)
        previous = stage
    argv = ["export-captioner", "--ckpt", f"{cap}/caption_tune/checkpoints/last.ckpt", "--out", f"{cap}/hf"]
    add("captioner_export", "export captioner (llava-hf, LoRA merged)", argv, f"{cap}/hf/config.json", f"{cap}/hf")

    # Recaption web/ (resumable: a rerun after a failure finishes only the missing shards, so nothing is cleaned).
    def recaption(tag: str, shards: str, title: str) -> None:
        units, side, merged = f"{rec}/{tag}", f"{rec}/{tag}_sidecars", f"{rec}/{tag}/merged"
        argv = ["recaption", "run", "--model", f"{cap}/hf", "--shards", shards, "--out", units, "--no-progress"]
        add(f"recaption_{tag}", title, argv + flags(profile["recaption"]), units)
        argv = ["recaption", "merge", "--out", units, "--shards", shards]
        title = f"merge {tag} recaptions (every key once)"
        add(f"recaption_{tag}_merge", title, argv, f"{merged}/recap.parquet", merged)
        argv = ["sidecars", "--recap", f"{merged}/recap.parquet", "--shards", shards, "--out", side, "--overwrite"]
        add(f"recaption_{tag}_sidecars", f"join {tag} recaptions to shards", argv, f"{side}/_manifest.json", side)

    recaption("world", web, "recaption world web/ with the captioner")
    clip = profile["clip"]
    n_seeds = int(seeds if seeds is not None else clip.get("seeds", 1))
    if clip.get("ps"):
        argv = ["analyze", "--shards", web, "--sidecar-dir", f"{rec}/world_sidecars", "--clip", export]
        analysis = f"{o}/analysis"
        title = "caption analysis (lengths, vocabulary, CLIP share)"
        add("analyze", title, [*argv, "--tokenizer", tok, "--out", analysis], f"{analysis}/summary.json", analysis)

    def clip_row(table: str, rid: str, seed: int, data_args: list[str], title: str, extra: dict | None = None) -> None:
        """A paper-table row's CLIPA stage 1 then 2 at one seed, with the profile's, then ``extra``'s overrides."""
        root = seed_root(o, seed)
        run = f"{root}/clip/{table}/{rid}"
        seed_args = [f"--seed_everything={seed}", f"--data.init_args.seed={seed}"] if seed else []
        for stage in (1, 2):
            argv = ["fit", *repo_relative(row_args(table, rid, stage))]
            argv += [logger_arg(root, f"clip/{table}/{rid}", f"stage{stage}"), *data_args, *seed_args]
            if stage == 2:
                argv.append(f"--model.init_args.init_from={run}/stage1/checkpoints/last.ckpt")
            # a row's own overrides may name this run's files: {out} is the output folder
            row_extra = json.loads(json.dumps((extra or {}).get(f"stage{stage}") or {}).replace("{out}", o))
            argv += overrides(clip.get(f"stage{stage}")) + overrides(row_extra)
            sdir = f"{run}/stage{stage}"
            # the final (stage-2) evaluation is what the report reads; a profile may skip stage 1's
            outs = [f"{sdir}/checkpoints/last.ckpt"] + ([f"{sdir}/metrics"] if stage == 2 else [])
            prefix = "clip" if table == "table3" else table
            name = f"{prefix}_{rid}" + (f"_seed{seed}" if seed else "") + f"_stage{stage}"
            add(name, f"{title} stage {stage}" + (f" seed {seed}" if seed else ""), argv, outs, sdir)

    # Recap-CLIP at each p (CLIPA stage 1 then 2, Table 3's rows), each seed.
    clip_data = [*data, f"--data.init_args.sidecar_dir={rec}/world_sidecars", _clip_evaluation(W)]
    # p = 1 never draws a recaption, so its rows read the alt-text alone and do not wait for the captioner: the
    # runner starts them beside the web CLIP and the captioner (the longest stretch of the chain with a core free).
    # The realised p is still read back from the run's own log (train/caption_source/original = 1).
    alt_text_only = ['--data.init_args.sources={"original": "txt"}', "--data.init_args.p_original=null"]
    clip_data_original = [*data, *alt_text_only, "--data.init_args.sidecar_dir=null", _clip_evaluation(W)]
    for seed in range(n_seeds):
        for p in clip.get("ps") or []:
            data_args = clip_data_original if float(p) == 1.0 else clip_data
            clip_row("table3", row_id(p), seed, data_args, f"Recap-CLIP p={float(p):g}")
    # Table 8 ("beyond the paper"): its rows with the same recipe and data, each seed.
    t8 = profile.get("table8") or {}
    for seed in range(n_seeds if t8 else 0):
        for rid in t8["rows"]:
            clip_row("table8", rid, seed, clip_data, f"Table 8 {rid}", (t8.get("row_overrides") or {}).get(rid))

    # The DiT: its own world, recaptioned by the same captioner, the web CLIP's text tower, a pinned judge.
    dit = profile.get("dit") or {}
    if dit:
        dit_world = {**yaml.safe_load((REPO / DIT_WORLD_CONFIG).read_text())["world"], **profile["dit_world"]}
        dtrain, dval, dweb = shard_specs(dit_world, DW)
        recap_clip = None
        if dit.get("recap_clip_p") is not None:
            rid = row_id(dit["recap_clip_p"])
            recap_clip = f"{o}/clip/table3/{rid}/export"
            argv = ["export-clip", "--ckpt", f"{o}/clip/table3/{rid}/stage2/checkpoints/last.ckpt", "--out", recap_clip]
            title = f"export Recap-CLIP p={float(dit['recap_clip_p']):g} (Table 7's scorer)"
            add("recap_clip_export", title, argv, f"{recap_clip}/open_clip_config.json", recap_clip)
        recaption("world_dit", dweb, "recaption DiT world web/ with the captioner")
        judge = f"{DW}/judge"
        argv = ["world-judge", "--world", DW, "--out", judge, "--overwrite", *flags(profile["judge"])]
        add("judge", "pinned attribute judge (DiT evaluation)", argv, f"{judge}/judge.json", judge)
        text_encoder = f"--model.init_args.text_encoder={export}"
        cache, cache_val = f"{o}/dit/cache", f"{o}/dit/cache_val"
        argv = ["dit-cache", "--config", f"{TINY_DIT}/base.yaml", text_encoder]
        argv += [f"--data.init_args.train_shards={dtrain}", f"--data.init_args.val_shards={dval}"]
        argv += [f"--data.init_args.sidecar_dir={rec}/world_dit_sidecars", "--out", cache, "--val-out", cache_val]
        title = "DiT cache (pixels + web-CLIP text of both sources)"
        add("dit_cache", title, argv, f"{cache}/_cache.json", [cache, cache_val])
        clips = ["--clip", f"web_clip={export}"] + (["--clip", f"recap_clip={recap_clip}"] if recap_clip else [])
        prompts = ["--prompts", f"{DW}/eval/t2i_prompts/prompts.parquet", "--attribute-judge", judge, *clips]
        for p in dit["ps"]:
            rid = row_id(p)
            run, ev = f"{o}/dit/table7/{rid}", f"{o}/dit/eval/{rid}"
            argv = ["fit", *repo_relative(row_args("table7", rid, 1)), "--config", f"{TINY_DIT}/cached.yaml"]
            argv += [logger_arg(o, f"dit/table7/{rid}", "fit"), text_encoder, f"--data.init_args.cache_dir={cache}"]
            argv += [f"--data.init_args.val_cache_dir={cache_val}", f"--model.init_args.sample_dir={run}/samples"]
            argv += overrides(dit.get("fit"))
            add(f"dit_{rid}", f"Recap-DiT p={float(p):g}", argv, f"{run}/fit/checkpoints/last.ckpt", run)
            argv = ["dit-eval", "--ckpt", f"{run}/fit/checkpoints/last.ckpt", *prompts, *flags(dit.get("eval"))]
            argv += ["--out", ev]
            outs = [f"{ev}/caption/metrics.json", f"{ev}/recaption/metrics.json"]
            add(f"dit_{rid}_eval", f"evaluate DiT p={float(p):g} (both prompt sets)", argv, outs, ev)

    tables = {"table1": "captioner", "table3": "CLIP vs p"} if clip.get("ps") else {}
    tables |= {"table7": "DiT"} if dit else {}
    tables |= {"table8": "beyond the paper"} if t8 else {}
    reports = "/".join(filter(None, (o, profile.get("results_dir"), "reports")))  # beside the run's report.md
    for table, title in tables.items():
        argv = ["report", table, "--tiny", "--runs", o, "--out", reports]
        outputs = [f"{reports}/{table}_tiny.md"]
        steps.append(Step(f"report_{table}", f"report {table} ({title})", argv, outputs, always=True))
    names = [s.name for s in steps]
    assert len(names) == len(set(names)), names  # step names are the resume keys
    return steps


# ------------------------------------------------------------------------------------------------ make chains
CHAINS = ("world-recap", "tiny-captioner", "tiny-recaption", "tiny-dit")


def make_chain(
    name: str, world: str = "data/world", dit_world: str = "data/world_dit", dit_ps: Sequence[str] = ()
) -> list[Step]:
    """The Makefile's chains (``make tiny-captioner`` ...) as steps on the configs' own sizes and paths: what each
    needs, then its own steps."""
    cap, W, DW, web_clip = "runs/tiny/captioner", world, dit_world, "runs/tiny/captioner/web_clip"
    steps: list[Step] = []

    def add(step: str, command: str, output: str, always: bool = False) -> None:
        steps.append(Step(step, f"{name}: {step}", shlex.split(command), [output], always=always))

    def world_steps(w: str, tag: str, recaptions: bool = True) -> None:
        config = f" --config {DIT_WORLD_CONFIG}" if w == DW else ""
        add(tag, f"world --out {w} --overwrite{config}", f"{w}/world.json")
        if recaptions:  # the world's oracle recaptions, joined to its shards as sidecars
            add(f"{tag}_truth_recaptions", f"truth-recaptions --world {w} --out {w}/recap --overwrite", f"{w}/recap")
            sidecars = f"sidecars --recap {w}/recap --shards '{w}/web/*.tar' --out {w}/sidecars --overwrite"
            add(f"{tag}_sidecars", sidecars, f"{w}/sidecars/_manifest.json")

    world_steps(W, "world", recaptions=name == "world-recap")
    if name == "world-recap":
        return steps
    ckpt = f"{web_clip}/checkpoints/last.ckpt"
    add("web_clip", f"fit --config {TINY_CAP}/web_clip.yaml", ckpt)
    export = f"export-clip --ckpt {ckpt} --out {web_clip}/export --hf-vision {web_clip}/hf_vision"
    add("web_clip_export", export, f"{web_clip}/hf_vision/config.json")
    if name == "tiny-dit":
        world_steps(DW, "dit_world")
        add("judge", f"world-judge --world {DW} --out {DW}/judge --overwrite", f"{DW}/judge/judge.json")
        cache = f"dit-cache --config {TINY_DIT}/base.yaml --out {DW}/dit_cache --val-out {DW}/dit_cache_val"
        add("dit_cache", cache, f"{DW}/dit_cache/_cache.json")
        for p in dit_ps:
            run, ev = f"runs/tiny/dit/table7/{p}/fit", f"runs/tiny/dit/eval/{p}"
            row = [*repo_relative(row_args("table7", p, 1)), "--config", f"{TINY_DIT}/cached.yaml"]
            add(f"dit_{p}", shlex.join(["fit", *row, *run_args("table7", p, 1)]), f"{run}/checkpoints/last.ckpt")
            judge = f"--limit 500 --attribute-judge {DW}/judge --clip web_clip={web_clip}/export --out {ev}"
            evaluate = f"dit-eval --ckpt {run}/checkpoints/last.ckpt --prompts {DW}/eval/t2i_prompts/prompts.parquet"
            add(f"dit_{p}_eval", f"{evaluate} {judge}", f"{ev}/recaption/metrics.json")
        return steps
    add("tokenizer", f"world-tokenizer --world {W} --out {W}/tokenizer", f"{W}/tokenizer/tokenizer.json")
    add("tiny_llm", f"tiny-llm --world {W} --tokenizer {W}/tokenizer --out {cap}/llm", f"{cap}/llm/tiny_llm.json")
    add("caption_tune_data", f"caption-tune --world {W}", f"{W}/caption_tune/detail.json")
    configs = ""
    for stage in ("stage1", "stage2", "caption_tune"):
        configs += f" --config {TINY_CAP}/{stage}.yaml"
        add(f"captioner_{stage}", f"fit{configs}", f"{cap}/{stage}/checkpoints/last.ckpt")
    export = f"export-captioner --ckpt {cap}/caption_tune/checkpoints/last.ckpt --out {cap}/hf"
    add("captioner_export", export, f"{cap}/hf/config.json")
    if name == "tiny-recaption":  # every time, as make did: the recaption job itself finishes only what is missing
        recap, shards = f"{W}/recap_llava", f"'{W}/web/*.tar'"
        add("recaption", "recaption run --config experiments/configs/recaption/tiny_world.yaml", recap, always=True)
        merge = f"recaption merge --out {recap} --shards {shards}"
        add("recaption_merge", merge, f"{recap}/merged/recap.parquet", always=True)
        sidecars = f"sidecars --recap {recap}/merged/recap.parquet --shards {shards} --out {W}/sidecars_llava"
        add("recaption_sidecars", f"{sidecars} --overwrite", f"{W}/sidecars_llava/_manifest.json", always=True)
    return steps


def run_chain(
    name: str,
    world: str,
    dit_world: str,
    dit_ps: Sequence[str],
    out: Path | None = None,
    launcher: Launcher | None = None,
) -> dict[str, Any]:
    """Run a Makefile chain through the runner: the steps whose outputs do not all exist (and the always-steps)."""
    chain = make_chain(name, world, dit_world, dit_ps)
    steps = [s for s in chain if s.always or not all((REPO / p).exists() for p in s.outputs)]
    out = out or REPO / "runs" / "tiny" / "chains" / name
    record = runner.run_steps(steps, out, launcher=launcher)
    if record["failed"]:
        raise SystemExit(f"{name}: step {record['failed']} failed (log: {out}/logs/{record['failed']}.log)")
    return record


# ------------------------------------------------------------------------------------------------------ results
def collect_results(out: Path, profile: dict[str, Any], seeds: int) -> dict[str, Any]:
    """This run's numbers from the steps' outputs (missing ones stay missing), the realised p of every CLIP and DiT
    run under ``clip_p`` / ``dit_p``, Table 8's rows by row id under ``table8`` / ``table8_p``."""
    res: dict[str, Any] = {"captioner": {}, "analysis": None, "clip": {}, "dit": {}, "clip_p": {}, "dit_p": {}}
    res.update(table8={}, table8_p={})
    for stage in CAPTIONER_STAGES:
        found = captioner_eval(out, stage)
        if found and found[1]:
            res["captioner"][stage] = found[1]
    summary = out / "analysis" / "summary.json"
    if summary.is_file():
        inputs = json.loads(summary.read_text()).get("inputs", {})
        res["analysis"] = inputs.get("shards") or inputs.get("parquet")
    rows = [("clip", "table3", row_id(p), str(float(p))) for p in profile["clip"].get("ps") or []]
    rows += [("table8", "table8", rid, rid) for rid in (profile.get("table8") or {}).get("rows", [])]
    for key, table, rid, name in rows:
        for seed in range(seeds):
            run = Path(seed_root(str(out), seed)) / "clip" / table / rid
            m = last_metrics(run / "stage2")
            if m:
                res[key].setdefault(name, {})[f"seed{seed}"] = m
            rp = realised_p(run / "stage1", run / "stage2")
            if rp is not None:
                res[f"{key}_p"].setdefault(name, {})[f"seed{seed}"] = rp
    for p in (profile.get("dit") or {}).get("ps", []):
        merged = prompt_set_metrics(out / "dit" / "eval" / row_id(p))
        if merged:
            res["dit"][str(float(p))] = merged
        rp = realised_p(out / "dit" / "table7" / row_id(p) / "fit")
        if rp is not None:
            res["dit_p"][str(float(p))] = rp
    return res


# ------------------------------------------------------------------------------------------------------- report
def _analysis_table(a: dict) -> str:
    lw, lt = a.get("length_words") or {}, a.get("length_tokens") or {}
    voc, share = a.get("vocabulary") or {}, a.get("clip_share") or {}
    sources = ("original", "recaption")
    paper_words = f"{claims.PAPER_LENGTH_WORDS['original']} / {claims.PAPER_LENGTH_WORDS['recaption']}"
    rows = [["mean words", *(f"{(lw.get(s) or {}).get('mean') or 0:.1f}" for s in sources), paper_words]]
    if lt:
        rows.append(["mean tokens (world tokenizer)", *(f"{(lt.get(s) or {}).get('mean') or 0:.1f}" for s in sources)])
        rows[-1].append("-")
    size = voc.get("size") or {}
    rows.append(["vocabulary (distinct words)", *(str(size.get(s, "-")) for s in sources), "-"])
    words = voc.get("token_share_pct") or {}
    if words:
        shares = (f"{words.get(s) or 0:.1f}%" for s in sources)
        rows.append(["share of the word tokens of both sets", *shares, f"- / {claims.PAPER_COVERAGE_PCT}%"])
    cov = (voc.get("coverage_pct") or {}).get("recaption")
    cov_text = f"{cov:.1f}%" if cov is not None else "-"
    rows.append(["distinct-word coverage of the joint vocabulary", "", cov_text, "-"])
    if share:
        sp = share.get("share_pct") or {}
        paper = "CLIP-L 50.43 / 49.57; LongCLIP-L 10.09 / 89.91"
        rows.append(["CLIP-score share, web CLIP (INFERRED definition)", *(f"{sp.get(s, 0):.1f}" for s in sources)])
        rows[-1].append(paper)
    return markdown(rows, ["statistic", "original (alt-text)", "recaption", "paper (orig / recap)"])


def _paper_table(table: str, out: Path) -> str:
    """The rows of ``report``'s Table 3 / 7 that this run trained, beside the paper's numbers (one renderer)."""
    from experiments import report

    rep = report.build_report(table, tiny=True, runs=out)
    rep.rows = [r for r in rep.rows if r.runs]
    return report.table_markdown(rep)


def _run_line(profile: dict, record: dict) -> str:
    head, commit = runner.git_head(), record.get("commit")
    line = f"Commit: `{head}`" if not commit else f"Steps run at commit `{commit}`"
    line += f", report written at `{head}`" if commit and commit != head else ""
    line += f". Profile: `{os.path.relpath(profile['_path'], REPO)}`. "
    line += f"Started {record.get('started')}, {record.get('cpus')} CPUs"
    steps_total = runner.fmt_seconds(record.get("total_seconds") or 0)
    if record.get("wall_seconds") is not None:
        wall = runner.fmt_seconds(record["wall_seconds"])
        line += f", **run wall time {wall}** ({record.get('jobs', 1)} steps at a time; "
        line += f"the steps' wall times add up to {steps_total})"
    else:
        line += f", total step wall time {steps_total}"
    if record.get("total_cpu_seconds"):
        line += f", CPU time {runner.fmt_seconds(record['total_cpu_seconds'])}"
    return line + f" (budget {profile.get('budget_minutes', '?')} min of wall time on 2 uncontended cores)."


def results_dir(out: Path, profile: dict) -> Path:
    """Where report.md, results.json and timings.json go: OUT, or ``OUT/<results_dir>`` (Table 8 over a full run)."""
    return out / profile.get("results_dir", "")


def write_report(out: Path, profile: dict, seeds: int, record: dict, command: str) -> Path:
    """``report.md`` (in ``results_dir``): the run's results, the claims checked, timings, command and commit."""
    from experiments import report

    results = collect_results(out, profile, seeds)
    margins = claims.Margins.from_profile(profile["claims"])
    table3, dit, t8 = bool(profile["clip"].get("ps")), bool(profile.get("dit")), profile.get("table8")
    checked = claims.check_claims(results, margins) if table3 else []
    checked += claims.check_table8(results, margins, t8.get("baseline", "p0.8"), t8["rows"]) if t8 else []
    dest, stem = results_dir(out, profile), Path(profile["_path"]).stem
    dest.mkdir(parents=True, exist_ok=True)
    data = {"results": results, "claims": [c.__dict__ for c in checked]}
    (dest / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    pngs = sorted((dest / "reports").glob("*.png")) + sorted((out / "analysis").glob("*.png"))
    stand_ins = (
        "Tiny-world stand-ins: cls = 48-class zero-shot (ImageNet), short = 5 captions per image retrieval (COCO), "
        "long = one long caption per image (Urban-1K). Absolute numbers are not comparable with the paper's."
    )

    def section(title: str, *body: str) -> list[str]:
        return ["", f"## {title}", "", *body]

    def table(name: str, key: str) -> str:
        return _paper_table(name, out) if results[key] else "not run"

    lines = [
        f"# {'The' if table3 else 'Beyond the'} paper in miniature: `reproduce --profile {stem}`",
        "",
        f"{profile.get('description', '')}. Tiny world, CPU. Command and commit:",
        "",
        f"```bash\n{command}\n```",
        "",
        _run_line(profile, record),
        *section(
            "What the miniature reproduces" if table3 else "Does each objective beat the paper's p = 0.8?",
            claims.claims_markdown(checked, seeds, margins),
        ),
    ]
    if table3:
        lines += section(
            "Captioner (Table 1 stand-in): held-out attribute scores, percent", report.captioner_table(out) or "not run"
        )
        analysis = _analysis_table(results["analysis"]) if results["analysis"] else "not run"
        lines += section("Caption analysis (§4): original alt-text vs recaptions of `web/`", analysis)
        lines += section("Recap-CLIP vs p (Table 3 style; final = stage 2)", table("table3", "clip"), "", stand_ins)
    if dit:
        lines += section(
            "Recap-DiT at p = 0 and p = 1 (Table 7 style)",
            table("table7", "dit"),
            "",
            "Raw = the prompt set's short captions, recap = its detailed descriptions; FID on the pinned judge's "
            "features, CLIP score with the web CLIP (alt-text trained) and with this run's Recap-CLIP.",
        )
    if t8:
        title = "Table 8, beyond the paper: each objective over the p = 0.8 recipe (final = stage 2)"
        rows_note = stand_ins + " Rows: `experiments/configs/tiny/clip/table8/README.md`."
        lines += section(title, table("table8", "table8"), "", rows_note)
    lines += section(
        "Plots and tables",
        *[f"- `{os.path.relpath(p, dest)}`" for p in sorted((dest / "reports").glob("*.md"))],
        *[f"![{p.stem}]({os.path.relpath(p, dest)})" for p in pngs],
    )
    lines += section(
        "Timings",
        runner.summary_table(record),
        "",
        "Load average = the machine's 1-minute load when the step started and ended (2 cores: above 2 means the "
        "steps shared the CPU with other work, and the times are slower than on a quiet machine). CPU time = user + "
        "system seconds of the step's processes, which other work does not inflate: on 2 cores a step's uncontended "
        "wall time is at least half its CPU time.",
    )
    path = dest / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


# --------------------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m experiments reproduce", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--profile", default="quick", help="quick | full | a profile YAML path (default: quick)")
    add("--out", default=None, help="output folder (default: runs/reproduce/<profile>)")
    add("--seeds", type=int, default=None, help="CLIP seeds per row (default: the profile's clip.seeds)")
    add("--from", dest="start_from", default=None, help="rerun from this step on (names: --dry-run)")
    add("--only", nargs="+", default=None, help="run only these steps (names or prefixes, e.g. world web_clip clip_)")
    add("--dry-run", action="store_true", help="print the steps' commands and states; run nothing")
    add("--report-only", action="store_true", help="only (re)write OUT/report.md from finished steps")
    add("--isolated", action="store_true", help="a fresh interpreter per step (default on Linux: forked steps)")
    add("--jobs", type=int, default=None, help="steps run at once (default: the profile's jobs, else 1)")
    add("--chain", choices=CHAINS, default=None, help="run one of the Makefile's chains instead (make tiny-dit, ...)")
    add("--world", default="data/world", help="--chain: the tiny world's folder")
    add("--dit-world", default="data/world_dit", help="--chain tiny-dit: the DiT world's folder")
    add("--dit-p", nargs="+", default=["p0.0", "p1.0"], help="--chain tiny-dit: the Table 7 rows")
    args = parser.parse_args(argv)
    if args.chain:
        return run_chain(args.chain, args.world, args.dit_world, args.dit_p)

    profile = load_profile(args.profile)
    name = Path(profile["_path"]).stem
    out = Path(args.out or f"runs/reproduce/{name}").resolve()
    # paths inside the repository stay relative in commands and reports
    out_str = str(out.relative_to(REPO)) if out.is_relative_to(REPO) else str(out)
    seeds = int(args.seeds if args.seeds is not None else profile["clip"].get("seeds", 1))
    if seeds < 1:
        parser.error("--seeds must be >= 1")
    steps = build_steps(profile, out_str, seeds)
    if args.start_from and args.start_from not in [s.name for s in steps]:
        parser.error(f"--from {args.start_from!r}: no such step")
    if args.only:
        steps = [s for s in steps if any(s.name == o or s.name.startswith(o) for o in args.only)]
        if not steps:
            parser.error(f"--only {args.only}: no such steps")
    if args.dry_run:
        print(f"profile {name} ({profile['_path']}), out {out_str}, {seeds} seed(s), {len(steps)} steps")
        to_run = runner.plan(steps, out, args.start_from)
        for i, s in enumerate(steps):
            state = "to run" if s.name in to_run else "done"
            print(f"[{i + 1}/{len(steps)}] {s.name} ({state}): {s.title}\n    {s.shown()}")
        return {"steps": steps}
    command = "python -m experiments reproduce " + shlex.join(argv if argv is not None else sys.argv[2:])
    out.mkdir(parents=True, exist_ok=True)
    timings = results_dir(out, profile) / "timings.json"
    if args.report_only:
        record = json.loads(timings.read_text()) if timings.is_file() else {"steps": []}
        command = record.get("command") or command  # the command that ran the steps
    else:
        print(f"reproduce: profile {name}, {len(steps)} steps -> {out_str} (logs in {out_str}/logs)", flush=True)
        jobs = int(args.jobs if args.jobs is not None else profile.get("jobs", 1))
        launcher = runner.launch_fresh if args.isolated else runner.launch_forked
        record = runner.run_steps(steps, out, args.start_from, jobs=jobs, launcher=launcher, timings=timings)
        record["command"] = command
        runner.write_timings(timings, record)
    print("\n" + runner.summary_table(record), flush=True)
    if record.get("failed"):
        print(f"\nstopped at {record['failed']}; fix it and rerun the same command (finished steps are skipped)")
        raise SystemExit(1)
    if not args.only:
        report = write_report(out, profile, seeds, record, command)
        print(f"\nreport: {os.path.relpath(report, Path.cwd())}")
    return record
