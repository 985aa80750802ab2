"""builder/requirements.txt (the image's pins) agrees with pyproject.toml, the Dockerfile's base is the stack that
builder/image_stack.env names (and `make test-image` tests), and builder/build.sh refuses a bad command line
before it starts docker. The image itself is built and run in tests/docker/."""

import re
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
    assert "torchvision" not in pinned, "torchvision comes from the base image, built for its torch"
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for line in dependencies:
        wanted = Requirement(line)
        name = wanted.name.lower().replace("_", "-")
        if name == "torch":
            continue
        assert name in pinned, f"{name} is a dependency in pyproject.toml but not in builder/requirements.txt"
        version = str(pinned[name].specifier).removeprefix("==")
        assert wanted.specifier.contains(version), f"{name}=={version} is outside pyproject.toml's {wanted.specifier}"


def image_stack() -> dict[str, str]:
    lines = (ROOT / "builder" / "image_stack.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def test_the_dockerfile_s_base_is_the_image_stack_tested():
    stack = image_stack()
    assert set(stack) == {"BASE_IMAGE", "IMAGE_PYTHON_VERSION", "IMAGE_TORCH_VERSION", "IMAGE_TORCHVISION_VERSION"}
    [default] = re.findall(r"^ARG BASE_IMAGE=(\S+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert default == stack["BASE_IMAGE"], "the Dockerfile's BASE_IMAGE and builder/image_stack.env disagree"
    # RunPod's tags name their torch: runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2204 holds torch 2.8.0.
    [torch_in_tag] = re.findall(r"-torch(\d+)-", default)
    assert torch_in_tag == stack["IMAGE_TORCH_VERSION"].replace(".", ""), (default, stack["IMAGE_TORCH_VERSION"])


def test_make_test_image_installs_that_stack_and_exactly_the_image_s_pins():
    plan = subprocess.run(
        ["make", "-n", "-B", "--no-print-directory", ".stamps/venv-image"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    stack = image_stack()
    assert re.search(rf"python{re.escape(stack['IMAGE_PYTHON_VERSION'])} -m venv", plan), plan
    install = " ".join(plan.replace("\\\n", " ").split())
    pins = f"torch=={stack['IMAGE_TORCH_VERSION']} torchvision=={stack['IMAGE_TORCHVISION_VERSION']}"
    assert f"{pins} -r builder/requirements.txt" in install, install
    assert "-c builder/requirements.txt" in install, install


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
