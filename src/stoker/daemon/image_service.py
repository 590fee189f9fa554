"""ImageService: images and kernels (register, promote, delete, pull, build, catalog).

`image_ops_lock` is the publication-window lock: held only across recheck-name +
atomic rename + store upsert. Downloads, ext4 builds and copies run without it.
"""

from __future__ import annotations

import asyncio
import logging

from stoker.config import Config
from stoker.errors import NotFound
from stoker.layout import Layout
from stoker.model.records import Image, Kernel
from stoker.runner import Runner
from stoker.store import Store


class ImageService:
    """Owns image and kernel artifacts under the state dir and their store rows."""

    def __init__(
        self, store: Store, layout: Layout, config: Config, runner: Runner, logger: logging.Logger
    ) -> None:
        self.store = store
        self.layout = layout
        self.config = config
        self.runner = runner
        self.log = logger
        self.image_ops_lock = asyncio.Lock()

    async def list_images(self) -> list[Image]:
        """All registered images."""
        return self.store.list_images()

    async def get_image(self, name: str) -> Image:
        """One image by name, or a NotFound that says how to get it."""
        im = self.store.get_image(name)
        if im is None:
            raise NotFound(f"image {name!r} not found: run `stoker image pull {name}`")
        return im

    async def list_kernels(self) -> list[Kernel]:
        """All registered kernels."""
        return self.store.list_kernels()

    async def get_kernel(self, name: str) -> Kernel:
        """One kernel by name."""
        k = self.store.get_kernel(name)
        if k is None:
            raise NotFound(f"kernel {name!r} not found: run `stoker kernel pull {name}`")
        return k
