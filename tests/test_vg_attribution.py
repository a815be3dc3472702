"""VG-Attribution (ARO): the reader of the released layout, the crop, the macro/micro accuracy against the benchmark's
definition on a hand-made set, and the tiny world's attribute-swap split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datamodules.tiny_world import WorldConfig, generate_world
from lightning_modules.evaluation import VGAttribution, run_tasks

COLOUR = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def mean_colour(image: Image.Image) -> torch.Tensor:
    return torch.tensor(np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(0))


def colour_of_first_word(texts: list[str]) -> torch.Tensor:
    return torch.tensor([COLOUR[t.split()[0]] for t in texts], dtype=torch.float32)


@pytest.fixture(scope="module")
def simple_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def write_set(root: Path, items: list[dict]) -> Path:
    """ARO's released layout: ``root/visual_genome_attribution.json`` and ``root/images/<image_path>``."""
    (root / "images").mkdir(parents=True)
    halves = {"a.png": ("red", "blue"), "b.png": ("blue", "red")}  # (left/top, right/bottom) halves
    for name, (first, second) in halves.items():
        pixels = np.zeros((20, 40, 3), np.uint8) if name == "a.png" else np.zeros((40, 20, 3), np.uint8)
        if name == "a.png":
            pixels[:, :20], pixels[:, 20:] = COLOUR[first], COLOUR[second]
        else:
            pixels[:20], pixels[20:] = COLOUR[first], COLOUR[second]
        Image.fromarray(pixels).save(root / "images" / name)  # PNG: exact colours
    (root / "visual_genome_attribution.json").write_text(json.dumps(items))
    return root


def item(image: str, box: tuple[int, int, int, int], true: str, false: str, attributes: list[str]) -> dict:
    x, y, w, h = box
    fields = {"image_id": image, "image_path": image, "bbox_x": x, "bbox_y": y, "bbox_w": w, "bbox_h": h}
    return fields | {"true_caption": true, "false_caption": false, "attributes": attributes}


LEFT, RIGHT, WHOLE, TOP, BOTTOM = (0, 0, 20, 20), (20, 0, 20, 20), (0, 0, 40, 20), (0, 0, 20, 20), (0, 20, 20, 20)
HAND_SET = [
    item("a.png", LEFT, "red square", "blue square", ["red", "blue"]),  # red crop: right
    item("a.png", RIGHT, "red square", "blue square", ["red", "blue"]),  # blue crop: wrong
    item("a.png", WHOLE, "red square", "blue square", ["red", "blue"]),  # half red, half blue: a tie, wrong in ARO
    item("a.png", RIGHT, "blue circle", "red circle", ["blue", "red"]),  # right
    item("b.png", BOTTOM, "red circle", "blue circle", ["blue", "red"]),  # right
    item("b.png", TOP, "green square on a tile", "blue square", ["green", "blue"]),  # blue crop: wrong
]
# By hand: pair red_blue 1 of 3, blue_red 2 of 2, green_blue 0 of 1. Micro 3 of 6.


def run(task: VGAttribution, tokenizer, context_length: int = 77, encode_texts=colour_of_first_word) -> dict:
    out = run_tasks([task], lambda x: F.normalize(x, dim=-1), encode_texts, mean_colour, tokenizer, context_length, 4)
    return {k.removeprefix(f"{task.name}/"): v for k, v in out.items()}


def test_hand_made_set_scores_as_aro_defines(tmp_path, simple_tokenizer):
    root = write_set(tmp_path, HAND_SET)
    seen = []

    def encode(texts):
        seen.extend(texts)
        return colour_of_first_word(texts)

    got = run(VGAttribution(root, min_pair_count=2), simple_tokenizer, context_length=5, encode_texts=encode)
    assert got["accuracy"] == pytest.approx(100 * (1 / 3 + 2 / 2) / 2)  # macro over the pairs with >= 2 items
    assert got["micro_accuracy"] == pytest.approx(50.0)
    assert (got["n_pairs"], got["n_items"]) == (2, 6)
    # "green square on a tile" is 5 BPE tokens + 2 specials > 5: counted, and encoded whole
    assert (got["n_texts_over_context"], got["frac_texts_over_context"]) == (1, pytest.approx(1 / 12))
    assert "green square on a tile" in seen
    every_pair = run(VGAttribution(root, min_pair_count=1), simple_tokenizer)
    assert every_pair["accuracy"] == pytest.approx(100 * (1 / 3 + 1 + 0) / 3)
    assert every_pair["n_pairs"] == 3


