import re
from pathlib import Path

import pytest

from tests.milvus_store.conftest import MILVUS_IMAGE

pytestmark = pytest.mark.unit


def test_compose_runs_the_milvus_release_the_server_tests_pin():
    compose = (Path(__file__).parents[1] / "docker-compose.yml").read_text()
    images = re.findall(r"^\s+image:\s*(\S+)", compose, flags=re.M)
    assert MILVUS_IMAGE in images
    assert all(":" in image and not image.endswith(":latest") for image in images), images


def test_every_server_config_takes_a_vector_field_per_level():
    """docker-compose.yml mounts deploy/milvus/user.yaml, and the Helm values and the Operator sample carry
    the same setting, at the most any Milvus takes, with the release the server tests pin."""
    import yaml

    from milvus_store.spec import MAX_VECTOR_FIELDS

    root = Path(__file__).parents[1]
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    mounts = [m.split(":") for m in compose["services"]["milvus"]["volumes"] if m.startswith("./")]
    assert ["./deploy/milvus/user.yaml", "/milvus/configs/user.yaml", "ro"] in mounts
    user = yaml.safe_load((root / "deploy/milvus/user.yaml").read_text())
    helm = yaml.safe_load((root / "deploy/helm/values.yaml").read_text())
    operator = yaml.safe_load((root / "deploy/operator/milvus.yaml").read_text())
    for config in (user, yaml.safe_load(helm["extraConfigFiles"]["user.yaml"]), operator["spec"]["config"]):
        assert config["proxy"]["maxVectorFieldNum"] == MAX_VECTOR_FIELDS
    assert helm["cluster"]["enabled"] and operator["spec"]["mode"] == "cluster"
    assert f"{helm['image']['all']['repository']}:{helm['image']['all']['tag']}" == MILVUS_IMAGE
    assert operator["spec"]["components"]["image"] == MILVUS_IMAGE
    assert helm["queryNode"]["replicas"] >= 2 and operator["spec"]["components"]["queryNode"]["replicas"] >= 2
