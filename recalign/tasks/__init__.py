"""SeqIO tasks and mixtures for recommendation (see `recalign.tasks.registry`)."""
