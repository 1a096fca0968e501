"""SeqIO tasks and mixtures for recommendation.

One way to register a prepared data set's tasks and mixtures: `register_dataset(DIR, vocab=..., config=...)`.
The trainer calls it for gin's DATA_DIRS (with the run's VOCABULARY and TaskConfig), `recalign eval`
for the data sets a run's run.json records (or `--data`), with the same vocabulary and config; a module
of your own given to `recalign train --module` may call it, or add seqio tasks of its own. As seqio's
registries, a name registered again with other contents is an error (`replace=True`, or `unregister(name)`
first, to replace it on purpose); registered again with the same folder, vocabulary and config, it is a no-op.
ITDR's instruction tasks: `TaskConfig(itdr=True)`, and `register_cross_domain(SOURCE, TARGET)` for CDR.
"""

from recalign.tasks.registry import (MIXTURES, TaskConfig, get, register_cross_domain, register_dataset,
                                     register_profile_task, register_reference_task, unregister)

__all__ = ["MIXTURES", "TaskConfig", "get", "register_cross_domain", "register_dataset",
           "register_profile_task", "register_reference_task", "unregister"]
