"""The threshold grammar of rcx.algos.criteria: every well-formed and every malformed form."""

import math
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rcx.algos.criteria import check_is_threshold, correction_spec
from rcx.config import (
    CRITERIA,
    ConfigValueError,
    LegacyAliasWarning,
    RSCriterion,
    parse_rs_thresholds,
    token_ratio_interval,
)


def test_k1_pair_and_k2_single():
    a, b = parse_rs_thresholds("token_k1,seq_max_k2", "0.6_1.6,2.5")
    assert a == RSCriterion("token_k1", "token", "k1", "token", 0.6, 1.6)
    assert b == RSCriterion("seq_max_k2", "sequence", "k2", "max", None, 2.5)


def test_string_is_read_as_written_not_as_a_yaml11_number():
    # YAML 1.1 would make 0.5_2 the number 0.52; the grammar makes it L=0.5, U=2.
    (c,) = parse_rs_thresholds("token_k1", "0.5_2")
    assert (c.lower, c.upper) == (0.5, 2.0)


def test_single_k1_number_means_reciprocal_interval():
    (c,) = parse_rs_thresholds("seq_mean_k1", "4")
    assert c.lower == pytest.approx(0.25) and c.upper == 4.0


def test_float_threshold_and_shared_entry():
    cs = parse_rs_thresholds("token_k2,seq_max_k3", 0.5)
    assert [c.upper for c in cs] == [0.5, 0.5]
    assert [c.lower for c in cs] == [None, None]


def test_off_values_give_no_criteria():
    for off in (None, "null", "", "none"):
        assert parse_rs_thresholds(off, None) == []


def test_every_canonical_criterion_parses():
    for name, (level, stat, agg) in CRITERIA.items():
        entry = "0.5_2.0" if stat == "k1" else "1.5"
        (c,) = parse_rs_thresholds(name, entry)
        assert (c.criterion, c.level, c.statistic, c.aggregation) == (name, level, stat, agg)


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [("token", "token_k1"), ("sequence", "seq_sum_k1"), ("geometric", "seq_mean_k1")],
)
def test_legacy_alias_resolved_with_warning(alias, canonical):
    with pytest.warns(LegacyAliasWarning, match=canonical):
        (c,) = parse_rs_thresholds(alias, "0.5_2.0")
    assert c.criterion == canonical


def test_canonical_names_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_rs_thresholds("token_k1", "0.5_2.0")


@pytest.mark.parametrize(
    ("rs", "threshold", "code", "fragment"),
    [
        ("token_k4", "2", "RCX-E002", "unknown rejection criterion 'token_k4'"),
        ("tokn_k1", "2", "RCX-E002", "did you mean 'token_k1'"),
        ("token_k1,,seq_max_k2", "2", "RCX-E002", "empty criterion"),
        ("token_k1,seq_max_k2", "0.5_2,2.5,3", "RCX-E003", "3 entries"),
        ("token_k1", None, "RCX-E004", "missing"),
        ("token_k1", "null", "RCX-E004", "missing"),
        ("seq_max_k2", "0.5_2", "RCX-E004", "k2/k3 criteria take one upper bound"),
        ("token_k3", "1_2", "RCX-E004", "k2/k3"),
        ("token_k1", "abc", "RCX-E004", "not a number"),
        ("token_k1", "0.5_x", "RCX-E004", "not a number"),
        ("token_k1", "0_2", "RCX-E004", "> 0"),
        ("token_k1", "-1_2", "RCX-E004", "> 0"),
        ("token_k2", "0", "RCX-E004", "> 0"),
        ("token_k2", "-2", "RCX-E004", "> 0"),
        ("token_k2", "inf", "RCX-E004", "finite"),
        ("token_k1", "2_0.5", "RCX-E004", "must be below"),
        ("token_k1", "1_1", "RCX-E004", "must be below"),
        ("token_k1", "0.5", "RCX-E004", "needs U > 1"),
        ("token_k1", "1", "RCX-E004", "needs U > 1"),
        ("token_k1", "0.5_1_2", "RCX-E004", "expected 'L_U'"),
        ("token_k1,seq_max_k2", "0.5_2,", "RCX-E004", "missing threshold entry"),
        ("token_k1", True, "RCX-E004", "number or a string"),
        ("token_k1,token", "2", "RCX-E002", "more than once"),
    ],
)
def test_malformed_forms_raise_with_code(rs, threshold, code, fragment):
    with pytest.raises(ConfigValueError) as info:
        parse_rs_thresholds(rs, threshold)
    assert info.value.code == code
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_ratio_interval_of_seq_max_k2_matches_spec():
    # 0.5 * log_r**2 <= 2.5  <=>  |log r| <= sqrt(5) = 2.2361  <=>  r in [0.1069, 9.3565]
    (c,) = parse_rs_thresholds("seq_max_k2", "2.5")
    lo, hi = token_ratio_interval(c)
    assert lo == pytest.approx(math.exp(-math.sqrt(5)))
    assert hi == pytest.approx(9.3565, abs=1e-4)


