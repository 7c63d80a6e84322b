"""The compose stack and the image, checked as far as this machine can: no Docker engine runs here.

What runs: `docker-compose config -q` (Debian's docker-compose parses the
file), and checks that every image is pinned, every mounted file exists,
every secret the file names is made by scripts/compose-secrets, and the
Dockerfile's build context holds what it copies. What does not: building
the image and starting the containers (docs/operations.md, "Run the full stack").
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_docker_compose_parses_the_file(tmp_path: Path) -> None:
    if shutil.which("docker-compose") is None:
        pytest.skip("needs docker-compose (Debian: docker-compose)")
    # It checks that the secret files exist: give it a folder of them.
    subprocess.run([REPO / "scripts" / "compose-secrets", tmp_path / "secrets"], check=True,
                   capture_output=True, timeout=60)
    shutil.copytree(REPO, tmp_path / "repo", ignore=shutil.ignore_patterns(
        ".venv", ".git", "secrets", "__pycache__", ".mypy_cache", ".ruff_cache"), symlinks=True)
    shutil.copytree(tmp_path / "secrets", tmp_path / "repo" / "secrets")
    for profile in ([], ["--profile", "demo"]):
        run = subprocess.run(["docker-compose", *profile, "config", "-q"], cwd=tmp_path / "repo",
                             capture_output=True, text=True, timeout=60, check=False)
        assert run.returncode == 0, run.stderr
        assert run.stderr == "", run.stderr


def services() -> dict[str, dict[str, Any]]:
    return dict(COMPOSE["services"])


def test_every_image_is_pinned_and_every_service_has_a_healthcheck() -> None:
    for name, service in services().items():
        image = service.get("image", "")
        assert image, f"{name} has no image (name the built one too)"
        tag = image.rpartition(":")[2]
        assert ":" in image, f"{name}: {image} is not pinned"
        assert tag not in ("latest", "2", "15", "pg15"), f"{name}: {image} is not pinned"
        assert re.search(r"\d", tag), f"{name}: {image}"
        health = service.get("healthcheck")
        built = service.get("build") or image.startswith("bmsd:")
        assert health or built, f"{name} has no healthcheck"
        if health and health.get("disable"):
            assert name in ("migrate", "demo-data", "simulate"), f"{name} must have a healthcheck"
    assert "HEALTHCHECK" in (REPO / "Dockerfile").read_text()  # the bmsd image's own


def test_every_mounted_file_exists_and_no_password_is_written_in() -> None:
    for name, service in services().items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and not source.startswith("./secrets/"):
                assert (REPO / source).exists(), f"{name} mounts {source}, which is missing"
        for key, value in (service.get("environment") or {}).items():
            if "PASSWORD" in key:
                assert key.endswith("_FILE") or key.endswith("__FILE"), (name, key)
                assert str(value).startswith("/run/secrets/"), (name, key)
    text = (REPO / "docker-compose.yml").read_text()
    assert "change-me" not in text


def test_the_secrets_script_makes_every_secret_the_file_names(tmp_path: Path) -> None:
    subprocess.run([REPO / "scripts" / "compose-secrets", tmp_path], check=True,
                   capture_output=True, timeout=60)
    for name, secret in COMPOSE["secrets"].items():
        path = tmp_path / Path(secret["file"]).name
        assert path.stat().st_size > 0, name
    mounted = [v.split(":")[0] for v in services()["mosquitto"]["volumes"]]
    assert "./secrets/mosquitto_passwd" in mounted
    users = [line.split(":")[0] for line in (tmp_path / "mosquitto_passwd").read_text().split()]
    assert users == ["bmsd", "simulator"]
    # Run again: nothing changes.
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    subprocess.run([REPO / "scripts" / "compose-secrets", tmp_path], check=True,
                   capture_output=True, timeout=60)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_the_build_context_holds_what_the_dockerfile_copies() -> None:
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]

    def sent(path: str) -> bool:
        included = True
        for pattern in ignore:
            negate = pattern.startswith("!")
            pattern = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
                included = negate
        return included

    copies = re.findall(r"^COPY (?!--from)(.+?) \S+$", (REPO / "Dockerfile").read_text(), re.M)
    sources = [s for line in copies for s in line.split()]
    assert "bmsd/" in sources
    assert "sql/" in sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert sent(source.rstrip("/")), f"{source} is excluded by .dockerignore"
    # The package's links to sql/, config/ and systemd/ resolve inside the context.
    for link in ("sql", "defaults", "systemd"):
        target = (REPO / "bmsd" / link).readlink().as_posix().removeprefix("../")
        assert target + "/" in sources, link
