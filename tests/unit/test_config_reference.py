"""docs/configuration.md cannot go stale: it is checked against the loaders themselves.

Every example in the page is loaded by the real loaders (``load_bootstrap``, ``parse_mesh``)
while ``Fields.raw`` is watched, which is where every section reads every key it accepts
(``Fields.done()`` calls any key not read that way unknown). So the keys read are exactly the
keys the loaders accept, and the test asserts, both ways, that they are the page's rows; that
every row appears in an example; and that a default written as code is the loader's default
(the example with the key removed loads to the same config as with the key set to it).
"""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sidecar.config.load import load_bootstrap, parse_mesh, parse_yaml
from sidecar.config.reader import ConfigError, Fields

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

# Mappings whose keys are names the user chooses: the doc writes the placeholder.
MAPS = {"services": "<service>", "jwt_providers": "<provider>", "api_keys": "<key>",
        "claims_to_headers": "<claim>", "claims": "<claim>", "headers": "<header>",
        "weights": "<address>"}
# Sections read by the same parser as another: the doc lists their keys once.
ALIASES = {
    "services.<service>.routes[].retries": "services.<service>.retries",
    "services.<service>.policy.rules[].deny": "services.<service>.policy.rules[].allow",
    "services.<service>.policy.rules[].unless": "services.<service>.policy.rules[].allow",
}
_CODE = re.compile(r"`([^`]+)`")
_INDEX = re.compile(r"\[\d+\]")


# === the page ==============================================================================


@dataclass(frozen=True, slots=True)
class Row:
    kind: str  # "sidecar" | "mesh"
    key: str  # full dotted path, placeholders for names, [] for list items
    default: str  # the default cell as written


@dataclass(slots=True)
class Page:
    rows: list[Row] = field(default_factory=list)
    examples: list[tuple[str, str]] = field(default_factory=list)  # (kind, YAML text)


def _cells(line: str) -> list[str]:
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def parse_page(text: str) -> Page:
    """Rows of every ``| key | default | meaning |`` table under the ``## sidecar.yaml`` or
    ``## mesh.yaml`` heading; a ``### `prefix` `` heading prefixes its table's keys. Examples
    are the YAML blocks after ``<!-- example: sidecar|mesh -->``."""
    page = Page()
    kind: str | None = None
    prefix = ""
    in_table = False
    pending: str | None = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            kind = "sidecar" if "sidecar.yaml" in line else "mesh" if "mesh.yaml" in line else None
            prefix = ""
        elif line.startswith("### "):
            code = _CODE.search(line)
            prefix = code.group(1) if code else ""
        elif m := re.match(r"<!-- example: (sidecar|mesh) -->", line):
            pending = m.group(1)
        elif line.startswith("```yaml") and pending is not None:
            end = lines.index("```", i + 1)
            page.examples.append((pending, "\n".join(lines[i + 1:end])))
            pending, i = None, end
        elif line.startswith("|") and kind is not None:
            cells = _cells(line)
            if cells and cells[0] == "key":
                in_table = True
            elif in_table and not set(cells[0]) <= {"-", " "}:
                key = _CODE.fullmatch(cells[0])
                assert key is not None, f"configuration.md: a key cell must be one code span: {line}"
                full = f"{prefix}.{key.group(1)}" if prefix else key.group(1)
                page.rows.append(Row(kind, full, cells[1]))
        else:
            in_table = False
        i += 1
    return page


# === the loaders, watched ==================================================================


def normalize(path: str, key: str) -> str:
    """``services.orders.routes[0].match`` + ``path`` -> ``services.<service>.routes[].match.path``."""
    out: list[str] = []
    previous = ""
    for segment in [*(path.split(".") if path else []), key]:
        name = MAPS[previous] if previous in MAPS else _INDEX.sub("[]", segment)
        out.append(name)
        previous = name
    full = ".".join(out)
    for alias, canonical in ALIASES.items():
        if full.startswith(alias + "."):
            full = canonical + full[len(alias):]
    return full


@dataclass(slots=True)
class Reads:
    read: set[str] = field(default_factory=set)  # every key a loader asked for
    present: set[str] = field(default_factory=set)  # ... and was there in the example


def loader(kind: str, tmp: Path) -> Callable[[Any], object]:
    def load_sidecar(data: Any) -> object:
        path = tmp / "sidecar.yaml"
        path.write_text(json.dumps(data), encoding="utf-8")  # JSON is YAML, and quick to write
        return load_bootstrap(path)

    def load_mesh(data: Any) -> object:
        return parse_mesh(copy.deepcopy(data), source="mesh.yaml", version="doc")

    return load_sidecar if kind == "sidecar" else load_mesh


