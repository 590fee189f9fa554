"""stoker: a clean Linux microVM with your repository inside, in one command."""

__version__ = "0.1.0"
