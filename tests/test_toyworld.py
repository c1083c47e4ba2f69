"""The toy world and its metrics, on clips whose truth is known."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from lookback_core.video_io import read_frames
from toyworld import world
from toyworld.metrics import (
    COLOUR_THRESHOLD,
    bootstrap_interval,
    by_direction,
    clip_metrics,
    frame_jump,
    intervals,
    mean_drift_per_frame,
    mean_interval,
    object_mask,
    summarise,
    wilson_interval,
)
from training.data import discover_samples


def test_a_seed_names_one_clip() -> None:
    a, b, other = world.make_clip(7), world.make_clip(7), world.make_clip(8)
    assert np.array_equal(a.frames, b.frames) and a.caption == b.caption
    assert not np.array_equal(a.frames, other.frames)
    assert a.frames.shape == (world.FRAMES, world.SIZE, world.SIZE, 3) and a.frames.dtype == np.uint8


@pytest.mark.parametrize("seed", range(0, 400, 7))
def test_clips_follow_the_world_rules(seed) -> None:
    clip = world.make_clip(seed)
    assert clip.caption == f"a {clip.colour} {clip.shape} moving {clip.direction}"
    step = np.diff(clip.positions, axis=0)
    assert (step == np.array(world.DIRECTIONS[clip.direction]) * world.SPEED).all()
    assert clip.positions.min() >= 0 and clip.positions.max() <= world.SIZE - world.OBJECT_SIZE
    footprint = world.object_footprint(clip.shape)
    low, high = world.BACKGROUND_RANGE
    for frame, (y, x) in zip(clip.frames, clip.positions):
        inside = np.zeros(frame.shape[:2], dtype=bool)
        inside[y : y + world.OBJECT_SIZE, x : x + world.OBJECT_SIZE] = footprint
        assert (frame[inside] == clip.rgb).all()
        assert frame[~inside].min() >= low and frame[~inside].max() <= high
    if clip.shape == "square":
        assert footprint.all()
    else:  # a disc of diameter 16: about pi * 8^2 pixels, symmetric, touching all four sides
        assert abs(footprint.sum() - np.pi * 64) < 10 and np.array_equal(footprint, footprint.T)
        assert footprint[0].any() and footprint[-1].any() and not footprint[0, 0]


def test_all_colours_shapes_and_directions_occur() -> None:
    clips = [world.make_clip(s) for s in range(200)]
    assert {c.colour for c in clips} == set(world.COLOURS)
    assert {c.shape for c in clips} == set(world.SHAPES)
    assert {c.direction for c in clips} == set(world.DIRECTIONS)


def test_no_background_colour_is_taken_for_the_object() -> None:
    low, high = world.BACKGROUND_RANGE
    corners = np.array(np.meshgrid(*[[low, high]] * 3)).reshape(3, -1).T
    for rgb in world.COLOURS.values():
        nearest = np.clip(np.asarray(rgb), low, high)  # the background colour closest to the object's
        assert np.linalg.norm(nearest - np.asarray(rgb)) > COLOUR_THRESHOLD
        assert not object_mask(corners.reshape(1, -1, 1, 3).astype(np.uint8), rgb).any()


def test_dataset_is_the_trainers_video_folder_layout(tmp_path) -> None:
    folder = world.write_dataset(tmp_path / "data", range(3), progress=False)
    samples = discover_samples(folder)
    assert [s.caption for s in samples] == [world.make_clip(s).caption for s in range(3)]
    frames = read_frames(samples[1].path, list(range(world.FRAMES)))
    error = np.abs(frames.astype(float) - world.make_clip(1).frames).mean()
    assert error < 2.0  # near-lossless H.264
    # an interrupted write resumes: complete pairs are kept, a missing video is written
    (folder / "clip_0000001.mp4").unlink()
    before = (folder / "clip_0000000.mp4").stat().st_mtime_ns
    world.write_dataset(folder, range(3), progress=False)
    assert (folder / "clip_0000001.mp4").is_file()
    assert (folder / "clip_0000000.mp4").stat().st_mtime_ns == before


def test_the_splits_are_disjoint_and_refuse_seeds_outside_them() -> None:
    ranges = sorted(world.SPLITS.values(), key=lambda r: r.start)
    assert [r.start for r in ranges] == [0, *[r.stop for r in ranges[:-1]]]  # back to back, no overlap
    assert world.SPLITS["train"].start == 0 and world.HELD_OUT_SEED in world.SPLITS["validation"]
    test = world.SPLITS["test"]
    assert world.split_seeds("test", 3) == [test.start, test.start + 1, test.start + 2]
    assert world.split_seeds("validation", 2, 2_000_000) == [2_000_000, 2_000_001]
    for split, clips, first in (("test", 2, test.stop - 1), ("validation", 1, 5), ("test", 0, None)):
        with pytest.raises(ValueError, match=f"leave the {split} split"):
            world.split_seeds(split, clips, first)
    with pytest.raises(ValueError, match="unknown split 'tests'"):
        world.split_seeds("tests", 1)


@pytest.mark.parametrize("seed", range(0, 300, 11))
def test_a_counterfactual_clip_is_the_same_start_image_moving_another_allowed_way(seed) -> None:
    own = world.make_clip(seed)
    allowed = world.directions_allowed(own.positions[0])
    assert own.direction in allowed and 1 <= len(allowed) <= 2  # 16 frames: one across and one along at most
    for direction in world.DIRECTIONS:
        if direction not in allowed:
            with pytest.raises(ValueError, match=f"moving {direction} for 16 frames leaves the frame"):
                world.make_clip(seed, direction=direction)
            continue
        other = world.make_clip(seed, direction=direction)
        assert np.array_equal(other.frames[0], own.frames[0]) and other.caption.endswith(
            f"moving {direction}"
        )
        truth = clip_metrics(other.frames, other.frames[0], other.rgb, direction)
        assert truth.direction_ok and truth.travel == pytest.approx(30)
    names = world.dataset_clips(seed, every_direction=True)
    assert names[0] == (f"clip_{seed:07d}", None) and world.dataset_clips(seed) == names[:1]
    assert sorted(d for _, d in names[1:]) == sorted(set(allowed) - {own.direction})


def test_the_start_image_tells_the_direction_only_in_part() -> None:
    """The cue the shipped model followed instead of its caption: a start allows one direction in
    about 22% of the world's clips and two in 78% (exactly, over all start positions; docs/toyworld.md)."""
    starts = [world.make_clip(s).positions[0] for s in range(500)]
    counts = np.bincount([len(world.directions_allowed(start)) for start in starts], minlength=3)
    assert counts[0] == 0 and 0.17 < counts[1] / 500 < 0.28 and counts[1] + counts[2] == 500


