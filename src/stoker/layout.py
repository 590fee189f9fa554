"""Where stoker keeps its files: XDG directories for a user, FHS ones for a system install."""

from __future__ import annotations

import os
from pathlib import Path


class Layout:
    """Every path the daemon and CLI use, derived once from the environment.

    A plain class rather than a dataclass: the CLI imports this on every run, and
    `dataclasses` (with `inspect`) costs more start-up time than the whole command.
    """

    __slots__ = ("cache_dir", "config_dir", "runtime_dir", "state_dir", "system")

    def __init__(
        self,
        config_dir: Path,
        state_dir: Path,
        cache_dir: Path,
        runtime_dir: Path,
        system: bool = False,
    ) -> None:
        self.config_dir = config_dir
        self.state_dir = state_dir
        self.cache_dir = cache_dir
        self.runtime_dir = runtime_dir
        self.system = system

    def __repr__(self) -> str:
        return f"Layout(state_dir={self.state_dir!s}, runtime_dir={self.runtime_dir!s})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Layout):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, k) for k in self.__slots__))

    @property
    def config_file(self) -> Path:
        return self.config_dir / "config.toml"

    @property
    def socket_path(self) -> Path:
        return self.runtime_dir / "stokerd.sock"

    @property
    def lock_path(self) -> Path:
        return self.runtime_dir / "stokerd.lock"

    @property
    def state_lock_path(self) -> Path:
        """One daemon per state dir, whatever runtime dir (socket) each one uses."""
        return self.state_dir / "state.lock"

    @property
    def pid_path(self) -> Path:
        return self.runtime_dir / "stokerd.pid"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "state.db"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "stokerd.log"

    @property
    def vms_dir(self) -> Path:
        return self.state_dir / "vms"

    @property
    def images_dir(self) -> Path:
        return self.state_dir / "images"

    @property
    def kernels_dir(self) -> Path:
        return self.state_dir / "kernels"

    @property
    def ssh_dir(self) -> Path:
        return self.state_dir / "ssh"

    @property
    def ssh_key(self) -> Path:
        return self.ssh_dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.ssh_dir / "known_hosts"

    @property
    def oci_cache_dir(self) -> Path:
        return self.cache_dir / "oci"

    @property
    def staging_dir(self) -> Path:
        return self.state_dir / "staging"

    def vm_dir(self, vm_id: str) -> Path:
        return self.vms_dir / vm_id

    def ensure(self) -> None:
        """Create the directories the daemon writes to (private to the owner)."""
        for d in (
            self.state_dir,
            self.cache_dir,
            self.runtime_dir,
            self.vms_dir,
            self.images_dir,
            self.kernels_dir,
            self.ssh_dir,
            self.staging_dir,
        ):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)

    @classmethod
    def for_user(cls, env: dict[str, str] | None = None) -> Layout:
        """XDG layout for an interactive user (dev mode)."""
        e = os.environ if env is None else env
        home = Path(e.get("HOME") or Path.home())

        def xdg(var: str, default: Path) -> Path:
            v = e.get(var)
            return Path(v) if v and os.path.isabs(v) else default

        config = xdg("XDG_CONFIG_HOME", home / ".config") / "stoker"
        state = xdg("XDG_STATE_HOME", home / ".local" / "state") / "stoker"
        cache = xdg("XDG_CACHE_HOME", home / ".cache") / "stoker"
        # The socket lives in the state dir unless XDG_RUNTIME_DIR is set: root shells
        # often have no runtime dir, and the daemon must outlive a login session anyway.
        rt = e.get("XDG_RUNTIME_DIR")
        runtime = Path(rt) / "stoker" if rt and os.path.isabs(rt) else state
        return cls(config_dir=config, state_dir=state, cache_dir=cache, runtime_dir=runtime)

    @classmethod
    def for_system(cls, root: str | os.PathLike[str] = "/") -> Layout:
        """FHS layout for a systemd-managed install (`stokerd --system`). `root` (the
        environment's STOKER_ROOT) prefixes every path: `stoker system install --root
        DIR` makes an install inside DIR (tests, staging)."""
        r = Path(root)
        return cls(
            config_dir=r / "etc/stoker",
            state_dir=r / "var/lib/stoker",
            cache_dir=r / "var/cache/stoker",
            runtime_dir=r / "run/stoker",
            system=True,
        )

    @classmethod
    def resolve(cls, system: bool = False, env: dict[str, str] | None = None) -> Layout:
        e = os.environ if env is None else env
        if system or e.get("STOKER_SYSTEM") == "1":
            root = e.get("STOKER_ROOT") or "/"
            return cls.for_system(root if os.path.isabs(root) else "/")
        return cls.for_user(dict(e))
