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
