"""Video files: write frames as MP4 (H.264), GIF or WebP, read frames and facts back.

All three formats are encoded by the FFmpeg executable that imageio-ffmpeg ships, which keeps
every frame (Pillow's and libwebp's animation encoders merge identical or near-identical
consecutive frames, so a video would read back shorter than it was written). Writing goes to a
hidden temporary file next to the target that is renamed into place only when complete, so a
reader never sees a half-written video and a failed write leaves any existing file as it was.

Reading uses PyAV for MP4 and the other containers FFmpeg knows, and Pillow for GIF and animated
WebP. GIF and WebP frames are returned as stored: a file from another tool that stored a still
stretch as one long frame reads back as that one frame.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import imageio_ffmpeg
import numpy as np
import torch
from PIL import Image

from .atomic import atomic_path, check_writable, file_problem
from .metadata import parse_json

FORMATS = ("mp4", "gif", "webp")

# ComfyUI's convention for animated WebP: EXIF tag 0x0110 (Model) holds "prompt:<json>", the other
# entries (the workflow first) go to the ASCII tags counting down from 0x010F (Make).
_WEBP_PROMPT_TAG = 0x0110
_WEBP_OTHER_TAGS = (0x010F, 0x010E, 0x010D)
_DEFAULT_FRAME_MS = 100.0  # what players show for a GIF/WebP frame that has no duration


class VideoReadError(ValueError):
    """A video file that does not exist, cannot be decoded or lacks the requested frames."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read video '{path}': {reason}")


@dataclass(frozen=True)
class VideoInfo:
    """Frame count, frame rate and size of a video, as the readers of this module return it."""

    frames: int
    fps: float
    width: int
    height: int


# ----------------------------------------------------------------------------------------------
# Writing


