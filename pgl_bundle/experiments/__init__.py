"""Experiments on labelled CT, each one resumable command of ``python -m pgl_bundle``: the comparison of
initialisations and transfer strategies across label budgets (:mod:`.compare`; which runs it trains:
:mod:`.fine_tunes`), the dense-probe curve (:mod:`.probe_curve`), the fine-tuning sanity bar
(:mod:`.finetune_sanity`); what they share: :mod:`.runner`, :mod:`.stats`."""

from .compare import compare
from .finetune_sanity import finetune_sanity
from .probe_curve import probe_curve
