"""The built-in `synthetic` dataset: shapes whose class is their MOTION, drawn into real H.264 files.

It lets the whole pipeline (decode, extract, heads, evaluate) run offline on a laptop CPU in
minutes. Every video gets a random appearance (outline, colour and size of the shape, start
jitter, speed, length, pixel noise); only the motion says which class it is. Several classes
come in pairs that differ only in the direction of the same motion (clockwise vs counter-clockwise,
left vs right, grow vs shrink) — the paper's "visually similar actions" — and such pairs sit in
the val and test splits too. Averaging frame features over time (ProtoNet) cannot separate a pair,
since both halves visit the same poses; an order-aware metric (OTAM) can.

Everything is a pure function of `(seed, class key, video index)`, so a generation is
reproducible, can run in parallel, and can resume after a kill. The amplitudes are tuned so that
a tiny random-weight CLIP encoder (the tests' stand-in for real weights) still sees the motion.
"""

from __future__ import annotations

import colorsys
import json
import multiprocessing
import os
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image, ImageDraw
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from clipspm.errors import DatasetError
from clipspm.system import make_console, usable_cores

GENERATOR_VERSION = 1  # bump when any pixel changes, so that older roots are refused, not mixed
DEFAULT_VIDEOS_PER_CLASS = 12
FPS = 25
MIN_FRAMES, MAX_FRAMES = 24, 48
MARKER_FILE = "synthetic.json"
SPLITS = ("train", "val", "test")

# A pose: (x, y) centre as a fraction of the frame (y grows downwards), angle in degrees
# (positive turns clockwise on screen), and a scale factor on the shape's radius.
Pose = tuple[float, float, float, float]


@dataclass(frozen=True)
class SyntheticClass:
    """One class: its folder name, the English text used in CLIP prompts, its split, its motion."""

    key: str
    text: str
    split: str
    motion: str  # a key of MOTIONS
    args: tuple[tuple[str, float], ...] = ()  # keyword arguments of the motion function


def _c(key: str, text: str, split: str, motion: str, **args: float) -> SyntheticClass:
    return SyntheticClass(key, text, split, motion, tuple(sorted(args.items())))


# Pairs that look alike are adjacent. dx/dy: travel direction; spin: +1 clockwise, -1 counter-clockwise.
SYNTHETIC_CLASSES: tuple[SyntheticClass, ...] = (
    _c("move_up", "moving up", "train", "translate", dx=0, dy=-1),
    _c("move_down", "moving down", "train", "translate", dx=0, dy=1),
    _c("move_diagonal_up_right", "moving diagonally up and to the right", "train", "translate", dx=1, dy=-1),
    _c("move_diagonal_down_left", "moving diagonally down and to the left", "train", "translate", dx=-1, dy=1),
    _c("roll_right", "rolling to the right", "train", "roll", dx=1),
    _c("roll_left", "rolling to the left", "train", "roll", dx=-1),
    _c("zigzag_right", "zig-zagging to the right", "train", "zigzag", dx=1),
    _c("zigzag_left", "zig-zagging to the left", "train", "zigzag", dx=-1),
    _c("bounce_vertical", "bouncing up and down", "train", "bounce", vertical=1),
    _c("bounce_horizontal", "bouncing from side to side", "train", "bounce", vertical=0),
    _c("spiral_inward", "spiralling inwards", "train", "spiral", inward=1),
    _c("spiral_outward", "spiralling outwards", "train", "spiral", inward=0),
    _c("pulse", "pulsing in size", "train", "pulse"),
    _c("swing_pendulum", "swinging like a pendulum", "train", "swing"),
    _c("toss_up", "being tossed up and falling back down", "train", "toss"),
    _c("figure_eight", "tracing a figure eight", "train", "figure_eight"),
    _c("orbit_clockwise", "circling clockwise", "val", "orbit", spin=1),
    _c("orbit_counterclockwise", "circling counter-clockwise", "val", "orbit", spin=-1),
    _c("move_diagonal_down_right", "moving diagonally down and to the right", "val", "translate", dx=1, dy=1),
    _c("move_diagonal_up_left", "moving diagonally up and to the left", "val", "translate", dx=-1, dy=-1),
    _c("approach_then_retreat", "approaching and then moving away", "val", "approach", first=1),
    _c("retreat_then_approach", "moving away and then approaching", "val", "approach", first=-1),
    _c("rotate_clockwise", "rotating clockwise", "test", "rotate", spin=1),
    _c("rotate_counterclockwise", "rotating counter-clockwise", "test", "rotate", spin=-1),
    _c("move_left", "moving left", "test", "translate", dx=-1, dy=0),
    _c("move_right", "moving right", "test", "translate", dx=1, dy=0),
    _c("grow", "growing", "test", "scale", grow=1),
    _c("shrink", "shrinking", "test", "scale", grow=-1),
)
CLASSES_BY_KEY = {c.key: c for c in SYNTHETIC_CLASSES}


