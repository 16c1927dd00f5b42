"""Fixtures shared by the test files."""
import pytest


@pytest.fixture(params=[False, True], ids=['structural', 'traced'])
def traced(request) -> bool:
    return request.param