def write_video(
    frames: np.ndarray | torch.Tensor,
    path: str | os.PathLike[str],
    *,
    fps: float = 8.0,
    format: str | None = None,
    crf: int = 18,
    quality: int = 90,
    lossless: bool = False,
    loop: int = 0,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``frames`` ``[f, h, w, 3]`` (uint8, or float in ``[0, 1]``) as a video at ``path``.

    ``format`` (``mp4``, ``gif`` or ``webp``) defaults to the suffix of ``path``. MP4 is H.264
    (``crf``: 0 lossless .. 51 worst), yuv420p, BT.709; an odd width or height is padded by one
    repeated edge pixel, as H.264 in yuv420p needs even sizes. WebP is lossy at ``quality``
    (0..100) unless ``lossless``. GIF and WebP loop ``loop`` times (0: forever); GIF stores frame
    durations in hundredths of a second (browsers slow down GIFs above 50 fps). ``metadata``
    (for example ComfyUI's ``prompt`` and ``workflow`` JSON) is embedded where ComfyUI looks when a
    file is dropped on its canvas: MP4 as one tag per key (as ComfyUI's own Save Video), WebP as
    ComfyUI's EXIF entries (``prompt`` plus at most three other keys), GIF as one JSON comment.
    Missing parent folders are created. Returns the path written.
    """
    path = Path(path)
    kind = check_video_target(path, fps=fps, format=format)
    if not (isinstance(crf, int) and 0 <= crf <= 51):
        raise ValueError(f"crf must be an integer in 0..51, got {crf!r}")
    if not (isinstance(quality, int) and 0 <= quality <= 100):
        raise ValueError(f"quality must be an integer in 0..100, got {quality!r}")
    if not (isinstance(loop, int) and loop >= 0):
        raise ValueError(f"loop must be an integer >= 0 (0 loops forever), got {loop!r}")
    metadata = _checked_metadata(metadata, kind)
    data = _uint8_frames(frames, "frames")
    with atomic_path(path) as partial:
        _write(data, partial, kind, fps, crf, quality, lossless, loop, metadata)
    return path


def check_video_target(path: str | os.PathLike[str], *, fps: float, format: str | None = None) -> str:
    """Check, before any work, that a video can be written at ``path`` at ``fps``; returns the format.

    Raises ``ValueError`` naming the problem: an unknown suffix or format, an fps that is not a
    positive finite number, a path that is a folder, or a folder that cannot be created or
    written to."""
    path = Path(path)
    kind = _format_of(path, format)
    if not (isinstance(fps, (int, float)) and not isinstance(fps, bool) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    check_writable(path)
    return kind


def _format_of(path: Path, format: str | None) -> str:
    name = (format if format is not None else path.suffix).lower().lstrip(".")
    if name not in FORMATS:
        given = f"format {format!r}" if format is not None else f"the suffix of path '{path}'"
        raise ValueError(f"unknown video format from {given}; expected one of {', '.join(FORMATS)}")
    return name


def _checked_metadata(metadata: dict[str, str] | None, kind: str) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata must be a dict of str to str, got {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not key or ":" in key:
            raise ValueError(f"metadata keys must be non-empty strings without ':', got {key!r}")
        if not isinstance(value, str):
            raise ValueError(f"metadata[{key!r}] must be a string (JSON text), got {type(value).__name__}")
    others = [key for key in metadata if key != "prompt"]
    if kind == "webp" and len(others) > len(_WEBP_OTHER_TAGS):
        raise ValueError(
            f"metadata: a WebP holds 'prompt' and at most {len(_WEBP_OTHER_TAGS)} other keys, got {others}"
        )
    return metadata


def _uint8_frames(frames: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """``[f, h, w, 3]`` uint8, or float in ``[0, 1]`` (clamped, rounded), to contiguous uint8."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu()
        frames = (frames.float() if frames.is_floating_point() else frames).numpy()
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"{name} must be a numpy array or a torch tensor, got {type(frames).__name__}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{name} must have shape [frames, height, width, 3], got {tuple(frames.shape)}")
    if min(frames.shape) < 1:
        raise ValueError(f"{name} must hold at least one frame of at least 1x1 pixels, got {frames.shape}")
    if frames.dtype == np.uint8:
        return np.ascontiguousarray(frames)
    if not np.issubdtype(frames.dtype, np.floating):
        raise ValueError(f"{name} must be uint8 or floating point in [0, 1], got dtype {frames.dtype}")
    if not np.isfinite(frames).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return (np.clip(frames.astype(np.float32, copy=False), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _output_options(kind: str, crf: int, quality: int, lossless: bool, loop: int) -> list[str]:
    if kind == "mp4":
        # BT.709, converted and tagged, so browsers and players show the colours that were written.
        return (
            ["-vf", "scale=out_color_matrix=bt709:out_range=tv", "-c:v", "libx264", "-crf", str(crf)]
            + ["-pix_fmt", "yuv420p", "-colorspace", "bt709", "-color_primaries", "bt709"]
            + ["-color_trc", "bt709", "-movflags", "+faststart+use_metadata_tags"]
        )
    if kind == "gif":
        # One palette for the whole clip, so colours do not flicker. (stats_mode=diff would leave
        # the last frame's colours out of the palette.)
        return ["-vf", "split[a][b];[a]palettegen[p];[b][p]paletteuse", "-loop", str(loop)]
    return ["-c:v", "libwebp", "-lossless", str(int(lossless)), "-quality", str(quality), "-loop", str(loop)]


def _ffmpeg_name(path: str | os.PathLike[str]) -> str:
    """``path`` as FFmpeg and PyAV must be given it: absolute and behind ``file:``, so that no part
    of a name (``cam:1/v.gif``, ``pipe:1/v.mp4``, ``file:sub/v.gif``) is read as a protocol."""
    return "file:" + str(Path(path).absolute())


# FFmpeg's words for a full disk, and the errors they are
_FULL_DISK = {os.strerror(errno.ENOSPC): errno.ENOSPC, os.strerror(errno.EDQUOT): errno.EDQUOT}


def _run_ffmpeg(command: list[str], frames: np.ndarray, target: Path) -> None:
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors)
        try:
            with contextlib.suppress(BrokenPipeError):  # ffmpeg quit early: its stderr says why
                for frame in frames:
                    process.stdin.write(frame.tobytes())
                process.stdin.close()
            returncode = process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        if returncode != 0:
            errors.seek(0)
            detail = errors.read().decode("utf-8", "replace").strip()
            for words, number in _FULL_DISK.items():
                if words in detail:  # an OSError, named as one by the front ends
                    raise OSError(number, words, str(target))
            raise RuntimeError(f"ffmpeg failed to write '{target}' (exit code {returncode}): {detail}")


def _write(
    frames: np.ndarray,
    target: Path,
    kind: str,
    fps: float,
    crf: int,
    quality: int,
    lossless: bool,
    loop: int,
    metadata: dict[str, str],
) -> None:
    if kind == "mp4" and (frames.shape[1] % 2 or frames.shape[2] % 2):
        frames = np.pad(
            frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)), mode="edge"
        )
    _, height, width, _ = frames.shape
    rate = Fraction(fps).limit_denominator(100_000)
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostats", "-v", "error", "-y"]
    command += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}"]
    command += ["-r", f"{rate.numerator}/{rate.denominator}", "-i", "-"]
    with contextlib.ExitStack() as stack:
        if kind == "mp4" and metadata:
            # An FFmpeg metadata file rather than -metadata: a workflow can exceed the length limit
            # of one command-line argument.
            meta_file = stack.enter_context(
                tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False)
            )
            stack.callback(os.unlink, meta_file.name)
            lines = [f"{_ffmetadata_escape(k)}={_ffmetadata_escape(v)}" for k, v in metadata.items()]
            meta_file.write(";FFMETADATA1\n" + "\n".join(lines) + "\n")
            meta_file.close()
            meta = _ffmpeg_name(meta_file.name)
            command += ["-f", "ffmetadata", "-i", meta, "-map", "0:v", "-map_metadata", "1"]
        command += [*_output_options(kind, crf, quality, lossless, loop), "-f", kind, _ffmpeg_name(target)]
        _run_ffmpeg(command, frames, target)
    if kind != "mp4" and metadata:
        data = target.read_bytes()
        if kind == "gif":
            data = _gif_with_comment(data, json.dumps(metadata).encode("utf-8"))
        else:
            data = _webp_with_exif(data, _webp_exif(metadata), width=width, height=height)
        target.write_bytes(data)


