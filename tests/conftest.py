"""Tests run offline: never wait on a model hub."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("CVAD_WEIGHTS_DIR", os.path.join(os.path.dirname(__file__), "_no_user_weights"))