@dataclass(frozen=True)
class VideoParams:
    """Everything random about one video; with its class it fixes every pixel."""

    num_frames: int
    shape: str  # a key of SHAPES
    shape_color: tuple[int, int, int]
    radius: float  # fraction of the frame size
    angle: float  # orientation in degrees, for motions that do not turn the shape
    jitter_x: float  # offset of the whole path, fraction of the frame
    jitter_y: float
    speed: float  # multiplies the extent of the motion
    noise_amplitude: int  # uniform pixel noise in [-a, a]
    noise_seed: int


# --- motion families: t in [0, 1] and the video's params -> pose --------------------------------
# Paths are centred on the frame plus the video's jitter, so the two halves of a pair visit the
# same places in opposite order. Orientation-defining motions start near the same pose ("dot
# up") in every video, so that frames at the same time are comparable across videos.

def translate(t: float, p: VideoParams, dx: float, dy: float) -> Pose:
    norm = float(np.hypot(dx, dy))
    travel = 0.5 * p.speed * (t - 0.5) / norm
    return 0.5 + p.jitter_x + dx * travel, 0.5 + p.jitter_y + dy * travel, p.angle, 1.0


def roll(t: float, p: VideoParams, dx: float) -> Pose:
    x, y, _, _ = translate(t, p, dx, 0.0)
    return x, y, p.angle + dx * 300.0 * p.speed * t, 1.0


def zigzag(t: float, p: VideoParams, dx: float) -> Pose:
    x, y, _, _ = translate(t, p, dx, 0.0)
    teeth = 2.5
    wave = 2.0 * abs(2.0 * ((teeth * t) % 1.0) - 1.0) - 1.0  # triangle wave in [-1, 1]
    return x, y + 0.15 * wave, p.angle, 1.0


def bounce(t: float, p: VideoParams, vertical: float) -> Pose:
    hops = 2.0
    height = 0.45 * p.speed * abs(np.sin(np.pi * hops * t))
    if vertical:
        return 0.5 + p.jitter_x, 0.75 + p.jitter_y / 2 - height, p.angle, 1.0
    side = 2.0 * abs(2.0 * ((hops * t / 2.0 + 0.25) % 1.0) - 1.0) - 1.0  # wall to wall
    return 0.5 + p.jitter_x + 0.3 * p.speed * side, 0.5 + p.jitter_y, p.angle, 1.0


def spiral(t: float, p: VideoParams, inward: float) -> Pose:
    s = t if inward else 1.0 - t
    radius = 0.32 * (1.0 - 0.85 * s)
    phase = 2.0 * np.pi * (1.5 * p.speed * s - 0.25)
    return 0.5 + radius * np.cos(phase), 0.5 + radius * np.sin(phase), p.angle, 1.0


def pulse(t: float, p: VideoParams) -> Pose:
    return 0.5 + p.jitter_x, 0.5 + p.jitter_y, p.angle, 1.0 + 0.45 * np.sin(2.0 * np.pi * 2.0 * p.speed * t)


def swing(t: float, p: VideoParams) -> Pose:
    theta = np.radians(50.0) * np.sin(2.0 * np.pi * 1.25 * p.speed * t)
    length = 0.55
    return 0.5 + p.jitter_x + length * np.sin(theta), 0.15 + length * np.cos(theta), -np.degrees(theta), 1.0


