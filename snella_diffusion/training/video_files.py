"""Video files through PyAV (the optional ``video`` extra): which files are clips, how many
frames a clip holds and at what rate, reading chosen frames in order, and writing an
``.mp4``/``.webm``/``.gif``.

Every failure is a :class:`VideoFileError` whose one-line message names the file: PyAV
missing (with the install command), no video stream, or a stream that cannot be decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from ..files import write_atomically
from .data import DataError

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".gif")
INSTALL_HINT = "pip install 'snella-diffusion[video]' (or: pip install av)"
# Container format by suffix (the temporary file of an atomic write has none to guess from).
CONTAINER_FORMATS = {".mp4": "mp4", ".webm": "webm", ".mov": "mov", ".gif": "gif"}
# Codec, pixel format and options by container.
ENCODERS = {
    "mp4": ("libx264", "yuv420p", {"crf": "12"}),
    "mov": ("libx264", "yuv420p", {"crf": "12"}),
    "webm": ("libvpx-vp9", "yuv420p", {"crf": "12", "b": "0"}),
    "gif": ("gif", "rgb8", {}),
}


class VideoFileError(DataError):
    """A clip cannot be read (or written): PyAV is missing, or the file is not a decodable video."""


def import_av(path: Path) -> Any:
    """The ``av`` module; VideoFileError naming ``path`` and the install command when absent."""
    try:
        import av
    except ImportError:
        raise VideoFileError(f"{path}: reading video files needs PyAV: {INSTALL_HINT}") from None
    return av


def is_video_file(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


@dataclass(frozen=True)
class ClipInfo:
    """What a clip holds: ``frames`` decodable frames of ``height`` × ``width`` pixels, played at
    ``fps`` frames per second (the stream's average rate; None when the file gives none)."""

    frames: int
    height: int
    width: int
    fps: Optional[float] = None


def _decode_error(path: Path, error: BaseException) -> VideoFileError:
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return VideoFileError(f"{path}: cannot decode the video ({type(error).__name__}: {detail})")


def _frames(path: Path, rate: Optional[list[Optional[float]]] = None):
    """Yield the decoded frames of the first video stream of ``path`` as ``av.VideoFrame``;
    ``rate``, when given, receives the stream's average frame rate (fps, or None) first."""
    av = import_av(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoFileError(f"{path}: holds no video stream")
            stream = container.streams.video[0]
            if rate is not None:
                average = stream.average_rate or stream.guessed_rate
                rate.append(float(average) if average else None)
            yield from container.decode(stream)
    except VideoFileError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError, EOFError) as error:
        # the message carries FFmpeg's reason; its traceback would only repeat it
        raise _decode_error(path, error) from None


def probe_clip(path: Path) -> ClipInfo:
    """Decode ``path`` once to count its frames (container frame counts are missing or wrong
    for some formats). Raises VideoFileError naming the file when it cannot be decoded or holds
    no frame."""
    count, height, width = 0, 0, 0
    rate: list[Optional[float]] = []
    for frame in _frames(path, rate):
        height, width = frame.height, frame.width
        count += 1
    if count == 0:
        raise VideoFileError(f"{path}: the video holds no decodable frame")
    return ClipInfo(count, height, width, rate[0] if rate else None)


def read_frames(path: Path, indices: Sequence[int]) -> list[Image.Image]:
    """The frames of ``path`` at ``indices`` (0-based, increasing) as RGB images, in that order.

    Raises VideoFileError naming the file when it cannot be decoded or ends before the last index."""
    wanted = list(indices)
    if any(b <= a for a, b in zip(wanted, wanted[1:])):
        raise ValueError(f"frame indices must increase: {wanted}")
    images: list[Image.Image] = []
    for index, frame in enumerate(_frames(path)):
        if len(images) == len(wanted):
            break
        if index == wanted[len(images)]:
            images.append(frame.to_image().convert("RGB"))
    if len(images) < len(wanted):
        raise VideoFileError(f"{path}: ends after {index + 1 if wanted else 0} frames, frame {wanted[len(images)]} "
                             "was asked for (the file changed since it was counted?)")
    return images


def write_video(path: Path, frames: np.ndarray, fps: float = 16.0) -> Path:
    """Write ``frames`` ``(F, H, W, 3)`` uint8 RGB to ``path`` (container from its suffix:
    ``.mp4``/``.mov`` H.264 at CRF 12, ``.webm`` VP9, ``.gif``), atomically. H.264 and VP9 in
    4:2:0 need even sides: an odd height or width is cropped by one pixel."""
    path = Path(path)
    container_format = CONTAINER_FORMATS.get(path.suffix.lower())
    if container_format is None:
        raise VideoFileError(f"{path}: cannot write this suffix (known: {', '.join(CONTAINER_FORMATS)})")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (F, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    av = import_av(path)
    codec, pixel_format, options = ENCODERS[container_format]
    if pixel_format == "yuv420p":
        frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]

    def write(temporary: Path) -> None:
        with av.open(str(temporary), "w", format=container_format) as container:
            stream = container.add_stream(codec, rate=round(fps))
            stream.height, stream.width = frames.shape[1], frames.shape[2]
            stream.pix_fmt = pixel_format
            stream.options = dict(options)
            for array in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")))
            container.mux(stream.encode())

    return write_atomically(path, write)
