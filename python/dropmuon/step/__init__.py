"""The update of the active parameters: the rules every path shares (:mod:`.update_rules`), the
fused calls (:mod:`.update`) and AdamW for the fallback parameters (:mod:`.adamw`)."""