def test_wilson_interval_and_the_per_direction_breakdown() -> None:
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(
        0.9433, abs=1e-4
    )  # textbook values
    assert wilson_interval(0, 20)[0] == 0 and 0.1 < wilson_interval(0, 20)[1] < 0.2  # not a point at 0 of n
    clips = [world.make_clip(s) for s in range(world.HELD_OUT_SEED, world.HELD_OUT_SEED + 12)]
    results = [clip_metrics(c.frames, c.frames[0], c.rgb, c.direction) for c in clips]
    still = [
        clip_metrics(np.repeat(c.frames[:1], world.FRAMES, 0), c.frames[0], c.rgb, c.direction) for c in clips
    ]
    counts = by_direction(results[:8] + still[8:])
    assert sum(n for _, n in counts.values()) == 12 and sum(k for k, _ in counts.values()) == 8
    for d, (k, n) in counts.items():
        assert n == sum(c.direction == d for c in clips) and k == sum(c.direction == d for c in clips[:8])
    spans = intervals(results[:8] + still[8:])
    assert spans["direction_accuracy"] == pytest.approx(wilson_interval(8, 12))
    assert spans["speed"][0] < summarise(results[:8] + still[8:])["speed"] < spans["speed"][1]
    assert spans["frame0_psnr"] == (100.0, 100.0)  # every clip the same: no spread


def test_the_persistence_interval_stays_within_what_a_share_can_be() -> None:
    """A share of frames, most clips at 1.0 (as on 128 test clips: one clip lost its object, 127
    kept it): mean +- 1.96 standard errors passes 1 (the reports said 0.98-1.01); the bootstrap
    interval stays inside the values' range and holds the mean."""
    shares = [1.0] * 127 + [0.0]
    assert mean_interval(shares)[1] > 1.0
    low, high = bootstrap_interval(shares)
    assert 0.95 < low < np.mean(shares) < high <= 1.0
    assert bootstrap_interval(shares) == (low, high)  # a fixed seed: the same report twice
    clip = world.make_clip(world.HELD_OUT_SEED)
    truth = clip_metrics(clip.frames, clip.frames[0], clip.rgb, clip.direction)
    assert intervals([replace(truth, persistence=p) for p in shares])["persistence"] == (low, high)