def test_ratio_interval_of_k3_solves_both_roots():
    (c,) = parse_rs_thresholds("token_k3", "0.1")
    lo, hi = token_ratio_interval(c)
    for r in (lo, hi):
        assert r - 1 - math.log(r) == pytest.approx(0.1, abs=1e-9)
    assert lo < 1 < hi


def test_aggregate_only_criteria_have_no_token_interval():
    for name in ("seq_sum_k1", "seq_mean_k1", "seq_mean_k2", "seq_mean_k3"):
        (c,) = parse_rs_thresholds(name, "0.5_2" if name.endswith("k1") else "1")
        assert token_ratio_interval(c) is None
    (c,) = parse_rs_thresholds("seq_sum_k2", "2")
    assert token_ratio_interval(c) == pytest.approx((math.exp(-2), math.exp(2)))


_threshold_text = st.text(alphabet="0123456789._,-eE+ xinfa", max_size=20)
_rs_text = st.one_of(
    st.text(max_size=30),
    st.lists(st.sampled_from([*CRITERIA, "token", "geometric", "bogus", ""]), max_size=4).map(
        ",".join
    ),
)


@given(rs=_rs_text, threshold=st.one_of(st.none(), st.floats(allow_nan=True), _threshold_text))
def test_random_inputs_parse_or_give_a_finding(rs, threshold):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LegacyAliasWarning)
        try:
            result = parse_rs_thresholds(rs, threshold)
        except ConfigValueError as e:
            assert e.code in {"RCX-E002", "RCX-E003", "RCX-E004"}
            return
    for c in result:
        assert c.upper > 0 and math.isfinite(c.upper)
        if c.statistic == "k1":
            assert 0 < c.lower < c.upper
        else:
            assert c.lower is None


def test_is_level_check_matches_validator_wording():
    from rcx.algos.criteria import check_is_level

    assert check_is_level("token") == "token" and check_is_level("null") is None
    with pytest.raises(ConfigValueError, match="'token', 'sequence' or null") as info:
        check_is_level("tokens")
    assert info.value.code == "RCX-E009"


# ----------------------------------------------------------------- rollout_is_threshold bands


@pytest.mark.parametrize(
    ("value", "bounds"),
    [
        (2, (None, 2.0)),  # a plain number: truncation at C
        ("3", (None, 3.0)),  # a string holding one number means that number
        ("0.5_5.0", (0.5, 5.0)),  # verl's IcePop band
        ("0.5_2", (0.5, 2.0)),  # as written: never 0.52
    ],
)
def test_is_threshold_number_or_band(value, bounds):
    assert check_is_threshold(value) == bounds


@pytest.mark.parametrize("value", ["1.5_2", "0.5_0.9", "0_2", "0.5_2_3", "a_b", "0.5_inf", 1.0])
def test_is_threshold_bad_bands_are_e005(value):
    with pytest.raises(ConfigValueError) as e:
        check_is_threshold(value)
    assert e.value.code == "RCX-E005"


def test_band_is_parsed_once_into_the_spec():
    spec = correction_spec(rollout_is="sequence", rollout_is_threshold="0.5_5.0")
    assert spec.is_band and (spec.is_lower, spec.is_threshold) == (0.5, 5.0)
    assert spec.is_rule() == "w = r if 0.5 <= r <= 5 else 0"
    assert correction_spec(rollout_is="token").is_rule() == "w = min(r, 2)"
