"""Forge request templates and forge-config.toml: parsing, errors that name the problem, seeded rendering."""
# ruff: noqa: E501  (the documented example config keeps its long body line)

from __future__ import annotations

import random
import re
import uuid
from pathlib import Path

import pytest

from aether.core.errors import BadRequest
from aether.forge.config import ForgeConfigError, load_forge_config, parse_forge_config
from aether.forge.templates import TemplateError, compile_template

EXAMPLE = """\
[forge]
nodes = 5
port = 8888
blueprint = "examples/order_demo/demo-order.blueprint"
wheels = "build/examples/order_demo"

[load]
rate = 50
paused = false
max_in_flight = 128

[[load.schedule]]
at = 30
rate = 200
ramp = 10

[[load.targets]]
name = "place-order"
method = "POST"
path = "/api/orders"
weight = 3
headers = { "Content-Type" = "application/json" }
body = '{"customerId": "CUST-${range:1:500}", "items": [{"productId": "PROD-STICKER", "quantity": ${range:1:3}}]}'
expect = [200, 201]
capture = true

[[load.targets]]
name = "get-price"
path = "/api/pricing/${choice:PROD-STICKER,PROD-MUG}"
"""


def test_the_documented_example_parses_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    f = tmp_path / "forge-config.toml"
    f.write_text(EXAMPLE)
    cfg = load_forge_config(f)
    assert cfg.forge.nodes == 5 and cfg.forge.port == 8888
    assert cfg.forge.blueprint == str(tmp_path / "examples/order_demo/demo-order.blueprint")
    assert cfg.forge.wheels == str(tmp_path / "build/examples/order_demo")
    load = cfg.load
    assert load.rate == 50 and not load.paused and load.max_in_flight == 128 and load.timeout == 10.0
    assert [(s.at, s.rate, s.ramp) for s in load.schedule] == [(30, 200, 10)]
    po, gp = load.targets
    assert (po.name, po.method, po.weight, po.expect, po.capture) == (
        "place-order",
        "POST",
        3,
        [200, 201],
        True,
    )
    assert po.is_success(201) and not po.is_success(204)
    assert (gp.method, gp.weight, gp.expect) == ("GET", 1.0, None)
    assert gp.is_success(204) and not gp.is_success(302)


def test_an_empty_config_is_valid() -> None:
    cfg = parse_forge_config("", "f.toml")
    assert cfg.load.targets == [] and cfg.load.rate == 0 and cfg.forge.nodes is None


def _error(text: str) -> str:
    with pytest.raises(ForgeConfigError) as e:
        parse_forge_config(text, "my-forge.toml")
    assert isinstance(e.value, BadRequest)
    return str(e.value)


def test_unknown_keys_are_named_with_their_line() -> None:
    msg = _error(EXAMPLE.replace("weight = 3\n", "weight = 3\nwieght = 2\n"))
    assert msg.startswith("my-forge.toml:")
    assert "unknown key 'load.targets[0].wieght'" in msg
    line = int(msg.split(":")[1])
    assert EXAMPLE.replace("weight = 3\n", "weight = 3\nwieght = 2\n").splitlines()[line - 1] == "wieght = 2"
    assert "unknown key 'forge.colour'" in _error("[forge]\ncolour = 1\n")
    assert "unknown key 'lod'" in _error("[lod]\nrate = 1\n")


@pytest.mark.parametrize("number", ["inf", "-inf", "nan", "+inf"])
def test_non_finite_numbers_are_refused_naming_the_key_and_line(number: str) -> None:
    """`rate = inf` passed `>= 0` (a load that never paces), `nan` every comparison."""
    msg = _error(f"[load]\nrate = 1\n\n[[load.schedule]]\nat = 0\nrate = {number}\n")
    assert msg.startswith("my-forge.toml:6: load.schedule[0].rate = ") and "not a finite number" in msg
    assert "load.rate = inf" in _error("[load]\nrate = inf\n")


def test_bad_values_name_the_key() -> None:
    msg = _error("[load]\nrate = -5\n")
    assert msg.startswith("my-forge.toml:2: load.rate:") and ">= 0" in msg
    assert "load.targets[0].weight" in _error(EXAMPLE.replace("weight = 3", 'weight = "heavy"'))
    assert "load.max_in_flight" in _error("[load]\nmax_in_flight = 0\n")
    assert "load.targets[1].method: unknown HTTP method 'FETCH'" in _error(EXAMPLE + 'method = "FETCH"\n')
    assert "duplicate target name 'place-order'" in _error(EXAMPLE.replace('"get-price"', '"place-order"'))
    assert "must start with '/'" in _error(EXAMPLE.replace('path = "/api/orders"', 'path = "api/orders"'))
    msg = _error(EXAMPLE.replace("ramp = 10", "ramp = 10\n[[load.schedule]]\nat = 10\nrate = 5"))
    assert "load.schedule[1].at: steps must be in time order" in msg
    assert "not valid TOML" in _error("[load\n")


