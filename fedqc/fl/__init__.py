"""Federation on Flower 1.42: the only fedqc package that imports Flower.

Importing ``fedqc.fl`` itself imports nothing heavy; the modules are:

* :mod:`~fedqc.fl.settings`: the values the plumbing needs (protocol, server, client), no Flower.
* :mod:`~fedqc.fl.records`: flat weights / metrics / config <-> Flower records; message layout.
* :mod:`~fedqc.fl.aggregation`: checks, weighted averaging, FedBN split, m_best (numpy only).
* :mod:`~fedqc.fl.rounds`: one exchange with the sites (deadlines, autoencoder hand-over).
* :mod:`~fedqc.fl.protocol`: the phases supervised -> qc-autoencoder -> refine -> predict.
* :mod:`~fedqc.fl.run_state`: the run directory, written atomically every round.
* :mod:`~fedqc.fl.server_app`, :mod:`~fedqc.fl.client_app`: Flower's entry points.
* :mod:`~fedqc.fl.site_runner`: a site's side of one message; :mod:`~fedqc.fl.audit` records replies.
* :mod:`~fedqc.fl.appdir`: the generated Flower app of a run and its run-config keys.
* :mod:`~fedqc.fl.simulation`: the same apps on Flower's simulation engine.
* :mod:`~fedqc.fl.processes`, :mod:`~fedqc.fl.launch`: SuperLink / SuperNode processes, ``flwr``
  CLI, ``run_server`` / ``run_client``.
* :mod:`~fedqc.fl.from_config`: a fedqc config as federation settings and node configs.
* :mod:`~fedqc.fl.certs`: a CA, a server certificate and site keys for tests and how-tos.

Test harnesses (a toy site algorithm with fault injection, a loopback federation) live under
``tests/fl/``, not in the package.
"""