def _truth(seed: int = world.HELD_OUT_SEED) -> world.ToyClip:
    return world.make_clip(seed)


def test_the_true_clips_meet_every_bar() -> None:
    results = []
    for seed in range(world.HELD_OUT_SEED, world.HELD_OUT_SEED + 24):
        clip = _truth(seed)
        results.append(clip_metrics(clip.frames, clip.frames[0], clip.rgb, clip.direction))
    summary = summarise(results)
    assert summary["frame0_psnr"] == 100.0 and summary["persistence"] == 1.0
    assert summary["direction_accuracy"] == 1.0 and summary["background_drift"] == 0.0
    assert summary["speed"] == pytest.approx(world.SPEED, abs=1e-9)
    assert all(r.travel == pytest.approx(30) and r.sideways == pytest.approx(0) for r in results)


def test_a_still_video_has_no_motion() -> None:
    clip = _truth()
    still = np.repeat(clip.frames[:1], world.FRAMES, axis=0)
    result = clip_metrics(still, clip.frames[0], clip.rgb, clip.direction)
    assert not result.direction_ok and result.travel == 0 and result.speed == pytest.approx(0, abs=1e-9)
    assert result.persistence == 1.0 and result.background_drift == 0.0


def test_motion_the_wrong_way_is_not_counted() -> None:
    clip = _truth()
    result = clip_metrics(clip.frames[::-1].copy(), clip.frames[-1], clip.rgb, clip.direction)
    assert not result.direction_ok and result.travel == pytest.approx(-30)
    assert result.speed == pytest.approx(-world.SPEED)


def test_vanishing_object_and_drifting_background_are_measured() -> None:
    clip = _truth()
    frames = clip.frames.copy()
    frames[8:] = 100  # the object is gone from frame 8 on
    result = clip_metrics(frames, clip.frames[0], clip.rgb, clip.direction)
    assert result.persistence == pytest.approx(7 / 15)
    assert not result.direction_ok and np.isnan(result.travel)
    brighter = clip.frames.copy()
    brighter[1:] += 10  # every pixel 10 levels brighter; the object stays within the colour threshold
    result = clip_metrics(brighter, clip.frames[0], clip.rgb, clip.direction)
    assert result.background_drift == pytest.approx(10) and result.persistence == 1.0 and result.direction_ok
    noisy = clip.frames.astype(int) + np.random.default_rng(0).choice([-6, 6], size=clip.frames.shape)
    noisy[0] = clip.frames[0]
    result = clip_metrics(np.clip(noisy, 0, 255).astype(np.uint8), clip.frames[0], clip.rgb, clip.direction)
    assert result.background_drift == pytest.approx(6, abs=0.3) and result.direction_ok
    assert result.frame0_psnr == 100.0


def test_frame0_psnr_compares_with_the_start_image() -> None:
    clip = _truth()
    start = np.clip(clip.frames[0].astype(int) + 5, 0, 255).astype(np.uint8)
    result = clip_metrics(clip.frames, start, clip.rgb, clip.direction)
    assert result.frame0_psnr == pytest.approx(10 * np.log10(255**2 / 25), abs=0.2)


def test_the_jump_after_frame_zero_is_measured_against_the_later_pace() -> None:
    clip = world.make_clip(11)
    assert 0.8 < frame_jump(clip.frames) < 1.25  # the truth moves at an even pace
    jumped = clip.frames.copy()
    jumped[1:] = np.clip(jumped[1:].astype(int) + 40, 0, 255).astype(
        np.uint8
    )  # everything shifts after frame 0
    assert frame_jump(jumped) > 3
    assert np.isnan(frame_jump(clip.frames[:2])) and np.isnan(frame_jump(np.repeat(clip.frames[:1], 4, 0)))
    assert "frame_jump" in summarise([clip_metrics(clip.frames, clip.frames[0], clip.rgb, clip.direction)])


