"""Video files: write, read back, metadata, atomic writes and broken files."""

from __future__ import annotations

import json
import shutil

import av
import numpy as np
import pytest
import torch
from PIL import Image

from lookback_core import video_io
from lookback_core.video_io import (
    VideoInfo,
    VideoReadError,
    read_frames,
    read_metadata,
    read_video,
    video_info,
    write_video,
)

FORMATS = ("mp4", "gif", "webp")
# Largest mean absolute error per frame; H.264, lossy WebP and GIF's palette are all lossy.
TOLERANCE = {"mp4": 6.0, "gif": 6.0, "webp": 4.0}


def colour_frames(f: int = 12, h: int = 48, w: int = 64) -> np.ndarray:
    """Frames whose two halves change colour from frame to frame, so every frame is distinct."""
    frames = np.empty((f, h, w, 3), np.uint8)
    for i in range(f):
        frames[i, :, : w // 2] = (20 * i % 256, 100, 255 - 20 * i % 256)
        frames[i, :, w // 2 :] = (200, 15 * i % 256, 60)
    return frames


def frame_errors(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.float64) - b.astype(np.float64)).mean(axis=(1, 2, 3))


def leftovers(folder, keep: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != keep)


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip(tmp_path, fmt):
    frames = colour_frames()
    path = write_video(frames, tmp_path / f"clip.{fmt}", fps=12)
    assert path == tmp_path / f"clip.{fmt}"
    back = read_video(path)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert frame_errors(back, frames).max() < TOLERANCE[fmt]
    info = video_info(path)
    assert (info.frames, info.width, info.height) == (12, 64, 48)
    assert info.fps == pytest.approx(12, rel=0.02)
    assert leftovers(tmp_path, path.name) == []  # no temporary file left behind


@pytest.mark.parametrize("fmt", FORMATS)
def test_still_frames_are_all_kept(tmp_path, fmt):
    """Animation encoders like to merge identical frames; the frame count must survive."""
    frames = np.zeros((10, 32, 32, 3), np.uint8)
    frames[4:] = 180
    path = write_video(frames, tmp_path / f"still.{fmt}", fps=8)
    assert video_info(path).frames == 10
    back = read_video(path)
    assert back.shape[0] == 10
    assert frame_errors(back, frames).max() < TOLERANCE[fmt]


def test_float_tensor_frames_are_clamped_and_rounded(tmp_path):
    values = torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.5])
    frames = values.view(5, 1, 1, 1).expand(5, 4, 4, 3).contiguous()
    back = read_video(write_video(frames, tmp_path / "t.webp", lossless=True))
    assert back[:, 0, 0, 0].tolist() == [0, 0, 128, 255, 255]


def test_webp_lossless_is_exact(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (4, 24, 40, 3), dtype=np.uint8)
    back = read_video(write_video(frames, tmp_path / "exact.webp", lossless=True))
    np.testing.assert_array_equal(back, frames)


def test_mp4_odd_size_is_padded_to_even(tmp_path):
    frames = colour_frames(f=6, h=33, w=47)
    path = write_video(frames, tmp_path / "odd.mp4", fps=8)
    info = video_info(path)
    assert (info.width, info.height, info.frames) == (48, 34, 6)
    back = read_video(path)
    assert frame_errors(back[:, :33, :47], frames).max() < TOLERANCE["mp4"]
    # the added row and column repeat the edge
    assert np.abs(back[:, 33].astype(int) - back[:, 32].astype(int)).mean() < 4
    assert np.abs(back[:, :, 47].astype(int) - back[:, :, 46].astype(int)).mean() < 4


def test_format_argument_overrides_suffix(tmp_path):
    path = write_video(colour_frames(f=3), tmp_path / "clip.bin", format="GIF")
    assert path.read_bytes().startswith(b"GIF89a")
    assert read_video(path).shape == (3, 48, 64, 3)


@pytest.mark.parametrize(("fmt", "loop"), [("gif", 0), ("gif", 3), ("webp", 0), ("webp", 2)])
def test_loop_count(tmp_path, fmt, loop):
    path = write_video(colour_frames(f=3), tmp_path / f"loop.{fmt}", loop=loop)
    with Image.open(path) as image:
        assert image.info["loop"] == loop


def test_single_frame(tmp_path):
    frames = colour_frames(f=1)
    for fmt in FORMATS:
        path = write_video(frames, tmp_path / f"one.{fmt}", metadata={"prompt": "{}"})
        assert read_video(path).shape == (1, 48, 64, 3)
        assert read_metadata(path) == {"prompt": "{}"}


