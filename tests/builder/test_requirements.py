"""builder/requirements.txt (the image's pins) agrees with pyproject.toml, and builder/build.sh refuses a bad
command line before it starts docker. The image itself is built and run in tests/docker/."""

import subprocess
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]


def image_requirements() -> dict[str, Requirement]:
    lines = (ROOT / "builder" / "requirements.txt").read_text().splitlines()
    requirements = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {r.name.lower().replace("_", "-"): r for r in requirements}


def test_the_image_pins_every_runtime_dependency_exactly():
    for name, requirement in image_requirements().items():
        assert str(requirement.specifier).startswith("=="), f"{name} is not pinned with =="


def test_the_image_pins_agree_with_pyproject_and_leave_torch_to_the_base_image():
    pinned = image_requirements()
    assert "torch" not in pinned, "torch comes from the base image, built for its CUDA"
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for line in dependencies:
        wanted = Requirement(line)
        name = wanted.name.lower().replace("_", "-")
        if name == "torch":
            continue
        assert name in pinned, f"{name} is a dependency in pyproject.toml but not in builder/requirements.txt"
        version = str(pinned[name].specifier).removeprefix("==")
        assert wanted.specifier.contains(version), f"{name}=={version} is outside pyproject.toml's {wanted.specifier}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serverless"], "unknown mode 'serverless'; use baked, cached or volume"),
        (["cached", "--from-folder", "/tmp"], "use it with the baked mode"),
        (["baked", "--from-folder", "/tmp"], "--from-folder needs --model"),
        (["baked", "--model", "a/b", "--from-folder", "/nonexistent"], "has no config.json"),
        (["cached", "--network=host"], "docker build options go after --"),
    ],
)
def test_build_sh_refuses_a_bad_command_line_with_a_reason(args, message):
    result = subprocess.run(
        ["bash", str(ROOT / "builder" / "build.sh"), *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "DOCKER": "/bin/false"},
    )
    assert result.returncode == 2
    assert message in result.stderr
