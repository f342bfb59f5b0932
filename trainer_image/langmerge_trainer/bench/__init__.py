"""``langmerge-trainer bench``: the quality and cost of language experts + merging against one jointly trained model.

Modules: :mod:`.workloads` (data and base models), :mod:`.runner` (training, merging and evaluating with the Jobs'
own code), :mod:`.report` (the JSON record, the Markdown report, plots, the README block), :mod:`.cli` (options).
"""
