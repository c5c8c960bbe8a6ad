"""Shared fixtures: the real embedded stack (SeaweedFS S3 + MLflow server) on free loopback ports.

No mocks: every test that needs S3 or MLflow talks to these servers over HTTP.
"""

from __future__ import annotations

import os

import pytest

from mycelium import stack as stack_mod


def start_stack(state_dir) -> stack_mod.StackConfig:
    cfg = stack_mod.StackConfig(state_dir=state_dir, ports=stack_mod.free_ports())
    stack_mod.up(cfg, log=lambda *_: None)
    return cfg


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """One stack for the session; its env (endpoint, credentials, tracking URI) is exported."""
    cfg = start_stack(tmp_path_factory.mktemp("stack"))
    saved = {k: os.environ.get(k) for k in stack_mod.stack_env(cfg)}
    os.environ.update(stack_mod.stack_env(cfg))
    try:
        yield cfg
    finally:
        stack_mod.down(cfg, log=lambda *_: None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