def _ffmetadata_escape(text: str) -> str:
    for special in ("\\", "=", ";", "#", "\n"):
        text = text.replace(special, "\\" + special)
    return text


def _gif_with_comment(data: bytes, text: bytes) -> bytes:
    """Insert a GIF comment extension after the header, screen descriptor and global colour table."""
    flags = data[10]
    offset = 13 + (3 * 2 ** ((flags & 0x07) + 1) if flags & 0x80 else 0)
    blocks = b"".join(bytes([len(text[i : i + 255])]) + text[i : i + 255] for i in range(0, len(text), 255))
    return data[:offset] + b"\x21\xfe" + blocks + b"\x00" + data[offset:]


def _webp_exif(metadata: dict[str, str]) -> bytes:
    """ComfyUI's EXIF entries, as a TIFF block: tag 0x0110 holds ``prompt:<json>``, the other keys
    (the workflow first) the tags counting down from 0x010F, each as ``key:value``."""
    exif = Image.Exif()
    others = iter(_WEBP_OTHER_TAGS)
    for key, value in sorted(metadata.items(), key=lambda item: item[0] not in ("prompt", "workflow")):
        tag = _WEBP_PROMPT_TAG if key == "prompt" else next(others)
        # EXIF text is ASCII; other text goes in as UTF-8 bytes, which Pillow reads back as Latin-1.
        text = f"{key}:{value}"
        exif[tag] = text if text.isascii() else text.encode("utf-8")
    return exif.tobytes().removeprefix(b"Exif\x00\x00")


def _webp_with_exif(data: bytes, exif: bytes, *, width: int, height: int) -> bytes:
    """Append an EXIF chunk to a WebP file, flagging it in the VP8X header (added if missing)."""
    body = data[12:]
    if body[:4] != b"VP8X":
        size = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
        body = struct.pack("<4sI4x", b"VP8X", 10) + size + body
    body = body[:8] + bytes([body[8] | 0x08]) + body[9:] + struct.pack("<4sI", b"EXIF", len(exif)) + exif
    body += b"\x00" * (len(exif) % 2)
    return struct.pack("<4sI4s", b"RIFF", 4 + len(body), b"WEBP") + body


