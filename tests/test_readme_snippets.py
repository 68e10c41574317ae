"""Every ```python block of the README runs as written (one namespace, in order, from a folder laid out like
the repository's root: samples/ beside it). The gradio_client block needs the web page running: test_app.py
runs it against its server."""
import os
import re

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


def python_blocks(markdown: str, web_page: bool = False) -> list:
    blocks = re.findall(r"```python\n(.*?)```", markdown, flags=re.S)
    return [b for b in blocks if ("gradio_client" in b) == web_page]


def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch, capsys):
    blocks = python_blocks((REPO_ROOT / "README.md").read_text())
    assert len(blocks) >= 3
    (tmp_path / "samples").symlink_to(REPO_ROOT / "samples")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)  # noqa: S102
    outputs = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert outputs == ["a2v.mp4", "a2v.wav", "hello.wav", "out.mp4", "out.wav"]
    assert namespace["plan"].max_steps == 43 and namespace["out"].n_patches >= 1
    assert "t2av" in capsys.readouterr().out  # the summary line was printed
    assert not any(p.name.startswith(".") for p in (tmp_path / "outputs").iterdir())
    assert set(os.listdir(tmp_path)) == {"samples", "outputs"}  # nothing written elsewhere