WORKFLOW = json.dumps(
    {"nodes": [{"id": i, "title": "caption ✓ 漢字"} for i in range(4000)]}, ensure_ascii=False
)
METADATA = {
    "prompt": json.dumps({"3": {"inputs": {"seed": 1}, "class_type": "KSampler"}}),
    "workflow": WORKFLOW,  # > 128 KiB: longer than one command-line argument may be
    "note": "a=b; #not a comment\\ and a\nnew line",
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_metadata_round_trip(tmp_path, fmt):
    assert len(WORKFLOW.encode()) > 128 * 1024
    path = write_video(colour_frames(f=4), tmp_path / f"meta.{fmt}", metadata=METADATA)
    assert read_metadata(path) == METADATA
    assert read_video(path).shape[0] == 4


def test_metadata_is_where_other_tools_look(tmp_path):
    frames = colour_frames(f=3)
    mp4 = write_video(frames, tmp_path / "m.mp4", metadata=METADATA)
    with av.open(str(mp4)) as container:  # ComfyUI's place (its Save Video): one tag per key
        assert {k: container.metadata[k] for k in METADATA} == METADATA
    gif = write_video(frames, tmp_path / "m.gif", metadata=METADATA)
    with Image.open(gif) as image:
        assert json.loads(image.info["comment"].decode("utf-8")) == METADATA
    webp = write_video(frames, tmp_path / "m.webp", metadata={"prompt": "{}", "workflow": '{"a": 1}'})
    with Image.open(webp) as image:  # ComfyUI's place: EXIF Model and Make
        exif = image.getexif()
        assert exif[0x0110] == "prompt:{}"
        assert exif[0x010F] == 'workflow:{"a": 1}'


def test_videohelpersuites_mp4_comment_is_read(tmp_path):
    path = tmp_path / "vhs.mp4"
    with av.open(str(path), "w") as container:
        container.metadata["comment"] = json.dumps({"prompt": {"1": {}}, "workflow": {"nodes": []}})
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height = 64, 48
        for packet in stream.encode(av.VideoFrame.from_ndarray(colour_frames(f=1)[0], format="rgb24")):
            container.mux(packet)
        container.mux(stream.encode())
    assert read_metadata(path) == {"prompt": '{"1": {}}', "workflow": '{"nodes": []}'}


def test_no_metadata_reads_empty(tmp_path):
    for fmt in FORMATS:
        assert read_metadata(write_video(colour_frames(f=2), tmp_path / f"plain.{fmt}")) == {}


def test_failed_write_keeps_existing_file(tmp_path, monkeypatch):
    path = write_video(colour_frames(f=3), tmp_path / "keep.mp4")
    before = path.read_bytes()
    with pytest.raises(ValueError, match="frames"):
        write_video(np.zeros((3, 8, 8), np.uint8), path)
    # the encoder itself fails half-way
    monkeypatch.setattr(video_io.imageio_ffmpeg, "get_ffmpeg_exe", lambda: shutil.which("false"))
    with pytest.raises(RuntimeError, match="ffmpeg failed"):
        write_video(colour_frames(f=3), path)
    assert path.read_bytes() == before
    assert leftovers(tmp_path, path.name) == []


def test_missing_folders_are_created(tmp_path):
    path = write_video(colour_frames(f=2), tmp_path / "a" / "b" / "c.gif")
    assert path.is_file()


@pytest.mark.parametrize(
    ("frames", "kwargs", "match"),
    [
        (colour_frames(f=2), {"format": "avi"}, "format"),
        (colour_frames(f=2), {"fps": 0}, "fps"),
        (colour_frames(f=2), {"fps": float("nan")}, "fps"),
        (colour_frames(f=2), {"crf": 52}, "crf"),
        (colour_frames(f=2), {"quality": 101}, "quality"),
        (colour_frames(f=2), {"loop": -1}, "loop"),
        (colour_frames(f=2), {"metadata": {"prompt": {"a": 1}}}, "metadata"),
        (colour_frames(f=2), {"metadata": {"a:b": "x"}}, "metadata"),
        (
            colour_frames(f=2),
            {"format": "webp", "metadata": dict.fromkeys(["prompt", *"abcd"], "x")},
            "metadata",
        ),
        (np.zeros((0, 8, 8, 3), np.uint8), {}, "frames"),
        (np.zeros((8, 8, 3), np.uint8), {}, "frames"),
        (np.zeros((2, 3, 8, 8), np.float32), {}, "frames"),
        (np.zeros((2, 8, 8, 3), np.int32), {}, "frames"),
        (np.full((2, 8, 8, 3), np.nan, np.float32), {}, "frames"),
        ([[[[0, 0, 0]]]], {}, "frames"),
    ],
)
def test_bad_arguments_name_the_argument(tmp_path, frames, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_video(frames, tmp_path / "bad.mp4", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_unknown_suffix_is_reported(tmp_path):
    with pytest.raises(ValueError, match="suffix of path"):
        write_video(colour_frames(f=2), tmp_path / "clip.avi")


def test_path_that_is_a_folder(tmp_path):
    (tmp_path / "x.mp4").mkdir()
    with pytest.raises(ValueError, match="folder"):
        write_video(colour_frames(f=2), tmp_path / "x.mp4")


def numbered_frames(f: int) -> np.ndarray:
    """Frame i is a flat grey of 10 * i, so its number can be read back from the pixels."""
    return np.repeat(np.arange(f, dtype=np.uint8)[:, None, None, None] * 10, 32 * 32 * 3).reshape(
        f, 32, 32, 3
    )


def frame_numbers(frames: np.ndarray) -> list[int]:
    return [round(v) for v in frames.reshape(len(frames), -1).mean(axis=1) / 10]


@pytest.mark.parametrize("fmt", FORMATS)
def test_stride_and_max_frames(tmp_path, fmt):
    path = write_video(numbered_frames(20), tmp_path / f"n.{fmt}")
    assert frame_numbers(read_video(path)) == list(range(20))
    assert frame_numbers(read_video(path, stride=4)) == [0, 4, 8, 12, 16]
    assert frame_numbers(read_video(path, stride=3, max_frames=4)) == [0, 3, 6, 9]
    assert frame_numbers(read_frames(path, [12, 0, 4, 4, 19])) == [12, 0, 4, 4, 19]


def test_read_frames_stops_after_the_last_index(tmp_path, monkeypatch):
    path = write_video(numbered_frames(20), tmp_path / "n.mp4")
    produced = []
    original = video_io._iter_frames

    def counting(p):
        for item in original(p):
            produced.append(item)
            yield item

    monkeypatch.setattr(video_io, "_iter_frames", counting)
    assert frame_numbers(read_frames(path, range(0, 8, 4))) == [0, 4]
    assert len(produced) == 5
    produced.clear()
    read_video(path, max_frames=2, stride=2)
    assert len(produced) == 3


def test_read_frames_past_the_end(tmp_path):
    path = write_video(numbered_frames(6), tmp_path / "short.mp4")
    with pytest.raises(VideoReadError, match=r"short\.mp4.*frame 9.*only 6 frames"):
        read_frames(path, [0, 9])
    with pytest.raises(ValueError, match="indices"):
        read_frames(path, [])
    with pytest.raises(ValueError, match="stride"):
        read_video(path, stride=0)
    with pytest.raises(ValueError, match="max_frames"):
        read_video(path, max_frames=0)


def broken_files(tmp_path) -> dict[str, object]:
    good = {fmt: write_video(colour_frames(f=8), tmp_path / f"good.{fmt}").read_bytes() for fmt in FORMATS}
    rng = np.random.default_rng(0)
    cases = {
        "garbage.mp4": rng.bytes(4000),
        "garbage.gif": rng.bytes(4000),
        "garbage.webp": rng.bytes(4000),
        "text.mp4": b"not a video at all\n" * 20,
        "header_only.mp4": good["mp4"][:48],
        "header_only.gif": good["gif"][:20],
        "header_only.webp": good["webp"][:30],
        "cut.gif": good["gif"][: len(good["gif"]) // 2],
        "cut.webp": good["webp"][: len(good["webp"]) // 2],
        "empty.mp4": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    return cases


def test_broken_files_raise_video_read_error(tmp_path):
    for name in broken_files(tmp_path):
        path = tmp_path / name
        for read in (read_video, video_info, lambda p: read_frames(p, [0, 5])):
            with pytest.raises(VideoReadError, match=name.replace(".", r"\.")) as caught:
                read(path)
            assert isinstance(caught.value, ValueError) and caught.value.path == path


def test_missing_and_non_files(tmp_path):
    with pytest.raises(VideoReadError, match="does not exist"):
        read_video(tmp_path / "nope.mp4")
    with pytest.raises(VideoReadError, match="it is a folder, expected a file"):
        video_info(tmp_path)
    with pytest.raises(VideoReadError, match="does not exist"):
        read_metadata(tmp_path / "nope.webp")


def test_cut_mp4_gives_a_prefix_or_a_read_error(tmp_path):
    data = write_video(numbered_frames(20), tmp_path / "full.mp4").read_bytes()
    cut = tmp_path / "cut.mp4"
    outcomes = []
    for fraction in (0.3, 0.5, 0.9, 0.95):
        cut.write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(VideoReadError, match="cut"):
            read_frames(cut, [19])
        try:
            frames = read_video(cut)
        except VideoReadError:
            outcomes.append("error")
        else:
            assert 0 < len(frames) < 20
            assert frame_numbers(frames) == list(range(len(frames)))
            outcomes.append("prefix")
    assert set(outcomes) == {"error", "prefix"}


def test_video_info_is_a_plain_record():
    info = VideoInfo(frames=3, fps=8.0, width=64, height=48)
    assert info == VideoInfo(3, 8.0, 64, 48)


def test_an_existing_file_can_be_replaced_and_its_folder_is_probed(tmp_path) -> None:
    from lookback_core.atomic import check_writable

    target = tmp_path / "v.gif"
    target.write_bytes(b"old")
    check_writable(target)  # replacing a file is writing into its folder
    check_writable(tmp_path, folder=True)
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_writable(target, folder=True)