def toss(t: float, p: VideoParams) -> Pose:
    height = 4.0 * 0.5 * p.speed * t * (1.0 - t)
    return 0.5 + p.jitter_x + 0.15 * (t - 0.5), 0.8 - height, p.angle, 1.0


def figure_eight(t: float, p: VideoParams) -> Pose:
    phase = 2.0 * np.pi * p.speed * t
    return 0.5 + 0.3 * np.sin(phase), 0.5 + 0.2 * np.sin(2.0 * phase), p.angle, 1.0


def orbit(t: float, p: VideoParams, spin: float) -> Pose:
    phase = np.radians(-90.0 + spin * 300.0 * p.speed * t)  # starts at 12 o'clock
    return 0.5 + 0.3 * np.cos(phase), 0.5 + 0.3 * np.sin(phase), p.angle, 1.0


def approach(t: float, p: VideoParams, first: float) -> Pose:
    bump = np.sin(np.pi * t)
    return 0.5 + p.jitter_x, 0.5 + p.jitter_y, p.angle, 1.0 + first * 0.6 * p.speed * bump


def rotate(t: float, p: VideoParams, spin: float) -> Pose:
    upright = p.angle / 6.0  # near "dot up", so the same time means the same pose in a class
    return 0.5 + p.jitter_x / 2, 0.5 + p.jitter_y / 2, upright + spin * 300.0 * p.speed * t, 1.2


def scale(t: float, p: VideoParams, grow: float) -> Pose:
    s = t if grow > 0 else 1.0 - t
    return 0.5 + p.jitter_x / 2, 0.5 + p.jitter_y / 2, p.angle, 0.5 * (3.4 ** (s * p.speed))


MOTIONS: dict[str, Callable[..., Pose]] = {
    "translate": translate, "roll": roll, "zigzag": zigzag, "bounce": bounce, "spiral": spiral,
    "pulse": pulse, "swing": swing, "toss": toss, "figure_eight": figure_eight, "orbit": orbit,
    "approach": approach, "rotate": rotate, "scale": scale,
}


# --- appearance --------------------------------------------------------------------------------

def _regular(n: int, radius: float = 1.0, start: float = -90.0) -> list[tuple[float, float]]:
    angles = np.radians(start + 360.0 * np.arange(n) / n)
    return [(radius * float(np.cos(a)), radius * float(np.sin(a))) for a in angles]


def _star() -> list[tuple[float, float]]:
    outer, inner = _regular(5, 1.0), _regular(5, 0.45, start=-54.0)
    return [pt for pair in zip(outer, inner) for pt in pair]


# Outlines in shape-local units (radius about 1, "up" is -y). Each shape also carries a white
# dot near its top, so that turning is visible even for symmetric outlines.
SHAPES: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(0.0, -1.0), (0.8, 0.85), (-0.8, 0.85)],
    "arrow": [(0.0, -1.0), (0.75, -0.2), (0.3, -0.2), (0.3, 0.9), (-0.3, 0.9), (-0.3, -0.2), (-0.75, -0.2)],
    "disc": _regular(24),
    "star": _star(),
    "hexagon": _regular(6),
}
DOT = [(u, v - 0.5) for u, v in _regular(12, 0.28)]
DOT_COLOR = (240, 240, 240)
# The backdrop is one flat grey, the CLIP normalisation mean. Measured with the tiny random-weight
# ViT the tests use: a per-video background tint or texture of only +-5 grey levels moves every
# patch token the same way and drowns the moving shape (1-shot accuracy of an ordered frame
# metric falls from about 50% to chance), so per-video appearance lives in the shape instead.
BACKGROUND = (122, 116, 104)


