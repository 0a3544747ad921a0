"""segmentation.data / transforms / synthetic / metrics: Cityscapes-layout loader and its error messages,
joint transforms, the synthetic data set generator, the confusion matrix (against a hand-computed case)
and the colour palette."""

from __future__ import annotations

import datetime
import os
import random
import re
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from segmentation import synthetic  # noqa: E402
from segmentation.data import (  # noqa: E402
    CITYSCAPES_CLASSES,
    CITYSCAPES_LABELS,
    IGNORE_INDEX,
    LABEL_ID_TO_TRAIN_ID,
    NUM_CLASSES,
    CityscapesSegmentation,
    DataError,
    label_ids_to_train_ids,
)
from segmentation.metrics import PALETTE, ConfusionMatrix, colorize  # noqa: E402
from segmentation.transforms import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    eval_transform,
    train_transform,
)

SIZE = (48, 96)  # small synthetic images keep the file fast
VALID_TRAIN_IDS = set(range(NUM_CLASSES)) | {IGNORE_INDEX}


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    """A small synthetic set shared (read-only) by the tests that do not modify it."""
    root = tmp_path_factory.mktemp("synth")
    synthetic.generate(str(root), num_train=6, num_val=3, size=SIZE, seed=3)
    return root


@pytest.fixture
def small_root(tmp_path) -> Path:
    """A fresh 2 + 1 image set that a test may damage."""
    synthetic.generate(str(tmp_path), num_train=2, num_val=1, size=(40, 64), seed=0, color=False)
    return tmp_path


def _pairs(root: Path, split: str = "train"):
    ds = CityscapesSegmentation(str(root), split)
    return [(Path(i), Path(lab)) for i, lab in ds.files]


# ------------------------------------------------------------------------------------------------ label ids


def test_label_id_to_train_id_known_values():
    lut = LABEL_ID_TO_TRAIN_ID
    assert lut.shape == (256,) and lut.dtype == np.uint8
    assert lut[7] == 0  # road
    assert lut[8] == 1  # sidewalk
    assert lut[11] == 2  # building
    assert lut[24] == 11  # person
    assert lut[26] == 13  # car
    assert lut[33] == 18  # bicycle
    for ignored in (0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30):  # unlabeled ... trailer
        assert lut[ignored] == 255, ignored
    for unknown in (34, 100, 254, 255):
        assert lut[unknown] == 255, unknown
    mapped = [i for i in range(256) if lut[i] != 255]
    assert len(mapped) == 19 and sorted(lut[mapped].tolist()) == list(range(19))  # each trainId exactly once
    assert len(CITYSCAPES_CLASSES) == NUM_CLASSES == 19
    assert CITYSCAPES_CLASSES[0] == "road" and CITYSCAPES_CLASSES[13] == "car" and CITYSCAPES_CLASSES[18] == "bicycle"
    got = label_ids_to_train_ids(np.array([[7, 26, -1], [24, 300, 0]], dtype=np.int32))
    np.testing.assert_array_equal(got, np.array([[0, 13, 255], [11, 255, 255]], dtype=np.uint8))


# ------------------------------------------------------------------------------------------------ synthetic + loader


def test_synthetic_layout_and_loader(synth_root):
    root = synth_root
    for split, n in (("train", 6), ("val", 3)):
        cities = synthetic.SYNTHETIC_CITIES[split]
        images = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
        labels = sorted((root / "gtFine" / split).glob("*/*_gtFine_labelIds.png"))
        assert len(images) == len(labels) == n
        assert {p.parent.name for p in images} == set(cities)
        ds = CityscapesSegmentation(str(root), split)
        assert len(ds) == n
        assert [Path(p).name for p, _ in ds.files] == sorted(Path(p).name for p, _ in ds.files)
    ds = CityscapesSegmentation(str(root), "train")
    seen = set()
    for idx, (img_path, lab_path) in enumerate(ds.files):
        assert Path(lab_path).name == Path(img_path).name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
        raw_img = Image.open(img_path)
        raw_lab = Image.open(lab_path)
        assert raw_img.mode == "RGB" and raw_lab.mode == "L" and raw_img.size == (SIZE[1], SIZE[0])
        x, y = ds[idx]
        assert x.dtype == torch.float32 and x.shape == (3, *SIZE)
        assert y.dtype == torch.int64 and y.shape == SIZE
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        torch.testing.assert_close(x, torch.from_numpy(np.array(raw_img)).permute(2, 0, 1).float() / 255)
        raw_ids = np.array(raw_lab)
        assert set(np.unique(raw_ids)) <= set(synthetic.SYNTHETIC_LABEL_IDS)
        torch.testing.assert_close(y, torch.from_numpy(LABEL_ID_TO_TRAIN_ID[raw_ids].astype(np.int64)))
        seen |= set(torch.unique(y).tolist())
    assert seen <= VALID_TRAIN_IDS
    # Several classes and some ignored pixels (ids 0 / 1 -> 255).
    assert {0, 1, 2, 10, 11, 13} <= seen and IGNORE_INDEX in seen
    # With a transform: (image, label) in trainIds go through it.
    ds_t = CityscapesSegmentation(str(root), "train", transform=train_transform(32, scale=(0.75, 1.25)))
    x, y = ds_t[0]
    assert x.shape == (3, 32, 32) and y.shape == (32, 32) and y.dtype == torch.int64
    assert set(torch.unique(y).tolist()) <= VALID_TRAIN_IDS