# ----------------------------------------------------------------------------------------------
# Reading


def read_video(path: str | os.PathLike[str], *, max_frames: int | None = None, stride: int = 1) -> np.ndarray:
    """Frames 0, ``stride``, 2 ``stride``, ... (at most ``max_frames``) as uint8 ``[f, h, w, 3]``.

    Decoding stops as soon as ``max_frames`` frames are taken. A file cut short gives the frames
    before the cut, or raises :class:`VideoReadError` when the decoder reports broken data; a file
    with no frames raises it too.
    """
    if not (isinstance(stride, int) and stride >= 1):
        raise ValueError(f"stride must be an integer >= 1, got {stride!r}")
    if max_frames is not None and not (isinstance(max_frames, int) and max_frames >= 1):
        raise ValueError(f"max_frames must be None or an integer >= 1, got {max_frames!r}")
    taken: list[np.ndarray] = []
    with contextlib.closing(_iter_frames(path)) as frames:
        for index, convert in enumerate(frames):
            if index % stride == 0:
                taken.append(convert())
                if len(taken) == max_frames:
                    break
    if not taken:
        raise VideoReadError(path, "it holds no video frames")
    return _stack(path, taken)


def read_frames(path: str | os.PathLike[str], indices: Sequence[int]) -> np.ndarray:
    """The frames at ``indices`` (any order, repeats allowed) as uint8 ``[len(indices), h, w, 3]``.

    Decodes sequentially and stops after the last index needed, converting to RGB only the frames
    asked for; for training clips sampled at a stride from the start of a video.
    """
    if len(indices) == 0 or not all(isinstance(i, (int, np.integer)) and i >= 0 for i in indices):
        raise ValueError(f"indices must be a non-empty sequence of integers >= 0, got {indices!r}")
    wanted = {int(i) for i in indices}
    last = max(wanted)
    found: dict[int, np.ndarray] = {}
    count = 0
    with contextlib.closing(_iter_frames(path)) as frames:
        for index, convert in enumerate(frames):
            count = index + 1
            if index in wanted:
                found[index] = convert()
            if index == last:
                break
    if len(found) < len(wanted):
        missing = min(wanted - found.keys())
        raise VideoReadError(path, f"frame {missing} was asked for but the video has only {count} frames")
    return _stack(path, [found[int(i)] for i in indices])


def video_info(path: str | os.PathLike[str]) -> VideoInfo:
    """Frame count, frame rate and size, mostly from the container (no full decode for MP4)."""
    if _kind_of_file(path) == "av":
        with _av_errors(path), av.open(_ffmpeg_name(path)) as container:
            stream = _video_stream(container, path)
            width, height = stream.codec_context.width, stream.codec_context.height
            if not (width and height):
                raise VideoReadError(path, "the size of its frames is unknown")
            frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
            rate = stream.average_rate or stream.guessed_rate
            return VideoInfo(frames=int(frames), fps=float(rate) if rate else 0.0, width=width, height=height)
    with _pillow_errors(path), Image.open(path) as image:
        durations = _durations(image)
        seconds = sum(d if d > 0 else _DEFAULT_FRAME_MS for d in durations) / 1000.0
        return VideoInfo(
            frames=len(durations), fps=len(durations) / seconds, width=image.width, height=image.height
        )


