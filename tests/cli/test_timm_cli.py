"""`--backbone timm:NAME` end to end on tiny data: train from a saved state dict of the timm model,
ingest into Milvus Lite, export to ONNX and OpenVINO, and search through each runtime with the
checkpoint's fingerprint and neighbours; a ConvNet and a ViT (simple feature pyramid)."""

import json

import pytest
import torch

from embedder import runtimes

from ..commands import run_json
from .conftest import LEAVES, PER_LEAF

timm = pytest.importorskip("timm", reason="timm is not installed (pip install 'hiervec[timm]'; make venv installs it)")
pytestmark = pytest.mark.lite


@pytest.mark.parametrize("name", ["convnext_atto", "vit_tiny_patch16_224"])
def test_a_timm_backbone_trains_ingests_exports_and_searches(name, workspace, tmp_path):
    _, tree, _ = workspace
    torch.manual_seed(0)
    weights = tmp_path / "start.pt"
    torch.save(timm.create_model(name, pretrained=False).state_dict(), weights)
    model = tmp_path / "model.pt"
    summary = run_json("train", tree, "--out", model, "--levels", "department,category,item",
                       "--backbone", f"timm:{name}", "--weights", weights, "--epochs", "1", "--steps-per-epoch", "2",
                       "--image-size", "32", "--dim", "8", "--val-fraction", "0.3")
    assert summary["images"] == len(LEAVES) * PER_LEAF and "val/recall@1" in summary["metrics"]

    db = tmp_path / "h.db"
    stored = run_json("ingest", tree, "--model", model, "--uri", db)
    assert stored["stored"] == len(LEAVES) * PER_LEAF and stored["failed"] == 0

    query = sorted((tree / "clothing/tops/shirt").iterdir())[0]
    hits = {}
    for runtime in ("torch", *(r for r in ("onnxruntime", "openvino") if runtimes.installed(r))):
        found = run_json("search", query, "--model", model, "--uri", db, "-k", "3", "--runtime", runtime)
        hits[runtime] = [(hit["uri"], round(hit["distance"], 3)) for hit in found["queries"][0]["hits"]]
    assert all(ranked == hits["torch"] for ranked in hits.values()), hits
    assert hits["torch"][0][0] == str(query.resolve())  # the image itself first

    for fmt in ("onnx", "openvino"):
        if not runtimes.installed("onnxruntime" if fmt == "onnx" else "openvino"):
            continue
        exported = run_json("export", model, "--format", fmt, "--out", tmp_path / fmt)
        manifest = json.loads((tmp_path / fmt / "hiervec-export.json").read_text())
        assert exported["fingerprint"] == manifest["vector_fingerprint"] == summary["fingerprint"]


@pytest.mark.unit
def test_a_backbone_name_that_is_neither_is_refused_before_anything_runs(tmp_path):
    from click.testing import CliRunner

    from cli.main import cli

    result = CliRunner().invoke(cli, ["train", str(tmp_path), "--out", str(tmp_path / "m.pt"),
                                      "--backbone", "timm:convnext_atoo"])
    assert result.exit_code == 2 and "unknown timm model 'convnext_atoo'" in result.output
    assert "close names: convnext_atto" in result.output and not (tmp_path / "m.pt").exists()
    result = CliRunner().invoke(cli, ["train", str(tmp_path), "--out", str(tmp_path / "m.pt"), "--backbone", "vgg"])
    assert result.exit_code == 2 and "unknown backbone 'vgg'" in result.output and "timm:NAME" in result.output
