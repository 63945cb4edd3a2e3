"""Finding, preparing and importing a custom handler (LMI's ``option.entryPoint`` / ``model.py``).

The handler is a function ``handle(inputs: Input) -> Output | None`` (``option.handler`` names
another one) in a ``.py`` file of the model folder or in an importable module. A handler that
cannot be imported stops ``serve`` at start: ``ConfigError`` carries the traceback's last line
(the whole traceback goes to the log).
"""

from __future__ import annotations

import fcntl
import importlib
import importlib.util
import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from djl_like.config import ServingConfig
from djl_like.errors import ConfigError
from djl_like.properties import load_properties

logger = logging.getLogger(__name__)

DEFAULT_HANDLER_FILE = "model.py"
REQUIREMENTS_FILE = "requirements.txt"
OPTION_PREFIX = "option."


@dataclass(frozen=True)
class EntryPoint:
    """Where the handler lives: a file (``path``) or an importable module (``module``)."""

    folder: str  # the model folder: put first on sys.path, so the handler imports its neighbours
    function: str
    path: str | None = None
    module: str | None = None

    def __str__(self) -> str:
        return f"{self.path or self.module}:{self.function}"


def find_entry_point(config: ServingConfig, model_path: str) -> EntryPoint | None:
    """The custom handler this configuration asks for, or None for the built-in modes.

    ``option.entryPoint`` names a ``.py`` file (relative to the model folder, or absolute) or a
    module (``package.module``); without it, a ``model.py`` in the model folder is the handler,
    as in LMI. Raises ``ConfigError`` when a named file does not exist.
    """
    folders = list(dict.fromkeys([config.model_dir, model_path]))
    if config.entry_point is None:
        found = next((Path(folder, DEFAULT_HANDLER_FILE) for folder in folders
                      if Path(folder, DEFAULT_HANDLER_FILE).is_file()), None)
        return None if found is None else EntryPoint(str(found.parent), config.handler, path=str(found))
    if not config.entry_point.endswith(".py"):
        return EntryPoint(config.model_dir, config.handler, module=config.entry_point)
    candidates = [Path(config.entry_point)] if os.path.isabs(config.entry_point) else [
        Path(folder, config.entry_point) for folder in folders]
    found = next((candidate for candidate in candidates if candidate.is_file()), None)
    if found is None:
        raise ConfigError(f"option.entryPoint={config.entry_point!r}: no such file in the model folder "
                          f"{config.model_dir}")
    return EntryPoint(str(found.parent), config.handler, path=str(found))


def install_requirements(folder: str, enabled: bool) -> None:
    """pip-install ``requirements.txt`` of the model folder when ``option.install_requirements``
    is true. NOTE: off by default: it runs code from the network at every start (a supply-chain
    risk); a file left there is only reported. Workers install one at a time (a file lock)."""
    requirements = Path(folder, REQUIREMENTS_FILE)
    if not requirements.is_file():
        return
    if not enabled:
        logger.warning("%s is not installed: set option.install_requirements=true to install it at "
                       "start (better: install it into the image)", requirements)
        return
    logger.info("installing %s (option.install_requirements=true)", requirements)
    with open(requirements, "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-r",
                              str(requirements)], capture_output=True, text=True, check=False, cwd=folder)
    logger.info("pip: %s", pip.stdout.strip()[-2000:])
    if pip.returncode != 0:
        lines = [line for line in pip.stderr.splitlines() if line.strip()] or ["(no output)"]
        raise ConfigError(f"option.install_requirements=true: pip could not install {requirements}: {lines[-1]}")


def import_handler(entry: EntryPoint) -> Callable:
    """Import the handler's module and return its function; ``ConfigError`` when it fails."""
    if entry.folder not in sys.path:
        sys.path.insert(0, entry.folder)
    try:
        module = _import_file(entry.path) if entry.path else importlib.import_module(entry.module)
    except BaseException as error:  # noqa: BLE001 - user code: SystemExit and all are start failures
        logger.error("the handler %s failed to import:\n%s", entry, "".join(traceback.format_exception(error)))
        raise ConfigError(f"the handler {entry} failed to import: {last_line(error)}") from None
    function = getattr(module, entry.function, None)
    if not callable(function):
        raise ConfigError(f"the handler {entry.path or entry.module} defines no function {entry.function!r} "
                          "(option.handler names it; default handle)")
    return function


def _import_file(path: str):
    name = Path(path).stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # NOTE: pickle, dataclasses and typing look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def last_line(error: BaseException) -> str:
    """The last line of ``error``'s traceback (``ValueError: what went wrong``)."""
    return traceback.format_exception_only(error)[-1].strip()


def init_properties(config: ServingConfig, model_path: str, env: Mapping[str, str],
                    device_id: str) -> dict[str, str]:
    """The properties of the init call, as LMI hands them to a handler: every serving.properties
    (and environment) key, ``option.`` prefixes dropped; ``model_dir`` (and ``model_id`` when
    set) is the local model folder; ``device_id`` is ``-1`` on CPU."""
    properties = {key.removeprefix(OPTION_PREFIX): value
                  for key, value in load_properties(config.model_dir, env).items()}
    properties["model_dir"] = model_path
    if config.model_id is not None:
        properties["model_id"] = model_path  # downloaded or resolved already
    properties["device_id"] = device_id
    return properties
