"""Long-caption readers (DCI, DOCCI, IIW, ShareGPT4V) on small file sets written in each released layout, scored with a
colour oracle whose right answer is known; the tiny world's DOCCI copy of its long-retrieval set."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from datamodules.tiny_world.writer import WorldConfig, generate_world
from lightning_modules.evaluation import (
    DCIRetrieval,
    DOCCIRetrieval,
    IIWRetrieval,
    LongRetrieval,
    ShareGPT4VRetrieval,
    run_tasks,
)

RGB = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 20)}
ORDER = ["blue", "red", "yellow", "green"]  # file order differs from RGB's, so a mis-paired reader scores below 100


@pytest.fixture(scope="module")
def tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def image(path: Path, colour: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), RGB[colour]).save(path)


def caption(colour: str) -> str:
    return f"A {colour} square fills the frame. Nothing else is in view."


def jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def encode_images(x: torch.Tensor) -> torch.Tensor:
    """One-hot of the nearest reference colour of each image's mean pixel."""
    ref = torch.tensor(list(RGB.values()), dtype=torch.float32) / 255
    return F.one_hot(torch.cdist(x.mean((2, 3)), ref).argmin(1), len(RGB)).float()


def colour_text_encoder(tokenizer, context_length: int, seen: list[str]):
    """Counts of each colour word among the tokens the text tower would see (the context-truncated tokens)."""
    ids = torch.tensor([tokenizer.encode(c)[0] for c in RGB])

    def encode(texts: list[str]) -> torch.Tensor:
        seen.extend(texts)
        tokens = tokenizer(texts, context_length=context_length)
        return F.normalize((tokens[:, :, None] == ids).sum(1).float(), dim=-1)

    return encode


def score(task, tokenizer, context_length: int = 77) -> tuple[dict[str, float], list[str]]:
    seen: list[str] = []
    encode = colour_text_encoder(tokenizer, context_length, seen)
    out = run_tasks([task], encode_images, encode, transforms.ToTensor(), tokenizer, context_length, batch_size=3)
    return {k.removeprefix(f"{task.name}/"): v for k, v in out.items()}, seen


# ------------------------------------------------------------------------------------------- released layouts
def write_dci(root: Path) -> DCIRetrieval:
    """dci.tar.gz's densely_captioned_images/: splits.json, annotations/<n>-data.json, photos/ (SA-1B files)."""
    files = {}
    for i, colour in enumerate(ORDER):
        name = f"{113000 + i}-data.json"
        anno = {"image": f"sa_{1545000 + i}.jpg", "short_caption": f"A {colour} square.", "mask_data": {}}
        anno["extra_caption"] = "It sits alone on a plain ground.\nThe light is even."
        image(root / "photos" / anno["image"], colour)
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / name).write_text(json.dumps(anno))
        files[colour] = name
    splits = {"train": [files["blue"], files["red"]], "valid": [files["yellow"]], "test": [files["green"]]}
    (root / "splits.json").write_text(json.dumps(splits))
    return DCIRetrieval(root)


def write_docci(root: Path) -> DOCCIRetrieval:
    """docci_descriptions.jsonlines (example_id, split, image_file, description) + images/."""
    rows = []
    for i, colour in enumerate(ORDER):
        example_id = f"test_{i:05d}"
        image(root / "images" / f"{example_id}.jpg", colour)
        rows.append({"example_id": example_id, "split": "test", "image_file": f"{example_id}.jpg"})
        rows[-1]["description"] = caption(colour)
    # other splits' images are not on disk here: the reader must not touch them
    rows.insert(1, {"example_id": "train_00000", "split": "train", "image_file": "train_00000.jpg", "description": "x"})
    rows.append(
        {"example_id": "qual_dev_00000", "split": "qual_dev", "image_file": "qual_dev_00000.jpg", "description": "y"}
    )
    jsonl(root / "docci_descriptions.jsonlines", rows)
    return DOCCIRetrieval(root, split="test")


