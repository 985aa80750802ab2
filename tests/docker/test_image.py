"""The image, built and run with a real Docker engine by check_image.sh: the three modes answer the test job,
a code change reuses the weights' layer, an empty volume without the Hub fails cleanly, and the build secret
is nowhere in the image.

It needs root, Debian's docker.io and debootstrap. Where they are missing the test is skipped, unless
REQUIRE_DOCKER=1 (set by .ci/run), which turns the skip into a failure.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LIMIT_S = 3000  # a fresh machine: debootstrap, torch and its CUDA libraries, three builds, five runs


def engine_missing() -> str | None:
    if os.geteuid() != 0:
        return "the Docker check starts its own dockerd, which needs root"
    missing = [tool for tool in ("dockerd", "debootstrap") if shutil.which(tool) is None]
    if not Path("/usr/bin/docker").is_file():
        missing.append("/usr/bin/docker")
    if missing:
        return f"{', '.join(missing)} missing: apt-get install docker.io debootstrap"
    return None


def image_python() -> str:
    """The image's Python version, as builder/image_stack.env names it: the stand-in base is made of this one."""
    for line in (ROOT / "builder" / "image_stack.env").read_text().splitlines():
        if line.startswith("IMAGE_PYTHON_VERSION="):
            return line.split("=", 1)[1]
    raise AssertionError("builder/image_stack.env names no IMAGE_PYTHON_VERSION")


@pytest.fixture(scope="module")
def engine_available():
    running = "%d.%d" % sys.version_info[:2]
    if running != image_python():
        pytest.skip(f"the stand-in base is made of Python {image_python()}, the image's; this is {running}: make test-image")
    reason = engine_missing()
    if reason is not None:
        if os.environ.get("REQUIRE_DOCKER") == "1":
            pytest.fail(f"REQUIRE_DOCKER=1 but {reason}")
        pytest.skip(reason)


@pytest.mark.timeout(LIMIT_S + 180)
def test_the_image_builds_and_answers_in_every_mode(engine_available, default_model_path, tmp_path, capsys):
    results = tmp_path / "results.json"
    # Its own session, so that on a timeout the check is stopped as a whole and still cleans up after itself.
    check = subprocess.Popen(
        ["bash", str(HERE / "check_image.sh"), str(results)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
        start_new_session=True,
    )
    try:
        output, _ = check.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        check.send_signal(signal.SIGTERM)  # its trap stops dockerd and removes what it made
        try:
            output, _ = check.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            os.killpg(check.pid, signal.SIGKILL)
            output, _ = check.communicate()
        pytest.fail(f"the Docker check ran past {LIMIT_S} s:\n{output[-4000:]}")
    with capsys.disabled():  # the figures belong in the test log even when the check passes
        print("\n" + output)
    assert check.returncode == 0, output[-4000:]
    figures = json.loads(results.read_text())
    assert set(figures["build_s"]) == {"cached", "volume", "baked", "baked_after_code_change"}
    # The baked image carries the weights (~270 MB of them); the others do not.
    assert figures["image_mb"]["baked"] - figures["image_mb"]["cached"] > 250
    assert figures["image_mb"]["volume"] == figures["image_mb"]["cached"]
