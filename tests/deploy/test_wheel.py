"""What `pip install .` puts on a router's import path: the product's packages and the
`serval` command, nothing of the checkout's lab, benchmarks, fuzzers or tests (they run
from a checkout: `python -m lab.demo`, `python -m bench.run`, pytest)."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PRODUCT = {"sal", "gateway", "nat", "router", "dns_resolver", "serval"}


def test_the_wheel_holds_the_product_and_nothing_else():
    from setuptools.config.setupcfg import read_configuration

    # setuptools' own reading of setup.cfg: `packages = find:` resolved in the checkout
    options = read_configuration(str(REPO / "setup.cfg"))["options"]
    packages = options["packages"]
    assert {p.split(".")[0] for p in packages} == PRODUCT
    # every package of the product, subpackages included, and none left behind
    on_disk = {str(d.parent.relative_to(REPO)).replace("/", ".")
               for top in PRODUCT for d in (REPO / top).rglob("__init__.py")}
    assert set(packages) == on_disk
    assert options["entry_points"]["console_scripts"] == ["serval = serval.cli:main"]
    assert any(r.startswith("prometheus_client") for r in options["install_requires"])
