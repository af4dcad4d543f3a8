"""Explaining a whole data set, on one process or many (``torch.distributed``), and reading the results back.

===================  ===================================================================================
module               contents
===================  ===================================================================================
``scale.explain``    :func:`explain_dataset`: stream a data set through the explainer into a zarr store
``scale.fit``        :func:`fit_dataset`, :func:`sample_locations`: heads fitted on streamed, sharded data
``scale.results``    :func:`open_results`, :class:`Results`: the scores table, heatmaps by id, a contact sheet
``scale.store``      the store's layout, settings fingerprint and checks
``scale.data``       :class:`ImageFiles` (a folder as a data set), blocks of indices, failure records
===================  ===================================================================================

See ``docs/dataset.md`` for single-process and ``torchrun`` runs, resuming, and the store layout.
"""

from ._dist import Ranks, current_ranks, ensure_process_group, local_device, process_group_from_env
from .data import ImageFiles
from .explain import explain_dataset
from .fit import fit_dataset, sample_locations
from .results import Results, open_results

__all__ = [
    "explain_dataset",
    "fit_dataset",
    "sample_locations",
    "open_results",
    "Results",
    "ImageFiles",
    "Ranks",
    "current_ranks",
    "ensure_process_group",
    "process_group_from_env",
    "local_device",
]
