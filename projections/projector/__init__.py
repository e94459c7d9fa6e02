"""The projector: folds the stream into the views from its own checkpoint (``projector``), and
the figures it exports (``metrics``)."""