def test_synthetic_deterministic(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 7), (b, 7), (c, 8)):
        synthetic.generate(str(out), num_train=2, num_val=1, size=(32, 64), seed=seed)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 3 * 3  # image, labelIds, color
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)


def test_synthetic_refuses_non_empty_and_cli(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    with pytest.raises(FileExistsError, match="not empty.*--force"):
        synthetic.generate(str(out), num_train=1, num_val=1, size=(32, 32))
    assert (
        synthetic.main(["--out", str(out), "--num-train", "1", "--num-val", "1", "--height", "32", "--width", "32"])
        == 2
    )
    assert "not empty" in capsys.readouterr().err
    assert synthetic.main(["--out", str(out), "--num-train", "0"]) == 2
    assert "argument --num-train: must be an integer >= 1" in capsys.readouterr().err
    # --force replaces leftImg8bit/ and gtFine/ (a stale image disappears) and leaves other files alone.
    stale = out / "leftImg8bit" / "train" / "x" / "stale_leftImg8bit.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    assert (
        synthetic.main(
            ["--out", str(out), "--num-train", "2", "--num-val", "1", "--height", "32", "--width", "48", "--force"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "wrote 2 train + 1 val" in printed and "32x48" in printed
    assert not stale.exists() and (out / "keep.txt").read_text() == "user file"
    assert len(CityscapesSegmentation(str(out), "train")) == 2


# ------------------------------------------------------------------------------------------------ loader errors


def test_error_missing_root(tmp_path):
    with pytest.raises(DataError, match=re.escape("does_not_exist")):
        CityscapesSegmentation(str(tmp_path / "does_not_exist"))


def test_error_missing_split(small_root):
    expected = os.path.join("leftImg8bit", "test")
    with pytest.raises(DataError, match=re.escape(expected) + ".*leftImg8bit/SPLIT/CITY"):
        CityscapesSegmentation(str(small_root), "test")


def test_error_no_images(tmp_path):
    (tmp_path / "leftImg8bit" / "train" / "city").mkdir(parents=True)
    (tmp_path / "gtFine" / "train" / "city").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        CityscapesSegmentation(str(tmp_path), "train")


def test_error_image_without_label(small_root):
    img, lab = _pairs(small_root)[1]
    lab.unlink()
    with pytest.raises(DataError, match=re.escape(img.name) + ".*no label.*" + re.escape(lab.name)):
        CityscapesSegmentation(str(small_root), "train")


def test_error_label_without_image(small_root):
    img, lab = _pairs(small_root)[0]
    img.unlink()
    with pytest.raises(DataError, match=re.escape(lab.name) + ".*no image"):
        CityscapesSegmentation(str(small_root), "train")


def test_error_corrupt_png(small_root):
    img, lab = _pairs(small_root)[1]
    img.write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=re.escape(img.name)):
        CityscapesSegmentation(str(small_root), "train")


def test_error_truncated_png_on_load(small_root):
    img, lab = _pairs(small_root)[0]
    data = lab.read_bytes()
    lab.write_bytes(data[: len(data) // 2])  # valid header, truncated pixel data
    ds = CityscapesSegmentation(str(small_root), "train")  # header checks pass
    with pytest.raises(DataError, match=re.escape(lab.name)):
        ds[0]
    ds[1]  # the intact pair still loads


def test_error_size_mismatch(small_root):
    img, lab = _pairs(small_root)[0]
    Image.open(lab).resize((32, 20), Image.NEAREST).save(lab)
    with pytest.raises(DataError, match=re.escape(img.name) + r".*64x40.*" + re.escape(lab.name) + r".*32x20"):
        CityscapesSegmentation(str(small_root), "train")


def test_error_label_not_single_channel(small_root):
    img, lab = _pairs(small_root)[0]
    Image.open(lab).convert("RGB").save(lab)
    with pytest.raises(DataError, match=re.escape(lab.name) + ".*single-channel"):
        CityscapesSegmentation(str(small_root), "train")


def _as_jpeg(lab: Path) -> None:
    Image.open(lab).save(lab, format="JPEG", quality=75)  # a lossy file under the .png name


def _as_gif(lab: Path) -> None:
    Image.open(lab).save(lab, format="GIF")  # lossless, but not a PNG


def _with_value(value: int, dtype=np.uint8):
    def damage(lab: Path) -> None:
        ids = np.array(Image.open(lab)).astype(dtype)  # uint16: a 16-bit PNG (as instanceIds files are)
        ids[0, :3] = value
        Image.fromarray(ids).save(lab)

    return damage


# (damage, when the error is raised, message fragment): every row names the label file.
LABEL_FILE_CASES = [
    (_as_jpeg, "construction", "is a JPEG file named .png"),
    (_as_gif, "construction", "is a GIF file named .png"),
    (_with_value(34), "load", "not Cityscapes label ids (34;"),
    (_with_value(200), "load", "not Cityscapes label ids (200;"),
    (_with_value(26001, np.uint16), "load", "not Cityscapes label ids (26001;"),  # an instanceIds value
    (_with_value(256, np.uint16), "load", "not Cityscapes label ids (256;"),
]


@pytest.mark.parametrize(
    "damage, when, fragment", LABEL_FILE_CASES, ids=["jpeg", "gif", "id-34", "id-200", "instance-id", "id-256"]
)
def test_label_file_that_is_not_what_it_claims_is_refused(small_root, damage, when, fragment):
    img, lab = _pairs(small_root)[0]
    damage(lab)
    if when == "construction":
        with pytest.raises(DataError, match=re.escape(str(lab))) as e:
            CityscapesSegmentation(str(small_root), "train")
    else:
        ds = CityscapesSegmentation(str(small_root), "train")
        with pytest.raises(DataError, match=re.escape(str(lab))) as e:
            ds[0]
        ds[1]  # the intact pair still loads
    assert fragment in str(e.value)


def test_every_cityscapes_label_id_is_accepted(small_root):
    img, lab = _pairs(small_root)[0]
    ids = np.array(Image.open(lab))
    all_ids = np.array([lb.id % 256 for lb in CITYSCAPES_LABELS], dtype=np.uint8)
    ids.reshape(-1)[: all_ids.size] = all_ids
    Image.fromarray(ids).save(lab)
    _, y = CityscapesSegmentation(str(small_root), "train")[0]
    assert set(torch.unique(y).tolist()) <= VALID_TRAIN_IDS


# ------------------------------------------------------------------------------------------------ transforms


def _coded_pair(h: int, w: int):
    """Image whose channel 0 / 1 hold the column / row index (uint8), label = 1000 + row * w + col."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    image = np.stack([cols, rows, np.zeros_like(rows)], axis=-1).astype(np.uint8)
    label = (1000 + rows * w + cols).astype(np.int64)
    return image, label


def test_transform_output_shapes_and_label_values(synth_root):
    t = train_transform((40, 56))
    ds = CityscapesSegmentation(str(synth_root), "val")
    for i in range(len(ds)):
        image, label = ds.load(i)  # PIL pair, label already in trainIds
        for _ in range(3):
            x, y = t(image, label)
            assert x.shape == (3, 40, 56) and x.dtype == torch.float32
            assert y.shape == (40, 56) and y.dtype == torch.int64
            assert set(torch.unique(y).tolist()) <= VALID_TRAIN_IDS
    # Inputs larger and smaller than the crop, as tensors.
    for h, w in ((100, 30), (10, 10), (40, 56)):
        x, y = train_transform(24, scale=(0.5, 2.0))(torch.rand(3, h, w), torch.zeros(h, w, dtype=torch.int64))
        assert x.shape == (3, 24, 24) and y.shape == (24, 24)
    x, y = eval_transform()(*ds.load(0))
    assert x.shape == (3, *SIZE) and y.shape == SIZE


def test_transform_padding():
    h, w = 20, 30
    image = np.full((h, w, 3), 200, dtype=np.uint8)
    label = np.full((h, w), 3, dtype=np.int64)
    x, y = train_transform((40, 50), scale=None, flip_p=0.0)(image, label)
    assert (y[:h, :w] == 3).all()
    assert (y[h:, :] == 255).all() and (y[:, w:] == 255).all()
    # The image is padded with the mean, i.e. 0 after normalisation.
    assert float(x[:, h:, :].abs().max()) < 1e-6 and float(x[:, :, w:].abs().max()) < 1e-6
    expect = (200 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[:, 0, 0], expect)
    # Custom ignore index and fill.
    x, y = RandomCrop(25, fill=(0.5, 0.5, 0.5), ignore_index=99)(torch.zeros(3, 20, 20), torch.zeros(20, 20).long())
    assert int((y == 99).sum()) == 25 * 25 - 20 * 20 and int((x == 0.5).sum()) == 3 * (25 * 25 - 20 * 20)


def test_transform_joint_alignment():
    """Image channels and label encode the same (row, col): they must agree after scale, crop and flip."""
    h, w = 40, 60
    image, label = _coded_pair(h, w)
    t = train_transform((36, 48), scale=(0.5, 2.0), mean=(0, 0, 0), std=(1, 1, 1))
    flips = set()
    for _ in range(30):
        x, y = t(image, label)
        valid = y != 255
        assert int(valid.sum()) > 0
        code = y[valid] - 1000
        row, col = code // w, code % w
        assert int(code.min()) >= 0 and int(row.max()) < h
        # Bilinear image vs nearest label: at most one source pixel apart.
        assert float((x[0][valid] * 255 - col.float()).abs().max()) <= 1.0 + 1e-4
        assert float((x[1][valid] * 255 - row.float()).abs().max()) <= 1.0 + 1e-4
        assert not x[:, ~valid].any()  # padding: image 0 (the mean) where the label is 255
        # Flip detection: along a row of valid pixels, the column code goes up (no flip) or down (flip).
        r = int(valid.any(1).nonzero()[0])
        cols = (y[r][valid[r]] - 1000) % w
        if len(cols) > 1:
            flips.add(bool(cols[-1] < cols[0]))
    assert flips == {True, False}


def test_transform_flip_always():
    image, label = _coded_pair(4, 5)
    x, y = RandomHorizontalFlip(1.0)(image, label)
    torch.testing.assert_close(y, torch.from_numpy(label).flip(-1))
    torch.testing.assert_close(x[0] * 255, torch.from_numpy(image[..., 0]).float().flip(-1))
    x, y = RandomHorizontalFlip(0.0)(image, label)
    torch.testing.assert_close(y, torch.from_numpy(label))


def test_transform_scale_interpolation():
    """RandomScale: label nearest (no new values), image bilinear (new intermediate values)."""
    image = np.zeros((10, 10, 3), dtype=np.uint8)
    image[:, 5:] = 255
    label = np.zeros((10, 10), dtype=np.int64)
    label[:, 5:] = 7
    x, y = RandomScale((1.7, 1.7))(image, label)
    assert y.shape == (17, 17) and set(torch.unique(y).tolist()) == {0, 7}
    assert ((x > 0.01) & (x < 0.99)).any()


def test_transform_reproducible_under_manual_seed(synth_root):
    ds = CityscapesSegmentation(str(synth_root), "train")
    pair = ds.load(0)
    t = train_transform(32)

    def run():
        return [t(*pair) for _ in range(4)]

    torch.manual_seed(123)
    random.seed(1)
    np.random.seed(1)
    first = run()
    torch.manual_seed(123)
    random.seed(2)  # the transforms must not use python's or numpy's RNG
    np.random.seed(2)
    second = run()
    for (x1, y1), (x2, y2) in zip(first, second):
        torch.testing.assert_close(x1, x2, rtol=0, atol=0)
        torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.manual_seed(124)
    third = run()
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, third))
    # Consecutive draws differ (the RNG advances).
    assert not all(torch.equal(first[0][0], f[0]) for f in first[1:])


def test_normalize_values():
    image = np.zeros((2, 3, 3), dtype=np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 0, 128, 255
    label = np.array([[0, 1, 255], [3, 4, 5]], dtype=np.uint8)
    x, y = eval_transform()(Image.fromarray(image), Image.fromarray(label))
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    expect = (torch.tensor([0.0, 128 / 255, 1.0]) - mean) / std
    torch.testing.assert_close(x, expect.view(3, 1, 1).expand(3, 2, 3))
    assert y.dtype == torch.int64 and y.tolist() == label.tolist()
    x, _ = Normalize(mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))(torch.ones(3, 1, 1), torch.zeros(1, 1).long())
    torch.testing.assert_close(x.flatten(), torch.tensor([2.0, 1.0, 0.5]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(crop_size=0), "crop_size"),
        (dict(crop_size=-8), "crop_size"),
        (dict(crop_size=(32, 0)), "crop_size"),
        (dict(crop_size=32, scale=(0.0, 1.0)), "scale"),
        (dict(crop_size=32, scale=(2.0, 1.0)), "scale"),
        (dict(crop_size=32, scale=(-1.0, 1.0)), "scale"),
        (dict(crop_size=32, std=(1.0, 0.0, 1.0)), "std"),
        (dict(crop_size=32, flip_p=1.5), "p must"),
    ],
)
def test_transform_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_transform(**kwargs)


def test_transform_bad_inputs():
    with pytest.raises(ValueError, match="sizes differ"):
        eval_transform()(torch.rand(3, 4, 5), torch.zeros(4, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        eval_transform()(torch.rand(3, 4, 5), torch.zeros(3, 4, 5, dtype=torch.int64))


# ------------------------------------------------------------------------------------------------ metrics

# Hand-written confusion matrix (rows = target, columns = prediction) for 3 classes:
HAND = [[5, 1, 0], [2, 3, 1], [0, 0, 4]]
# IoU_c = TP / (row_c + col_c - TP):
#   class 0: 5 / (6 + 7 - 5) = 5/8;  class 1: 3 / (6 + 4 - 3) = 3/7;  class 2: 4 / (4 + 5 - 4) = 4/5
HAND_IOU = [Fraction(5, 8), Fraction(3, 7), Fraction(4, 5)]
HAND_ACC = Fraction(12, 16)


def _pixels_from_matrix(matrix, n_ignored: int = 0, seed: int = 0):
    """(pred, target) pixel lists realising ``matrix`` (+ ignored pixels with arbitrary predictions), shuffled."""
    t, p = [], []
    for i, row in enumerate(matrix):
        for j, n in enumerate(row):
            t += [i] * n
            p += [j] * n
    t += [255] * n_ignored
    p += [(k * 5) % 3 for k in range(n_ignored)]
    perm = torch.randperm(len(t), generator=torch.Generator().manual_seed(seed))
    return torch.tensor(p)[perm], torch.tensor(t)[perm]


def test_confusion_matrix_hand_computed():
    pred, target = _pixels_from_matrix(HAND, n_ignored=4)  # 20 pixels: 16 counted + 4 ignored
    cm = ConfusionMatrix(3)
    cm.update(pred[:8].view(2, 4), target[:8].view(2, 4))  # two batches, arbitrary shapes
    cm.update(pred[8:].view(2, 2, 3), target[8:].view(2, 2, 3))
    assert cm.matrix.dtype == torch.int64
    assert cm.matrix.tolist() == HAND
    torch.testing.assert_close(cm.iou(), torch.tensor([float(f) for f in HAND_IOU], dtype=torch.float64))
    assert cm.miou() == pytest.approx(float(sum(HAND_IOU) / 3), abs=1e-12)
    assert cm.pixel_accuracy() == pytest.approx(float(HAND_ACC), abs=1e-12)
    table = cm.table(["road", "car", "sky"])
    lines = table.splitlines()
    assert lines[0].startswith("| class") and "IoU" in lines[0] and set(lines[1]) <= set("|-: ")
    assert re.search(r"\| road +\| +62\.50 \|", table)
    assert re.search(r"\| car +\| +42\.86 \|", table)
    assert re.search(r"\| sky +\| +80\.00 \|", table)
    assert re.search(r"mIoU\** +\| +61\.79 \|", table)  # (5/8 + 3/7 + 4/5) / 3 = 0.61786
    cm.reset()
    assert int(cm.matrix.sum()) == 0 and np.isnan(cm.miou()) and np.isnan(cm.pixel_accuracy())


def test_confusion_matrix_ignore_index_and_absent_class():
    pred, target = _pixels_from_matrix(HAND, n_ignored=6)
    cm = ConfusionMatrix(4, ignore_index=255)  # class 3 never appears: its IoU is undefined
    cm.update(pred, target)
    assert cm.matrix[:3, :3].tolist() == HAND and int(cm.matrix[3].sum() + cm.matrix[:, 3].sum()) == 0
    iou = cm.iou()
    assert torch.isnan(iou[3]) and not torch.isnan(iou[:3]).any()
    assert cm.miou() == pytest.approx(float(sum(HAND_IOU) / 3), abs=1e-12)  # nanmean over the 3 defined
    assert "n/a" in cm.table().splitlines()[2 + 3]
    # Predicted but never a target: IoU 0 (defined), which lowers the mean.
    cm.update(torch.tensor([3]), torch.tensor([0]))
    assert float(cm.iou()[3]) == 0.0 and cm.miou() < float(sum(HAND_IOU) / 3)
    # A different ignore_index: 255 is no longer ignored and is out of range.
    cm2 = ConfusionMatrix(3, ignore_index=-1)
    cm2.update(torch.tensor([0, 1, 2]), torch.tensor([0, -1, 2]))
    assert cm2.matrix.tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 1]]
    with pytest.raises(ValueError, match="255"):
        cm2.update(torch.tensor([0]), torch.tensor([255]))


def test_confusion_matrix_bad_inputs():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="same shape"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="target holds value 5"):
        cm.update(torch.zeros(2, dtype=torch.long), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="pred holds value -1"):
        cm.update(torch.tensor([0, -1]), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="argmax"):
        cm.update(torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="ignore_index"):
        ConfusionMatrix(3, ignore_index=1)
    with pytest.raises(ValueError, match="class_names"):
        cm.table(["a", "b"])
    assert int(cm.matrix.sum()) == 0  # failed updates add nothing


def _all_reduce_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30)
    )
    try:
        cm = ConfusionMatrix(3)
        cm.update(torch.tensor([rank, 2]), torch.tensor([rank, 1]))  # rank r adds (r, r) and (1, 2)
        assert cm.all_reduce() is cm
        torch.save(cm.matrix, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)
def test_confusion_matrix_all_reduce(tmp_path):
    import torch.multiprocessing as mp

    # Not initialised: a no-op.
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([1]), torch.tensor([0]))
    assert cm.all_reduce().matrix.tolist() == [[0, 1], [0, 0]]
    ctx = mp.spawn(_all_reduce_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 90
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):  # raises if a rank failed
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the 2-rank all_reduce job did not finish within 90 s")
    expect = [[1, 0, 0], [0, 1, 2], [0, 0, 0]]
    for r in range(2):
        assert torch.load(tmp_path / f"rank{r}.pt").tolist() == expect


# ------------------------------------------------------------------------------------------------ palette


def test_palette_and_colorize(tmp_path):
    assert PALETTE.shape == (256, 3) and PALETTE.dtype == np.uint8
    assert PALETTE[0].tolist() == [128, 64, 128]  # road
    assert PALETTE[10].tolist() == [70, 130, 180]  # sky
    assert PALETTE[13].tolist() == [0, 0, 142]  # car
    assert PALETTE[255].tolist() == [0, 0, 0]  # ignore
    assert len({tuple(c) for c in PALETTE[:19].tolist()}) == 19  # distinct class colours
    label = torch.tensor([[0, 13, 255], [10, 11, 18]])
    img = colorize(label)
    assert img.mode == "P" and img.size == (3, 2)
    np.testing.assert_array_equal(np.array(img), label.numpy())
    rgb = np.array(img.convert("RGB"))
    np.testing.assert_array_equal(rgb, PALETTE[label.numpy()])
    img.save(tmp_path / "pred.png")  # round-trips as a palette PNG
    again = Image.open(tmp_path / "pred.png")
    assert again.mode == "P"
    np.testing.assert_array_equal(np.array(again.convert("RGB")), rgb)
    np.testing.assert_array_equal(np.array(colorize(label.numpy().astype(np.uint8))), label.numpy())
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        colorize(torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="0..255"):
        colorize(torch.tensor([[0, 256]]))
    with pytest.raises(ValueError, match="0..255"):
        colorize(np.array([[-1, 0]]))
