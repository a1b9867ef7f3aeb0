import pytest

from tests.agent.fakes import FakeServer


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()
