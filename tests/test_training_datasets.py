"""Datasets from a TOML file (``--dataset_config``): several datasets of real video files of several
aspect ratios, frame rates and lengths, trained in aspect-ratio and frame-count buckets."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from conftest import train_args
from PIL import Image
from toy_clips import shaped_frames

from lookback_core.video_io import video_info, write_video
from lookback_core.weights import read_temporal_header
from training import checkpoints
from training.args import build_parser, parse_args
from training.buckets import STEP, Bucket, BucketBatchSampler, bucket_for, bucket_sizes
from training.data import VideoClipDataset, clip_items, collate
from training.dataset_config import DATASETS_NAME, read_dataset_config
from training.train import main as train_main

# each edge's stripe (5% of the side) in its own colour: what a crop cuts away is seen to be gone
EDGES = {"left": (255, 0, 0), "right": (0, 0, 255), "top": (0, 255, 0), "bottom": (255, 255, 0)}


def _framed(seed: int, width: int, height: int, frames: int) -> np.ndarray:
    video = shaped_frames(seed, width, height, frames).copy()
    side_w, side_h = max(1, width // 20), max(1, height // 20)
    video[:, side_h:-side_h, :side_w] = EDGES["left"]
    video[:, side_h:-side_h, -side_w:] = EDGES["right"]
    video[:, :side_h, side_w:-side_w] = EDGES["top"]
    video[:, -side_h:, side_w:-side_w] = EDGES["bottom"]
    return video


def _edges_kept(pixels) -> list[str]:
    """The edge stripes still at the edges of a clip ``[f, 3, h, w]`` in [-1, 1] (its first frame)."""
    frame = ((pixels[0].permute(1, 2, 0).numpy() + 1) * 127.5).round()
    h, w = frame.shape[:2]
    at = {
        "left": frame[h // 2, 0],
        "right": frame[h // 2, -1],
        "top": frame[0, w // 2],
        "bottom": frame[-1, w // 2],
    }
    return [edge for edge, colour in EDGES.items() if np.abs(at[edge] - colour).max() < 60]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict:
    """Three datasets: 16:9 mp4s at 8 fps (24 and 10 frames), 9:16 mp4s at 12 fps (14 frames), square
    frame folders (16 frames, no captions); and a video no bucket can take."""
    root = tmp_path_factory.mktemp("shapes")
    wide, tall, square = root / "wide", root / "tall", root / "square"
    for folder in (wide, tall, square):
        folder.mkdir()
    for k, frames in enumerate((24, 24, 10)):
        write_video(_framed(k, 448, 256, frames), wide / f"wide_{k}.mp4", fps=8)
        (wide / f"wide_{k}.txt").write_text(f"a wide clip {k}")
    for k in range(2):
        write_video(_framed(10 + k, 256, 448, 14), tall / f"tall_{k}.mp4", fps=12)
        (tall / f"tall_{k}.caption").write_text(f"a tall clip {k}")
    for k in range(2):
        folder = square / f"square_{k}"
        folder.mkdir()
        for i, frame in enumerate(_framed(20 + k, 256, 256, 16)):
            iio.imwrite(folder / f"{i:04d}.png", frame)
    write_video(_framed(30, 40, 40, 24), wide / "tiny.mp4", fps=8)  # smaller than one step
    return {"root": root, "wide": wide, "tall": tall, "square": square}


def _config(tmp_path: Path, shapes: dict, extra: str = "", frames: str = "[4, 8]") -> Path:
    path = tmp_path / "datasets.toml"
    path.write_text(f"""
[general]
resolution = 256
num_frames = {frames}
frame_stride = 2

[[datasets]]
path = "{shapes["wide"]}"

[[datasets]]
path = "{shapes["tall"]}"
caption_extension = ".caption"
frame_stride = 1