def draw_video_params(rng: np.random.Generator) -> VideoParams:
    """The random appearance and jitter of one video; the class does not enter here.

    Shapes are dark (HSV value <= 0.35) in any hue: light and dark shapes in one dataset split
    each class in two for a random-weight encoder, while hue, saturation, outline and size vary
    freely without hiding the motion.
    """
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.2, 1.0), rng.uniform(0.0, 0.35))
    return VideoParams(
        num_frames=int(rng.integers(MIN_FRAMES, MAX_FRAMES + 1)),
        shape=str(rng.choice(list(SHAPES))),
        shape_color=(round(255 * r), round(255 * g), round(255 * b)),
        radius=float(rng.uniform(0.13, 0.2)),
        angle=float(rng.uniform(-30.0, 30.0)),
        jitter_x=float(rng.uniform(-0.08, 0.08)),
        jitter_y=float(rng.uniform(-0.08, 0.08)),
        speed=float(rng.uniform(0.85, 1.15)),
        noise_amplitude=int(rng.integers(1, 4)),
        noise_seed=int(rng.integers(2**31)),
    )


def render_video(synthetic_class: SyntheticClass, params: VideoParams, size: int = 128,
                 indices: list[int] | None = None) -> np.ndarray:
    """uint8 [n, size, size, 3]: the class's motion drawn with the video's appearance.

    `indices` picks frames (default: all `params.num_frames`); each frame is the same whichever
    others are drawn with it.
    """
    motion = MOTIONS[synthetic_class.motion]
    args = dict(synthetic_class.args)
    indices = list(range(params.num_frames)) if indices is None else indices
    radius_px = params.radius * 2 * size
    background = np.broadcast_to(np.asarray(BACKGROUND, np.float32), (size, size, 3))
    # Pixel noise: a window at a random place in one larger noise field per video, cheaper than
    # fresh noise for every frame and just as unpredictable from frame to frame.
    noise_rng = np.random.default_rng(params.noise_seed)
    amplitude = params.noise_amplitude
    noise = noise_rng.integers(-amplitude, amplitude + 1, (2 * size, 2 * size, 3), dtype=np.int8)
    offsets = noise_rng.integers(0, size, (params.num_frames, 2))
    frames = np.empty((len(indices), size, size, 3), np.uint8)
    for out, i in enumerate(indices):
        x, y, angle, factor = motion(i / (params.num_frames - 1), params, **args)
        pose = (x * 2 * size, y * 2 * size, angle, factor)  # drawn at twice the size, see _paint
        frame = background.copy()
        _paint(frame, _place(SHAPES[params.shape], pose, radius_px), params.shape_color)
        _paint(frame, _place(DOT, pose, radius_px), DOT_COLOR)
        dy, dx = offsets[i]
        frame += noise[dy:dy + size, dx:dx + size]
        frames[out] = np.clip(frame + 0.5, 0, 255)
    return frames


def _place(points: list[tuple[float, float]], pose: Pose, radius_px: float) -> list[tuple[float, float]]:
    """Shape-local points turned by the pose's angle, scaled to pixels and moved to its centre."""
    x, y, angle, factor = pose
    c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    r = radius_px * factor
    return [(x + r * (c * u - s * v), y + r * (s * u + c * v)) for u, v in points]


