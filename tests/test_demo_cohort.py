"""The synthetic demo cohort: plan == files, determinism, consistent ground truth, group effects."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from brainvae import demo_cohort as dc
from brainvae.errors import ConfigError
from brainvae.naming import is_bids_label
from brainvae.templates import mni152_brain, mni152_brain_mask

SEED = 7
N_SUBJECTS = 4  # 2 per site, one DS and one euploid each; one subject gets two sessions
NATIVE_SITES = ("IXI", "ABCDS")  # raw scans; HCP and SantPau are template-space sites
TEMPLATE_SITES = {"HCP": {"subjects": 2, "ds_fraction": 0.0}, "SantPau": {"subjects": 4, "ds_fraction": 0.5}}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("demo")
    # n_jobs=2 here, serial regeneration in test_same_bytes: the bytes must not depend on n_jobs
    scans = dc.generate_cohort(out, N_SUBJECTS, SEED, sites=NATIVE_SITES, n_jobs=2)
    return out, scans


@pytest.fixture(scope="module")
def template_cohort(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("template")
    return out, dc.generate_cohort(out, None, SEED, sites=TEMPLATE_SITES, n_jobs=2, session_fraction=0.0)


def _truth(out: Path, record: dict) -> dict:
    return json.loads((out / dc.truth_paths(record)["truth"]).read_text())


def _normalised(truth: dict, region: str) -> float:
    """Region volume in template mm^3: native volume times the volume change of the linear part."""
    linear = np.asarray(truth["native_to_mni_affine_linear"])[:3, :3]
    return truth["region_volumes_ml"][region] * abs(np.linalg.det(linear))


# ------------------------------------------------------------------------------------------ plan

def test_plan_is_deterministic_valid_and_balanced():
    plan = dc.plan_cohort(20, 3)
    assert plan == dc.plan_cohort(20, 3)
    assert plan != dc.plan_cohort(20, 4)
    assert {tuple(sorted(r)) for r in plan} == {("ad_stage", "age", "dataset", "group", "icv_ml", "id_grade", "path",
                                                 "run", "session", "sex", "space", "subject")}
    subjects = {(r["dataset"], r["subject"]) for r in plan}
    assert len(subjects) == 20
    assert len({s for _, s in subjects}) == 20, "subject labels must be unique across sites"
    for r in plan:
        assert is_bids_label(r["subject"]) and (r["session"] is None or is_bids_label(r["session"]))
        assert r["run"] is None and r["group"] in ("DS", "euploid") and r["sex"] in ("F", "M")
        site = dc.SITES[r["dataset"]]
        low, high = site.ds_age if r["group"] == "DS" else site.euploid_age
        assert low <= r["age"] <= high and r["space"] == site.space
        if r["group"] == "DS":
            assert r["ad_stage"] in dc.AD_STAGES and r["id_grade"] in dc.ID_GRADES
        else:
            assert r["ad_stage"] == r["id_grade"] == dc.NOT_APPLICABLE
        assert 900 < r["icv_ml"] < 2100
        ses = f"_ses-{r['session']}" if r["session"] else ""
        sesdir = f"ses-{r['session']}/" if r["session"] else ""
        assert r["path"] == f"{r['dataset']}/sub-{r['subject']}/{sesdir}anat/sub-{r['subject']}{ses}_T1w.nii.gz"
    for site in ("IXI", "HCP"):
        groups = [r["group"] for r in plan if r["dataset"] == site and r["session"] in (None, "1")]
        assert groups.count("DS") == 4 and groups.count("euploid") == 6  # 0.4 of 10 per site
    sessions = {}
    for r in plan:
        sessions.setdefault(r["subject"], []).append(r["session"])
    assert sum(v == ["1", "2"] for v in sessions.values()) == 2  # 10 % of 20
    assert all(v in ([None], ["1", "2"]) for v in sessions.values())


def test_plan_options_and_errors():
    plan = dc.plan_cohort(3, 0, ds_fraction=0.0, sites=("HCP",), session_fraction=0.0)
    assert [r["subject"] for r in plan] == ["hcp001", "hcp002", "hcp003"]
    assert {r["group"] for r in plan} == {"euploid"} and all(r["session"] is None for r in plan)
    for kwargs in ({"n_subjects": 0, "seed": 0}, {"n_subjects": 2, "seed": -1},
                   {"n_subjects": 2, "seed": 0, "ds_fraction": 1.5}, {"n_subjects": 2, "seed": 0, "sites": ("XYZ",)},
                   {"n_subjects": 2, "seed": 0, "sites": ()}):
        with pytest.raises(ConfigError):
            dc.plan_cohort(**kwargs)
    with pytest.raises(ConfigError, match="ds_strength"):
        dc.generate_cohort("/nonexistent", 2, 0, ds_strength=-1)
    # Per-site counts and DS shares; the total, when given, must agree.
    plan = dc.plan_cohort(None, 0, sites={"HCP": {"subjects": 3}, "SantPau": {"subjects": 4, "ds_fraction": 0.5}},
                          session_fraction=0.0)
    assert [r["subject"] for r in plan] == ["hcp001", "hcp002", "hcp003", "sp001", "sp002", "sp003", "sp004"]
    assert [r["group"] for r in plan if r["dataset"] == "SantPau"].count("DS") == 2
    for sites in ({"HCP": {"subjects": 0}}, {"HCP": {"subjects": 2, "ds_fraction": 2}}, {"HCP": {"n": 2}}, {}):
        with pytest.raises(ConfigError, match="sites"):
            dc.plan_cohort(None, 0, sites=sites)
    with pytest.raises(ConfigError, match="differs"):
        dc.plan_cohort(5, 0, sites={"HCP": {"subjects": 3}})


def test_population_sizes_sex_and_ds_stages():
    """Intracranial volume: CV ~10 %, males ~10 % larger, DS smaller; DS-AD stages rise with age."""
    plan = dc.plan_cohort(None, 11, sites={"IXI": {"subjects": 300}, "SantPau": {"subjects": 300, "ds_fraction": 0.5}},
                          session_fraction=0.0, ds_strength=1.0)
    euploid = [r for r in plan if r["group"] == "euploid"]
    icv = np.array([r["icv_ml"] for r in euploid])
    assert 0.08 < icv.std() / icv.mean() < 0.12
    male = np.mean([r["icv_ml"] for r in euploid if r["sex"] == "M"])
    female = np.mean([r["icv_ml"] for r in euploid if r["sex"] == "F"])
    assert 1.06 < male / female < 1.15
    ds = [r for r in plan if r["group"] == "DS"]
    assert np.mean([r["icv_ml"] for r in ds]) < 0.9 * np.mean([r["icv_ml"] for r in euploid if r["dataset"] == "SantPau"])
    stage = {s: i for i, s in enumerate(dc.AD_STAGES)}
    young = [stage[r["ad_stage"]] for r in ds if r["age"] < 40]
    old = [stage[r["ad_stage"]] for r in ds if r["age"] > 55]
    assert np.mean(young) < 0.1 and np.mean(old) > 0.8 and {r["ad_stage"] for r in ds} == set(dc.AD_STAGES)
    # SantPau's euploid controls are age-matched: age alone does not tell the groups apart.
    santpau = [r for r in plan if r["dataset"] == "SantPau"]
    ages = {g: np.array([r["age"] for r in santpau if r["group"] == g]) for g in ("DS", "euploid")}
    assert abs(ages["DS"].mean() - ages["euploid"].mean()) < 3


def test_site_root_guard(tmp_path):
    # Empty folders (Snakemake makes output folders before the job) are not "someone else's data".
    (tmp_path / "IXI" / "sub-ixi001" / "anat").mkdir(parents=True)
    dc._prepare_site_root(tmp_path / "IXI")
    # A folder with files the generator did not write is never overwritten.
    (tmp_path / "HCP" / "sub-x" / "anat").mkdir(parents=True)
    (tmp_path / "HCP" / "sub-x" / "anat" / "sub-x_T1w.nii.gz").write_bytes(b"precious")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        dc._prepare_site_root(tmp_path / "HCP")
    assert (tmp_path / "HCP" / "sub-x" / "anat" / "sub-x_T1w.nii.gz").read_bytes() == b"precious"
    # A run killed half-way (scans written, final metadata not yet) is recognised as ours: the
    # folder is claimed before the first scan is written.
    dc._prepare_site_root(tmp_path / "IXI")
    (tmp_path / "IXI" / "sub-ixi001" / "anat").mkdir(parents=True, exist_ok=True)
    (tmp_path / "IXI" / "sub-ixi001" / "anat" / "sub-ixi001_T1w.nii.gz").write_bytes(b"half-written")
    dc._prepare_site_root(tmp_path / "IXI")
    assert not (tmp_path / "IXI" / "sub-ixi001").exists()


# ------------------------------------------------------------------------------------- generated

def test_files_are_exactly_the_plan(cohort):
    out, scans = cohort
    assert scans == dc.plan_cohort(N_SUBJECTS, SEED, sites=NATIVE_SITES)
    written = {str(p.relative_to(out)) for site in NATIVE_SITES for p in (out / site).rglob("*_T1w.nii.gz")}
    assert written == {r["path"] for r in scans}
    for r in scans:
        assert (out / r["path"].replace(".nii.gz", ".json")).is_file()
        for path in dc.truth_paths(r).values():
            assert (out / path).is_file(), path
            assert not path.startswith(r["dataset"] + "/"), "truth must stay outside the BIDS roots"
    for site in NATIVE_SITES:
        description = json.loads((out / site / "dataset_description.json").read_text())
        assert description["DatasetType"] == "raw" and description["BIDSVersion"]
        with open(out / site / "participants.tsv") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        assert list(rows[0]) == ["participant_id", *dc.PARTICIPANT_COLUMNS]
        planned = {f"sub-{r['subject']}": r for r in scans if r["dataset"] == site}
        assert all(float(row["icv_ml"]) == planned[row["participant_id"]]["icv_ml"] for row in rows)
        expected = sorted({f"sub-{r['subject']}" for r in scans if r["dataset"] == site})
        assert [row["participant_id"] for row in rows] == expected
        assert {row["group"] for row in rows} == {"DS", "euploid"}, "each site holds both groups"
    assert any(r["session"] == "2" for r in scans)


def test_same_bytes(cohort, tmp_path):
    out, scans = cohort
    record = next(r for r in scans if r["group"] == "DS")
    dc.generate_scan(record, tmp_path, SEED, 1.0)
    for relative in [record["path"], *dc.truth_paths(record).values()]:
        assert (tmp_path / relative).read_bytes() == (out / relative).read_bytes(), relative


def test_sites_grids_and_orientations(cohort):
    out, scans = cohort
    seen = {}
    for r in scans:
        img = nib.load(out / r["path"])
        zooms = np.asarray(img.header.get_zooms()[:3])
        assert np.all(zooms >= 0.9) and np.all(zooms <= 1.5)
        assert img.get_data_dtype() == np.int16
        assert np.allclose(img.affine, _truth(out, r)["native_voxel_to_scanner"], atol=1e-4)
        seen[r["dataset"]] = (tuple(np.round(zooms, 4)), nib.aff2axcodes(img.affine), img.shape)
        # the whole brain is inside the field of view
        mask = np.asarray(nib.load(out / dc.truth_paths(r)["brain_mask"]).dataobj)
        for axis in range(3):
            assert not np.take(mask, [0, -1], axis=axis).any()
    assert seen["IXI"][0] != seen["ABCDS"][0] and len(set(seen["IXI"][0])) > 1, "IXI is anisotropic"
    assert seen["IXI"][1] == ("P", "S", "R") and seen["ABCDS"][1] == ("R", "A", "S")


def test_truth_affine_matches_truth_mask(cohort):
    """MNI brain mask pushed through the true affine == true native brain mask (Dice >= 0.98)."""
    out, scans = cohort
    template = mni152_brain_mask()
    mask_mni = np.asarray(template.dataobj)
    for r in scans:
        truth = _truth(out, r)
        native = nib.load(out / dc.truth_paths(r)["brain_mask"])
        assert native.get_data_dtype() == np.uint8
        true_mask = np.asarray(native.dataobj)[::2, ::2, ::2] > 0  # every 2nd voxel: 8x faster, same Dice
        every_second = np.diag([2.0, 2.0, 2.0, 1.0])
        vox = np.linalg.inv(template.affine) @ np.asarray(truth["native_to_mni_affine"]) @ native.affine @ every_second
        warped = ndi.affine_transform(mask_mni, vox[:3, :3], vox[:3, 3], output_shape=true_mask.shape, order=0) > 0
        dice = 2 * (warped & true_mask).sum() / (warped.sum() + true_mask.sum())
        assert dice >= 0.98, (r["path"], dice)
        assert truth["group"] == r["group"] and truth["site"] == r["dataset"] and truth["seed"] == SEED
        assert truth["ds_strength"] == 1.0 and "rotation_deg" in truth["pose"]
        assert np.all(np.abs(truth["pose"]["rotation_deg"]) <= 15)
        assert np.all(np.abs(truth["pose"]["translation_mm"]) <= 20)


def test_sessions_share_anatomy_not_pose(cohort):
    out, scans = cohort
    subject = next(r["subject"] for r in scans if r["session"] == "2")
    first, second = (_truth(out, r) for r in scans if r["subject"] == subject)
    assert first["pose"] != second["pose"]
    for region, volume in first["region_volumes_ml"].items():
        assert second["region_volumes_ml"][region] == pytest.approx(volume, rel=0.02)


def test_intensities_noise_and_bias(cohort):
    out, scans = cohort
    for r in (next(r for r in scans if r["dataset"] == site) for site in NATIVE_SITES):
        truth = _truth(out, r)
        t1w = np.asarray(nib.load(out / r["path"]).dataobj).astype(np.float32)
        regions = np.asarray(nib.load(out / dc.truth_paths(r)["regions"]).dataobj)
        bias = nib.load(out / dc.truth_paths(r)["biasfield"]).get_fdata(dtype=np.float32)
        assert t1w.min() >= 0
        # T1w contrast: CSF (ventricles) darker than brain tissue; bright scalp fat outside the brain
        assert np.median(t1w[regions == 2]) < 0.6 * np.median(t1w[regions == 1])
        assert np.percentile(t1w[regions == 0], 99.9) > np.median(t1w[regions == 1])
        # Rician background: corners are air, mean = sigma * sqrt(pi / 2)
        corner = t1w[:20, :20, :20]
        assert corner.mean() == pytest.approx(truth["noise_sigma"] * np.sqrt(np.pi / 2), rel=0.1)
        # bias: positive, smooth, geometric mean ~1 over the brain
        assert bias.min() > 0.3 and bias.max() < 3
        assert abs(np.log(bias[regions > 0]).mean()) < 0.02
        for axis in range(3):
            assert np.abs(np.diff(np.log(bias), axis=axis)).max() < 0.02


# ---------------------------------------------------------------------------------- group effects

def test_group_effects_are_where_intended(cohort):
    """Same subject at ds_strength 1 vs 0: DS changes ventricles, cerebellum, frontal lobe, not the rest."""
    out, scans = cohort
    for r in scans:
        if r["session"] == "2":
            continue
        at_zero = dc._simulate(r, SEED, 0.0, images=False)["truth"]
        at_one = _truth(out, r)
        if r["group"] == "euploid":
            assert at_zero["region_volumes_ml"] == at_one["region_volumes_ml"]
            continue
        ratio = {k: _normalised(at_one, k) / _normalised(at_zero, k) for k in at_one["region_volumes_ml"]}
        assert ratio["ventricles"] > 1.25
        assert ratio["cerebellum"] < 0.93
        assert ratio["frontal"] < 0.97
        if r["ad_stage"] == "asymptomatic":  # DS morphology alone leaves the superior parietal lobe alone
            assert ratio["control"] == pytest.approx(1.0, abs=0.01)
        else:  # DS-AD atrophy moves the brain outline in, there too
            assert ratio["control"] < 0.99
        assert at_one["region_volumes_ml"]["brain"] < 0.9 * at_zero["region_volumes_ml"]["brain"]
        assert at_one["region_volumes_ml"]["cerebellum"] < 0.85 * at_zero["region_volumes_ml"]["cerebellum"]


def test_no_group_effect_at_strength_zero(cohort):
    out, scans = cohort
    record = next(r for r in scans if r["group"] == "DS")
    as_ds = dc._simulate(record, SEED, 0.0, images=False)
    as_euploid = dc._simulate({**record, "group": "euploid"}, SEED, 0.0, images=False)
    assert np.array_equal(as_ds["labels"], as_euploid["labels"])
    assert as_ds["truth"]["native_to_mni_affine"] == as_euploid["truth"]["native_to_mni_affine"]


def test_ageing_shrinks_the_brain_and_enlarges_the_ventricles():
    """The same euploid subjects at 40 and 80: brain tissue -0.2 to -0.5 % a year, ventricles larger."""
    plan = dc.plan_cohort(None, SEED, sites={"HCP": {"subjects": 3}}, session_fraction=0.0)
    head = dc._resampled_site_head("HCP")
    for record in plan:
        volumes = {}
        for age in (40.0, 80.0):
            truth = dc.simulate_template_scan({**record, "age": age}, SEED, 1.0, head, 0.02, 1000.0)["truth"]
            v = truth["template_region_volumes_ml"]
            volumes[age] = (v["brain"] - v["ventricles"], v["ventricles"])
        per_year = (volumes[80.0][0] / volumes[40.0][0] - 1) / 40
        assert -0.005 < per_year < -0.002, per_year
        assert volumes[80.0][1] > volumes[40.0][1] + 10  # mL: ~0.35 mL a year, the ventricles' ageing


def test_template_space_scans(template_cohort, tmp_path):
    """Skull-stripped 2 mm MNI scans: the brain only, positive inside, the size removed (icv_ml keeps it)."""
    out, scans = template_cohort
    shape, affine = dc.template_grid()
    for r in scans:
        assert r["space"] == dc.TEMPLATE_SPACE
        img = nib.load(out / r["path"])
        assert img.shape == shape and np.allclose(img.affine, affine)
        t1w = np.asarray(img.dataobj)
        mask = np.asarray(nib.load(out / dc.truth_paths(r)["brain_mask"]).dataobj) > 0
        assert np.array_equal(t1w > 0, mask)  # skull-stripped: the support is the brain
        assert "biasfield" not in dc.truth_paths(r)
        truth = _truth(out, r)
        # registered: the template-grid brain is the template's size whatever the subject's head
        assert 1700 < truth["template_region_volumes_ml"]["brain"] < 2100
        assert truth["icv_ml"] == pytest.approx(r["icv_ml"], abs=0.1)
        sidecar = json.loads((out / r["path"].replace(".nii.gz", ".json")).read_text())
        assert sidecar["SkullStripped"] is True
    with open(out / "SantPau" / "participants.tsv") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert {row["group"] for row in rows} == {"DS", "euploid"}
    assert {row["ad_stage"] for row in rows if row["group"] == "euploid"} == {"n/a"}
    # same bytes from a serial rerun, and a DS subject at ds_strength 0 is its euploid counterpart
    record = next(r for r in scans if r["group"] == "DS")
    dc.generate_scan(record, tmp_path, SEED, 1.0)
    assert (tmp_path / record["path"]).read_bytes() == (out / record["path"]).read_bytes()
    head = dc._resampled_site_head("SantPau")
    as_ds = dc.simulate_template_scan(record, SEED, 0.0, head, 0.02, 1000.0)
    as_euploid = dc.simulate_template_scan({**record, "group": "euploid", "ad_stage": "n/a"}, SEED, 0.0, head,
                                           0.02, 1000.0)
    assert np.array_equal(as_ds["t1w"], as_euploid["t1w"])


def test_ds_deformation_is_local_and_invertible():
    jac = np.asarray(dc.ds_jacobian(1.0).dataobj)
    labels = np.asarray(dc.region_labels().dataobj)[::2, ::2, ::2][: jac.shape[0], : jac.shape[1], : jac.shape[2]]
    affected = np.isin(labels, [2, 3, 4])
    far = ndi.distance_transform_edt(~affected) * 2 > 20  # > 20 mm from every DS region
    assert np.abs(jac[far] - 1).max() < 0.01
    control = np.abs(jac[labels == 5] - 1)
    assert control.mean() < 0.002 and control.max() < 0.05
    assert jac[labels == 2].mean() < 0.7 and jac[labels == 3].mean() > 1.05  # pull-back: < 1 = enlarged
    assert jac.min() > 0
    assert np.all(np.asarray(dc.ds_displacement(0.0).dataobj) == 0)


# ------------------------------------------------------------------------------- regions, helpers

def test_region_masks():
    brain = np.asarray(mni152_brain_mask().dataobj) > 0
    t1 = np.asarray(mni152_brain().dataobj)
    volumes = {}
    for name, function in (("ventricles", dc.lateral_ventricles_mask), ("cerebellum", dc.cerebellum_mask),
                           ("frontal", dc.frontal_mask), ("control", dc.control_mask)):
        mask = np.asarray(function().dataobj) > 0
        assert not (mask & ~brain).any()
        volumes[name] = mask.sum() / 1000
    assert 8 < volumes["ventricles"] < 40 and 100 < volumes["cerebellum"] < 250
    assert 350 < volumes["frontal"] < 900 and volumes["control"] > 50
    ventricles = np.asarray(dc.lateral_ventricles_mask().dataobj) > 0
    assert t1[ventricles].mean() < 0.5 * t1[brain].mean() + 0.1
    z = np.nonzero(np.asarray(dc.cerebellum_mask().dataobj))[2] + mni152_brain().affine[2, 3]
    assert z.max() < 5


def test_lookups_match_scipy():
    rng = np.random.default_rng(0)
    data = ndi.gaussian_filter(rng.random((20, 24, 22), dtype=np.float32), 1.5)
    coords = rng.uniform(-3, 26, (3, 2, 5, 8)).astype(np.float32)
    volume = dc._Volume(data)
    expected = ndi.map_coordinates(data, coords, order=1, mode="grid-constant")
    assert np.allclose(volume.linear(coords), expected, atol=1e-5)
    labels = (data * 50).astype(np.uint8)
    near = dc._Volume(labels).nearest(coords)
    inside = np.all((coords > 0.01) & (coords < np.array(data.shape).reshape(3, 1, 1, 1) - 1.01), axis=0)
    frac = np.abs(coords - np.round(coords))
    clear = inside & np.all(np.abs(frac - 0.5) > 0.01, axis=0)
    assert np.array_equal(near[clear], ndi.map_coordinates(labels, coords, order=0)[clear])


def test_upsampler_is_exact_for_affine_functions():
    shape_rev, steps_rev = (10, 13, 16), (3, 4, 4)
    nodes = [np.arange((n - 1) // f + 2) * f for n, f in zip(shape_rev, steps_rev)]
    grid = np.meshgrid(*nodes, indexing="ij")
    coarse = (0.5 * grid[0] - 2.0 * grid[1] + 0.25 * grid[2] + 3).astype(np.float32)
    up = dc._Upsampler(steps_rev, shape_rev)
    full = np.empty(shape_rev, np.float32)
    for slab in up.slabs():
        up(coarse, slab, full[slab])
    i, j, k = np.indices(shape_rev)
    assert np.allclose(full, 0.5 * i - 2.0 * j + 0.25 * k + 3, atol=1e-4)


def test_command_line_generates_the_sites_asked_for(tmp_path, capsys):
    from brainvae import cli

    assert cli.main(["demo-cohort", str(tmp_path), "--sites", "SantPau=2:0.5", "--seed", "3"]) == 0
    assert "wrote 2 scans of 2 subjects" in capsys.readouterr().out
    with open(tmp_path / "SantPau" / "participants.tsv") as handle:
        groups = sorted(row["group"] for row in csv.DictReader(handle, delimiter="\t"))
    assert groups == ["DS", "euploid"]
    with pytest.raises(SystemExit):
        cli.main(["demo-cohort", str(tmp_path), "--sites", "SantPau=two"])
    assert "expected SITE=SUBJECTS[:DS_FRACTION]" in capsys.readouterr().err