@dataclass(slots=True)
class Checked:
    page: Page
    reads: dict[str, Reads]
    errors: list[str]


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> Checked:
    page = parse_page(DOC.read_text(encoding="utf-8"))
    reads = {"sidecar": Reads(), "mesh": Reads()}
    current: list[Reads] = []
    original = Fields.raw
    errors = []
    tmp = tmp_path_factory.mktemp("config_reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Fields, "raw", _spy(original, reads, current))
        for n, (kind, text) in enumerate(page.examples):
            current.append(reads[kind])
            try:
                loader(kind, tmp)(parse_yaml(text))
            except ConfigError as exc:
                errors.append(f"example {n + 1} ({kind}): {exc}")
            finally:
                current.pop()
    return Checked(page, reads, errors)


def _spy(original: Callable[..., Any], reads: dict[str, Reads],
         current: list[Reads]) -> Callable[..., Any]:
    """``Fields.raw`` that also notes the key: the real method still does the reading."""

    def raw(self: Fields, key: str, *args: Any, **kwargs: Any) -> Any:
        if current:
            full = normalize(self.path, str(key))
            current[-1].read.add(full)
            if key in self.data:
                current[-1].present.add(full)
        return original(self, key, *args, **kwargs)

    return raw


# === the checks ============================================================================


def documented(page: Page, kind: str) -> set[str]:
    return {r.key for r in page.rows if r.kind == kind}


def test_every_example_loads(checked: Checked) -> None:
    kinds = [kind for kind, _ in checked.page.examples]
    assert kinds.count("sidecar") >= 1 and kinds.count("mesh") >= 1
    assert checked.errors == []


@pytest.mark.parametrize("kind", ["sidecar", "mesh"])
def test_every_key_the_loaders_accept_is_documented(checked: Checked, kind: str) -> None:
    missing = checked.reads[kind].read - documented(checked.page, kind)
    assert not missing, f"keys the {kind} loader reads but configuration.md lacks: {sorted(missing)}"


@pytest.mark.parametrize("kind", ["sidecar", "mesh"])
def test_every_documented_key_is_one_the_loaders_accept(checked: Checked, kind: str) -> None:
    extra = documented(checked.page, kind) - checked.reads[kind].read
    assert not extra, f"rows of configuration.md no {kind} loader reads: {sorted(extra)}"


@pytest.mark.parametrize("kind", ["sidecar", "mesh"])
def test_every_documented_key_appears_in_an_example(checked: Checked, kind: str) -> None:
    absent = documented(checked.page, kind) - checked.reads[kind].present
    assert not absent, f"rows of configuration.md that no {kind} example shows: {sorted(absent)}"


def test_no_key_is_documented_twice(checked: Checked) -> None:
    counts = Counter((r.kind, r.key) for r in checked.page.rows)
    assert [key for key, n in counts.items() if n > 1] == []


def test_a_dropped_row_is_noticed(checked: Checked) -> None:
    """The check is not vacuous: the page without one row misses exactly that key."""
    text = DOC.read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| `max_pipelined` |"))
    page = parse_page(text.replace(row + "\n", ""))
    assert checked.reads["sidecar"].read - documented(page, "sidecar") == {"limits.max_pipelined"}


# --- defaults -------------------------------------------------------------------------------


def _parents(data: Any, segments: list[str], steps: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The concrete locations (steps into ``data``) of every mapping the pattern names."""
    if not segments:
        if isinstance(data, dict):
            yield steps
        return
    head, rest = segments[0], segments[1:]
    if not isinstance(data, dict):
        return
    if head.startswith("<"):
        for name, value in data.items():
            yield from _parents(value, rest, (*steps, name))
    elif head.endswith("[]"):
        items = data.get(head[:-2])
        for i, item in enumerate(items if isinstance(items, list) else []):
            yield from _parents(item, rest, (*steps, head[:-2], i))
    elif head in data:
        yield from _parents(data[head], rest, (*steps, head))


def _at(data: Any, steps: tuple[Any, ...]) -> Any:
    for step in steps:
        data = data[step]
    return data


def _only(mesh: dict[str, Any], service: str | None) -> dict[str, Any]:
    """The mesh with every service but ``service`` emptied (names kept, so routes still
    resolve): a row's check then loads one service, not all (the JSON Schema check is slow)."""
    services = mesh.get("services") or {}
    return {**mesh, "services": {name: value if name == service else {}
                                 for name, value in services.items()}}


def checkable_defaults(page: Page) -> list[Row]:
    """Rows whose default is one code span naming a value (not a placeholder)."""
    return [r for r in page.rows
            if (m := _CODE.fullmatch(r.default)) and "<" not in m.group(1)
            and not r.key.rsplit(".", 1)[-1].startswith("<")]


def test_documented_defaults_are_the_loaders(checked: Checked, tmp_path: Path) -> None:
    examples = [(kind, parse_yaml(text)) for kind, text in checked.page.examples]
    rows = checkable_defaults(checked.page)
    assert len(rows) > 100  # most rows give their default as a value
    wrong = []
    for row in rows:
        parent, _, key = row.key.rpartition(".")
        segments = parent.split(".") if parent else []
        places = [(kind, data, steps) for kind, data in examples if kind == row.kind
                  for steps in _parents(data, segments)]
        places.sort(key=lambda p: key not in _at(p[1], p[2]))  # where the key is given first
        if not places:
            wrong.append(f"{row.key}: no example has its section")
            continue
        kind, data, steps = places[0]
        if kind == "mesh":
            data = _only(data, steps[1] if steps[:1] == ("services",) else None)
        load = loader(kind, tmp_path)
        without, with_default = copy.deepcopy(data), copy.deepcopy(data)
        _at(without, steps).pop(key, None)
        _at(with_default, steps)[key] = parse_yaml(_CODE.fullmatch(row.default).group(1))  # type: ignore[union-attr]
        try:
            if load(without) != load(with_default):
                wrong.append(f"{row.key}: the default is not {row.default}")
        except ConfigError as exc:
            wrong.append(f"{row.key}: {exc}")
    assert wrong == []
