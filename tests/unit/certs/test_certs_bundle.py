"""Trust bundles: merge for CA rotation, list, write, refuse non-CA certificates."""

from __future__ import annotations

from pathlib import Path

import pytest

from certs.bundle import TrustBundle
from certs.describe import fingerprint
from certs.pem import PemError
from tests.helpers.pki import make_test_pki


@pytest.fixture
def two_roots(tmp_path: Path) -> tuple[Path, Path]:
    old = make_test_pki(tmp_path / "old", services=())
    new = make_test_pki(tmp_path / "new", services=())
    return old.bundle, new.bundle


def test_load_and_entries(two_roots: tuple[Path, Path]) -> None:
    bundle = TrustBundle.load(two_roots[0])
    (entry,) = bundle.entries()
    assert entry.subject == "CN=PAKE Mesh Root CA,O=pake.local"
    assert entry.fingerprint == fingerprint(bundle.roots[0])
    assert len(entry.fingerprint) == 32 * 3 - 1
    assert entry.not_before < entry.not_after


def test_merge_keeps_order_and_drops_duplicates(two_roots: tuple[Path, Path]) -> None:
    old, new = (TrustBundle.load(p) for p in two_roots)
    merged = old.merge(new, old, new)
    assert merged.roots == (old.roots[0], new.roots[0])
    assert TrustBundle.merge_files([*two_roots, two_roots[0]]) == merged


def test_write_and_reload(tmp_path: Path, two_roots: tuple[Path, Path]) -> None:
    merged = TrustBundle.merge_files(two_roots)
    out = tmp_path / "bundle.pem"
    merged.write(out)
    assert out.stat().st_mode & 0o777 == 0o644
    assert TrustBundle.load(out) == merged
    assert TrustBundle.from_pem(merged.to_pem()) == merged


def test_leaf_in_bundle_is_refused(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki", services=("orders",))
    with pytest.raises(PemError) as info:
        TrustBundle.load(pki.services["orders"].cert)
    assert str(info.value).startswith(f"{pki.services['orders'].cert}: CN=orders is not a CA")


def test_missing_bundle_names_file(tmp_path: Path) -> None:
    with pytest.raises(PemError, match=f"^{tmp_path / 'x.pem'}: file is missing$"):
        TrustBundle.load(tmp_path / "x.pem")


def test_empty_bundle_is_not_allowed() -> None:
    with pytest.raises(ValueError):
        TrustBundle(())
    with pytest.raises(ValueError):
        TrustBundle.merge_files([])