def write_iiw(root: Path) -> IIWRetrieval:
    """google/imageinwords datasets/<subset>/data.jsonl + FLAIR's image folders (docci, docci_aar, dci)."""
    blue, red, yellow, green = ORDER
    image(root / "docci" / "test_00731.jpg", blue)
    image(root / "docci_aar" / "aar_test_04600.jpg", red)
    image(root / "docci_aar" / "aar_test_04601.jpg", yellow)
    image(root / "dci" / "sa_1545038.jpg", green)
    jsonl(root / "DOCCI_Test" / "data.jsonl", [{"image": "test_00731", "DOCCI": "other", "IIW": caption(blue)}])
    aar = [{"image/key": f"aar_test_0460{i}", "IIW": caption(c), "IIW-P5B": "model"} for i, c in enumerate(ORDER[1:3])]
    jsonl(root / "IIW-400" / "data.jsonl", aar)
    dci = [{"ex_id": "113029-data.json", "image": "sa_1545038.jpg", "IIW": caption(green)}]
    jsonl(root / "DCI_Test" / "data.jsonl", dci)
    return IIWRetrieval(root)


def write_sharegpt4v(root: Path) -> ShareGPT4VRetrieval:
    """share-captioner_*.json: a list of {id, image, conversations: [human, gpt]}; the task takes the first n."""
    items = []
    for i, colour in enumerate([*ORDER, "red"]):
        rel = f"sam/images/sa_{i}.jpg"
        if i < len(ORDER):  # the fifth item's image is absent: only the first n = 4 are read
            image(root / rel, colour)
        turns = [{"from": "human", "value": "<image>\nWhat's happening in the scene?"}]
        items.append(
            {"id": f"sa_{i}", "image": rel, "conversations": turns + [{"from": "gpt", "value": caption(colour)}]}
        )
    (root / "captions.json").write_text(json.dumps(items))
    return ShareGPT4VRetrieval(root / "captions.json", root, n=len(ORDER), name="sharegpt4v_4")


LAYOUTS = {"dci": write_dci, "docci": write_docci, "iiw": write_iiw, "sharegpt4v": write_sharegpt4v}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reader_pairs_each_image_with_its_caption(layout, tmp_path, tokenizer):
    task = LAYOUTS[layout](tmp_path)
    assert len(task.paths) == len(task.texts) == 4
    assert [next(c for c in RGB if c in t) for t in task.texts] == ORDER
    got, seen = score(task, tokenizer)
    assert seen == task.texts
    assert all(got[f"{d}_R@1"] == 100.0 for d in ("image_to_text", "text_to_image")), got
    assert (got["n_images"], got["n_texts"], got["n_texts_over_context"]) == (4, 4, 0)
    # the oracle is not blind to pairing: the same features one image off score nothing
    feats = encode_images(torch.stack([transforms.ToTensor()(Image.open(p)) for p in task.paths]))
    rolled = task.compute(feats.roll(1, 0), colour_text_encoder(tokenizer, 77, []), tokenizer, 77)
    assert rolled["image_to_text_R@1"] == rolled["text_to_image_R@1"] == 0.0


def test_layout_specific_rules(tmp_path):
    dci = write_dci(tmp_path / "dci")
    assert dci.texts[0] == "A blue square.\nIt sits alone on a plain ground.\nThe light is even."  # short + \n + extra
    assert [p.name for p in DCIRetrieval(tmp_path / "dci", splits=["test"]).paths] == ["sa_1545003.jpg"]
    iiw = write_iiw(tmp_path / "iiw")
    assert [str(p.relative_to(tmp_path / "iiw")) for p in iiw.paths] == [
        "docci/test_00731.jpg",
        "docci_aar/aar_test_04600.jpg",
        "docci_aar/aar_test_04601.jpg",
        "dci/sa_1545038.jpg",
    ]
    p5b = IIWRetrieval(tmp_path / "iiw", subsets={"IIW-400": "docci_aar"}, field="IIW-P5B")
    assert p5b.texts == ["model", "model"]
    docci = write_docci(tmp_path / "docci")
    assert [p.name for p in docci.paths] == [f"test_0000{i}.jpg" for i in range(4)]
    assert DOCCIRetrieval(tmp_path / "docci", split="qual_dev").texts == ["y"]
    share = write_sharegpt4v(tmp_path / "share")
    assert [p.name for p in share.paths] == [f"sa_{i}.jpg" for i in range(4)]