def test_training_time_sums_the_runs_of_a_resumed_training_without_the_pause(tmp_path) -> None:
    import json

    from toyworld.build import training_seconds

    times = [100.0 + i for i in range(5)] + [1000.0 + i for i in range(4)]  # 1 s steps, resumed after a pause
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": i + 1, "time": t}) + "\n" for i, t in enumerate(times)))
    assert training_seconds(log) == 9.0  # nine steps of one second; the 896 s pause counts as one step


@pytest.mark.parametrize("frames", [2, 24, world.MAX_FRAMES])
def test_clips_of_any_length_up_to_the_frame_keep_the_object_inside(frames) -> None:
    for seed in range(world.HELD_OUT_SEED, world.HELD_OUT_SEED + 40):
        clip, short = world.make_clip(seed, frames), world.make_clip(seed)
        assert clip.frames.shape[0] == frames and clip.caption == short.caption
        assert clip.positions.min() >= 0 and clip.positions.max() <= world.SIZE - world.OBJECT_SIZE
        result = clip_metrics(clip.frames, clip.frames[0], clip.rgb, clip.direction)
        assert result.speed == pytest.approx(world.SPEED) and result.background_drift == 0.0
    assert world.MAX_FRAMES == 25  # 64 px, a 16 px object, 2 px a frame
    for frames in (1, world.MAX_FRAMES + 1):
        with pytest.raises(ValueError, match=f"2 to {world.MAX_FRAMES} frames"):
            world.make_clip(0, frames)


def test_drift_is_measured_frame_by_frame() -> None:
    clip = _truth()
    frames = clip.frames.copy()
    frames[5:] = np.clip(frames[5:].astype(int) + 12, 0, 255).astype(np.uint8)  # a shift from frame 5 on
    result = clip_metrics(frames, clip.frames[0], clip.rgb, clip.direction)
    assert len(result.drift_per_frame) == world.FRAMES and result.drift_per_frame[0] == 0.0
    assert result.drift_per_frame[1:5] == pytest.approx([0.0] * 4)
    assert result.drift_per_frame[5:] == pytest.approx([12.0] * 11)
    # the clip figure pools the pixels of all frames; outside the object they are nearly as many in each
    assert result.background_drift == pytest.approx(np.mean(result.drift_per_frame[1:]), rel=0.05)
    still = clip_metrics(clip.frames, clip.frames[0], clip.rgb, clip.direction)
    assert mean_drift_per_frame([result, still])[5:] == pytest.approx([6.0] * 11)


@pytest.mark.parametrize("command", ["build", "ablate"])
def test_a_failed_stage_ends_the_toy_command_with_its_name_not_a_traceback(
    tmp_path, monkeypatch, capsys, command
):
    """The trainer or the base stage has printed why it stopped (a full disk, a NaN); the command
    says which program stopped and how to resume, exit 1, with no traceback of its own."""
    import subprocess

    from lookback_cli.main import main
    from toyworld import build

    calls, run = [], subprocess.run

    def failing(cmd, **kwargs):  # the stages' programs fail; git (the build records its commit) runs
        if cmd[0] == "git":
            return run(cmd, **kwargs)
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 2)

    monkeypatch.setattr(build.subprocess, "run", failing)
    assert main(["toyworld", command, "--out", str(tmp_path / "toy"), "--train-clips", "2"]) == 1
    err = capsys.readouterr().err
    assert "error: toyworld.base_model stopped (exit status 2); its message is above" in err
    assert "resume" in err and "Traceback" not in err
    assert len(calls) == 1  # nothing ran after the failed stage


def test_a_plot_legend_wraps_long_names_inside_the_image() -> None:
    """The eval's plot names are long ("look-back (lookback_toy.safetensors), chunks of 16 frames, 5
    of context"): they wrap inside the legend instead of running off the image's right edge."""
    from toyworld.pictures import plot_curves

    name = "look-back (lookback_toy.safetensors), chunks of 16 frames, 5 of context"
    image = np.asarray(
        plot_curves({name: [1.0, 0.5, 0.4], "base without look-back, one piece": [1.0, 0.2, 0.1]})
    )
    assert (image[:, -8:] == 255).all()  # nothing drawn at the right edge
    legend = image[:, -190:]
    rows_with_text = np.flatnonzero((legend < 128).all(axis=2).any(axis=1))
    assert np.ptp(rows_with_text) > 3 * 12  # the two names took at least four lines
