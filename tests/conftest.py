"""Tests run offline: never wait on a model hub."""

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("CVAD_WEIGHTS_DIR", os.path.join(os.path.dirname(__file__), "_no_user_weights"))


@pytest.fixture(scope="session")
def nuts():
    """Eight defect-free built-in hex nuts at 64 px, uint8 [8, 3, 64, 64]: real images for the trained methods."""
    from support import builtin_images

    return builtin_images(8)


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory):
    """The one folder of generated built-in data for every test (``support.tiny_config``'s ``cache``): each option
    set is generated once a session, into a subfolder named by its digest, and reused by every test after."""
    return tmp_path_factory.mktemp("builtin-cache")