def test_over_context_captions_are_counted_and_encoded_truncated(tmp_path, tokenizer):
    root = tmp_path / "docci"
    write_docci(root)
    rows = [json.loads(line) for line in (root / "docci_descriptions.jsonlines").read_text().splitlines()]
    # the blue image's description: "blue" early, then more "red" than "blue" past a 16-token context
    rows[0]["description"] = "A blue square " + "seen from far away " * 4 + "next to red red red things."
    jsonl(root / "docci_descriptions.jsonlines", rows)
    task = DOCCIRetrieval(root)
    long_text = task.texts[0]
    assert len(tokenizer.encode(long_text)) + 2 > 16 > max(len(tokenizer.encode(t)) + 2 for t in task.texts[1:])

    got, seen = score(task, tokenizer, context_length=16)
    assert (got["n_texts"], got["n_texts_over_context"], got["frac_texts_over_context"]) == (4, 1, 0.25)
    assert seen[0] == long_text  # handed to the text tower whole, never dropped or pre-cut
    assert got["text_to_image_R@1"] == 100.0  # encoded as the tower sees it, truncated: blue, not the later red
    got_full, _ = score(task, tokenizer, context_length=77)  # with the whole caption in context, "red" wins
    assert (got_full["n_texts_over_context"], got_full["text_to_image_R@1"]) == (0, 75.0)


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _edit_jsonl(path: Path, fn) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    fn(rows)
    jsonl(path, rows)


BROKEN = {  # layout -> (break the written files, read them again, the error's file and field)
    "dci": (
        lambda r: _edit_json(r / "annotations/113002-data.json", lambda a: a.pop("extra_caption")),
        lambda r: DCIRetrieval(r),
        r"113002-data\.json: field 'extra_caption'",
    ),
    "dci_split": (lambda r: None, lambda r: DCIRetrieval(r, splits=["val"]), r"splits\.json: no list for split 'val'"),
    "docci": (
        lambda r: _edit_jsonl(r / "docci_descriptions.jsonlines", lambda rows: rows[2].pop("description")),
        lambda r: DOCCIRetrieval(r),
        r"docci_descriptions\.jsonlines:3: field 'description'",
    ),
    "docci_split": (lambda r: None, lambda r: DOCCIRetrieval(r, split="val"), r"no records in split 'val'.*qual_dev"),
    "iiw": (lambda r: None, lambda r: IIWRetrieval(r, field="IIW-P5B"), r"DOCCI_Test/data\.jsonl:1: field 'IIW-P5B'"),
    "sharegpt4v": (
        lambda r: _edit_json(r / "captions.json", lambda items: items[2]["conversations"][1].update({"from": "human"})),
        lambda r: ShareGPT4VRetrieval(r / "captions.json", r, n=4),
        r"captions\.json: item 2: conversations\[1\]\['from'\]",
    ),
    "sharegpt4v_n": (
        lambda r: None,
        lambda r: ShareGPT4VRetrieval(r / "captions.json", r, n=10_000),
        r"at least n=10000 items, got 5",
    ),
}


@pytest.mark.parametrize("case", BROKEN)
def test_bad_files_name_the_file_and_field(case, tmp_path):
    LAYOUTS[case.split("_")[0]](tmp_path)
    breaks, read, message = BROKEN[case]
    breaks(tmp_path)
    with pytest.raises(ValueError, match=message):
        read(tmp_path)


def test_missing_image_is_named(tmp_path, tokenizer):
    task = write_dci(tmp_path)
    (tmp_path / "photos" / "sa_1545001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="sa_1545001.jpg"):
        score(task, tokenizer)


def test_tiny_world_writes_its_long_pairs_in_docci_layout(tmp_path):
    world = tmp_path / "w"
    sizes = dict(n_caption_pretrain=0, n_instruct=0, n_classify=0, n_retrieval=0, n_t2i=0)
    generate_world(world, WorldConfig.tiny(n_web=10, shard_size=10, n_long_retrieval=5, workers=1, **sizes))
    urban, docci = LongRetrieval(world / "eval/long_retrieval"), DOCCIRetrieval(world / "eval/docci")
    assert len(docci.texts) == 5
    assert docci.texts == urban.texts
    assert [p.read_bytes() for p in docci.paths] == [p.read_bytes() for p in urban.paths]