def test_aro_default_leaves_out_pairs_under_25_items(tmp_path, simple_tokenizer):
    big = [HAND_SET[0]] * 24 + [HAND_SET[1]] + [HAND_SET[3]] * 30  # red_blue 25 items (24 right), blue_red 30
    root = write_set(tmp_path, big + [HAND_SET[5]])  # green_blue: 1 item, left out
    got = run(VGAttribution(root), simple_tokenizer)
    assert got["accuracy"] == pytest.approx(100 * (24 / 25 + 1) / 2)
    assert got["micro_accuracy"] == pytest.approx(100 * 54 / 56)
    with pytest.raises(ValueError, match=r"no attribute pair has min_pair_count=31 items \(the largest has 30\)"):
        VGAttribution(root, min_pair_count=31)


def test_images_are_cropped_to_their_box(tmp_path):
    task = VGAttribution(write_set(tmp_path, HAND_SET), min_pair_count=1)
    images = task.image_dataset(lambda image: image)
    sizes = [images[i][0].size for i in range(len(HAND_SET))]
    assert sizes == [(20, 20), (20, 20), (40, 20), (20, 20), (20, 20), (20, 20)]
    colours = [tuple(mean_colour(images[i][0]).tolist()) for i in range(len(HAND_SET))]
    assert colours == [
        COLOUR["red"],
        COLOUR["blue"],
        (127.5, 0.0, 127.5),
        COLOUR["blue"],
        COLOUR["red"],
        COLOUR["blue"],
    ]


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (lambda items: items[2].pop("false_caption"), ValueError, r"item 2 lacks field 'false_caption'"),
        (lambda items: items[1].update(bbox_w=0), ValueError, r"item 1: bbox_x/y/w/h must be numbers"),
        (lambda items: items[0].update(attributes=["red"]), ValueError, r"item 0: field 'attributes'"),
        (lambda items: items[3].update(true_caption=" "), ValueError, r"item 3: field 'true_caption' is empty"),
        (lambda items: items.clear(), ValueError, r"expected a non-empty list of items"),
    ],
)
def test_malformed_annotation_names_file_and_field(tmp_path, edit, error, match):
    items = [dict(i) for i in HAND_SET]
    edit(items)
    root = write_set(tmp_path, items)
    with pytest.raises(error, match=match) as e:
        VGAttribution(root, min_pair_count=1)
    assert "visual_genome_attribution.json" in str(e.value)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="VG-Attribution image folder"):
        VGAttribution(tmp_path)
    root = write_set(tmp_path / "set", HAND_SET)
    (root / "images" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"2 image file\(s\) missing, e.g. .*b.png"):
        VGAttribution(root, min_pair_count=1).image_dataset(mean_colour)
    (root / "visual_genome_attribution.json").unlink()
    with pytest.raises(FileNotFoundError, match="VG-Attribution annotation file not found: .*attribution.json"):
        VGAttribution(root)


