"""Sites at the edges: no unlabelled case, every case flagged, every label map empty (real site algorithm)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from fedqc.config import config_from_dict, to_dict
from fedqc.config.flat import encode_value, flatten
from fedqc.core.errors import DataError
from fedqc.qc.thresholds import Thresholds
from fedqc.site.algorithm import make_site_algo
from fedqc.site.contract import Task, candidate_prefix
from tests.conftest import tiny_config_dict


def _site(root, work, labelled: bool, test_fraction: float, **sections):
    config = config_from_dict(tiny_config_dict(root, views=["SA"], **sections))
    settings = to_dict(config)
    settings.pop("sites")
    settings.pop("simulated", None)
    centre = 1 if labelled else 2
    node = {"site-id": f"c{centre}", "work-dir": str(work), "root": str(root),
            "filter": encode_value({"CENTRE": centre}), "labelled": labelled, "test-fraction": test_fraction,
            "views": "SA"}
    return make_site_algo(node, flatten(settings))


@pytest.fixture(scope="module")
def global_weights(tiny_data, tmp_path_factory):
    """Segmenter candidates and autoencoder after one supervised epoch at the labelled centre."""
    site = _site(tiny_data, tmp_path_factory.mktemp("w"), labelled=True, test_fraction=0.25)
    seg = site.run(Task.SUPERVISED, None, {"local-epochs": 0, "seed": 0}).weights
    seg = site.run(Task.SUPERVISED, seg, {"local-epochs": 1, "phase-round": 1}).weights
    ae = site.run(Task.QC_AUTOENCODER, None, {"local-epochs": 0, "seed": 0}).weights
    ae = site.run(Task.QC_AUTOENCODER, ae, {"local-epochs": 1, "phase-round": 1}).weights
    return {**{candidate_prefix(i) + k: v for i in range(2) for k, v in seg.items()}, **ae}


def test_a_site_without_unlabelled_cases_refines_nothing_and_says_why_it_cannot_predict(tiny_data, tmp_path,
                                                                                         global_weights):
    site = _site(tiny_data, tmp_path / "w", labelled=False, test_fraction=0.99)  # every subject held out
    reply = site.run(Task.REFINE, global_weights, {"local-epochs": 1, "alpha": 1.0, "num-candidates": 2})
    assert reply.weights is None
    assert reply.metrics["num-cases"] == 0 and reply.metrics["num-flagged"] == 0 and reply.metrics["num-examples"] == 0
    with pytest.raises(Exception, match="no fences: .*no unlabelled cases"):
        site.run(Task.PREDICT, global_weights, {"num-candidates": 2})


def test_a_site_where_every_case_is_flagged_refines_on_all_of_them(tiny_data, tmp_path, global_weights):
    work = tmp_path / "w"
    site = _site(tiny_data, work, labelled=False, test_fraction=0.25, qc={"threshold_source": "consortium"})
    # Consortium fences, sent with the task as the coordinator does, that no case can pass: pDC must
    # exceed 1 and pHD stay below 0 mm.
    impossible = Thresholds(th_low_pdc=1.01, th_up_phd=-1.0, q1_pdc=1.0, q3_pdc=1.0, q1_phd=0.0, q3_phd=0.0,
                            factor=1.5, n_cases=6, source="consortium (test)")
    fences = {"consortium-fences": json.dumps({"SA": dataclasses.asdict(impossible)})}
    reply = site.run(Task.REFINE, global_weights, {"local-epochs": 1, "alpha": 1.0, "num-candidates": 2, **fences})
    assert reply.metrics["num-flagged"] == reply.metrics["num-cases"] > 0
    assert reply.metrics["num-labelled"] == 0 and reply.metrics["num-examples"] > 0
    assert any(not np.array_equal(reply.weights[k], global_weights[k]) for k in reply.weights)
    predict = site.run(Task.PREDICT, global_weights, {"num-candidates": 2, **fences})
    assert predict.metrics["num-flagged"] == predict.metrics["num-cases"] == 16  # all OoD: selection's fallback


def test_a_labelled_site_whose_label_maps_are_all_empty_is_refused_by_name(tiny_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    for path in root.rglob("*_gt.nii.gz"):
        image = nib.load(path)
        nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine, image.header), path)
    site = _site(root, tmp_path / "w", labelled=True, test_fraction=0.25)
    weights = site.run(Task.SUPERVISED, None, {"local-epochs": 0, "seed": 0}).weights
    with pytest.raises(DataError, match="every SA label map of the labelled site 'c1' is empty") as error:
        site.run(Task.SUPERVISED, weights, {"local-epochs": 1, "phase-round": 1})
    assert str(root) in str(error.value)


def test_the_first_half_of_a_sequential_round_leaves_the_labelled_term_out(tiny_data, tmp_path, global_weights):
    # refine_aggregation sequential: the coordinator first asks for Eq. 2's semi-supervised term
    # alone (semi-only), then for the supervised term alone (control). A labelled site with nothing
    # flagged trains in the second half only.
    site = _site(tiny_data, tmp_path / "w", labelled=True, test_fraction=0.25)
    config = {"local-epochs": 1, "alpha": 1.0, "num-candidates": 2}
    first = site.run(Task.REFINE, global_weights, {**config, "semi-only": True})
    assert first.metrics["num-flagged"] == 0 and first.metrics["num-labelled"] == 0 and first.weights is None
    second = site.run(Task.REFINE, global_weights, {**config, "control": True})
    assert second.metrics["num-labelled"] > 0 and second.metrics["num-examples"] == second.metrics["num-labelled"]
    assert any(not np.array_equal(second.weights[k], global_weights[k]) for k in second.weights)
