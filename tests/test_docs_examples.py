"""Every code example of README.md and docs/ runs, so none can rot.

The fenced ``python`` blocks of a page run top to bottom in one namespace (a block may use
what the blocks above it made), in a fresh folder, with ``load_model()`` giving the tiny
test model. A block preceded by ``<!-- skip-test: why -->`` is not run (the reason names the
test that runs the same calls). The serving examples (Python and curl) run against a real
``sims serve`` app on a free loopback port, with ``$SIMS_KEY`` set as the page says.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch

import simsteer
import simsteer.models
from simsteer.cli.main import main
from simsteer.functions import AddVector
from simsteer.steering import Steering

from .conftest import TINY_RUN

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(
    r"(?:<!--\s*(?P<marker>[^>]*?)\s*-->\s*\n)?```(?P<lang>\w*)\n(?P<code>.*?)^```", re.S | re.M
)
KEY = "docs-example-key"


def blocks(page: Path, lang: str = "python") -> list[tuple[str, str]]:
    """``(marker, code)`` of each fenced block in ``lang`` on ``page``."""
    text = page.read_text(encoding="utf-8")
    return [(m["marker"] or "", m["code"]) for m in BLOCK.finditer(text) if m["lang"] == lang]


def pages_with_python() -> list[str]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [str(p.relative_to(ROOT)) for p in pages if blocks(p)]


def run_page(page: Path, namespace: dict | None = None, replace: dict[str, str] | None = None) -> dict:
    """Run the page's python blocks in order in one namespace; returns the namespace."""
    if namespace is None:  # a real module, so that dataclasses (and pickling) find it
        module = types.ModuleType(f"docs_example_{page.stem.replace('-', '_')}")
        sys.modules[module.__name__] = module
        namespace = module.__dict__
    ran = 0
    for marker, code in blocks(page):
        if marker.startswith("skip-test"):
            continue
        for old, new in (replace or {}).items():
            code = code.replace(old, new)
        exec(compile(code, f"{page.name} block {ran + 1}", "exec"), namespace)
        ran += 1
    assert ran, f"{page} has no python block to run"
    return namespace


@pytest.fixture()
def tiny_everywhere(tiny_lm, monkeypatch, tmp_path):
    """``load_model()`` gives the tiny model, and the examples run in a fresh folder."""

    def load_model(*args, **kwargs):
        return tiny_lm

    monkeypatch.setattr(simsteer, "load_model", load_model)
    monkeypatch.setattr(simsteer.models, "load_model", load_model)
    monkeypatch.chdir(tmp_path)
    return tiny_lm


@pytest.fixture()
def serve_tone(tiny_lm, monkeypatch):
    """Start a real ``sims serve`` app (torch engine) serving a steering named ``tone`` on a
    free loopback port, keyed with ``$SIMS_KEY`` as the docs say or open; returns the
    ``host:port``."""
    pytest.importorskip("uvicorn")
    import uvicorn

    from simsteer.serve.app import create_app
    from simsteer.serve.config import ServeConfig
    from simsteer.serve.engine import BatchEngine

    started = []

    def start(keyed: bool = True) -> str:
        monkeypatch.setenv("SIMS_KEY", KEY)
        tone = Steering({1: AddVector(torch.full((tiny_lm.hidden_size,), 5.0))}, "caa", tiny_lm.fingerprint())
        engine = BatchEngine(tiny_lm, {"tone": [tone]}, max_batch=8, wait_s=0.02)
        engine.start()
        config = ServeConfig(api_key=os.environ["SIMS_KEY"] if keyed else None, max_tokens_limit=64)
        app = create_app(engine, config)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        started.append((server, thread, engine))
        for _ in range(400):
            if server.started:
                break
            time.sleep(0.05)
        return f"127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"

    yield start
    for server, thread, engine in started:
        server.should_exit = True
        thread.join(timeout=10)
        engine.close()


def test_every_page_with_python_is_covered():
    """A new page with python blocks must get a test here (or skip markers)."""
    covered = {"README.md", "docs/python-api.md", "docs/learners.md", "docs/serving.md", "docs/exports.md"}
    assert set(pages_with_python()) <= covered, set(pages_with_python()) - covered


def test_readme_and_python_guide_examples(tiny_everywhere, serve_tone):
    """The README's examples (the Python run and steering, serving with openai and curl),
    then the Python guide's in the same folder: both fit ``runs/demo`` with the same
    settings, so the guide's ``fit`` resumes the finished run instead of running it again."""
    host = serve_tone()
    namespace = run_page(ROOT / "README.md", replace={"127.0.0.1:8000": host})
    assert namespace["reply"].choices[0].message.content is not None
    assert Path("runs/demo/final").is_dir()
    _run_curl_blocks(ROOT / "README.md", host)
    summary = Path("runs/demo/summary.json").read_bytes()
    guide = run_page(ROOT / "docs" / "python-api.md")
    assert Path("runs/demo/summary.json").read_bytes() == summary  # resumed, not redone
    assert guide["spec"].learner["name"] == "caa"
    assert guide["judge"].describe()["api_key_env"] == "OPENAI_API_KEY"


