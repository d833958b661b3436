"""SLO classes: parsing a classes file, defaults, and a request's objectives."""

from __future__ import annotations

import pytest

from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.slo import SloClass, SloClasses, ValidSlo
from pdserve.router.validation import RequestError, validate_slo

FILE = {
    "default": "standard",
    "classes": {
        "interactive": {"ttft_ms": 500, "tpot_ms": 50, "priority": 2},
        "standard": {"ttft_ms": 2000, "tpot_ms": 100, "priority": 1},
        "batch": {"priority": 0, "best_effort": True},
    },
}


def test_a_classes_file_reads() -> None:
    classes = SloClasses.from_mapping(FILE)
    assert classes.names == ("interactive", "standard", "batch")
    assert classes.default == "standard"
    assert classes.get("") == classes.get("standard") == SloClass("standard", 2000, 100, 1)
    assert classes.get("nope") is None
    assert classes.with_default("batch").get("") == SloClass("batch", best_effort=True)


def test_a_request_names_a_class_or_overrides_its_objectives() -> None:
    classes = SloClasses.from_mapping(FILE)
    assert validate_slo(pb.Slo(), classes) == ValidSlo(2000, 100, "standard", 1)
    assert validate_slo(pb.Slo(class_name="interactive", tpot_ms=80), classes) == \
        ValidSlo(500, 80, "interactive", 2)
    assert validate_slo(pb.Slo(class_name="batch"), classes) == \
        ValidSlo(None, None, "batch", 0, True)
    with pytest.raises(RequestError, match=r"slo.class_name 'gold' is not an SLO class.*"
                                           r"interactive, standard, batch"):
        validate_slo(pb.Slo(class_name="gold"), classes)


@pytest.mark.parametrize("raw, match", [
    ({"classes": {}}, "'classes' must map"),
    ({"classes": {"a": {"ttft_ms": -1}}}, "ttft_ms must be a number > 0"),
    ({"classes": {"a": {"priority": 1.5}}}, "priority must be an integer"),
    ({"classes": {"a": {"deadline": 3}}}, "takes only the keys"),
    ({"classes": {"a": {}, "b": {}}}, "name the default one"),
    ({"default": "c", "classes": {"a": {}, "b": {}}}, "default SLO class 'c' is none of a, b"),
    ({"klasses": {}}, "expected a mapping with keys"),
])
def test_bad_classes_files_name_the_problem(raw: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SloClasses.from_mapping(raw)


def test_without_a_file_one_class_without_objectives() -> None:
    classes = SloClasses()
    assert classes.names == ("default",)
    assert validate_slo(pb.Slo(ttft_ms=250), classes) == ValidSlo(250, None)
