"""The README's Python section runs as written (docs/readme-parts/python-api.md)."""

from __future__ import annotations

import re
from pathlib import Path

from clipspm.stages.heads import train_heads
from clipspm.stages.runs import default_run_dir
from tests.conftest import heads_config

SECTION = Path(__file__).parents[1] / "docs" / "readme-parts" / "python-api.md"


def test_the_python_snippet_scores_an_episode_it_builds(synthetic_cache, tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", SECTION.read_text(), re.S)
    assert len(blocks) == 1, "the section holds one runnable snippet"
    run = re.search(r'open_test_run\("([^"]+)"', blocks[0]).group(1)
    cfg = heads_config(synthetic_cache, "train.episodes=64", "train.val_every=32", "train.val_episodes=20")
    assert Path(run) == default_run_dir(cfg, "heads"), "the snippet names the run `clipspm train` makes"
    monkeypatch.chdir(tmp_path)
    train_heads(cfg, Path(run), progress=False)
    exec(compile(blocks[0], str(SECTION), "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 6 and all(line.startswith("query of ") for line in printed[:5]), printed
    assert re.fullmatch(r"accuracy (0|20|40|60|80|100)%", printed[-1]), printed
