"""``recaption run`` settings are checked before any compute: a bad flag or YAML key is one ``config error:`` line
naming the key and where it was set, exit code 2, no model loaded and no output folder created."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import write_shards

from experiments.jobs import recaption
from experiments.jobs.recaption import RUN_KEYS, Generated, _load_config, main, run, run_config_problems

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "experiments/configs/recaption").glob("*.yaml"))


class _FakeBackend:
    """HFBackend's interface without a model: records how it was built, captions every image alike."""

    built: list[dict] = []

    def __init__(self, model, prompt, max_new_tokens, device=None, dtype=None, trust_remote_code=False):
        type(self).built.append({"model": model, "max_new_tokens": max_new_tokens, "device": device, "dtype": dtype})

    def generate(self, images, repetition_penalty=None):
        return [Generated("a small square", 3, False) for _ in images]


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A llava-hf-looking folder (config.json only), two shards (3 + 2 samples), the fake backend, no rank env."""
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "LOCAL_RANK", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    write_shards(tmp_path / "web", [3, 2])
    _FakeBackend.built = []
    monkeypatch.setitem(recaption.BACKENDS, "hf", _FakeBackend)
    return {
        "tmp": tmp_path,
        "model": str(model),
        "shards": str(tmp_path / "web/{00000..00001}.tar"),
        "out": str(tmp_path / "out"),
    }


def _refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: "), err
    return err


# (id, settings over the good ones, where they go: "flags" or "yaml", the key named, a word of the reason)
CASES = [
    ("model-missing", {"model": "TMP/runs/captioner/hf"}, "flags", "--model", "existing folder"),
    ("model-no-config-json", {"model": "TMP/web"}, "flags", "--model", "config.json"),
    ("shards-match-nothing", {"shards": "TMP/web/*.tgz"}, "flags", "--shards", "matches no shards"),
    ("shards-brace-missing", {"shards": "TMP/web/{00000..00002}.tar"}, "flags", "--shards", "1 missing shards of 3"),
    ("out-is-a-file", {"out": "TMP/web/00000.tar"}, "flags", "--out", "a file is there"),
    ("out-under-a-file", {"out": "TMP/web/00000.tar/x"}, "flags", "--out", "is a file"),
    ("batch-size-0", {"batch_size": 0}, "flags", "--batch-size", ">= 1"),
    ("max-new-tokens-0", {"max_new_tokens": 0}, "flags", "--max-new-tokens", ">= 1"),
    ("slice-size-0", {"slice_size": 0}, "flags", "--slice-size", ">= 1"),
    ("rank-not-below-world", {"rank": 2, "world_size": 2}, "flags", "--rank", "outside world_size 2"),
    ("world-size-0", {"world_size": 0}, "flags", "--world-size", ">= 1"),
    ("rank-negative", {"rank": -1}, "flags", "--rank", ">= 0"),
    ("dtype-unknown", {"dtype": "bf16"}, "flags", "--dtype", "bfloat16"),
    ("device-unknown", {"device": "gpu"}, "flags", "--device", "cuda:N"),
    ("backend-unknown", {"backend": "tgi"}, "flags", "--backend", "hf, vllm"),
    ("vllm-on-cpu", {"backend": "vllm", "device": "cpu"}, "flags", "--device", "GPU only"),
    ("yaml-model-missing", {"model": "TMP/nope/llava/hf"}, "yaml", "model", "existing folder"),
    ("yaml-shards-list-missing", {"shards": ["TMP/web/00000.tar", "TMP/web/00009.tar"]}, "yaml", "shards", "missing"),
    ("yaml-batch-size-0", {"batch_size": 0}, "yaml", "batch_size", ">= 1"),
    ("yaml-batch-size-text", {"batch_size": "many"}, "yaml", "batch_size", "integer"),
    ("yaml-max-new-tokens-float", {"max_new_tokens": 12.5}, "yaml", "max_new_tokens", "integer"),
    ("yaml-rank-not-below-world", {"rank": 4, "world_size": 4}, "yaml", "rank", "outside world_size 4"),
    ("yaml-dtype-unknown", {"dtype": "fp16"}, "yaml", "dtype", "float16"),  # argparse never checked YAML choices
    ("yaml-device-unknown", {"device": "cuda0"}, "yaml", "device", "cuda:N"),
    ("yaml-backend-unknown", {"backend": "vllmm"}, "yaml", "backend", "hf, vllm"),
    ("yaml-out-is-a-file", {"out": "TMP/model/config.json"}, "yaml", "out", "a file is there"),
    ("yaml-bool-as-text", {"trust_remote_code": "yes please"}, "yaml", "trust_remote_code", "true or false"),
    ("yaml-empty-prompt", {"prompt": " "}, "yaml", "prompt", "non-empty"),
    ("min-image-size-0", {"min_image_size": 0}, "flags", "--min-image-size", ">= 1"),
    (
        "yaml-pixels-below-min-squared",
        {"min_image_size": 100, "max_image_pixels": 50},
        "yaml",
        "max_image_pixels",
        "every image would be skipped",
    ),
    ("claim-ttl-0", {"claim_ttl": 0}, "flags", "--claim-ttl", "seconds > 0"),
    ("yaml-claim-ttl-text", {"claim_ttl": "5 min"}, "yaml", "claim_ttl", "seconds > 0"),
    ("yaml-claim-ttl-inf", {"claim_ttl": float("inf")}, "yaml", "claim_ttl", "seconds > 0"),
]


def _fill(value, tmp: Path):
    if isinstance(value, list):
        return [_fill(v, tmp) for v in value]
    return value.replace("TMP", str(tmp)) if isinstance(value, str) else value


@pytest.mark.parametrize(("settings", "via", "key", "why"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_setting_exits_2_naming_the_key_and_writes_nothing(ws, capsys, settings, via, key, why):
    tmp = ws["tmp"]
    settings = {k: _fill(v, tmp) for k, v in settings.items()}
    good = {"model": ws["model"], "shards": ws["shards"], "out": ws["out"]}
    before = sorted(p.relative_to(tmp) for p in tmp.rglob("*"))
    if via == "flags":
        argv = ["run", "--no-progress"]
        for k, v in (good | settings).items():
            argv += [f"--{k.replace('_', '-')}", str(v)]
        where = "(in command line)"
    else:
        cfg = tmp / "bad.yaml"
        cfg.write_text(yaml.safe_dump(good | settings))
        before.append(cfg.relative_to(tmp))
        argv, where = ["run", "--config", str(cfg), "--no-progress"], f"(in {cfg})"
    err = _refused(argv, capsys)
    line = next((x for x in err.splitlines() if x.startswith(f"config error: {key} = ")), None)
    assert line is not None, err
    assert why in line
    assert line.endswith(where)
    assert len(err.splitlines()) == 1, err  # only the broken setting is reported
    assert not Path(ws["out"]).exists()
    assert sorted(p.relative_to(tmp) for p in tmp.rglob("*")) == sorted(before)  # nothing written anywhere
    assert _FakeBackend.built == []  # no model was loaded


def test_every_problem_is_reported_at_once_each_from_where_it_was_set(ws, capsys):
    cfg = ws["tmp"] / "r.yaml"
    cfg.write_text(yaml.safe_dump({"model": ws["model"], "shards": ws["shards"], "out": ws["out"], "batch_size": 0}))
    err = _refused(["run", "--config", str(cfg), "--max-new-tokens", "0", "--dtype", "half"], capsys)
    assert err.splitlines() == [
        "config error: --max-new-tokens = 0: must be an integer >= 1 (in command line)",
        f"config error: batch_size = 0: must be an integer >= 1 (in {cfg})",
        "config error: --dtype = 'half': must be one of bfloat16, float16, float32 (or unset: the checkpoint's) "
        "(in command line)",
    ]
    assert not Path(ws["out"]).exists()


def test_a_flag_fixes_a_bad_yaml_value(ws):
    cfg = ws["tmp"] / "r.yaml"
    cfg.write_text(yaml.safe_dump({"model": ws["model"], "shards": ws["shards"], "out": ws["out"], "batch_size": 0}))
    totals = main(["run", "--config", str(cfg), "--batch-size", "2", "--no-progress"])
    assert totals["units"] == 2


@pytest.mark.parametrize(
    ("env", "flags", "key", "where"),
    [
        ({"RANK": "3", "WORLD_SIZE": "2"}, [], "rank = '3'", "(in environment"),
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "4"}, [], "rank = '5'", "(in environment"),
        ({"RANK": "3"}, ["--world-size", "2"], "--world-size = 2", "(in command line)"),
    ],
)
def test_a_rank_from_the_environment_is_checked_against_the_world_size(ws, capsys, monkeypatch, env, flags, key, where):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    err = _refused(["run", "--model", ws["model"], "--shards", ws["shards"], "--out", ws["out"], *flags], capsys)
    assert err.startswith(f"config error: {key}: "), err
    assert "outside world_size" in err
    assert where in err
    assert not Path(ws["out"]).exists()


def test_unknown_yaml_keys_are_refused_naming_key_and_file(ws, capsys):
    typo = ws["tmp"] / "typo.yaml"
    typo.write_text(f"modle: {ws['model']}\nshards: x\nout: {ws['out']}\n")
    err = _refused(["run", "--config", str(typo)], capsys)
    want = f"config error: modle = {ws['model']!r}: is not a recaption run key; did you mean model? (in {typo})"
    assert err.strip() == want
    odd = ws["tmp"] / "odd.yaml"
    odd.write_text("colour: red\nflavour: sweet\n")
    with pytest.raises(ValueError, match="colour") as exc:  # _load_config itself, for callers outside main
        _load_config(str(odd))
    assert str(odd) in str(exc.value)
    assert "also unknown: flavour" in str(exc.value)
    assert all(k in str(exc.value) for k in RUN_KEYS)  # no close match: the known keys are listed
    dashed = ws["tmp"] / "dashed.yaml"
    dashed.write_text("batch-size: 4\nbatch_size: 8\n")
    with pytest.raises(ValueError, match="set twice"):
        _load_config(str(dashed))
    assert not Path(ws["out"]).exists()


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("model: [a,\n", "is not valid YAML at line 2"),
        ("- model\n- shards\n", "must be a mapping of run flags to values, not a list"),
        ("just a string\n", "not a str"),
        (None, "cannot be read"),
    ],
    ids=["parse-error", "list", "scalar", "missing-file"],
)
def test_a_broken_config_file_is_refused_naming_the_file(ws, capsys, text, why):
    cfg = ws["tmp"] / "c.yaml"
    if text is not None:
        cfg.write_text(text)
    err = _refused(["run", "--config", str(cfg), "--out", ws["out"]], capsys)
    assert err.startswith(f"config error: --config = {str(cfg)!r}: "), err
    assert why in err
    assert not Path(ws["out"]).exists()


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_have_known_keys_and_valid_values(ws, path):
    cfg = _load_config(str(path))
    assert {"model", "shards", "out"} <= set(cfg)
    assert set(cfg) <= set(RUN_KEYS)
    # their paths exist only on the machines they are for: placeholders here, every other value as shipped
    values = recaption._RUN_DEFAULTS | cfg | {"model": ws["model"], "shards": ws["shards"], "out": ws["out"]}
    assert run_config_problems(values) == []


def test_shipped_configs_exist():
    assert {p.name for p in SHIPPED} >= {"datacomp.yaml", "tiny_world.yaml"}


def test_remote_shards_and_hub_names_are_left_to_the_run(ws):
    base = recaption._RUN_DEFAULTS | {"out": ws["out"]}
    for model, shards in [
        ("llava-hf/llava-1.5-7b-hf", "s3://bucket/datacomp/{00000000..00139999}.tar"),
        ("org/name", "pipe:aws s3 cp s3://bucket/{00000..00009}.tar -"),
        (ws["model"], "https://host/shards/{000..009}.tar::" + ws["shards"]),
    ]:
        assert run_config_problems(base | {"model": model, "shards": shards}) == [], (model, shards)


def test_a_good_config_runs_with_flags_overriding_it(ws):
    cfg = ws["tmp"] / "r.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": ws["model"],
                "shards": ws["shards"],
                "out": ws["out"],
                "max_new_tokens": 5,
                "batch_size": 64,
                "dtype": "float32",
            }
        )
    )
    totals = main(["run", "--config", str(cfg), "--batch-size", "2", "--device", "cpu", "--no-progress"])
    assert totals["units"] == 2  # both shards of the local brace range
    assert totals["rows"] == 5
    assert _FakeBackend.built == [{"model": ws["model"], "max_new_tokens": 5, "device": "cpu", "dtype": "float32"}]
    table = pq.read_table(Path(ws["out"]) / "00000.parquet")
    assert table.num_rows == 3
    assert '"batch_size": 2' in table.column("decoding")[0].as_py()  # the flag won over the file's 64


def test_run_from_python_refuses_before_creating_out(ws):
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        run(ws["model"], ws["shards"], ws["out"], batch_size=0, progress=False)
    assert not Path(ws["out"]).exists()
    assert _FakeBackend.built == []


def test_image_limits_are_the_training_loaders(ws):
    """The shards' 16 px images are captioned at the default minimum side (8) and become error rows naming the
    limit at 20; the limits reach every unit."""
    main(["run", "--model", ws["model"], "--shards", ws["shards"], "--out", ws["out"], "--no-progress"])
    ok = pq.read_table(Path(ws["out"]) / "00000.parquet").to_pylist()
    assert [r["status"] for r in ok] == ["ok"] * 3
    strict = ws["tmp"] / "strict"
    totals = main(
        [
            "run",
            "--model",
            ws["model"],
            "--shards",
            ws["shards"],
            "--out",
            str(strict),
            "--no-progress",
            "--min-image-size",
            "20",
        ]
    )
    assert totals["errors"] == 5
    rows = [r for f in sorted(strict.glob("0000*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert len(rows) == 5
    assert {r["status"] for r in rows} == {"error"}
    assert all("tiny_image" in r["error"] and "min_image_size=20" in r["error"] for r in rows)
