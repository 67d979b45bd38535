"""Without Ray installed, `--engine ray` says which extra to install (one line, exit 1)."""

import sys

import pytest
from click.testing import CliRunner

from cli.main import cli
from scaleout import EngineMissingError
from scaleout.ray_engine import import_ray


@pytest.mark.unit
def test_without_ray_the_engine_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    with pytest.raises(EngineMissingError, match=r"pip install 'hiervec\[ray\]'"):
        import_ray()


@pytest.mark.lite
def test_the_cli_names_the_extra_and_stores_nothing(monkeypatch, tmp_path, tiny_model):
    from PIL import Image

    monkeypatch.setitem(sys.modules, "ray", None)
    (tmp_path / "images" / "clothing" / "tops" / "shirt").mkdir(parents=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "images" / "clothing" / "tops" / "shirt" / "a.png")
    result = CliRunner().invoke(cli, ["ingest", str(tmp_path / "images"), "--model", str(tiny_model),
                                      "--uri", str(tmp_path / "x.db"), "--engine", "ray", "--runtime", "torch"])
    assert result.exit_code == 1, result.output
    assert "--engine ray needs Ray" in result.output and "pip install 'hiervec[ray]'" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "x.db").exists()  # refused before anything was created
