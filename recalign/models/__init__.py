"""T5 network (pure flax), model glue (losses, scoring, decoding) and checkpoint import/export."""