[[datasets]]
path = "{shapes["square"]}"
repeats = 2
{extra}""")
    return path


def test_buckets_are_multiples_of_the_step_fill_the_area_and_never_upscale() -> None:
    for resolution in (128, 256, 384, 512, 768):
        sizes = bucket_sizes(resolution)
        area = resolution * resolution
        assert (resolution // STEP * STEP,) * 2 in sizes
        for w, h in sizes:
            assert w % STEP == 0 and h % STEP == 0 and w * h <= area
            assert w * h >= 0.75 * area
            assert max(w / h, h / w) <= 4
        assert sizes == sorted(sizes, key=lambda s: (s[0] / s[1], s[0])) and len(set(sizes)) == len(sizes)
    assert bucket_for(1920, 1080, 256) == (320, 192) and bucket_for(1080, 1920, 256) == (192, 320)
    assert bucket_for(1920, 1080, 512) == (640, 384) and bucket_for(512, 512, 512) == (512, 512)
    assert bucket_for(640, 480, 256) == (256, 192)  # 4:3 exactly
    for width, height in (
        (1920, 1080),
        (1280, 720),
        (720, 1280),
        (640, 480),
        (300, 200),
        (448, 256),
        (70, 200),
    ):
        w, h = bucket_for(width, height, 256)
        assert w <= width and h <= height  # never upscaled
        # what is cut: only what the bucket's aspect ratio needs, under a fifth for these videos
        assert 1 - min((w / h) / (width / height), (width / height) / (w / h)) < 0.2, (width, height)
    assert bucket_for(200, 300, 256) == (192, 256)
    assert bucket_for(70, 200, 256) == (64, 192)  # covers no bucket of 256: one of its own
    assert bucket_for(40, 40, 256) is None and bucket_for(2000, 100, 256) is None


def test_bucket_batches_hold_one_bucket_cover_every_clip_and_replay_by_epoch() -> None:
    buckets = ["a"] * 7 + ["b"] * 3 + ["c"] * 1
    sampler = BucketBatchSampler(buckets, batch_size=3, seed=5)
    first = list(sampler)
    assert len(first) == len(sampler) == 3 + 1 + 1
    assert all(len(batch) == 3 and len({buckets[i] for i in batch}) == 1 for batch in first)
    assert set().union(*first) == set(range(len(buckets)))  # every clip, the short buckets filled up
    assert list(sampler) == first  # the same epoch again: the same batches (a resume replays it)
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and set().union(*second) == set(range(len(buckets)))
    assert list(BucketBatchSampler(buckets, batch_size=3, seed=6)) != first


def test_three_aspect_ratios_train_in_their_own_buckets_with_only_the_buckets_crop(tmp_path, shapes) -> None:
    items, left_out = clip_items(read_dataset_config(str(_config(tmp_path, shapes))))
    dataset = VideoClipDataset(items, seed=0)
    by_video = {}
    for item in items:
        by_video.setdefault(item.sample.path.name, []).append(item.bucket)
    assert by_video["wide_0.mp4"] == [Bucket(320, 192, 4), Bucket(320, 192, 8)]
    assert by_video["wide_2.mp4"] == [Bucket(320, 192, 4)]  # 10 frames at stride 2: no clip of 8 (15 frames)
    assert by_video["tall_0.mp4"] == [Bucket(192, 320, 4), Bucket(192, 320, 8)]  # stride 1: 8 of its 14
    assert by_video["square_0"] == [Bucket(256, 256, 4), Bucket(256, 256, 8)] * 2  # repeats = 2
    assert {Path(p).name: why for p, why in left_out} == {"tiny.mp4": "too small: 40x40"}
    for index, item in enumerate(items):
        clip = dataset[index]
        bucket = item.bucket
        assert clip["pixels"].shape == (bucket.frames, 3, bucket.height, bucket.width)
        # every edge of the video is still in the clip (a square crop would cut the wide and tall
        # ones' sides away: 44% of their width or height)
        assert _edges_kept(clip["pixels"]) == list(EDGES), item.sample.path.name
        name = item.sample.path.name
        assert clip["caption"] == ("" if "square" in name else f"a {name.split('_')[0]} clip {name[-5]}")
    batches = BucketBatchSampler(dataset.buckets, batch_size=2, seed=0)
    for batch in batches:  # a batch stacks: one shape
        assert collate([dataset[i] for i in batch])["pixels"].shape[0] == 2


def test_a_dataset_config_run_trains_records_its_datasets_and_validates_in_each_images_aspect(
    setup, tmp_path, shapes, caplog
) -> None:
    wide_image, square_image = tmp_path / "wide.png", tmp_path / "square.png"
    Image.fromarray(_framed(40, 448, 256, 1)[0]).save(wide_image)
    Image.fromarray(_framed(41, 256, 256, 1)[0]).save(square_image)
    out = tmp_path / "run"
    # one frame count (the frame-count buckets are the test above's): 4 frames, the quicker step
    datasets = _config(tmp_path, shapes, frames="4")
    arguments = [
        "--pretrained_model", str(setup["checkpoint"]), "--config_dir", str(setup["config_dir"]),
        "--dataset_config", str(datasets), "--output_dir", str(out), "--preset", "light",
        "--train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_train_steps", "2", "--report_to", "none",
        "--validation_image", str(wide_image), "--validation_image", str(square_image),
        "--validation_frames", "3", "--validation_inference_steps", "1", "--validation_steps", "2",
    ]  # fmt: skip
    with caplog.at_level("INFO"):
        assert train_main(arguments) == 0
    log = caplog.text
    # the bucket table: 3 wide videos, 2 tall, 2 square x 2 repeats
    for bucket, clips in (("320x192, 4 frames", 3), ("192x320, 4 frames", 2), ("256x256, 4 frames", 4)):
        assert re.search(rf"{re.escape(bucket)}\s+{clips}\s+{math.ceil(clips / 2)}\n", log), bucket
    assert "left out" in log and "tiny.mp4: too small: 40x40" in log
    training = read_temporal_header(out / checkpoints.WEIGHTS_NAME).training
    assert training["frames"] == 4 and training["resolution"] == 256 and "stride" not in training  # 2 and 1
    assert [(d["path"], d["frame_stride"], d["repeats"], d["buckets"]) for d in training["datasets"]] == [
        ("wide", 2, 1, True), ("tall", 1, 1, True), ("square", 2, 2, True),
    ]  # fmt: skip
    assert read_dataset_config(str(out / DATASETS_NAME)) == read_dataset_config(str(datasets))
    # each validation video in its image's bucket; the grid puts both in cells of the largest
    wide_video, square_video = (out / "validation" / "step-0000002" / f"{k}.mp4" for k in (0, 1))
    assert (video_info(wide_video).width, video_info(wide_video).height) == (320, 192)
    assert (video_info(square_video).width, video_info(square_video).height) == (256, 256)
    grid = video_info(out / "validation" / "step-0000002.mp4")
    assert (grid.width, grid.height) == (2 * 320, 256)
    # a resume must use the same datasets
    changed = tmp_path / "changed.toml"
    changed.write_text(datasets.read_text().replace("repeats = 2", "repeats = 3"))
    again = [a if a != str(datasets) else str(changed) for a in arguments]
    caplog.clear()
    assert train_main([*again, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"]) == 2
    assert "was trained with datasets" in caplog.text


def test_a_csv_dataset_takes_its_captions_from_the_column_named(tmp_path, shapes) -> None:
    table = tmp_path / "clips.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["videoid", "page_dir", "title"])
        writer.writerow(["wide_0", "wide", "a title from the table"])
    config = tmp_path / "csv.toml"
    config.write_text(
        f'[[datasets]]\npath = "{shapes["root"]}"\ncsv = "{table}"\ncaption_column = "title"\n'
        "resolution = 256\nnum_frames = 4\n"
    )
    items, _ = clip_items(read_dataset_config(str(config)))
    assert [item.bucket for item in items] == [Bucket(320, 192, 4)]
    assert VideoClipDataset(items)[0]["caption"] == "a title from the table"


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("[[datasets]]\npath = '{data}'\nresoluton = 256\n", "resoluton is not a dataset setting (did you mean resolution?)"),
        ("[[datasets]]\npath = '{data}'\nresolution = 32\n", "resolution must be a whole number 64 or more"),
        ("[[datasets]]\npath = '{data}'\nnum_frames = [8, 8]\n", "num_frames lists a value twice"),
        ("[[datasets]]\npath = '{data}'\nnum_frames = 1\n", "num_frames must be a whole number 2 or more"),
        ("[[datasets]]\npath = '{data}'\nrepeats = 0\n", "repeats must be a whole number 1 or more"),
        ("[[datasets]]\npath = '{data}'\nbuckets = 'yes'\n", "buckets must be true or false"),
        ("[[datasets]]\npath = '{data}'\ncaption_extension = 'txt'\n", "caption_extension must start with a dot"),
        ("[[datasets]]\npath = '{data}/gone'\n", "[[datasets]] #1: path: no such folder"),
        ("[[datasets]]\nrepeats = 2\n", "[[datasets]] #1: needs a path"),
        ("[[datasets]]\npath = '{data}'\ncsv = '{data}/gone.csv'\n", "gone.csv does not exist"),
        ("[general]\npath = '{data}'\n[[datasets]]\npath = '{data}'\n", "path and csv belong to each [[datasets]]"),
        ("[general]\nresolution = 256\n", "needs at least one [[datasets]] table"),
        ("[dataset]\npath = '{data}'\n", "expected only [general] and [[datasets]] tables"),
        ("[[datasets]\n", "is not valid TOML"),
    ],
)  # fmt: skip
def test_a_bad_dataset_config_is_named_with_its_key_before_anything_loads(
    setup, tmp_path, capsys, text, said
) -> None:
    config = tmp_path / "datasets.toml"
    config.write_text(text.format(data=setup["data"]))
    arguments = ["--pretrained_model", str(setup["checkpoint"]), "--config_dir", str(setup["config_dir"]),
                 "--output_dir", str(tmp_path / "run"), "--dataset_config", str(config)]  # fmt: skip
    with pytest.raises(SystemExit):
        parse_args(arguments)
    err = capsys.readouterr().err
    assert f"--dataset_config: {config}" in err and said in err, err


def test_a_dataset_config_and_the_data_flags_are_one_or_the_other(setup, tmp_path, capsys) -> None:
    config = tmp_path / "datasets.toml"
    config.write_text(f"[[datasets]]\npath = '{setup['data']}'\n")
    with pytest.raises(SystemExit):
        parse_args([*train_args(setup, tmp_path / "run"), "--dataset_config", str(config)])
    assert (
        "--dataset_config describes the data; leave out --train_data_dir, --resolution"
        in capsys.readouterr().err
    )
    arguments = train_args(setup, tmp_path / "run")
    del arguments[arguments.index("--train_data_dir") : arguments.index("--train_data_dir") + 2]
    with pytest.raises(SystemExit):
        parse_args(arguments)
    assert "give --train_data_dir (a folder of videos) or --dataset_config" in capsys.readouterr().err


def test_the_example_dataset_config_is_valid_where_its_folders_exist(tmp_path, monkeypatch) -> None:
    """Its paths are relative, read from the folder the trainer is started in: made there, the
    example reads as three datasets with its buckets."""
    example = Path(__file__).parents[1] / "training" / "configs" / "datasets" / "mixed.toml"
    monkeypatch.chdir(tmp_path)
    for folder in ("webvid/videos", "videos/phone", "videos/landscape"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "webvid" / "results_2M_train.csv").write_text("videoid,name,page_dir\n")
    webvid, phone, landscape = read_dataset_config(str(example))
    assert (webvid.csv, webvid.num_frames, webvid.resolution) == (
        "webvid/results_2M_train.csv",
        (32,),
        (256,),
    )
    assert (phone.num_frames, phone.repeats, phone.reference_fps) == ((16, 32), 4, 24.0)
    assert (landscape.resolution, landscape.caption_extension) == ((256, 384), ".caption")
    assert all(spec.buckets for spec in (webvid, phone, landscape))


@pytest.mark.parametrize("processes", [2, 3])
def test_each_process_gets_whole_one_bucket_batches_from_accelerates_sharding(processes) -> None:
    """Several processes: accelerate's shard of the batches (what ``prepare`` wraps the loader's
    batch sampler in) deals out whole batches and pads the last round with whole ones too."""
    from accelerate.data_loader import BatchSamplerShard

    buckets = ["a"] * 7 + ["b"] * 3 + ["c"] * 2
    sampler = BucketBatchSampler(buckets, batch_size=2, seed=0)
    shards = [list(BatchSamplerShard(sampler, processes, rank)) for rank in range(processes)]
    assert len({len(shard) for shard in shards}) == 1  # every process takes the same number of steps
    dealt = [batch for shard in shards for batch in shard]
    assert all(len(batch) == 2 and len({buckets[i] for i in batch}) == 1 for batch in dealt)
    assert set().union(*dealt) == set(range(len(buckets)))


def test_a_run_is_two_toml_files_the_run_naming_its_datasets(setup, tmp_path, shapes) -> None:
    from training.run_config import resolved_toml

    datasets = _config(tmp_path, shapes)
    run = tmp_path / "run.toml"
    run.write_text(f"""
[model]
pretrained_model = "{setup["checkpoint"]}"
config_dir = "{setup["config_dir"]}"
preset = "light"

[data]
dataset_config = "{datasets}"

[output]
output_dir = "{tmp_path / "out"}"
""")
    args = parse_args(["--config", str(run)])
    assert args.dataset_config == str(datasets) and args.train_data_dir is None and args.resolution is None
    resolved = resolved_toml(args, build_parser())
    assert f'dataset_config = "{datasets}"' in resolved and "train_data_dir" not in resolved
