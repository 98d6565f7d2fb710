"""The README's Python section runs as written."""

from __future__ import annotations

import re
from pathlib import Path

from clipspm.stages.heads import train_heads
from clipspm.stages.runs import default_run_dir
from tests.conftest import heads_config

README = Path(__file__).parents[1] / "README.md"


def python_section() -> str:
    """The README's "## From Python" section, up to the next section."""
    text = README.read_text()
    start = text.index("\n## From Python\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_the_python_snippet_scores_an_episode_it_builds(synthetic_cache, tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", python_section(), re.S)
    assert "clipspm.load_run(" in blocks[1], "the second snippet shows load_run"
    run = re.search(r'open_test_run\("([^"]+)"', blocks[0]).group(1)
    cfg = heads_config(synthetic_cache, "train.episodes=64", "train.val_every=32", "train.val_episodes=20")
    assert Path(run) == default_run_dir(cfg, "heads"), "the snippet names the run `clipspm train` makes"
    monkeypatch.chdir(tmp_path)
    train_heads(cfg, Path(run), progress=False)
    exec(compile(blocks[0], str(README), "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 6 and all(line.startswith("query of ") for line in printed[:5]), printed
    assert re.fullmatch(r"accuracy (0|20|40|60|80|100)%", printed[-1]), printed
