import pytest

from brainvae import naming


def test_scan_key_orders_entities():
    assert naming.scan_key("01", run=2, ses="b", acq="mprage") == "sub-01_ses-b_acq-mprage_run-2"
    assert naming.scan_path("01") == "sub-01/anat/sub-01"
    assert naming.scan_path("01", "2", run="1") == "sub-01/ses-2/anat/sub-01_ses-2_run-1"


@pytest.mark.parametrize("bad", ["../x", "a/b", "a b", "a-b", "a_b", "", "é"])
def test_rejects_non_labels(bad):
    assert not naming.is_bids_label(bad)
    with pytest.raises(ValueError):
        naming.scan_key(bad or "x/")


def test_parse_scan_key_round_trip():
    key = naming.scan_key("07", "1", rec="norm", run="3")
    assert naming.parse_scan_key(key) == {"sub": "07", "ses": "1", "rec": "norm", "run": "3"}
    with pytest.raises(ValueError):
        naming.parse_scan_key("ses-1_run-2")


# `^...$` with re.match accepts one trailing newline ("$" also matches just before it); a label read
# from a file line or a participants.tsv cell with a stray newline must still be rejected.
@pytest.mark.parametrize("bad", ["01\n", "\n01", "0\n1", "01\r\n", "01 ", "\t01", "01\x00", "٣", "ｓｕｂ"])
def test_rejects_labels_with_whitespace_or_non_ascii(bad):
    assert not naming.is_bids_label(bad)
    with pytest.raises(ValueError, match="not a BIDS label"):
        naming.scan_key(bad)
    with pytest.raises(ValueError, match="not a BIDS label"):
        naming.scan_key("01", run=bad)


@pytest.mark.parametrize("bad", [1, None, b"01", ["01"]])
def test_only_strings_are_labels(bad):
    assert not naming.is_bids_label(bad)


@pytest.mark.parametrize("key", ["sub-01\n", "sub-01_run-1\n", "sub-01\n_run-1", "sub-01_", "sub-01__run-1",
                                 "sub-01_run-", "sub-01_task-rest", "sub-01_sub-02x-3",
                                 "sub-01_sub-02", "sub-01_run-1_run-2", "sub-01_run-1_ses-2"])
def test_parse_scan_key_rejects_trailing_newline_repeats_and_malformed_parts(key):
    with pytest.raises(ValueError):
        naming.parse_scan_key(key)


def test_labels_of_letters_and_digits_are_accepted():
    for good in ("01", "A", "mprage", "MPRAGE2", "0"):
        assert naming.is_bids_label(good)
    assert naming.parse_scan_key("sub-A1_ses-B_run-10") == {"sub": "A1", "ses": "B", "run": "10"}