# ------------------------------------------------------------------------------------------------ tiny world
def test_tiny_world_attribute_swaps_follow_the_ground_truth(tmp_path):
    others = dict(n_caption_pretrain=0, n_instruct=0, n_classify=0, n_retrieval=0, n_long_retrieval=0, n_t2i=0)
    world = tmp_path / "w"
    generate_world(world, WorldConfig.tiny(n_web=50, workers=1, **others))
    root = world / "eval/vg_attribution"
    items = json.loads((root / "visual_genome_attribution.json").read_text())
    truth = {r["id"]: r for r in pq.read_table(world / "truth/vg_attribution.parquet").to_pylist()}
    task = VGAttribution(root, min_pair_count=1)
    crops = task.image_dataset(lambda image: np.asarray(image, dtype=np.float32))
    assert len(items) == len(truth) == len(task.paths) == 24
    orders = set()
    for i, it in enumerate(items):
        objects = json.loads(truth[Path(it["image_path"]).stem]["objects"])
        assert [len(objects), len({o["colour"] for o in objects}), len({o["shape"] for o in objects})] == [2, 2, 2]
        first, second = sorted(objects, key=lambda o: it["true_caption"].index(o["shape"]))
        orders.add(first["size"])
        assert (
            it["true_caption"] == f"the {first['colour']} {first['shape']} and the {second['colour']} {second['shape']}"
        )
        assert (
            it["false_caption"]
            == f"the {second['colour']} {first['shape']} and the {first['colour']} {second['shape']}"
        )
        assert it["attributes"] == [first["colour"], second["colour"]]
        x, y, w, h = (it[f"bbox_{k}"] for k in "xywh")
        assert w == h  # square: a centre crop of it keeps both objects whole
        assert 0 <= x <= 64 - w
        assert 0 <= y <= 64 - h
        crop = crops[i][0]
        for o in objects:
            r = o["diameter"] / 2
            assert x - 1 <= o["cx"] - r < o["cx"] + r <= x + w + 1  # inside the box, up to rounding
            assert y - 1 <= o["cy"] - r < o["cy"] + r <= y + h + 1
            # the crop is where the box says: a filled part of the object (a ring's band) has the object's colour
            px = o["cx"] + (0.78 * r if o["shape"] == "ring" else 0) - x
            pixel = crop[int(o["cy"] - y), int(px)]
            others = [np.linalg.norm(pixel - q["rgb"]) for q in objects if q is not o]
            assert np.linalg.norm(pixel - o["rgb"]) < min(others), (it, o)
    assert orders == {"large", "small"}  # the large object is named first in some items, second in others


def test_lightning_test_path_equals_in_loop_on_the_world_split(tmp_path, monkeypatch):
    """The task plugs into both CLIP evaluation paths as Retrieval does: EvalDataModule + test_step + compute (ranks'
    shares gathered) gives what ClipModule.evaluate (run_tasks) gives, with the model's own transform on the crops."""
    from conftest import cpu_trainer

    from datamodules.eval_sets import EvalDataModule
    from experiments.paper_tables import tiny_model
    from lightning_modules.clip import ClipModule

    others = dict(n_caption_pretrain=0, n_instruct=0, n_classify=0, n_retrieval=0, n_long_retrieval=0, n_t2i=0)
    generate_world(tmp_path / "w", WorldConfig.tiny(n_web=50, workers=1, **others))
    torch.manual_seed(0)
    module = ClipModule(tiny_model("S-16", "small", 64), lr=1e-3)
    tasks = [VGAttribution(tmp_path / "w/eval/vg_attribution", min_pair_count=1)]
    monkeypatch.chdir(tmp_path)
    trainer = cpu_trainer()
    trainer.test(module, datamodule=EvalDataModule(tasks, batch_size=5))
    got = json.loads((Path(trainer.default_root_dir) / "metrics" / "test.json").read_text())["metrics"]
    want = module.evaluate(tasks)
    assert got == pytest.approx(want, abs=1e-6)
    assert want["vg_attribution/n_items"] == 24
    assert want["vg_attribution/n_texts_over_context"] == 0


@pytest.mark.parametrize("tiny", [True, False])
def test_table6_column_is_filled_from_the_task(tmp_path, tiny):
    from experiments import report

    long = "long_retrieval" if tiny else "urban1k"
    metrics = {"vg_attribution/accuracy": 61.5, f"{long}/image_to_text_R@1": 9.0}
    run = tmp_path / "clip/table6/B16-p0.8/stage2/metrics"
    run.mkdir(parents=True)
    (run / "step00000160.json").write_text(json.dumps({"metrics": metrics, "step": 160}))
    row = {r.id: r for r in report.build_report("table6", tiny=tiny, runs=tmp_path).rows}["B16-p0.8"]
    assert row.stats("vg_attribution")[0] == 61.5
    assert row.stats("urban1k_i2t_r1")[0] == 9.0
    assert "No tiny analog" not in report.markdown(report.build_report("table6", tiny=True, runs=tmp_path))
