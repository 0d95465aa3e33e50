"""config.json as a RunSpec: the current format round-trips, the format written by
simsteer 0.1.0 is read, any other is refused with one line; a resume names every
setting that differs from the saved run."""

from __future__ import annotations

import dataclasses
import json

import pytest

from simsteer.errors import SimsError
from simsteer.loop.config import SIMSConfig
from simsteer.loop.spec import RUN_FORMAT_VERSION, ModelSpec, RunSpec

from .test_loop_records import OLD_RUN


def _spec(**kw) -> RunSpec:
    base = dict(
        model=ModelSpec("/models/tiny", "float32", "cpu", False, {"architecture": "LlamaForCausalLM"}),
        oracle={"name": "judge", "model": "m", "template": "helpful"},
        learner={"name": "caa", "layers": "1-2", "coefficient": 0.5},
        layers=[1, 2],
        sims=SIMSConfig(iterations=2, samples_per_prompt=3),
        prompts={"prompts": "/data/prompts.txt"},
        simsteer_version="0.2.0",
    )
    return RunSpec(**{**base, **kw})


def test_round_trip():
    spec = _spec(extra={"baseline": "random", "like": "runs/sims"})
    data = json.loads(json.dumps(spec.to_json()))
    assert list(data)[:2] == ["format_version", "simsteer_version"]
    assert data["format_version"] == RUN_FORMAT_VERSION and data["baseline"] == "random"
    assert RunSpec.from_json(data) == spec
    with pytest.raises(SimsError, match="may not replace sims"):
        _spec(extra={"sims": {}}).to_json()


def test_reads_format_1():
    data = json.loads((OLD_RUN / "config.json").read_text())
    assert "format_version" not in data and "cli" in data
    spec = RunSpec.from_json(data)
    assert spec.format_version == 1 and spec.simsteer_version == "0.1.0"
    assert spec.model.dtype == "float32" and spec.model.device == "" and not spec.model.trust_remote_code
    assert spec.model.fingerprint["num_layers"] == 4
    assert spec.sims == SIMSConfig.from_dict(data["sims"]) and spec.layers == [1, 2]
    assert spec.extra == {}  # the parser namespace is not carried over
    data["cli"] = {**data["cli"], "device": "cuda:0", "trust_remote_code": True}
    model = RunSpec.from_json(data).model
    assert model.device == "cuda:0" and model.trust_remote_code


@pytest.mark.parametrize("version", [3, "2"])
def test_other_format_refused_in_one_line(version):
    data = {**_spec().to_json(), "format_version": version}
    with pytest.raises(SimsError) as err:
        RunSpec.from_json(data)
    assert repr(version) in str(err.value) and "\n" not in str(err.value)


def test_mismatches_name_each_field_with_both_values():
    saved = _spec()
    now = _spec(
        sims=dataclasses.replace(saved.sims, iterations=3),
        oracle={**saved.oracle, "template": "concise"},
        model=dataclasses.replace(saved.model, dtype="bfloat16", device="cuda:0"),
    )
    assert saved.mismatches(saved) == []
    assert saved.mismatches(now) == [
        "sims.iterations: saved 2, now 3",
        "oracle.template: saved 'helpful', now 'concise'",
        "model.dtype: saved 'float32', now 'bfloat16'",
    ]  # the device may change on resume
    # A format-1 spec is compared on the keys both sides describe.
    old = dataclasses.replace(saved, format_version=1, oracle={"name": "judge"})
    assert old.mismatches(saved) == []
    assert old.mismatches(_spec(oracle={"name": "sentiment"})) == [
        "oracle.name: saved 'judge', now 'sentiment'"
    ]
