"""The guest agent program, as shipped into every image.

The program lives at `stoker/guest/files/usr/lib/stoker/stoker-agent` (package data, copied
into images by the shared injection step); `stoker_agent.py` here is a symlink to it so that
mypy, ruff and the unit tests see it as a module. It is stdlib-only and must never import
stoker: it runs on the guest's own python3. The host side is `stoker.daemon.agent`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

GUEST_PATH = "/usr/lib/stoker/stoker-agent"
UNIT_NAME = "stoker-agent.service"


def agent_script() -> Path:
    """Host path of the packaged agent program (to run it locally, e.g. in tests)."""
    return Path(str(resources.files("stoker").joinpath("guest", "files", GUEST_PATH.lstrip("/"))))
