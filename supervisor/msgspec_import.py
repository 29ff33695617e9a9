"""msgspec, imported as a run needs it: without typing_extensions.

msgspec imports typing_extensions when it is installed (for `get_type_hints`, `Required` and
`NotRequired`) and otherwise uses the standard library's `typing`, which on Python 3.11 has all
three. Importing typing_extensions costs every `vmsuper run` a few milliseconds before it can
start its plugin (its own code: what it imports, a run imports anyway), and vmsuper's config
types use nothing of it. It is installed wherever something else needs it (a type checker, a
gRPC tool), so msgspec is imported as if it were not; anything that imports it later still
gets it.
"""

from vmsuper.shared.deferred_imports import NotInstalled

with NotInstalled("typing_extensions"):
    import msgspec

__all__ = ["msgspec"]
