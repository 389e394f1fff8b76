"""Shared fixtures: the demo node, fresh for each test."""
import pytest

from yikatong.engine.demo import demo_engine

BUSINESS_DATE = 20261124


@pytest.fixture
def demo():
    """(engine, keys) holding DEMO.md's named cards and 100 generated cards."""
    return demo_engine(generated_cards=100, business_date=BUSINESS_DATE)
