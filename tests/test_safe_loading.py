"""Safe loading: checkpoints are read with ``weights_only=True`` (or safetensors), remote model code runs only when a
config turns it on, and a checkpoint carrying a pickled object is refused by every loader of the suite."""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The suite's code. tests/ is not scanned: tests read back files they wrote themselves a moment before (some with
# weights_only=False to inspect a checkpoint's raw contents), which is no untrusted input.
SCANNED = ("lightning_modules", "datamodules", "experiments", "benchmarks")


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _keyword(call: ast.Call, name: str) -> ast.keyword | None:
    return next((k for k in call.keywords if k.arg == name), None)


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def unsafe_loads(source: str, where: str = "<src>") -> list[str]:
    """``where:line: problem`` for every unsafe deserialisation in Python ``source``."""
    tree = ast.parse(source)
    torch_load_names = {"torch.load"}
    for node in ast.walk(tree):  # `from torch import load [as x]`
        if isinstance(node, ast.ImportFrom) and node.module == "torch":
            torch_load_names |= {a.asname or a.name for a in node.names if a.name == "load"}
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            weights_only = _keyword(node, "weights_only")
            if (name in torch_load_names or name.endswith(".load_from_checkpoint")) and not (
                weights_only and _is_true(weights_only.value)
            ):
                problems.append(f"{where}:{node.lineno}: {name}(...) without a literal weights_only=True")
            remote = _keyword(node, "trust_remote_code")
            if remote is not None and isinstance(remote.value, ast.Constant):
                problems.append(f"{where}:{node.lineno}: trust_remote_code={remote.value.value!r} is a literal")
            if name in ("pickle.load", "pickle.loads", "dill.load", "dill.loads", "joblib.load", "yaml.unsafe_load"):
                problems.append(f"{where}:{node.lineno}: {name}(...) unpickles arbitrary objects")
            if name == "yaml.load" and "Safe" not in ast.unparse(_keyword(node, "Loader") or node):
                problems.append(f"{where}:{node.lineno}: yaml.load without SafeLoader")
            allow = _keyword(node, "allow_pickle")
            if allow is not None and _is_true(allow.value):
                problems.append(f"{where}:{node.lineno}: allow_pickle=True")
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):  # a default of True turns remote code on
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults
            defaults += node.args.kw_defaults
            for arg, default in zip(args, defaults, strict=True):
                if arg.arg == "trust_remote_code" and _is_true(default):
                    problems.append(f"{where}:{node.lineno}: {node.name}(trust_remote_code=True) by default")
    return problems


def _suite_files() -> list[Path]:
    files = [p for d in SCANNED for p in (REPO / d).rglob("*.py")] + list(REPO.glob("*.py"))
    return sorted(p for p in files if "__pycache__" not in p.parts)


def test_the_scanner_flags_each_unsafe_form():
    src = """
import torch, pickle, yaml
from torch import load as tload
a = torch.load(p)
b = torch.load(p, weights_only=False)
c = tload(p)
d = M.load_from_checkpoint(p)
e = f(x, trust_remote_code=True)
g = pickle.loads(blob)
h = yaml.load(text)
i = np.load(p, allow_pickle=True)
def build(name, trust_remote_code=True): ...
ok1 = torch.load(p, map_location="cpu", weights_only=True)
ok2 = f(x, trust_remote_code=cfg.trust_remote_code)
ok3 = yaml.load(text, Loader=yaml.SafeLoader)
def ok4(name, trust_remote_code: bool = False): ...
"""
    lines = sorted(int(p.split(":")[1]) for p in unsafe_loads(src))
    assert lines == [4, 5, 6, 7, 8, 9, 10, 11, 12]


def test_the_suite_loads_checkpoints_safely_and_runs_no_remote_code_by_default():
    files = _suite_files()
    assert len(files) > 30  # the scan sees the suite
    problems = [p for f in files for p in unsafe_loads(f.read_text(), str(f.relative_to(REPO)))]
    assert problems == []


# ------------------------------------------------------------------------------------------- behaviour: refusal
class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: proof that a loader executed code from a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture
def evil_ckpt(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    state = {"model.logit_scale": torch.zeros(())}
    torch.save({"state_dict": state, "hyper_parameters": {"model": "ViT-B-32"}, "x": _Payload(marker)}, path)
    with pytest.raises(pickle.UnpicklingError):  # the file is a real trap: unsafe loading would run it
        torch.load(path, weights_only=True)
    assert not marker.exists()
    return path, marker


def test_clip_loaders_refuse_a_pickled_object(evil_ckpt, tmp_path):
    from experiments.export_clip import export_clip
    from lightning_modules.clip import ClipModule
    from lightning_modules.components.clip_model import load_checkpoint_file

    path, marker = evil_ckpt
    with pytest.raises(ValueError, match="weights_only=True"):
        load_checkpoint_file(path)
    tiny = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "head_width": 8, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    }
    with pytest.raises(ValueError, match="cannot load"):
        ClipModule(tiny, lr=1e-3, init_from=str(path))  # CLIPA stage 2's init_from
    with pytest.raises(ValueError, match="cannot load"):
        export_clip(path, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    assert not marker.exists()


@pytest.mark.parametrize("command", ["export-clip", "export-captioner"])
def test_export_commands_refuse_a_pickled_object_in_one_line(command, evil_ckpt, tmp_path, capsys):
    """The file named and refused as unsafe, exit code 1: no traceback, no advice to retry with weights_only=False."""
    from experiments.__main__ import main

    path, marker = evil_ckpt
    with pytest.raises(SystemExit) as exc:
        main([command, "--ckpt", str(path), "--out", str(tmp_path / "out")])
    assert exc.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"{command}: cannot load {path}: refused as unsafe" in line
    assert "posix.mkdir" in line
    assert "False" not in line
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_captioner_and_dit_loaders_refuse_a_pickled_object(evil_ckpt):
    from lightning_modules.captioner import CaptionerModule
    from lightning_modules.dit import DiTModule

    path, marker = evil_ckpt
    with pytest.raises(ValueError, match="refused as unsafe"):
        CaptionerModule._load_init(torch.nn.Linear(2, 2), str(path))  # captioner stage 2's init_from
    with pytest.raises(pickle.UnpicklingError):
        DiTModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)  # as dit-eval loads
    assert not marker.exists()


def test_cli_resume_refuses_a_pickled_object(evil_ckpt, tmp_path, monkeypatch):
    from conftest import write_shards

    from experiments.cli import cli_main

    path, marker = evil_ckpt
    write_shards(tmp_path / "web", [8, 8])
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(REPO / "experiments/configs/debug/tiny_clip.yaml"), f"--ckpt_path={path}"]
    args += [f"--data.init_args.train_shards={tmp_path / 'web'}", "--data.init_args.val_shards=null"]
    with pytest.raises(pickle.UnpicklingError):
        cli_main(args)
    assert not marker.exists()
