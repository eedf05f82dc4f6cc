"""The peer tests' tiny models: built once per session, on first use."""
import pytest
from peer_checks import Tiny


class _Lazy(dict):
    def __missing__(self, name: str) -> Tiny:
        self[name] = Tiny(name)
        return self[name]


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Tiny]:
    """model name -> Tiny, each built on first use and shared by every peer test of the session."""
    return _Lazy()