def _paint(frame: np.ndarray, polygon: list[tuple[float, float]], color: tuple[int, int, int]) -> None:
    """Blend a polygon, given in coordinates of twice the frame size, into `frame` in place.

    The polygon is drawn as a coverage mask at twice the size and box-filtered down, which
    anti-aliases its edges so that slow motion moves smoothly instead of in whole-pixel steps;
    only its bounding box is touched, which keeps drawing cheap.
    """
    size = frame.shape[0]
    xs, ys = [u for u, _ in polygon], [v for _, v in polygon]
    x0, y0 = max(int(min(xs)) // 2, 0), max(int(min(ys)) // 2, 0)
    x1, y1 = min(int(max(xs)) // 2 + 2, size), min(int(max(ys)) // 2 + 2, size)
    if x1 <= x0 or y1 <= y0:
        return
    mask = Image.new("L", (2 * (x1 - x0), 2 * (y1 - y0)), 0)
    ImageDraw.Draw(mask).polygon([(u - 2 * x0, v - 2 * y0) for u, v in polygon], fill=255)
    coverage = np.asarray(mask.resize((x1 - x0, y1 - y0), Image.BOX), np.float32)[..., None] / 255.0
    region = frame[y0:y1, x0:x1]
    region += (np.asarray(color, np.float32) - region) * coverage


# --- writing -----------------------------------------------------------------------------------

def write_video(path: Path, frames: np.ndarray, fps: int = 25, codec: str = "libx264") -> None:
    """Encode uint8 [n, H, W, 3] RGB frames (H, W even) into `path`; the container follows the suffix.

    Written under a temporary name in the same folder and renamed at the end, so that a killed
    writer never leaves a half file under the final name. One encoder thread keeps the bytes
    identical from run to run.
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [n, H, W, 3], got {frames.dtype} {frames.shape}")
    n, height, width, _ = frames.shape
    if n == 0 or height % 2 or width % 2:
        raise ValueError(f"need at least one frame and even H, W for yuv420p, got {frames.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        with av.open(str(partial), mode="w") as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.thread_count = 1
            if codec == "libx264":
                # Fast preset, but with B-frames, so that decoders meet reordered frames as in real files.
                stream.options = {"crf": "20", "preset": "ultrafast", "x264-params": "bframes=2"}
            else:
                stream.bit_rate = 4_000_000
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


# --- the dataset -------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlannedVideo:
    """One video of the dataset before it is drawn: where it goes and everything it looks like."""

    class_key: str
    name: str  # file stem, unique over the whole dataset
    params: VideoParams

    @property
    def key(self) -> str:
        return f"{self.class_key}/{self.name}"


def video_rng(seed: int, class_key: str, index: int) -> np.random.Generator:
    """The RNG of one video, from (seed, class, index) alone: order and parallelism cannot change it."""
    return np.random.default_rng([seed, zlib.crc32(class_key.encode()), index])


def plan_dataset(seed: int = 0, videos_per_class: int = DEFAULT_VIDEOS_PER_CLASS) -> list[PlannedVideo]:
    """Every video of the dataset, class by class, without drawing a pixel."""
    return [
        PlannedVideo(c.key, f"{c.key}_{i:03d}", draw_video_params(video_rng(seed, c.key, i)))
        for c in SYNTHETIC_CLASSES for i in range(videos_per_class)
    ]


def _ensure_video(job: tuple[Path, PlannedVideo, int]) -> None:
    """Draw and encode one planned video unless a valid copy is there (runs in a worker process)."""
    path, video, size = job
    if not _is_valid(path, video, size):
        write_video(path, render_video(CLASSES_BY_KEY[video.class_key], video.params, size), fps=FPS)


def _is_valid(path: Path, video: PlannedVideo, size: int) -> bool:
    """Whether a file left by an earlier run is this very video: all planned frames decode, and
    the first looks like the first frame drawn now (PSNR above 30 dB; H.264 here gives about 40,
    another seed's video about 20)."""
    if not path.is_file():
        return False
    try:
        with av.open(str(path)) as container:
            frames = container.decode(video=0)
            first = next(frames).to_ndarray(format="rgb24")
            count = 1 + sum(1 for _ in frames)
    except (av.error.FFmpegError, OSError, StopIteration):
        return False
    if count != video.params.num_frames or first.shape != (size, size, 3):
        return False
    expected = render_video(CLASSES_BY_KEY[video.class_key], video.params, size, indices=[0])[0]
    mse = np.mean((first.astype(np.float32) - expected) ** 2)
    return 10 * np.log10(255.0**2 / max(mse, 1e-6)) > 30.0


def _read_marker(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / MARKER_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_json(path: Path, data: Any) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, path)


def ensure_synthetic(root: Path, seed: int = 0, *, videos_per_class: int | None = None, size: int = 128,
                     progress: bool = True, workers: int | None = None) -> Path:
    """Generate the synthetic dataset under `root` unless it is already there; return `root`.

    Layout: `root/CLASS/VIDEO.mp4`, `root/splits/{train,val,test}list.txt` (`CLASS/VIDEO` per
    line), `root/classes.json` ({class key: class text}) and `root/synthetic.json`, which names the
    generation parameters from the start and says `"complete": true` only once everything else is
    written. A killed run is resumed: videos that already decode to their planned frames are kept.
    A root made with other parameters, or a non-empty folder that is not a synthetic dataset, is
    refused rather than mixed with or overwritten. With `videos_per_class` unstated, a finished
    dataset of the same seed and size is reused whatever its number of videos per class.
    """
    root = Path(root)
    marker = _read_marker(root)
    if videos_per_class is None:
        # Unstated size: a finished dataset of this seed is taken as it is (tests make small ones).
        if marker is not None and marker.get("complete") and marker["params"].get("seed") == seed \
                and marker["params"].get("size") == size:
            return root
        videos_per_class = DEFAULT_VIDEOS_PER_CLASS
    if videos_per_class < 1 or size < 16 or size % 2:
        raise ValueError(f"need videos_per_class >= 1 and an even size >= 16, got {videos_per_class}, {size}")
    params = {"generator": "clipspm.datasets.synthetic", "version": GENERATOR_VERSION, "seed": seed,
              "videos_per_class": videos_per_class, "size": size, "fps": FPS}
    if marker is not None and marker.get("params") == params and marker.get("complete"):
        return root
    _check_root_is_ours(root, marker, params)

    root.mkdir(parents=True, exist_ok=True)
    _write_json(root / MARKER_FILE, {"params": params, "complete": False})
    plan = plan_dataset(seed, videos_per_class)
    jobs = [(root / v.class_key / f"{v.name}.mp4", v, size) for v in plan]
    _run_jobs(jobs, progress, workers)

    splits = {split: [v.key for v in plan if CLASSES_BY_KEY[v.class_key].split == split] for split in SPLITS}
    (root / "splits").mkdir(exist_ok=True)
    for split, keys in splits.items():
        (root / "splits" / f"{split}list.txt").write_text("".join(f"{k}\n" for k in keys))
    _write_json(root / "classes.json", {c.key: c.text for c in SYNTHETIC_CLASSES})
    counts = {split: {"classes": sum(c.split == split for c in SYNTHETIC_CLASSES), "videos": len(keys)}
              for split, keys in splits.items()}
    _write_json(root / MARKER_FILE, {"params": params, "complete": True, "counts": counts})
    return root


def _check_root_is_ours(root: Path, marker: dict[str, Any] | None, params: dict[str, Any]) -> None:
    """Refuse to write into a folder that holds anything other than this very generation.

    Without a marker, a folder holding only what a generation writes is taken as an interrupted
    one; its videos must then pass `_is_valid` to be kept.
    """
    if marker is not None and marker.get("params") != params:
        state = "a complete" if marker.get("complete") else "a partly generated"
        theirs = ", ".join(f"{k}={v}" for k, v in (marker.get("params") or {}).items())
        raise DatasetError(
            f"{root} holds {state} synthetic dataset made with other parameters ({theirs}); "
            f"asked for {', '.join(f'{k}={v}' for k, v in params.items())}. "
            f"Use another --root, ask for the same parameters, or delete {root} to regenerate it.")
    ours = {c.key for c in SYNTHETIC_CLASSES} | {"splits", "classes.json", MARKER_FILE}
    foreign = sorted(p.name for p in root.iterdir() if p.name not in ours and not p.name.startswith(".")) \
        if marker is None and root.is_dir() else []
    if foreign:
        raise DatasetError(
            f"{root} holds files that are not part of a synthetic dataset ({', '.join(foreign[:5])}); "
            "choose an empty or new --root for the synthetic dataset.")


def _run_jobs(jobs: list[tuple[Path, PlannedVideo, int]], progress: bool, workers: int | None) -> None:
    """Check or make the videos, in a pool of processes when there are several cores."""
    workers = min(workers or usable_cores(), max(len(jobs), 1))
    # fork keeps the start-up cheap; the pool is made before the progress bar starts its thread.
    pool = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn").Pool(workers) \
        if workers > 1 else None
    try:
        done = pool.imap_unordered(_ensure_video, jobs, chunksize=2) if pool else map(_ensure_video, jobs)
        columns = (TextColumn("synthetic videos"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=make_console(), disable=not progress) as bar:
            task = bar.add_task("", total=len(jobs))
            for _ in done:
                bar.advance(task)
    finally:
        if pool:
            pool.terminate()
            pool.join()
