"""Shared fixtures: real tiny checkpoints written by transformers / peft, a fresh store, and
the test Hub servers (olah for reads, ``tests/hub_server.py`` for writes)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    # Without CUDA the Triton kernels' tests run them under Triton's interpreter, which must be
    # on before anything imports mergehub's kernels (test modules do, while being collected,
    # through mergehub), so here, before every test module; it changes nothing else (CPU
    # tensors take the torch paths unless a test asks for Triton).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import transformers  # noqa: E402

from mergehub.hub.demo import make_finetune, make_lora, make_tiny_llama  # noqa: E402
from mergehub.storage.store import Store  # noqa: E402
from tests.hub_server import READ_TOKEN, WRITE_TOKEN, StandInHub, new_repo_id  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning)

def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip @pytest.mark.gpu tests when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Llama checkpoints: a base per dtype, a sharded base, fine-tunes, a LoRA, another arch."""
    root = tmp_path_factory.mktemp("models")
    out: dict[str, Path] = {}
    for tag, dtype in DTYPES.items():
        out[f"base-{tag}"] = make_tiny_llama(root / f"base-{tag}", dtype=dtype)
        out[f"sharded-{tag}"] = make_tiny_llama(root / f"sharded-{tag}", dtype=dtype,
                                                max_shard_size="100KB")
    base = out["base-bf16"]
    out["ft-mlp"] = make_finetune(base, root / "ft-mlp", pattern="mlp")
    out["ft-attn"] = make_finetune(base, root / "ft-attn", pattern="self_attn", seed=5)
    out["ft-sharded"] = make_finetune(base, root / "ft-sharded", pattern="mlp", seed=7,
                                      max_shard_size="100KB")
    out["lora"] = make_lora(base, root / "lora")
    return out


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): a second thread only adds hand-offs (3-15x slower
    on a busy 2-CPU machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    with Store.init(tmp_path / "store") as s:
        yield s


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a test server or a torch.distributed rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def hub_servers(tmp_path_factory: pytest.TempPathFactory):
    """olah on 127.0.0.1 serving MIRRORS/models/<org>/<repo> git repos, and the stand-in write
    API in front of it; yields the stand-in (``.url`` is the HF_ENDPOINT to use)."""
    root = tmp_path_factory.mktemp("hub")
    mirrors = root / "mirrors"
    (mirrors / "models").mkdir(parents=True)
    port = free_port()
    config = root / "olah.toml"
    config.write_text(f'[basic]\nhost = "127.0.0.1"\nport = {port}\n'
                      f'mirrors-path = ["{mirrors}"]\nrepos-path = "{root / "repos"}"\n'
                      'metadata-cache-ttl = 0\n[accessibility]\noffline = true\n')
    log = open(root / "olah.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", "from olah.server import cli; cli()", "-c",
                             str(config), "--log-path", str(root / "logs")], cwd=root,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"olah did not start: {(root / 'olah.log').read_text()}")
            time.sleep(0.2)
    hub = StandInHub(mirrors, f"http://127.0.0.1:{port}", {WRITE_TOKEN: "write",
                                                            READ_TOKEN: "read"})
    yield hub
    hub.close()
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture
def hf(hub_servers: StandInHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """HF_ENDPOINT at the stand-in, HF_TOKEN a write token, a fresh HF cache, no saved login.

    ``huggingface_hub`` reads some settings once at import, so its constants are patched too.
    """
    from huggingface_hub import constants, hf_api

    url = hub_servers.url
    for key, value in {"HF_ENDPOINT": url, "HF_TOKEN": WRITE_TOKEN,
                       "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_HUB_DISABLE_XET": "1",
                       "HF_TOKEN_PATH": str(tmp_path / "no-token")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_api.api, "endpoint", url)  # behind the module-level helpers
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    hub_servers.fail.clear()
    return SimpleNamespace(hub=hub_servers, url=url, monkeypatch=monkeypatch)


@pytest.fixture
def pushed_base(hf, models, tmp_path):
    """Store A with the bf16 base, pushed to the Hub; returns (store A, base repo id)."""
    from mergehub.hub.remote import push

    a = Store.init(tmp_path / "a")
    a.add(models["base-bf16"], "base", progress=False)
    repo = new_repo_id("base")
    push(a, "base", repo, progress=False)
    yield a, repo
    a.close()