def test_the_line_is_the_one_in_the_right_table() -> None:
    text = EXAMPLE.replace("ramp = 10", "ramp = 10\n\n[[load.schedule]]\nat = 40\nrate = -1")
    msg = _error(text)
    line = int(msg.split(":")[1])
    assert "load.schedule[1].rate" in msg and text.splitlines()[line - 1] == "rate = -1"
    text = EXAMPLE + 'weight = "x"\n'
    msg = _error(text)
    assert msg.startswith(f"my-forge.toml:{len(text.splitlines())}: load.targets[1].weight:")


def test_a_bad_template_names_the_target_and_the_placeholder() -> None:
    msg = _error(EXAMPLE.replace("${range:1:3}", "${range:3:1}"))
    assert "load.targets[0] (place-order).body" in msg and "${range:3:1}" in msg and "empty" in msg
    msg = _error(EXAMPLE.replace("${choice:PROD-STICKER,PROD-MUG}", "${pick:a}"))
    assert "load.targets[1] (get-price).path" in msg and "${pick:a}" in msg and "unknown placeholder" in msg
    msg = _error(EXAMPLE.replace('"Content-Type" = "application/json"', '"X-Id" = "${uuid"'))
    assert "headers.X-Id" in msg and "unterminated" in msg


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("${range:1}", "range:A:B"),
        ("${range:a:b}", "range:A:B"),
        ("${range:5:4}", "empty"),
        ("${choice:}", "no empty value"),
        ("${choice:a,,b}", "no empty value"),
        ("${choice}", "no empty value"),
        ("${random:0}", "1 <= N"),
        ("${random:x}", "1 <= N"),
        ("${random}", "1 <= N"),
        ("${uuid:4}", "no argument"),
        ("${nope}", "unknown placeholder"),
        ("abc ${uuid", "unterminated"),
    ],
)
def test_template_errors(text: str, why: str) -> None:
    with pytest.raises(TemplateError) as e:
        compile_template(text, "t.body")
    assert str(e.value).startswith("t.body: ") and why in str(e.value)


def test_seeded_rendering_is_reproducible_and_in_range() -> None:
    t = compile_template("/o/${uuid}?c=${range:-2:3}&p=${choice:a,bb,ccc}&r=${random:12}&$$x=$1")
    assert not t.constant
    a = [t.render(random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng = random.Random(42)
    seen_range: set[int] = set()
    seen_choice: set[str] = set()
    pat = re.compile(r"^/o/([0-9a-f-]{36})\?c=(-?\d+)&p=(\w+)&r=([A-Za-z0-9]{12})&\$x=\$1$")
    for _ in range(500):
        m = pat.match(t.render(rng))
        assert m is not None
        u = uuid.UUID(m.group(1))
        assert u.version == 4
        seen_range.add(int(m.group(2)))
        seen_choice.add(m.group(3))
    assert seen_range == {-2, -1, 0, 1, 2, 3}
    assert seen_choice == {"a", "bb", "ccc"}
    # another seed gives other values
    assert t.render(random.Random(8)) != a[0]


def test_a_template_without_placeholders_is_constant() -> None:
    t = compile_template('{"a": 1, "cost": "$5"}')
    assert t.constant and t.render(random.Random()) == '{"a": 1, "cost": "$5"}'


def test_the_example_in_docs_forge_md_parses() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "forge.md").read_text()
    start = doc.index("```toml\n[forge]")
    text = doc[start + len("```toml\n") : doc.index("```", start + 7)]
    cfg = parse_forge_config(text, "docs/forge-config.toml")
    assert [t.name for t in cfg.load.targets] == ["place-order", "get-price", "get-inventory"]
    assert cfg.load.max_in_flight == 256 and len(cfg.load.schedule) == 2
    assert cfg.forge.blueprint == "docs/examples/order_demo/demo-order.blueprint"


def test_the_demo_config_sends_a_fresh_idempotency_key_with_every_order() -> None:
    from aether.forge.config import compile_target

    root = Path(__file__).resolve().parents[1]
    cfg = load_forge_config(root / "examples" / "order_demo" / "forge-config.toml")
    (po,) = [t for t in cfg.load.targets if t.name == "place-order"]
    tpl = compile_target(po)
    rng = random.Random(7)
    keys = [tpl.headers["Idempotency-Key"].render(rng) for _ in range(50)]
    assert len(set(keys)) == 50
    assert all(uuid.UUID(k).version == 4 for k in keys)
    assert re.fullmatch(r"[A-Za-z0-9._:@+=/-]{1,128}", keys[0])  # what the HTTP router accepts
