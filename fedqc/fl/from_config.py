"""From a fedqc config to the federation's settings, and from a finished run to its report.

Flower-free glue between ``fedqc.config`` (what users write) and ``fedqc.fl`` (the plumbing):
sites become node configs, the method's settings are flattened into the run config every site
builds its :class:`fedqc.site.algorithm.FedqcSite` from, and the protocol's rounds come from the
``federation`` / ``train`` / ``refine`` sections.
The report of a simulated run is :mod:`fedqc.evaluation.federated_report`.
"""

from __future__ import annotations

from fedqc.config import Config, SiteConfig, to_dict
from fedqc.config.flat import encode_value, flatten
from fedqc.fl.settings import FederationSettings
from fedqc.site.contract import Scalar


def node_config(site: SiteConfig, views: tuple[str, ...], device: str | None = None) -> dict[str, Scalar]:
    """A site as the flat node config its SuperNode (or virtual node) starts with."""
    node: dict[str, Scalar] = {"site-id": site.name, "root": str(site.root), "filter": encode_value(dict(site.filter)),
                               "labelled": site.labelled, "layout": site.layout, "test-fraction": site.test_fraction,
                               "unlabelled-fraction": site.unlabelled_fraction, "views": ",".join(views)}
    if site.label_remap:
        node["label-remap"] = encode_value({int(k): v for k, v in site.label_remap.items()})
    if device:
        node["device"] = device
    return node


def site_run_config(config: Config) -> dict[str, Scalar]:
    """The method's settings every site receives (no sites, no paths of the coordinator)."""
    data = to_dict(config)
    for key in ("sites", "simulated"):
        data.pop(key, None)
    return flatten(data)


def federation_settings(config: Config, audit: bool = False, control: bool | None = None) -> FederationSettings:
    """The protocol of ``config``; ``control`` (default ``federation.control``) adds the M+sup rounds."""
    fed = config.federation
    return FederationSettings(
        supervised_rounds=fed.supervised_rounds, ae_rounds=fed.ae_rounds, refine_rounds=config.refine.k_semi,
        local_epochs=fed.local_epochs, refine_local_epochs=config.refine.local_epochs or 0, strategy=fed.strategy,
        proximal_mu=fed.proximal_mu if fed.strategy == "fedprox" else 0.0, m_best=config.train.m_best,
        alpha=config.refine.alpha, min_sites=fed.min_sites, start_sites=fed.start_sites, node_wait_s=fed.timeout_s,
        round_timeout_s=max(fed.timeout_s, 60.0),
        transfer_dtype="bfloat16" if fed.half_precision_transfer else "float32",
        refine_aggregation=fed.refine_aggregation, refine_server_lr=fed.refine_server_lr,
        aggregation=fed.aggregation, trim_fraction=fed.trim_fraction,
        norm_factor=fed.norm_factor,
        fence_source=config.qc.threshold_source, tukey_factor=config.qc.tukey_factor,
        segmenter_examples=config.qc.autoencoder == "corrective" and config.qc.segmenter_examples,
        control=fed.control if control is None else control,
        seed=config.train.seed, site_run_config=site_run_config(config), audit_replies=audit,
        secure_aggregation=config.privacy.secure_aggregation)