def test_serving_examples(tiny_everywhere, serve_tone):
    host = serve_tone()
    namespace = run_page(ROOT / "docs" / "serving.md", replace={"127.0.0.1:8000": host})
    assert namespace["reply"].choices[0].message.content is not None
    _run_curl_blocks(ROOT / "docs" / "serving.md", host)


def _run_curl_blocks(page: Path, host: str) -> None:
    """Each bash block's curl command, as written, against the server (key from $SIMS_KEY)."""
    ran = 0
    for _, code in blocks(page, "bash"):
        start = code.find("curl ")
        if start < 0:
            continue
        command = code[start:].replace("127.0.0.1:8000", host)
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert '"chat.completion"' in done.stdout, done.stdout
        ran += 1
    assert ran, f"{page} has no curl example"


def test_curl_without_json_content_type_gets_415_from_a_server_without_a_key(serve_tone):
    """What the docs warn about: curl's default content type is refused by an open server."""
    host = serve_tone(keyed=False)
    body = '{"model": "simsteer", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    done = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://{host}/v1/chat/completions",
         "-d", body],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.stdout == "415"


def learner_example() -> str:
    """The ``mean_shift.py`` of docs/learners.md's "Adding a learner"."""
    marked = [code for marker, code in blocks(ROOT / "docs" / "learners.md") if "mean_shift.py" in marker]
    assert len(marked) == 1
    return marked[0]


def test_adding_a_learner_runs_from_the_cli_and_resumes_only_when_named(tiny_model_dir, tmp_path, capsys):
    """docs/learners.md's learner, saved as a file, through `sims run --learner python:FILE:CLASS`."""
    from simsteer.loop import RunDir

    (tmp_path / "mean_shift.py").write_text(learner_example(), encoding="utf-8")
    out = tmp_path / "run"
    os.chdir(tmp_path)
    try:
        learner = ["--learner", "python:mean_shift.py:MeanShift", "-L", "fraction=0.02"]
        base = ["run", "--model", str(tiny_model_dir), "--oracle", "length:3", "--layers", "1-2"]
        assert main([*base, *learner, "--out", str(out), *TINY_RUN]) == 0
    finally:
        os.chdir(ROOT)
    spec = RunDir(out).spec()
    assert spec.learner["name"] == f"python:{tmp_path / 'mean_shift.py'}:MeanShift"
    assert spec.learner["fraction"] == 0.02
    assert (out / "iter_1" / "steering").is_dir() or (out / "final").is_dir()
    capsys.readouterr()
    assert main(["run", "--resume", str(out)]) == 2  # a run directory may have been edited: ask first
    err = capsys.readouterr().err
    assert "--learner python:" in err and len(err.strip().splitlines()) == 1
    typed = ["--learner", f"python:{tmp_path / 'mean_shift.py'}:MeanShift"]
    assert main(["run", "--resume", str(out), *typed, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["baseline", "random", "--like", str(out), "-o", str(tmp_path / "random")]) == 2
    assert "its learner python:" in capsys.readouterr().err  # never imported from a run directory
    assert not (tmp_path / "random").exists()


def test_learners_page_example_fits_a_fluent_scale(tiny_everywhere):
    """The example's vectors have the asked length: a fraction of the layer's token norm."""
    from simsteer.activations import PreferenceActivations

    namespace = run_page(ROOT / "docs" / "learners.md")
    learner = namespace["MeanShift"](fraction=0.05)
    pos, neg = torch.randn(4, 2, 8) * 10 + 3, torch.randn(4, 2, 8) * 10
    data = PreferenceActivations(
        layers=[1, 2],
        positive=pos,
        negative=neg,
        positive_groups=[0, 0, 1, 1],
        negative_groups=[0, 0, 1, 1],
        token_norms=torch.tensor([10.0, 20.0]),
    )
    steering = learner.fit(data, tiny_everywhere.fingerprint())
    lengths = [float(steering.functions[layer].vector.norm()) for layer in (1, 2)]
    assert lengths == pytest.approx([0.5, 1.0], rel=1e-5)


@pytest.mark.slow
def test_exports_page_example(embedded_lm, monkeypatch, tmp_path):
    """docs/exports.md's llama-cpp-python example, with tone.gguf exported from a real policy."""
    pytest.importorskip("llama_cpp")
    from simsteer.export import export_policy
    from simsteer.policy import load_policy

    policy = load_policy(ROOT / "tests" / "fixtures" / "smollm2_caa")
    export_policy(policy, embedded_lm, "gguf-cvec", tmp_path / "tone.gguf")
    monkeypatch.chdir(tmp_path)
    namespace = run_page(ROOT / "docs" / "exports.md")
    assert namespace["reply"]["choices"][0]["message"]["content"]
