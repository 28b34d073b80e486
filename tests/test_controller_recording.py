"""Recording the controller's observations and replaying them offline (`aether controller replay`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from aether.cli.main import main as cli
from aether.controller.config import parse_config
from aether.controller.recording import ObservationRecorder, read_recording, replay
from controller_model import SliceModel, step_rate

T0 = 1_000_000.0


def record(path: Path, seconds: int = 120, **kw: object) -> list:
    """Record the observations of the fluid model driven by a live controller."""
    m = SliceModel(rate=step_rate(T0, 40, 400, 20, 60), max_queue=1000)
    rec = ObservationRecorder(path, **kw)  # type: ignore[arg-type]
    out = []
    from aether.controller.core import Controller

    c = Controller(parse_config(""))
    for _ in range(seconds):
        obs = m.tick()
        rec.add(obs)
        out.append(obs)
        m.apply(c.step(obs))
    rec.close()
    return out


def test_a_recording_replays_to_the_same_decisions(tmp_path: Path) -> None:
    path = tmp_path / "obs.jsonl"
    observed = record(path)
    back = list(read_recording(path))
    assert back == observed
    live = replay(observed, parse_config(""))
    again = replay(back, parse_config(""))
    assert [(d.time, d.kind, d.to_count) for d in live] == [(d.time, d.kind, d.to_count) for d in again]
    assert [d.kind for d in live if d.kind.startswith("scale")] == ["scale_up", "scale_down"]
    # another configuration on the same observations: a surge must be 5x the count to take the
    # panic path, so at the moment the live controller scaled at once, this one waits. (Open loop:
    # the recorded counts then already follow the live decision, so the replay shows no more.)
    first_live = next(d for d in live if d.kind == "scale_up")
    assert first_live.rule == "panic"
    calm = replay(back, parse_config("[scaling]\npanic_threshold = 5"))
    assert not [d for d in calm if d.rule == "panic"]
    assert not [d for d in calm if d.kind == "scale_up" and d.time <= first_live.time]


def test_the_recorder_stops_at_its_limit(tmp_path: Path) -> None:
    path = tmp_path / "obs.jsonl"
    record(path, seconds=50, max_bytes=10_000)
    size = path.stat().st_size
    assert 0 < size <= 10_000
    assert len(list(read_recording(path))) == len(path.read_bytes().splitlines())


def test_cli_replay_prints_the_decisions_and_names_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "obs.jsonl"
    record(path)
    runner = CliRunner()
    r = runner.invoke(cli, ["controller", "replay", str(path)])
    assert r.exit_code == 0, r.output
    assert "scale_up" in r.output or "scale up" in r.output
    r = runner.invoke(cli, ["controller", "replay", str(path), "--json"])
    assert r.exit_code == 0, r.output
    docs = json.loads(r.stdout)
    assert [d["kind"] for d in docs if d["kind"].startswith("scale")] == ["scale_up", "scale_down"]
    cfg = tmp_path / "c.toml"
    cfg.write_text("[scaling]\ntolerance = 7\n")
    r = runner.invoke(cli, ["controller", "replay", str(path), "--config", str(cfg)])
    assert r.exit_code != 0 and "tolerance" in r.output and str(cfg) in r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"time": 1}\nnot json\n')
    r = runner.invoke(cli, ["controller", "replay", str(bad)])
    assert r.exit_code != 0 and "bad.jsonl:1" in r.output


DATA = Path(__file__).parent / "data" / "controller"


def test_a_recorded_bench_step_replays_to_one_scale_up_and_one_scale_down() -> None:
    """A real recording: the leader of `bench/autoscale_bench.py` (3 node processes, 50 ms calls,
    max_concurrency 8, in_flight target 6, 40 -> 400 -> 40 calls/s) with `--controller-record`.
    Replayed with the default configuration it decides what the live controller decided: the
    surge at once (3 instances on the second that straddled the step, the 4 the load needs on the
    next), then back to 1 after the stabilization, in one step."""
    obs = list(read_recording(DATA / "bench-step-40-400-40.jsonl.gz"))
    assert len(obs) == 135
    scaled = [d for d in replay(obs, parse_config("")) if d.kind.startswith("scale")]
    assert [(d.kind, d.from_count, d.to_count, d.rule) for d in scaled] == [
        ("scale_up", 1, 3, "panic"), ("scale_up", 3, 4, "panic"), ("scale_down", 4, 1, "target:in_flight"),
    ]
    assert scaled[1].time - scaled[0].time == pytest.approx(1.0, abs=0.05)
    first_busy = next(o for o in obs if o.slices and o.slices[0].load and o.slices[0].load.queued > 0)
    assert scaled[0].time - first_busy.time <= 1.0  # on the first second the surge shows in
    # a calmer configuration (surges must be 5x) holds at that second: the replay shows it
    calm = replay(obs, parse_config("[scaling]\npanic_threshold = 5"))
    assert not [d for d in calm if d.kind == "scale_up" and d.time <= scaled[0].time]
