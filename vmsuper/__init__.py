"""vmsuper: a KVM host for plugin VMMs speaking crosvm's plugin protocol."""

__version__ = "0.1.0"
