"""Request options that need no engine: explicit routing ranges (`msa_routing`) and their
round trip through `extra_args`."""

from __future__ import annotations

import pytest

from vllm_msa.options import (
    MSARequestError,
    RequestOptions,
    ServingConfig,
    parse_routing,
    requested_bank,
)


@pytest.mark.parametrize(("raw", "expected"), [
    ([[3, 10]], ((3, 10),)),
    ([[3, 10], [12, 20]], ((3, 10), (12, 20))),
    ("[[5, 6], [6, 9]]", ((5, 6), (6, 9))),  # vllm_xargs may carry it as a JSON string
    ([3, 10, 12, 20], ((3, 10), (12, 20))),  # flat pairs: what vllm_xargs' schema allows
    ("[3, 10]", ((3, 10),)),
    (None, None),
])
def test_valid_routing(raw, expected):
    extra = {} if raw is None else {"msa_routing": raw}
    assert parse_routing(extra, template_len=3, prompt_len=20) == expected


@pytest.mark.parametrize("raw", [
    [[2, 10]],            # inside the template head
    [[3, 21]],            # past the prompt
    [[5, 5]],             # empty
    [[8, 10], [3, 5]],    # not sorted
    [[3, 10], [9, 12]],   # overlapping
    [],                   # no range
    [[3]], [["3", "9"]], [[True, 9]], "oops", 7,
    [3, 10, 12],          # flat, odd: not pairs
    [3, [10, 12]],        # mixed
    "[" * 5000,           # deeply nested JSON
])
def test_invalid_routing(raw):
    with pytest.raises(MSARequestError, match="msa_routing"):
        parse_routing({"msa_routing": raw}, template_len=3, prompt_len=20)


def test_options_round_trip():
    options = RequestOptions("docs", 4, ((3, 10), (12, 20)), True)
    again = RequestOptions.from_extra_args(options.to_extra_args())
    assert again == options
    assert (again.span_start, again.span_end) == (3, 20)


SERVING = ServingConfig(banks={"docs": "/banks/docs"}, default_bank="docs")


@pytest.mark.parametrize(("extra", "bank"), [
    ({}, "docs"),                      # the default bank
    ({"msa_bank": "docs"}, "docs"),
    ({"msa_bank": ""}, None),          # opting out of the default bank
    ({"msa_bank": None}, None),
])
def test_requested_bank(extra, bank):
    assert requested_bank(extra, SERVING) == bank


@pytest.mark.parametrize(("extra", "message"), [
    ({"msa_bank": "other"}, "unknown bank 'other'"),
    ({"msa_bank": 3}, "must be a bank name"),
    ({"msa_bnak": "docs"}, "unknown MSA options"),
    ({"msa_span": [[3, 9]]}, "unknown MSA options"),  # written by the front end only
])
def test_requested_bank_errors(extra, message):
    with pytest.raises(MSARequestError, match=message):
        requested_bank(extra, SERVING)


def test_verify_option():
    assert ServingConfig.from_additional_config({"msa": {}}).verify is True
    assert ServingConfig.from_additional_config({"msa": {"verify": False}}).verify is False
    with pytest.raises(ValueError, match="verify must be true or false"):
        ServingConfig.from_additional_config({"msa": {"verify": "no"}})
