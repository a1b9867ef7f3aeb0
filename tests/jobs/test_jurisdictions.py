"""Jurisdiction codes: countries, subdivisions and named sets, as jobs name them and placement matches them."""

import pycountry
import pytest

from marketplace.jobs import jurisdictions
from marketplace.jobs.jurisdictions import countries_of, describe, match, normalise


class TestNormalise:
    def test_codes_are_upper_cased_stripped_deduplicated_and_sorted(self):
        assert normalise([" de", "FR", "de", "eu", "de-by"]) == ["DE", "DE-BY", "EU", "FR"]

    def test_uk_means_great_britain(self):
        assert normalise(["UK", "gb"]) == ["GB"]

    def test_codes_joined_with_a_plus_are_their_parts(self):
        assert normalise(["EU+EEA+CH"]) == ["CH", "EEA", "EU"]

    def test_an_empty_list_means_anywhere(self):
        assert normalise([]) == []

    @pytest.mark.parametrize("code", ["EU", "EEA", "EFTA", "DACH", "US", "US-CA", "GB-ENG", "FR-75C"])
    def test_named_sets_countries_and_subdivisions_are_known(self, code):
        assert normalise([code]) == [code]

    def test_unknown_codes_are_refused_naming_each_of_them(self):
        with pytest.raises(ValueError) as refused:
            normalise(["DE", "XX", "DE-ZZ", "EUR", "E"])

        message = str(refused.value)
        for code in ("XX", "DE-ZZ", "EUR", "E"):
            assert code in message
        assert "DE," not in message

    @pytest.mark.parametrize("codes", [[""], [" "], ["+"], ["EU+"], ["EU++CH"]])
    def test_a_blank_code_is_refused_rather_than_meaning_anywhere(self, codes):
        with pytest.raises(ValueError, match="empty"):
            normalise(codes)

    @pytest.mark.parametrize("codes", ["DE", [1], [None]])
    def test_something_that_is_not_a_list_of_strings_is_refused(self, codes):
        with pytest.raises(ValueError):
            normalise(codes)


class TestNamedSets:
    @pytest.mark.parametrize("name", sorted(jurisdictions.NAMED_SETS))
    def test_every_member_is_an_iso_country(self, name):
        for country in jurisdictions.NAMED_SETS[name][1]:
            assert pycountry.countries.get(alpha_2=country) is not None, (name, country)

    def test_the_eu_has_its_27_member_states_and_not_the_uk(self):
        members = jurisdictions.NAMED_SETS["EU"][1]

        assert len(members) == 27
        assert {"DE", "FR", "GR", "HR"} <= members
        assert "GB" not in members

    def test_the_eea_is_the_eu_and_iceland_liechtenstein_norway(self):
        eea = jurisdictions.NAMED_SETS["EEA"][1]

        assert eea == jurisdictions.NAMED_SETS["EU"][1] | {"IS", "LI", "NO"}
        assert "CH" not in eea


class TestMatch:
    def test_no_codes_admit_anywhere(self):
        assert match([], "JP", "") == ""

    def test_a_country_admits_its_units_and_all_their_subdivisions(self):
        assert match(["DE"], "DE", "") == "DE"
        assert match(["DE"], "DE", "DE-BY") == "DE"
        assert match(["DE"], "FR", "") is None

    def test_a_subdivision_admits_only_units_declaring_it_or_a_part_of_it(self):
        assert match(["DE-BY"], "DE", "DE-BY") == "DE-BY"
        assert match(["DE-BY"], "DE", "DE-BE") is None
        assert match(["DE-BY"], "DE", "") is None
        assert match(["FR-IDF"], "FR", "FR-75C") == "FR-IDF"

    def test_a_subdivision_counts_only_inside_the_declared_country(self):
        assert match(["FR-IDF"], "DE", "FR-IDF") is None

    def test_a_named_set_admits_its_member_countries(self):
        assert match(["EU"], "DE", "DE-BY") == "EU"
        assert match(["EU"], "NO", "") is None
        assert match(["EEA"], "NO", "") == "EEA"
        assert match(["EU"], "GB", "") is None
        assert match(["EU"], "GF", "") is None  # French Guiana has a code of its own and is named outright

    def test_the_most_specific_code_that_admits_is_named(self):
        codes = normalise(["EU", "DE", "DE-BY"])

        assert match(codes, "DE", "DE-BY") == "DE-BY"
        assert match(codes, "DE", "DE-BE") == "DE"
        assert match(codes, "FR", "") == "EU"

    def test_a_tuple_is_accepted_as_well_as_a_list(self):
        assert match(("CH", "EU"), "CH", "") == "CH"


class TestCountriesOf:
    def test_named_sets_expand_and_subdivisions_give_their_country(self):
        assert countries_of(["DACH", "US-CA", "DE-BY"]) == ["AT", "CH", "DE", "US"]

    def test_the_eea_gives_thirty_countries(self):
        assert len(countries_of(["EEA"])) == 30

    def test_no_codes_give_no_countries(self):
        assert countries_of([]) == []


class TestDescribe:
    @pytest.mark.parametrize(
        "code, name",
        [("EU", "European Union"), ("DE", "Germany"), ("DE-BY", "Bayern (Germany)"), ("TW", "Taiwan")],
    )
    def test_codes_have_human_names(self, code, name):
        assert describe(code) == name

    def test_an_unknown_code_describes_itself(self):
        assert describe("XX") == "XX"
