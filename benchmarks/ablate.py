"""Suite speed: the whole `components` suite (Table 3, 8 variants) on one cache at K = 1, 3, 5.

Run `python benchmarks/ablate.py [--episodes N --eval-episodes N --devices cpu,cpu ...]`; `run()` returns the
measurements. Two suite runs into fresh run directories:

    cold   a fresh cache directory: the suite extracts the cache once, then trains and scores every run
    warm   the same cache again: resolved ("reusing cache"), nothing extracted

Columns: `wall` is the whole `run_ablation` call; `cache` resolving (cold: extracting) the cache; `train` and
`eval` the sums over runs of `train_heads` and `evaluate_run` (each including its own data loading);
`worker start` the summed start-up of the worker processes (one per device, with several devices); `report`
the tables and figures. `outside` is the share of the wall time not spent training or evaluating:
1 - (train + eval) / (workers x wall), exact for one worker and assuming balanced workers otherwise.
On CPU the default is the synthetic dataset with a short schedule; pass the paper's on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python benchmarks/ablate.py`: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import command_line, describe_device, print_table
from clipspm.datasets.synthetic import ensure_synthetic
from clipspm.experiments.ablate import AblateOptions, AblateResult, run_ablation

DATA_DIR = Path(__file__).resolve().parents[1] / "data"


def run(shots: tuple[int, ...] = (1, 3, 5), episodes: int = 32, eval_episodes: int = 500, val_episodes: int = 100,
        videos_per_class: int = 9, devices: tuple[str, ...] | None = None, work: Path | None = None) -> list[dict]:
    """A row per suite run (cold, then warm) of the components suite on the synthetic dataset."""
    root = ensure_synthetic(DATA_DIR / f"benchmark-ablate-synthetic-{videos_per_class}per-class", seed=0,
                            videos_per_class=videos_per_class, progress=False)
    work = Path(work or tempfile.mkdtemp(prefix="clipspm-ablate-benchmark-"))
    schedule = (f"train.val_every={episodes}", f"train.val_episodes={val_episodes}")
    rows = []
    for name in ("cold", "warm"):
        options = AblateOptions(suite="components", dataset="synthetic", root=root, shots=shots, episodes=episodes,
                                eval_episodes=eval_episodes, overrides=schedule, devices=devices,
                                cache_dir=work / "caches", runs_dir=work / f"runs-{name}", progress=False)
        with contextlib.redirect_stderr(io.StringIO()):
            result = run_ablation(options)
        rows.append(_row(name, result))
    return rows


def _row(name: str, result: AblateResult) -> dict:
    train = sum(o.train_seconds for o in result.outcomes)
    evaluation = sum(o.eval_seconds for o in result.outcomes)
    workers = len(result.devices)
    outside = 1 - (train + evaluation) / (workers * result.seconds)
    return {"run": name, "workers": workers, "runs": len(result.outcomes), "wall s": f"{result.seconds:.1f}",
            "cache s": f"{result.cache_seconds:.1f}", "train s": f"{train:.1f}", "eval s": f"{evaluation:.1f}",
            "worker start s": f"{result.worker_start_seconds:.1f}", "report s": f"{result.report_seconds:.1f}",
            "outside": f"{100 * outside:.0f}%"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", default="1,3,5", help="comma-separated K values")
    parser.add_argument("--episodes", type=int, default=32, help="training episodes per run")
    parser.add_argument("--eval-episodes", type=int, default=500, help="stored test episodes per K")
    parser.add_argument("--val-episodes", type=int, default=100, help="validation episodes per run")
    parser.add_argument("--videos-per-class", type=int, default=9, help="synthetic videos per class")
    parser.add_argument("--devices", default=None, help="worker devices, e.g. cuda:0,cuda:1 or cpu,cpu")
    parser.add_argument("--work", type=Path, default=None, help="where caches and runs go (default: a temp dir)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = run(tuple(int(k) for k in args.shots.split(",")), args.episodes, args.eval_episodes, args.val_episodes,
               args.videos_per_class, tuple(args.devices.split(",")) if args.devices else None, args.work)
    print_table(f"components suite, K = {args.shots}, {args.episodes} training episodes per run, "
                f"{args.eval_episodes} test episodes ({describe_device(device)})", rows)
    print(command_line())


if __name__ == "__main__":
    main()