# what FFmpeg's mp4 muxer writes itself: not the caller's metadata
_CONTAINER_TAGS = {"major_brand", "minor_version", "compatible_brands", "encoder", "creation_time"}


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``metadata`` that :func:`write_video` embedded (also reads ComfyUI's MP4 tags and WebP
    EXIF entries, and VideoHelperSuite's MP4 comment); ``{}`` when there is none."""
    kind = _kind_of_file(path)
    if kind == "av":
        with _av_errors(path), av.open(_ffmpeg_name(path)) as container:
            tags = {k: v for k, v in container.metadata.items() if k not in _CONTAINER_TAGS}
            return {**_parse_comment(tags.pop("comment", None)), **tags}
    with _pillow_errors(path), Image.open(path) as image:
        if kind == "gif":
            comment = image.info.get("comment")
            return _parse_comment(comment.decode("utf-8", "replace") if comment else None)
        exif = image.getexif()
        entries = {}
        for tag in (_WEBP_PROMPT_TAG, *_WEBP_OTHER_TAGS):
            value = exif.get(tag)
            if isinstance(value, str) and not value.isascii():
                with contextlib.suppress(UnicodeError):
                    value = value.encode("latin-1").decode("utf-8")
            if isinstance(value, str) and ":" in value:
                key, _, text = value.partition(":")
                entries[key] = text
        return entries


def _parse_comment(comment: str | None) -> dict[str, str]:
    if not comment:
        return {}
    try:
        parsed = parse_json(comment, "the comment")  # depth-limited: a video's tags are anyone's
    except ValueError:
        return {"comment": comment}
    if not isinstance(parsed, dict):
        return {"comment": comment}
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in parsed.items()}


def _kind_of_file(path: str | os.PathLike[str]) -> str:
    """``gif``, ``webp`` (read with Pillow) or ``av`` (anything else, read with PyAV), by content."""
    file = Path(path)
    problem = file_problem(file)
    if problem == "no such file":
        raise VideoReadError(path, "the file does not exist")
    if problem:
        raise VideoReadError(path, f"it {problem}")
    try:
        with open(file, "rb") as stream:
            head = stream.read(12)
    except OSError as error:
        raise VideoReadError(path, str(error)) from error
    if not head:
        raise VideoReadError(path, "the file is empty")
    if head.startswith(b"GIF8"):
        return "gif"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    return "av"


@contextlib.contextmanager
def _av_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    try:
        yield
    except (av.error.FFmpegError, OSError) as error:
        raise VideoReadError(path, str(error)) from error


@contextlib.contextmanager
def _pillow_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    try:
        yield
    # Pillow reports broken data with any of these, depending on where the data breaks
    except (
        OSError,
        ValueError,
        EOFError,
        IndexError,
        SyntaxError,
        struct.error,
        Image.DecompressionBombError,
    ) as error:
        if isinstance(error, VideoReadError):
            raise
        raise VideoReadError(path, str(error) or type(error).__name__) from error


def _video_stream(container: av.container.InputContainer, path: str | os.PathLike[str]) -> av.VideoStream:
    if not container.streams.video:
        raise VideoReadError(path, "it has no video stream")
    return container.streams.video[0]


def _iter_frames(path: str | os.PathLike[str]) -> Iterator[Callable[[], np.ndarray]]:
    """One zero-argument converter to uint8 RGB ``[h, w, 3]`` per frame, in order. A converter
    must be called before the iterator advances."""
    if _kind_of_file(path) == "av":
        with _av_errors(path), av.open(_ffmpeg_name(path)) as container:
            stream = _video_stream(container, path)
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                yield functools.partial(frame.to_ndarray, format="rgb24")
        return
    with _pillow_errors(path), Image.open(path) as image:
        for index in range(getattr(image, "n_frames", 1)):
            image.seek(index)
            image.load()  # decode here, where errors become VideoReadError
            yield functools.partial(rgb_array, image)


def _durations(image: Image.Image) -> list[float]:
    """Display duration in ms of each frame of a GIF or WebP (decodes every frame)."""
    durations = []
    for index in range(getattr(image, "n_frames", 1)):
        image.seek(index)
        image.load()
        durations.append(float(image.info.get("duration") or 0.0))
    return durations


def rgb_array(image: Image.Image) -> np.ndarray:
    """A Pillow image as uint8 RGB ``[h, w, 3]``; transparency is composited on white."""
    if image.mode == "RGB":
        return np.asarray(image)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def _stack(path: str | os.PathLike[str], frames: list[np.ndarray]) -> np.ndarray:
    shapes = {frame.shape for frame in frames}
    if len(shapes) > 1:
        raise VideoReadError(path, f"its frames differ in size: {sorted(shapes)}")
    return np.stack(frames)
