"""Scoring, a service shared by eval, rl, train and the tools: a local model (:mod:`.local`), a served one (:mod:`.client`, :mod:`.remote`)."""
