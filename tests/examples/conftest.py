"""The shopping assistant example on a real uvicorn server over SmolLM2-135M."""

from __future__ import annotations

import pytest

from examples.shopping_assistant.app import create_shop_app
from neuronserve.model.loader import DEFAULT_MODEL
from tests.server.conftest import RunningServer, engine_factory


@pytest.fixture(scope="module")
def shop(smollm2):
    app = create_shop_app(
        engine_factory(smollm2, max_num_seqs=8, num_blocks=300, max_model_len=1024), DEFAULT_MODEL
    )
    server = RunningServer(app).start()
    yield server
    server.stop()
