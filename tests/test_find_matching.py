"""C-FIND matching over the catalog, without the network: every matching type on indexed
columns (SQL with bound values) and on the stored header (Python), levels and derived
keys, the duplicates policy, paging, failures, and response character sets."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

import find_corpus as fc
from stowage.catalog import matching
from stowage.catalog.keys import models
from stowage.catalog.query import QueryError, _from_summaries, parse_request, plan, run
from stowage.catalog.reader import Catalog
from stowage.catalog.responses import choose_charset, fits, identifier
from stowage.catalog.sealer import Sealer

PATIENT_ROOT, STUDY_ROOT, PS_ONLY = (m.find for m in models().values())


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Catalog:
    """The corpus: the first half sealed into Parquet, the rest still in a tail (both must
    answer)."""
    directory = tmp_path_factory.mktemp("catalog")
    rows = fc.rows(fc.datasets() + fc.charset_datasets())
    s = Sealer(directory, 0, compact_min_files=100)
    s.commit(rows[:len(rows) // 2])
    s.seal()
    s.commit(rows[len(rows) // 2:])
    c = Catalog(directory)
    yield c
    c.close()


def query(sop_class: str = STUDY_ROOT, level: str = "STUDY", relational: bool = False,
          charset: str | None = None, **keys) -> Dataset:
    return fc.identifier(level, charset, **keys)


def find(catalog: Catalog, ds: Dataset, sop_class: str = STUDY_ROOT, relational: bool = False,
         pn_insensitive: bool = False, page: int = 2000) -> list[Dataset]:
    request = parse_request(ds, sop_class, relational)
    return [identifier(request, r, "STOWAGE", pn_insensitive) for r in run(catalog, request, pn_insensitive, page)]


def values(results: list[Dataset], keyword: str) -> list:
    return sorted(str(r.get(keyword)) for r in results)


def studies(catalog: Catalog, **keys) -> list[str]:
    """Matching studies of the three patients (not the character set examples)."""
    keys.setdefault("AccessionNumber", "ACC-*")
    keys.setdefault("StudyInstanceUID", "")
    return values(find(catalog, query(**keys)), "StudyInstanceUID")


S11, S12, S21, S31 = fc.uid(1, 1), fc.uid(1, 2), fc.uid(2, 1), fc.uid(3, 1)


# --- levels and models -------------------------------------------------------------------


def test_patient_level_with_derived_counts(catalog):
    got = find(catalog, query(PATIENT_ROOT, "PATIENT", PatientID="PAT-1", PatientName="",
                              NumberOfPatientRelatedStudies="", NumberOfPatientRelatedSeries="",
                              NumberOfPatientRelatedInstances=""), PATIENT_ROOT)
    assert len(got) == 1
    r = got[0]
    assert (r.PatientName, r.NumberOfPatientRelatedStudies, r.NumberOfPatientRelatedSeries,
            r.NumberOfPatientRelatedInstances) == ("SMITH^JOHN", 2, 3, 6)
    assert r.QueryRetrieveLevel == "PATIENT" and r.RetrieveAETitle == "STOWAGE"


def test_study_level_derived_keys_cover_every_instance_of_a_matching_study(catalog):
    got = find(catalog, query(StudyInstanceUID="", ModalitiesInStudy="", SOPClassesInStudy="",
                              NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances="",
                              PatientID="PAT-1", StudyDate="20240110"))
    assert len(got) == 1
    r = got[0]
    assert list(r.ModalitiesInStudy) == ["CT", "SR"]
    assert sorted(r.SOPClassesInStudy) == sorted([fc.CT, fc.SR])
    assert (r.NumberOfStudyRelatedSeries, r.NumberOfStudyRelatedInstances) == (2, 4)


def test_study_root_study_level_answers_patient_counts(catalog):
    got = find(catalog, query(StudyInstanceUID=S12, NumberOfPatientRelatedStudies="",
                              NumberOfPatientRelatedInstances=""))
    assert (got[0].NumberOfPatientRelatedStudies, got[0].NumberOfPatientRelatedInstances) == (2, 6)


def test_series_and_image_levels_carry_the_unique_keys_above(catalog):
    series = find(catalog, query(PATIENT_ROOT, "SERIES", PatientID="PAT-1", StudyInstanceUID=S11,
                                 SeriesInstanceUID="", Modality="", NumberOfSeriesRelatedInstances=""),
                  PATIENT_ROOT)
    assert sorted((s.Modality, s.NumberOfSeriesRelatedInstances) for s in series) == [("CT", 3), ("SR", 1)]
    assert all(s.PatientID == "PAT-1" and s.StudyInstanceUID == S11 for s in series)
    images = find(catalog, query(PATIENT_ROOT, "IMAGE", PatientID="PAT-1", StudyInstanceUID=S11,
                                 SeriesInstanceUID=fc.uid(1, 1, 1), SOPInstanceUID="", InstanceNumber=""),
                  PATIENT_ROOT)
    assert values(images, "InstanceNumber") == ["1", "2", "3"]
    assert all(i.SeriesInstanceUID == fc.uid(1, 1, 1) for i in images)


def test_patient_study_only_has_no_series_level(catalog):
    got = find(catalog, query(PS_ONLY, "STUDY", PatientID="PAT-2", StudyInstanceUID=""), PS_ONLY)
    assert values(got, "StudyInstanceUID") == [S21]
    with pytest.raises(QueryError) as e:
        parse_request(query(PS_ONLY, "SERIES"), PS_ONLY)
    assert e.value.status == 0xA900
    with pytest.raises(QueryError) as e:  # a key at a level the model lacks
        parse_request(query(PS_ONLY, "STUDY", SeriesInstanceUID=""), PS_ONLY)
    assert e.value.status == 0xA900 and "SERIES" in e.value.comment


@pytest.mark.parametrize("level, status", [(None, 0xA900), ("", 0xA900), ("FRAME", 0xA900), ("PATIENT", 0xA900)])
def test_missing_unknown_or_foreign_level(level, status):
    ds = Dataset()
    if level is not None:
        ds.QueryRetrieveLevel = level
    ds.PatientID = ""
    with pytest.raises(QueryError) as e:
        parse_request(ds, STUDY_ROOT)  # Study Root has no PATIENT level
    assert e.value.status == status and 0 < len(e.value.comment) <= 64


def test_unsupported_sop_class():
    with pytest.raises(QueryError) as e:
        parse_request(query(), "1.2.840.10008.5.1.4.31")  # Modality Worklist FIND
    assert e.value.status == 0x0122


# --- matching types -----------------------------------------------------------------------


def test_single_value_and_universal(catalog):
    assert studies(catalog, AccessionNumber="ACC-2") == [S12]
    assert studies(catalog, PatientID="PAT-1", StudyDescription="") == [S11, S12]
    assert studies(catalog, StudyDescription="*", PatientID="PAT-2") == [S21]  # '*' alone: universal
    assert studies(catalog, AccessionNumber="acc-2") == []  # case-sensitive


def test_wildcards(catalog):
    assert studies(catalog, PatientName="SM*") == [S11, S12, S21]
    assert studies(catalog, PatientName="SM?TH*") == [S11, S12, S21]
    assert studies(catalog, PatientName="SMITH^J?HN") == [S11, S12]
    assert studies(catalog, StudyDescription="*HEAD") == [S12]
    assert studies(catalog, StudyDescription="?? *") == [S11, S12]


def test_values_are_never_code(catalog):
    assert studies(catalog, PatientID=fc.INJECTION) == [S31]
    assert studies(catalog, PatientID="X' OR '1'='1*") == [S31]
    assert studies(catalog, PatientID="' OR 1=1 --") == []
    assert studies(catalog, StudyDescription="XR; DROP TABLE records;--") == [S31]
    assert studies(catalog, PatientName="O'BRIEN*") == [S31]
    # LIKE's own wildcards are literal text in a DICOM value
    assert studies(catalog, StudyDescription="100%_SURE") == [S21]
    assert studies(catalog, StudyDescription="100*") == [S21]
    assert studies(catalog, StudyDescription="1%%_SURE") == []
    assert studies(catalog, StudyDescription="%") == []
    p = plan(parse_request(query(PatientID=fc.INJECTION), STUDY_ROOT))
    assert fc.INJECTION not in (p.keys or "") + p.select and fc.INJECTION in p.params


def test_date_and_time_ranges(catalog):
    assert studies(catalog, StudyDate="20240101-20240131", PatientID="PAT*") == [S11]
    assert studies(catalog, StudyDate="-20231231") == [S21]
    assert studies(catalog, StudyDate="20240201-") == [S12]
    assert studies(catalog, StudyDate="20240110") == [S11]
    assert studies(catalog, StudyTime="2300-", PatientID="PAT*") == [S12, S21]
    assert studies(catalog, StudyTime="-1015", PatientID="*") == [S11, S31]  # 101500 is within "-1015"
    assert studies(catalog, StudyTime="101501-", StudyDate="20240110") == []


def test_combined_date_time_range(catalog):
    """20231231 23:59:59 to 20240110 10:15 is one continuum, not two separate ranges."""
    assert studies(catalog, StudyDate="20231231-20240110", StudyTime="2359-1015") == [S11, S21, S31]
    assert studies(catalog, StudyDate="20231231-20240110", StudyTime="235959.5-1014") == [S31]
    assert studies(catalog, StudyDate="20240101-", StudyTime="000001-") == [S11, S12]


def test_uid_lists(catalog):
    assert studies(catalog, StudyInstanceUID=f"{S11}\\{S21}\\1.2.3") == [S11, S21]
    images = find(catalog, query(level="IMAGE", StudyInstanceUID=S11, SeriesInstanceUID=fc.uid(1, 1, 1),
                                 SOPInstanceUID=f"{fc.uid(1, 1, 1, 1)}\\{fc.uid(1, 1, 1, 3)}"))
    assert values(images, "SOPInstanceUID") == [fc.uid(1, 1, 1, 1), fc.uid(1, 1, 1, 3)]


def test_numbers_and_derived_key_matching(catalog):
    series = find(catalog, query(level="SERIES", StudyInstanceUID=S11, SeriesNumber="099", SeriesInstanceUID=""))
    assert values(series, "SeriesInstanceUID") == [fc.uid(1, 1, 2)]
    assert studies(catalog, ModalitiesInStudy="MR") == [S12]
    assert studies(catalog, ModalitiesInStudy="CR\\SR") == [S11, S31]
    assert studies(catalog, ModalitiesInStudy="S*") == [S11]
    assert studies(catalog, NumberOfStudyRelatedInstances="4") == [S11]


def test_sequence_matching_on_the_stored_header(catalog):
    code = Dataset()
    code.CodeValue = "CT123"
    code.CodeMeaning = ""
    got = find(catalog, query(StudyInstanceUID="", ProcedureCodeSequence=Sequence([code])))
    assert values(got, "StudyInstanceUID") == [S11, S21]
    item = got[0].ProcedureCodeSequence[0]
    assert item.CodeValue == "CT123" and item.CodeMeaning == "CT chest w/o" and "CodingSchemeDesignator" not in item
    everything = find(catalog, query(StudyInstanceUID=S12, ProcedureCodeSequence=Sequence()))
    assert everything[0].ProcedureCodeSequence[0].CodingSchemeDesignator == "LOCAL"
    code.CodeValue = "MR*"
    assert values(find(catalog, query(StudyInstanceUID="", ProcedureCodeSequence=Sequence([code]))),
                  "StudyInstanceUID") == [S12]
    sr = Dataset()
    sr.CodeValue = "18748-4"
    images = find(catalog, query(level="IMAGE", StudyInstanceUID=S11, SeriesInstanceUID=fc.uid(1, 1, 2),
                                 SOPInstanceUID="", ConceptNameCodeSequence=Sequence([sr])))
    assert len(images) == 1 and images[0].ConceptNameCodeSequence[0].CodeValue == "18748-4"


def test_header_keys_match_and_return(catalog):
    """Keys with no column (table keys like Patient's Birth Time, any other attribute)."""
    got = find(catalog, query(PATIENT_ROOT, "PATIENT", PatientID="PAT-1", PatientBirthTime="0800-0900",
                              OtherPatientIDs="", EthnicGroup=""), PATIENT_ROOT)
    assert len(got) == 1 and list(got[0].OtherPatientIDs) == ["OTHER-1", "ALT-1"] and got[0].EthnicGroup in (None, "")
    assert find(catalog, query(PATIENT_ROOT, "PATIENT", PatientID="PAT-1", PatientBirthTime="0900-"),
                PATIENT_ROOT) == []
    images = find(catalog, query(level="IMAGE", StudyInstanceUID=S21, SeriesInstanceUID=fc.uid(2, 1, 1),
                                 SOPInstanceUID="", SliceThickness="", Manufacturer="AC*", InstitutionName="",
                                 AcquisitionDateTime="20231231235900-"))
    assert len(images) == 2
    assert all(i.SliceThickness == 2.5 and i.Manufacturer == "ACME" and i.InstitutionName == "General Hospital"
               for i in images)
    assert find(catalog, query(level="IMAGE", StudyInstanceUID=S21, SeriesInstanceUID=fc.uid(2, 1, 1),
                               AcquisitionDateTime="-20231230")) == []
    assert studies(catalog, OtherPatientIDs="ALT-2") == [S21]  # any value of a multi-valued attribute


# --- hierarchical and relational ----------------------------------------------------------------


def test_hierarchical_ignores_lower_level_keys_relational_matches_them(catalog):
    hierarchical = find(catalog, query(PatientID="PAT-1", StudyInstanceUID="", Modality="MR"))
    assert values(hierarchical, "StudyInstanceUID") == [S11, S12]
    assert all(r.Modality in (None, "") for r in hierarchical)
    relational = find(catalog, query(PatientID="PAT-1", StudyInstanceUID="", Modality="MR"), relational=True)
    assert values(relational, "StudyInstanceUID") == [S12]


def test_hierarchical_needs_single_values_for_higher_unique_keys(catalog):
    ds = query(level="SERIES", StudyInstanceUID=f"{S11}\\{S12}", SeriesInstanceUID="")
    with pytest.raises(QueryError) as e:
        parse_request(ds, STUDY_ROOT)
    assert e.value.status == 0xA900
    relational = find(catalog, ds, relational=True)
    assert len(relational) == 3


# --- person names --------------------------------------------------------------------------------


def test_person_name_policy(catalog):
    assert studies(catalog, PatientName="SMYTHE^JANE") == [S21]  # trailing components insignificant
    assert studies(catalog, PatientName="smith^john") == []
    got = find(catalog, query(PatientName="smi*", StudyInstanceUID=""), pn_insensitive=True)
    assert values(got, "StudyInstanceUID") == [S11, S12]
    rows = find(catalog, query(PatientName="AN*", StudyInstanceUID=""), pn_insensitive=True)
    assert any(str(r.PatientName).startswith("Äneas") for r in rows)  # accents folded too


def test_person_name_component_groups(catalog):
    assert len(find(catalog, query(PatientName="Yamada*"))) == 1
    assert len(find(catalog, query(PatientName="山田^太郎"))) == 2  # the ideographic group of H31 and H32
    assert len(find(catalog, query(PatientName="やまだ*"))) == 3  # phonetic groups, and chrJapMulti
    assert len(find(catalog, query(PatientName="Yamada^Tarou=山田^太郎"))) == 1
    assert len(find(catalog, query(PatientName="=山田*"))) == 2
    assert len(find(catalog, query(PatientName="홍^길동"))) == 1


# --- duplicates, paging, freshness -------------------------------------------------------------


def test_duplicates_policy_decides_which_record_matches(tmp_path):
    first, again = fc.datasets()[:1], fc.datasets()[:1]
    again[0].PatientName = "RENAMED^PATIENT"
    s = Sealer(tmp_path, 0, compact_min_files=100)
    s.commit(fc.rows(first))
    s.seal()
    s.commit(fc.rows(again, start=100))
    newest, oldest = Catalog(tmp_path, "keep-newest"), Catalog(tmp_path, "keep-first")
    assert studies(newest, PatientName="RENAMED*") == [S11] and studies(newest, PatientName="SMITH*") == []
    assert studies(oldest, PatientName="SMITH*") == [S11] and studies(oldest, PatientName="RENAMED*") == []
    got = find(newest, query(StudyInstanceUID="", NumberOfStudyRelatedInstances=""))
    assert got[0].NumberOfStudyRelatedInstances == 1


@pytest.mark.parametrize("level, keys", [("STUDY", {}), ("SERIES", {"StudyInstanceUID": S11}),
                                         ("IMAGE", {"StudyInstanceUID": S11, "SeriesInstanceUID": fc.uid(1, 1, 1)})])
def test_pages_return_every_match_once(catalog, level, keys):
    ds = query(level=level, **{"SOPInstanceUID": "", "SeriesInstanceUID": "", "StudyInstanceUID": "", **keys})
    whole = [str(r.get(x)) for r in find(catalog, ds) for x in ("StudyInstanceUID", "SeriesInstanceUID")]
    paged = [str(r.get(x)) for r in find(catalog, ds, page=1) for x in ("StudyInstanceUID", "SeriesInstanceUID")]
    assert whole == paged and len(whole) > 2


def test_rows_still_in_a_tail_match(tmp_path):
    s = Sealer(tmp_path, 0, compact_min_files=100)
    c = Catalog(tmp_path)
    assert studies(c) == []
    s.commit(fc.rows(fc.datasets()[:1]))
    assert studies(c) == [S11]


# --- character sets ----------------------------------------------------------------------------


def test_responses_state_a_character_set_that_carries_them(catalog):
    by_name = {str(r.PatientName): r for r in find(catalog, query(PatientName="", PatientID=""))}
    ascii_only = by_name["SMITH^JOHN"]
    assert "SpecificCharacterSet" not in ascii_only
    japanese = by_name["Yamada^Tarou=山田^太郎=やまだ^たろう"]
    assert japanese.SpecificCharacterSet == ["", "ISO 2022 IR 87"]  # the instance's own set carries it
    greek = by_name["Διονυσιος"]
    assert greek.SpecificCharacterSet == "ISO_IR 126"
    for r in by_name.values():  # every response encodes and decodes to the same text
        assert _round_trip(r) == str(r.PatientName)


def test_query_character_set_is_used_when_it_can_carry_the_response(catalog):
    got = find(catalog, query(PatientName="Buc*", StudyInstanceUID="", charset="ISO_IR 100"))
    assert got[0].SpecificCharacterSet == "ISO_IR 100" and str(got[0].PatientName) == "Buc^Jérôme"
    got = find(catalog, query(PatientName="Buc*", StudyInstanceUID="", charset="ISO_IR 192"))
    assert got[0].SpecificCharacterSet == "ISO_IR 192"
    # the request's set cannot carry Greek: the instance's own set is used
    got = find(catalog, query(PatientName="Διον*", StudyInstanceUID="", charset="ISO_IR 100"))
    assert got[0].SpecificCharacterSet == "ISO_IR 126"


def test_mislabelled_data_does_not_break_a_query(catalog):
    got = find(catalog, query(PatientID="CP1252", PatientName="", StudyInstanceUID="", OtherPatientIDs=""))
    assert len(got) == 1
    _round_trip(got[0])


def test_charset_choice():
    assert choose_charset(["ABC"], [], []) == []
    assert choose_charset(["ABC"], ["ISO_IR 100"], []) == ["ISO_IR 100"]
    assert choose_charset(["Jérôme"], [], ["ISO_IR 100"]) == ["ISO_IR 100"]
    assert choose_charset(["Jérôme", "山田"], ["ISO_IR 100"], ["", "ISO 2022 IR 87"]) == ["ISO_IR 192"]
    assert fits("山田^太郎", ["", "ISO 2022 IR 87"]) and not fits("홍", ["", "ISO 2022 IR 87"])


def _round_trip(ds: Dataset) -> str:
    from io import BytesIO
    from pydicom.filereader import read_dataset
    raw = fc.encode_dataset(ds)
    back = read_dataset(BytesIO(raw), False, True)
    return str(back.PatientName)


# --- the matching module on its own ----------------------------------------------------------


def test_parse_kinds():
    from pydicom.dataelem import DataElement
    kinds = {("DA", "20240101-"): "range", ("DA", "-"): "universal", ("UI", "1.2\\1.3"): "list",
             ("LO", "A*"): "wildcard", ("LO", "A"): "single", ("DT", "20240101120000-0500"): "single",
             ("DT", "20240101-20240201"): "range", ("CS", ""): "universal", ("UI", "*"): "universal"}
    for (vr, value), kind in kinds.items():
        assert matching.parse(DataElement(0x00100020, vr, value)).kind == kind, (vr, value)
    from types import SimpleNamespace
    with pytest.raises(matching.MatchError):
        matching.parse(SimpleNamespace(tag=0x00201208, VR="IS", value="many"))
    with pytest.raises(matching.MatchError):
        matching.parse(DataElement(0x00081032, "SQ", Sequence([Dataset(), Dataset()])))


# --- study summaries agree with the instances ------------------------------------------------

SUMMARY_QUERIES = [
    (STUDY_ROOT, "STUDY", dict(StudyInstanceUID="", PatientName="", StudyDate="", ModalitiesInStudy="",
                               SOPClassesInStudy="", NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances="",
                               NumberOfPatientRelatedStudies="", NumberOfPatientRelatedInstances="",
                               ProcedureCodeSequence=Sequence(), OtherPatientIDs="")),
    (STUDY_ROOT, "STUDY", dict(StudyInstanceUID="", PatientName="SM*", ModalitiesInStudy="CT",
                               NumberOfStudyRelatedInstances="")),
    (STUDY_ROOT, "STUDY", dict(StudyInstanceUID="", StudyDate="20231231-20240110", StudyTime="2359-1015",
                               NumberOfStudyRelatedSeries="")),
    (STUDY_ROOT, "STUDY", dict(StudyInstanceUID=f"{S11}\\{S21}", NumberOfStudyRelatedInstances="4\\2")),
    (PATIENT_ROOT, "PATIENT", dict(PatientID="", PatientName="", NumberOfPatientRelatedStudies="",
                                   NumberOfPatientRelatedSeries="", NumberOfPatientRelatedInstances="",
                                   PatientBirthTime="")),
    (PATIENT_ROOT, "PATIENT", dict(PatientID="PAT-*", NumberOfPatientRelatedInstances="6")),
]


def _both_ways(catalog: Catalog, sop_class: str, level: str, keys: dict, monkeypatch) -> tuple[list, list]:
    from stowage.catalog import query as q
    def answers():
        return sorted(str(sorted((e.keyword, str(e.value)) for e in r)) for r in
                      find(catalog, query(sop_class, level, **keys), sop_class))
    from_summaries = answers()
    monkeypatch.setattr(q, "_from_summaries", lambda request: False)
    return from_summaries, answers()


@pytest.mark.parametrize("sop_class, level, keys", SUMMARY_QUERIES)
def test_study_summaries_answer_as_instances_do(catalog, sop_class, level, keys, monkeypatch):
    assert _from_summaries(parse_request(query(sop_class, level, **keys), sop_class))
    summaries, instances = _both_ways(catalog, sop_class, level, keys, monkeypatch)
    assert summaries == instances and summaries


def test_a_study_split_between_files_and_a_tail_adds_up(tmp_path, monkeypatch):
    rows = fc.rows(fc.datasets()[:4])  # study S11: 3 CT + 1 SR
    s = Sealer(tmp_path, 0, compact_min_files=100)
    s.commit(rows[:1])
    s.seal()
    s.commit(rows[1:2])
    s.seal()
    s.commit(rows[2:])
    c = Catalog(tmp_path)
    keys = dict(StudyInstanceUID="", NumberOfStudyRelatedInstances="", NumberOfStudyRelatedSeries="",
                ModalitiesInStudy="")
    got = find(c, query(**keys))
    assert len(got) == 1 and (got[0].NumberOfStudyRelatedInstances, got[0].NumberOfStudyRelatedSeries) == (4, 2)
    assert list(got[0].ModalitiesInStudy) == ["CT", "SR"]
    summaries, instances = _both_ways(c, STUDY_ROOT, "STUDY", keys, monkeypatch)
    assert summaries == instances


def test_files_sealed_before_summaries_existed_are_summarised_on_the_fly(tmp_path, monkeypatch):
    from stowage.catalog import manifest, studies
    s = Sealer(tmp_path, 0, compact_min_files=100)
    s.commit(fc.rows(fc.datasets()))
    s.seal()
    for name in manifest.load(tmp_path).files:
        (tmp_path / studies.companion(name)).unlink()
    c = Catalog(tmp_path)
    for sop_class, level, keys in SUMMARY_QUERIES:
        summaries, instances = _both_ways(c, sop_class, level, keys, monkeypatch)
        monkeypatch.undo()
        assert summaries == instances and summaries


def test_a_hidden_duplicate_is_not_counted(tmp_path, monkeypatch):
    """keep-newest: an instance re-sent into another series moves there in the counts."""
    dss = fc.datasets()[:4]
    again = fc.datasets()[:1]
    again[0].SeriesInstanceUID = fc.uid(1, 1, 2)
    s = Sealer(tmp_path, 0, compact_min_files=100)
    s.commit(fc.rows(dss))
    s.seal()
    s.commit(fc.rows(again, start=100))
    for sealed in (False, True):
        if sealed:
            s.seal()
        c = Catalog(tmp_path)
        got = find(c, query(StudyInstanceUID=S11, NumberOfStudyRelatedInstances="", NumberOfStudyRelatedSeries=""))
        assert (got[0].NumberOfStudyRelatedInstances, got[0].NumberOfStudyRelatedSeries) == (4, 2)
        series = find(c, query(level="SERIES", StudyInstanceUID=S11, SeriesInstanceUID="",
                               NumberOfSeriesRelatedInstances=""))
        assert sorted((x.SeriesInstanceUID, x.NumberOfSeriesRelatedInstances) for x in series) == \
            [(fc.uid(1, 1, 1), 2), (fc.uid(1, 1, 2), 2)]


def test_docs_key_tables_are_current():
    from stowage.catalog.keys import describe
    doc = (Path(__file__).resolve().parent.parent / "docs" / "query.md").read_text()
    generated = doc.split("<!-- keys:begin (generated by python -m stowage.catalog.keys) -->\n")[1].split("<!-- keys:end -->")[0]
    assert generated == describe(), "docs/query.md: regenerate the key tables with python -m stowage.catalog.keys"


@pytest.mark.parametrize("keys", [
    dict(level="IMAGE", SOPInstanceUID=""),                                   # skipped in SQL (OFFSET)
    dict(level="IMAGE", SOPInstanceUID="", Manufacturer="AC*"),               # a key matched in Python after
    dict(level="SERIES", SeriesInstanceUID="", Modality=""),                  # keys, then rows (OFFSET on keys)
    dict(level="SERIES", SeriesInstanceUID="", NumberOfSeriesRelatedInstances="2"),  # keys HAVING a count
    dict(level="SERIES", SeriesInstanceUID=[fc.uid(1, 1, 1), fc.uid(2, 1, 1), fc.uid(9, 9, 9)]),  # keys asked for
    dict(level="STUDY", StudyInstanceUID="", AccessionNumber="ACC-*"),
])
def test_skip_gives_the_listing_after_the_first_n(catalog, keys):
    """QIDO-RS `offset`: what `run(skip=n)` yields is the whole listing's, after its first n,
    for any page size, however the skipping is done."""
    request = parse_request(query(**keys), STUDY_ROOT, relational=True)
    listing = [r.values for r in run(catalog, request, page=3)]
    assert len(listing) >= 2
    for n in (0, 1, 3, len(listing) - 1, len(listing), len(listing) + 5):
        for page in (2, 2000):  # the first page and the pages after it, and one page for all
            assert [r.values for r in run(catalog, request, page=page, skip=n)] == listing[n:], (n, page)
